// Budgeted cluster-tree search over a flat copy of the tree (what the device holds), and its
// CPU reference. Selects the same chunks as index::ClusterTree::SearchBudget with the default
// options (best-first traversal, mean-query GQA aggregation, soft scores), computed without a
// heap so it runs level-synchronously on a GPU.
//
// Why a sort reproduces best-first. Best-first pushes each child with its own soft score s and
// pops the largest. For an item x on the path root → a1 → … → x with scores (s1, …, sx), let
// chain(x) be the path's right-to-left minima, left to right: s_i is in the chain when it is
// below every later score. chain(x) is increasing; its first element is the path's bottleneck
// min(s1..sx). Items pop in descending lexicographic order of their chains: an item cannot pop
// before its bottleneck node, everything in the heap when that node pops scores at most its
// score, and below it the same argument repeats on the suffix. So the chunks are offered in the
// order of sort(chunks by chain, descending; ties by lower chunk id), and the budget scan
// (fit, skip misfits, stop after max_consecutive_misfits or a full budget) is the CPU's.
// Scores use the same float operations in the same order as the CPU (8 interleaved partial
// sums), so the ranking agrees bit for bit; equal scores of different items (measure zero on
// real data) may order differently than the heap would.
//
// Layout (docs/architecture.md, "Device tree"): nodes in breadth-first order (node 0 = the root,
// every level contiguous, a node's children contiguous in the next level); a leaf's children are
// a contiguous range of `leaf_chunks`; chunk summaries are indexed by chunk id and only ever
// appended, so a mirror uploads new chunks once and re-uploads only the node arrays and the
// leaf order when the tree changes.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace kvmem::kernels {

// Node levels below the root the device search handles (ClusterTreeOptions::levels <= 3).
constexpr uint32_t kTreeSearchMaxLevels = 3;
constexpr uint32_t kTreeNone = 0xffffffffu;
constexpr uint32_t kTreeLeafBit = 0x80000000u;  // in FlatTreeNode::child_count

struct FlatTreeNode {
  float radius;
  uint32_t parent;       // kTreeNone for the root
  uint32_t child_begin;  // first child node, or (leaf) first index into leaf_chunks
  uint32_t child_count;  // number of children, | kTreeLeafBit when they are chunks
  uint32_t tokens;       // tokens below (saturates at 2^32 - 1)
};

// One (layer, KV head) tree. Pointers are host memory for the CPU reference, device memory
// for the CUDA search. Centroids are bfloat16 values on the host too (index::ClusterTree stores
// them so), so a DeviceTree's view holds them as bfloat16 bits in the search's interleaved order
// (DeviceTree::Sync; node_rows_bf16 / chunk_rows_bf16, the float pointers null there): both
// searches multiply the same numbers and score bit-identically, the device reading half the bytes.
struct FlatTreeView {
  uint32_t num_nodes = 0;
  uint32_t num_chunks = 0;
  uint32_t num_levels = 0;  // node levels including the root (1 = flat: root → chunks)
  uint32_t level_begin[kTreeSearchMaxLevels + 2] = {};  // nodes of level l: [lb[l], lb[l+1])
  const float* node_centroids = nullptr;                // [num_nodes][head_dim] (host)
  const uint16_t* node_rows_bf16 = nullptr;             // the same as bf16 bits (device mirror)
  const FlatTreeNode* nodes = nullptr;                  // [num_nodes]
  const uint32_t* leaf_chunks = nullptr;                // [num_chunks] chunk ids by leaf
  const float* chunk_centroids = nullptr;               // [num_chunks][head_dim] by chunk id (host)
  const uint16_t* chunk_rows_bf16 = nullptr;            // the same as bf16 bits (device mirror)
  const float* chunk_radius = nullptr;                  // [num_chunks] by chunk id
  const uint32_t* chunk_tokens = nullptr;               // [num_chunks] by chunk id
  const uint64_t* chunk_start = nullptr;                // [num_chunks] first token, by chunk id
};

