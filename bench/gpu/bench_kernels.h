// Device helpers of kvmem-bench-gpu: random fill and a float64 reference attention. Plain
// C++ interface so the host driver compiles with the host compiler.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvmem::bench {

// Fills n bf16 values with a hash-based normal-ish random stream (seed selects the stream),
// scaled by `scale`, plus `offset` per element. Asynchronous on the legacy stream.
void FillRandomBF16(void* dst, size_t n, uint64_t seed, float scale);

// Topic-structured keys (runs of 512 positions share a direction per head, plus noise) and
// random values into chunk blocks K[kv_heads][tokens][head_dim] then V (stride = tokens) at
// element offsets block[c]; block/tokens/start are device arrays [num_chunks]. Asynchronous.
void FillTopicKV(void* pool, const uint64_t* block, const uint32_t* tokens, const uint64_t* start,
                 uint32_t num_chunks, uint32_t kv_heads, uint32_t head_dim, uint64_t session,
                 uint64_t seed);

// One contiguous row run of one KV head: len rows of head_dim bf16 keys at k, values at v.
struct RefSegment {
  const void* k;
  const void* v;
  uint32_t len;
  uint32_t pad;
};

// Float64 reference of decode attention, D = 128, bf16 K/V and q, for `problems` problems with
// q_heads query heads each; KV head h of problem p owns segments
// [seg_begin[p * kv_heads + h], seg_begin[p * kv_heads + h + 1]). Writes out [p][q_heads][128]
// (double). All pointers are device memory. Synchronous (returns after the kernel finished).
void ReferenceAttend(const RefSegment* segs, const uint32_t* seg_begin, uint32_t problems,
                     uint32_t q_heads, uint32_t kv_heads, const void* q, float scale, double* out);

// max over (problem, head) of ‖got − ref‖ / ‖ref‖, got bf16 [rows][128], ref double.
double MaxRelErrBF16(const void* got, const double* ref, uint32_t rows);

}  // namespace kvmem::bench
