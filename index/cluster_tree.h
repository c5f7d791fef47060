// ClusterTree: the hierarchical chunk index of one (session, layer, KV head).
//
//   root → coarse units → fine clusters → chunks        (levels = 2, the default)
//
// Built in bulk by recursive spherical k-means over chunk centroids; grown one sealed chunk at a
// time by lazy Insert(); loosened subtrees are rebuilt by Maintain(), which the caller runs off
// the request path. Every node n holds a centroid c_n, a radius r_n and a max key norm M_n with
//
//   ‖k − c_n‖ ≤ r_n  and  ‖k‖ ≤ M_n   for every key k of every chunk below n        (*)
//
// kept from children by the triangle inequality (r_n ≥ ‖c_child − c_n‖ + r_child), so keys are
// never re-read. Hence for any query q and key k below n:
//
//   q·k ≤ UB(q, n) = min(q·c_n + ‖q‖·r_n, ‖q‖·M_n)
//
// and the bound of a child never exceeds its parent's (its ball lies inside the parent's), so
// best-first search by UB meets chunks in descending bound order.
//
// Every centroid, node and chunk, is stored as bfloat16 values (held as float): the GPU mirror
// (kernels/tree_search.h) keeps them in two bytes each and multiplies the same numbers as the
// CPU search, and each radius is measured from the stored (rounded) centroid, so (*) holds for
// what is stored.
//
// Chunk ids are dense uint32 in seal order; chunk i covers tokens [start(i), start(i) + tokens(i))
// with start(0) = 0 and no gaps. Not thread-safe: one thread per tree (sessions are sharded).
#pragma once

#include <atomic>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "index/summary.h"
#include "kernels/tree_search.h"

