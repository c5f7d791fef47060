// Device-side record of a SearchAttendPlan (kernels/cuda_ops.h): one per (problem, KV head).
// Shared by the host planner and the CUDA kernel.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "kernels/tree_search.h"

namespace kvmem::kernels::detail {

struct SearchTaskDesc {
  FlatTreeView tree;             // device pointers
  const uint64_t* chunk_block;   // [num_chunks] element offset of each chunk's K/V block
  const void* q;                 // the group's first query row
  uint64_t node_chain;           // float offset of its scratch [tree.num_nodes][4]
  TreeSearchParams params;
  uint64_t recent_from;
  uint64_t tail_k_off;           // element offset of this head's first tail key / value row
  uint64_t tail_v_off;
  uint32_t tail_len;
  uint32_t sink_tokens;
  uint32_t kv_heads;
  uint32_t kv_head;
  uint32_t first_item;           // its splits are items [first_item, first_item + num_splits)
  uint32_t num_splits;
  uint32_t split_tokens;
  uint32_t group;
  // A decode step's new K and V rows of this head (SearchAttendProblem::new_k / new_v), copied
  // by the search to their places in the tail (its last row) before the attention reads it;
  // null when the step appends nothing.
  const uint8_t* new_k;
  const uint8_t* new_v;
  uint8_t* new_k_dst;
  uint8_t* new_v_dst;
  uint32_t new_row_bytes;  // a multiple of 16
};

// A centroid row as the device search reads it (DeviceTree::Sync writes it, ScoreRows reads it):
// bfloat16 bits, element 8(8q + k) + j at 64q + 8j + k (q < D / 64, j < 8, k < 8), so lane j of
// an 8-lane group reads its elements 8m + j in order of m, eight per 16-byte load, and the
// group's loads cover 128 contiguous bytes. D is a multiple of 64. False (out partly written)
// when a value is not a bfloat16 value: the CPU search would multiply other numbers.
inline bool InterleaveRowBF16(const float* src, uint32_t D, uint16_t* out) {
  // A float is a bfloat16 value iff its low 16 bits are zero and it is not a NaN; the value's
  // bits are then its high 16 (a bit test per element: the session's mirror syncs convert every
  // node row of a tree that changed).
  uint32_t low = 0;
  bool nan = false;
  for (uint32_t q = 0; q < D / 64; ++q) {
    for (uint32_t j = 0; j < 8; ++j) {
      for (uint32_t k = 0; k < 8; ++k) {
        uint32_t u;
        std::memcpy(&u, &src[8 * (8 * q + k) + j], 4);
        low |= u & 0xffffu;
        nan |= (u & 0x7fffffffu) > 0x7f800000u;
        out[64 * q + 8 * j + k] = static_cast<uint16_t>(u >> 16);
      }
    }
  }
  return low == 0 && !nan;
}

}  // namespace kvmem::kernels::detail
