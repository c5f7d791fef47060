// Chunk summaries: what the cluster tree keeps per (chunk, layer, KV head) instead of the keys.
//
// From a chunk's keys k_1..k_n (one KV head, [n][D]): centroid c = mean key, radius
// r = max ‖k_i − c‖ and max key norm max ‖k_i‖. Any query q then has
//   q·k_i ≤ min(q·c + ‖q‖·r, ‖q‖·max_key_norm)   for every key of the chunk,
// which is all the index needs to rank or prune the chunk without reading its keys.
//
// The centroid is rounded to bfloat16 values (held as float): a device mirror of the tree keeps
// chunk centroids in two bytes each with the very values the CPU search multiplies, so both
// compute bit-identical scores (kernels/tree_search.h). The radius is measured from the centroid
// as stored in double precision and rounded up, so the bound holds for the stored numbers, not
// only in exact arithmetic.
#pragma once

#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace kvmem::index {

struct ChunkSummary {
  std::vector<float> centroid;  // [head_dim], mean key rounded to bfloat16 values
  float radius = 0.f;           // max ‖k − centroid‖ over the chunk's keys
  float max_key_norm = 0.f;     // max ‖k‖ over the chunk's keys
};

// Summarises `tokens` keys of one head stored as float [tokens][head_dim] (row-major).
// InvalidArgument when tokens or head_dim is 0, keys is null, or a key is NaN/infinite.
Result<ChunkSummary> SummarizeKeys(const float* keys, uint32_t tokens, uint32_t head_dim);

// Same from a raw block in the store's element type: row t of the head starts at element
// t * row_stride_elems (row_stride_elems >= head_dim; pass head_dim for a dense [tokens][D]
// run, as in the kernels' KV block layout).
Result<ChunkSummary> SummarizeBlock(const void* keys, DType dtype, uint32_t tokens,
                                    uint32_t head_dim, uint64_t row_stride_elems);

}  // namespace kvmem::index
