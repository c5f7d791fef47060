// kvmem_benchdata: the synthetic generator is deterministic and random-access.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/data/synthetic_kv.h"
#include "common/dtype.h"

namespace kvmem::bench {
namespace {

TEST(SyntheticKVTest, DeterministicAndRandomAccess) {
  SyntheticKVOptions o;
  o.tokens = 3000;
  o.head_dim = 32;
  SyntheticKV a(o), b(o);
  std::vector<float> all(3000 * 32), part(500 * 32);
  a.Keys(1, 0, 3000, all.data());
  b.Keys(1, 1200, 1700, part.data());
  EXPECT_EQ(0, std::memcmp(&all[1200 * 32], part.data(), part.size() * 4));
  std::vector<uint8_t> c1(3000), c2(100);
  a.Boundaries(0, 3000, c1.data());
  b.Boundaries(2900, 3000, c2.data());
  EXPECT_EQ(0, std::memcmp(&c1[2900], c2.data(), 100));
  int sections = 0;
  for (uint8_t c : c1) {
    EXPECT_LE(c, 5);
    sections += c == 5;
  }
  EXPECT_GT(sections, 2);
  std::vector<float> q1(8 * 32), q2(8 * 32);
  a.Query(3, 16, 2800, q1.data());
  b.Query(3, 16, 2800, q2.data());
  EXPECT_EQ(q1, q2);
  // The sink dominates: token 0 has the largest key norm.
  float n0 = 0, nmax = 0;
  for (int d = 0; d < 32; ++d) n0 += all[d] * all[d];
  for (int t = 1; t < 3000; ++t) {
    float n = 0;
    for (int d = 0; d < 32; ++d) n += all[t * 32 + d] * all[t * 32 + d];
    nmax = std::max(nmax, n);
  }
  EXPECT_GT(n0, nmax);
}

}  // namespace
}  // namespace kvmem::bench
