// GateTree: exact search == linear scan (ids and scores, ties by id) after bulk builds, lazy
// inserts and removals; budgeted search monotone in the budget; invariants; bad input.
// Seeds are fresh per run and printed on failure.
#include "index/gate_tree.h"
#include "testing/seed.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>

namespace kvmem::index {
namespace {

// Clustered keys: topic centres plus per-key noise, some exact duplicates (ties).
std::vector<float> ClusteredKeys(std::mt19937_64& rng, uint32_t n, uint32_t dim, uint32_t topics) {
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> centres(size_t{topics} * dim);
  for (auto& v : centres) v = g(rng);
  std::vector<float> keys(size_t{n} * dim);
  for (uint32_t i = 0; i < n; ++i) {
    if (i > 0 && rng() % 20 == 0) {  // a duplicate of an earlier key
      const uint32_t j = static_cast<uint32_t>(rng() % i);
      std::copy_n(&keys[size_t{j} * dim], dim, &keys[size_t{i} * dim]);
      continue;
    }
    const float* c = &centres[(rng() % topics) * dim];
    for (uint32_t d = 0; d < dim; ++d) keys[size_t{i} * dim + d] = c[d] + 0.3f * g(rng);
  }
  return keys;
}

std::vector<float> Query(std::mt19937_64& rng, const std::vector<float>& keys, uint32_t dim) {
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> q(dim);
  const size_t n = keys.size() / dim;
  const bool aimed = rng() % 4 != 0;  // most queries near a stored key, some pure noise
  const float* k = &keys[(rng() % n) * dim];
  for (uint32_t d = 0; d < dim; ++d) q[d] = (aimed ? k[d] : 0.f) + 0.5f * g(rng);
  return q;
}

std::vector<uint64_t> Ids(uint32_t n, uint64_t base) {
  std::vector<uint64_t> ids(n);
  for (uint32_t i = 0; i < n; ++i) ids[i] = base + 7 * i;  // sparse, not dense
  return ids;
}

void ExpectExactEqualsScan(const GateTree& tree, std::mt19937_64& rng,
                           const std::vector<float>& keys, uint32_t queries) {
  for (uint32_t i = 0; i < queries; ++i) {
    const std::vector<float> q = Query(rng, keys, tree.dim());
    const uint32_t k = 1 + static_cast<uint32_t>(rng() % 40);
    auto exact = tree.SearchExact(q, k);
    auto scan = tree.Scan(q, k);
    ASSERT_TRUE(exact.ok() && scan.ok());
    ASSERT_EQ(exact->ids, scan->ids) << "query " << i << " k " << k;
    ASSERT_EQ(exact->scores, scan->scores);
    EXPECT_TRUE(exact->exact);
    ASSERT_EQ(exact->ids.size(), std::min<size_t>(k, tree.size()));
    for (size_t j = 1; j < exact->scores.size(); ++j) {
      EXPECT_TRUE(exact->scores[j - 1] > exact->scores[j] ||
                  (exact->scores[j - 1] == exact->scores[j] && exact->ids[j - 1] < exact->ids[j]));
    }
  }
}

TEST(GateTreeTest, ExactSearchEqualsLinearScanAfterBuild) {
  const uint64_t seed = ::kvmem::testing::TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (uint32_t dim : {8u, 20u, 64u}) {
    const uint32_t n = 4000;
    const std::vector<float> keys = ClusteredKeys(rng, n, dim, 24);
    GateTree tree(dim);
    ASSERT_TRUE(tree.Insert(Ids(n, 100), keys).ok());
    ASSERT_EQ(tree.size(), n);
    ASSERT_TRUE(tree.CheckInvariants().ok()) << tree.CheckInvariants().ToString();
    EXPECT_GT(tree.leaves(), 40u);
    EXPECT_GE(tree.depth(), 2u);
    ExpectExactEqualsScan(tree, rng, keys, 300);
  }
}

TEST(GateTreeTest, ExactAfterLazyInsertsAndRemovals) {
  const uint64_t seed = ::kvmem::testing::TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const uint32_t dim = 24, n = 3000;
  const std::vector<float> keys = ClusteredKeys(rng, n, dim, 16);
  const std::vector<uint64_t> ids = Ids(n, 1);
  GateTreeOptions o;
  o.leaf_points = 8;
  o.rebuild_growth = 4.f;  // mostly lazy inserts and leaf splits
  GateTree tree(dim, o);
  std::set<uint64_t> present;
  uint32_t at = 0;
  while (at < n) {
    const uint32_t batch = std::min<uint32_t>(n - at, 1 + static_cast<uint32_t>(rng() % 60));
    ASSERT_TRUE(tree.Insert(std::span(ids).subspan(at, batch),
                            std::span(keys).subspan(size_t{at} * dim, size_t{batch} * dim))
                    .ok());
    for (uint32_t i = at; i < at + batch; ++i) present.insert(ids[i]);
    at += batch;
    // Drop a few random present ids.
    for (int r = 0; r < 5 && !present.empty(); ++r) {
      auto it = present.begin();
      std::advance(it, rng() % present.size());
      ASSERT_TRUE(tree.Remove(*it).ok());
      EXPECT_EQ(tree.key(*it), nullptr);
      present.erase(it);
    }
    ASSERT_TRUE(tree.CheckInvariants().ok()) << tree.CheckInvariants().ToString();
    ASSERT_EQ(tree.size(), present.size());
    ExpectExactEqualsScan(tree, rng, keys, 5);
  }
  ExpectExactEqualsScan(tree, rng, keys, 300);
  // Removed ids never come back; present ones keep their key.
  const uint64_t some = *present.begin();
  const size_t row = (some - 1) / 7;
  EXPECT_TRUE(std::equal(keys.begin() + row * dim, keys.begin() + (row + 1) * dim, tree.key(some)));
}

TEST(GateTreeTest, BudgetedSearchIsMonotoneAndReachesExact) {
  const uint64_t seed = ::kvmem::testing::TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const uint32_t dim = 32, n = 5000;
  const std::vector<float> keys = ClusteredKeys(rng, n, dim, 32);
  GateTree tree(dim);
  ASSERT_TRUE(tree.Insert(Ids(n, 0), keys).ok());
  for (int i = 0; i < 60; ++i) {
    const float w = i % 3 == 0 ? 1.f : i % 3 == 1 ? kDefaultRadiusWeight : 0.f;  // rank weight
    SCOPED_TRACE("radius weight " + std::to_string(w));
    const std::vector<float> q = Query(rng, keys, dim);
    const uint32_t k = 1 + static_cast<uint32_t>(rng() % 20);
    auto exact = tree.SearchExact(q, k);
    ASSERT_TRUE(exact.ok());
    std::vector<float> prev;
    size_t prev_found = 0;
    for (uint32_t budget = 1; budget <= tree.leaves() + 1; budget = budget < 8 ? budget + 1 : budget * 2) {
      auto b = tree.SearchBudget(q, k, budget, w);
      ASSERT_TRUE(b.ok());
      EXPECT_LE(b->cost.leaves_visited, budget);
      // Every rank's score is at least what a smaller budget gave.
      if (prev.size() == b->scores.size()) {
        for (size_t j = 0; j < prev.size(); ++j) EXPECT_GE(b->scores[j], prev[j]) << budget;
      } else {
        EXPECT_GT(b->scores.size(), prev.size());
      }
      size_t found = 0;
      for (uint64_t id : b->ids) found += std::count(exact->ids.begin(), exact->ids.end(), id);
      EXPECT_GE(found, prev_found) << "budget " << budget;
      prev = b->scores;
      prev_found = found;
      if (b->exact) {
        EXPECT_EQ(b->ids, exact->ids);
      }
    }
    auto all = tree.SearchBudget(q, k, tree.leaves(), w);
    ASSERT_TRUE(all.ok());
    EXPECT_TRUE(all->exact);
    EXPECT_EQ(all->ids, exact->ids);
  }
}

TEST(GateTreeTest, TiesAreBrokenByLowerId) {
  const uint32_t dim = 16, n = 500;
  std::vector<float> keys(size_t{n} * dim, 0.25f);
  std::vector<uint64_t> ids(n);
  for (uint32_t i = 0; i < n; ++i) ids[i] = 10'000 - 3 * i;  // descending ids
  GateTree tree(dim);
  ASSERT_TRUE(tree.Insert(ids, keys).ok());
  const std::vector<float> q(dim, 1.f);
  auto r = tree.SearchExact(q, 5);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->ids, (std::vector<uint64_t>{10'000 - 3 * 499, 10'000 - 3 * 498, 10'000 - 3 * 497,
                                           10'000 - 3 * 496, 10'000 - 3 * 495}));
  EXPECT_EQ(r->scores, std::vector<float>(5, 4.f));
  // A zero query scores everything 0: the lowest ids win too.
  auto z = tree.SearchExact(std::vector<float>(dim, 0.f), 2);
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(z->ids, (std::vector<uint64_t>{10'000 - 3 * 499, 10'000 - 3 * 498}));
}

TEST(GateTreeTest, SmallAndEmptyTrees) {
  GateTree tree(4);
  auto e = tree.SearchExact(std::vector<float>(4, 1.f), 3);
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(e->ids.empty());
  const std::vector<float> keys = {1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3, 0};
  ASSERT_TRUE(tree.Insert(std::vector<uint64_t>{5, 6, 7}, keys).ok());
  auto r = tree.SearchExact(std::vector<float>{1, 1, 1, 0}, 10);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->ids, (std::vector<uint64_t>{7, 6, 5}));
  EXPECT_EQ(r->scores, (std::vector<float>{3, 2, 1}));
  EXPECT_TRUE(tree.SearchExact(std::vector<float>{1, 1, 1, 0}, 0)->ids.empty());
  for (uint64_t id : {5, 6, 7}) ASSERT_TRUE(tree.Remove(id).ok());
  EXPECT_EQ(tree.size(), 0u);
  EXPECT_TRUE(tree.SearchExact(std::vector<float>{1, 1, 1, 0}, 2)->ids.empty());
  ASSERT_TRUE(tree.Insert(std::vector<uint64_t>{5}, std::vector<float>{0, 0, 0, 1}).ok());
  EXPECT_EQ(tree.SearchExact(std::vector<float>{0, 0, 0, 1}, 2)->ids, std::vector<uint64_t>{5});
}

