// GateTree: the inner-product index over the gate keys of one session's memory blocks
// (LycheeMemory's gate, DESIGN "memory block").
//
//   root → clusters (→ clusters ...) → leaves holding up to ~leaf_points keys, stored contiguously
//
// Built in bulk by recursive spherical k-means (on mean-centred keys, like ClusterTree), grown by
// lazy inserts, shrunk by removals. Every node n holds a centroid c_n, a radius r_n and a max key
// norm M_n with
//
//   ‖k − c_n‖ ≤ r_n  and  ‖k‖ ≤ M_n   for every key k stored below n                  (*)
//
// so for a query q every key below n has q·k ≤ UB(q, n) = min(q·c_n + ‖q‖·r_n, ‖q‖·M_n)
// (Cauchy–Schwarz). Inserts only grow radii (the centroid stays put), removals leave them valid.
//
// Why not ClusterTree: that tree indexes chunks (many keys each, dense ids in seal order, no
// removal, keys read back through a ChunkKeySource one chunk at a time). Memory blocks are single
// points with sparse 64-bit ids that are dropped individually; a leaf here scores its keys from
// one contiguous array, which is what makes exact search cheap (docs/architecture.md, "Memory
// blocks"). The k-means and vector helpers are shared (index/detail/).
//
// Scores: detail::Dot(q, k) in float, the same function Scan() uses, so exact search and a linear
// scan agree bit for bit; bounds carry a slack for the rounding of that float sum.
// Ties: higher score first, then lower id.
//
// Not thread-safe: one thread per tree (a session's operations are serialised).
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "common/status.h"

namespace kvmem::index {

struct GateTreeOptions {
  // Keys per leaf the bulk build aims for; a leaf that lazy inserts grow past twice this is split.
  // Default: 32.
  uint32_t leaf_points = 32;
  // Children per internal node at build. Default: 16.
  uint32_t fanout = 16;
  // Spherical k-means iterations per split. Default: 6.
  uint32_t kmeans_iterations = 6;
  // A split of more keys than this iterates on a deterministic sample, then assigns all once.
  // Default: 4096.
  uint32_t kmeans_sample = 4096;
  // The whole tree is rebuilt once keys inserted since the last build reach this multiple of the
  // keys it was built with (and at least leaf_points): with 1.0 it is rebuilt each time it
  // doubles, so bulk building stays O(n log n) amortised. Default: 1.0.
  float rebuild_growth = 1.0f;
  // Seed of the k-means initialisation; builds are deterministic. Default: 0x6761.
  uint64_t seed = 0x6761;
};

struct GateCost {
  uint64_t nodes_visited = 0;   // node bounds evaluated
  uint64_t leaves_visited = 0;  // leaves whose keys were scored
  uint64_t keys_scored = 0;     // q·k evaluations
};

struct GateResult {
  std::vector<uint64_t> ids;  // best first
  std::vector<float> scores;  // q·k, same order
  // True when the result is provably the exact top-k (always for Scan and SearchExact; for
  // SearchBudget when the bound closed the search before the leaf budget ran out).
  bool exact = true;
  GateCost cost;
};

// Default soft-score weight of the budgeted walk (see SearchBudget).
inline constexpr float kDefaultRadiusWeight = 0.5f;

class GateTree {
 public:
  explicit GateTree(uint32_t dim, GateTreeOptions options = {});

  // OK when leaf_points >= 1, fanout >= 2, kmeans_iterations >= 1, rebuild_growth > 0.
  static Status Validate(const GateTreeOptions& options);

  // Adds n keys ([n][dim] float, row-major) under the given ids. INVALID_ARGUMENT (nothing added)
  // on a size mismatch, a non-finite key, an id given twice or already present. Rebuilds the
  // tree when it has grown past options.rebuild_growth, else inserts lazily.
  Status Insert(std::span<const uint64_t> ids, std::span<const float> keys);

  // Removes a key. NOT_FOUND when the id is absent. Bounds stay valid (they only loosen).
  Status Remove(uint64_t id);

  // Exact top-k by q·k (ties: lower id), the same list as Scan(). Best-first over node bounds;
  // stops when no unvisited node's bound reaches the k-th score.
  // INVALID_ARGUMENT when q.size() != dim or q is not finite. k = 0 gives an empty result.
  Result<GateResult> SearchExact(std::span<const float> q, uint32_t k) const;

  // A best-first walk scoring at most max_leaves leaves (>= 1): the best k among the keys seen.
  // Nodes are ranked by the soft score q·c + w·‖q‖·r (w = radius_weight; w >= 1 ranks by the
  // bound, i.e. SearchExact's order): keys scatter around a centroid in every direction, so the
  // full ball bound over-rates wide nodes (measured in bench/results/memory.json). Nodes whose
  // bound is below the k-th score are skipped. The walk does not depend on the budget, so a
  // larger budget visits a superset and the result only improves; `exact` is set when no
  // unvisited node's bound reaches the k-th score.
  Result<GateResult> SearchBudget(std::span<const float> q, uint32_t k, uint32_t max_leaves,
                                  float radius_weight = kDefaultRadiusWeight) const;

  // Linear scan over every key: the reference the tree is measured against.
  Result<GateResult> Scan(std::span<const float> q, uint32_t k) const;

  // Rebuilds the whole tree from the keys it holds (bulk k-means).
  void Rebuild();

  // Checks (*) for every key against its leaf and every ancestor, and the id map. INTERNAL on
  // violation.
  Status CheckInvariants() const;

  uint32_t dim() const { return dim_; }
  size_t size() const { return where_.size(); }
  bool Contains(uint64_t id) const { return where_.count(id) != 0; }
  // The stored key of `id` ([dim] floats), or nullptr when absent.
  const float* key(uint64_t id) const;
  uint32_t leaves() const;
  uint32_t depth() const;
  // Approximate heap bytes held (keys, ids, centroids, the id map).
  uint64_t memory_bytes() const;

 private:
  static constexpr uint32_t kNone = 0xffffffffu;
  struct Node {
    uint32_t parent = kNone;
    bool leaf = true;
    std::vector<uint32_t> children;  // internal nodes
    std::vector<float> keys;         // leaves: [n][dim]
    std::vector<uint64_t> ids;       // leaves: [n]
    float radius = 0.f;
    float max_norm = 0.f;
  };
  struct Where {
    uint32_t leaf;
    uint32_t slot;
  };

  const float* centroid(uint32_t n) const { return &centroids_[size_t{n} * dim_]; }
  float* centroid(uint32_t n) { return &centroids_[size_t{n} * dim_]; }
  uint32_t NewNode(uint32_t parent);
  // Fills node n with keys rows[0..m) of `keys` (ids alongside), splitting while it is too big.
  void BuildNode(uint32_t n, const float* keys, const uint64_t* ids, std::vector<uint32_t> rows);
  void InsertOne(uint64_t id, const float* key);
  void SplitLeaf(uint32_t n);
  Status ValidateQuery(std::span<const float> q) const;
  // Best-first walk; max_leaves = 0 means unlimited.
  GateResult Walk(std::span<const float> q, uint32_t k, uint32_t max_leaves,
                  float radius_weight) const;

  uint32_t dim_;
  GateTreeOptions options_;
  std::vector<Node> nodes_;          // node 0 is the root
  std::vector<float> centroids_;     // [nodes][dim]
  std::unordered_map<uint64_t, Where> where_;
  size_t built_size_ = 0;
  size_t inserted_since_build_ = 0;
};

}  // namespace kvmem::index