namespace kvmem::index {

// Where exact search reads a chunk's keys (the daemon implements it over its store).
class ChunkKeySource {
 public:
  virtual ~ChunkKeySource() = default;
  // Writes the keys of `chunk` for this tree's (layer, KV head) as float [tokens][head_dim]
  // into `out`, which has room for exactly that. A non-OK status aborts the search with it.
  virtual Status ReadKeys(uint32_t chunk, float* out) const = 0;
};

struct ClusterTreeOptions {
  // Cluster levels between the root and the chunks: 2 = coarse units → fine clusters; 1 = flat
  // fine clusters; 3 adds a middle level. Subtrees smaller than fine_cluster_chunks stop early.
  // Default: 2.
  uint32_t levels = 2;
  // Most children of the root (LycheeCluster's coarse units). Default: 64.
  uint32_t max_coarse_units = 64;
  // Most children of any other cluster node. Default: 64.
  uint32_t max_fanout = 64;
  // Target chunks per fine cluster. The fan-out of each level is chosen so that the product of
  // fan-outs ≈ chunks / fine_cluster_chunks, balanced over the levels. Default: 16.
  uint32_t fine_cluster_chunks = 16;
  // Spherical k-means iterations per split. Default: 8.
  uint32_t kmeans_iterations = 8;
  // A split of more than this many chunks runs k-means on a deterministic sample of this size,
  // then assigns every chunk once. Bounds build time at 1M tokens. Default: 8192.
  uint32_t kmeans_sample = 8192;
  // With fewer chunks than this the tree stays flat (root → chunks); Maintain() clusters it
  // once it grows past. Default: 64.
  uint32_t min_chunks_to_cluster = 64;
  // A subtree needs a repair once its chunk count reaches rebuild_growth × its count when it
  // was built (a fine cluster only once it also holds fine_cluster_chunks). Default: 2.0.
  float rebuild_growth = 2.0f;
  // ... or once its radius exceeds rebuild_radius_inflation × its radius when it was built.
  // Default: 1.5.
  float rebuild_radius_inflation = 1.5f;
  // Seed of the k-means initialisation (k-means++); builds are deterministic. Default: 0x6b76.
  uint64_t seed = 0x6b76;
};

// How one KV head's GQA group of G query vectors turns into one bound per node.
enum class GroupAggregation : uint8_t {
  // max over the group's heads of UB(q_g, n): a true bound on "max over heads of q·k". G dot
  // products per node. The only choice exact search accepts.
  kMaxBound = 0,
  // UB(q̄, n) for the mean query q̄ (LycheeDecode's pooling): one dot product per node, a bound
  // on the group-mean score only.
  kMeanQuery = 1,
};

struct SearchCost {
  uint64_t nodes_visited = 0;  // summaries (clusters and chunks) whose bound was evaluated
  uint64_t keys_read = 0;      // key vectors read through the ChunkKeySource (exact search)
  uint64_t bytes_read = 0;     // summary bytes (fp32 centroid + radius + norm) + key bytes (fp32)
};

struct Selection {
  std::vector<uint32_t> chunks;  // in descending score order
  std::vector<float> scores;     // exact max score (SearchExact) or ranking score (SearchBudget)
  uint64_t tokens = 0;           // tokens of the selected chunks not below skip_tokens_below
  SearchCost cost;
};

// How budgeted search walks the tree.
enum class BudgetTraversal : uint8_t {
  // LycheeCluster: rank the root's children by bound, keep the best until they hold
  // overfetch × budget tokens, expand only those, repeat per level; then rank the chunks of the
  // kept fine clusters and fill the budget. Cost ~ fan-out × kept nodes, independent of how
  // loose the bounds are.
  kLevelwise = 0,
  // Global best-first by bound: pops chunks in exactly the order a flat scan of all chunk bounds
  // gives, but may expand most of the tree when radii are loose (high-dimensional keys).
  kBestFirst = 1,
};

struct BudgetSearchOptions {
  // Default: kBestFirst (with the soft scores below; measured against kLevelwise in bench/).
  BudgetTraversal traversal = BudgetTraversal::kBestFirst;
  // kLevelwise only: tokens kept per level as a multiple of the budget (>= 1). Default: 2.0.
  float overfetch = 2.0f;
  // Default: kMeanQuery: same recall as kMaxBound within noise on our data, one dot product
  // per node instead of G (see docs/architecture.md, "Index").
  GroupAggregation aggregation = GroupAggregation::kMeanQuery;
  // Budgeted search ranks by the soft score q·c + w·‖q‖·r (aggregated over the group like the
  // bound): w = 1 is the upper bound UB, w = 0 the centroid (mean-key) score. Keys deviate from
  // a centroid in every direction, so their spread along q is ≈ r/√D_eff, far below r: the full
  // bound over-rates spread-out nodes. Node weight (clusters) and chunk weight are separate.
  // With best-first, node weight > chunk weight keeps nodes optimistic enough to be opened.
  // Chosen by measurement (bench/, docs/architecture.md). Default: 0.15 / 0.1.
  float node_radius_weight = 0.15f;
  float chunk_radius_weight = 0.1f;
  // Tokens below this (the sinks) are attended anyway: chunks entirely below are skipped and a
  // chunk straddling it counts only its tokens at or above it. Default: 0.
  uint32_t skip_tokens_below = 0;
  // Search stops after this many consecutive chunks that did not fit the remaining budget.
  // Default: 16.
  uint32_t max_consecutive_misfits = 16;
};

struct TreeStats {
  uint32_t depth = 0;                     // levels of nodes above the chunks (root = 1)
  std::vector<uint32_t> nodes_per_level;  // [0] = 1 (root), ..., last = chunks
  uint32_t chunks = 0;
  uint64_t tokens = 0;
  uint64_t inserts_since_build = 0;
  uint64_t subtree_rebuilds = 0;
  bool needs_maintenance = false;
  uint64_t memory_bytes = 0;  // approximate heap bytes held by the tree
};

class ClusterTree {
 public:
  // An empty tree: searches return nothing, Insert() works, Build() replaces the content.
  explicit ClusterTree(uint32_t head_dim, ClusterTreeOptions options = {});

  // OK when levels in [1, 8], fan-outs >= 2, fine_cluster_chunks >= 1, growth > 1, inflation > 1.
  static Status Validate(const ClusterTreeOptions& options);

  // Replaces the tree with chunks 0..n-1: summaries[i] and token_counts[i] (>= 1) of chunk i.
  // InvalidArgument on size mismatch, wrong centroid length, non-finite values or zero tokens;
  // the tree is unchanged on error.
  Status Build(std::span<const ChunkSummary> summaries, std::span<const uint32_t> token_counts);

  // Adds newly sealed chunk `chunk` (must equal num_chunks(): ids are dense in seal order) to
  // its nearest fine cluster. O(depth × D + fan-out × D). The bound stays valid; the tree may
  // loosen until Maintain() runs.
  Status Insert(uint32_t chunk, const ChunkSummary& summary, uint32_t tokens);

