#include "index/cluster_tree.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <queue>
#include <string>

#include "index/detail/kmeans.h"
#include "index/detail/vec_math.h"

namespace kvmem::index {

using detail::DistanceD;
using detail::Dot;
using detail::RoundUpToFloat;

namespace {

// Float rounding in q·c and ‖q‖ (≈ D·2^-24 relative to ‖q‖·‖k‖) must not let a bound fall
// below a true score: exact search adds this much of ‖q‖·M to every bound it compares.
constexpr float kBoundSlack = 2e-4f;

// Bytes of one summary as the tree stores it: fp32 centroid + radius + max norm.
uint64_t SummaryBytes(uint32_t head_dim) { return uint64_t{head_dim} * 4 + 8; }

enum ItemKind : uint8_t { kNodeBound = 0, kChunkBound = 1, kChunkExact = 2 };

struct Item {
  float key;
  uint8_t kind;
  uint32_t id;
};

// Max-heap order: higher key first; on equal keys bounds before exact scores (an exact score
// may only be final once no bound reaches it), then lower id first.
struct ItemLess {
  bool operator()(const Item& a, const Item& b) const {
    if (a.key != b.key) return a.key < b.key;
    if (a.kind != b.kind) return a.kind > b.kind;
    return a.id > b.id;
  }
};

// A node or chunk bound (kind 0 or 1, id < 2^30, key not NaN) as one word ordered like
// ItemLess: the key's order-preserving bits (−0 ordered as +0), the kind inverted, the id
// inverted, then a bit that keeps a −0 key's sign. A larger word is a larger Item.
constexpr uint32_t kPackedIds = 1u << 30;

uint64_t PackBound(const Item& it) {
  uint32_t u;
  std::memcpy(&u, &it.key, 4);
  const bool negative_zero = u == 0x80000000u;
  if (negative_zero) u = 0;
  const uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t{ord} << 32) | (uint64_t{1u - it.kind} << 31) |
         (uint64_t{kPackedIds - 1 - it.id} << 1) | uint64_t{negative_zero};
}

Item UnpackBound(uint64_t w) {
  const uint32_t ord = static_cast<uint32_t>(w >> 32);
  const uint32_t u = (w & 1u) ? 0x80000000u : (ord & 0x80000000u) ? (ord & 0x7fffffffu) : ~ord;
  Item it;
  std::memcpy(&it.key, &u, 4);
  it.kind = static_cast<uint8_t>(1u - ((w >> 31) & 1u));
  it.id = kPackedIds - 1 - static_cast<uint32_t>((w >> 1) & (kPackedIds - 1));
  return it;
}

// One KV head's query group prepared for bounds.
struct QueryGroup {
  const float* q;
  uint32_t group;
  uint32_t dim;
  std::vector<float> norms;
  std::vector<float> mean;
  float mean_norm = 0.f;

  QueryGroup(std::span<const float> queries, uint32_t head_dim)
      : q(queries.data()),
        group(static_cast<uint32_t>(queries.size() / head_dim)),
        dim(head_dim),
        norms(group),
        mean(head_dim, 0.f) {
    for (uint32_t g = 0; g < group; ++g) {
      const float* qg = q + size_t{g} * dim;
      norms[g] = detail::Norm(qg, dim);
      for (uint32_t d = 0; d < dim; ++d) mean[d] += qg[d];
    }
    for (auto& v : mean) v /= static_cast<float>(group);
    mean_norm = detail::Norm(mean.data(), dim);
  }

  // Centroid rows are floats (nodes) or bfloat16 bits (chunks): the same score either way.
  static float RowDot(const float* a, const float* c, uint32_t n) { return Dot(a, c, n); }
  static float RowDot(const float* a, const uint16_t* c, uint32_t n) {
    return detail::DotBF16(a, c, n);
  }

  template <typename Row>
  float Bound(const Row* c, float r, float m, GroupAggregation agg, float slack) const {
    if (agg == GroupAggregation::kMeanQuery) {
      return std::min(RowDot(mean.data(), c, dim) + mean_norm * r, mean_norm * m) +
             slack * mean_norm * m;
    }
    float best = -INFINITY;
    for (uint32_t g = 0; g < group; ++g) {
      const float b = std::min(RowDot(q + size_t{g} * dim, c, dim) + norms[g] * r, norms[g] * m) +
                      slack * norms[g] * m;
      best = std::max(best, b);
    }
    return best;
  }

  // q·c + w·‖q‖·r, aggregated like Bound(); w = 1 gives Bound() without the norm cap.
  template <typename Row>
  float SoftScore(const Row* c, float r, float w, GroupAggregation agg) const {
    if (agg == GroupAggregation::kMeanQuery) return RowDot(mean.data(), c, dim) + w * mean_norm * r;
    float best = -INFINITY;
    for (uint32_t g = 0; g < group; ++g) {
      best = std::max(best, RowDot(q + size_t{g} * dim, c, dim) + w * norms[g] * r);
    }
    return best;
  }
};

bool AllFinite(const float* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(p[i])) return false;
  }
  return true;
}

// Finite and still finite at the bfloat16 precision chunk centroids are stored in.
bool FiniteAsBF16(const float* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(BF16ToFloat(FloatToBF16(p[i])))) return false;
  }
  return true;
}

// A chunk centroid as the tree stores it: rounded to bfloat16 values (a no-op for
// SummarizeKeys' output; `rounded` gets them as floats, `out` as bits), the radius grown by the
// rounding's shift so the ball still holds every key (triangle inequality).
float StoreChunkCentroid(const float* c, float radius, uint32_t D, float* rounded,
                         uint16_t* out) {
  std::copy_n(c, D, rounded);
  const double moved = detail::RoundToBF16(rounded, D);
  for (uint32_t d = 0; d < D; ++d) out[d] = FloatToBF16(rounded[d]);  // exact: bf16 values
  return moved > 0.0 ? detail::RoundUpToFloat(static_cast<double>(radius) + moved) : radius;
}

}  // namespace

