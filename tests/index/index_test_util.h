// Shared helpers for the index tests: random clustered keys, an in-memory key source, brute
// force, and a per-test seed that is fresh each run and printed on failure.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "index/cluster_tree.h"
#include "index/detail/vec_math.h"
#include "index/summary.h"
#include "testing/seed.h"

namespace kvmem::index::testing {

using ::kvmem::testing::TestSeed;

class VectorKeySource : public ChunkKeySource {
 public:
  uint32_t dim = 0;
  std::vector<std::vector<float>> chunks;  // [chunk][tokens * dim]

  Status ReadKeys(uint32_t chunk, float* out) const override {
    if (chunk >= chunks.size()) return NotFound("no chunk " + std::to_string(chunk));
    std::copy(chunks[chunk].begin(), chunks[chunk].end(), out);
    return Status::OK();
  }
  uint32_t tokens(uint32_t c) const { return static_cast<uint32_t>(chunks[c].size() / dim); }
};

// Keys drawn around a few topic directions, with per-chunk topic and varying scale, so the tree
// has structure to find. Chunk lengths in [1, max_tokens].
inline VectorKeySource RandomKeys(std::mt19937_64& rng, uint32_t chunks, uint32_t dim,
                                  uint32_t max_tokens = 24, uint32_t topics = 8) {
  std::normal_distribution<float> n01(0.f, 1.f);
  std::vector<std::vector<float>> topic(topics, std::vector<float>(dim));
  for (auto& t : topic) {
    for (auto& x : t) x = 3.f * n01(rng);
  }
  VectorKeySource src;
  src.dim = dim;
  std::uniform_int_distribution<uint32_t> len(1, max_tokens);
  std::uniform_int_distribution<uint32_t> pick(0, topics - 1);
  uint32_t current = pick(rng);
  for (uint32_t c = 0; c < chunks; ++c) {
    if (rng() % 4 == 0) current = pick(rng);
    const uint32_t t = len(rng);
    std::vector<float> keys(size_t{t} * dim);
    const float spread = 0.2f + 1.5f * std::uniform_real_distribution<float>(0, 1)(rng);
    for (uint32_t i = 0; i < t; ++i) {
      for (uint32_t d = 0; d < dim; ++d) keys[size_t{i} * dim + d] = topic[current][d] + spread * n01(rng);
    }
    src.chunks.push_back(std::move(keys));
  }
  return src;
}

inline void Summaries(const VectorKeySource& src, std::vector<ChunkSummary>* sums,
                      std::vector<uint32_t>* tokens) {
  sums->clear();
  tokens->clear();
  for (uint32_t c = 0; c < src.chunks.size(); ++c) {
    auto s = SummarizeKeys(src.chunks[c].data(), src.tokens(c), src.dim);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    sums->push_back(*s);
    tokens->push_back(src.tokens(c));
  }
}

// A tree built in bulk over the source's chunks.
inline ClusterTree BuildTree(const VectorKeySource& src, ClusterTreeOptions o = {}) {
  std::vector<ChunkSummary> sums;
  std::vector<uint32_t> tokens;
  Summaries(src, &sums, &tokens);
  ClusterTree tree(src.dim, o);
  EXPECT_TRUE(tree.Build(sums, tokens).ok());
  return tree;
}

// Brute-force "max over the chunk's keys of q·k, max over the group", ties by lower id.
inline std::vector<uint32_t> BruteForceTopK(const VectorKeySource& src,
                                            const std::vector<float>& q, uint32_t k) {
  const uint32_t D = src.dim;
  const uint32_t G = static_cast<uint32_t>(q.size() / D);
  std::vector<std::pair<float, uint32_t>> scored;
  for (uint32_t c = 0; c < src.chunks.size(); ++c) {
    float best = -INFINITY;
    for (uint32_t t = 0; t < src.tokens(c); ++t) {
      for (uint32_t g = 0; g < G; ++g) {
        best = std::max(best, detail::Dot(&q[size_t{g} * D], &src.chunks[c][size_t{t} * D], D));
      }
    }
    scored.push_back({best, c});
  }
  std::sort(scored.begin(), scored.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  std::vector<uint32_t> out;
  for (uint32_t i = 0; i < std::min<size_t>(k, scored.size()); ++i) out.push_back(scored[i].second);
  return out;
}

inline std::vector<float> RandomQuery(std::mt19937_64& rng, uint32_t group, uint32_t dim,
                                      float scale = 1.f) {
  std::normal_distribution<float> n01(0.f, scale);
  std::vector<float> q(size_t{group} * dim);
  for (auto& x : q) x = n01(rng);
  return q;
}

}  // namespace kvmem::index::testing
