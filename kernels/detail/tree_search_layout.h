// Device-side record of a SearchAttendPlan (kernels/cuda_ops.h): one per (problem, KV head).
// Shared by the host planner and the CUDA kernel.
#pragma once

#include <cstdint>

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
};

}  // namespace kvmem::kernels::detail