ClusterTree::ClusterTree(uint32_t head_dim, ClusterTreeOptions options)
    : head_dim_(head_dim), options_(options) {
  NewNode(kNone, 0);
}

Status ClusterTree::Validate(const ClusterTreeOptions& o) {
  if (o.levels < 1 || o.levels > 8) return InvalidArgument("cluster tree: levels must be 1..8");
  if (o.max_coarse_units < 2 || o.max_fanout < 2) {
    return InvalidArgument("cluster tree: fan-outs must be >= 2");
  }
  if (o.fine_cluster_chunks < 1) return InvalidArgument("cluster tree: fine_cluster_chunks < 1");
  if (!(o.rebuild_growth > 1.f) || !(o.rebuild_radius_inflation > 1.f)) {
    return InvalidArgument("cluster tree: rebuild thresholds must be > 1");
  }
  return Status::OK();
}

uint32_t ClusterTree::NewNode(uint32_t parent, uint32_t level) {
  uint32_t id;
  if (!free_nodes_.empty()) {
    id = free_nodes_.back();
    free_nodes_.pop_back();
    nodes_[id] = Node{};
  } else {
    id = static_cast<uint32_t>(nodes_.size());
    nodes_.emplace_back();
    node_centroids_.resize(node_centroids_.size() + head_dim_, 0.f);
  }
  nodes_[id].parent = parent;
  nodes_[id].level = level;
  nodes_[id].row_stamp = ++row_clock_;
  std::fill_n(node_centroid(id), head_dim_, 0.f);
  return id;
}

void ClusterTree::NewShape() {
  ++shape_;
  insert_base_ = num_chunks();
  insert_leaf_.clear();
}

uint64_t ClusterTree::Lineage::Next() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

void ClusterTree::FreeSubtree(uint32_t n, bool keep_root) {
  if (!nodes_[n].leaf) {
    const std::vector<uint32_t> children = std::move(nodes_[n].children);
    for (uint32_t c : children) FreeSubtree(c, false);
  }
  nodes_[n].children.clear();
  if (!keep_root) {
    nodes_[n].live = false;
    free_nodes_.push_back(n);
  }
}

void ClusterTree::CollectChunks(uint32_t n, std::vector<uint32_t>* out) const {
  const Node& node = nodes_[n];
  if (node.leaf) {
    out->insert(out->end(), node.children.begin(), node.children.end());
    return;
  }
  for (uint32_t c : node.children) CollectChunks(c, out);
}

void ClusterTree::Summarize(uint32_t n) {
  Node& node = nodes_[n];
  const uint32_t D = head_dim_;
  std::vector<double> acc(D, 0.0);
  uint64_t tokens = 0;
  uint32_t chunks = 0;
  float max_norm = 0.f;
  std::vector<float> row(D);  // a chunk child's centroid as floats
  auto child_view = [&](uint32_t c, const float** centroid, float* radius, float* norm,
                        uint64_t* tok, uint32_t* nchunks) {
    if (node.leaf) {
      ChunkCentroidTo(c, row.data());
      *centroid = row.data();
      *radius = chunk_radius_[c];
      *norm = chunk_max_norm_[c];
      *tok = chunk_tokens_[c];
      *nchunks = 1;
    } else {
      *centroid = node_centroid(c);
      *radius = nodes_[c].radius;
      *norm = nodes_[c].max_key_norm;
      *tok = nodes_[c].tokens;
      *nchunks = nodes_[c].chunks_below;
    }
  };
  for (uint32_t c : node.children) {
    const float* cc;
    float r, m;
    uint64_t t;
    uint32_t k;
    child_view(c, &cc, &r, &m, &t, &k);
    for (uint32_t d = 0; d < D; ++d) acc[d] += static_cast<double>(cc[d]) * static_cast<double>(t);
    tokens += t;
    chunks += k;
    max_norm = std::max(max_norm, m);
  }
  float* centroid = node_centroid(n);
  for (uint32_t d = 0; d < D; ++d) {
    centroid[d] = tokens > 0 ? static_cast<float>(acc[d] / static_cast<double>(tokens)) : 0.f;
  }
  detail::RoundToBF16(centroid, D);  // stored as bfloat16 values, as chunk centroids; radius from these
  node.row_stamp = ++row_clock_;
  double radius = 0.0;
  for (uint32_t c : node.children) {
    const float* cc;
    float r, m;
    uint64_t t;
    uint32_t k;
    child_view(c, &cc, &r, &m, &t, &k);
    radius = std::max(radius, DistanceD(cc, centroid, D) + r);
  }
  node.radius = RoundUpToFloat(radius);
  node.max_key_norm = max_norm;
  node.tokens = tokens;
  node.chunks_below = chunks;
}

std::vector<std::vector<uint32_t>> ClusterTree::SplitChunks(const std::vector<uint32_t>& chunks,
                                                            uint32_t k, uint32_t salt) const {
  const uint32_t m = static_cast<uint32_t>(chunks.size());
  std::vector<float> points(size_t{m} * head_dim_);
  for (uint32_t i = 0; i < m; ++i) {
    ChunkCentroidTo(chunks[i], &points[size_t{i} * head_dim_]);
  }
  return GroupPoints(points.data(), chunks, k, salt);
}

std::vector<std::vector<uint32_t>> ClusterTree::GroupPoints(float* points,
                                                            const std::vector<uint32_t>& ids,
                                                            uint32_t k, uint32_t salt) const {
  const uint32_t m = static_cast<uint32_t>(ids.size());
  detail::KMeansParams params;
  params.k = k;
  params.iterations = options_.kmeans_iterations;
  params.sample = options_.kmeans_sample;
  params.seed = options_.seed ^ (uint64_t{salt} * 0x9e3779b97f4a7c15ull) ^ m;
  uint32_t used = 0;
  std::vector<uint32_t> labels =
      detail::CentredSphericalKMeans(points, m, head_dim_, params, &used);
  std::vector<std::vector<uint32_t>> groups(used);
  for (uint32_t i = 0; i < m; ++i) groups[labels[i]].push_back(ids[i]);
  if (used <= 1) {
    // Indistinguishable centroids (e.g. identical keys): split evenly so the tree still has
    // bounded fan-out and every level makes progress.
    groups.assign(k, {});
    for (uint32_t i = 0; i < m; ++i) groups[size_t{i} * k / m].push_back(ids[i]);
  }
  return groups;
}

