#include "kernels/attention.h"
#include "kernels/detail/softmax_finish.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace kvmem::kernels {

Status ValidateAttendProblem(const AttendProblem& p) {
  if (p.q_heads == 0 || p.kv_heads == 0 || p.head_dim == 0) {
    return InvalidArgument("attend: zero heads or head_dim");
  }
  if (p.q_heads % p.kv_heads != 0) {
    return InvalidArgument("attend: q_heads " + std::to_string(p.q_heads) +
                           " not a multiple of kv_heads " + std::to_string(p.kv_heads));
  }
  if (p.q == nullptr || p.out == nullptr) return InvalidArgument("attend: null q or out");
  if (p.num_spans > 0 && (p.spans == nullptr || p.pool == nullptr)) {
    return InvalidArgument("attend: spans without pool");
  }
  for (uint32_t h = 0; h < p.kv_heads; ++h) {
    uint32_t first, last;
    HeadSpans(p, h, &first, &last);
    if (first > last || last > p.num_spans) return InvalidArgument("attend: bad head_span_begin");
  }
  for (uint32_t i = 0; i < p.num_spans; ++i) {
    const KVSpan& s = p.spans[i];
    if (s.begin > s.end || s.end > s.stride_tokens) {
      return InvalidArgument("attend: span " + std::to_string(i) + " out of its block");
    }
  }
  return Status::OK();
}

void AttendCpu(const AttendProblem* problems, uint32_t count) {
  std::vector<float> qf, acc, krow, vrow;
  std::vector<float> m, l, logit;
  for (uint32_t pi = 0; pi < count; ++pi) {
    const AttendProblem& p = problems[pi];
    const uint32_t D = p.head_dim;
    const uint32_t G = p.q_heads / p.kv_heads;
    qf.resize(static_cast<size_t>(p.q_heads) * D);
    ConvertToFloat(p.q, p.q_dtype, qf.size(), qf.data());
    acc.assign(static_cast<size_t>(p.q_heads) * D, 0.f);
    krow.resize(D);
    vrow.resize(D);
    m.assign(p.q_heads, -std::numeric_limits<float>::infinity());
    l.assign(p.q_heads, 0.f);
    logit.resize(G);
    const size_t esize = DTypeSize(p.kv_dtype);
    const auto* pool = static_cast<const uint8_t*>(p.pool);

    for (uint32_t h = 0; h < p.kv_heads; ++h) {
      uint32_t first, last;
      HeadSpans(p, h, &first, &last);
      for (uint32_t si = first; si < last; ++si) {
        const KVSpan& s = p.spans[si];
        const uint64_t head_k = s.offset + static_cast<uint64_t>(h) * s.stride_tokens * D;
        const uint64_t v_shift = static_cast<uint64_t>(p.kv_heads) * s.stride_tokens * D;
        for (uint32_t t = s.begin; t < s.end; ++t) {
          const uint64_t k_elem = head_k + static_cast<uint64_t>(t) * D;
          ConvertToFloat(pool + k_elem * esize, p.kv_dtype, D, krow.data());
          ConvertToFloat(pool + (k_elem + v_shift) * esize, p.kv_dtype, D, vrow.data());
          for (uint32_t g = 0; g < G; ++g) {
            const uint32_t qh = h * G + g;
            const float* q = &qf[static_cast<size_t>(qh) * D];
            float dot = 0.f;
            for (uint32_t d = 0; d < D; ++d) dot += q[d] * krow[d];
            const float x = dot * p.scale;
            // Online softmax: rescale the running sum when the max grows.
            float* a = &acc[static_cast<size_t>(qh) * D];
            if (x > m[qh]) {
              const float c = std::exp(m[qh] - x);
              l[qh] *= c;
              for (uint32_t d = 0; d < D; ++d) a[d] *= c;
              m[qh] = x;
            }
            const float w = std::exp(x - m[qh]);
            l[qh] += w;
            for (uint32_t d = 0; d < D; ++d) a[d] += w * vrow[d];
          }
        }
      }
    }
    detail::FinishSoftmax(p, acc, m, l);
  }
}

}  // namespace kvmem::kernels

namespace kvmem::kernels {

Status ValidateDenseAttendView(const DenseAttendView& v) {
  if (v.batch == 0 || v.q_heads == 0 || v.kv_heads == 0 || v.head_dim == 0) {
    return InvalidArgument("dense attend: zero batch, heads or head_dim");
  }
  if (v.q_heads % v.kv_heads != 0) {
    return InvalidArgument("dense attend: q_heads not a multiple of kv_heads");
  }
  if (v.k == nullptr || v.v == nullptr || v.q == nullptr || v.out == nullptr ||
      v.seq_lens == nullptr) {
    return InvalidArgument("dense attend: null k, v, q, out or seq_lens");
  }
  if (v.max_seq_len > v.capacity_tokens) {
    return InvalidArgument("dense attend: max_seq_len exceeds capacity_tokens");
  }
  return Status::OK();
}

// Same loops as AttendCpu, over the contiguous layout.
void DenseAttendCpu(const DenseAttendView& v) {
  const uint32_t D = v.head_dim;
  const uint32_t G = v.q_heads / v.kv_heads;
  const size_t es = DTypeSize(v.kv_dtype);
  std::vector<float> qf(D), krow(D), vrow(D), acc(D);
  for (uint32_t b = 0; b < v.batch; ++b) {
    const uint32_t len = v.seq_lens[b];
    for (uint32_t qh = 0; qh < v.q_heads; ++qh) {
      const uint32_t h = qh / G;
      const size_t qi = (static_cast<size_t>(b) * v.q_heads + qh) * D;
      for (uint32_t d = 0; d < D; ++d) qf[d] = LoadAsFloat(v.q, v.q_dtype, qi + d);
      std::fill(acc.begin(), acc.end(), 0.f);
      float m = -std::numeric_limits<float>::infinity();
      float l = 0.f;
      const uint64_t head0 = (static_cast<uint64_t>(b) * v.kv_heads + h) * v.capacity_tokens * D;
      for (uint32_t t = 0; t < len; ++t) {
        const uint64_t e = head0 + static_cast<uint64_t>(t) * D;
        ConvertToFloat(static_cast<const uint8_t*>(v.k) + e * es, v.kv_dtype, D, krow.data());
        ConvertToFloat(static_cast<const uint8_t*>(v.v) + e * es, v.kv_dtype, D, vrow.data());
        float dot = 0.f;
        for (uint32_t d = 0; d < D; ++d) dot += qf[d] * krow[d];
        const float x = dot * v.scale;
        if (x > m) {
          const float c = std::exp(m - x);
          l *= c;
          for (uint32_t d = 0; d < D; ++d) acc[d] *= c;
          m = x;
        }
        const float w = std::exp(x - m);
        l += w;
        for (uint32_t d = 0; d < D; ++d) acc[d] += w * vrow[d];
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      for (uint32_t d = 0; d < D; ++d) StoreFromFloat(v.out, v.out_dtype, qi + d, acc[d] * inv);
      if (v.lse != nullptr) {
        v.lse[static_cast<size_t>(b) * v.q_heads + qh] =
            l > 0.f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
      }
    }
  }
}

}  // namespace kvmem::kernels