TEST(GateTreeTest, BadInput) {
  GateTree tree(4);
  ASSERT_TRUE(tree.Insert(std::vector<uint64_t>{1, 2}, std::vector<float>(8, 1.f)).ok());
  // Wrong sizes, duplicates, non-finite keys: rejected, nothing added.
  EXPECT_EQ(tree.Insert(std::vector<uint64_t>{3}, std::vector<float>(5, 1.f)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.Insert(std::vector<uint64_t>{3, 3}, std::vector<float>(8, 1.f)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.Insert(std::vector<uint64_t>{3, 2}, std::vector<float>(8, 1.f)).code(),
            StatusCode::kInvalidArgument);
  std::vector<float> nan(4, 1.f);
  nan[2] = std::nanf("");
  EXPECT_EQ(tree.Insert(std::vector<uint64_t>{9}, nan).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.size(), 2u);
  EXPECT_FALSE(tree.Contains(3));
  // Queries.
  EXPECT_EQ(tree.SearchExact(std::vector<float>(3, 1.f), 1).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.SearchExact(nan, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.Scan(nan, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.SearchBudget(std::vector<float>(4, 1.f), 1, 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.SearchBudget(std::vector<float>(4, 1.f), 1, 4, -0.5f).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.SearchBudget(std::vector<float>(4, 1.f), 1, 4, std::nanf("")).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(tree.Remove(77).code(), StatusCode::kNotFound);
  GateTreeOptions o;
  o.fanout = 1;
  EXPECT_FALSE(GateTree::Validate(o).ok());
  EXPECT_TRUE(GateTree::Validate({}).ok());
}

}  // namespace
}  // namespace kvmem::index
