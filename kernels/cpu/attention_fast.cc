// The CPU backend's attention: the same function as AttendCpu (the reference), computed in
// blocks of tokens so the inner loops vectorise and the softmax rescale happens once per block
// instead of once per token. Built twice: for the baseline x86-64 instruction set, and for AVX2
// with FMA, taken at run time when the CPU has them (8-wide fused multiply-adds; the baseline's
// SSE2 is 4-wide without FMA). Both are checked against AttendCpu in
// tests/kernels/attention_cpu_test.cc; kvmem-bench-cpu-attend times them. The host pool's
// rescoring logits (TokenLogitsBlocked, against TokenLogitsCpu) are built the same way.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/attention.h"
#include "kernels/detail/softmax_finish.h"
#include "kernels/index_ops.h"

namespace kvmem::kernels {
namespace {

constexpr uint32_t kBlock = 32;

// Eight floats as one value: one AVX register in the AVX2 build, two SSE registers in the
// baseline's. This file is compiled with -ffp-contract=fast, so `s += x * y` is one fused
// multiply-add where the build has FMA (the attention is checked against the reference within
// a tolerance, not bit for bit).
typedef float Float8 __attribute__((vector_size(32)));

// out[j] = q_j · k for the N rows q_j = q + j * D, each with eight independent partial sums, each
// key vector loaded once for the N queries.
template <int N>
inline void DotN(const float* q, const float* k, uint32_t D, float* out) {
  Float8 s[N] = {};
  uint32_t i = 0;
  for (; i + 8 <= D; i += 8) {
    Float8 x;
    std::memcpy(&x, k + i, sizeof(x));
    for (int j = 0; j < N; ++j) {
      Float8 y;
      std::memcpy(&y, q + static_cast<size_t>(j) * D + i, sizeof(y));
      s[j] += y * x;
    }
  }
  for (int j = 0; j < N; ++j) {
    float t = ((s[j][0] + s[j][1]) + (s[j][2] + s[j][3])) + ((s[j][4] + s[j][5]) + (s[j][6] + s[j][7]));
    for (uint32_t r = i; r < D; ++r) t += q[static_cast<size_t>(j) * D + r] * k[r];
    out[j] = t;
  }
}

// Dot product with eight independent partial sums.
inline float Dot(const float* a, const float* b, uint32_t n) {
  float t;
  DotN<1>(a, b, n, &t);
  return t;
}

// acc[0, D) += sum over t < n of w[t] * v[t][0, D) (rows of D floats): 64 columns at a time
// held in eight vector accumulators across the rows, so the accumulator is loaded and stored
// once per block of rows instead of once per row.
inline void AccumulateRows(float* acc, const float* w, const float* v, uint32_t n, uint32_t D) {
  uint32_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {
    Float8 a[8];
    std::memcpy(a, acc + d0, sizeof(a));
    for (uint32_t t = 0; t < n; ++t) {
      const float* row = v + size_t{t} * D + d0;
      for (int j = 0; j < 8; ++j) {
        Float8 r;  // one 32-byte load each (a copy of the whole row through the stack stalls)
        std::memcpy(&r, row + 8 * j, sizeof(r));
        a[j] += w[t] * r;
      }
    }
    std::memcpy(acc + d0, a, sizeof(a));
  }
  for (uint32_t t = 0; t < n; ++t) {
    for (uint32_t d = d0; d < D; ++d) acc[d] += w[t] * v[size_t{t} * D + d];
  }
}

// n elements of type t to float; bfloat16 inline (a shift: it vectorises in the caller's
// instruction set), the others through ConvertToFloat.
inline void ToFloat(const uint8_t* src, DType t, size_t n, float* dst) {
  if (t == DType::kBF16) {
    const auto* s = reinterpret_cast<const uint16_t*>(src);
    for (size_t i = 0; i < n; ++i) {
      const uint32_t u = static_cast<uint32_t>(s[i]) << 16;
      std::memcpy(&dst[i], &u, 4);
    }
  } else {
    ConvertToFloat(src, t, n, dst);
  }
}

// One KV head of a problem: its G query heads' outputs (and lse) written; nothing else of the
// problem is touched, so different heads may run on different threads at once.
__attribute__((always_inline)) inline void AttendBlockedHead(const AttendProblem& p, uint32_t h) {
  const uint32_t D = p.head_dim, G = p.q_heads / p.kv_heads;
  thread_local std::vector<float> qf, acc, kb, vb, logits, m, l;
  qf.resize(static_cast<size_t>(G) * D);
  const size_t qsize = DTypeSize(p.q_dtype);
  ConvertToFloat(static_cast<const uint8_t*>(p.q) + static_cast<size_t>(h) * G * D * qsize, p.q_dtype, qf.size(),
                 qf.data());
  for (float& x : qf) x *= p.scale;  // fold the scale into q once
  acc.assign(static_cast<size_t>(G) * D, 0.f);
  m.assign(G, -std::numeric_limits<float>::infinity());
  l.assign(G, 0.f);
  kb.resize(static_cast<size_t>(kBlock) * D);
  vb.resize(static_cast<size_t>(kBlock) * D);
  logits.resize(static_cast<size_t>(G) * kBlock);
  const size_t esize = DTypeSize(p.kv_dtype);
  const auto* pool = static_cast<const uint8_t*>(p.pool);
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
      ToFloat(pool + k_elem * esize, p.kv_dtype, static_cast<size_t>(n) * D, kb.data());
      ToFloat(pool + (k_elem + v_shift) * esize, p.kv_dtype, static_cast<size_t>(n) * D, vb.data());
      for (uint32_t g = 0; g < G; ++g) {
        const float* q = &qf[static_cast<size_t>(g) * D];
        float* lg = &logits[static_cast<size_t>(g) * kBlock];
        float bmax = -std::numeric_limits<float>::infinity();
        for (uint32_t t = 0; t < n; ++t) {
          lg[t] = Dot(q, &kb[static_cast<size_t>(t) * D], D);
          bmax = std::max(bmax, lg[t]);
        }
        float* a = &acc[static_cast<size_t>(g) * D];
        if (bmax > m[g]) {
          const float c = std::exp(m[g] - bmax);
          l[g] *= c;
          for (uint32_t d = 0; d < D; ++d) a[d] *= c;
          m[g] = bmax;
        }
        for (uint32_t t = 0; t < n; ++t) {
          lg[t] = std::exp(lg[t] - m[g]);  // the weight, in place of the logit
          l[g] += lg[t];
        }
        AccumulateRows(a, lg, vb.data(), n, D);
      }
    }
  }
  detail::FinishSoftmaxHeads(p, h * G, G, acc.data(), m.data(), l.data());
}

