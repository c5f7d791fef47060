#include "index/summary.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "common/dtype.h"
#include "index/detail/vec_math.h"
#include "index_test_util.h"

namespace kvmem::index {
namespace {

// The vectorised inner products are the eight-lane definition, bit for bit (the device search
// relies on that order), at every length and with tails, on values of mixed magnitude.
TEST(VecMathTest, DotAndSquaredDistanceEqualTheirPortableDefinition) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01;
  std::vector<float> a(300), b(300);
  for (int trial = 0; trial < 200; ++trial) {
    for (size_t i = 0; i < a.size(); ++i) {
      a[i] = n01(rng) * std::exp2(static_cast<float>(rng() % 20) - 10.f);
      b[i] = n01(rng) * std::exp2(static_cast<float>(rng() % 20) - 10.f);
    }
    for (uint32_t n : {0u, 1u, 7u, 8u, 9u, 64u, 100u, 128u, 129u, 256u, 300u}) {
      const uint32_t off = static_cast<uint32_t>(rng() % 4) * (n + 4 <= a.size());  // unaligned rows too
      const float d = detail::Dot(a.data() + off, b.data() + off, n);
      const float dp = detail::DotPortable(a.data() + off, b.data() + off, n);
      EXPECT_EQ(std::memcmp(&d, &dp, 4), 0) << "Dot n " << n << ": " << d << " vs " << dp;
      const float* rows[4] = {a.data(), b.data(), a.data() + off, b.data() + (a.size() - n)};
      float d4[4];
      detail::Dot4(rows, b.data() + off, n, d4);
      for (int p = 0; p < 4; ++p) {
        const float want = detail::DotPortable(rows[p], b.data() + off, n);
        EXPECT_EQ(std::memcmp(&d4[p], &want, 4), 0) << "Dot4 row " << p << " n " << n;
      }
      const double q = detail::SquaredDistanceF(a.data() + off, b.data() + off, n);
      const double qp = detail::SquaredDistancePortable(a.data() + off, b.data() + off, n);
      EXPECT_EQ(std::memcmp(&q, &qp, 8), 0) << "SquaredDistanceF n " << n << ": " << q << " vs " << qp;
    }
  }
}

// DotBF16 over a row of bfloat16 bits is Dot over the row's float values, bit for bit (the
// cluster tree stores chunk centroids as bits and must score them as the device and the flat
// reference do), at every length and with tails.
TEST(VecMathTest, DotBF16EqualsDotOverTheRowsFloats) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01;
  std::vector<float> a(300), bf(300);
  std::vector<uint16_t> bits(300);
  for (int trial = 0; trial < 200; ++trial) {
    for (size_t i = 0; i < a.size(); ++i) {
      a[i] = n01(rng) * std::exp2(static_cast<float>(rng() % 20) - 10.f);
      bits[i] = FloatToBF16(n01(rng) * std::exp2(static_cast<float>(rng() % 20) - 10.f));
      bf[i] = BF16ToFloat(bits[i]);
    }
    for (uint32_t n : {0u, 1u, 7u, 8u, 9u, 64u, 100u, 128u, 129u, 256u, 300u}) {
      const uint32_t off = static_cast<uint32_t>(rng() % 4) * (n + 4 <= a.size());
      const float got = detail::DotBF16(a.data() + off, bits.data() + off, n);
      const float want = detail::Dot(a.data() + off, bf.data() + off, n);
      ASSERT_NE(n > 0 ? want : 1.f, 0.f);  // a real sum, not a row of zeros
      EXPECT_EQ(std::memcmp(&got, &want, 4), 0) << "n " << n << ": " << got << " vs " << want;
    }
  }
}

TEST(SummaryTest, CentroidRadiusAndNormMatchDefinition) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01;
  const uint32_t T = 17, D = 40;
  std::vector<float> keys(T * D);
  for (auto& x : keys) x = 5.f * n01(rng) + 1.f;
  auto s = SummarizeKeys(keys.data(), T, D);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_EQ(s->centroid.size(), D);
  for (uint32_t d = 0; d < D; ++d) {
    double m = 0;
    for (uint32_t t = 0; t < T; ++t) m += keys[t * D + d];
    // The mean, rounded to the bfloat16 value the device mirror stores.
    EXPECT_EQ(s->centroid[d], BF16ToFloat(FloatToBF16(static_cast<float>(m / T))));
    EXPECT_NEAR(s->centroid[d], m / T, std::abs(m / T) * (1.0 / 256));
  }
  double r = 0, norm = 0;
  for (uint32_t t = 0; t < T; ++t) {
    r = std::max(r, detail::DistanceD(&keys[t * D], s->centroid.data(), D));
    double n2 = 0;
    for (uint32_t d = 0; d < D; ++d) n2 += double{keys[t * D + d]} * keys[t * D + d];
    norm = std::max(norm, std::sqrt(n2));
  }
  EXPECT_GE(double{s->radius}, r);  // rounded up, never down
  EXPECT_NEAR(s->radius, r, 1e-4 * r);
  EXPECT_GE(double{s->max_key_norm}, norm);
  EXPECT_NEAR(s->max_key_norm, norm, 1e-4 * norm);
}

TEST(SummaryTest, SingleTokenHasZeroRadius) {
  std::vector<float> k = {1.f, -2.f, 3.f};
  auto s = SummarizeKeys(k.data(), 1, 3);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->radius, 0.f);
  EXPECT_NEAR(s->max_key_norm, std::sqrt(14.f), 1e-5);
}

TEST(SummaryTest, BlockInEveryDTypeMatchesConvertedFloats) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01;
  const uint32_t T = 9, D = 16, stride = 24;  // padded rows
  std::vector<float> src(T * stride);
  for (auto& x : src) x = n01(rng);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    std::vector<uint8_t> block(src.size() * DTypeSize(t));
    ConvertFromFloat(src.data(), src.size(), t, block.data());
    std::vector<float> back(src.size());
    ConvertToFloat(block.data(), t, src.size(), back.data());
    std::vector<float> dense(T * D);
    for (uint32_t i = 0; i < T; ++i) {
      for (uint32_t d = 0; d < D; ++d) dense[i * D + d] = back[i * stride + d];
    }
    auto a = SummarizeBlock(block.data(), t, T, D, stride);
    auto b = SummarizeKeys(dense.data(), T, D);
    ASSERT_TRUE(a.ok() && b.ok()) << DTypeName(t);
    EXPECT_EQ(a->centroid, b->centroid) << DTypeName(t);
    EXPECT_EQ(a->radius, b->radius) << DTypeName(t);
    EXPECT_EQ(a->max_key_norm, b->max_key_norm) << DTypeName(t);
  }
}

TEST(SummaryTest, RejectsBadInput) {
  std::vector<float> k = {1.f, NAN};
  EXPECT_EQ(SummarizeKeys(k.data(), 1, 2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SummarizeKeys(nullptr, 1, 2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SummarizeKeys(k.data(), 0, 2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SummarizeKeys(k.data(), 1, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SummarizeBlock(k.data(), DType::kF32, 1, 2, 1).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem::index
