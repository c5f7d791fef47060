// Device-side records of an AttendPlan (kernels/cuda_ops.h). Shared by the host planner and the
// CUDA kernels; plain structs, identical layout on both sides.
#pragma once

#include <cstdint>

namespace kvmem::kernels::detail {

// Runs per item are capped so an item's run table fits in shared memory.
constexpr uint32_t kMaxRunsPerItem = 256;

struct AttendTaskDesc {  // one (problem, KV head)
  const void* pool;
  const void* q;  // first query head of the group: q + kv_head * G * D
  void* out;      // out + kv_head * G * D
  float* lse;     // lse + kv_head * G, or nullptr
  float scale;
  uint32_t num_splits;
  uint32_t partial_base;  // index of the first partial slot of this task
  uint32_t pad;
};

struct AttendItemDesc {  // one split = one thread block; carries its task's fields so
  const void* pool;      // a block starts with a single dependent load
  const void* q;
  void* out;
  float* lse;
  float scale;
  uint32_t num_splits;
  uint32_t partial_base;
  uint32_t task;
  uint32_t split;
  uint32_t run_begin;
  uint32_t run_end;
  uint32_t tokens;  // summed over its runs
};

struct AttendRunDesc {  // a piece of one span, for one KV head
  uint64_t k_off;       // element offset of its first key row in the pool
  uint64_t v_off;       // element offset of its first value row
  uint32_t len;         // tokens
  // Head-shared runs (PlanAttend: a dense layer's heads read one run table): elements between
  // consecutive KV heads' rows, so item task t reads k_off + t x head_stride (and v_off + the
  // same); 0 otherwise.
  uint32_t head_stride;
};

// What the tree search of LaunchSearchAttend leaves per task for the span attention, which
// builds each split's runs from it (docs/architecture.md, "Device tree and GPU search"). The
// task's entries are the selected chunks in selection order (`nsel`, the ids in the search's
// selection slots) followed by its fixed pieces (the sink and recent-window pieces, which do not
// depend on the selection, and the tail in pieces of kTailPieceTokens); split s of S takes the
// entries s, s + S, s + 2S, ... A selected chunk's entry is its tokens outside the sink and
// recent pieces (the search counts them likewise).
inline constexpr uint32_t kTailPieceTokens = 16;

#if defined(__CUDACC__)
#define KVMEM_PLAN_HD __host__ __device__
#else
#define KVMEM_PLAN_HD
#endif

// A sealed chunk of `tokens` starting at token `start`, against the sinks [0, sink_tokens) and the
// recent window [recent_from, ...): its sink part is [0, a), its recent part [b, tokens) (b =
// tokens when it ends at or before recent_from). What a selected chunk adds to them is [a, b),
// empty when b <= a (the search's fixed pieces and the attention's runs both use this).
struct ChunkEdges {
  uint32_t a, b;
  KVMEM_PLAN_HD uint32_t selected() const { return b > a ? b - a : 0u; }
};
KVMEM_PLAN_HD inline ChunkEdges EdgesOf(uint64_t start, uint32_t tokens, uint64_t sink_tokens,
                                        uint64_t recent_from) {
  const uint64_t in_sink = start < sink_tokens ? sink_tokens - start : 0;
  const uint32_t a = in_sink < tokens ? static_cast<uint32_t>(in_sink) : tokens;
  const uint32_t b = start + tokens > recent_from
                         ? static_cast<uint32_t>((recent_from > start ? recent_from : start) - start)
                         : tokens;
  return {a, b};
}
struct SearchRunHeader {
  const uint64_t* chunk_block;   // the task's chunk K/V block offsets (SearchTaskDesc)
  const uint32_t* chunk_tokens;  // its tree's chunk sizes and starts
  const uint64_t* chunk_start;
  const AttendRunDesc* fixed;    // entries - nsel fixed pieces, resolved
  uint64_t recent_from;
  uint32_t sink_tokens;
  uint32_t kv_head, kv_heads;
  uint32_t nsel;     // selected chunks
  uint32_t entries;  // nsel + fixed pieces; 0 when the search failed (status != 0)
  uint32_t pad;
};

// Partial of one split: m[G], l[G] (log2 domain), then from PartialAccOffset acc[G][D]
// (unnormalised), fp32. Slots are multiples of 4 floats so acc rows take 16-byte loads.
inline constexpr uint32_t PartialAccOffset(uint32_t group) { return (2 * group + 3) / 4 * 4; }
inline constexpr uint32_t PartialFloats(uint32_t group, uint32_t head_dim) {
  return PartialAccOffset(group) + group * head_dim;
}

}  // namespace kvmem::kernels::detail