void ClusterTree::RefreshAncestorRadii(uint32_t n) {
  // Valid for any centroid by the triangle inequality, and never looser than the children need.
  for (uint32_t a = nodes_[n].parent; a != kNone; a = nodes_[a].parent) {
    double radius = 0.0;
    float max_norm = 0.f;
    for (uint32_t c : nodes_[a].children) {
      radius = std::max(radius, DistanceD(node_centroid(c), node_centroid(a), head_dim_) +
                                    nodes_[c].radius);
      max_norm = std::max(max_norm, nodes_[c].max_key_norm);
    }
    nodes_[a].radius = RoundUpToFloat(radius);
    nodes_[a].max_key_norm = max_norm;
  }
}

void ClusterTree::SplitBeside(uint32_t n) {
  const bool leaf = nodes_[n].leaf;
  std::vector<uint32_t> members = std::move(nodes_[n].children);
  std::sort(members.begin(), members.end());
  std::vector<std::vector<uint32_t>> groups;
  if (leaf) {
    groups = SplitChunks(members, 2, n);
  } else {
    std::vector<float> points(members.size() * head_dim_);
    for (size_t i = 0; i < members.size(); ++i) {
      std::copy_n(node_centroid(members[i]), head_dim_, &points[i * head_dim_]);
    }
    groups = GroupPoints(points.data(), members, 2, n);
  }
  const uint32_t parent = nodes_[n].parent;
  const uint32_t sibling = NewNode(parent, nodes_[n].level);  // may reallocate nodes_
  nodes_[parent].children.push_back(sibling);
  const uint32_t halves[2] = {n, sibling};
  for (int i = 0; i < 2; ++i) {
    Node& node = nodes_[halves[i]];
    node.leaf = leaf;
    node.children = std::move(groups[i]);
    for (uint32_t c : node.children) {
      if (leaf) {
        chunk_parent_[c] = halves[i];
      } else {
        nodes_[c].parent = halves[i];
      }
    }
    Summarize(halves[i]);
    nodes_[halves[i]].built_chunks = nodes_[halves[i]].chunks_below;
    nodes_[halves[i]].built_radius = nodes_[halves[i]].radius;
  }
  RefreshAncestorRadii(n);
}

void ClusterTree::BuildSubtree(uint32_t n, std::vector<uint32_t> chunks,
                               uint32_t remaining_levels) {
  const uint32_t m = static_cast<uint32_t>(chunks.size());
  const uint32_t fine = std::max(1u, options_.fine_cluster_chunks);
  if (remaining_levels == 0 || m <= fine) {
    nodes_[n].leaf = true;
    nodes_[n].children = std::move(chunks);
    for (uint32_t c : nodes_[n].children) chunk_parent_[c] = n;
  } else {
    nodes_[n].leaf = false;
    const double clusters = std::ceil(static_cast<double>(m) / fine);
    const uint32_t cap = n == 0 ? options_.max_coarse_units : options_.max_fanout;
    uint32_t k = static_cast<uint32_t>(std::ceil(std::pow(clusters, 1.0 / remaining_levels) - 1e-9));
    k = std::clamp(k, 2u, std::max(2u, cap));
    k = std::min(k, m);

    std::vector<std::vector<uint32_t>> groups = SplitChunks(chunks, k, n);
    for (auto& g : groups) {
      if (g.empty()) continue;
      const uint32_t child = NewNode(n, nodes_[n].level + 1);  // may reallocate nodes_
      nodes_[n].children.push_back(child);
      BuildSubtree(child, std::move(g), remaining_levels - 1);
    }
  }
  Summarize(n);
  nodes_[n].built_chunks = nodes_[n].chunks_below;
  nodes_[n].built_radius = nodes_[n].radius;
}

Status ClusterTree::Build(std::span<const ChunkSummary> summaries,
                          std::span<const uint32_t> token_counts) {
  if (summaries.size() != token_counts.size()) {
    return InvalidArgument("cluster tree: " + std::to_string(summaries.size()) +
                           " summaries but " + std::to_string(token_counts.size()) +
                           " token counts");
  }
  if (summaries.size() >= kNone) return InvalidArgument("cluster tree: too many chunks");
  for (size_t i = 0; i < summaries.size(); ++i) {
    const ChunkSummary& s = summaries[i];
    if (s.centroid.size() != head_dim_) {
      return InvalidArgument("cluster tree: chunk " + std::to_string(i) + " centroid has " +
                             std::to_string(s.centroid.size()) + " values, head_dim is " +
                             std::to_string(head_dim_));
    }
    if (!FiniteAsBF16(s.centroid.data(), head_dim_) || !std::isfinite(s.radius) ||
        !std::isfinite(s.max_key_norm) || s.radius < 0.f || s.max_key_norm < 0.f) {
      return InvalidArgument("cluster tree: chunk " + std::to_string(i) + " summary not finite");
    }
    if (token_counts[i] == 0) {
      return InvalidArgument("cluster tree: chunk " + std::to_string(i) + " has no tokens");
    }
  }
  const size_t n = summaries.size();
  chunk_centroids_.resize(n * head_dim_);
  chunk_radius_.resize(n);
  chunk_max_norm_.resize(n);
  chunk_tokens_.assign(token_counts.begin(), token_counts.end());
  chunk_start_.resize(n);
  chunk_parent_.assign(n, 0);
  total_tokens_ = 0;
  std::vector<float> rounded(head_dim_);
  for (size_t i = 0; i < n; ++i) {
    chunk_radius_[i] =
        StoreChunkCentroid(summaries[i].centroid.data(), summaries[i].radius, head_dim_,
                           rounded.data(), &chunk_centroids_[i * head_dim_]);
    chunk_max_norm_[i] = summaries[i].max_key_norm;
    chunk_start_[i] = total_tokens_;
    total_tokens_ += token_counts[i];
  }
  RebuildSubtree(0);
  inserts_since_build_ = 0;
  ++version_;
  ++build_epoch_;
  NewShape();
  return Status::OK();
}

