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

// Query heads [qh0, qh0 + n): their unnormalised accumulators in acc[0, n * head_dim), their
// running max and sum in m[0, n), l[0, n). Writes just their rows of out and entries of lse;
// heads with no tokens (l == 0) produce zeros and lse = -inf.
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

// Every query head of the problem: acc is [q_heads][head_dim], m and l per query head.
inline void FinishSoftmax(const AttendProblem& p, std::vector<float>& acc, const std::vector<float>& m,
                          const std::vector<float>& l) {
  FinishSoftmaxHeads(p, 0, p.q_heads, acc.data(), m.data(), l.data());
}

}  // namespace kvmem::kernels::detail
