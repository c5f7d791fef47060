// Retrieval-head selection rules against brute force: every rule keeps exactly the blocks its
// definition names, best first, ties by the lower index, at least one block.
#include "index/block_select.h"
#include "testing/seed.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

namespace kvmem::index {
namespace {

// Brute force: all indices in score order (stable sort = ties by index; NaN last).
std::vector<uint32_t> Order(const std::vector<float>& s) {
  std::vector<uint32_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0u);
  std::stable_sort(idx.begin(), idx.end(), [&](uint32_t a, uint32_t b) {
    if (std::isnan(s[a]) != std::isnan(s[b])) return std::isnan(s[b]);
    return !std::isnan(s[a]) && s[a] > s[b];
  });
  return idx;
}

std::vector<double> Probabilities(const std::vector<float>& s, float scale) {
  double mx = -1e300;
  for (float x : s)
    if (std::isfinite(x)) mx = std::max<double>(mx, x);
  std::vector<double> p(s.size(), 0.0);
  double z = 0;
  for (size_t i = 0; i < s.size(); ++i)
    if (std::isfinite(s[i])) z += p[i] = std::exp(scale * (s[i] - mx));
  for (double& x : p) x /= z;
  return p;
}

std::vector<float> RandomScores(std::mt19937_64& rng, size_t n, bool ties) {
  std::normal_distribution<float> nd(0.f, 8.f);
  std::vector<float> s(n);
  for (float& x : s) x = ties ? std::round(nd(rng) / 4.f) : nd(rng);
  return s;
}

TEST(BlockSelect, TopKAndRatioAreTheBestPrefix) {
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  for (int trial = 0; trial < 200; ++trial) {
    const size_t n = 1 + rng() % 300;
    const auto s = RandomScores(rng, n, trial % 2 == 0);
    const auto order = Order(s);
    BlockRuleOptions o;
    o.k = static_cast<uint32_t>(rng() % (n + 5));
    const size_t k = std::clamp<size_t>(o.k, 1, n);
    EXPECT_EQ(SelectBlocks(s, o), std::vector<uint32_t>(order.begin(), order.begin() + k));
    o.rule = BlockRule::kRatio;
    o.value = std::uniform_real_distribution<float>(0.001f, 1.f)(rng);
    const size_t r = std::clamp<size_t>(static_cast<size_t>(std::ceil(double(o.value) * n)), 1, n);
    EXPECT_EQ(SelectBlocks(s, o), std::vector<uint32_t>(order.begin(), order.begin() + r));
  }
}

TEST(BlockSelect, ThresholdAndTopPFollowTheSoftmax) {
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  for (int trial = 0; trial < 200; ++trial) {
    const size_t n = 1 + rng() % 300;
    const auto s = RandomScores(rng, n, trial % 2 == 0);
    const auto order = Order(s);
    BlockRuleOptions o;
    o.scale = std::uniform_real_distribution<float>(0.01f, 1.f)(rng);
    const auto p = Probabilities(s, o.scale);

    o.rule = BlockRule::kThreshold;
    o.value = std::uniform_real_distribution<float>(0.0005f, 0.3f)(rng);
    std::vector<uint32_t> want;
    for (uint32_t i : order)
      if (p[i] >= o.value) want.push_back(i);
    if (want.empty()) want.push_back(order[0]);
    EXPECT_EQ(SelectBlocks(s, o), want) << "threshold " << o.value;

    o.rule = BlockRule::kTopP;
    o.value = std::uniform_real_distribution<float>(0.05f, 1.f)(rng);
    want.clear();
    double acc = 0;
    for (uint32_t i : order) {
      want.push_back(i);
      acc += p[i];
      if (acc >= o.value) break;
    }
    const auto got = SelectBlocks(s, o);
    EXPECT_EQ(got, want) << "top_p " << o.value;
    // The kept mass reaches p, and without the last block it would not.
    double kept = 0;
    for (uint32_t i : got) kept += p[i];
    EXPECT_TRUE(kept >= o.value - 1e-9 || got.size() == n);
    EXPECT_LT(kept - p[got.back()], o.value);
  }
}

TEST(BlockSelect, EdgeCases) {
  BlockRuleOptions o;
  EXPECT_TRUE(SelectBlocks({}, o).empty());
  const std::vector<float> s = {1.f, NAN, 3.f, 3.f, -INFINITY};
  o.k = 0;  // still one block
  EXPECT_EQ(SelectBlocks(s, o), (std::vector<uint32_t>{2}));
  o.k = 5;
  EXPECT_EQ(SelectBlocks(s, o), (std::vector<uint32_t>{2, 3, 0, 4, 1}));
  o.rule = BlockRule::kTopP;
  o.value = 1.f;  // every finite-probability block until the mass is 1 (rounding may stop early)
  const auto all = SelectBlocks(s, o);
  EXPECT_GE(all.size(), 2u);
  EXPECT_EQ(all[0], 2u);
  EXPECT_EQ(all[1], 3u);
  o.rule = BlockRule::kThreshold;
  o.value = 0.999f;  // nothing reaches it: the best block alone
  EXPECT_EQ(SelectBlocks(s, o), (std::vector<uint32_t>{2}));
}

TEST(BlockSelect, ValidationNamesTheRule) {
  BlockRuleOptions o;
  o.rule = BlockRule::kRatio;
  o.value = 1.5f;
  Status st = ValidateBlockRule(o);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("ratio"), std::string::npos);
  o.rule = BlockRule::kThreshold;
  o.value = 1.f;
  EXPECT_NE(ValidateBlockRule(o).message().find("threshold"), std::string::npos);
  o.rule = BlockRule::kTopP;
  o.value = 0.f;
  EXPECT_NE(ValidateBlockRule(o).message().find("top_p"), std::string::npos);
  o.value = NAN;
  EXPECT_FALSE(ValidateBlockRule(o).ok());
  o.value = 0.5f;
  EXPECT_TRUE(ValidateBlockRule(o).ok());
  o.scale = 0.f;
  EXPECT_FALSE(ValidateBlockRule(o).ok());
}

}  // namespace
}  // namespace kvmem::index