void ClusterTree::RebuildSubtree(uint32_t n) {
  std::vector<uint32_t> chunks;
  if (n == 0) {
    nodes_.clear();
    node_centroids_.clear();
    free_nodes_.clear();
    NewNode(kNone, 0);
    chunks.resize(chunk_tokens_.size());
    for (uint32_t i = 0; i < chunks.size(); ++i) chunks[i] = i;
    const uint32_t levels = chunks.size() < options_.min_chunks_to_cluster ? 0 : options_.levels;
    BuildSubtree(0, std::move(chunks), levels);
    return;
  }
  CollectChunks(n, &chunks);
  std::sort(chunks.begin(), chunks.end());
  FreeSubtree(n, /*keep_root=*/true);
  const uint32_t level = nodes_[n].level;
  BuildSubtree(n, std::move(chunks), options_.levels > level ? options_.levels - level : 0);
  // The rebuilt node's centroid may have moved: re-derive the ancestors' radii.
  RefreshAncestorRadii(n);
}

Status ClusterTree::Insert(uint32_t chunk, const ChunkSummary& summary, uint32_t tokens) {
  if (chunk != num_chunks()) {
    return InvalidArgument("cluster tree: insert of chunk " + std::to_string(chunk) +
                           ", expected the next id " + std::to_string(num_chunks()));
  }
  if (chunk >= kNone - 1) return ResourceExhausted("cluster tree: chunk ids exhausted");
  if (summary.centroid.size() != head_dim_) {
    return InvalidArgument("cluster tree: centroid has " +
                           std::to_string(summary.centroid.size()) + " values, head_dim is " +
                           std::to_string(head_dim_));
  }
  if (!FiniteAsBF16(summary.centroid.data(), head_dim_) || !std::isfinite(summary.radius) ||
      !std::isfinite(summary.max_key_norm) || summary.radius < 0.f || summary.max_key_norm < 0.f) {
    return InvalidArgument("cluster tree: summary not finite");
  }
  if (tokens == 0) return InvalidArgument("cluster tree: chunk has no tokens");

  chunk_centroids_.resize(chunk_centroids_.size() + head_dim_);
  std::vector<float> stored(head_dim_);  // the centroid's values as stored
  const float* cx = stored.data();
  const float chunk_r =
      StoreChunkCentroid(summary.centroid.data(), summary.radius, head_dim_, stored.data(),
                         &chunk_centroids_[chunk_centroids_.size() - head_dim_]);
  chunk_radius_.push_back(chunk_r);
  chunk_max_norm_.push_back(summary.max_key_norm);
  chunk_tokens_.push_back(tokens);
  chunk_start_.push_back(total_tokens_);
  total_tokens_ += tokens;
  ++inserts_since_build_;
  ++version_;

  // Nearest fine cluster by greedy descent on centroid distance.
  uint32_t n = 0;
  while (!nodes_[n].leaf) {
    uint32_t best = nodes_[n].children.front();
    double best_d = INFINITY;
    for (uint32_t c : nodes_[n].children) {
      const double d = detail::SquaredDistanceF(cx, node_centroid(c), head_dim_);
      if (d < best_d) {
        best_d = d;
        best = c;
      }
    }
    n = best;
  }
  nodes_[n].children.push_back(chunk);
  chunk_parent_.push_back(n);
  insert_leaf_.push_back(n);

  // Walk up. The node's centroid moves by Δ towards the new chunk; every old key was within r of
  // the old centroid, hence within r + ‖Δ‖ of the new one; the changed child's (new) ball must
  // also fit. Both terms in double, rounded up, so the stored floats satisfy the invariant.
  const float* child_c = cx;
  float child_r = chunk_r;
  std::vector<float> old_c(head_dim_);
  for (uint32_t v = n; v != kNone; v = nodes_[v].parent) {
    Node& node = nodes_[v];
    float* c = node_centroid(v);
    std::copy_n(c, head_dim_, old_c.data());
    const double w = static_cast<double>(tokens) / static_cast<double>(node.tokens + tokens);
    for (uint32_t d = 0; d < head_dim_; ++d) {
      c[d] = static_cast<float>(c[d] + w * (static_cast<double>(cx[d]) - c[d]));
    }
    // bfloat16 values like every stored centroid (a step below half an ulp leaves it in place;
    // the radius below is measured from what is stored, so it still covers).
    detail::RoundToBF16(c, head_dim_);
    node.row_stamp = ++row_clock_;
    const double shift = DistanceD(c, old_c.data(), head_dim_);
    const double cover_child = DistanceD(child_c, c, head_dim_) + child_r;
    const double radius = node.tokens == 0 ? cover_child
                                           : std::max(node.radius + shift, cover_child);
    node.radius = RoundUpToFloat(radius);
    node.max_key_norm = std::max(node.max_key_norm, summary.max_key_norm);
    node.tokens += tokens;
    node.chunks_below += 1;
    child_c = c;
    child_r = node.radius;
  }
  return Status::OK();
}

bool ClusterTree::Grown(const Node& node) const {
  return node.chunks_below >= options_.rebuild_growth * std::max(1u, node.built_chunks);
}

bool ClusterTree::Stale(uint32_t n) const {
  const Node& node = nodes_[n];
  if (!node.live) return false;
  if (n == 0 && node.leaf) {
    // A flat root is clustered as soon as a build would split it.
    return node.chunks_below >=
           std::max(options_.min_chunks_to_cluster, options_.fine_cluster_chunks + 1);
  }
  // A fine cluster below the target size is not split for growth (a split's small half would
  // double again a few seals later, each time moving the node count the device mirror follows).
  const bool small_leaf = node.leaf && node.chunks_below < options_.fine_cluster_chunks;
  if (!small_leaf && Grown(node)) return true;
  return node.built_radius > 0.f &&
         node.radius > options_.rebuild_radius_inflation * node.built_radius;
}

