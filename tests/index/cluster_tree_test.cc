// ClusterTree: invariants after build / inserts / rebuilds, exact search == brute force,
// budgeted search, degenerate inputs. Seeds are fresh per run and printed on failure.
#include "index/cluster_tree.h"

#include <gtest/gtest.h>

#include <set>
#include <span>

#include "index_test_util.h"
#include "kernels/tree_search.h"

namespace kvmem::index {
namespace {

using testing::BruteForceTopK;
using testing::BuildTree;
using testing::RandomKeys;
using testing::RandomQuery;
using testing::Summaries;
using testing::VectorKeySource;

// Half pure noise, half aimed at a real key (the case where pruning matters).
std::vector<float> MixedQuery(std::mt19937_64& rng, const VectorKeySource& src, uint32_t group) {
  std::vector<float> q = RandomQuery(rng, group, src.dim, 0.5f);
  if (rng() % 2 == 0 && !src.chunks.empty()) {
    const auto& keys = src.chunks[rng() % src.chunks.size()];
    for (uint32_t g = 0; g < group; ++g) {
      for (uint32_t d = 0; d < src.dim; ++d) q[size_t{g} * src.dim + d] += 0.3f * keys[d];
    }
  }
  return q;
}

void ExpectExactMatchesBruteForce(const ClusterTree& tree, const VectorKeySource& src,
                                  std::mt19937_64& rng, uint32_t queries, uint32_t group) {
  for (uint32_t i = 0; i < queries; ++i) {
    const std::vector<float> q = MixedQuery(rng, src, group);
    const uint32_t k = 1 + static_cast<uint32_t>(rng() % 20);
    auto sel = tree.SearchExact(q, k, src);
    ASSERT_TRUE(sel.ok()) << sel.status().ToString();
    ASSERT_EQ(sel->chunks, BruteForceTopK(src, q, k)) << "query " << i << " k " << k;
    for (size_t j = 1; j < sel->scores.size(); ++j) EXPECT_GE(sel->scores[j - 1], sel->scores[j]);
  }
}

TEST(ClusterTreeTest, OptionsValidate) {
  EXPECT_TRUE(ClusterTree::Validate({}).ok());
  ClusterTreeOptions o;
  o.levels = 0;
  EXPECT_FALSE(ClusterTree::Validate(o).ok());
  o = {};
  o.rebuild_growth = 1.f;
  EXPECT_FALSE(ClusterTree::Validate(o).ok());
}

TEST(ClusterTreeTest, InvariantsHoldAfterBuildForManyShapes) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  for (uint32_t levels : {1u, 2u, 3u}) {
    for (uint32_t n : {0u, 1u, 7u, 70u, 600u}) {
      ClusterTreeOptions o;
      o.levels = levels;
      o.fine_cluster_chunks = 8;
      o.min_chunks_to_cluster = 16;
      VectorKeySource src = RandomKeys(rng, n, 24);
      ClusterTree tree = BuildTree(src, o);
      ASSERT_TRUE(tree.CheckInvariants(&src).ok())
          << "levels " << levels << " n " << n << ": " << tree.CheckInvariants(&src).ToString();
      TreeStats st = tree.Stats();
      EXPECT_EQ(st.chunks, n);
      EXPECT_EQ(st.nodes_per_level.back(), n);
      EXPECT_LE(st.depth, levels + 1);
      EXPECT_FALSE(tree.NeedsMaintenance()) << "levels " << levels << " n " << n;
    }
  }
}

TEST(ClusterTreeTest, BuildRejectsBadInputAndKeepsTree) {
  VectorKeySource src;
  std::mt19937_64 rng(1);
  src = RandomKeys(rng, 10, 8);
  ClusterTree tree = BuildTree(src);
  std::vector<ChunkSummary> sums;
  std::vector<uint32_t> tokens;
  Summaries(src, &sums, &tokens);
  tokens.pop_back();
  EXPECT_EQ(tree.Build(sums, tokens).code(), StatusCode::kInvalidArgument);
  tokens.push_back(0);
  EXPECT_EQ(tree.Build(sums, tokens).code(), StatusCode::kInvalidArgument);
  tokens.back() = 3;
  sums[2].centroid.pop_back();
  EXPECT_EQ(tree.Build(sums, tokens).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.num_chunks(), 10u);
  EXPECT_TRUE(tree.CheckInvariants(&src).ok());
}

TEST(ClusterTreeTest, ExactSearchMatchesBruteForceGroupOf1) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource src = RandomKeys(rng, 800, 64);
  ClusterTree tree = BuildTree(src);
  ExpectExactMatchesBruteForce(tree, src, rng, 150, 1);
}

