#include "index/attended_tokens.h"

#include <gtest/gtest.h>

namespace kvmem::index {
namespace {

// Chunks of 10 tokens each: chunk i covers [10 i, 10 i + 10).
ClusterTree TenChunks(uint32_t n) {
  ClusterTree tree(2);
  std::vector<ChunkSummary> s(n, ChunkSummary{{1.f, 0.f}, 0.f, 1.f});
  std::vector<uint32_t> t(n, 10);
  EXPECT_TRUE(tree.Build(s, t).ok());
  return tree;
}

TEST(AttendedTokensTest, SinksSelectionAndTailMerged) {
  ClusterTree tree = TenChunks(10);  // 100 sealed tokens
  std::vector<uint32_t> sel = {5, 1, 6};
  auto r = AttendedTokens(tree, sel, 16, 107);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  // sinks [0,16) + chunk 1 [10,20) clipped to [16,20) merges into [0,20); chunks 5,6 merge.
  std::vector<TokenRange> want = {{0, 20}, {50, 70}, {100, 107}};
  EXPECT_EQ(*r, want);
  EXPECT_EQ(CountTokens(*r), 20u + 20u + 7u);
}

TEST(AttendedTokensTest, ChunkInsideSinksAddsNothing) {
  ClusterTree tree = TenChunks(4);
  std::vector<uint32_t> sel = {0};
  auto r = AttendedTokens(tree, sel, 16, 40);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (std::vector<TokenRange>{{0, 16}}));
}

TEST(AttendedTokensTest, SinksLongerThanContext) {
  ClusterTree tree(2);
  auto r = AttendedTokens(tree, {}, 16, 5);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (std::vector<TokenRange>{{0, 5}}));
}

TEST(AttendedTokensTest, RejectsBadChunkIdsAndShortContext) {
  ClusterTree tree = TenChunks(3);
  std::vector<uint32_t> unknown = {3};
  std::vector<uint32_t> twice = {1, 1};
  EXPECT_EQ(AttendedTokens(tree, unknown, 4, 30).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(AttendedTokens(tree, twice, 4, 30).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(AttendedTokens(tree, {}, 4, 29).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem::index
