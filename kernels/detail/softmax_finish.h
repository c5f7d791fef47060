// The last step both CPU attention kernels share: normalise each query head's accumulator by
// its softmax sum, write the log-sum-exp, and store the output in its dtype.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/attention.h"

namespace kvmem::kernels::detail {

// acc: [q_heads][head_dim] unnormalised; m, l: running max and sum per query head. Heads with
// no tokens (l == 0) produce zeros and lse = -inf.
inline void FinishSoftmax(const AttendProblem& p, std::vector<float>& acc, const std::vector<float>& m,
                          const std::vector<float>& l) {
  const uint32_t D = p.head_dim;
  for (uint32_t qh = 0; qh < p.q_heads; ++qh) {
    float* a = &acc[static_cast<size_t>(qh) * D];
    const float inv = l[qh] > 0.f ? 1.f / l[qh] : 0.f;
    for (uint32_t d = 0; d < D; ++d) a[d] *= inv;
    if (p.lse != nullptr) {
      p.lse[qh] = l[qh] > 0.f ? m[qh] + std::log(l[qh]) : -std::numeric_limits<float>::infinity();
    }
  }
  ConvertFromFloat(acc.data(), acc.size(), p.out_dtype, p.out);
}

// The same for query heads [qh0, qh0 + n) only, their accumulators in acc[0, n * head_dim) and
// their max and sum in m[0, n), l[0, n): writes just their rows of out and entries of lse.
inline void FinishSoftmaxHeads(const AttendProblem& p, uint32_t qh0, uint32_t n, float* acc, const float* m,
                               const float* l) {
  const uint32_t D = p.head_dim;
  for (uint32_t i = 0; i < n; ++i) {
    float* a = acc + static_cast<size_t>(i) * D;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    for (uint32_t d = 0; d < D; ++d) a[d] *= inv;
    if (p.lse != nullptr) {
      p.lse[qh0 + i] = l[i] > 0.f ? m[i] + std::log(l[i]) : -std::numeric_limits<float>::infinity();
    }
  }
  ConvertFromFloat(acc, static_cast<size_t>(n) * D, p.out_dtype,
                   static_cast<uint8_t*>(p.out) + static_cast<size_t>(qh0) * D * DTypeSize(p.out_dtype));
}

}  // namespace kvmem::kernels::detail