bool ClusterTree::NeedsMaintenance() const {
  static const bool cache = [] {
    const char* e = std::getenv("KVMEM_TREE_MAINT_CACHE");
    return e == nullptr || std::string(e) != "off";
  }();
  const uint64_t c = maintenance_cache_.v.load(std::memory_order_relaxed);
  if (cache && c != ~uint64_t{0} && (c >> 1) == version_) return (c & 1) != 0;
  bool need = false;
  for (uint32_t n = 0; n < nodes_.size() && !need; ++n) need = Stale(n);
  maintenance_cache_.v.store((version_ << 1) | (need ? 1 : 0), std::memory_order_relaxed);
  return need;
}

uint32_t ClusterTree::Maintain(uint32_t max_subtrees) {
  uint32_t rebuilt = 0;
  while (rebuilt < max_subtrees) {
    // Pick the highest stale unit. A stale fine cluster is split in two next to itself while
    // its parent has room (cheap: 2-means over ~2·fine_cluster_chunks chunks); otherwise its
    // parent is split or rebuilt (below). Any other stale node is rebuilt (a stale root:
    // everything) unless it only grew.
    uint32_t target = kNone;
    bool split = false;  // SplitBeside, else RebuildSubtree
    auto has_room = [&](uint32_t p) {
      const uint32_t cap = p == 0 ? options_.max_coarse_units : options_.max_fanout;
      return nodes_[p].children.size() < cap;
    };
    for (uint32_t n = 0; n < nodes_.size(); ++n) {
      if (!Stale(n)) continue;
      uint32_t unit = n;
      bool split_unit = false;
      if (n != 0 && !nodes_[n].leaf) {
        // An inner node that doubled splits in two beside itself while its parent has room (a
        // decode stream grows the coarse unit its topic landed in); one that loosened is rebuilt.
        const Node& node = nodes_[n];
        split_unit = Grown(node) && has_room(node.parent) && node.children.size() >= 2;
      } else if (n != 0) {
        const uint32_t p = nodes_[n].parent;
        if (has_room(p) && nodes_[n].children.size() >= 2) {
          split_unit = true;
        } else {
          unit = p;
          // A full parent splits in two beside itself when its own parent has room (2-means over
          // its children's centroids; the leaf splits on the next pass): rebuilding it instead
          // runs k-means over every chunk below it, milliseconds for a large coarse unit.
          split_unit = p != 0 && has_room(nodes_[p].parent) && nodes_[p].children.size() >= 2;
        }
      }
      if (target == kNone || nodes_[unit].level < nodes_[target].level) {
        target = unit;
        split = split_unit;
      }
      if (target == 0) break;
    }
    if (target == kNone) break;
    if (split) {
      SplitBeside(target);
    } else {
      RebuildSubtree(target);
    }
    if (target == 0) inserts_since_build_ = 0;
    ++subtree_rebuilds_;
    ++version_;
    NewShape();
    ++rebuilt;
    if (target == 0) break;  // everything is fresh now
  }
  return rebuilt;
}

Status ClusterTree::ValidateQueries(std::span<const float> q, uint32_t* group) const {
  if (q.empty() || q.size() % head_dim_ != 0) {
    return InvalidArgument("search: query group has " + std::to_string(q.size()) +
                           " values, not a positive multiple of head_dim " +
                           std::to_string(head_dim_));
  }
  if (!AllFinite(q.data(), q.size())) return InvalidArgument("search: non-finite query value");
  *group = static_cast<uint32_t>(q.size() / head_dim_);
  return Status::OK();
}

Result<Selection> ClusterTree::SearchExact(std::span<const float> group_queries, uint32_t k,
                                           const ChunkKeySource& keys) const {
  uint32_t group = 0;
  KVMEM_RETURN_IF_ERROR(ValidateQueries(group_queries, &group));
  const QueryGroup qg(group_queries, head_dim_);
  const auto agg = GroupAggregation::kMaxBound;
  Selection sel;
  if (k == 0 || num_chunks() == 0) return sel;

  std::priority_queue<Item, std::vector<Item>, ItemLess> heap;
  heap.push({INFINITY, kNodeBound, 0});
  std::vector<float> buf;
  const uint64_t summary_bytes = SummaryBytes(head_dim_);
  while (!heap.empty() && sel.chunks.size() < k) {
    const Item top = heap.top();
    heap.pop();
    if (top.kind == kNodeBound) {
      const Node& node = nodes_[top.id];
      for (uint32_t c : node.children) {
        ++sel.cost.nodes_visited;
        if (node.leaf) {
          heap.push({qg.Bound(chunk_centroid(c), chunk_radius_[c], chunk_max_norm_[c], agg,
                              kBoundSlack),
                     kChunkBound, c});
        } else {
          heap.push({qg.Bound(node_centroid(c), nodes_[c].radius, nodes_[c].max_key_norm, agg,
                              kBoundSlack),
                     kNodeBound, c});
        }
      }
    } else if (top.kind == kChunkBound) {
      const uint32_t t = chunk_tokens_[top.id];
      buf.resize(size_t{t} * head_dim_);
      KVMEM_RETURN_IF_ERROR(keys.ReadKeys(top.id, buf.data()));
      sel.cost.keys_read += t;
      float best = -INFINITY;
      for (uint32_t i = 0; i < t; ++i) {
        for (uint32_t g = 0; g < group; ++g) {
          best = std::max(best, Dot(qg.q + size_t{g} * head_dim_, &buf[size_t{i} * head_dim_],
                                    head_dim_));
        }
      }
      heap.push({best, kChunkExact, top.id});
    } else {
      sel.chunks.push_back(top.id);
      sel.scores.push_back(top.key);
      sel.tokens += chunk_tokens_[top.id];
    }
  }
  sel.cost.bytes_read =
      sel.cost.nodes_visited * summary_bytes + sel.cost.keys_read * uint64_t{head_dim_} * 4;
  return sel;
}