// TokenLogitsCpu's function with float dot products of eight partial sums: each item's keys
// converted a block of rows at a time (its tokens are contiguous rows of one head), each key
// row multiplied with up to four of the group's queries at once.
__attribute__((always_inline)) inline void TokenLogitsBlockedImpl(const TokenLogitsView& v) {
  const uint32_t D = v.head_dim, G = v.q_heads / v.kv_heads;
  thread_local std::vector<float> kb;
  kb.resize(static_cast<size_t>(kBlock) * D);
  const size_t esize = DTypeSize(v.kv_dtype);
  const auto* pool = static_cast<const uint8_t*>(v.pool);
  // Items are usually a few rows each, scattered over the pool: their rows are fetched a few
  // items ahead (the hardware prefetcher does not follow the jumps).
  constexpr uint32_t kAhead = 4;
  auto prefetch = [&](uint32_t i) {
    const KVSpan& s = v.spans[i];
    const uint64_t first = s.offset + (static_cast<uint64_t>(v.item_head[i]) * s.stride_tokens + s.begin) * D;
    const uint8_t* p = pool + first * esize;
    const size_t bytes = static_cast<size_t>(s.end - s.begin) * D * esize;
    for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
  };
  for (uint32_t i = 0; i < std::min(kAhead, v.num_items); ++i) prefetch(i);
  for (uint32_t i = 0; i < v.num_items; ++i) {
    if (i + kAhead < v.num_items) prefetch(i + kAhead);
    const KVSpan& s = v.spans[i];
    const uint32_t h = v.item_head[i];
    const float* q = v.q + static_cast<size_t>(h) * G * D;
    float* out = v.logits + static_cast<size_t>(v.token_prefix[i]) * G;
    const uint64_t head_k = s.offset + static_cast<uint64_t>(h) * s.stride_tokens * D;
    for (uint32_t t0 = s.begin; t0 < s.end; t0 += kBlock) {
      const uint32_t n = std::min(kBlock, s.end - t0);
      ToFloat(pool + (head_k + static_cast<uint64_t>(t0) * D) * esize, v.kv_dtype, static_cast<size_t>(n) * D,
              kb.data());
      for (uint32_t t = 0; t < n; ++t) {
        const float* k = &kb[static_cast<size_t>(t) * D];
        uint32_t g = 0;
        for (; g + 4 <= G; g += 4) DotN<4>(q + static_cast<size_t>(g) * D, k, D, out + g);
        for (; g + 2 <= G; g += 2) DotN<2>(q + static_cast<size_t>(g) * D, k, D, out + g);
        if (g < G) DotN<1>(q + static_cast<size_t>(g) * D, k, D, out + g);
        for (g = 0; g < G; ++g) out[g] *= v.scale;
        out += G;
      }
    }
  }
}

void AttendBlockedHeadBaseline(const AttendProblem& p, uint32_t h) { AttendBlockedHead(p, h); }
void TokenLogitsBlockedBaseline(const TokenLogitsView& v) { TokenLogitsBlockedImpl(v); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVMEM_CPU_AVX2 1
__attribute__((target("avx2,fma"))) void AttendBlockedHeadAvx2(const AttendProblem& p, uint32_t h) {
  AttendBlockedHead(p, h);
}
__attribute__((target("avx2,fma"))) void TokenLogitsBlockedAvx2(const TokenLogitsView& v) {
  TokenLogitsBlockedImpl(v);
}
#endif

}  // namespace

bool CpuHasAvx2Fma() {
#ifdef KVMEM_CPU_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

void AttendCpuBlockedHead(const AttendProblem& p, uint32_t kv_head, CpuIsa isa) {
#ifdef KVMEM_CPU_AVX2
  if (isa != CpuIsa::kBaseline && CpuHasAvx2Fma()) {
    AttendBlockedHeadAvx2(p, kv_head);
    return;
  }
#endif
  (void)isa;
  AttendBlockedHeadBaseline(p, kv_head);
}

void TokenLogitsBlocked(const TokenLogitsView& v, CpuIsa isa) {
#ifdef KVMEM_CPU_AVX2
  if (isa != CpuIsa::kBaseline && CpuHasAvx2Fma()) {
    TokenLogitsBlockedAvx2(v);
    return;
  }
#endif
  (void)isa;
  TokenLogitsBlockedBaseline(v);
}

void AttendCpuBlocked(const AttendProblem* problems, uint32_t count, CpuIsa isa) {
  for (uint32_t i = 0; i < count; ++i) {
    for (uint32_t h = 0; h < problems[i].kv_heads; ++h) AttendCpuBlockedHead(problems[i], h, isa);
  }
}

}  // namespace kvmem::kernels
