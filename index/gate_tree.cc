#include "index/gate_tree.h"

#include <algorithm>
#include <cmath>
#include <queue>
#include <string>
#include <unordered_set>

#include "index/detail/kmeans.h"
#include "index/detail/vec_math.h"

namespace kvmem::index {

using detail::DistanceD;
using detail::Dot;
using detail::RoundUpToFloat;

namespace {

// |fl(Dot(q, k)) − q·k| ≤ γ·‖q‖·‖k‖ for the 8-accumulator float sum of n terms, with
// γ ≈ (n/8 + 4)·2^-24; we take (n + 8)·2^-23, several times that, so a bound never falls below a
// computed score. At n = 128 it adds ~1.6e-5·‖q‖·M to a bound: negligible for pruning.
double DotSlack(uint32_t dim) { return (dim + 8.0) * std::ldexp(1.0, -23); }

double DotD(const float* a, const float* b, uint32_t n) {
  double s = 0.0;
  for (uint32_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

struct Hit {
  float score;
  uint64_t id;
};
// a ranks before b: higher score, then lower id. As a heap comparator the top is the worst hit.
bool Better(const Hit& a, const Hit& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

class TopK {
 public:
  explicit TopK(uint32_t k) : k_(k) { heap_.reserve(k); }
  bool full() const { return heap_.size() == k_; }
  float worst() const { return heap_.front().score; }
  void Offer(float score, uint64_t id) {
    const Hit h{score, id};
    if (heap_.size() < k_) {
      heap_.push_back(h);
      std::push_heap(heap_.begin(), heap_.end(), Better);
    } else if (Better(h, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), Better);
      heap_.back() = h;
      std::push_heap(heap_.begin(), heap_.end(), Better);
    }
  }
  void Emit(GateResult* r) {
    std::sort(heap_.begin(), heap_.end(), Better);
    for (const Hit& h : heap_) {
      r->ids.push_back(h.id);
      r->scores.push_back(h.score);
    }
  }

 private:
  uint32_t k_;
  std::vector<Hit> heap_;
};

}  // namespace

GateTree::GateTree(uint32_t dim, GateTreeOptions options) : dim_(dim), options_(options) {}

Status GateTree::Validate(const GateTreeOptions& o) {
  if (o.leaf_points < 1) return InvalidArgument("gate tree: leaf_points must be >= 1");
  if (o.fanout < 2) return InvalidArgument("gate tree: fanout must be >= 2");
  if (o.kmeans_iterations < 1) return InvalidArgument("gate tree: kmeans_iterations must be >= 1");
  if (!(o.rebuild_growth > 0.f)) return InvalidArgument("gate tree: rebuild_growth must be > 0");
  return Status::OK();
}

uint32_t GateTree::NewNode(uint32_t parent) {
  nodes_.emplace_back();
  nodes_.back().parent = parent;
  centroids_.resize(centroids_.size() + dim_, 0.f);
  return static_cast<uint32_t>(nodes_.size() - 1);
}

void GateTree::BuildNode(uint32_t n, const float* keys, const uint64_t* ids,
                         std::vector<uint32_t> rows) {
  const uint32_t m = static_cast<uint32_t>(rows.size());
  // Centroid = mean key; radius and norm measured in double from the stored float centroid and
  // rounded up, so (*) holds for the stored numbers.
  std::vector<double> mean(dim_, 0.0);
  for (uint32_t r : rows) {
    const float* x = keys + size_t{r} * dim_;
    for (uint32_t d = 0; d < dim_; ++d) mean[d] += x[d];
  }
  float* c = centroid(n);
  for (uint32_t d = 0; d < dim_; ++d) c[d] = static_cast<float>(mean[d] / std::max(m, 1u));
  double radius = 0.0, norm = 0.0;
  for (uint32_t r : rows) {
    const float* x = keys + size_t{r} * dim_;
    radius = std::max(radius, DistanceD(x, c, dim_));
    norm = std::max(norm, std::sqrt(DotD(x, x, dim_)));
  }
  nodes_[n].radius = RoundUpToFloat(radius);
  nodes_[n].max_norm = RoundUpToFloat(norm);

  if (m <= options_.leaf_points) {
    Node& leaf = nodes_[n];
    leaf.leaf = true;
    leaf.keys.resize(size_t{m} * dim_);
    leaf.ids.resize(m);
    for (uint32_t i = 0; i < m; ++i) {
      std::copy_n(keys + size_t{rows[i]} * dim_, dim_, &leaf.keys[size_t{i} * dim_]);
      leaf.ids[i] = ids[rows[i]];
      where_[leaf.ids[i]] = Where{n, i};
    }
    return;
  }
  const uint32_t k = std::min(options_.fanout, (m + options_.leaf_points - 1) / options_.leaf_points);
  std::vector<float> points(size_t{m} * dim_);
  for (uint32_t i = 0; i < m; ++i) {
    std::copy_n(keys + size_t{rows[i]} * dim_, dim_, &points[size_t{i} * dim_]);
  }
  detail::KMeansParams params;
  params.k = k;
  params.iterations = options_.kmeans_iterations;
  params.sample = options_.kmeans_sample;
  params.seed = options_.seed ^ (uint64_t{n} * 0x9e3779b97f4a7c15ull) ^ m;
  uint32_t used = 0;
  const std::vector<uint32_t> labels =
      detail::CentredSphericalKMeans(points.data(), m, dim_, params, &used);
  points = {};
  std::vector<std::vector<uint32_t>> groups(used);
  for (uint32_t i = 0; i < m; ++i) groups[labels[i]].push_back(rows[i]);
  if (used <= 1) {
    // Indistinguishable directions (e.g. equal keys): split evenly so every level makes progress.
    groups.assign(k, {});
    for (uint32_t i = 0; i < m; ++i) groups[size_t{i} * k / m].push_back(rows[i]);
  }
  rows = {};
  nodes_[n].leaf = false;
  for (auto& g : groups) {
    if (g.empty()) continue;
    const uint32_t child = NewNode(n);  // may reallocate nodes_
    nodes_[n].children.push_back(child);
    BuildNode(child, keys, ids, std::move(g));
  }
}

void GateTree::Rebuild() {
  std::vector<float> keys;
  std::vector<uint64_t> ids;
  keys.reserve(where_.size() * dim_);
  ids.reserve(where_.size());
  for (const Node& node : nodes_) {
    if (!node.leaf) continue;
    keys.insert(keys.end(), node.keys.begin(), node.keys.end());
    ids.insert(ids.end(), node.ids.begin(), node.ids.end());
  }
  nodes_.clear();
  centroids_.clear();
  where_.clear();
  built_size_ = ids.size();
  inserted_since_build_ = 0;
  if (ids.empty()) return;
  std::vector<uint32_t> rows(ids.size());
  for (uint32_t i = 0; i < rows.size(); ++i) rows[i] = i;
  NewNode(kNone);
  BuildNode(0, keys.data(), ids.data(), std::move(rows));
}

Status GateTree::Insert(std::span<const uint64_t> ids, std::span<const float> keys) {
  if (keys.size() != ids.size() * dim_) {
    return InvalidArgument("gate tree: " + std::to_string(keys.size()) + " key values for " +
                           std::to_string(ids.size()) + " ids of dimension " +
                           std::to_string(dim_));
  }
  std::unordered_set<uint64_t> seen;
  seen.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (where_.count(ids[i]) || !seen.insert(ids[i]).second) {
      return InvalidArgument("gate tree: id " + std::to_string(ids[i]) + " is already present");
    }
    for (uint32_t d = 0; d < dim_; ++d) {
      if (!std::isfinite(keys[i * dim_ + d])) {
        return InvalidArgument("gate tree: key " + std::to_string(i) + " is not finite");
      }
    }
  }
  inserted_since_build_ += ids.size();
  const double limit = std::max<double>(options_.leaf_points,
                                        options_.rebuild_growth * static_cast<double>(built_size_));
  if (nodes_.empty() || static_cast<double>(inserted_since_build_) >= limit) {
    // Append to the root's storage first (Rebuild collects keys from the leaves).
    if (nodes_.empty()) NewNode(kNone);
    const uint32_t extra = NewNode(0);
    Node& leaf = nodes_[extra];
    leaf.keys.assign(keys.begin(), keys.end());
    leaf.ids.assign(ids.begin(), ids.end());
    Rebuild();
    return Status::OK();
  }
  for (size_t i = 0; i < ids.size(); ++i) InsertOne(ids[i], &keys[i * dim_]);
  return Status::OK();
}

void GateTree::InsertOne(uint64_t id, const float* key) {
  const float norm = RoundUpToFloat(std::sqrt(DotD(key, key, dim_)));
  uint32_t n = 0;
  while (true) {
    Node& node = nodes_[n];
    node.radius = std::max(node.radius, RoundUpToFloat(DistanceD(key, centroid(n), dim_)));
    node.max_norm = std::max(node.max_norm, norm);
    if (node.leaf) break;
    uint32_t best = node.children.front();
    double best_d = INFINITY;
    for (uint32_t c : node.children) {
      const double d = detail::SquaredDistanceF(key, centroid(c), dim_);
      if (d < best_d) {
        best_d = d;
        best = c;
      }
    }
    n = best;
  }
  Node& leaf = nodes_[n];
  where_[id] = Where{n, static_cast<uint32_t>(leaf.ids.size())};
  leaf.ids.push_back(id);
  leaf.keys.insert(leaf.keys.end(), key, key + dim_);
  if (leaf.ids.size() > 2 * size_t{options_.leaf_points}) SplitLeaf(n);
}

void GateTree::SplitLeaf(uint32_t n) {
  // The leaf becomes a cluster over new leaves built from its keys. Its own ball is recomputed
  // from those keys (tighter); its ancestors already cover them.
  std::vector<float> keys = std::move(nodes_[n].keys);
  std::vector<uint64_t> ids = std::move(nodes_[n].ids);
  nodes_[n].keys.clear();
  nodes_[n].ids.clear();
  std::vector<uint32_t> rows(ids.size());
  for (uint32_t i = 0; i < rows.size(); ++i) rows[i] = i;
  BuildNode(n, keys.data(), ids.data(), std::move(rows));
}

Status GateTree::Remove(uint64_t id) {
  auto it = where_.find(id);
  if (it == where_.end()) return NotFound("gate tree: id " + std::to_string(id) + " not present");
  const Where w = it->second;
  where_.erase(it);
  Node& leaf = nodes_[w.leaf];
  const uint32_t last = static_cast<uint32_t>(leaf.ids.size() - 1);
  if (w.slot != last) {
    leaf.ids[w.slot] = leaf.ids[last];
    std::copy_n(&leaf.keys[size_t{last} * dim_], dim_, &leaf.keys[size_t{w.slot} * dim_]);
    where_[leaf.ids[w.slot]].slot = w.slot;
  }
  leaf.ids.pop_back();
  leaf.keys.resize(size_t{last} * dim_);
  if (where_.empty()) {
    nodes_.clear();
    centroids_.clear();
    built_size_ = inserted_since_build_ = 0;
  }
  return Status::OK();
}

Status GateTree::ValidateQuery(std::span<const float> q) const {
  if (q.size() != dim_) {
    return InvalidArgument("gate query has " + std::to_string(q.size()) + " values, gate keys " +
                           std::to_string(dim_));
  }
  for (float v : q) {
    if (!std::isfinite(v)) return InvalidArgument("gate query contains NaN or Inf");
  }
  return Status::OK();
}

GateResult GateTree::Walk(std::span<const float> q, uint32_t k, uint32_t max_leaves,
                          float radius_weight) const {
  GateResult r;
  if (k == 0 || where_.empty()) return r;
  const float* qp = q.data();
  const double qn = std::sqrt(DotD(qp, qp, dim_));
  const double gamma = DotSlack(dim_);
  // A frontier entry: walk priority, true bound, node. Exact search walks by the bound; the
  // budgeted walk may rank by the soft score q·c + w‖q‖r (see SearchBudget) but prunes and
  // certifies exactness with the bound only.
  struct Entry {
    double prio;
    double ub;
    uint32_t node;
    bool operator<(const Entry& o) const { return prio < o.prio || (prio == o.prio && node > o.node); }
  };
  TopK top(k);
  auto push = [&](std::vector<Entry>* h, uint32_t n) {
    const Node& node = nodes_[n];
    const double m = qn * node.max_norm;
    const double qc = DotD(qp, centroid(n), dim_);
    const double ub = std::min(qc + qn * node.radius, m) + gamma * m;
    if (top.full() && ub < top.worst()) return;  // nothing below can enter the top-k
    const double prio = radius_weight >= 1.f ? ub : std::min(qc + radius_weight * qn * node.radius, m);
    h->push_back(Entry{prio, ub, n});
    std::push_heap(h->begin(), h->end());
  };
  std::vector<Entry> frontier;
  push(&frontier, 0);
  r.cost.nodes_visited = 1;
  while (!frontier.empty()) {
    const Entry e = frontier.front();
    // With bound order, every unvisited key lies below a frontier node whose bound is at most
    // this one: the top-k is final.
    if (top.full() && e.ub < top.worst() && radius_weight >= 1.f) break;
    const Node& node = nodes_[e.node];
    if (node.leaf && !node.ids.empty() && max_leaves != 0 && r.cost.leaves_visited == max_leaves) {
      break;
    }
    std::pop_heap(frontier.begin(), frontier.end());
    frontier.pop_back();
    if (top.full() && e.ub < top.worst()) continue;  // nothing below can enter the top-k
    if (node.leaf) {
      if (node.ids.empty()) continue;
      ++r.cost.leaves_visited;
      const size_t count = node.ids.size();
      for (size_t i = 0; i < count; ++i) {
        top.Offer(Dot(qp, &node.keys[i * dim_], dim_), node.ids[i]);
      }
      r.cost.keys_scored += count;
      continue;
    }
    for (uint32_t c : node.children) {
      ++r.cost.nodes_visited;
      push(&frontier, c);
    }
  }
  // Exact iff no remaining frontier node could still hold a key that enters the top-k.
  r.exact = true;
  for (const Entry& e : frontier) {
    if (!top.full() || e.ub >= top.worst()) {
      if (!nodes_[e.node].leaf || !nodes_[e.node].ids.empty()) r.exact = false;
    }
  }
  top.Emit(&r);
  return r;
}

Result<GateResult> GateTree::SearchExact(std::span<const float> q, uint32_t k) const {
  KVMEM_RETURN_IF_ERROR(ValidateQuery(q));
  return Walk(q, k, 0, 1.f);
}

Result<GateResult> GateTree::SearchBudget(std::span<const float> q, uint32_t k,
                                          uint32_t max_leaves, float radius_weight) const {
  KVMEM_RETURN_IF_ERROR(ValidateQuery(q));
  if (max_leaves == 0) return InvalidArgument("gate tree: leaf budget must be >= 1");
  if (!(radius_weight >= 0.f)) return InvalidArgument("gate tree: radius weight must be >= 0");
  return Walk(q, k, max_leaves, radius_weight);
}

Result<GateResult> GateTree::Scan(std::span<const float> q, uint32_t k) const {
  KVMEM_RETURN_IF_ERROR(ValidateQuery(q));
  GateResult r;
  if (k == 0) return r;
  TopK top(k);
  for (const Node& node : nodes_) {
    if (!node.leaf) continue;
    for (size_t i = 0; i < node.ids.size(); ++i) {
      top.Offer(Dot(q.data(), &node.keys[i * dim_], dim_), node.ids[i]);
    }
    r.cost.keys_scored += node.ids.size();
  }
  top.Emit(&r);
  return r;
}

const float* GateTree::key(uint64_t id) const {
  auto it = where_.find(id);
  if (it == where_.end()) return nullptr;
  return &nodes_[it->second.leaf].keys[size_t{it->second.slot} * dim_];
}

uint32_t GateTree::leaves() const {
  uint32_t n = 0;
  for (const Node& node : nodes_) n += node.leaf && !node.ids.empty();
  return n;
}

uint32_t GateTree::depth() const {
  uint32_t best = 0;
  for (uint32_t n = 0; n < nodes_.size(); ++n) {
    if (!nodes_[n].leaf) continue;
    uint32_t d = 1;
    for (uint32_t a = nodes_[n].parent; a != kNone; a = nodes_[a].parent) ++d;
    best = std::max(best, d);
  }
  return best;
}

uint64_t GateTree::memory_bytes() const {
  uint64_t b = centroids_.capacity() * sizeof(float) + nodes_.capacity() * sizeof(Node);
  for (const Node& node : nodes_) {
    b += node.keys.capacity() * sizeof(float) + node.ids.capacity() * sizeof(uint64_t) +
         node.children.capacity() * sizeof(uint32_t);
  }
  return b + where_.size() * (sizeof(uint64_t) + sizeof(Where) + 2 * sizeof(void*));
}

Status GateTree::CheckInvariants() const {
  size_t count = 0;
  for (uint32_t n = 0; n < nodes_.size(); ++n) {
    const Node& node = nodes_[n];
    if (!node.leaf) {
      for (uint32_t c : node.children) {
        if (c >= nodes_.size() || nodes_[c].parent != n) {
          return Internal("gate tree: node " + std::to_string(c) + " has the wrong parent");
        }
      }
      continue;
    }
    if (node.keys.size() != node.ids.size() * dim_) {
      return Internal("gate tree: leaf " + std::to_string(n) + " key/id count mismatch");
    }
    for (uint32_t i = 0; i < node.ids.size(); ++i) {
      ++count;
      auto it = where_.find(node.ids[i]);
      if (it == where_.end() || it->second.leaf != n || it->second.slot != i) {
        return Internal("gate tree: id " + std::to_string(node.ids[i]) + " misplaced in the map");
      }
      const float* k = &node.keys[size_t{i} * dim_];
      const double norm = std::sqrt(DotD(k, k, dim_));
      for (uint32_t a = n; a != kNone; a = nodes_[a].parent) {
        if (DistanceD(k, centroid(a), dim_) > nodes_[a].radius || norm > nodes_[a].max_norm) {
          return Internal("gate tree: key " + std::to_string(node.ids[i]) +
                          " outside the ball of node " + std::to_string(a));
        }
      }
    }
  }
  if (count != where_.size()) return Internal("gate tree: id map holds keys no leaf holds");
  return Status::OK();
}

}  // namespace kvmem::index
