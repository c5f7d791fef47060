// Independent references for tests: attention written from its definition in double precision
// over plain [layers][kv_heads][tokens][head_dim] arrays (no pool, no spans, no kernels).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/dtype.h"

namespace kvmem::testing {

// Random tensor of `n` elements stored as `t`, values ~ N(0, scale).
inline std::vector<uint8_t> RandomTensor(std::mt19937_64& rng, DType t, size_t n, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<uint8_t> out(n * DTypeSize(t));
  for (size_t i = 0; i < n; ++i) StoreFromFloat(out.data(), t, i, d(rng));
  return out;
}

// Attention of one layer where KV head h attends exactly the tokens tokens[h] (any order,
// no repeats): the reference for sparse modes, over the token set the daemon reports.
inline std::vector<double> ReferenceAttentionOver(const std::vector<uint8_t>& keys,
                                                  const std::vector<uint8_t>& values, DType t,
                                                  uint32_t kv_heads, uint64_t tokens,
                                                  uint32_t head_dim, uint32_t layer,
                                                  const std::vector<float>& q, uint32_t q_heads,
                                                  const std::vector<std::vector<uint64_t>>& attended) {
  const uint32_t G = q_heads / kv_heads;
  std::vector<double> out(static_cast<size_t>(q_heads) * head_dim, 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  for (uint32_t qh = 0; qh < q_heads; ++qh) {
    const uint32_t h = qh / G;
    const size_t base = ((static_cast<size_t>(layer) * kv_heads + h) * tokens) * head_dim;
    const std::vector<uint64_t>& ts = attended[h];
    std::vector<double> logit(ts.size());
    double mx = -1e300;
    for (size_t i = 0; i < ts.size(); ++i) {
      double dot = 0;
      for (uint32_t d = 0; d < head_dim; ++d)
        dot += static_cast<double>(q[qh * head_dim + d]) * LoadAsFloat(keys.data(), t, base + ts[i] * head_dim + d);
      logit[i] = dot * scale;
      mx = std::max(mx, logit[i]);
    }
    double sum = 0;
    for (double x : logit) sum += std::exp(x - mx);
    for (size_t i = 0; i < ts.size(); ++i) {
      const double p = std::exp(logit[i] - mx) / sum;
      for (uint32_t d = 0; d < head_dim; ++d)
        out[qh * head_dim + d] += p * LoadAsFloat(values.data(), t, base + ts[i] * head_dim + d);
    }
  }
  return out;
}

// softmax(q·K^T / sqrt(D)) V for every query head of one layer.
// kv: [layers][kv_heads][tokens][head_dim] (dtype t); q: [q_heads][head_dim] floats.
inline std::vector<double> ReferenceAttention(const std::vector<uint8_t>& keys,
                                              const std::vector<uint8_t>& values, DType t,
                                              uint32_t layers, uint32_t kv_heads, uint64_t tokens,
                                              uint32_t head_dim, uint32_t layer,
                                              const std::vector<float>& q, uint32_t q_heads) {
  (void)layers;
  std::vector<uint64_t> all(tokens);
  for (uint64_t s = 0; s < tokens; ++s) all[s] = s;
  return ReferenceAttentionOver(keys, values, t, kv_heads, tokens, head_dim, layer, q, q_heads,
                                std::vector<std::vector<uint64_t>>(kv_heads, all));
}

// ||a - b|| / ||b||.
inline double RelativeError(const std::vector<float>& a, const std::vector<double>& b) {
  double e = 0, n = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    e += (a[i] - b[i]) * (a[i] - b[i]);
    n += b[i] * b[i];
  }
  return std::sqrt(e / (n > 0 ? n : 1));
}

// Tolerance for an output stored as `t` (bf16 output rounding dominates).
inline double OutputTolerance(DType t) {
  switch (t) {
    case DType::kF32: return 1e-4;
    case DType::kF16: return 2e-3;
    case DType::kBF16: return 1e-2;
  }
  return 1e-2;
}

// Checks a top-k answer (ids best first, with their reported float scores) against exact
// double-precision scores of every candidate, `exact` as (score, id). Rank i must hold a
// candidate whose exact score equals the i-th best within `tol` (candidates within float
// rounding of each other may come in either order), no candidate twice, and the reported score
// must be the rank's exact score within `tol`. tol(s) gives the tolerance for a score s.
template <typename Id, typename Tol>
void ExpectTopKMatchesExact(const std::vector<Id>& ids, const std::vector<float>& scores,
                            std::vector<std::pair<double, Id>> exact, Tol tol) {
  std::sort(exact.begin(), exact.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::unordered_map<Id, double> score_of;
  for (const auto& [s, id] : exact) score_of.emplace(id, s);
  ASSERT_EQ(ids.size(), scores.size());
  ASSERT_LE(ids.size(), exact.size());
  std::unordered_map<Id, size_t> seen;
  for (size_t i = 0; i < ids.size(); ++i) {
    const double want = exact[i].first;
    const auto it = score_of.find(ids[i]);
    ASSERT_NE(it, score_of.end()) << "rank " << i << ": id " << ids[i] << " is no candidate";
    EXPECT_TRUE(seen.emplace(ids[i], i).second) << "rank " << i << ": id " << ids[i] << " repeats";
    EXPECT_NEAR(it->second, want, tol(want))
        << "rank " << i << ": id " << ids[i] << " where the exact order has id " << exact[i].second;
    EXPECT_NEAR(scores[i], want, tol(want)) << "rank " << i;
  }
}

}  // namespace kvmem::testing
