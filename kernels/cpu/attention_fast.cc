// The CPU backend's attention: the same function as AttendCpu (the reference), computed in
// blocks of tokens so the inner loops vectorise and the softmax rescale happens once per block
// instead of once per token. Checked against AttendCpu in tests/kernels/attention_cpu_test.cc.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/attention.h"
#include "kernels/detail/softmax_finish.h"

namespace kvmem::kernels {
namespace {

constexpr uint32_t kBlock = 32;

// Dot product with eight independent partial sums (vectorisable without reassociation flags).
inline float Dot(const float* a, const float* b, uint32_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (uint32_t j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

}  // namespace

void AttendCpuBlocked(const AttendProblem* problems, uint32_t count) {
  std::vector<float> qf, acc, kb, vb, logits, m, l;
  for (uint32_t pi = 0; pi < count; ++pi) {
    const AttendProblem& p = problems[pi];
    const uint32_t D = p.head_dim, G = p.q_heads / p.kv_heads;
    qf.resize(static_cast<size_t>(p.q_heads) * D);
    ConvertToFloat(p.q, p.q_dtype, qf.size(), qf.data());
    for (float& x : qf) x *= p.scale;  // fold the scale into q once
    acc.assign(static_cast<size_t>(p.q_heads) * D, 0.f);
    m.assign(p.q_heads, -std::numeric_limits<float>::infinity());
    l.assign(p.q_heads, 0.f);
    kb.resize(static_cast<size_t>(kBlock) * D);
    vb.resize(static_cast<size_t>(kBlock) * D);
    logits.resize(static_cast<size_t>(G) * kBlock);
    const size_t esize = DTypeSize(p.kv_dtype);
    const auto* pool = static_cast<const uint8_t*>(p.pool);
    for (uint32_t h = 0; h < p.kv_heads; ++h) {
      uint32_t first, last;
      HeadSpans(p, h, &first, &last);
      for (uint32_t si = first; si < last; ++si) {
        const KVSpan& s = p.spans[si];
        const uint64_t head_k = s.offset + static_cast<uint64_t>(h) * s.stride_tokens * D;
        const uint64_t v_shift = static_cast<uint64_t>(p.kv_heads) * s.stride_tokens * D;
        for (uint32_t t0 = s.begin; t0 < s.end; t0 += kBlock) {
          const uint32_t n = std::min(kBlock, s.end - t0);
          const uint64_t k_elem = head_k + static_cast<uint64_t>(t0) * D;
          // Rows of one span are contiguous: one conversion per block.
          ConvertToFloat(pool + k_elem * esize, p.kv_dtype, static_cast<size_t>(n) * D, kb.data());
          ConvertToFloat(pool + (k_elem + v_shift) * esize, p.kv_dtype, static_cast<size_t>(n) * D, vb.data());
          for (uint32_t g = 0; g < G; ++g) {
            const uint32_t qh = h * G + g;
            const float* q = &qf[static_cast<size_t>(qh) * D];
            float* lg = &logits[static_cast<size_t>(g) * kBlock];
            float bmax = -std::numeric_limits<float>::infinity();
            for (uint32_t t = 0; t < n; ++t) {
              lg[t] = Dot(q, &kb[static_cast<size_t>(t) * D], D);
              bmax = std::max(bmax, lg[t]);
            }
            float* a = &acc[static_cast<size_t>(qh) * D];
            if (bmax > m[qh]) {
              const float c = std::exp(m[qh] - bmax);
              l[qh] *= c;
              for (uint32_t d = 0; d < D; ++d) a[d] *= c;
              m[qh] = bmax;
            }
            for (uint32_t t = 0; t < n; ++t) {
              const float w = std::exp(lg[t] - m[qh]);
              l[qh] += w;
              const float* v = &vb[static_cast<size_t>(t) * D];
              for (uint32_t d = 0; d < D; ++d) a[d] += w * v[d];
            }
          }
        }
      }
    }
    detail::FinishSoftmax(p, acc, m, l);
  }
}

}  // namespace kvmem::kernels