  // True when a subtree has grown or loosened past the thresholds in the options. O(nodes) the
  // first time after a change (Build, Insert, Maintain: version()), then O(1): the daemon asks
  // after every reply, for every tree of the session (KVMEM_TREE_MAINT_CACHE=off scans every
  // time, for A/B runs).
  bool NeedsMaintenance() const;
  // Repairs up to max_subtrees stale subtrees, highest first: a stale fine cluster is split in
  // two beside itself while its parent has room; when the parent is full, the parent splits
  // beside itself (2-means over its children) while the grandparent has room, else it is
  // rebuilt; an inner node that grew rebuild_growth× splits beside itself while its parent has
  // room; other stale nodes are rebuilt (a stale root rebuilds everything and counts as one).
  // Returns how many were repaired. Cost: 2-means over one node's children for a split, k-means
  // over every chunk below for a rebuild.
  uint32_t Maintain(uint32_t max_subtrees = UINT32_MAX);

  // Exact top-k chunks by score(chunk) = max over the chunk's keys k and the group's heads g of
  // q_g·k, ties broken by lower chunk id: the same list as a brute-force scan. group_queries is
  // [G][head_dim]. Reads keys only of chunks whose bound reaches the k-th score.
  // InvalidArgument on shape or non-finite queries; a ReadKeys error is returned as is.
  Result<Selection> SearchExact(std::span<const float> group_queries, uint32_t k,
                                const ChunkKeySource& keys) const;

  // Chunks in descending ranking order while they fit in budget_tokens, found by the traversal
  // in the options. Reads summaries only. InvalidArgument on shape or non-finite queries.
  Result<Selection> SearchBudget(std::span<const float> group_queries, uint32_t budget_tokens,
                                 const BudgetSearchOptions& options = {}) const;

  // Checks (*) and the structure (parents, token counts, every chunk exactly once). With `keys`
  // also checks every real key against its chunk and every ancestor. Internal on violation.
  Status CheckInvariants(const ChunkKeySource* keys = nullptr) const;

  TreeStats Stats() const;

  // Writes the tree in the flat breadth-first layout of kernels/tree_search.h (what the device
  // search reads) into `out`, reusing its vectors. The chunk arrays get chunks
  // [chunks_from, num_chunks()) (chunk summaries never change between Builds; out->chunks_epoch
  // tells a mirror when they were replaced and it must start from 0).
  // With `held` of this tree's lineage (a mirror's rows), the export is partial
  // (FlatTree::node_rows_partial): of the node rows only those whose stamps `held` lacks at their
  // flat positions, so an insert's export carries its path's rows, not the whole tree's.
  void ExportFlat(kernels::FlatTree* out, uint32_t chunks_from = 0,
                  const kernels::NodeRowsHeld* held = nullptr) const;
  uint64_t chunks_epoch() const { return build_epoch_; }
  // Changes on every Build, Insert and repairing Maintain: a mirror re-exports when it moved.
  uint64_t version() const { return version_; }

  uint32_t head_dim() const { return head_dim_; }
  uint32_t num_chunks() const { return static_cast<uint32_t>(chunk_tokens_.size()); }
  uint64_t total_tokens() const { return total_tokens_; }
  uint32_t chunk_tokens(uint32_t chunk) const { return chunk_tokens_[chunk]; }
  uint64_t chunk_start(uint32_t chunk) const { return chunk_start_[chunk]; }
  // The summary the tree holds for `chunk` (< num_chunks()): what a snapshot persists, and what
  // Build() takes back after a restart.
  ChunkSummary chunk_summary(uint32_t chunk) const;
  const ClusterTreeOptions& options() const { return options_; }

 private:
  struct Node {
    uint32_t parent = kNone;
    uint32_t level = 0;         // root = 0
    bool leaf = true;           // children are chunk ids (else node ids)
    bool live = true;
    std::vector<uint32_t> children;
    float radius = 0.f;
    float max_key_norm = 0.f;
    uint64_t tokens = 0;        // tokens below (centroid weights)
    uint32_t chunks_below = 0;
    uint32_t built_chunks = 0;  // chunks_below when this subtree was last (re)built
    float built_radius = 0.f;   // radius then
    uint64_t row_stamp = 0;     // a fresh row_clock_ value each time the centroid is written
  };
  static constexpr uint32_t kNone = 0xffffffffu;

  const float* node_centroid(uint32_t n) const { return &node_centroids_[size_t{n} * head_dim_]; }
  float* node_centroid(uint32_t n) { return &node_centroids_[size_t{n} * head_dim_]; }
  // Chunk centroids are bfloat16 values, stored as their bits (half the bytes of floats).
  const uint16_t* chunk_centroid(uint32_t c) const {
    return &chunk_centroids_[size_t{c} * head_dim_];
  }
  void ChunkCentroidTo(uint32_t c, float* out) const;  // the centroid's values as floats

