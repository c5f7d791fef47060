#include "common/dtype.h"
#include "testing/seed.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

namespace kvmem {
namespace {

TEST(DType, Bf16RoundTripIsExactOnRepresentable) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = BF16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToBF16(f), h) << h;
  }
}

TEST(DType, F16RoundTripIsExactOnRepresentable) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = F16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(f))));
      continue;
    }
    EXPECT_EQ(FloatToF16(f), h) << h;
  }
}

TEST(DType, F16RoundsToNearestEven) {
  std::mt19937 rng(static_cast<uint32_t>(::kvmem::testing::TestSeed()));
  std::uniform_real_distribution<float> u(-70000.f, 70000.f);
  for (int i = 0; i < 100000; ++i) {
    const float f = u(rng) * (i % 3 == 0 ? 1e-6f : 1.f);
    const uint16_t h = FloatToF16(f);
    const float back = F16ToFloat(h);
    if (std::fabs(f) >= 65520.f) {
      EXPECT_TRUE(std::isinf(back));
      continue;
    }
    // No other half is closer than the chosen one.
    const float up = F16ToFloat(static_cast<uint16_t>(h + 1));
    const float down = F16ToFloat(static_cast<uint16_t>(h - 1));
    if (!std::isnan(up) && !std::isinf(up)) {
      EXPECT_LE(std::fabs(back - f), std::fabs(up - f));
    }
    if (!std::isnan(down) && !std::isinf(down) && h != 0 && h != 0x8000) {
      EXPECT_LE(std::fabs(back - f), std::fabs(down - f));
    }
  }
}

TEST(DType, NonFinite) {
  float v[3] = {1.f, 2.f, std::numeric_limits<float>::quiet_NaN()};
  EXPECT_TRUE(HasNonFinite(v, DType::kF32, 3));
  EXPECT_FALSE(HasNonFinite(v, DType::kF32, 2));
  uint16_t b[2] = {FloatToBF16(1.f), FloatToBF16(INFINITY)};
  EXPECT_TRUE(HasNonFinite(b, DType::kBF16, 2));
  uint16_t h[2] = {FloatToF16(1.f), FloatToF16(-INFINITY)};
  EXPECT_TRUE(HasNonFinite(h, DType::kF16, 2));
  EXPECT_FALSE(HasNonFinite(h, DType::kF16, 1));
}

TEST(DType, Names) {
  EXPECT_EQ(ParseDType("bf16"), DType::kBF16);
  EXPECT_EQ(ParseDType("float16"), DType::kF16);
  EXPECT_EQ(ParseDType("fp32"), DType::kF32);
  EXPECT_FALSE(ParseDType("int8").has_value());
  EXPECT_EQ(DTypeName(DType::kBF16), "bf16");
}

}  // namespace
}  // namespace kvmem
