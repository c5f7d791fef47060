// Index-side kernels over POD views: chunk summaries, node bounds, exact chunk max-scores,
// top-k selection and pooled block scores for retrieval heads. Each view is used as-is by the
// CPU reference here and by the CUDA version in kernels/cuda_ops.h (device pointers there).
//
// Keys are read from the KV pool in the layout of kernels/attention.h (KVSpan addressing):
// keys of head h, token t of a block are at pool + offset + (h * stride_tokens + t) * head_dim.
// Scores and bounds are raw inner products q·k (no softmax scale). Queries are fp32.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"
#include "kernels/attention.h"

namespace kvmem::kernels {

// ---- Chunk summary ---------------------------------------------------------------------------
// Per (chunk, KV head): centroid c = mean key, radius r = max ‖k − c‖ (measured from the stored
// fp32 centroid), max key norm max ‖k‖. Both r and the norm are rounded up by a relative
// kSummaryRoundUp so that they bound the stored numbers despite fp32 rounding on either backend.
// A chunk with no tokens gets c = 0, r = 0, norm = 0. (index::SummarizeKeys, the daemon's
// summaries, rounds c to bfloat16 values first; index::ClusterTree stores any summary's centroid
// so, growing r by the rounding's shift, so this op's output feeds a tree as it is.)
constexpr float kSummaryRoundUp = 1e-5f;

struct ChunkSummaryView {
  const void* pool;
  DType kv_dtype;
  uint32_t kv_heads;
  uint32_t head_dim;
  const KVSpan* chunks;  // [num_chunks]; keys of [begin, end) of each head
  uint32_t num_chunks;
  float* centroids;      // [num_chunks][kv_heads][head_dim]
  float* radii;          // [num_chunks][kv_heads]
  float* max_key_norms;  // [num_chunks][kv_heads], or nullptr
};

void ChunkSummaryCpu(const ChunkSummaryView& v);

// ---- Node bounds ----------------------------------------------------------------------------
// For pair i = (node n, query group g): bound[i] = max over the group's queries q of
//   q·c_n + ‖q‖·r_n,
// an upper bound of q·k for every key k below the node (Cauchy–Schwarz). A level-synchronous
// tree search calls this once per level on the candidate (node, group) pairs.
struct NodeBoundsView {
  const float* centroids;  // [num_nodes][head_dim]
  const float* radii;      // [num_nodes]
  const float* queries;    // [num_groups][group_size][head_dim], fp32
  uint32_t group_size;     // query heads per KV head (GQA group)
  uint32_t head_dim;
  const uint32_t* pair_node;   // [num_pairs]
  const uint32_t* pair_group;  // [num_pairs]
  uint32_t num_pairs;
  float* bounds;  // [num_pairs]
};

void NodeBoundsCpu(const NodeBoundsView& v);

// ---- Exact chunk max-scores -----------------------------------------------------------------
// For item i: score[i] = max over tokens t of chunks[i] (keys of head item_head[i]) and over
// the queries q of group item_group[i] of q·k_t. An empty chunk scores -inf.
struct ChunkMaxScoresView {
  const void* pool;
  DType kv_dtype;
  uint32_t kv_heads;
  uint32_t head_dim;
  const float* queries;  // [num_groups][group_size][head_dim], fp32
  uint32_t group_size;
  const KVSpan* chunks;        // [num_items]
  const uint32_t* item_head;   // [num_items] KV head of the item
  const uint32_t* item_group;  // [num_items] query group of the item
  uint32_t num_items;
  float* scores;  // [num_items]
};

void ChunkMaxScoresCpu(const ChunkMaxScoresView& v);

// ---- Token logits (exact rescoring of search candidates) ------------------------------------
// For item i (KV head item_head[i], tokens [begin, end) of span spans[i]) and each query head g
// of that KV head's GQA group (q_heads / kv_heads of them): the scaled logit
//   logits[(token_prefix[i] + t - begin) * G + g] = scale · q[item_head[i] * G + g] · k_t.
// The CPU reference sums each dot product in double and rounds the scaled result to float; the
// host pool's TokenLogitsBlocked and the CUDA version sum in float.
struct TokenLogitsView {
  const void* pool;
  DType kv_dtype;
  uint32_t kv_heads;
  uint32_t q_heads;
  uint32_t head_dim;
  float scale;                   // usually 1/sqrt(head_dim)
  const float* q;                // [q_heads][head_dim], fp32
  const KVSpan* spans;           // [num_items]
  const uint32_t* item_head;     // [num_items]
  const uint32_t* token_prefix;  // [num_items + 1], exclusive prefix of the items' token counts
  uint32_t num_items;
  uint32_t total_tokens;  // == token_prefix[num_items] (known on the host: sizes the grid)
  float* logits;          // [total_tokens][q_heads / kv_heads]
};

void TokenLogitsCpu(const TokenLogitsView& v);
// The host pool's version (kernels/cpu/attention_fast.cc): float dot products of eight partial
// sums, AVX2 + FMA when the CPU has them (isa as for AttendCpuBlocked); within float rounding
// of TokenLogitsCpu, several times faster.
void TokenLogitsBlocked(const TokenLogitsView& v, CpuIsa isa = CpuIsa::kAuto);

// ---- Top-k ----------------------------------------------------------------------------------
// Per row r of scores [num_rows][n]: the k largest, in order of score descending, ties broken
// by the smaller index (so the result is deterministic). NaN scores rank below every number.
// k <= n and k <= kTopKMax.
constexpr uint32_t kTopKMax = 2048;

struct TopKView {
  const float* scores;  // [num_rows][n]
  uint32_t num_rows;
  uint32_t n;
  uint32_t k;
  uint32_t* indices;  // [num_rows][k]
  float* values;      // [num_rows][k], or nullptr
};

Status ValidateTopKView(const TopKView& v);
void TopKCpu(const TopKView& v);

// ---- Pooled block scores (retrieval heads) --------------------------------------------------
// A retrieval KV head h scores its context in blocks of block_tokens tokens with the mean query
// of its GQA group, q̄ = mean of q[h*G .. h*G+G). The context is the concatenation of `spans`
// (same token order for every head); block j covers tokens [j*B, min((j+1)*B, total)).
//   kMax:  score = max over the block's tokens of q̄·k  (default; a block with one strong key
//          ranks high, as needed to find needles)
//   kMean: score = mean over the block's tokens of q̄·k = q̄·(mean key of the block), the
//          mean-pooled-keys score of LycheeDecode's fast path.
enum class BlockPool : uint8_t { kMax = 0, kMean = 1 };

struct PooledBlockScoresView {
  const void* pool;
  DType kv_dtype;
  uint32_t kv_heads;
  uint32_t q_heads;
  uint32_t head_dim;
  const float* q;               // [q_heads][head_dim], fp32
  const KVSpan* spans;          // [num_spans]
  const uint32_t* span_prefix;  // [num_spans + 1], exclusive prefix of span lengths
  uint32_t num_spans;
  uint32_t total_tokens;  // == span_prefix[num_spans] (known on the host: sizes the grid)
  uint32_t block_tokens;  // B, e.g. 64
  BlockPool mode;
  const uint32_t* heads;  // [num_heads] KV heads to score (the retrieval heads)
  uint32_t num_heads;
  float* scores;  // [num_heads][PooledNumBlocks(total_tokens, block_tokens)]
};

inline uint32_t PooledNumBlocks(uint32_t total_tokens, uint32_t block_tokens) {
  return (total_tokens + block_tokens - 1) / block_tokens;
}

void PooledBlockScoresCpu(const PooledBlockScoresView& v);

}  // namespace kvmem::kernels
