#include "index/block_select.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

namespace kvmem::index {
namespace {

// Score order: larger first, NaN last, ties by the lower index.
bool Better(std::span<const float> s, uint32_t a, uint32_t b) {
  const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
  if (na != nb) return nb;
  if (!na && s[a] != s[b]) return s[a] > s[b];
  return a < b;
}

// The first `k` indices in score order, sorted.
std::vector<uint32_t> Best(std::span<const float> s, size_t k) {
  std::vector<uint32_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0u);
  k = std::min(k, idx.size());
  auto cmp = [&](uint32_t a, uint32_t b) { return Better(s, a, b); };
  std::partial_sort(idx.begin(), idx.begin() + static_cast<ptrdiff_t>(k), idx.end(), cmp);
  idx.resize(k);
  return idx;
}

}  // namespace

const char* BlockRuleName(BlockRule r) {
  switch (r) {
    case BlockRule::kTopK: return "top_k";
    case BlockRule::kRatio: return "ratio";
    case BlockRule::kThreshold: return "threshold";
    case BlockRule::kTopP: return "top_p";
  }
  return "unknown";
}

Status ValidateBlockRule(const BlockRuleOptions& o) {
  const std::string v = std::to_string(o.value);
  switch (o.rule) {
    case BlockRule::kTopK: break;
    case BlockRule::kRatio:
      if (!(o.value > 0.f && o.value <= 1.f)) {
        return InvalidArgument("selection rule ratio: value must be in (0, 1], got " + v);
      }
      break;
    case BlockRule::kThreshold:
      if (!(o.value > 0.f && o.value < 1.f)) {
        return InvalidArgument("selection rule threshold: value must be in (0, 1), got " + v);
      }
      break;
    case BlockRule::kTopP:
      if (!(o.value > 0.f && o.value <= 1.f)) {
        return InvalidArgument("selection rule top_p: value must be in (0, 1], got " + v);
      }
      break;
    default:
      return InvalidArgument("selection rule " + std::to_string(static_cast<int>(o.rule)) +
                             " unknown (top_k, ratio, threshold, top_p)");
  }
  if (!(o.scale > 0.f) || !std::isfinite(o.scale)) {
    return InvalidArgument("selection rule: softmax scale must be positive and finite");
  }
  return Status::OK();
}

std::vector<uint32_t> SelectBlocks(std::span<const float> s, const BlockRuleOptions& o) {
  const size_t n = s.size();
  if (n == 0) return {};
  if (o.rule == BlockRule::kTopK) return Best(s, std::max<size_t>(1, o.k));
  if (o.rule == BlockRule::kRatio) {
    const double want = std::ceil(static_cast<double>(o.value) * static_cast<double>(n));
    return Best(s, std::clamp<size_t>(static_cast<size_t>(want), 1, n));
  }
  // Softmax over the finite scores (NaN and -inf blocks get probability 0).
  std::vector<uint32_t> order = Best(s, n);
  const float top = s[order[0]];
  if (!std::isfinite(top)) return {order[0]};
  std::vector<double> p(n, 0.0);
  double z = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isfinite(s[i])) {
      p[i] = std::exp(static_cast<double>(o.scale) * (static_cast<double>(s[i]) - top));
      z += p[i];
    }
  }
  std::vector<uint32_t> out;
  if (o.rule == BlockRule::kThreshold) {
    for (uint32_t i : order) {
      if (p[i] / z < o.value) break;  // order is by score, so probabilities only fall
      out.push_back(i);
    }
    if (out.empty()) out.push_back(order[0]);
    return out;
  }
  double acc = 0;
  for (uint32_t i : order) {
    out.push_back(i);
    acc += p[i] / z;
    if (acc >= static_cast<double>(o.value)) break;
  }
  return out;
}

}  // namespace kvmem::index