TEST(ClusterTreeTest, ExactSearchMatchesBruteForceGroupOf4) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource src = RandomKeys(rng, 800, 64);
  ClusterTree tree = BuildTree(src);
  ExpectExactMatchesBruteForce(tree, src, rng, 150, 4);
}

TEST(ClusterTreeTest, ExactSearchPrunes) {
  // Structured keys and aimed queries: exact search must read far fewer keys than a scan.
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource src = RandomKeys(rng, 2000, 64, 24, 32);
  ClusterTree tree = BuildTree(src);
  uint64_t total = 0;
  for (uint32_t c = 0; c < src.chunks.size(); ++c) total += src.tokens(c);
  uint64_t read = 0;
  for (int i = 0; i < 20; ++i) {
    const auto& keys = src.chunks[rng() % src.chunks.size()];
    std::vector<float> q(keys.begin(), keys.begin() + src.dim);
    auto sel = tree.SearchExact(q, 8, src);
    ASSERT_TRUE(sel.ok());
    EXPECT_EQ(sel->chunks, BruteForceTopK(src, q, 8));
    read += sel->cost.keys_read;
  }
  EXPECT_LT(read / 20, total / 2);
}

TEST(ClusterTreeTest, KeySourceErrorIsReturned) {
  std::mt19937_64 rng(3);
  VectorKeySource src = RandomKeys(rng, 50, 8);
  ClusterTree tree = BuildTree(src);
  VectorKeySource empty;
  empty.dim = 8;
  auto sel = tree.SearchExact(RandomQuery(rng, 1, 8), 3, empty);
  EXPECT_EQ(sel.status().code(), StatusCode::kNotFound);
}

TEST(ClusterTreeTest, BudgetSearchRespectsBudgetAndReturnsValidChunks) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource src = RandomKeys(rng, 1500, 32);
  ClusterTree tree = BuildTree(src);
  for (int i = 0; i < 100; ++i) {
    const uint32_t group = (i % 2) ? 4 : 1;
    const std::vector<float> q = MixedQuery(rng, src, group);
    const uint32_t budget = 1 + static_cast<uint32_t>(rng() % 3000);
    BudgetSearchOptions o;
    o.aggregation = (i % 3 == 0) ? GroupAggregation::kMeanQuery : GroupAggregation::kMaxBound;
    o.chunk_radius_weight = (i % 4 == 0) ? 0.f : 1.f;
    o.node_radius_weight = (i % 6 == 0) ? 0.5f : 1.f;
    o.skip_tokens_below = (i % 5 == 0) ? 16 : 0;
    o.traversal = (i % 7 == 0) ? BudgetTraversal::kBestFirst : BudgetTraversal::kLevelwise;
    o.overfetch = 1.f + static_cast<float>(i % 3);
    auto sel = tree.SearchBudget(q, budget, o);
    ASSERT_TRUE(sel.ok()) << sel.status().ToString();
    std::set<uint32_t> unique(sel->chunks.begin(), sel->chunks.end());
    ASSERT_EQ(unique.size(), sel->chunks.size());
    uint64_t tokens = 0;
    for (uint32_t c : sel->chunks) {
      ASSERT_LT(c, tree.num_chunks());
      const uint64_t s = tree.chunk_start(c), e = s + tree.chunk_tokens(c);
      ASSERT_GT(e, o.skip_tokens_below) << "chunk entirely in the sinks selected";
      tokens += e - std::max<uint64_t>(s, o.skip_tokens_below);
    }
    EXPECT_EQ(tokens, sel->tokens);
    EXPECT_LE(sel->tokens, budget);
    for (size_t j = 1; j < sel->scores.size(); ++j) EXPECT_GE(sel->scores[j - 1], sel->scores[j]);
    // Fills the budget up to at most one chunk's worth (max_tokens 24) unless chunks ran out.
    if (budget > 24 * 17) {
      EXPECT_GE(sel->tokens + 24 * 17, budget);
    }
    EXPECT_GT(sel->cost.nodes_visited, 0u);
    EXPECT_EQ(sel->cost.bytes_read, sel->cost.nodes_visited * (32 * 4 + 8));
  }
}

