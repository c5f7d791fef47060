#include "kernels/index_ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace kvmem::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

void LoadKey(const void* pool, DType t, const KVSpan& s, uint32_t head, uint32_t tok, uint32_t D,
             float* dst) {
  const uint64_t e = s.offset + (static_cast<uint64_t>(head) * s.stride_tokens + tok) * D;
  ConvertToFloat(static_cast<const uint8_t*>(pool) + e * DTypeSize(t), t, D, dst);
}

// Orders (score, index): larger score first, then smaller index; NaN last.
bool Better(float a, uint32_t ia, float b, uint32_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return nb;
  if (!na && a != b) return a > b;
  return ia < ib;
}

}  // namespace

void ChunkSummaryCpu(const ChunkSummaryView& v) {
  const uint32_t D = v.head_dim;
  std::vector<float> k(D);
  std::vector<double> c(D);
  for (uint32_t ci = 0; ci < v.num_chunks; ++ci) {
    const KVSpan& s = v.chunks[ci];
    for (uint32_t h = 0; h < v.kv_heads; ++h) {
      const size_t o = static_cast<size_t>(ci) * v.kv_heads + h;
      float* cen = v.centroids + o * D;
      std::fill(c.begin(), c.end(), 0.0);
      const uint32_t n = s.end - s.begin;
      double norm = 0;
      for (uint32_t t = s.begin; t < s.end; ++t) {
        LoadKey(v.pool, v.kv_dtype, s, h, t, D, k.data());
        double nn = 0;
        for (uint32_t d = 0; d < D; ++d) {
          c[d] += k[d];
          nn += static_cast<double>(k[d]) * k[d];
        }
        norm = std::max(norm, nn);
      }
      for (uint32_t d = 0; d < D; ++d) cen[d] = n ? static_cast<float>(c[d] / n) : 0.f;
      double r2 = 0;
      for (uint32_t t = s.begin; t < s.end; ++t) {
        LoadKey(v.pool, v.kv_dtype, s, h, t, D, k.data());
        double dd = 0;
        for (uint32_t d = 0; d < D; ++d) {
          const double x = static_cast<double>(k[d]) - cen[d];
          dd += x * x;
        }
        r2 = std::max(r2, dd);
      }
      v.radii[o] = static_cast<float>(std::sqrt(r2)) * (1.f + kSummaryRoundUp);
      if (v.max_key_norms) {
        v.max_key_norms[o] = static_cast<float>(std::sqrt(norm)) * (1.f + kSummaryRoundUp);
      }
    }
  }
}

void NodeBoundsCpu(const NodeBoundsView& v) {
  const uint32_t D = v.head_dim;
  for (uint32_t i = 0; i < v.num_pairs; ++i) {
    const float* c = v.centroids + static_cast<size_t>(v.pair_node[i]) * D;
    const float r = v.radii[v.pair_node[i]];
    float best = -kInf;
    for (uint32_t g = 0; g < v.group_size; ++g) {
      const float* q = v.queries + (static_cast<size_t>(v.pair_group[i]) * v.group_size + g) * D;
      float dot = 0.f, qq = 0.f;
      for (uint32_t d = 0; d < D; ++d) {
        dot += q[d] * c[d];
        qq += q[d] * q[d];
      }
      best = std::max(best, dot + std::sqrt(qq) * r);
    }
    v.bounds[i] = best;
  }
}

void ChunkMaxScoresCpu(const ChunkMaxScoresView& v) {
  const uint32_t D = v.head_dim;
  std::vector<float> k(D);
  for (uint32_t i = 0; i < v.num_items; ++i) {
    const KVSpan& s = v.chunks[i];
    float best = -kInf;
    for (uint32_t t = s.begin; t < s.end; ++t) {
      LoadKey(v.pool, v.kv_dtype, s, v.item_head[i], t, D, k.data());
      for (uint32_t g = 0; g < v.group_size; ++g) {
        const float* q = v.queries + (static_cast<size_t>(v.item_group[i]) * v.group_size + g) * D;
        float dot = 0.f;
        for (uint32_t d = 0; d < D; ++d) dot += q[d] * k[d];
        best = std::max(best, dot);
      }
    }
    v.scores[i] = best;
  }
}