uint64_t ClusterTree::CountedTokens(uint32_t c, uint64_t skip) const {
  const uint64_t start = chunk_start_[c];
  const uint64_t end = start + chunk_tokens_[c];
  return end <= skip ? 0 : end - std::max(start, skip);
}

Result<Selection> ClusterTree::SearchBudget(std::span<const float> group_queries,
                                            uint32_t budget_tokens,
                                            const BudgetSearchOptions& options) const {
  uint32_t group = 0;
  KVMEM_RETURN_IF_ERROR(ValidateQueries(group_queries, &group));
  if (!(options.overfetch >= 1.f)) return InvalidArgument("search: overfetch must be >= 1");
  if (num_chunks() >= kPackedIds || nodes_.size() >= kPackedIds) {
    return ResourceExhausted("search: more than 2^30 chunks or nodes in one tree");
  }
  const QueryGroup qg(group_queries, head_dim_);
  const GroupAggregation agg = options.aggregation;
  Selection sel;
  if (budget_tokens == 0 || num_chunks() == 0) return sel;

  auto chunk_key = [&](uint32_t c) {
    return qg.SoftScore(chunk_centroid(c), chunk_radius_[c], options.chunk_radius_weight, agg);
  };
  auto node_key = [&](uint32_t n) {
    return qg.SoftScore(node_centroid(n), nodes_[n].radius, options.node_radius_weight, agg);
  };
  const uint64_t skip = options.skip_tokens_below;
  uint64_t remaining = budget_tokens;
  uint32_t misfits = 0;
  // Returns false when the search should stop.
  auto offer = [&](const Item& item) {
    const uint64_t counted = CountedTokens(item.id, skip);
    if (counted == 0) return true;
    if (counted > remaining) return ++misfits < options.max_consecutive_misfits;
    misfits = 0;
    remaining -= counted;
    sel.chunks.push_back(item.id);
    sel.scores.push_back(item.key);
    sel.tokens += counted;
    return remaining > 0;
  };

  if (options.traversal == BudgetTraversal::kBestFirst) {
    // ItemLess's order as one integer per item (PackBound): the heap compares words.
    std::priority_queue<uint64_t> heap;
    heap.push(PackBound({INFINITY, kNodeBound, 0}));
    while (!heap.empty()) {
      const Item top = UnpackBound(heap.top());
      heap.pop();
      if (top.kind == kNodeBound) {
        const Node& node = nodes_[top.id];
        for (uint32_t c : node.children) {
          ++sel.cost.nodes_visited;
          heap.push(PackBound(node.leaf ? Item{chunk_key(c), kChunkBound, c}
                                        : Item{node_key(c), kNodeBound, c}));
        }
        continue;
      }
      if (!offer(top)) break;
    }
  } else {
    // Level by level: keep the best children until they hold overfetch × budget tokens.
    const double keep_tokens = static_cast<double>(options.overfetch) * budget_tokens;
    std::vector<uint32_t> frontier = {0};  // internal nodes to expand
    std::vector<uint32_t> leaves;          // kept leaf clusters
    std::vector<Item> candidates;
    if (nodes_[0].leaf) leaves.push_back(0), frontier.clear();
    while (!frontier.empty()) {
      candidates.clear();
      for (uint32_t n : frontier) {
        for (uint32_t c : nodes_[n].children) {
          ++sel.cost.nodes_visited;
          candidates.push_back({node_key(c), kNodeBound, c});
        }
      }
      std::sort(candidates.begin(), candidates.end(),
                [](const Item& a, const Item& b) { return ItemLess()(b, a); });
      frontier.clear();
      double kept = 0.0;
      for (const Item& it : candidates) {
        if (kept >= keep_tokens) break;
        const Node& node = nodes_[it.id];
        kept += static_cast<double>(node.tokens);
        (node.leaf ? leaves : frontier).push_back(it.id);
      }
    }
    candidates.clear();
    for (uint32_t n : leaves) {
      for (uint32_t c : nodes_[n].children) {
        ++sel.cost.nodes_visited;
        candidates.push_back({chunk_key(c), kChunkBound, c});
      }
    }
    std::sort(candidates.begin(), candidates.end(),
              [](const Item& a, const Item& b) { return ItemLess()(b, a); });
    for (const Item& it : candidates) {
      if (!offer(it)) break;
    }
  }
  // Soft scores are not monotone down the tree, so best-first may accept a chunk before a
  // better one: report the selection in descending score order (ties: lower id first).
  std::vector<uint32_t> order(sel.chunks.size());
  for (uint32_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return sel.scores[a] != sel.scores[b] ? sel.scores[a] > sel.scores[b]
                                          : sel.chunks[a] < sel.chunks[b];
  });
  Selection sorted;
  sorted.tokens = sel.tokens;
  sorted.cost = sel.cost;
  sorted.cost.bytes_read = sel.cost.nodes_visited * SummaryBytes(head_dim_);
  for (uint32_t i : order) {
    sorted.chunks.push_back(sel.chunks[i]);
    sorted.scores.push_back(sel.scores[i]);
  }
  return sorted;
}