TEST(ClusterTreeTest, BudgetSearchEqualsFlatRankingByBound) {
  // The child ball lies in the parent's, so best-first pops chunks in global bound order: a
  // tree and a flat (levels-free) tree select the same chunks.
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource src = RandomKeys(rng, 700, 32);
  ClusterTree tree = BuildTree(src);
  ClusterTreeOptions flat;
  flat.min_chunks_to_cluster = 100000;
  ClusterTree list = BuildTree(src, flat);
  EXPECT_EQ(list.Stats().depth, 1u);
  BudgetSearchOptions best_first;
  best_first.traversal = BudgetTraversal::kBestFirst;
  best_first.chunk_radius_weight = 1.f;  // true bounds: monotone, so global order
  best_first.node_radius_weight = 1.f;
  for (int i = 0; i < 50; ++i) {
    const std::vector<float> q = MixedQuery(rng, src, 4);
    auto a = tree.SearchBudget(q, 512, best_first);
    auto b = list.SearchBudget(q, 512, best_first);
    auto c = list.SearchBudget(q, 512, best_first);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok());
    EXPECT_EQ(a->chunks, b->chunks);
    EXPECT_EQ(c->chunks, b->chunks);
  }
}

TEST(ClusterTreeTest, LazyInsertsAndRebuildsKeepInvariantAndExactness) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 3; ++round) {
    ClusterTreeOptions o;
    o.levels = 1 + static_cast<uint32_t>(rng() % 3);
    o.fine_cluster_chunks = 4 + static_cast<uint32_t>(rng() % 8);
    o.min_chunks_to_cluster = 8 + static_cast<uint32_t>(rng() % 32);
    o.rebuild_growth = 1.5f + static_cast<float>(rng() % 3) * 0.5f;
    o.rebuild_radius_inflation = 1.2f + static_cast<float>(rng() % 3) * 0.3f;
    SCOPED_TRACE("round " + std::to_string(round) + " levels " + std::to_string(o.levels));
    VectorKeySource all = RandomKeys(rng, 500, 16, 24, 12);
    // Start from a bulk build over a prefix (possibly empty), then stream the rest.
    const uint32_t prefix = static_cast<uint32_t>(rng() % 100);
    VectorKeySource src;
    src.dim = all.dim;
    src.chunks.assign(all.chunks.begin(), all.chunks.begin() + prefix);
    ClusterTree tree = BuildTree(src, o);
    for (uint32_t c = prefix; c < all.chunks.size(); ++c) {
      src.chunks.push_back(all.chunks[c]);
      auto s = SummarizeKeys(src.chunks[c].data(), src.tokens(c), src.dim);
      ASSERT_TRUE(s.ok());
      ASSERT_TRUE(tree.Insert(c, *s, src.tokens(c)).ok());
      if (rng() % 7 == 0 && tree.NeedsMaintenance()) {
        tree.Maintain(1 + static_cast<uint32_t>(rng() % 2));
      }
      if (c % 25 == 0 || c + 1 == all.chunks.size()) {
        Status st = tree.CheckInvariants(&src);
        ASSERT_TRUE(st.ok()) << "after chunk " << c << ": " << st.ToString();
        ExpectExactMatchesBruteForce(tree, src, rng, 5, 1 + static_cast<uint32_t>(rng() % 4));
      }
    }
    tree.Maintain();
    EXPECT_FALSE(tree.NeedsMaintenance());
    ASSERT_TRUE(tree.CheckInvariants(&src).ok());
    ExpectExactMatchesBruteForce(tree, src, rng, 20, 4);
    // A restart: rebuild from the summaries the tree hands out; same chunks, same answers.
    std::vector<ChunkSummary> saved;
    std::vector<uint32_t> saved_tokens;
    for (uint32_t c = 0; c < tree.num_chunks(); ++c) {
      saved.push_back(tree.chunk_summary(c));
      saved_tokens.push_back(tree.chunk_tokens(c));
    }
    ClusterTree restored(src.dim, o);
    ASSERT_TRUE(restored.Build(saved, saved_tokens).ok());
    ASSERT_TRUE(restored.CheckInvariants(&src).ok());
    EXPECT_EQ(restored.total_tokens(), tree.total_tokens());
    ExpectExactMatchesBruteForce(restored, src, rng, 10, 4);
    EXPECT_GT(tree.Stats().subtree_rebuilds, 0u);
  }
}