Status ValidateTopKView(const TopKView& v) {
  if (v.k == 0 || v.k > v.n) {
    return InvalidArgument("topk: k " + std::to_string(v.k) + " not in [1, n]");
  }
  if (v.k > kTopKMax) return InvalidArgument("topk: k above kTopKMax");
  if (v.scores == nullptr || v.indices == nullptr) return InvalidArgument("topk: null pointer");
  return Status::OK();
}

void TopKCpu(const TopKView& v) {
  std::vector<uint32_t> idx(v.n);
  for (uint32_t r = 0; r < v.num_rows; ++r) {
    const float* s = v.scores + static_cast<size_t>(r) * v.n;
    for (uint32_t i = 0; i < v.n; ++i) idx[i] = i;
    std::partial_sort(idx.begin(), idx.begin() + v.k, idx.end(),
                      [s](uint32_t a, uint32_t b) { return Better(s[a], a, s[b], b); });
    for (uint32_t j = 0; j < v.k; ++j) {
      v.indices[static_cast<size_t>(r) * v.k + j] = idx[j];
      if (v.values) v.values[static_cast<size_t>(r) * v.k + j] = s[idx[j]];
    }
  }
}

void TokenLogitsCpu(const TokenLogitsView& v) {
  const uint32_t D = v.head_dim;
  const uint32_t G = v.q_heads / v.kv_heads;
  std::vector<float> k(D);
  for (uint32_t i = 0; i < v.num_items; ++i) {
    const KVSpan& s = v.spans[i];
    const uint32_t h = v.item_head[i];
    float* out = v.logits + static_cast<size_t>(v.token_prefix[i]) * G;
    for (uint32_t t = s.begin; t < s.end; ++t) {
      LoadKey(v.pool, v.kv_dtype, s, h, t, D, k.data());
      for (uint32_t g = 0; g < G; ++g) {
        const float* q = v.q + static_cast<size_t>(h * G + g) * D;
        double dot = 0.0;
        for (uint32_t d = 0; d < D; ++d) dot += double{q[d]} * k[d];
        *out++ = static_cast<float>(dot * v.scale);
      }
    }
  }
}

void PooledBlockScoresCpu(const PooledBlockScoresView& v) {
  const uint32_t D = v.head_dim;
  const uint32_t G = v.q_heads / v.kv_heads;
  const uint32_t total = v.total_tokens;
  const uint32_t nb = PooledNumBlocks(total, v.block_tokens);
  std::vector<float> qbar(D), k(D);
  for (uint32_t hi = 0; hi < v.num_heads; ++hi) {
    const uint32_t h = v.heads[hi];
    for (uint32_t d = 0; d < D; ++d) {
      float a = 0.f;
      for (uint32_t g = 0; g < G; ++g) a += v.q[static_cast<size_t>(h * G + g) * D + d];
      qbar[d] = a / static_cast<float>(G);
    }
    float* out = v.scores + static_cast<size_t>(hi) * nb;
    for (uint32_t j = 0; j < nb; ++j) out[j] = v.mode == BlockPool::kMax ? -kInf : 0.f;
    uint32_t pos = 0;
    for (uint32_t si = 0; si < v.num_spans; ++si) {
      const KVSpan& s = v.spans[si];
      for (uint32_t t = s.begin; t < s.end; ++t, ++pos) {
        LoadKey(v.pool, v.kv_dtype, s, h, t, D, k.data());
        float dot = 0.f;
        for (uint32_t d = 0; d < D; ++d) dot += qbar[d] * k[d];
        float& o = out[pos / v.block_tokens];
        o = v.mode == BlockPool::kMax ? std::max(o, dot) : o + dot;
      }
    }
    if (v.mode == BlockPool::kMean) {
      for (uint32_t j = 0; j < nb; ++j) {
        const uint32_t n = std::min(v.block_tokens, total - j * v.block_tokens);
        out[j] /= static_cast<float>(n);
      }
    }
  }
}

}  // namespace kvmem::kernels
