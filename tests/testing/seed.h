// Seeds for randomized tests: fresh every run unless KVMEM_TEST_SEED is set, which replays a
// failure. Each seed taken is printed (and recorded as the test's "seed" property), so the
// output of a failed run names the seed that replays it.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

namespace kvmem::testing {

inline uint64_t TestSeed() {
  uint64_t seed;
  if (const char* s = std::getenv("KVMEM_TEST_SEED")) {
    seed = std::strtoull(s, nullptr, 10);
  } else {
    seed = (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  }
  std::printf("[ seed     ] %llu (replay: KVMEM_TEST_SEED=%llu)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  return seed;
}

inline std::mt19937_64 SeededRng() { return std::mt19937_64(TestSeed()); }

}  // namespace kvmem::testing

// A seed for the enclosing scope, named in every failure message inside it.
#define KVMEM_SEEDED_TEST_SCOPE(seed_var)                                               \
  const uint64_t seed_var = ::kvmem::testing::TestSeed();                              \
  SCOPED_TRACE("seed=" + std::to_string(seed_var) + " (replay: KVMEM_TEST_SEED=" +      \
               std::to_string(seed_var) + ")")
