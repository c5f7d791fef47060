#include "common/units.h"

#include <gtest/gtest.h>

namespace kvmem {
namespace {

TEST(Units, Bytes) {
  EXPECT_EQ(*ParseBytes("64MiB"), 64ull << 20);
  EXPECT_EQ(*ParseBytes("8GiB"), 8ull << 30);
  EXPECT_EQ(*ParseBytes("1.5 KiB"), 1536u);
  EXPECT_EQ(*ParseBytes("1000"), 1000u);
  EXPECT_EQ(*ParseBytes("2GB"), 2000000000u);
  EXPECT_FALSE(ParseBytes("12 parsecs").ok());
  EXPECT_FALSE(ParseBytes("").ok());
  EXPECT_FALSE(ParseBytes("-5MiB").ok());
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
}

TEST(Units, Durations) {
  EXPECT_EQ(*ParseDurationMs("250ms"), 250u);
  EXPECT_EQ(*ParseDurationMs("30s"), 30000u);
  EXPECT_EQ(*ParseDurationMs("2h"), 7200000u);
  EXPECT_EQ(*ParseDurationMs("3"), 3000u);
  EXPECT_FALSE(ParseDurationMs("3 fortnights").ok());
}

}  // namespace
}  // namespace kvmem
