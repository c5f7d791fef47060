// Decode attention over token spans of a paged KV pool: the one attention op both backends
// implement (dense = every span, sparse = sinks ∪ selected chunks ∪ tail).
//
// Memory layout of a KV block (a sealed chunk or a session's tail buffer) for one layer:
//   K[kv_heads][stride_tokens][head_dim]  then  V[kv_heads][stride_tokens][head_dim]
// starting at element `offset` of the pool. Keys of head h, token t are at
//   pool + offset + (h * stride_tokens + t) * head_dim
// and values at the same place plus kv_heads * stride_tokens * head_dim. A chunk's keys for one
// head are therefore one contiguous [tokens][head_dim] run, which keeps gathers coalesced.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace kvmem::kernels {

struct KVSpan {
  uint64_t offset;         // element offset of the block in the pool
  uint32_t stride_tokens;  // token capacity of the block
  uint32_t begin;          // first token of the run within the block
  uint32_t end;            // one past the last token
};

// One (session, layer) decode step. Query head j belongs to KV head j / (q_heads / kv_heads).
struct AttendProblem {
  const void* pool;  // KV pool base (device memory on the CUDA backend)
  DType kv_dtype;
  uint32_t q_heads;
  uint32_t kv_heads;
  uint32_t head_dim;
  float scale;    // softmax scale, usually 1/sqrt(head_dim)
  const void* q;  // [q_heads][head_dim]
  DType q_dtype;
  const KVSpan* spans;              // runs attended, grouped by KV head
  const uint32_t* head_span_begin;  // [kv_heads + 1]; nullptr: every head attends all num_spans
  uint32_t num_spans;
  void* out;  // [q_heads][head_dim] in out_dtype
  DType out_dtype;
  float* lse;  // [q_heads] log-sum-exp of scaled logits, or nullptr
};

// Range of spans for KV head h.
inline void HeadSpans(const AttendProblem& p, uint32_t h, uint32_t* first, uint32_t* last) {
  if (p.head_span_begin == nullptr) {
    *first = 0;
    *last = p.num_spans;
  } else {
    *first = p.head_span_begin[h];
    *last = p.head_span_begin[h + 1];
  }
}

// Checks shapes and span bounds that do not need the pool size. Called one layer up from the
// kernels (they trust their input).
Status ValidateAttendProblem(const AttendProblem& p);

// CPU reference: plain loops, fp32 accumulation, numerically stable softmax. Heads with no
// tokens produce zeros and lse = -inf.
void AttendCpu(const AttendProblem* problems, uint32_t count);

// Instruction set of AttendCpuBlocked: kAuto takes AVX2 + FMA when the CPU has them (x86-64),
// else the baseline build; kBaseline forces the baseline (tests, kvmem-bench-cpu-attend).
enum class CpuIsa { kAuto, kBaseline };
bool CpuHasAvx2Fma();

// The CPU backend's kernel: the same function computed in vectorisable blocks of tokens
// (several times faster); parity-tested against AttendCpu.
void AttendCpuBlocked(const AttendProblem* problems, uint32_t count, CpuIsa isa = CpuIsa::kAuto);
// One KV head of it: writes the outputs (and lse) of that head's query heads and nothing else,
// so the heads of a problem can run on different threads at once (the host pool's workers).
void AttendCpuBlockedHead(const AttendProblem& p, uint32_t kv_head, CpuIsa isa = CpuIsa::kAuto);

// Dense decode attention over a contiguous cache, for dense layers and dense mode:
//   K[batch][kv_heads][capacity_tokens][head_dim], V likewise (separate tensors),
//   q/out [batch][q_heads][head_dim], lse [batch][q_heads].
// Sequence b attends its first seq_lens[b] tokens (0 allowed: zeros, lse = -inf).
struct DenseAttendView {
  const void* k;
  const void* v;
  DType kv_dtype;
  uint32_t batch;
  uint32_t q_heads;
  uint32_t kv_heads;
  uint32_t head_dim;
  uint32_t capacity_tokens;  // token stride between heads
  const uint32_t* seq_lens;  // [batch], each <= capacity_tokens
  uint32_t max_seq_len;      // >= every seq_lens[b]; the CUDA version sizes its grid by it
  float scale;
  const void* q;
  DType q_dtype;
  void* out;
  DType out_dtype;
  float* lse;  // or nullptr
};

Status ValidateDenseAttendView(const DenseAttendView& v);

// CPU reference for DenseAttendView (host pointers; seq_lens read on the host).
void DenseAttendCpu(const DenseAttendView& v);

}  // namespace kvmem::kernels