// A decode stream: Maintain() after every insert, as the daemon runs it after each reply. A leaf
// whose parent is full makes the parent split beside itself (2-means over its children) while
// the grandparent has room, and an inner node that doubled splits too, instead of rebuilding
// (k-means over every chunk below); fan-outs stay within their caps, the invariants and exact
// search hold throughout, and the coarse level grows without a rebuild of the root.
TEST(ClusterTreeTest, DecodeStreamRepairsBySplitsWithinTheFanOuts) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  ClusterTreeOptions o;
  o.levels = 2;
  o.max_coarse_units = 24;
  o.max_fanout = 5;
  o.fine_cluster_chunks = 4;
  VectorKeySource all = RandomKeys(rng, 700, 16, 24, 12);
  VectorKeySource src;
  src.dim = all.dim;
  src.chunks.assign(all.chunks.begin(), all.chunks.begin() + 80);
  ClusterTree tree = BuildTree(src, o);
  const uint32_t coarse_at_build = tree.Stats().nodes_per_level[1];
  bool coarse_split = false;  // the coarse level grew while the root was not rebuilt
  kernels::FlatTree flat;
  for (uint32_t c = 80; c < all.chunks.size(); ++c) {
    src.chunks.push_back(all.chunks[c]);
    auto s = SummarizeKeys(src.chunks[c].data(), src.tokens(c), src.dim);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(tree.Insert(c, *s, src.tokens(c)).ok());
    const TreeStats before = tree.Stats();
    tree.Maintain();
    ASSERT_FALSE(tree.NeedsMaintenance()) << "after chunk " << c;
    const TreeStats after = tree.Stats();
    ASSERT_EQ(after.depth, 3u);
    if (after.inserts_since_build > 0 && after.nodes_per_level[1] > before.nodes_per_level[1]) {
      coarse_split = true;
    }
    tree.ExportFlat(&flat);
    for (uint32_t n = 0; n < flat.nodes.size(); ++n) {
      const uint32_t count = flat.nodes[n].child_count & ~kernels::kTreeLeafBit;
      if (flat.nodes[n].child_count & kernels::kTreeLeafBit) continue;  // chunks: no cap
      ASSERT_LE(count, n == 0 ? o.max_coarse_units : o.max_fanout) << "node " << n << " after chunk " << c;
    }
    if (c % 40 == 0 || c + 1 == all.chunks.size()) {
      Status st = tree.CheckInvariants(&src);
      ASSERT_TRUE(st.ok()) << "after chunk " << c << ": " << st.ToString();
      ExpectExactMatchesBruteForce(tree, src, rng, 5, 1 + static_cast<uint32_t>(rng() % 4));
    }
  }
  EXPECT_TRUE(coarse_split) << "coarse units at build " << coarse_at_build << ", now "
                            << tree.Stats().nodes_per_level[1];
}

// A fine cluster below fine_cluster_chunks is not split for growth: chunks that join it without
// loosening it (the same keys again) leave the tree needing no repair.
TEST(ClusterTreeTest, SmallLeavesAreNotSplitForGrowth) {
  ClusterTreeOptions o;
  o.levels = 1;
  o.fine_cluster_chunks = 4;
  o.min_chunks_to_cluster = 4;
  std::mt19937_64 rng(5);
  const VectorKeySource seed_keys = RandomKeys(rng, 1, 16, 1, 1);
  VectorKeySource src;
  src.dim = 16;
  // Two far-apart keys: a build over a, a, a, a, b makes a leaf of four a's and one of b.
  const std::vector<float> a(seed_keys.chunks[0].begin(), seed_keys.chunks[0].begin() + 16);
  std::vector<float> b(16);
  for (uint32_t d = 0; d < 16; ++d) b[d] = a[d] + (d % 2 == 0 ? 40.f : -40.f);
  src.chunks = {a, a, a, a, b};
  ClusterTree tree = BuildTree(src, o);
  ASSERT_EQ(tree.Stats().nodes_per_level.size(), 3u);
  ASSERT_EQ(tree.Stats().nodes_per_level[1], 2u);
  ASSERT_FALSE(tree.NeedsMaintenance());
  auto insert_b = [&] {
    const uint32_t c = static_cast<uint32_t>(src.chunks.size());
    src.chunks.push_back(b);
    auto s = SummarizeKeys(b.data(), 1, 16);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(tree.Insert(c, *s, 1).ok());
  };
  // b's leaf grows to 3 chunks, past rebuild_growth (2) × its built size (1), still below
  // fine_cluster_chunks, and the same key does not loosen it.
  insert_b();
  insert_b();
  EXPECT_FALSE(tree.NeedsMaintenance());
  EXPECT_EQ(tree.Maintain(), 0u);
  // At fine_cluster_chunks the growth rule applies again: split beside itself.
  insert_b();
  EXPECT_TRUE(tree.NeedsMaintenance());
  EXPECT_EQ(tree.Maintain(), 1u);
  EXPECT_EQ(tree.Stats().nodes_per_level[1], 3u);
  ASSERT_TRUE(tree.CheckInvariants(&src).ok());
}

TEST(ClusterTreeTest, InsertRejectsOutOfOrderIdsAndBadSummaries) {
  ClusterTree tree(4);
  ChunkSummary s{{1.f, 2.f, 3.f, 4.f}, 0.5f, 6.f};
  EXPECT_EQ(tree.Insert(1, s, 8).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(tree.Insert(0, s, 8).ok());
  EXPECT_EQ(tree.Insert(1, s, 0).code(), StatusCode::kInvalidArgument);
  ChunkSummary nan = s;
  nan.centroid[1] = NAN;
  EXPECT_EQ(tree.Insert(1, nan, 8).code(), StatusCode::kInvalidArgument);
  ChunkSummary short_c{{1.f}, 0.f, 1.f};
  EXPECT_EQ(tree.Insert(1, short_c, 8).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.num_chunks(), 1u);
  EXPECT_EQ(tree.total_tokens(), 8u);
}

// Summaries from elsewhere (older stored ones, other producers) may hold float centroids: the
// tree stores them as bfloat16 values (what a device mirror holds) with the radius grown by the
// rounding's shift, so every key still lies in its chunk's ball and in every ancestor's (whose
// centroids, built and moved by inserts, are bfloat16 values too).
TEST(ClusterTreeTest, FloatCentroidsAreStoredAsBF16WithCoveringRadii) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource src = RandomKeys(rng, 120, 32);
  std::vector<ChunkSummary> sums;
  std::vector<uint32_t> tokens;
  Summaries(src, &sums, &tokens);
  uint32_t off_grid = 0;
  for (uint32_t c = 0; c < sums.size(); ++c) {  // the unrounded mean, radius measured from it
    ChunkSummary& s = sums[c];
    std::vector<double> m(src.dim, 0.0);
    for (uint32_t t = 0; t < tokens[c]; ++t) {
      for (uint32_t d = 0; d < src.dim; ++d) m[d] += src.chunks[c][size_t{t} * src.dim + d];
    }
    for (uint32_t d = 0; d < src.dim; ++d) {
      s.centroid[d] = static_cast<float>(m[d] / tokens[c]);
      off_grid += BF16ToFloat(FloatToBF16(s.centroid[d])) != s.centroid[d];
    }
    double r = 0.0;
    for (uint32_t t = 0; t < tokens[c]; ++t) {
      r = std::max(r, detail::DistanceD(&src.chunks[c][size_t{t} * src.dim], s.centroid.data(),
                                        src.dim));
    }
    s.radius = detail::RoundUpToFloat(r);
  }
  ASSERT_GT(off_grid, 0u);
  ClusterTreeOptions o;
  o.fine_cluster_chunks = 8;
  o.min_chunks_to_cluster = 16;
  ClusterTree tree(src.dim, o);
  const uint32_t bulk = 80;
  ASSERT_TRUE(tree.Build(std::span(sums).first(bulk), std::span(tokens).first(bulk)).ok());
  for (uint32_t c = bulk; c < sums.size(); ++c) ASSERT_TRUE(tree.Insert(c, sums[c], tokens[c]).ok());
  const Status inv = tree.CheckInvariants(&src);
  EXPECT_TRUE(inv.ok()) << inv.ToString();
  kernels::FlatTree flat;
  tree.ExportFlat(&flat);
  ASSERT_EQ(flat.chunk_centroids.size(), sums.size() * src.dim);
  for (size_t i = 0; i < flat.chunk_centroids.size(); ++i) {
    const float x = flat.chunk_centroids[i];
    ASSERT_EQ(BF16ToFloat(FloatToBF16(x)), x) << "element " << i;
    EXPECT_EQ(x, BF16ToFloat(FloatToBF16(sums[i / src.dim].centroid[i % src.dim])));
  }
  ASSERT_GT(flat.nodes.size(), 1u);
  for (size_t i = 0; i < flat.node_centroids.size(); ++i) {
    const float x = flat.node_centroids[i];
    ASSERT_EQ(BF16ToFloat(FloatToBF16(x)), x) << "node element " << i;
  }
  // A centroid that is finite as a float but not as a bfloat16 is refused.
  ChunkSummary huge = sums[0];
  huge.centroid[3] = 3.4e38f;
  EXPECT_EQ(tree.Insert(static_cast<uint32_t>(sums.size()), huge, 4).code(),
            StatusCode::kInvalidArgument);
}

TEST(ClusterTreeTest, EmptyTreeSearchesReturnNothing) {
  ClusterTree tree(8);
  VectorKeySource src;
  src.dim = 8;
  std::vector<float> q(8, 1.f);
  auto e = tree.SearchExact(q, 5, src);
  auto b = tree.SearchBudget(q, 100);
  ASSERT_TRUE(e.ok() && b.ok());
  EXPECT_TRUE(e->chunks.empty());
  EXPECT_TRUE(b->chunks.empty());
  EXPECT_TRUE(tree.CheckInvariants(&src).ok());
  EXPECT_FALSE(tree.NeedsMaintenance());
  EXPECT_EQ(tree.Stats().nodes_per_level, (std::vector<uint32_t>{1, 0}));
}

TEST(ClusterTreeTest, SearchBeforeAnyBuildUsesTheFlatList) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource all = RandomKeys(rng, 40, 16);
  VectorKeySource src;
  src.dim = 16;
  ClusterTree tree(16);
  for (uint32_t c = 0; c < all.chunks.size(); ++c) {
    src.chunks.push_back(all.chunks[c]);
    auto s = SummarizeKeys(src.chunks[c].data(), src.tokens(c), 16);
    ASSERT_TRUE(tree.Insert(c, *s, src.tokens(c)).ok());
    ExpectExactMatchesBruteForce(tree, src, rng, 2, 2);
  }
  EXPECT_EQ(tree.Stats().depth, 1u);
  EXPECT_FALSE(tree.NeedsMaintenance());  // 40 < min_chunks_to_cluster (64)
}

TEST(ClusterTreeTest, SingleChunk) {
  std::mt19937_64 rng(5);
  VectorKeySource src = RandomKeys(rng, 1, 8);
  ClusterTree tree = BuildTree(src);
  ASSERT_TRUE(tree.CheckInvariants(&src).ok());
  auto e = tree.SearchExact(RandomQuery(rng, 4, 8), 3, src);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->chunks, (std::vector<uint32_t>{0}));
  auto b = tree.SearchBudget(RandomQuery(rng, 4, 8), 1000);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->chunks, (std::vector<uint32_t>{0}));
  auto none = tree.SearchBudget(RandomQuery(rng, 4, 8), src.tokens(0) - 1 + 0);
  ASSERT_TRUE(none.ok());
  if (src.tokens(0) > 1) {
    EXPECT_TRUE(none->chunks.empty());
  }
}

TEST(ClusterTreeTest, AllIdenticalKeysTiesBreakByChunkId) {
  VectorKeySource src;
  src.dim = 8;
  for (int c = 0; c < 300; ++c) src.chunks.push_back(std::vector<float>(8 * (1 + c % 5), 0.25f));
  ClusterTree tree = BuildTree(src);
  ASSERT_TRUE(tree.CheckInvariants(&src).ok());
  EXPECT_GT(tree.Stats().depth, 1u);  // identical centroids still split evenly
  std::mt19937_64 rng(9);
  for (int i = 0; i < 10; ++i) {
    std::vector<float> q = RandomQuery(rng, 4, 8);
    auto e = tree.SearchExact(q, 7, src);
    ASSERT_TRUE(e.ok());
    EXPECT_EQ(e->chunks, (std::vector<uint32_t>{0, 1, 2, 3, 4, 5, 6}));
    EXPECT_EQ(e->chunks, BruteForceTopK(src, q, 7));
  }
}

TEST(ClusterTreeTest, ZeroQueryTiesEverything) {
  std::mt19937_64 rng(11);
  VectorKeySource src = RandomKeys(rng, 200, 16);
  ClusterTree tree = BuildTree(src);
  std::vector<float> q(4 * 16, 0.f);
  auto e = tree.SearchExact(q, 5, src);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->chunks, BruteForceTopK(src, q, 5));
  EXPECT_EQ(e->chunks, (std::vector<uint32_t>{0, 1, 2, 3, 4}));
  auto b = tree.SearchBudget(q, 64);
  ASSERT_TRUE(b.ok());
  EXPECT_LE(b->tokens, 64u);
}

TEST(ClusterTreeTest, RejectsBadQueries) {
  std::mt19937_64 rng(13);
  VectorKeySource src = RandomKeys(rng, 20, 8);
  ClusterTree tree = BuildTree(src);
  std::vector<float> bad(7, 1.f);
  EXPECT_EQ(tree.SearchExact(bad, 3, src).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.SearchBudget(bad, 30).status().code(), StatusCode::kInvalidArgument);
  std::vector<float> nan(8, 1.f);
  nan[3] = NAN;
  EXPECT_EQ(tree.SearchExact(nan, 3, src).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.SearchBudget({}, 30).status().code(), StatusCode::kInvalidArgument);
}

TEST(ClusterTreeTest, StatsDescribeLevels) {
  std::mt19937_64 rng(17);
  VectorKeySource src = RandomKeys(rng, 2000, 16);
  ClusterTree tree = BuildTree(src);
  TreeStats st = tree.Stats();
  EXPECT_EQ(st.depth, 3u);
  ASSERT_EQ(st.nodes_per_level.size(), 4u);
  EXPECT_EQ(st.nodes_per_level[0], 1u);
  EXPECT_LE(st.nodes_per_level[1], 64u);
  EXPECT_GT(st.nodes_per_level[2], st.nodes_per_level[1]);
  EXPECT_EQ(st.nodes_per_level[3], 2000u);
  EXPECT_GT(st.memory_bytes, 2000u * 16 * 4);
}

}  // namespace
}  // namespace kvmem::index
