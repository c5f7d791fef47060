#include "index/summary.h"

#include <cmath>
#include <string>

#include "index/detail/vec_math.h"

namespace kvmem::index {

namespace {

Status ValidateShape(const void* keys, uint32_t tokens, uint32_t head_dim) {
  if (keys == nullptr) return InvalidArgument("summary: null keys");
  if (tokens == 0) return InvalidArgument("summary: chunk has no tokens");
  if (head_dim == 0) return InvalidArgument("summary: head_dim is 0");
  return Status::OK();
}

}  // namespace

Result<ChunkSummary> SummarizeKeys(const float* keys, uint32_t tokens, uint32_t head_dim) {
  KVMEM_RETURN_IF_ERROR(ValidateShape(keys, tokens, head_dim));
  const size_t n = static_cast<size_t>(tokens) * head_dim;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(keys[i])) {
      return InvalidArgument("summary: non-finite key value at token " +
                             std::to_string(i / head_dim));
    }
  }
  // Mean in double so long chunks of large keys do not lose the low bits.
  std::vector<double> sum(head_dim, 0.0);
  for (uint32_t t = 0; t < tokens; ++t) {
    const float* k = keys + static_cast<size_t>(t) * head_dim;
    for (uint32_t d = 0; d < head_dim; ++d) sum[d] += k[d];
  }
  ChunkSummary s;
  s.centroid.resize(head_dim);
  for (uint32_t d = 0; d < head_dim; ++d) s.centroid[d] = static_cast<float>(sum[d] / tokens);
  detail::RoundToBF16(s.centroid.data(), head_dim);
  for (uint32_t d = 0; d < head_dim; ++d) {
    if (!std::isfinite(s.centroid[d])) {
      return InvalidArgument("summary: mean key beyond the bfloat16 range in dimension " +
                             std::to_string(d));
    }
  }
  double r = 0.0, norm = 0.0;
  for (uint32_t t = 0; t < tokens; ++t) {
    const float* k = keys + static_cast<size_t>(t) * head_dim;
    r = std::max(r, detail::DistanceD(k, s.centroid.data(), head_dim));
    double nk = 0.0;
    for (uint32_t d = 0; d < head_dim; ++d) nk += static_cast<double>(k[d]) * k[d];
    norm = std::max(norm, std::sqrt(nk));
  }
  s.radius = detail::RoundUpToFloat(r);
  s.max_key_norm = detail::RoundUpToFloat(norm);
  return s;
}

Result<ChunkSummary> SummarizeBlock(const void* keys, DType dtype, uint32_t tokens,
                                    uint32_t head_dim, uint64_t row_stride_elems) {
  KVMEM_RETURN_IF_ERROR(ValidateShape(keys, tokens, head_dim));
  if (row_stride_elems < head_dim) {
    return InvalidArgument("summary: row stride " + std::to_string(row_stride_elems) +
                           " < head_dim " + std::to_string(head_dim));
  }
  std::vector<float> dense(static_cast<size_t>(tokens) * head_dim);
  const auto* base = static_cast<const uint8_t*>(keys);
  for (uint32_t t = 0; t < tokens; ++t) {
    ConvertToFloat(base + t * row_stride_elems * DTypeSize(dtype), dtype, head_dim,
                   dense.data() + static_cast<size_t>(t) * head_dim);
  }
  return SummarizeKeys(dense.data(), tokens, head_dim);
}

}  // namespace kvmem::index
