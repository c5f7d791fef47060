#include "common/memcopy.h"

#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/dtype.h"

namespace kvmem {
namespace {

// Every length and misalignment around the vector widths copies exactly, and the check finds a
// single non-finite element wherever it sits (head, body, remainder).
TEST(MemCopy, StreamingCopyIsExactAtEveryAlignmentAndLength) {
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint8_t> src(9000), dst(9100);
  for (auto& x : src) x = static_cast<uint8_t>(rng());
  for (size_t len : {0ul, 1ul, 31ul, 1023ul, 1024ul, 1025ul, 4096ul, 4097ul, 8191ul}) {
    for (size_t shift : {0ul, 1ul, 2ul, 30ul, 32ul}) {
      std::fill(dst.begin(), dst.end(), 0xAB);
      StreamingCopy(dst.data() + shift, src.data() + 3, len);
      ASSERT_EQ(0, std::memcmp(dst.data() + shift, src.data() + 3, len)) << len << "/" << shift;
      ASSERT_EQ(dst[shift + len], 0xAB) << "wrote past the end";
      if (shift > 0) {
        ASSERT_EQ(dst[shift - 1], 0xAB) << "wrote before the start";
      }
    }
  }
}

TEST(MemCopy, CheckedCopyFindsEveryNonFiniteElement) {
  std::mt19937_64 rng(std::random_device{}());
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    const size_t es = DTypeSize(t);
    const size_t n = 1507;  // elements: several vector blocks plus a remainder
    std::vector<uint8_t> src(n * es), dst(n * es + 64);
    std::normal_distribution<float> g;
    for (size_t i = 0; i < n; ++i) StoreFromFloat(src.data(), t, i, g(rng));
    for (size_t shift : {0ul, 2ul, 4ul, 36ul}) {
      if (shift % es) continue;
      EXPECT_FALSE(StreamingCopyChecked(dst.data() + shift, src.data(), n * es, t));
      EXPECT_EQ(0, std::memcmp(dst.data() + shift, src.data(), n * es));
      for (size_t at : {0ul, 1ul, n / 2, n - 2, n - 1}) {
        for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
          auto s2 = src;
          StoreFromFloat(s2.data(), t, at, bad);
          EXPECT_TRUE(StreamingCopyChecked(dst.data() + shift, s2.data(), n * es, t))
              << DTypeName(t) << " element " << at << " shift " << shift;
          EXPECT_EQ(0, std::memcmp(dst.data() + shift, s2.data(), n * es));
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvmem
