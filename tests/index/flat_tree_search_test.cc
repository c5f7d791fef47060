// The flat-tree budgeted search (kernels/tree_search.h, what the GPU runs) against
// ClusterTree::SearchBudget with the default best-first options: the same chunks, in the same
// order, on bulk-built, lazily grown, maintained and flat trees. Seeds fresh per run.
#include <gtest/gtest.h>

#include <cstring>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/dtype.h"
#include "index/cluster_tree.h"
#include "index/detail/vec_math.h"
#include "index_test_util.h"
#include "kernels/detail/tree_search_layout.h"
#include "kernels/tree_search.h"

namespace kvmem::index {
namespace {

using testing::BuildTree;
using testing::RandomKeys;
using testing::RandomQuery;
using testing::Summaries;
using testing::VectorKeySource;

// Searches `tree` both ways with `queries` random query groups and expects equal selections.
void ExpectSameSelections(const ClusterTree& tree, std::mt19937_64& rng, uint32_t queries,
                          const VectorKeySource& src) {
  kernels::FlatTree flat;
  tree.ExportFlat(&flat);
  ASSERT_EQ(flat.chunk_radius.size(), tree.num_chunks());
  ASSERT_EQ(flat.leaf_chunks.size(), tree.num_chunks());
  const kernels::FlatTreeView view = flat.View();
  uint32_t nonempty = 0;
  for (uint32_t i = 0; i < queries; ++i) {
    const uint32_t group = 1u << (rng() % 4);
    std::vector<float> q = RandomQuery(rng, group, src.dim, 0.5f);
    if (rng() % 2 == 0) {  // aimed at a real key half of the time
      const auto& keys = src.chunks[rng() % src.chunks.size()];
      for (size_t j = 0; j < q.size(); ++j) q[j] += 0.4f * keys[j % src.dim];
    }
    BudgetSearchOptions o;  // the daemon's defaults: best-first, mean query, soft scores
    o.skip_tokens_below = (i % 3 == 0) ? 16 : 0;
    o.max_consecutive_misfits = 1 + static_cast<uint32_t>(rng() % 20);
    const uint32_t budget = 1 + static_cast<uint32_t>(rng() % 1500);
    auto cpu = tree.SearchBudget(q, budget, o);
    ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
    kernels::TreeSearchParams p;
    p.budget_tokens = budget;
    p.skip_tokens_below = o.skip_tokens_below;
    p.max_consecutive_misfits = o.max_consecutive_misfits;
    p.node_radius_weight = o.node_radius_weight;
    p.chunk_radius_weight = o.chunk_radius_weight;
    kernels::TreeSelection got;
    ASSERT_TRUE(kernels::TreeSearchCpu(view, q.data(), group, src.dim, p, &got).ok());
    EXPECT_EQ(got.tokens, cpu->tokens) << "query " << i;
    // SearchBudget reports by score; the flat search in acceptance order: compare as sets
    // with scores.
    std::vector<std::pair<uint32_t, float>> a, b;
    for (size_t j = 0; j < cpu->chunks.size(); ++j) a.push_back({cpu->chunks[j], cpu->scores[j]});
    for (size_t j = 0; j < got.chunks.size(); ++j) b.push_back({got.chunks[j], got.scores[j]});
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    ASSERT_EQ(a, b) << "query " << i << " budget " << budget << " group " << group;
    nonempty += got.chunks.empty() ? 0 : 1;
  }
  EXPECT_GT(nonempty, 0u) << "every selection was empty: the comparison proved nothing";
}

TEST(FlatTreeSearchTest, BulkBuiltTreesOfEveryDepthSelectLikeSearchBudget) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  for (uint32_t levels = 1; levels <= 3; ++levels) {
    SCOPED_TRACE("levels " + std::to_string(levels));
    VectorKeySource src = RandomKeys(rng, 900, 32);
    ClusterTreeOptions o;
    o.levels = levels;
    o.fine_cluster_chunks = 4 + static_cast<uint32_t>(rng() % 16);
    ClusterTree tree = BuildTree(src, o);
    EXPECT_EQ(tree.Stats().depth, levels + 1);
    ExpectSameSelections(tree, rng, 60, src);
  }
}

TEST(FlatTreeSearchTest, FlatListAndLazilyGrownTreesSelectLikeSearchBudget) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource all = RandomKeys(rng, 600, 16, 24, 12);
  ClusterTreeOptions o;
  o.min_chunks_to_cluster = 40;
  VectorKeySource src;
  src.dim = all.dim;
  ClusterTree tree(src.dim, o);
  kernels::FlatTree flat;
  for (uint32_t c = 0; c < all.chunks.size(); ++c) {
    src.chunks.push_back(all.chunks[c]);
    auto s = SummarizeKeys(src.chunks[c].data(), src.tokens(c), src.dim);
    ASSERT_TRUE(s.ok());
    const uint64_t before = tree.version();
    ASSERT_TRUE(tree.Insert(c, *s, src.tokens(c)).ok());
    EXPECT_NE(tree.version(), before);
    if (rng() % 9 == 0 && tree.NeedsMaintenance()) tree.Maintain(1);
    tree.ExportFlat(&flat, c);  // incremental: only the new chunk
    ASSERT_EQ(flat.chunk_radius.size(), 1u);
    ASSERT_EQ(flat.chunk_radius[0], s->radius);
    ASSERT_EQ(flat.num_chunks, c + 1);
    if (c == 30 || c % 97 == 0 || c + 1 == all.chunks.size()) {
      SCOPED_TRACE("after chunk " + std::to_string(c));
      ExpectSameSelections(tree, rng, 15, src);
    }
  }
}

// Node row stamps (what a device mirror compares to upload only changed rows): an insert moves
// the stamps of exactly the rows it rewrote (its leaf's path, whose centroids it moved) and no
// other; a maintenance that restructures gives every rewritten row a stamp never seen before;
// a copy of the tree starts a lineage of its own, a move keeps it.
TEST(FlatTreeSearchTest, RowStampsMoveWithTheRowsTheyStampOnly) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource src = RandomKeys(rng, 700, 16);
  ClusterTreeOptions o;
  o.levels = 2;
  ClusterTree tree = BuildTree(src, o);
  kernels::FlatTree a, b;
  tree.ExportFlat(&a);
  ASSERT_EQ(a.node_row_stamps.size(), a.nodes.size());
  std::vector<uint64_t> sorted = a.node_row_stamps;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "stamps repeat";
  VectorKeySource more = RandomKeys(rng, 40, 16);
  uint32_t moved_rows = 0;
  for (uint32_t i = 0; i < more.chunks.size(); ++i) {
    auto s = SummarizeKeys(more.chunks[i].data(), more.tokens(i), more.dim);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(tree.Insert(tree.num_chunks(), *s, more.tokens(i)).ok());
    tree.ExportFlat(&b, tree.num_chunks() - 1);
    ASSERT_EQ(b.lineage, a.lineage);
    ASSERT_EQ(b.nodes.size(), a.nodes.size());  // inserts do not restructure
    for (size_t n = 0; n < b.nodes.size(); ++n) {
      const bool row_same = std::equal(a.node_centroids.begin() + n * src.dim, a.node_centroids.begin() + (n + 1) * src.dim,
                                       b.node_centroids.begin() + n * src.dim);
      if (b.node_row_stamps[n] == a.node_row_stamps[n]) {
        ASSERT_TRUE(row_same) << "row " << n << " changed under the same stamp";
      } else {
        ++moved_rows;
      }
    }
    a = b;
  }
  EXPECT_GT(moved_rows, 0u);
  EXPECT_LE(moved_rows, 40u * 3);  // at most the path of each insert (3 nodes at two levels)
  if (tree.NeedsMaintenance()) {
    tree.Maintain();
    tree.ExportFlat(&b, tree.num_chunks());
    for (size_t n = 0; n < b.nodes.size(); ++n) {
      if (n < a.nodes.size() && b.node_row_stamps[n] == a.node_row_stamps[n]) {
        EXPECT_TRUE(std::equal(a.node_centroids.begin() + n * src.dim, a.node_centroids.begin() + (n + 1) * src.dim,
                               b.node_centroids.begin() + n * src.dim)) << n;
      }
    }
  }
  ClusterTree copy = tree;
  kernels::FlatTree c;
  copy.ExportFlat(&c);
  EXPECT_NE(c.lineage, a.lineage);
  ClusterTree moved = std::move(copy);
  kernels::FlatTree d;
  moved.ExportFlat(&d);
  EXPECT_EQ(d.lineage, c.lineage);
}

// A partial export against the rows a holder has (a mirror's stamps) carries exactly the rows
// whose stamps moved, and applied to the holder's rows gives the full export's rows: through
// inserts (a path's rows), repairs that add nodes (positions shift) and a copied tree (another
// lineage: a full export).
TEST(FlatTreeSearchTest, PartialExportCarriesTheRowsTheHolderLacks) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  const uint32_t D = 16;
  VectorKeySource src = RandomKeys(rng, 300, D);
  ClusterTreeOptions o;
  o.levels = 2;
  o.fine_cluster_chunks = 4;
  o.max_fanout = 6;
  ClusterTree tree = BuildTree(src, o);
  kernels::FlatTree full;
  tree.ExportFlat(&full);
  EXPECT_FALSE(full.node_rows_partial);
  // The holder: rows and stamps by flat position, as a device mirror keeps them.
  std::vector<float> rows = full.node_centroids;
  std::vector<uint64_t> stamps = full.node_row_stamps;
  uint64_t lineage = full.lineage;
  VectorKeySource more = RandomKeys(rng, 200, D);
  uint64_t carried = 0, total = 0;
  for (uint32_t i = 0; i < more.chunks.size(); ++i) {
    auto s = SummarizeKeys(more.chunks[i].data(), more.tokens(i), D);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(tree.Insert(tree.num_chunks(), *s, more.tokens(i)).ok());
    if (i % 3 == 0 && tree.NeedsMaintenance()) tree.Maintain();
    const kernels::NodeRowsHeld held{lineage, stamps};
    kernels::FlatTree part;
    tree.ExportFlat(&part, tree.num_chunks() - 1, &held);
    tree.ExportFlat(&full);
    ASSERT_TRUE(part.node_rows_partial);
    ASSERT_EQ(part.node_row_stamps, full.node_row_stamps);
    ASSERT_EQ(part.node_centroids.size(), part.node_rows_at.size() * D);
    std::vector<float> applied = rows;
    applied.resize(full.node_centroids.size());
    for (size_t k = 0; k < part.node_rows_at.size(); ++k) {
      const uint32_t at = part.node_rows_at[k];
      ASSERT_TRUE(k == 0 || part.node_rows_at[k - 1] < at);
      ASSERT_FALSE(at < stamps.size() && stamps[at] == full.node_row_stamps[at]) << "row " << at << " was held";
      std::copy_n(part.node_centroids.begin() + k * D, D, applied.begin() + size_t{at} * D);
    }
    ASSERT_EQ(applied, full.node_centroids) << "after insert " << i;
    carried += part.node_rows_at.size();
    total += full.nodes.size();
    rows = applied;
    stamps = full.node_row_stamps;
  }
  EXPECT_LT(carried * 4, total) << "partial exports should carry a small share of the rows";
  // Another lineage (a copy): every row.
  ClusterTree copy = tree;
  const kernels::NodeRowsHeld held{lineage, stamps};
  kernels::FlatTree c;
  copy.ExportFlat(&c, 0, &held);
  EXPECT_FALSE(c.node_rows_partial);
  EXPECT_TRUE(c.node_rows_at.empty());
  EXPECT_EQ(c.node_centroids, full.node_centroids);
}

// An export into an object that holds an export of the same shape applies the inserts since;
// it equals a fresh export whatever happened in between (inserts one or many at a time, repairs,
// a Build, another tree exported into the same object), with and without held rows.
TEST(FlatTreeSearchTest, ExportIntoAKeptObjectEqualsAFreshExport) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  const uint32_t D = 16;
  for (uint32_t levels : {1u, 2u, 3u}) {
    SCOPED_TRACE("levels " + std::to_string(levels));
    VectorKeySource src = RandomKeys(rng, 120, D);
    ClusterTreeOptions o;
    o.levels = levels;
    o.fine_cluster_chunks = 4;
    o.max_fanout = 6;
    o.min_chunks_to_cluster = 16;
    ClusterTree tree = BuildTree(src, o);
    ClusterTree other = BuildTree(src, o);
    kernels::FlatTree kept, kept_held, fresh;
    std::vector<uint64_t> mirror_stamps;  // what a holder of kept_held's rows would have
    std::vector<kernels::FlatTreeNode> mirror_nodes;
    std::vector<uint32_t> mirror_leaf;
    uint64_t mirror_version = ~0ull;
    uint32_t deltas = 0;
    VectorKeySource more = RandomKeys(rng, 300, D);
    uint32_t i = 0;
    for (int step = 0; i < more.chunks.size(); ++step) {
      const uint32_t burst = 1 + static_cast<uint32_t>(rng() % 3);
      for (uint32_t b = 0; b < burst && i < more.chunks.size(); ++b, ++i) {
        auto s = SummarizeKeys(more.chunks[i].data(), more.tokens(i), D);
        ASSERT_TRUE(s.ok());
        ASSERT_TRUE(tree.Insert(tree.num_chunks(), *s, more.tokens(i)).ok());
      }
      if (rng() % 5 == 0 && tree.NeedsMaintenance()) tree.Maintain(1);
      if (step == 40) {  // a Build of the same chunks: a new shape and chunk epoch
        std::vector<ChunkSummary> sums;
        std::vector<uint32_t> toks;
        for (uint32_t c = 0; c < tree.num_chunks(); ++c) {
          sums.push_back(tree.chunk_summary(c));
          toks.push_back(tree.chunk_tokens(c));
        }
        ASSERT_TRUE(tree.Build(sums, toks).ok());
      }
      if (step == 60) other.ExportFlat(&kept);  // another tree's export in the object
      tree.ExportFlat(&fresh);
      tree.ExportFlat(&kept);
      ASSERT_EQ(kept.nodes.size(), fresh.nodes.size()) << "step " << step;
      ASSERT_EQ(0, std::memcmp(kept.nodes.data(), fresh.nodes.data(),
                               fresh.nodes.size() * sizeof(kernels::FlatTreeNode)))
          << "step " << step;
      ASSERT_EQ(kept.leaf_chunks, fresh.leaf_chunks) << "step " << step;
      ASSERT_EQ(kept.level_begin, fresh.level_begin);
      ASSERT_EQ(kept.num_levels, fresh.num_levels);
      ASSERT_EQ(kept.node_row_stamps, fresh.node_row_stamps);
      ASSERT_EQ(kept.node_centroids, fresh.node_centroids);
      ASSERT_EQ(kept.num_chunks, fresh.num_chunks);
      ASSERT_EQ(kept.chunk_radius, fresh.chunk_radius);
      // Against held rows: the rows the holder lacks, applied, give the fresh export's rows.
      const kernels::NodeRowsHeld held{kept_held.lineage, mirror_stamps};
      tree.ExportFlat(&kept_held, 0, &held);
      ASSERT_EQ(kept_held.leaf_chunks, fresh.leaf_chunks) << "step " << step;
      ASSERT_EQ(kept_held.node_row_stamps, fresh.node_row_stamps);
      for (size_t k = 0; k < kept_held.node_rows_at.size(); ++k) {
        const uint32_t at = kept_held.node_rows_at[k];
        ASSERT_TRUE(std::equal(kept_held.node_centroids.begin() + k * D,
                               kept_held.node_centroids.begin() + (k + 1) * D,
                               fresh.node_centroids.begin() + size_t{at} * D));
      }
      if (!kept_held.node_rows_partial) {
        ASSERT_EQ(kept_held.node_centroids, fresh.node_centroids);
      }
      mirror_stamps = fresh.node_row_stamps;
      // A mirror of version delta_from, given only what changed since, holds the fresh export.
      if (kept_held.delta_from != ~0ull && kept_held.delta_from == mirror_version) {
        ++deltas;
        ASSERT_EQ(mirror_nodes.size(), fresh.nodes.size());
        for (const auto& [a, b] : kept_held.nodes_changed) {
          std::copy(kept_held.nodes.begin() + a, kept_held.nodes.begin() + b, mirror_nodes.begin() + a);
        }
        ASSERT_LE(kept_held.leaf_chunks_changed_from, mirror_leaf.size());
        mirror_leaf.resize(kept_held.leaf_chunks_changed_from);
        mirror_leaf.insert(mirror_leaf.end(), kept_held.leaf_chunks.begin() + kept_held.leaf_chunks_changed_from,
                           kept_held.leaf_chunks.end());
      } else {
        mirror_nodes = kept_held.nodes;
        mirror_leaf = kept_held.leaf_chunks;
      }
      mirror_version = kept_held.version;
      ASSERT_EQ(0, std::memcmp(mirror_nodes.data(), fresh.nodes.data(),
                               fresh.nodes.size() * sizeof(kernels::FlatTreeNode)))
          << "step " << step;
      ASSERT_EQ(mirror_leaf, fresh.leaf_chunks) << "step " << step;
    }
    EXPECT_GT(deltas, 20u);
  }
}

TEST(FlatTreeSearchTest, ExportLaysOutLevelsBreadthFirst) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  VectorKeySource src = RandomKeys(rng, 700, 16);
  ClusterTree tree = BuildTree(src, {});
  kernels::FlatTree flat;
  tree.ExportFlat(&flat);
  const TreeStats st = tree.Stats();
  ASSERT_EQ(flat.num_levels, st.depth);
  for (uint32_t l = 0; l < flat.num_levels; ++l) {
    EXPECT_EQ(flat.level_begin[l + 1] - flat.level_begin[l], st.nodes_per_level[l]) << l;
  }
  std::vector<int> seen(tree.num_chunks(), 0);
  for (uint32_t n = 0; n < flat.nodes.size(); ++n) {
    const auto& f = flat.nodes[n];
    if (n > 0) {
      EXPECT_LT(f.parent, n);
    }
    if (f.child_count & kernels::kTreeLeafBit) {
      for (uint32_t i = 0; i < (f.child_count & ~kernels::kTreeLeafBit); ++i) {
        ++seen[flat.leaf_chunks[f.child_begin + i]];
      }
    } else {
      for (uint32_t i = 0; i < f.child_count; ++i) EXPECT_EQ(flat.nodes[f.child_begin + i].parent, n);
    }
  }
  for (int s : seen) EXPECT_EQ(s, 1);
  uint64_t tokens = 0;
  for (uint32_t c = 0; c < tree.num_chunks(); ++c) tokens += tree.chunk_tokens(c);
  EXPECT_EQ(flat.nodes[0].tokens, tokens);
  // A Build replaces the chunk summaries: the epoch tells a mirror to start over.
  const uint64_t epoch = flat.chunks_epoch;
  std::vector<ChunkSummary> sums;
  std::vector<uint32_t> counts;
  Summaries(src, &sums, &counts);
  ASSERT_TRUE(tree.Build(sums, counts).ok());
  tree.ExportFlat(&flat, 50);
  EXPECT_NE(flat.chunks_epoch, epoch);
  EXPECT_EQ(flat.chunk_radius.size(), tree.num_chunks() - 50u);
}

// The device's centroid rows (kernels::detail::InterleaveRowBF16, what DeviceTree::Sync uploads),
// read the way the search kernel's ScoreRows reads them (8 lanes, lane j summing its elements
// 8m + j in order of m, then the shuffle combine), give detail::Dot's score bit for bit; a row
// holding a value that is not a bfloat16 value is refused.
TEST(FlatTreeSearchTest, DeviceRowLayoutScoresLikeDot) {
  KVMEM_SEEDED_TEST_SCOPE(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01;
  for (uint32_t D : {64u, 128u, 256u}) {
    SCOPED_TRACE("D " + std::to_string(D));
    std::vector<float> mean(D), row(D);
    std::vector<uint16_t> dev(D);
    for (int trial = 0; trial < 200; ++trial) {
      for (auto& x : mean) x = n01(rng);
      for (auto& x : row) x = BF16ToFloat(FloatToBF16(3.f * n01(rng) + 0.5f));
      ASSERT_TRUE(kernels::detail::InterleaveRowBF16(row.data(), D, dev.data()));
      float s[8];
      for (uint32_t j = 0; j < 8; ++j) {  // lane j: the q-th 8-element load holds m = 8q .. 8q + 7
        float acc = 0.f;
        for (uint32_t m = 0; m < D / 8; ++m) {
          const float x = BF16ToFloat(dev[64 * (m / 8) + 8 * j + m % 8]);
          ASSERT_EQ(x, row[8 * m + j]);
          acc += mean[8 * m + j] * x;
        }
        s[j] = acc;
      }
      const float dot = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
      ASSERT_EQ(dot, detail::Dot(mean.data(), row.data(), D)) << "trial " << trial;
    }
    // Infinities and negative zero are bfloat16 values (the bits go through); a NaN is not.
    row[1] = -0.f;
    row[2] = -INFINITY;
    ASSERT_TRUE(kernels::detail::InterleaveRowBF16(row.data(), D, dev.data()));
    EXPECT_EQ(dev[8], 0x8000u);  // element 1 = 8(8q + k) + j with q = k = 0, j = 1: at 64q + 8j + k
    row[2] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_FALSE(kernels::detail::InterleaveRowBF16(row.data(), D, dev.data()));
    row[2] = 1.f;
    row[D / 2 + 3] = std::nextafter(row[D / 2 + 3], INFINITY);  // between two bfloat16 values
    EXPECT_FALSE(kernels::detail::InterleaveRowBF16(row.data(), D, dev.data()));
  }
}

}  // namespace
}  // namespace kvmem::index