  uint32_t NewNode(uint32_t parent, uint32_t level);
  void FreeSubtree(uint32_t n, bool keep_root);
  // Fills node n (already allocated, children cleared) with the given chunks, splitting
  // recursively while levels remain.
  void BuildSubtree(uint32_t n, std::vector<uint32_t> chunks, uint32_t remaining_levels);
  // Centroid (token-weighted mean of chunk centroids), radius and norm of n from its children.
  void Summarize(uint32_t n);
  // rebuild_growth× its chunk count at its last build.
  bool Grown(const Node& node) const;
  bool Stale(uint32_t n) const;
  void RebuildSubtree(uint32_t n);
  // Splits node n (non-root, >= 2 children) into n and a new sibling by 2-means over its
  // children's centroids (chunks of a leaf, nodes of an inner node): the children move, nothing
  // below them is rebuilt.
  void SplitBeside(uint32_t n);
  // Groups `chunks` into at most k clusters (spherical k-means on mean-centred centroids).
  // k-means groups of `ids` by their rows in points[ids.size()][head_dim] (clobbered).
  std::vector<std::vector<uint32_t>> GroupPoints(float* points, const std::vector<uint32_t>& ids,
                                                 uint32_t k, uint32_t salt) const;
  std::vector<std::vector<uint32_t>> SplitChunks(const std::vector<uint32_t>& chunks, uint32_t k,
                                                 uint32_t salt) const;
  void RefreshAncestorRadii(uint32_t n);
  void CollectChunks(uint32_t n, std::vector<uint32_t>* out) const;
  Status ValidateQueries(std::span<const float> q, uint32_t* group) const;
  // Tokens of chunk c not below `skip` (the sinks).
  uint64_t CountedTokens(uint32_t c, uint64_t skip) const;

  uint32_t head_dim_;
  ClusterTreeOptions options_;
  // Chunks, indexed by chunk id.
  std::vector<uint16_t> chunk_centroids_;  // [chunks][head_dim] bfloat16 bits
  std::vector<float> chunk_radius_;
  std::vector<float> chunk_max_norm_;
  std::vector<uint32_t> chunk_tokens_;
  std::vector<uint64_t> chunk_start_;
  std::vector<uint32_t> chunk_parent_;  // leaf node holding the chunk
  uint64_t total_tokens_ = 0;
  // Nodes; node 0 is the root. Freed slots are reused.
  std::vector<Node> nodes_;
  std::vector<float> node_centroids_;  // [nodes][head_dim]
  std::vector<uint32_t> free_nodes_;
  uint64_t inserts_since_build_ = 0;
  uint64_t subtree_rebuilds_ = 0;
  uint64_t version_ = 0;
  uint64_t build_epoch_ = 0;  // Build() replaces chunk summaries: exports start over
  // NeedsMaintenance() of version v: (v << 1) | answer; ~0 = not asked yet. Atomic (relaxed)
  // because const readers may ask concurrently; copies carry the cached answer along.
  struct MaintenanceCache {
    std::atomic<uint64_t> v{~uint64_t{0}};
    MaintenanceCache() = default;
    MaintenanceCache(const MaintenanceCache& o) : v(o.v.load(std::memory_order_relaxed)) {}
    MaintenanceCache& operator=(const MaintenanceCache& o) {
      v.store(o.v.load(std::memory_order_relaxed), std::memory_order_relaxed);
      return *this;
    }
  };
  mutable MaintenanceCache maintenance_cache_;
  // Node centroid stamps (ExportFlat's node_row_stamps): unique within the lineage, so a device
  // mirror holding a row of the same stamp at the same flat position holds this very row. A
  // copied tree starts a lineage of its own (the copies may change apart); a moved one keeps it.
  uint64_t row_clock_ = 0;
  // The shape (every Build and repair starts a new one) and the leaf each chunk inserted since
  // joined (chunks [insert_base_, num_chunks())): ExportFlat applies them to an export of the
  // same shape instead of walking the tree.
  void NewShape();
  uint64_t shape_ = 0;
  uint32_t insert_base_ = 0;
  std::vector<uint32_t> insert_leaf_;
  struct Lineage {
    uint64_t id = Next();
    Lineage() = default;
    Lineage(const Lineage&) : id(Next()) {}
    Lineage(Lineage&& o) noexcept : id(o.id) {}
    Lineage& operator=(const Lineage&) {
      id = Next();
      return *this;
    }
    Lineage& operator=(Lineage&& o) noexcept {
      id = o.id;
      return *this;
    }
    static uint64_t Next();
  };
  Lineage lineage_;
};

}  // namespace kvmem::index