Status ClusterTree::CheckInvariants(const ChunkKeySource* keys) const {
  auto fail = [](const std::string& what) { return Internal("cluster tree invariant: " + what); };
  // Tolerance for comparing double distances against stored (rounded-up) float radii.
  auto exceeds = [](double need, float have) {
    return need > static_cast<double>(have) * (1.0 + 1e-6) + 1e-6;
  };
  if (nodes_.empty() || !nodes_[0].live || nodes_[0].parent != kNone) return fail("bad root");
  std::vector<float> row(head_dim_);  // a chunk centroid as floats
  std::vector<uint32_t> seen(num_chunks(), 0);
  uint64_t start = 0;
  for (uint32_t c = 0; c < num_chunks(); ++c) {
    if (chunk_start_[c] != start) return fail("chunk " + std::to_string(c) + " start");
    start += chunk_tokens_[c];
  }
  if (start != total_tokens_) return fail("total tokens");
  for (uint32_t n = 0; n < nodes_.size(); ++n) {
    const Node& node = nodes_[n];
    if (!node.live) continue;
    const std::string where = "node " + std::to_string(n);
    if (n != 0 && node.children.empty()) return fail(where + " has no children");
    uint64_t tokens = 0;
    uint32_t chunks = 0;
    for (uint32_t c : node.children) {
      const float* cc;
      float r, m;
      if (node.leaf) {
        if (c >= num_chunks()) return fail(where + " holds unknown chunk");
        if (chunk_parent_[c] != n) return fail("chunk " + std::to_string(c) + " parent");
        ++seen[c];
        ChunkCentroidTo(c, row.data());
        cc = row.data();
        r = chunk_radius_[c];
        m = chunk_max_norm_[c];
        tokens += chunk_tokens_[c];
        chunks += 1;
      } else {
        if (c >= nodes_.size() || !nodes_[c].live || nodes_[c].parent != n ||
            nodes_[c].level != node.level + 1) {
          return fail(where + " child " + std::to_string(c) + " links");
        }
        cc = node_centroid(c);
        r = nodes_[c].radius;
        m = nodes_[c].max_key_norm;
        tokens += nodes_[c].tokens;
        chunks += nodes_[c].chunks_below;
      }
      if (exceeds(DistanceD(cc, node_centroid(n), head_dim_) + r, node.radius)) {
        return fail(where + " radius " + std::to_string(node.radius) + " does not cover child " +
                    std::to_string(c));
      }
      if (m > node.max_key_norm) return fail(where + " max key norm below a child's");
    }
    if (tokens != node.tokens || chunks != node.chunks_below) return fail(where + " counts");
  }
  for (uint32_t c = 0; c < num_chunks(); ++c) {
    if (seen[c] != 1) return fail("chunk " + std::to_string(c) + " appears " +
                                  std::to_string(seen[c]) + " times");
  }
  if (keys == nullptr) return Status::OK();
  std::vector<float> buf;
  for (uint32_t c = 0; c < num_chunks(); ++c) {
    buf.resize(size_t{chunk_tokens_[c]} * head_dim_);
    KVMEM_RETURN_IF_ERROR(keys->ReadKeys(c, buf.data()));
    ChunkCentroidTo(c, row.data());
    for (uint32_t t = 0; t < chunk_tokens_[c]; ++t) {
      const float* k = &buf[size_t{t} * head_dim_];
      double norm = 0.0;
      for (uint32_t d = 0; d < head_dim_; ++d) norm += double{k[d]} * k[d];
      if (exceeds(std::sqrt(norm), chunk_max_norm_[c])) return fail("chunk max key norm");
      if (exceeds(DistanceD(k, row.data(), head_dim_), chunk_radius_[c])) {
        return fail("key outside chunk " + std::to_string(c) + " radius");
      }
      for (uint32_t a = chunk_parent_[c]; a != kNone; a = nodes_[a].parent) {
        if (exceeds(DistanceD(k, node_centroid(a), head_dim_), nodes_[a].radius)) {
          return fail("key of chunk " + std::to_string(c) + " outside node " +
                      std::to_string(a));
        }
      }
    }
  }
  return Status::OK();
}

