// ParallelPool: every iteration of every For() runs exactly once, with back-to-back fork-joins
// (the pattern of a stream of appends copying into their chunk blocks).
#include <gtest/gtest.h>

#include <atomic>
#include <vector>

#include "daemon/parallel.h"

namespace kvmem {
namespace {

TEST(ParallelPool, BackToBackForsRunEachIterationOnce) {
  ParallelPool pool(3);
  constexpr uint32_t kRounds = 20000;
  std::atomic<uint64_t> total{0};
  for (uint32_t r = 0; r < kRounds; ++r) {
    // A fresh function per round: a worker running a finished round's function (or none)
    // would miscount or crash.
    const uint32_t n = 2 + r % 3;
    std::vector<std::atomic<uint32_t>> hits(n);
    const std::function<void(uint32_t)> fn = [&, r](uint32_t i) {
      hits[i].fetch_add(1);
      total.fetch_add(r);
    };
    pool.For(n, fn);
    for (uint32_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1u) << "round " << r << " iteration " << i;
  }
  uint64_t want = 0;
  for (uint32_t r = 0; r < kRounds; ++r) want += uint64_t{r} * (2 + r % 3);
  EXPECT_EQ(total.load(), want);
}

TEST(ParallelPool, NoWorkersRunsInline) {
  ParallelPool pool(0);
  std::vector<int> seen;
  pool.For(4, [&](uint32_t i) { seen.push_back(static_cast<int>(i)); });
  EXPECT_EQ(seen, (std::vector<int>{0, 1, 2, 3}));
}

}  // namespace
}  // namespace kvmem