// The node rows a holder of an earlier export (a device mirror, cuda::DeviceTree::rows_held())
// has: their stamps by flat position (FlatTree::node_row_stamps) and the lineage they are of.
struct NodeRowsHeld {
  uint64_t lineage = 0;
  std::span<const uint64_t> stamps;
};

// Host copy of a tree in that layout (index::ClusterTree::ExportFlat fills it). The chunk
// arrays hold chunks [chunks_from, num_chunks) only, so a mirror that already holds the older
// (immutable) chunk summaries exports just the new ones.
struct FlatTree {
  uint32_t head_dim = 0;
  uint32_t num_levels = 0;
  uint32_t num_chunks = 0;
  uint32_t chunks_from = 0;
  uint64_t chunks_epoch = 0;  // changes when the tree's chunk summaries were replaced (Build)
  std::vector<uint32_t> level_begin;  // [num_levels + 1]
  std::vector<float> node_centroids;  // [nodes][head_dim], bfloat16 values
  // Per node: a stamp that changes whenever its centroid is written, unique within `lineage`
  // (index::ClusterTree), so a mirror uploads only the rows whose stamps it does not hold.
  // Empty: no stamps (every row goes up).
  std::vector<uint64_t> node_row_stamps;
  uint64_t lineage = 0;
  // A partial export (ExportFlat against a NodeRowsHeld of the same lineage): node_centroids
  // holds only the rows at the flat positions in node_rows_at (ascending), those whose stamps
  // the holder lacks; it completes only the holder's rows. false: every row, in flat order.
  bool node_rows_partial = false;
  std::vector<uint32_t> node_rows_at;
  // The exporter's bookkeeping for exporting into the same object again (ClusterTree: the
  // tree's shape this export has, its node id at each flat position and each node's flat
  // position), so that the next export of the same shape applies the inserts since.
  uint64_t shape = ~0ull;
  std::vector<uint32_t> flat_node;
  std::vector<uint32_t> node_flat;
  // The tree version this export shows, and when it was made by applying inserts to an export
  // of version delta_from (~0: it was not), what changed since: node records at the flat
  // positions of nodes_changed ([first, end) runs) and leaf_chunks from leaf_chunks_changed_from
  // on. A mirror that holds version delta_from uploads just those (cuda::DeviceTree::Sync).
  uint64_t version = ~0ull;
  uint64_t delta_from = ~0ull;
  std::vector<std::pair<uint32_t, uint32_t>> nodes_changed;
  uint32_t leaf_chunks_changed_from = 0;
  std::vector<FlatTreeNode> nodes;
  std::vector<uint32_t> leaf_chunks;
  std::vector<float> chunk_centroids;  // [num_chunks - chunks_from][head_dim], bfloat16 values
  std::vector<float> chunk_radius;
  std::vector<uint32_t> chunk_tokens;
  std::vector<uint64_t> chunk_start;

  // A view of the host vectors; needs chunks_from == 0, every node row (not node_rows_partial)
  // and num_levels <= kTreeSearchMaxLevels + 1.
  FlatTreeView View() const;
};

struct TreeSearchParams {
  uint32_t budget_tokens = 0;
  uint32_t skip_tokens_below = 0;  // sinks: counted tokens of a chunk start here
  uint32_t max_consecutive_misfits = 16;
  float node_radius_weight = 0.15f;
  float chunk_radius_weight = 0.1f;
};

// The chunks of one KV head, in the order they were accepted, with their soft scores, and the
// counted tokens (not below skip_tokens_below) they hold.
struct TreeSelection {
  std::vector<uint32_t> chunks;
  std::vector<float> scores;
  uint64_t tokens = 0;
  uint64_t nodes_scored = 0;  // node and chunk summaries whose score was computed
};

// CPU reference: scores every node and chunk, sorts by chain, scans. group_queries is fp32
// [group][head_dim]. InvalidArgument on a tree deeper than kTreeSearchMaxLevels.
Status TreeSearchCpu(const FlatTreeView& tree, const float* group_queries, uint32_t group,
                     uint32_t head_dim, const TreeSearchParams& params, TreeSelection* out);

}  // namespace kvmem::kernels