void ClusterTree::ExportFlat(kernels::FlatTree* out, uint32_t chunks_from,
                             const kernels::NodeRowsHeld* held) const {
  const uint32_t D = head_dim_;
  // `out` holds an export of this tree's current shape (same lineage, no repair or Build since,
  // at most the inserts logged since the shape changed): apply those inserts to its records
  // instead of walking the tree. A walk touches every node and its children list; after a
  // decode step the tree is cold in the cache, and at 128K that walk was ~55 µs per tree.
  const bool incremental = out->lineage == lineage_.id && out->shape == shape_ &&
                           out->num_chunks >= insert_base_ && out->num_chunks <= num_chunks() &&
                           !out->nodes.empty() && out->flat_node.size() == out->nodes.size() &&
                           out->node_row_stamps.size() == out->nodes.size();
  out->head_dim = D;
  out->node_centroids.clear();
  out->node_rows_at.clear();
  out->lineage = lineage_.id;
  out->node_rows_partial = held != nullptr && held->lineage == lineage_.id;
  // Stamps are unique within the lineage: a position whose stamp the holder has holds this row.
  auto held_row = [&](size_t i, uint64_t stamp) {
    return out->node_rows_partial && i < held->stamps.size() && held->stamps[i] == stamp;
  };
  auto record = [&](const Node& n, kernels::FlatTreeNode* f) {
    f->radius = n.radius;
    f->tokens = static_cast<uint32_t>(std::min<uint64_t>(n.tokens, 0xffffffffu));
  };
  out->delta_from = incremental ? out->version : ~0ull;
  out->version = version_;
  out->nodes_changed.clear();
  out->leaf_chunks_changed_from = 0;
  if (incremental) {
    const uint32_t N = static_cast<uint32_t>(out->nodes.size());
    // What changes: the leaf and every leaf after it (their child_begin), the leaf's ancestors
    // (radius, tokens) and the leaf order from the first insert on.
    uint32_t first_leaf = N;
    uint32_t first_chunk = static_cast<uint32_t>(out->leaf_chunks.size());
    std::vector<uint32_t> above;  // ancestors' flat positions (before the leaves in flat order)
    for (uint32_t c = out->num_chunks; c < num_chunks(); ++c) {
      const uint32_t leaf = insert_leaf_[c - insert_base_];
      const uint32_t p = out->node_flat[leaf];
      kernels::FlatTreeNode& f = out->nodes[p];
      const uint32_t count = f.child_count & ~kernels::kTreeLeafBit;
      out->leaf_chunks.insert(out->leaf_chunks.begin() + f.child_begin + count, c);
      first_chunk = std::min(first_chunk, f.child_begin + count);
      first_leaf = std::min(first_leaf, p);
      f.child_count = (count + 1) | kernels::kTreeLeafBit;
      // Leaves after it in flat order hold the chunks after its own.
      for (uint32_t q = p + 1; q < N; ++q) {
        if (out->nodes[q].child_count & kernels::kTreeLeafBit) ++out->nodes[q].child_begin;
      }
      for (uint32_t a = leaf; a != kNone; a = nodes_[a].parent) {
        const uint32_t q = out->node_flat[a];
        record(nodes_[a], &out->nodes[q]);
        out->node_row_stamps[q] = nodes_[a].row_stamp;
        if (a != leaf) above.push_back(q);
      }
    }
    std::sort(above.begin(), above.end());
    for (uint32_t q : above) {
      if (q >= first_leaf) break;  // inside the leaves' run
      if (!out->nodes_changed.empty() && out->nodes_changed.back().second >= q) {
        out->nodes_changed.back().second = std::max(out->nodes_changed.back().second, q + 1);
      } else {
        out->nodes_changed.push_back({q, q + 1});
      }
    }
    if (first_leaf < N) {
      if (!out->nodes_changed.empty() && out->nodes_changed.back().second >= first_leaf) {
        out->nodes_changed.back().second = N;
      } else {
        out->nodes_changed.push_back({first_leaf, N});
      }
    }
    out->leaf_chunks_changed_from = first_chunk;
  } else {
    out->nodes.clear();
    out->leaf_chunks.clear();
    out->node_row_stamps.clear();
    out->level_begin.assign(1, 0);
    out->flat_node.assign(1, 0);  // breadth-first: tree node ids in flat order
    out->node_flat.assign(nodes_.size(), kernels::kTreeNone);
    out->shape = shape_;
    std::vector<uint32_t>& ids = out->flat_node;
    std::vector<uint32_t> parent = {kernels::kTreeNone};
    size_t level_end = 1;  // a level ends where the next begins
    for (size_t i = 0; i < ids.size(); ++i) {
      const Node& n = nodes_[ids[i]];
      out->node_flat[ids[i]] = static_cast<uint32_t>(i);
      kernels::FlatTreeNode f{};
      record(n, &f);
      f.parent = parent[i];
      if (n.leaf) {
        f.child_begin = static_cast<uint32_t>(out->leaf_chunks.size());
        f.child_count = static_cast<uint32_t>(n.children.size()) | kernels::kTreeLeafBit;
        out->leaf_chunks.insert(out->leaf_chunks.end(), n.children.begin(), n.children.end());
      } else {
        f.child_begin = static_cast<uint32_t>(ids.size());
        f.child_count = static_cast<uint32_t>(n.children.size());
        for (uint32_t c : n.children) {
          ids.push_back(c);
          parent.push_back(static_cast<uint32_t>(i));
        }
      }
      out->nodes.push_back(f);
      out->node_row_stamps.push_back(n.row_stamp);
      if (i + 1 == level_end) {
        out->level_begin.push_back(static_cast<uint32_t>(i + 1));
        level_end = ids.size();
      }
    }
  }
  // The node rows, by flat position: all, or (partial) those whose stamps the holder lacks.
  for (size_t i = 0; i < out->nodes.size(); ++i) {
    if (held_row(i, out->node_row_stamps[i])) continue;
    const float* row = node_centroid(out->flat_node[i]);
    out->node_centroids.insert(out->node_centroids.end(), row, row + D);
    if (out->node_rows_partial) out->node_rows_at.push_back(static_cast<uint32_t>(i));
  }
  out->num_levels = static_cast<uint32_t>(out->level_begin.size() - 1);
  const size_t from = std::min<size_t>(chunks_from, chunk_radius_.size());
  out->num_chunks = num_chunks();
  out->chunks_from = static_cast<uint32_t>(from);
  out->chunks_epoch = build_epoch_;
  out->chunk_centroids.resize(chunk_centroids_.size() - from * D);
  for (size_t i = 0; i < out->chunk_centroids.size(); ++i) {
    out->chunk_centroids[i] = BF16ToFloat(chunk_centroids_[from * D + i]);
  }
  out->chunk_radius.assign(chunk_radius_.begin() + from, chunk_radius_.end());
  out->chunk_tokens.assign(chunk_tokens_.begin() + from, chunk_tokens_.end());
  out->chunk_start.assign(chunk_start_.begin() + from, chunk_start_.end());
}

void ClusterTree::ChunkCentroidTo(uint32_t c, float* out) const {
  const uint16_t* h = chunk_centroid(c);
  for (uint32_t d = 0; d < head_dim_; ++d) out[d] = BF16ToFloat(h[d]);
}

ChunkSummary ClusterTree::chunk_summary(uint32_t chunk) const {
  ChunkSummary s;
  s.centroid.resize(head_dim_);
  ChunkCentroidTo(chunk, s.centroid.data());
  s.radius = chunk_radius_[chunk];
  s.max_key_norm = chunk_max_norm_[chunk];
  return s;
}

TreeStats ClusterTree::Stats() const {
  TreeStats s;
  s.chunks = num_chunks();
  s.tokens = total_tokens_;
  s.inserts_since_build = inserts_since_build_;
  s.subtree_rebuilds = subtree_rebuilds_;
  s.needs_maintenance = NeedsMaintenance();
  uint32_t max_level = 0;
  for (const Node& n : nodes_) {
    if (n.live) max_level = std::max(max_level, n.level);
  }
  s.depth = max_level + 1;
  s.nodes_per_level.assign(max_level + 1, 0);
  for (const Node& n : nodes_) {
    if (n.live) ++s.nodes_per_level[n.level];
  }
  s.nodes_per_level.push_back(num_chunks());
  s.memory_bytes = chunk_centroids_.capacity() * 2 + chunk_radius_.capacity() * 8 +
                   chunk_tokens_.capacity() * 4 + chunk_start_.capacity() * 8 +
                   insert_leaf_.capacity() * 4 +
                   chunk_parent_.capacity() * 4 + node_centroids_.capacity() * 4 +
                   nodes_.capacity() * sizeof(Node);
  for (const Node& n : nodes_) s.memory_bytes += n.children.capacity() * 4;
  return s;
}

}  // namespace kvmem::index
