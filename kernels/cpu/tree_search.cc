// CPU reference of the flat-tree budgeted search (kernels/tree_search.h).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "index/detail/vec_math.h"  // the index's Dot: same float operations, same order
#include "kernels/tree_search.h"

namespace kvmem::kernels {

using index::detail::Dot;

FlatTreeView FlatTree::View() const {
  FlatTreeView v;
  v.num_nodes = static_cast<uint32_t>(nodes.size());
  v.num_chunks = num_chunks;
  v.num_levels = num_levels;
  for (uint32_t l = 0; l <= num_levels && l < kTreeSearchMaxLevels + 2; ++l) {
    v.level_begin[l] = level_begin[l];
  }
  v.node_centroids = node_centroids.data();
  v.nodes = nodes.data();
  v.leaf_chunks = leaf_chunks.data();
  v.chunk_centroids = chunk_centroids.data();
  v.chunk_radius = chunk_radius.data();
  v.chunk_tokens = chunk_tokens.data();
  v.chunk_start = chunk_start.data();
  return v;
}

namespace {

constexpr uint32_t kChain = kTreeSearchMaxLevels + 1;  // path scores below the root, chunk included

struct Chain {
  float v[kChain];
  uint32_t n = 0;
};

// chain(path + s): the parent's chain elements below s, then s.
Chain Extend(const Chain& parent, float s) {
  Chain c;
  for (uint32_t i = 0; i < parent.n; ++i) {
    if (parent.v[i] < s) c.v[c.n++] = parent.v[i];
  }
  c.v[c.n++] = s;
  return c;
}

// Descending lexicographic order; equal prefixes: the longer chain first, then lower id.
bool Before(const Chain& a, uint32_t ida, const Chain& b, uint32_t idb) {
  const uint32_t n = std::min(a.n, b.n);
  for (uint32_t i = 0; i < n; ++i) {
    if (a.v[i] != b.v[i]) return a.v[i] > b.v[i];
  }
  if (a.n != b.n) return a.n > b.n;
  return ida < idb;
}

}  // namespace

Status TreeSearchCpu(const FlatTreeView& t, const float* q, uint32_t group,
                     uint32_t head_dim, const TreeSearchParams& p, TreeSelection* out) {
  *out = TreeSelection{};
  if (t.num_levels > kTreeSearchMaxLevels + 1) {
    return InvalidArgument("tree search: " + std::to_string(t.num_levels) +
                           " node levels, at most " + std::to_string(kTreeSearchMaxLevels + 1));
  }
  if (p.budget_tokens == 0 || t.num_chunks == 0 || t.num_nodes == 0) return Status::OK();
  const uint32_t D = head_dim;
  // The mean query of the group, as index::QueryGroup computes it.
  std::vector<float> mean(D, 0.f);
  for (uint32_t g = 0; g < group; ++g) {
    for (uint32_t d = 0; d < D; ++d) mean[d] += q[size_t{g} * D + d];
  }
  for (auto& v : mean) v /= static_cast<float>(group);
  const float mean_norm = std::sqrt(Dot(mean.data(), mean.data(), D));
  const float wn = p.node_radius_weight * mean_norm, wc = p.chunk_radius_weight * mean_norm;

  std::vector<Chain> node_chain(t.num_nodes);
  for (uint32_t n = 1; n < t.num_nodes; ++n) {
    const float s = Dot(mean.data(), t.node_centroids + size_t{n} * D, D) + wn * t.nodes[n].radius;
    node_chain[n] = Extend(node_chain[t.nodes[n].parent], s);
  }
  out->nodes_scored = t.num_nodes - 1;
  std::vector<Chain> chain(t.num_chunks);
  std::vector<float> score(t.num_chunks);
  for (uint32_t n = 0; n < t.num_nodes; ++n) {
    const FlatTreeNode& node = t.nodes[n];
    if (!(node.child_count & kTreeLeafBit)) continue;
    const uint32_t count = node.child_count & ~kTreeLeafBit;
    for (uint32_t i = 0; i < count; ++i) {
      const uint32_t c = t.leaf_chunks[node.child_begin + i];
      score[c] = Dot(mean.data(), t.chunk_centroids + size_t{c} * D, D) + wc * t.chunk_radius[c];
      chain[c] = Extend(node_chain[n], score[c]);
    }
  }
  out->nodes_scored += t.num_chunks;
  const uint32_t* chunk_tokens = t.chunk_tokens;
  const uint64_t* chunk_start = t.chunk_start;
  std::vector<uint32_t> order(t.num_chunks);
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin(), order.end(),
            [&](uint32_t a, uint32_t b) { return Before(chain[a], a, chain[b], b); });
  uint64_t remaining = p.budget_tokens;
  uint32_t misfits = 0;
  for (uint32_t c : order) {
    const uint64_t end = chunk_start[c] + chunk_tokens[c];
    const uint64_t counted = end <= p.skip_tokens_below ? 0
                             : chunk_start[c] >= p.skip_tokens_below
                                 ? chunk_tokens[c]
                                 : end - p.skip_tokens_below;
    if (counted == 0) continue;
    if (counted > remaining) {
      if (++misfits >= p.max_consecutive_misfits) break;
      continue;
    }
    misfits = 0;
    remaining -= counted;
    out->chunks.push_back(c);
    out->scores.push_back(score[c]);
    out->tokens += counted;
    if (remaining == 0) break;
  }
  return Status::OK();
}

}  // namespace kvmem::kernels
