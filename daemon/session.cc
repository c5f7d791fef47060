#include "daemon/session.h"

#include "daemon/chunk_store.h"
#include "daemon/metrics.h"
#include "daemon/parallel.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <optional>

#include "common/log.h"
#include "common/units.h"

namespace kvmem {
namespace {

// Times a scope into kvmem_attend_phase_seconds{phase}.
class PhaseTimer {
 public:
  explicit PhaseTimer(AttendPhase p) : p_(p), t0_(std::chrono::steady_clock::now()) {}
  ~PhaseTimer() {
    GlobalMetrics().attend_phase[static_cast<int>(p_)].Observe(std::chrono::steady_clock::now() - t0_);
  }
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

 private:
  AttendPhase p_;
  std::chrono::steady_clock::time_point t0_;
};

uint64_t NowMs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

ParallelPool* g_search_pool = nullptr;
ParallelPool* g_append_pool = nullptr;

// The workers an append's copy and NaN/Inf check fan out over: the small append pool when one
// is set, else the search pool.
ParallelPool* AppendWorkers() { return g_append_pool != nullptr ? g_append_pool : g_search_pool; }

// Runs f(0..n-1) on the search pool when one is configured, else in order on this thread.
template <typename F>
void ForEachHead(uint32_t n, F&& f) {
  if (g_search_pool != nullptr) {
    g_search_pool->For(n, f);
  } else {
    for (uint32_t h = 0; h < n; ++h) f(h);
  }
}

}  // namespace

void SetSearchPool(ParallelPool* pool) { g_search_pool = pool; }
void SetAppendPool(ParallelPool* pool) { g_append_pool = pool; }

namespace {

// Non-finite values in K or V (each `elems` long). Large appends are checked in slices on the
// worker pool (the scan costs as much as a copy; on one thread it is the append's bottleneck).
bool AnyNonFinite(const uint8_t* k, const uint8_t* v, DType dtype, size_t elems) {
  constexpr size_t kSliceElems = 128 << 10;
  ParallelPool* workers = AppendWorkers();
  const size_t slices = (elems + kSliceElems - 1) / kSliceElems;
  if (workers == nullptr || workers->threads() == 0 || slices < 2) {
    return HasNonFinite(k, dtype, elems) || HasNonFinite(v, dtype, elems);
  }
  std::atomic<bool> bad{false};
  const size_t esize = DTypeSize(dtype);
  workers->For(static_cast<uint32_t>(2 * slices), [&](uint32_t i) {
    if (bad.load(std::memory_order_relaxed)) return;
    const uint8_t* base = i < slices ? k : v;
    const size_t first = (i % slices) * kSliceElems;
    const size_t count = std::min(kSliceElems, elems - first);
    if (HasNonFinite(base + first * esize, dtype, count)) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

}  // namespace

Status ValidateProfile(const ModelProfile& p, const ProfileLimits& lim) {
  if (p.layers == 0 || p.layers > lim.max_layers) {
    return InvalidArgument("profile: layers must be in [1, " + std::to_string(lim.max_layers) +
                           "], got " + std::to_string(p.layers));
  }
  if (p.kv_heads == 0 || p.q_heads == 0 || p.q_heads > lim.max_heads) {
    return InvalidArgument("profile: q_heads and kv_heads must be in [1, " +
                           std::to_string(lim.max_heads) + "]");
  }
  if (p.q_heads % p.kv_heads != 0) {
    return InvalidArgument("profile: q_heads (" + std::to_string(p.q_heads) +
                           ") must be a multiple of kv_heads (" + std::to_string(p.kv_heads) + ")");
  }
  if (p.head_dim == 0 || p.head_dim > lim.max_head_dim || p.head_dim % 8 != 0) {
    return InvalidArgument("profile: head_dim must be a multiple of 8 in [8, " +
                           std::to_string(lim.max_head_dim) + "], got " +
                           std::to_string(p.head_dim));
  }
  for (uint32_t l : p.dense_layers) {
    if (l >= p.layers) {
      return InvalidArgument("profile: dense layer " + std::to_string(l) + " >= layers " +
                             std::to_string(p.layers));
    }
  }
  if (!p.retrieval_head_mask.empty() &&
      p.retrieval_head_mask.size() != static_cast<size_t>(p.layers) * p.kv_heads) {
    return InvalidArgument("profile: retrieval_head_mask has " +
                           std::to_string(p.retrieval_head_mask.size()) + " entries, expected " +
                           std::to_string(static_cast<size_t>(p.layers) * p.kv_heads));
  }
  return Status::OK();
}

Status ValidateOptions(const SessionOptions& o) {
  KVMEM_RETURN_IF_ERROR(index::Chunker::Validate(o.chunker).WithContext("options"));
  KVMEM_RETURN_IF_ERROR(index::ClusterTree::Validate(o.tree).WithContext("options"));
  KVMEM_RETURN_IF_ERROR(ValidateMemoryOptions(o.memory).WithContext("options"));
  if (!(o.rescore_overfetch >= 1.0f && o.rescore_overfetch <= 64.0f)) {
    return InvalidArgument("options: rescore_overfetch must be in [1, 64]");
  }
  if (static_cast<uint8_t>(o.mode) > static_cast<uint8_t>(SelectionMode::kHybrid)) {
    return InvalidArgument("options: unknown selection mode " +
                           std::to_string(static_cast<int>(o.mode)));
  }
  return ValidateRetrieval(o.retrieval).WithContext("options");
}

Status ValidateRetrieval(const RetrievalOptions& r) {
  if (r.block_tokens == 0 || r.block_tokens > kMaxRetrievalBlockTokens) {
    return InvalidArgument("retrieval_block_tokens must be in [1, " +
                           std::to_string(kMaxRetrievalBlockTokens) + "], got " +
                           std::to_string(r.block_tokens));
  }
  if (r.pooling != kernels::BlockPool::kMax && r.pooling != kernels::BlockPool::kMean) {
    return InvalidArgument("retrieval_block_pooling unknown");
  }
  index::BlockRuleOptions bo;
  bo.rule = r.rule;
  bo.value = r.rule_value;
  return index::ValidateBlockRule(bo);
}

Status CheckHybridProfile(const ModelProfile& p, SelectionMode mode) {
  if (mode != SelectionMode::kRetrievalHeads && mode != SelectionMode::kHybrid) return Status::OK();
  if (std::none_of(p.retrieval_head_mask.begin(), p.retrieval_head_mask.end(),
                   [](uint8_t m) { return m != 0; })) {
    return FailedPrecondition(std::string("mode ") +
                              (mode == SelectionMode::kHybrid ? "hybrid" : "retrieval_heads") +
                              " needs a profile retrieval_head_mask with at least one retrieval "
                              "head (kvmemctl session create --retrieval-heads FILE)");
  }
  return Status::OK();
}

Session::Session(uint64_t id, std::string tenant, ModelProfile profile, SessionOptions options,
                 KVPool* pool, TierContext* tiers)
    : id_(id),
      tenant_(std::move(tenant)),
      profile_(std::move(profile)),
      options_(std::move(options)),
      pool_(pool),
      tail_capacity_(options_.chunker.max_tokens + kMaxLayerSkew),
      chunker_(options_.chunker),
      layers_(profile_.layers),
      kept_(profile_.kv_heads),
      tiers_(tiers) {
  index_enabled_ = options_.mode == SelectionMode::kIndex || options_.mode == SelectionMode::kHybrid;
  index_all_heads_ = options_.mode == SelectionMode::kIndex;
  trees_.reserve(static_cast<size_t>(profile_.layers) * profile_.kv_heads);
  for (size_t i = 0; i < static_cast<size_t>(profile_.layers) * profile_.kv_heads; ++i) {
    trees_.emplace_back(profile_.head_dim, options_.tree);
  }
}

Result<std::unique_ptr<Session>> Session::Create(uint64_t id, std::string tenant,
                                                 ModelProfile profile, SessionOptions options,
                                                 KVPool* pool, TierContext* tiers) {
  KVMEM_RETURN_IF_ERROR(ValidateProfile(profile, ProfileLimits{}));
  KVMEM_RETURN_IF_ERROR(ValidateOptions(options));
  KVMEM_RETURN_IF_ERROR(CheckHybridProfile(profile, options.mode));
  std::unique_ptr<Session> s(
      new Session(id, std::move(tenant), std::move(profile), std::move(options), pool, tiers));
  KVMEM_RETURN_IF_ERROR(s->Init());
  return s;
}

Status Session::Init() {
  const uint64_t bytes = BlockBytes(tail_capacity_);
  for (uint32_t l = 0; l < profile_.layers; ++l) {
    auto off = pool_->Allocate(bytes);
    if (!off.ok()) {
      for (uint32_t j = 0; j < l; ++j) pool_->Free(layers_[j].tail_block);
      layers_.clear();
      return off.status().WithContext("session tail buffers");
    }
    layers_[l].tail_block = *off;
  }
  stat_bytes_ = pool_->allocator().ReservedBytes(bytes) * profile_.layers;
  if (options_.memory.enabled()) {
    memory_ = std::make_unique<MemoryStore>(options_.memory, pool_, nullptr);
    // Payloads share the chunks' tiers: allocated like chunk blocks (making room when the
    // pool is full), ticked by this session's ops, evicted and fetched back like them.
    MemoryTierHooks hooks;
    hooks.allocate = [this](uint64_t bytes) { return AllocateBlock(bytes); };
    hooks.tick = [this] { return op_tick_; };
    hooks.tiers = tiers_;
    hooks.tenant = tenant_;
    hooks.session = id_;
    memory_->SetTierHooks(std::move(hooks));
  }
  created_ms_ = NowMs();
  last_used_ms_ = created_ms_.load();
  return Status::OK();
}

Session::~Session() {
  if (device_index_) {
    for (size_t l = 0; l < device_index_->table_block.size(); ++l) {
      if (device_index_->table_capacity[l] > 0) pool_->Free(device_index_->table_block[l]);
    }
  }
  for (const Layer& l : layers_) pool_->Free(l.tail_block);
  for (Chunk& c : chunks_)
    for (Block& b : c.blocks) FreeBlock(c.tokens, b);
  if ((spilled_ || (memory_ && memory_->spilled())) && tiers_ != nullptr &&
      tiers_->store() != nullptr) {
    if (Status s = tiers_->store()->DeleteSpill(tenant_, id_); !s.ok()) {
      // Unreachable records only: the spill family is emptied at the next start.
      KVMEM_LOG_WARN("session {}: {}", id_, s.ToString());
    }
  }
}

void Session::FreeBlock(uint32_t tokens, Block& b) {
  if (b.dev != kNotResident) {
    pool_->Free(b.dev);
    b.dev = kNotResident;
  }
  if (b.host) {
    b.host.reset();
    if (tiers_ != nullptr) tiers_->ReleaseHost(BlockBytes(tokens));
  }
}

Result<uint64_t> Session::AllocateBlock(uint64_t bytes) {
  auto off = pool_->Allocate(bytes);
  if (off.ok() || tiers_ == nullptr || !tiers_->make_room) return off;
  if (off.status().code() != StatusCode::kResourceExhausted) return off;
  // Freed bytes need not be usable for this size class (slabs hold one class each): ask for
  // more while eviction still frees something.
  const uint64_t want = pool_->allocator().ReservedBytes(bytes);
  Status room;
  for (uint64_t ask = want; ask <= pool_->allocator().capacity_bytes(); ask *= 4) {
    room = tiers_->make_room(this, ask);
    off = pool_->Allocate(bytes);
    if (off.ok()) return off;
    if (!room.ok()) break;
  }
  return ResourceExhausted("KV pool full (" + FormatBytes(pool_->allocator().allocated_bytes()) +
                           " of " + FormatBytes(pool_->allocator().capacity_bytes()) +
                           " in use) and eviction could not free " + FormatBytes(want) +
                           (room.ok() ? std::string() : ": " + room.message()));
}

uint64_t Session::BlockBytes(uint32_t stride_tokens) const {
  return 2ull * profile_.kv_heads * stride_tokens * profile_.head_dim * DTypeSize(profile_.dtype);
}

uint64_t Session::ElemOffset(uint64_t byte_offset) const {
  return byte_offset / DTypeSize(profile_.dtype);
}

void Session::TouchNow() { last_used_ms_.store(NowMs(), std::memory_order_relaxed); }

Status Session::SealAndStore(std::span<const uint32_t> sealed, uint32_t n, const uint8_t* keys,
                             const uint8_t* values, bool check_input, std::vector<uint64_t>* landed) {
  const uint32_t L = profile_.layers, H = profile_.kv_heads, D = profile_.head_dim;
  const uint64_t esize = DTypeSize(profile_.dtype);
  const uint64_t row = uint64_t{D} * esize;

  // Allocate every block first so a full pool leaves the session untouched.
  std::vector<Chunk> fresh(sealed.size());
  uint64_t pos = 0, reserved = 0;
  for (size_t i = 0; i < sealed.size(); ++i) {
    fresh[i].start = chunker_.sealed_tokens() + pos;  // caller updates chunker_ after success
    fresh[i].tokens = sealed[i];
    pos += sealed[i];
    const uint64_t bytes = BlockBytes(sealed[i]);
    fresh[i].blocks.resize(L);
    for (uint32_t l = 0; l < L; ++l) {
      if (landed != nullptr) {  // received in place: the block is the plan's
        fresh[i].blocks[l].dev = (*landed)[i * L + l];
        fresh[i].blocks[l].tick = op_tick_;
        reserved += pool_->allocator().ReservedBytes(bytes);
        continue;
      }
      auto off = AllocateBlock(bytes);
      if (!off.ok()) {
        for (auto& c : fresh)
          for (Block& b : c.blocks) FreeBlock(c.tokens, b);
        return off.status();
      }
      fresh[i].blocks[l].dev = *off;
      fresh[i].blocks[l].tick = op_tick_;
      reserved += pool_->allocator().ReservedBytes(bytes);
    }
  }
  const uint64_t consumed = pos;
  if (landed != nullptr) landed->clear();  // the blocks are fresh's now (freed below on failure)
  std::vector<std::pair<uint64_t, uint64_t>> landed_rows;  // (pool offset, bytes) to check in place

  // Phase 1: fill every new chunk block (rows from the old tail, then from the input). The copies
  // are independent, so they go to the pool as one batch (streamed, and spread over the worker
  // threads when large).
  std::vector<PoolCopy> fills;
  fills.reserve(size_t{L} * fresh.size() * H * 4);
  for (uint32_t l = 0; l < L; ++l) {
    const Layer& layer = layers_[l];
    const uint64_t T = layer.tail_tokens;
    const uint64_t tail_k = layer.tail_block;
    const uint64_t tail_v = tail_k + uint64_t{H} * tail_capacity_ * row;
    // Stream rows [a, a+count) of head h (K and V) go to pool offsets dk / dv.
    auto copy_rows = [&](uint32_t h, uint64_t a, uint64_t count, uint64_t dk, uint64_t dv) {
      if (a < T) {
        const uint64_t m = std::min(count, T - a);
        const uint64_t src = (uint64_t{h} * tail_capacity_ + a) * row;
        fills.push_back({dk, nullptr, tail_k + src, m * row});
        fills.push_back({dv, nullptr, tail_v + src, m * row});
        a += m;
        count -= m;
        dk += m * row;
        dv += m * row;
      }
      if (count > 0 && landed != nullptr) {  // already there
        if (check_input) {
          landed_rows.push_back({dk, count * row});
          landed_rows.push_back({dv, count * row});
        }
      } else if (count > 0) {
        const uint64_t src = ((uint64_t{l} * H + h) * n + (a - T)) * row;
        fills.push_back({dk, keys + src, 0, count * row});
        fills.push_back({dv, values + src, 0, count * row});
      }
    };
    uint64_t p = 0;
    for (const Chunk& c : fresh) {
      const uint64_t k0 = c.blocks[l].dev;
      const uint64_t v0 = k0 + uint64_t{H} * c.tokens * row;
      for (uint32_t h = 0; h < H; ++h) {
        copy_rows(h, p, c.tokens, k0 + uint64_t{h} * c.tokens * row, v0 + uint64_t{h} * c.tokens * row);
      }
      p += c.tokens;
    }
  }
  // With check_input, NaN / Inf in the input are found on the way: by the batch for the rows that
  // fill chunks, here for the rows bound for the tails (before any tail changes).
  std::optional<DType> check;
  if (check_input) check = profile_.dtype;
  Status st = pool_->CopyBatch(fills, AppendWorkers(), check);
  if (st.ok() && !landed_rows.empty()) {
    // Rows received in place are checked where they landed (a read pass, no copy); the pool is
    // host memory (LandingHolds).
    const auto* base = static_cast<const uint8_t*>(pool_->base());
    std::atomic<bool> bad{false};
    uint64_t total = 0;
    for (const auto& r : landed_rows) total += r.second;
    auto check_one = [&](uint32_t i) {
      if (bad.load(std::memory_order_relaxed)) return;
      const auto& r = landed_rows[i];
      if (HasNonFinite(base + r.first, profile_.dtype, r.second / esize)) bad.store(true, std::memory_order_relaxed);
    };
    if (ParallelPool* w = AppendWorkers(); w != nullptr && w->threads() > 0 && total >= (256u << 10)) {
      w->For(static_cast<uint32_t>(landed_rows.size()), check_one);
    } else {
      for (uint32_t i = 0; i < landed_rows.size(); ++i) check_one(i);
    }
    if (bad.load()) st = InvalidArgument("keys or values contain NaN or Inf");
  }
  if (st.ok() && check_input && n > 0) {
    for (uint32_t l = 0; l < L && st.ok(); ++l) {
      const uint64_t T = layers_[l].tail_tokens;
      const uint64_t first = consumed > T ? consumed - T : 0;  // first input row kept in the tail
      for (uint32_t h = 0; h < H && st.ok(); ++h) {
        const uint64_t src = ((uint64_t{l} * H + h) * n + first) * row;
        if (HasNonFinite(keys + src, profile_.dtype, (n - first) * D) ||
            HasNonFinite(values + src, profile_.dtype, (n - first) * D)) {
          st = InvalidArgument("keys or values contain NaN or Inf");
        }
      }
    }
  }
  if (!st.ok()) {
    for (auto& c : fresh)
      for (Block& b : c.blocks) FreeBlock(c.tokens, b);
    return st;
  }

  // Phase 2, per layer: the rest of the stream becomes the tail (shift the old rows left, then
  // append the new ones), and the new chunks join the layer's spans. A decode step's seal (no
  // input rows: the tokens are in the tail already) that seals a chunk times its copies and
  // index catch-up.
  const bool decode_seal = keys == nullptr && !fresh.empty();
  std::optional<PhaseTimer> copies_timer;
  if (decode_seal) copies_timer.emplace(AttendPhase::kSealCopies);
  for (uint32_t l = 0; l < L; ++l) {
    Layer& layer = layers_[l];
    const uint64_t T = layer.tail_tokens;
    const uint64_t tail_k = layer.tail_block;
    const uint64_t tail_v = tail_k + uint64_t{H} * tail_capacity_ * row;
    for (const Chunk& c : fresh) layer.chunk_spans.push_back({ElemOffset(c.blocks[l].dev), c.tokens, 0, c.tokens});
    if (!fresh.empty()) ++layer.spans_key;  // (every completed token comes here, most seal nothing)
    const uint64_t rest = T + n - consumed;
    if (rest > tail_capacity_) return Internal("tail overflow while sealing");
    // The old rows that stay shift left (every head's K and V in one batch of moves), then the
    // new ones land after them (one batch of copies).
    std::vector<PoolCopy> moves, lands;
    for (uint32_t h = 0; h < H; ++h) {
      const uint64_t dk = tail_k + uint64_t{h} * tail_capacity_ * row;
      const uint64_t dv = tail_v + uint64_t{h} * tail_capacity_ * row;
      if (consumed < T) {
        const uint64_t m = T - consumed;
        moves.push_back({dk, nullptr, dk + consumed * row, m * row});
        moves.push_back({dv, nullptr, dv + consumed * row, m * row});
        if (n > 0) {
          const uint64_t src = (uint64_t{l} * H + h) * n * row;
          lands.push_back({dk + m * row, keys + src, 0, n * row});
          lands.push_back({dv + m * row, values + src, 0, n * row});
        }
      } else if (rest > 0) {
        const uint64_t src = ((uint64_t{l} * H + h) * n + (consumed - T)) * row;
        lands.push_back({dk, keys + src, 0, rest * row});
        lands.push_back({dv, values + src, 0, rest * row});
      }
    }
    if (!moves.empty()) KVMEM_RETURN_IF_ERROR(pool_->MoveWithin(moves));
    if (!lands.empty()) KVMEM_RETURN_IF_ERROR(pool_->CopyBatch(lands, nullptr));
    layer.tail_tokens = static_cast<uint32_t>(rest);
  }
  copies_timer.reset();
  for (Chunk& c : fresh) chunks_.push_back(std::move(c));
  stat_bytes_ += reserved;
  stat_chunks_ = chunks_.size();
  if (!index_enabled_) return Status::OK();
  std::optional<PhaseTimer> index_timer;
  if (decode_seal) index_timer.emplace(AttendPhase::kSealIndex);
  return CatchUpIndex(index_all_heads_);
}

bool Session::IsDenseLayer(uint32_t layer) const {
  return std::find(profile_.dense_layers.begin(), profile_.dense_layers.end(), layer) !=
         profile_.dense_layers.end();
}

Status Session::KeysAsFloat(uint32_t layer, uint32_t head, uint32_t chunk, float* out) const {
  const Chunk& c = chunks_[chunk];
  const uint64_t esize = DTypeSize(profile_.dtype);
  const uint64_t elems = uint64_t{c.tokens} * profile_.head_dim;
  const uint64_t at = uint64_t{head} * elems * esize;
  const uint64_t dev = c.blocks[layer].dev;
  if (pool_->is_host() && dev != kNotResident) {
    ConvertToFloat(static_cast<const uint8_t*>(pool_->base()) + dev + at, profile_.dtype, elems, out);
    return Status::OK();
  }
  // Exact search reads keys where they are (no fetch-back: it may touch most chunks).
  std::vector<uint8_t> staging(elems * esize);
  KVMEM_RETURN_IF_ERROR(ReadBlock(chunk, layer, at, staging.size(), staging.data()));
  ConvertToFloat(staging.data(), profile_.dtype, elems, out);
  return Status::OK();
}

bool Session::TreeNeeded(uint32_t layer, uint32_t head) const {
  return index_all_heads_ || (profile_.IsRetrievalHead(layer, head) && !IsDenseLayer(layer));
}

Status Session::CatchUpIndex(bool all_heads) {
  index_enabled_ = true;
  index_all_heads_ = index_all_heads_ || all_heads;
  const uint32_t L = profile_.layers, H = profile_.kv_heads, D = profile_.head_dim;
  // Each needed tree holds chunks [0, num_chunks()); trees that became needed later (an index
  // request on a hybrid session) catch up from their own start.
  size_t first = chunks_.size();
  for (uint32_t l = 0; l < L; ++l)
    for (uint32_t h = 0; h < H; ++h)
      if (TreeNeeded(l, h)) first = std::min<size_t>(first, trees_[static_cast<size_t>(l) * H + h].num_chunks());
  if (first == chunks_.size()) return Status::OK();
  const uint64_t esize = DTypeSize(profile_.dtype);
  // The (chunk, layer) blocks whose keys some tree still needs, in chunk order (a tree takes its
  // chunks in order). On a device pool the keys of many blocks are read out together (one wait
  // for a batch instead of one per block: a seal reads its chunk in every layer); a batch stops
  // at kBatchBytes of staged keys.
  constexpr uint64_t kBatchBytes = uint64_t{32} << 20;
  struct Item {
    uint32_t chunk, layer;
    uint64_t at;  // its keys in `staging` (device blocks) or kNotResident (read in place)
  };
  std::vector<Item> batch;
  std::vector<uint8_t> staging;
  std::vector<float> keys;
  auto summarize = [&](const Item& it) -> Status {
    const uint32_t c = it.chunk, l = it.layer, n = chunks_[c].tokens;
    const uint64_t elems = uint64_t{H} * n * D;  // every head's keys: one contiguous block
    keys.resize(elems);
    const uint64_t off = chunks_[c].blocks[l].dev;
    if (it.at != kNotResident) {
      ConvertToFloat(staging.data() + it.at, profile_.dtype, elems, keys.data());
    } else if (pool_->is_host() && off != kNotResident) {
      ConvertToFloat(static_cast<const uint8_t*>(pool_->base()) + off, profile_.dtype, elems, keys.data());
    } else {
      std::vector<uint8_t> block(elems * esize);
      KVMEM_RETURN_IF_ERROR(ReadBlock(c, l, 0, block.size(), block.data()));
      ConvertToFloat(block.data(), profile_.dtype, elems, keys.data());
    }
    for (uint32_t h = 0; h < H; ++h) {
      index::ClusterTree& tree = trees_[static_cast<size_t>(l) * H + h];
      if (!TreeNeeded(l, h) || tree.num_chunks() != c) continue;
      KVMEM_ASSIGN_OR_RETURN(index::ChunkSummary summary,
                             index::SummarizeKeys(keys.data() + uint64_t{h} * n * D, n, D));
      KVMEM_RETURN_IF_ERROR(tree.Insert(c, summary, n));
    }
    return Status::OK();
  };
  auto block_bytes = [&](uint32_t c) { return uint64_t{H} * chunks_[c].tokens * D * esize; };
  auto flush = [&]() -> Status {
    std::vector<PoolRead> reads;
    for (const Item& it : batch) {
      if (it.at == kNotResident) continue;
      reads.push_back({staging.data() + it.at, chunks_[it.chunk].blocks[it.layer].dev,
                       block_bytes(it.chunk)});
    }
    if (!reads.empty()) KVMEM_RETURN_IF_ERROR(pool_->CopyOutBatch(reads));
    for (const Item& it : batch) KVMEM_RETURN_IF_ERROR(summarize(it));
    batch.clear();
    staging.clear();
    return Status::OK();
  };
  for (size_t c = first; c < chunks_.size(); ++c) {
    const uint64_t bytes = block_bytes(static_cast<uint32_t>(c));
    for (uint32_t l = 0; l < L; ++l) {
      // A tree needs chunk c when it holds fewer (the chunks before c are ahead in the batch).
      bool any = false;
      for (uint32_t h = 0; h < H && !any; ++h) {
        any = TreeNeeded(l, h) && trees_[static_cast<size_t>(l) * H + h].num_chunks() <= c;
      }
      if (!any) continue;
      const uint64_t off = chunks_[c].blocks[l].dev;
      Item it{static_cast<uint32_t>(c), l, kNotResident};
      if (!pool_->is_host() && off != kNotResident) {
        if (staging.size() + bytes > kBatchBytes && !batch.empty()) KVMEM_RETURN_IF_ERROR(flush());
        it.at = staging.size();
        staging.resize(staging.size() + bytes);
      }
      batch.push_back(it);
    }
  }
  KVMEM_RETURN_IF_ERROR(flush());
  // A large catch-up (prefill, or the first index request on a dense session) clusters now
  // rather than searching a flat list until the next upkeep.
  if (chunks_.size() - first > options_.tree.min_chunks_to_cluster) Maintain();
  return Status::OK();
}

void Session::Maintain() {
  if (!index_enabled_) return;
  {
    PhaseTimer timer(AttendPhase::kMaintainTrees);
    for (index::ClusterTree& t : trees_) {
      if (t.NeedsMaintenance()) t.Maintain();
    }
  }
  // Off the request path too: bring device mirrors that are in use up to date.
  if (device_index_) {
    PhaseTimer timer(AttendPhase::kMaintainDevice);
    for (uint32_t l = 0; l < profile_.layers; ++l) {
      if (device_index_->table_len[l] > 0) (void)SyncDeviceIndex(l);
    }
  }
}

namespace {

// KVMEM_DEVICE_SCAN=off: retrieval heads score keys staged to the host even on the CUDA
// backend (A/B runs).
bool DeviceScanEnabled() {
  static const bool on = [] {
    const char* e = std::getenv("KVMEM_DEVICE_SCAN");
    return e == nullptr || std::string(e) != "off";
  }();
  return on;
}

// KVMEM_DEVICE_NEW_ROWS=copy: a decode step's new rows are copied into the tail before the
// device search instead of being written by it (A/B runs).
bool FusedNewRows() {
  static const bool on = [] {
    const char* e = std::getenv("KVMEM_DEVICE_NEW_ROWS");
    return e == nullptr || std::string(e) != "copy";
  }();
  return on;
}

// KVMEM_DEVICE_SEARCH=off keeps the index search on the host with the CUDA backend (A/B runs).
bool DeviceSearchEnabled() {
  static const bool on = [] {
    const char* e = std::getenv("KVMEM_DEVICE_SEARCH");
    return e == nullptr || std::string(e) != "off";
  }();
  return on;
}

}  // namespace

bool Session::UseDeviceSearch() const {
  const index::BudgetSearchOptions& so = options_.search;
  return DeviceSearchEnabled() && pool_->has_device_search() &&
         so.traversal == index::BudgetTraversal::kBestFirst &&
         so.aggregation == index::GroupAggregation::kMeanQuery &&
         options_.rescore_overfetch <= 1.0f && !options_.rescore_tokens &&
         options_.tree.levels <= kernels::kTreeSearchMaxLevels;
}

Status Session::SyncDeviceIndex(uint32_t layer) {
  const uint32_t L = profile_.layers, H = profile_.kv_heads;
  if (!device_index_) {
    device_index_ = std::make_unique<DeviceIndex>();
    device_index_->trees.resize(size_t{L} * H);
    device_index_->exports.resize(size_t{L} * H);
    device_index_->tree_version.assign(size_t{L} * H, ~0ull);
    device_index_->table_block.assign(L, 0);
    device_index_->table_capacity.assign(L, 0);
    device_index_->table_len.assign(L, 0);
  }
  DeviceIndex& di = *device_index_;
  // Every head that moved: exported, then synced together (one staged upload on the device).
  // Nothing is allocated when none moved (every Attend and every reply's upkeep asks).
  std::vector<size_t> synced;
  for (uint32_t h = 0; h < H; ++h) {
    const size_t i = size_t{layer} * H + h;
    if (!di.trees[i]) di.trees[i] = std::make_unique<kernels::cuda::DeviceTree>();
    const bool current = di.tree_version[i] == trees_[i].version() &&
                         di.trees[i]->chunks_held() == trees_[i].num_chunks();
    if (!current) synced.push_back(i);
  }
  if (!synced.empty()) {
    std::vector<KVPool::TreeSync> syncs(synced.size());
    std::optional<PhaseTimer> export_timer(std::in_place, AttendPhase::kMirrorExport);
    for (size_t k = 0; k < synced.size(); ++k) {
      const index::ClusterTree& tree = trees_[synced[k]];
      kernels::cuda::DeviceTree& dt = *di.trees[synced[k]];
      kernels::FlatTree& flat = di.exports[synced[k]];
      // Only what the mirror lacks: the new chunks, and the node rows whose stamps moved.
      const kernels::NodeRowsHeld held = dt.rows_held();
      tree.ExportFlat(&flat, dt.chunks_epoch() == tree.chunks_epoch() ? dt.chunks_held() : 0,
                      &held);
      syncs[k] = {&dt, &flat};
    }
    export_timer.reset();
    std::optional<PhaseTimer> upload_timer(std::in_place, AttendPhase::kMirrorUpload);
    const Status st = pool_->SyncTrees(syncs).WithContext("device tree mirror");
    upload_timer.reset();
    for (size_t i : synced) {
      // A whole export's rows (a first sync, a Build, another lineage) are megabytes; the
      // exports after it carry a chunk and a few rows.
      kernels::FlatTree& flat = di.exports[i];
      auto release = [](auto& v, size_t cap) {
        if (v.capacity() > cap) std::remove_reference_t<decltype(v)>().swap(v);
      };
      release(flat.chunk_centroids, size_t{16} << 10);
      release(flat.node_centroids, size_t{16} << 10);
      release(flat.chunk_radius, 4096);
      release(flat.chunk_tokens, 4096);
      release(flat.chunk_start, 4096);
    }
    KVMEM_RETURN_IF_ERROR(st);
    for (size_t i : synced) di.tree_version[i] = trees_[i].version();
  }
  // The layer's chunk-block table (element offsets), append-only, in a pool block.
  const Layer& lay = layers_[layer];
  const uint64_t n = lay.chunk_spans.size();
  uint64_t from = di.table_len[layer];
  if (n > di.table_capacity[layer]) {
    const uint64_t cap = std::max<uint64_t>(256, n * 2);
    KVMEM_ASSIGN_OR_RETURN(uint64_t block, pool_->Allocate(cap * sizeof(uint64_t)));
    if (di.table_capacity[layer] > 0) pool_->Free(di.table_block[layer]);
    di.table_block[layer] = block;
    di.table_capacity[layer] = cap;
    from = 0;
  }
  if (from < n) {
    std::vector<uint64_t> offs(n - from);
    for (uint64_t c = from; c < n; ++c) offs[c - from] = lay.chunk_spans[c].offset;
    KVMEM_RETURN_IF_ERROR(pool_->CopyIn(di.table_block[layer] + from * sizeof(uint64_t), offs.data(),
                                        offs.size() * sizeof(uint64_t)));
  }
  di.table_len[layer] = n;
  return Status::OK();
}

Status Session::AttendOnDevice(const AttendArgs& a, uint32_t budget, AttendInfo* info,
                               bool new_rows) {
  const uint32_t H = profile_.kv_heads, D = profile_.head_dim;
  {
    PhaseTimer t(AttendPhase::kDeviceSync);
    KVMEM_RETURN_IF_ERROR(SyncDeviceIndex(a.layer));
  }
  const Layer& layer = layers_[a.layer];
  std::vector<kernels::FlatTreeView> views(H);
  for (uint32_t h = 0; h < H; ++h) views[h] = device_index_->trees[size_t{a.layer} * H + h]->view();
  DeviceSearchRequest req;
  kernels::cuda::SearchAttendProblem& p = req.problem;
  p.attend.kv_dtype = profile_.dtype;
  p.attend.q_heads = profile_.q_heads;
  p.attend.kv_heads = H;
  p.attend.head_dim = D;
  p.attend.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.attend.q = a.q;
  p.attend.q_dtype = a.q_dtype;
  p.attend.out = a.out;
  p.attend.out_dtype = a.out_dtype;
  p.attend.lse = a.lse;
  p.trees = views.data();
  p.chunk_block = reinterpret_cast<const uint64_t*>(static_cast<const uint8_t*>(pool_->base()) +
                                                    device_index_->table_block[a.layer]);
  const index::BudgetSearchOptions& so = options_.search;
  p.params.budget_tokens = budget;
  p.params.skip_tokens_below = options_.sink_tokens;
  p.params.max_consecutive_misfits = so.max_consecutive_misfits;
  p.params.node_radius_weight = so.node_radius_weight;
  p.params.chunk_radius_weight = so.chunk_radius_weight;
  p.sink_tokens = options_.sink_tokens;
  const uint64_t sealed = chunks_.empty() ? 0 : chunks_.back().start + chunks_.back().tokens;
  p.recent_from = sealed > options_.recent_window ? sealed - options_.recent_window : 0;
  p.recent_window = options_.recent_window;
  p.tail = {ElemOffset(layer.tail_block), tail_capacity_, 0, layer.tail_tokens};
  req.want_selection = info != nullptr && a.want_selection;
  if (new_rows) {
    req.new_k = a.new_k;
    req.new_v = a.new_v;
  }
  DeviceSearchReply rep;
  {
    PhaseTimer t(AttendPhase::kDeviceSearchAttend);
    KVMEM_RETURN_IF_ERROR(pool_->SearchAttend(&req, &rep));
  }
  for (uint32_t h = 0; h < H; ++h) {
    if (rep.heads[h].status != 0) {
      return Unavailable("device search: KV head " + std::to_string(h) + " of layer " +
                         std::to_string(a.layer) + " is over the device search's limits (status " +
                         std::to_string(rep.heads[h].status) + ")");
    }
  }
  if (info == nullptr) return Status::OK();
  info->device_search = true;
  info->tokens_attended.assign(H, 0);
  for (uint32_t h = 0; h < H; ++h) {
    info->tokens_attended[h] = rep.heads[h].attended_tokens;
    info->nodes_visited += rep.heads[h].nodes_scored;
    info->bytes_read += uint64_t{rep.heads[h].nodes_scored} * (uint64_t{D} * 4 + 8);
  }
  if (req.want_selection) {
    info->selection.assign(H, HeadSelection{});
    for (uint32_t h = 0; h < H; ++h) {
      HeadSelection& hs = info->selection[h];
      hs.kv_head = h;
      const uint32_t* ids = rep.selected.data() + size_t{h} * rep.max_selected;
      const float* sc = rep.scores.data() + size_t{h} * rep.max_selected;
      std::vector<uint32_t> order(rep.heads[h].num_selected);
      for (uint32_t i = 0; i < order.size(); ++i) order[i] = i;
      // As SearchBudget reports it: by score, ties by lower chunk id.
      std::sort(order.begin(), order.end(), [&](uint32_t x, uint32_t y) {
        return sc[x] != sc[y] ? sc[x] > sc[y] : ids[x] < ids[y];
      });
      for (uint32_t i : order) {
        hs.chunks.push_back(ids[i]);
        hs.scores.push_back(sc[i]);
        hs.starts.push_back(chunks_[ids[i]].start);
        hs.ends.push_back(chunks_[ids[i]].start + chunks_[ids[i]].tokens);
      }
    }
  }
  return Status::OK();
}

LayerIndexInfo Session::IndexInfo(uint32_t layer) const {
  LayerIndexInfo info;
  for (uint32_t h = 0; h < profile_.kv_heads; ++h) {
    const index::TreeStats st = trees_[static_cast<size_t>(layer) * profile_.kv_heads + h].Stats();
    info.depth = std::max(info.depth, st.depth);
    if (info.nodes_per_level.size() < st.nodes_per_level.size()) {
      info.nodes_per_level.resize(st.nodes_per_level.size(), 0);
    }
    for (size_t i = 0; i < st.nodes_per_level.size(); ++i) info.nodes_per_level[i] += st.nodes_per_level[i];
  }
  return info;
}

namespace {

// Reads one layer's chunk keys for exact search.
class SessionKeySource final : public index::ChunkKeySource {
 public:
  SessionKeySource(std::function<Status(uint32_t, float*)> read) : read_(std::move(read)) {}
  Status ReadKeys(uint32_t chunk, float* out) const override { return read_(chunk, out); }

 private:
  std::function<Status(uint32_t, float*)> read_;
};

}  // namespace

std::span<const float> Session::GroupQueries(const std::vector<float>& qf, uint32_t h) const {
  const size_t n = size_t{profile_.group()} * profile_.head_dim;
  return std::span<const float>(qf.data() + h * n, n);
}

Status Session::SelectChunks(uint32_t layer, const std::vector<float>& qf, uint32_t budget,
                             std::vector<HeadSelection>* out, uint64_t* nodes, uint64_t* bytes,
                             const std::vector<bool>* only) const {
  const uint32_t H = profile_.kv_heads, D = profile_.head_dim, G = profile_.group();
  index::BudgetSearchOptions so = options_.search;
  so.skip_tokens_below = options_.sink_tokens;
  out->assign(H, HeadSelection{});
  std::vector<Status> status(H);
  std::vector<index::Selection> sels(H);
  const bool rescore = options_.rescore_overfetch > 1.0f || options_.rescore_tokens;
  const uint32_t search_budget =
      rescore ? static_cast<uint32_t>(std::min<double>(
                    static_cast<double>(budget) * options_.rescore_overfetch, double{UINT32_MAX}))
              : budget;
  // A device pool rescores every head's candidates in one launch after all the searches; the
  // host pool reads the candidates' keys in place, each head right after its search.
  const bool batched = rescore && !pool_->is_host();
  std::vector<RescoreCandidates> cands(rescore ? H : 0);
  // KV heads are independent trees: search them in parallel when a pool is configured.
  auto search = [&](uint32_t h) {
    if (only != nullptr && !(*only)[h]) return;
    const index::ClusterTree& tree = trees_[static_cast<size_t>(layer) * H + h];
    auto sel = tree.SearchBudget(GroupQueries(qf, h), search_budget, so);
    if (!sel.ok()) {
      status[h] = sel.status();
      return;
    }
    sels[h] = std::move(*sel);
    if (!rescore) return;
    cands[h] = CollectCandidates(sels[h], layer);
    sels[h].cost.bytes_read += cands[h].prefix.back() * uint64_t{D} * DTypeSize(profile_.dtype);
    if (!batched) status[h] = HostHeadLogits(layer, h, qf, &cands[h]);
  };
  // Rescoring's sub-phases of host_search (rescore_search, _logits, _select); the host pool's
  // logits are computed inside each head's search task and counted with rescore_search.
  AttendPhaseClock phases;
  // Host rescoring may read keys from a colder tier (not safe to run concurrently): sequential then.
  if (rescore && !batched && stat_evicted_.load(std::memory_order_relaxed) != 0) {
    for (uint32_t h = 0; h < H; ++h) search(h);
  } else {
    ForEachHead(H, search);
  }
  for (uint32_t h = 0; h < H; ++h) KVMEM_RETURN_IF_ERROR(status[h]);
  if (rescore) phases.Mark(AttendPhase::kRescoreSearch);
  if (batched) {
    KVMEM_RETURN_IF_ERROR(DeviceCandidateLogits(layer, qf, only, &cands));
    phases.Mark(AttendPhase::kRescoreLogits);
  }
  auto finish = [&](uint32_t h) {
    if (only != nullptr && !(*only)[h]) return;
    index::Selection& sel = sels[h];
    std::vector<TokenRange> ranges;  // token-granular rescoring: the part of each chunk taken
    if (rescore) FinishRescore(G, budget, cands[h], &sel, &ranges);
    HeadSelection& hs = (*out)[h];
    hs.kv_head = h;
    hs.chunks = std::move(sel.chunks);
    hs.scores = std::move(sel.scores);
    for (size_t i = 0; i < hs.chunks.size(); ++i) {
      const Chunk& ch = chunks_[hs.chunks[i]];
      hs.starts.push_back(ranges.empty() ? ch.start : ch.start + ranges[i].begin);
      hs.ends.push_back(ranges.empty() ? ch.start + ch.tokens : ch.start + ranges[i].end);
    }
  };
  if (rescore) {
    ForEachHead(H, finish);
    phases.Mark(AttendPhase::kRescoreSelect);
  } else {
    for (uint32_t h = 0; h < H; ++h) finish(h);
  }
  for (uint32_t h = 0; h < H; ++h) {
    *nodes += sels[h].cost.nodes_visited;
    *bytes += sels[h].cost.bytes_read;
  }
  return Status::OK();
}

Session::RescoreCandidates Session::CollectCandidates(const index::Selection& sel, uint32_t layer) const {
  const uint64_t S = options_.sink_tokens;
  RescoreCandidates cand;
  const size_t n = sel.chunks.size();
  cand.chunks.reserve(n);
  cand.first.reserve(n);
  cand.prefix.reserve(n + 1);
  cand.dev.reserve(n);
  cand.stride.reserve(n);
  cand.prefix.push_back(0);
  for (uint32_t c : sel.chunks) {
    const Chunk& ch = chunks_[c];
    const uint64_t first = std::max<uint64_t>(S, ch.start);  // sinks are attended anyway
    if (first >= ch.start + ch.tokens) continue;
    cand.chunks.push_back(c);
    cand.first.push_back(static_cast<uint32_t>(first - ch.start));
    cand.prefix.push_back(cand.prefix.back() + static_cast<uint32_t>(ch.start + ch.tokens - first));
    cand.dev.push_back(ch.blocks[layer].dev);
    cand.stride.push_back(ch.tokens);
  }
  cand.logits.resize(size_t{cand.prefix.back()} * profile_.group());
  return cand;
}

namespace {

float RescoreScale(uint32_t head_dim) { return 1.f / std::sqrt(static_cast<float>(head_dim)); }

}  // namespace

Status Session::HostCandidateLogits(uint32_t layer, uint32_t h, std::span<const float> group,
                                    RescoreCandidates* cand, size_t i) const {
  const uint32_t D = profile_.head_dim;
  const uint32_t G = static_cast<uint32_t>(group.size() / D);
  const uint32_t tokens = cand->stride[i];  // the chunk's, as CollectCandidates read them
  const uint64_t esize = DTypeSize(profile_.dtype);
  const uint64_t head_elems = uint64_t{tokens} * D;
  const uint64_t dev = cand->dev[i];
  // Head h's keys of the block as one head of `kv_heads = 1`: in place, or staged.
  const void* keys = nullptr;
  uint64_t offset = 0;
  std::vector<uint8_t> staging;
  if (pool_->is_host() && dev != kNotResident) {
    keys = pool_->base();
    offset = ElemOffset(dev) + h * head_elems;
  } else {
    // Exact rescoring reads keys where they are (no fetch-back).
    staging.resize(head_elems * esize);
    KVMEM_RETURN_IF_ERROR(ReadBlock(cand->chunks[i], layer, h * head_elems * esize, staging.size(), staging.data()));
    keys = staging.data();
  }
  const kernels::KVSpan span{offset, tokens, cand->first[i], tokens};
  const uint32_t head = 0, prefix = 0;
  kernels::TokenLogitsBlocked({keys, profile_.dtype, 1, G, D, RescoreScale(D), group.data(), &span, &head,
                               &prefix, 1, cand->prefix[i + 1] - cand->prefix[i],
                               cand->logits.data() + size_t{cand->prefix[i]} * G});
  return Status::OK();
}

Status Session::HostHeadLogits(uint32_t layer, uint32_t h, const std::vector<float>& qf,
                               RescoreCandidates* cand) const {
  const size_t n = cand->chunks.size();
  std::vector<kernels::KVSpan> spans;
  spans.reserve(n);
  for (size_t i = 0; i < n && pool_->is_host(); ++i) {
    if (cand->dev[i] == kNotResident) break;
    spans.push_back({ElemOffset(cand->dev[i]), cand->stride[i], cand->first[i], cand->stride[i]});
  }
  if (spans.size() < n) {  // a block elsewhere (host tier, store): each candidate on its own
    for (size_t i = 0; i < n; ++i) KVMEM_RETURN_IF_ERROR(HostCandidateLogits(layer, h, GroupQueries(qf, h), cand, i));
    return Status::OK();
  }
  if (n == 0) return Status::OK();
  const std::vector<uint32_t> heads(n, h);
  kernels::TokenLogitsBlocked({pool_->base(), profile_.dtype, profile_.kv_heads, profile_.q_heads, profile_.head_dim,
                               RescoreScale(profile_.head_dim), qf.data(), spans.data(), heads.data(),
                               cand->prefix.data(), static_cast<uint32_t>(n), cand->prefix.back(),
                               cand->logits.data()});
  return Status::OK();
}

Status Session::DeviceCandidateLogits(uint32_t layer, const std::vector<float>& qf,
                                      const std::vector<bool>* only,
                                      std::vector<RescoreCandidates>* cands) const {
  const uint32_t H = profile_.kv_heads, D = profile_.head_dim, G = profile_.group();
  std::vector<kernels::KVSpan> spans;
  std::vector<uint32_t> heads, prefix{0};
  // (head, candidate): in the launch (item j = launched[j]), or computed on the host.
  std::vector<std::pair<uint32_t, uint32_t>> launched, staged;
  size_t total = 0;
  for (uint32_t h = 0; h < H; ++h) total += (*cands)[h].chunks.size();
  spans.reserve(total);
  heads.reserve(total);
  prefix.reserve(total + 1);
  launched.reserve(total);
  for (uint32_t h = 0; h < H; ++h) {
    if (only != nullptr && !(*only)[h]) continue;
    const RescoreCandidates& c = (*cands)[h];
    for (uint32_t i = 0; i < c.chunks.size(); ++i) {
      if (c.dev[i] == kNotResident) {
        staged.emplace_back(h, i);
        continue;
      }
      launched.emplace_back(h, i);
      spans.push_back({ElemOffset(c.dev[i]), c.stride[i], c.first[i], c.stride[i]});
      heads.push_back(h);
      prefix.push_back(prefix.back() + c.prefix[i + 1] - c.prefix[i]);
    }
  }
  std::vector<float> logits(size_t{prefix.back()} * G);
  Status st = spans.empty() ? Status::OK()
                            : pool_->TokenLogits({nullptr, profile_.dtype, H, profile_.q_heads, D,
                                                  RescoreScale(D), qf.data(), spans.data(),
                                                  heads.data(), prefix.data(),
                                                  static_cast<uint32_t>(spans.size()), prefix.back(),
                                                  logits.data()});
  if (st.code() == StatusCode::kUnimplemented) {  // no device kernel: every candidate on the host
    staged.insert(staged.end(), launched.begin(), launched.end());
  } else {
    KVMEM_RETURN_IF_ERROR(st.WithContext("rescoring logits"));
    // The launch's logits back to their candidates: a run of launched candidates that are
    // consecutive in one head's list is one copy (a whole head when all its blocks are resident).
    for (size_t j = 0; j < launched.size();) {
      const auto [h, i0] = launched[j];
      size_t k = j + 1;
      while (k < launched.size() && launched[k].first == h && launched[k].second == i0 + (k - j)) ++k;
      RescoreCandidates& c = (*cands)[h];
      std::copy_n(logits.data() + size_t{prefix[j]} * G, size_t{prefix[k] - prefix[j]} * G,
                  c.logits.data() + size_t{c.prefix[i0]} * G);
      j = k;
    }
  }
  for (const auto& [h, i] : staged) {
    KVMEM_RETURN_IF_ERROR(HostCandidateLogits(layer, h, GroupQueries(qf, h), &(*cands)[h], i));
  }
  return Status::OK();
}

void Session::FinishRescore(uint32_t G, uint32_t budget, const RescoreCandidates& cand,
                            index::Selection* sel, std::vector<TokenRange>* ranges) const {
  const size_t n = cand.chunks.size();
  if (options_.rescore_tokens) {
    std::vector<std::pair<uint32_t, uint32_t>> tokens;  // (chunk, offset) of every candidate token
    tokens.reserve(cand.prefix.back());
    for (size_t i = 0; i < n; ++i) {
      for (uint32_t t = 0; t < cand.prefix[i + 1] - cand.prefix[i]; ++t) tokens.emplace_back(cand.chunks[i], cand.first[i] + t);
    }
    SelectTokens(G, budget, tokens, cand.logits, sel, ranges);
    return;
  }
  struct Scored {
    uint32_t chunk;
    uint32_t counted;  // tokens at or above the sinks (what the budget pays for)
    float score;       // log attention mass per counted token (unnormalised)
  };
  std::vector<Scored> scored;
  scored.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const float* l = cand.logits.data() + size_t{cand.prefix[i]} * G;
    const uint32_t counted = cand.prefix[i + 1] - cand.prefix[i];
    const size_t m_n = size_t{counted} * G;
    const float m = *std::max_element(l, l + m_n);
    double sum = 0.0;
    for (size_t j = 0; j < m_n; ++j) sum += std::exp(double{l[j]} - m);
    scored.push_back({cand.chunks[i], counted, static_cast<float>(m + std::log(sum) - std::log(static_cast<double>(counted)))});
  }
  std::stable_sort(scored.begin(), scored.end(), [](const Scored& a, const Scored& b) {
    return a.score != b.score ? a.score > b.score : a.chunk < b.chunk;
  });
  // Greedy by mass per token; a chunk that does not fit is skipped, smaller ones may still.
  sel->chunks.clear();
  sel->scores.clear();
  sel->tokens = 0;
  uint64_t remaining = budget;
  for (const Scored& s : scored) {
    if (s.counted > remaining) continue;
    remaining -= s.counted;
    sel->chunks.push_back(s.chunk);
    sel->scores.push_back(s.score);
    sel->tokens += s.counted;
    if (remaining == 0) break;
  }
}

void Session::SelectTokens(uint32_t G, uint32_t budget,
                           const std::vector<std::pair<uint32_t, uint32_t>>& tokens,
                           const std::vector<float>& logits, index::Selection* sel,
                           std::vector<TokenRange>* ranges) {
  const size_t T = tokens.size();
  // Each query head's softmax over the candidates (they hold nearly all of its mass), summed
  // over the group: the share of attention a token would get, as the token oracle ranks them.
  // In passes over the [T][G] logits as they lie (the G heads' maxima and sums are independent
  // chains side by side): the exponentials in float, the sums in double.
  std::vector<float> m(G, -std::numeric_limits<float>::infinity());
  for (size_t t = 0; t < T; ++t) {
    for (uint32_t g = 0; g < G; ++g) m[g] = std::max(m[g], logits[t * G + g]);
  }
  std::vector<float> e(T * G);
  std::vector<double> inv(G, 0.0);
  for (size_t t = 0; t < T; ++t) {
    for (uint32_t g = 0; g < G; ++g) inv[g] += e[t * G + g] = std::exp(logits[t * G + g] - m[g]);
  }
  for (double& x : inv) x = 1.0 / x;
  std::vector<double> mass(T, 0.0);
  for (size_t t = 0; t < T; ++t) {
    for (uint32_t g = 0; g < G; ++g) mass[t] += e[t * G + g] * inv[g];
  }
  // The `keep` heaviest (ties: the earlier candidate), then in token order; both orders on
  // values held beside their index (no lookups through it while comparing).
  struct Weighted {
    double mass;
    uint32_t t;
  };
  std::vector<Weighted> heavy(T);
  for (size_t t = 0; t < T; ++t) heavy[t] = {mass[t], static_cast<uint32_t>(t)};
  const size_t keep = std::min<size_t>(budget, T);
  std::nth_element(heavy.begin(), heavy.begin() + static_cast<std::ptrdiff_t>(keep), heavy.end(),
                   [](const Weighted& a, const Weighted& b) { return a.mass != b.mass ? a.mass > b.mass : a.t < b.t; });
  std::vector<std::pair<uint64_t, uint32_t>> by_token(keep);  // ((chunk, offset) as one key, t)
  for (size_t i = 0; i < keep; ++i) {
    const uint32_t t = heavy[i].t;
    by_token[i] = {uint64_t{tokens[t].first} << 32 | tokens[t].second, t};
  }
  std::sort(by_token.begin(), by_token.end());
  // Runs of adjacent kept tokens of one chunk become one entry: its chunk, token range and the
  // log of the run's summed mass; entries in descending score (as a Selection's chunks are).
  struct Run {
    uint32_t chunk;
    TokenRange range;
    float score;
  };
  std::vector<Run> runs;
  for (size_t i = 0; i < keep;) {
    const auto [chunk, first] = tokens[by_token[i].second];
    double run_mass = 0.0;
    size_t j = i;
    while (j < keep && tokens[by_token[j].second].first == chunk &&
           tokens[by_token[j].second].second == first + (j - i)) {
      run_mass += mass[by_token[j].second];
      ++j;
    }
    runs.push_back({chunk, {first, static_cast<uint32_t>(first + (j - i))}, static_cast<float>(std::log(run_mass))});
    i = j;
  }
  std::stable_sort(runs.begin(), runs.end(), [](const Run& a, const Run& b) { return a.score > b.score; });
  sel->chunks.clear();
  sel->scores.clear();
  sel->tokens = keep;
  ranges->clear();
  for (const Run& r : runs) {
    sel->chunks.push_back(r.chunk);
    sel->scores.push_back(r.score);
    ranges->push_back(r.range);
  }
}

void Session::BuildSparseSpans(uint32_t layer, const std::vector<HeadSelection>& sel,
                               const std::vector<bool>& dense, std::vector<kernels::KVSpan>* spans,
                               std::vector<uint32_t>* head_begin) const {
  const uint32_t H = profile_.kv_heads;
  const uint64_t S = options_.sink_tokens;
  const uint64_t sealed = chunks_.empty() ? 0 : chunks_.back().start + chunks_.back().tokens;
  const uint64_t recent_from =
      sealed > options_.recent_window ? sealed - options_.recent_window : 0;
  struct Piece {
    uint32_t chunk, begin, end;
  };
  std::vector<Piece> pieces;
  const Layer& lay = layers_[layer];
  spans->clear();
  head_begin->assign(1, 0);
  // Token range [a, b) of the sealed context as pieces of the chunks holding it.
  auto add_range = [&](uint64_t a, uint64_t b) {
    b = std::min(b, sealed);
    if (a >= b) return;
    auto it = std::partition_point(chunks_.begin(), chunks_.end(),
                                   [a](const Chunk& c) { return c.start + c.tokens <= a; });
    for (size_t c = static_cast<size_t>(it - chunks_.begin()); c < chunks_.size() && a < b; ++c) {
      const uint64_t end = std::min(b, chunks_[c].start + chunks_[c].tokens);
      pieces.push_back({static_cast<uint32_t>(c), static_cast<uint32_t>(a - chunks_[c].start),
                        static_cast<uint32_t>(end - chunks_[c].start)});
      a = end;
    }
  };
  for (uint32_t h = 0; h < H; ++h) {
    if (dense[h]) {
      spans->insert(spans->end(), lay.chunk_spans.begin(), lay.chunk_spans.end());
    } else {
      pieces.clear();
      add_range(0, S);                    // sinks
      add_range(recent_from, sealed);     // recent window
      // A chunk selection's ranges lie inside their chunks: pieces straight away (no search of
      // the chunk list per range: thousands of ranges per head with token-granular rescoring).
      const HeadSelection& hs = sel[h];
      const bool by_chunk = hs.chunks.size() == hs.starts.size();
      for (size_t i = 0; i < hs.starts.size(); ++i) {
        if (by_chunk) {
          const Chunk& c = chunks_[hs.chunks[i]];
          if (hs.starts[i] >= c.start && hs.ends[i] <= c.start + c.tokens && hs.starts[i] < hs.ends[i]) {
            pieces.push_back({hs.chunks[i], static_cast<uint32_t>(hs.starts[i] - c.start),
                              static_cast<uint32_t>(hs.ends[i] - c.start)});
            continue;
          }
        }
        add_range(hs.starts[i], hs.ends[i]);
      }
      std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) {
        return a.chunk != b.chunk ? a.chunk < b.chunk : a.begin < b.begin;
      });
      // Merge overlapping pieces of the same chunk so no token is attended twice.
      for (size_t i = 0; i < pieces.size();) {
        Piece cur = pieces[i++];
        while (i < pieces.size() && pieces[i].chunk == cur.chunk && pieces[i].begin <= cur.end) {
          cur.end = std::max(cur.end, pieces[i].end);
          ++i;
        }
        const Chunk& c = chunks_[cur.chunk];
        spans->push_back({ElemOffset(c.blocks[layer].dev), c.tokens, cur.begin, cur.end});
      }
    }
    spans->push_back({ElemOffset(lay.tail_block), tail_capacity_, 0, lay.tail_tokens});
    head_begin->push_back(static_cast<uint32_t>(spans->size()));
  }
}

Result<RetrievalOptions> Session::EffectiveRetrieval(const RetrievalOverrides& ov) const {
  RetrievalOptions r = options_.retrieval;
  if (ov.rule) r.rule = *ov.rule;
  if (ov.rule_value != 0) r.rule_value = ov.rule_value;
  if (ov.block_tokens != 0) r.block_tokens = ov.block_tokens;
  if (ov.pooling) r.pooling = *ov.pooling;
  KVMEM_RETURN_IF_ERROR(ValidateRetrieval(r));
  return r;
}

namespace {

// A retrieval head's rule over its block scores (blocks of B tokens from token S on, the
// sealed context ending at `sealed`): the kept blocks as token ranges, best first. Both scan
// paths (host kernel, device launch) go through here, so they select alike from equal scores.
void KeepBlocks(std::span<const float> scores, uint32_t budget, const RetrievalOptions& ro,
                uint32_t head_dim, uint64_t S, uint64_t sealed, HeadSelection* out) {
  const uint32_t B = ro.block_tokens;
  index::BlockRuleOptions bo;
  bo.rule = ro.rule;
  bo.value = ro.rule_value;
  bo.k = std::max<uint32_t>(1, budget / B);
  bo.scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  for (uint32_t j : index::SelectBlocks(scores, bo)) {
    out->starts.push_back(S + uint64_t{j} * B);
    out->ends.push_back(std::min<uint64_t>(S + (uint64_t{j} + 1) * B, sealed));
    out->scores.push_back(scores[j]);
  }
}

}  // namespace

Status Session::ScanRetrievalHeadsOnDevice(uint32_t layer, const std::vector<bool>& retrieval,
                                           const std::vector<float>& qf, uint32_t budget,
                                           const RetrievalOptions& ro,
                                           std::vector<HeadSelection>* sel, uint64_t* bytes) const {
  const uint32_t H = profile_.kv_heads, D = profile_.head_dim;
  const uint64_t S = options_.sink_tokens;
  const uint64_t sealed = chunks_.empty() ? 0 : chunks_.back().start + chunks_.back().tokens;
  std::vector<uint32_t> heads;
  for (uint32_t h = 0; h < H; ++h) {
    if (retrieval[h]) heads.push_back(h);
  }
  if (heads.empty() || sealed <= S) {
    for (uint32_t h : heads) (*sel)[h].kv_head = h;
    return Status::OK();  // nothing selectable yet: sinks and tail only
  }
  // The sealed chunks past the sinks, in order, where they lie in the pool.
  std::vector<kernels::KVSpan> spans;
  std::vector<uint32_t> prefix(1, 0);
  for (const Chunk& c : chunks_) {
    if (c.start + c.tokens <= S) continue;
    if (c.blocks[layer].dev == kNotResident) {
      return Unimplemented("device scan: a block of layer " + std::to_string(layer) +
                           " is not resident");
    }
    const uint32_t b = static_cast<uint32_t>(std::max(S, c.start) - c.start);
    spans.push_back({ElemOffset(c.blocks[layer].dev), c.tokens, b, c.tokens});
    prefix.push_back(prefix.back() + c.tokens - b);
  }
  const uint32_t total = static_cast<uint32_t>(sealed - S);
  const uint32_t nb = kernels::PooledNumBlocks(total, ro.block_tokens);
  std::vector<float> scores(heads.size() * size_t{nb});
  kernels::PooledBlockScoresView v{};
  v.kv_dtype = profile_.dtype;
  v.kv_heads = H;
  v.q_heads = profile_.q_heads;
  v.head_dim = D;
  v.q = qf.data();
  v.spans = spans.data();
  v.span_prefix = prefix.data();
  v.num_spans = static_cast<uint32_t>(spans.size());
  v.total_tokens = total;
  v.block_tokens = ro.block_tokens;
  v.mode = ro.pooling;
  v.heads = heads.data();
  v.num_heads = static_cast<uint32_t>(heads.size());
  v.scores = scores.data();
  KVMEM_RETURN_IF_ERROR(pool_->PooledBlockScores(v));
  for (size_t i = 0; i < heads.size(); ++i) {
    HeadSelection& hs = (*sel)[heads[i]];
    hs.kv_head = heads[i];
    KeepBlocks(std::span<const float>(scores.data() + i * nb, nb), budget, ro, D, S, sealed, &hs);
    *bytes += uint64_t{total} * D * DTypeSize(profile_.dtype);
  }
  return Status::OK();
}

Status Session::ScanRetrievalHead(uint32_t layer, uint32_t h, const std::vector<float>& qf,
                                  uint32_t budget, const RetrievalOptions& ro, HeadSelection* out,
                                  uint64_t* bytes) const {
  const uint32_t D = profile_.head_dim, G = profile_.group();
  const uint64_t S = options_.sink_tokens;
  const uint64_t sealed = chunks_.empty() ? 0 : chunks_.back().start + chunks_.back().tokens;
  out->kv_head = h;
  if (sealed <= S) return Status::OK();  // nothing selectable yet: sinks and tail only
  const uint32_t total = static_cast<uint32_t>(sealed - S);
  const uint32_t B = ro.block_tokens;
  const uint32_t nb = kernels::PooledNumBlocks(total, B);
  std::vector<float> scores(nb);
  kernels::PooledBlockScoresView v{};
  v.head_dim = D;
  v.total_tokens = total;
  v.block_tokens = B;
  v.mode = ro.pooling;
  v.num_heads = 1;
  v.scores = scores.data();
  std::vector<kernels::KVSpan> spans;
  std::vector<uint32_t> prefix(1, 0);
  std::vector<float> staged;
  uint32_t head = h;
  if (pool_->is_host()) {
    // Straight from the pool: the sealed chunks past the sinks, in order.
    for (const Chunk& c : chunks_) {
      if (c.start + c.tokens <= S) continue;
      const uint32_t b = static_cast<uint32_t>(std::max(S, c.start) - c.start);
      spans.push_back({ElemOffset(c.blocks[layer].dev), c.tokens, b, c.tokens});
      prefix.push_back(prefix.back() + c.tokens - b);
    }
    v.pool = pool_->base();
    v.kv_dtype = profile_.dtype;
    v.kv_heads = profile_.kv_heads;
    v.q_heads = profile_.q_heads;
    v.q = qf.data();
  } else {
    // A pool that is not host memory and has no device scan (ScanRetrievalHeadsOnDevice), or
    // a layer with blocks out of the pool: the head's keys come to the host as fp32 (one copy
    // per chunk, from whichever tier holds them) and the CPU kernel scores them.
    staged.resize(static_cast<size_t>(sealed) * D);
    for (uint32_t c = 0; c < chunks_.size(); ++c) {
      KVMEM_RETURN_IF_ERROR(KeysAsFloat(layer, h, c, staged.data() + chunks_[c].start * D));
    }
    spans.push_back({0, static_cast<uint32_t>(sealed), static_cast<uint32_t>(S),
                     static_cast<uint32_t>(sealed)});
    prefix.push_back(total);
    v.pool = staged.data();
    v.kv_dtype = DType::kF32;
    v.kv_heads = 1;
    v.q_heads = G;
    v.q = GroupQueries(qf, h).data();
    head = 0;
  }
  v.spans = spans.data();
  v.span_prefix = prefix.data();
  v.num_spans = static_cast<uint32_t>(spans.size());
  v.heads = &head;
  kernels::PooledBlockScoresCpu(v);
  KeepBlocks(scores, budget, ro, D, S, sealed, out);
  *bytes += uint64_t{total} * D * DTypeSize(profile_.dtype);
  return Status::OK();
}

Status Session::SelectHybrid(uint32_t layer, SelectionMode mode, const std::vector<float>& qf,
                             uint32_t budget, const RetrievalOverrides& ov,
                             std::vector<HeadSelection>* sel, std::vector<bool>* dense,
                             uint64_t* nodes, uint64_t* bytes, bool* device_scan) {
  KVMEM_RETURN_IF_ERROR(CheckHybridProfile(profile_, mode));
  KVMEM_ASSIGN_OR_RETURN(const RetrievalOptions ro, EffectiveRetrieval(ov));
  const uint32_t H = profile_.kv_heads;
  sel->assign(H, HeadSelection{});
  dense->assign(H, true);
  for (uint32_t h = 0; h < H; ++h) {
    (*sel)[h].kv_head = h;
    (*sel)[h].role = HeadRole::kDense;
  }
  if (IsDenseLayer(layer)) return Status::OK();  // dense layers neither select nor reuse
  std::vector<bool> retrieval(H);
  for (uint32_t h = 0; h < H; ++h) retrieval[h] = profile_.IsRetrievalHead(layer, h);
  if (mode == SelectionMode::kHybrid) {
    KVMEM_RETURN_IF_ERROR(CatchUpIndex(/*all_heads=*/false));
    KVMEM_RETURN_IF_ERROR(SelectChunks(layer, qf, budget, sel, nodes, bytes, &retrieval));
  } else {
    bool scanned = false;
    if (!pool_->is_host() && DeviceScanEnabled() &&
        std::find(retrieval.begin(), retrieval.end(), true) != retrieval.end()) {
      // Device pool: one launch scores every retrieval head where its keys lie; only the
      // block scores (4 bytes per block and head) come back for the rules.
      Status st = ScanRetrievalHeadsOnDevice(layer, retrieval, qf, budget, ro, sel, bytes);
      if (st.ok()) {
        scanned = true;
        if (device_scan != nullptr) *device_scan = true;
      } else if (st.code() != StatusCode::kUnimplemented) {
        return st;
      }
    }
    std::vector<Status> status(H);
    std::vector<uint64_t> head_bytes(H, 0);
    auto scan = [&](uint32_t h) {
      if (retrieval[h]) status[h] = ScanRetrievalHead(layer, h, qf, budget, ro, &(*sel)[h], &head_bytes[h]);
    };
    if (scanned) {
      // done above
    } else if (pool_->is_host()) {
      ForEachHead(H, scan);
    } else {
      // Each scan stages a head's keys on the host: one at a time bounds that memory.
      for (uint32_t h = 0; h < H; ++h) scan(h);
    }
    for (uint32_t h = 0; h < H; ++h) {
      KVMEM_RETURN_IF_ERROR(status[h]);
      *bytes += head_bytes[h];
    }
    const uint64_t sealed = chunks_.empty() ? 0 : chunks_.back().start + chunks_.back().tokens;
    if (sealed > options_.sink_tokens) {
      const uint32_t blocks = kernels::PooledNumBlocks(
          static_cast<uint32_t>(sealed - options_.sink_tokens), ro.block_tokens);
      *nodes += uint64_t{blocks} * static_cast<uint64_t>(std::count(retrieval.begin(), retrieval.end(), true));
    }
  }
  for (uint32_t h = 0; h < H; ++h) {
    HeadSelection& hs = (*sel)[h];
    hs.kv_head = h;
    if (retrieval[h]) {
      hs.role = HeadRole::kRetrieval;
      hs.source_layer = layer;
      kept_[h] = {true, layer, hs};
      // A retrieval head runs full attention in both modes (LycheeDecode); the modes differ in
      // how it picks the tokens its sparse heads reuse: a scan of every key or the index.
      (*dense)[h] = true;
    } else if (kept_[h].valid && kept_[h].layer < layer) {
      hs = kept_[h].sel;
      hs.role = HeadRole::kReused;
      hs.source_layer = kept_[h].layer;
      (*dense)[h] = false;
    } else {
      hs = HeadSelection{};  // no selection at this index yet (or only from layers >= this)
      hs.kv_head = h;
      hs.role = HeadRole::kDense;
    }
  }
  return Status::OK();
}

Result<RetrieveResult> Session::Retrieve(const RetrieveArgs& a) {
  const uint32_t layer = a.layer, budget_tokens = a.budget_tokens, top_chunks = a.top_chunks;
  if (layer >= profile_.layers) {
    return InvalidArgument("layer " + std::to_string(layer) + " out of range (session has " +
                           std::to_string(profile_.layers) + " layers)");
  }
  const SelectionMode mode = a.mode == SelectionMode::kDefault ? options_.mode : a.mode;
  const bool hybrid = mode == SelectionMode::kRetrievalHeads || mode == SelectionMode::kHybrid;
  if (hybrid && top_chunks > 0) {
    return InvalidArgument("Retrieve: top_chunks (exact search) is an index-mode request; modes "
                           "retrieval_heads and hybrid select by budget and rule");
  }
  BeginOp();
  const uint32_t H = profile_.kv_heads, D = profile_.head_dim;
  std::vector<float> qf(static_cast<size_t>(profile_.q_heads) * D);
  ConvertToFloat(a.q, a.q_dtype, qf.size(), qf.data());
  RetrieveResult r;
  const uint32_t budget = budget_tokens ? budget_tokens : options_.default_budget_tokens;
  if (hybrid) {
    std::vector<bool> dense;
    KVMEM_RETURN_IF_ERROR(SelectHybrid(layer, mode, qf, budget, a.retrieval, &r.heads, &dense,
                                       &r.nodes_visited, &r.bytes_read));
    TouchNow();
    return r;
  }
  KVMEM_RETURN_IF_ERROR(CatchUpIndex(/*all_heads=*/true));
  if (top_chunks == 0) {
    KVMEM_RETURN_IF_ERROR(SelectChunks(layer, qf, budget, &r.heads, &r.nodes_visited, &r.bytes_read));
  } else {
    r.heads.assign(H, HeadSelection{});
    for (uint32_t h = 0; h < H; ++h) {
      const index::ClusterTree& tree = trees_[static_cast<size_t>(layer) * H + h];
      SessionKeySource keys([this, layer, h](uint32_t c, float* out) { return KeysAsFloat(layer, h, c, out); });
      KVMEM_ASSIGN_OR_RETURN(index::Selection sel, tree.SearchExact(GroupQueries(qf, h), top_chunks, keys));
      HeadSelection& hs = r.heads[h];
      hs.kv_head = h;
      hs.chunks = std::move(sel.chunks);
      hs.scores = std::move(sel.scores);
      for (uint32_t c : hs.chunks) {
        hs.starts.push_back(chunks_[c].start);
        hs.ends.push_back(chunks_[c].start + chunks_[c].tokens);
      }
      r.nodes_visited += sel.cost.nodes_visited;
      r.bytes_read += sel.cost.bytes_read;
    }
  }
  // Selection is what recency means: chosen chunks are the last to be evicted.
  for (const HeadSelection& h : r.heads)
    for (uint32_t c : h.chunks) chunks_[c].blocks[layer].tick = op_tick_;
  TouchNow();
  return r;
}

void AppendLanding::Gather() const {
  for (const Piece& p : pieces) std::memcpy(data + p.msg_offset, pool_base + p.pool_offset, p.bytes);
}

AppendLanding::~AppendLanding() {
  if (session) session->ReleaseLanding(this);
}

void Session::ReleaseLanding(AppendLanding* l) {
  std::lock_guard<std::mutex> lock(plan_mu_);
  if (!l->consumed) {  // never reached the handler: the prediction counted an append that did not happen
    l->consumed = true;
    ForgetTracked(l->seq);
    plan_ok_ = false;
  }
  for (uint64_t off : l->blocks) pool_->Free(off);
  l->blocks.clear();
}

void Session::ForgetTracked(uint64_t seq) {
  for (auto it = plan_inflight_.begin(); it != plan_inflight_.end(); ++it) {
    if (it->seq == seq) {
      plan_inflight_.erase(it);
      return;
    }
  }
}

void Session::ResyncPlan() {
  std::lock_guard<std::mutex> lock(plan_mu_);
  if (plan_ok_) return;
  // The real state, then every append still between its receive and its handler, in order.
  plan_ok_ = pool_->is_host() && journal_ == nullptr && layers_ahead_ == 0 && unsealed_boundaries_.empty();
  if (!plan_ok_) return;
  plan_chunker_ = chunker_;
  plan_tokens_ = tokens_;
  std::vector<uint32_t> ignored;
  std::vector<uint8_t> zeros;
  for (const Tracked& t : plan_inflight_) {
    if (t.bounds.empty()) zeros.assign(t.n, 0);
    plan_chunker_.Push(t.bounds.empty() ? std::span<const uint8_t>(zeros) : std::span<const uint8_t>(t.bounds), &ignored);
    plan_tokens_ += t.n;
  }
}

std::unique_ptr<AppendLanding> Session::PlanLanding(const std::shared_ptr<Session>& self, uint32_t n,
                                                    const uint8_t* boundaries, uint64_t kv_offset, bool place) {
  Session& s = *self;
  if (n == 0 || !s.pool_->is_host()) return nullptr;
  const uint32_t L = s.profile_.layers, H = s.profile_.kv_heads;
  const uint64_t row = uint64_t{s.profile_.head_dim} * DTypeSize(s.profile_.dtype);
  auto land = std::make_unique<AppendLanding>();
  Tracked tracked;
  tracked.n = n;
  if (boundaries != nullptr) tracked.bounds.assign(boundaries, boundaries + n);
  std::lock_guard<std::mutex> lock(s.plan_mu_);
  // Every append the transport sees is tracked, so the prediction can be rebuilt from the real
  // state plus the appends still in flight (ResyncPlan).
  tracked.seq = land->seq = ++s.plan_seq_;
  s.plan_inflight_.push_back(std::move(tracked));
  land->n = n;
  land->kv_offset = kv_offset;
  land->pool_base = static_cast<uint8_t*>(s.pool_->base());
  land->session = self;
  if (!s.plan_ok_) return land;  // tracked only
  index::Chunker trial = s.plan_chunker_;
  const std::vector<uint8_t>& b = s.plan_inflight_.back().bounds;
  std::vector<uint8_t> zeros;
  if (b.empty()) zeros.assign(n, 0);
  std::vector<uint32_t> sealed;
  trial.Push(b.empty() ? std::span<const uint8_t>(zeros) : std::span<const uint8_t>(b), &sealed);
  const uint64_t T = s.plan_tokens_ - s.plan_chunker_.sealed_tokens();
  land->tokens_before = s.plan_tokens_;
  land->sealed_before = s.plan_chunker_.sealed_tokens();
  land->tail_before = static_cast<uint32_t>(T);
  s.plan_chunker_ = std::move(trial);
  s.plan_tokens_ += n;
  // Nothing sealed (every row goes to the tail) or an eager message: nothing to place.
  if (!place || sealed.empty()) return land;
  // Blocks from the pool alone: making room (eviction) is the handler's business, not the
  // transport thread's; a full pool means an ordinary receive.
  std::vector<uint64_t> blocks;
  blocks.reserve(sealed.size() * L);
  for (uint32_t c : sealed) {
    for (uint32_t l = 0; l < L; ++l) {
      auto off = s.pool_->Allocate(s.BlockBytes(c));
      if (!off.ok()) {
        for (uint64_t blk : blocks) s.pool_->Free(blk);
        return land;
      }
      blocks.push_back(*off);
    }
  }
  // The packed tensor is kv[2][L][H][n][D]; chunk i covers stream positions [p, p + c) where
  // the stream is the old tail (T rows) and then the n new rows. Message order: kv, layer,
  // head, then chunks in token order.
  const uint64_t v_part = uint64_t{L} * H * n * row;
  for (uint32_t kv = 0; kv < 2; ++kv) {
    for (uint32_t l = 0; l < L; ++l) {
      for (uint32_t h = 0; h < H; ++h) {
        uint64_t p = 0;
        for (size_t i = 0; i < sealed.size(); ++i) {
          const uint64_t c = sealed[i];
          if (p + c > T) {
            const uint64_t first = std::max(p, T);
            AppendLanding::Piece piece;
            piece.msg_offset = kv_offset + kv * v_part + ((uint64_t{l} * H + h) * n + (first - T)) * row;
            piece.pool_offset = blocks[i * L + l] + (uint64_t{kv} * H + h) * c * row + (first - p) * row;
            piece.bytes = (p + c - first) * row;
            land->pieces.push_back(piece);
          }
          p += c;
        }
      }
    }
  }
  land->sealed = std::move(sealed);
  land->blocks = std::move(blocks);
  land->placed = true;
  return land;
}

bool Session::LandingHolds(const AppendLanding& l, std::span<const uint32_t> sealed) const {
  if (!l.placed || journal_ != nullptr || !pool_->is_host() || !unsealed_boundaries_.empty() || layers_ahead_ != 0) {
    return false;
  }
  if (l.pool_base != pool_->base() || tokens_ != l.tokens_before || chunker_.sealed_tokens() != l.sealed_before) {
    return false;
  }
  for (const Layer& layer : layers_)
    if (layer.tail_tokens != l.tail_before) return false;
  return std::equal(sealed.begin(), sealed.end(), l.sealed.begin(), l.sealed.end()) &&
         l.blocks.size() == sealed.size() * profile_.layers;
}

Result<AppendResult> Session::AppendKV(uint32_t n, const void* keys, const void* values,
                                       const uint8_t* boundaries, AppendLanding* landing) {
  if (landing != nullptr) {
    std::lock_guard<std::mutex> lock(plan_mu_);
    if (!landing->consumed) {
      landing->consumed = true;
      ForgetTracked(landing->seq);
    }
  }
  Result<AppendResult> r = AppendKVImpl(n, keys, values, boundaries, landing);
  if (landing != nullptr && (!r.ok() || (landing->placed && !landing->blocks.empty()))) {
    // Failed (later predictions assumed it would succeed) or mispredicted.
    std::lock_guard<std::mutex> lock(plan_mu_);
    plan_ok_ = false;
  }
  ResyncPlan();
  return r;
}

Result<AppendResult> Session::AppendKVImpl(uint32_t n, const void* keys, const void* values,
                                           const uint8_t* boundaries, AppendLanding* landing) {
  if (layers_ahead_ != 0) {
    return FailedPrecondition("session " + std::to_string(id_) +
                              ": a decode step has appended to only some layers; finish it "
                              "(Attend with new k/v for every layer) before AppendKV");
  }
  if (n == 0) return AppendResult{tokens_, chunks_.size(), 0};
  BeginOp();
  std::vector<uint8_t> zeros;
  if (boundaries == nullptr) {
    zeros.assign(n, 0);
    boundaries = zeros.data();
  }
  index::Chunker trial = chunker_;
  std::vector<uint32_t> sealed;
  trial.Push(unsealed_boundaries_, &sealed);
  trial.Push(std::span<const uint8_t>(boundaries, n), &sealed);
  std::vector<uint64_t>* landed = nullptr;
  if (landing != nullptr && landing->placed) {
    if (LandingHolds(*landing, sealed)) {
      landed = &landing->blocks;
      GlobalMetrics().append_landed.fetch_add(1, std::memory_order_relaxed);
    } else {
      landing->Gather();  // the rows are not where this append needs them: make the message whole
      GlobalMetrics().append_gathered.fetch_add(1, std::memory_order_relaxed);
    }
  }
  if (journal_) {
    // Durable: nothing may reach the journal unchecked, so validate before logging.
    const size_t elems = size_t{profile_.layers} * profile_.kv_heads * n * profile_.head_dim;
    if (AnyNonFinite(static_cast<const uint8_t*>(keys), static_cast<const uint8_t*>(values), profile_.dtype, elems)) {
      return InvalidArgument("keys or values contain NaN or Inf");
    }
    KVMEM_RETURN_IF_ERROR(journal_->LogTokens(tokens_, n, static_cast<const uint8_t*>(keys),
                                              static_cast<const uint8_t*>(values), boundaries));
  }
  Status st;
  {
    const auto t0 = std::chrono::steady_clock::now();
    st = SealAndStore(sealed, n, static_cast<const uint8_t*>(keys), static_cast<const uint8_t*>(values),
                      /*check_input=*/journal_ == nullptr, landed);
    GlobalMetrics().append_phase[static_cast<int>(AppendPhase::kStore)].Observe(std::chrono::steady_clock::now() - t0);
  }
  if (!st.ok()) {
    if (journal_) journal_->CancelTokens(tokens_);
    return st;
  }
  chunker_ = std::move(trial);
  unsealed_boundaries_.clear();
  boundary_log_.append(reinterpret_cast<const char*>(boundaries), n);
  tokens_ += n;
  stat_tokens_ = tokens_;
  stat_tail_ = layers_.empty() ? 0 : layers_[0].tail_tokens;
  TouchNow();
  if (journal_) {
    journal_->ChunksSealed(*this);
    MarkStoredChunks();
  }
  return AppendResult{tokens_, chunks_.size(), static_cast<uint32_t>(sealed.size())};
}

// Host search (index mode) or every chunk (dense), then KVPool::Attend over the spans.
Status Session::AttendOnHost(const AttendArgs& a, SelectionMode mode, bool hybrid, bool sparse,
                             AttendInfo* info) {
  Layer& layer = layers_[a.layer];
  const uint32_t H = profile_.kv_heads, D = profile_.head_dim;
  std::vector<kernels::KVSpan> spans;
  std::vector<uint32_t> head_begin;
  std::vector<HeadSelection> selection;
  uint64_t nodes = 0, bytes_read = 0;
  bool device_scan = false;
  if (sparse) {
    std::vector<float> qf(static_cast<size_t>(profile_.q_heads) * D);
    ConvertToFloat(a.q, a.q_dtype, qf.size(), qf.data());
    const uint32_t budget = a.budget_tokens ? a.budget_tokens : options_.default_budget_tokens;
    std::vector<bool> dense(H, false);
    PhaseTimer search_timer(AttendPhase::kHostSearch);
    if (hybrid) {
      KVMEM_RETURN_IF_ERROR(SelectHybrid(a.layer, mode, qf, budget, a.retrieval, &selection,
                                         &dense, &nodes, &bytes_read, &device_scan));
    } else {
      KVMEM_RETURN_IF_ERROR(CatchUpIndex(/*all_heads=*/true));
      KVMEM_RETURN_IF_ERROR(SelectChunks(a.layer, qf, budget, &selection, &nodes, &bytes_read));
    }
    // Selected chunks are now the most recent; cold ones come back before attention reads
    // them (all ticks first, so fetching one cannot evict another selected one). Heads that
    // attend densely (retrieval heads, heads before any selection) need the whole layer.
    // The selected chunks in id order, each once: marked in a bitmap over the chunks, then read
    // back (cheaper than sorting the ~2K entries per head that token-granular rescoring gives).
    std::vector<uint32_t> wanted;
    {
      std::vector<uint64_t> marked((chunks_.size() + 63) / 64, 0);
      size_t n = 0;
      for (const HeadSelection& h : selection) {
        for (uint32_t c : h.chunks) marked[c >> 6] |= uint64_t{1} << (c & 63);
        n += h.chunks.size();
      }
      wanted.reserve(n);
      for (size_t w = 0; w < marked.size(); ++w) {
        for (uint64_t b = marked[w]; b != 0; b &= b - 1) {
          wanted.push_back(static_cast<uint32_t>(w * 64 + std::countr_zero(b)));
        }
      }
    }
    for (uint32_t c : wanted) chunks_[c].blocks[a.layer].tick = op_tick_;
    if (std::find(dense.begin(), dense.end(), true) != dense.end()) {
      KVMEM_RETURN_IF_ERROR(MakeResident(a.layer));
    } else {
      KVMEM_RETURN_IF_ERROR(FetchBlocks(a.layer, wanted));
    }
    if (a.layer + 1 < profile_.layers) {
      prefetch_layer_ = a.layer + 1;
      prefetch_chunks_ = std::move(wanted);
    }
    BuildSparseSpans(a.layer, selection, dense, &spans, &head_begin);
  } else {
    KVMEM_RETURN_IF_ERROR(MakeResident(a.layer));  // dense attention reads every chunk
  }
  // Dense: the layer's own span list with the tail's span appended for this call (taken off
  // again below), not a copy of it (a 128K layer: ~8.8K spans, 211 KB, ~60 µs with the copy's
  // page faults on the dev VM).
  std::vector<kernels::KVSpan>& attended = sparse ? spans : layer.chunk_spans;
  if (!sparse) {
    layer.chunk_spans.push_back({ElemOffset(layer.tail_block), tail_capacity_, 0, layer.tail_tokens});
  }
  kernels::AttendProblem p{};
  p.pool = pool_->base();
  p.kv_dtype = profile_.dtype;
  p.q_heads = profile_.q_heads;
  p.kv_heads = H;
  p.head_dim = D;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.q = a.q;
  p.q_dtype = a.q_dtype;
  p.spans = attended.data();
  p.head_span_begin = sparse ? head_begin.data() : nullptr;
  p.num_spans = static_cast<uint32_t>(attended.size());
  p.out = a.out;
  p.out_dtype = a.out_dtype;
  p.lse = a.lse;
  Status st = kernels::ValidateAttendProblem(p);
  if (st.ok()) {
    PhaseTimer t(AttendPhase::kHostAttend);
    if (sparse || pool_->is_host()) {
      st = pool_->Attend(&p, 1, g_search_pool);  // the host pool spreads its heads
    } else {  // a device pool keeps the layer's dense plan from step to step
      if (!layer.dense_plan) layer.dense_plan = std::make_unique<kernels::cuda::DenseAttendPlanCache>();
      st = pool_->AttendDense(&p, g_search_pool, layer.dense_plan.get(), layer.spans_key);
    }
  }
  if (!sparse) layer.chunk_spans.pop_back();  // the tail's span
  KVMEM_RETURN_IF_ERROR(st);
  if (info != nullptr) {
    if (sparse) {
      info->tokens_attended.assign(H, 0);
      for (uint32_t h = 0; h < H; ++h) {
        for (uint32_t i = head_begin[h]; i < head_begin[h + 1]; ++i) {
          info->tokens_attended[h] += spans[i].end - spans[i].begin;
        }
      }
      info->selection = std::move(selection);
      info->nodes_visited = nodes;
      info->bytes_read = bytes_read;
      info->device_scan = device_scan;
    } else {
      info->tokens_attended.assign(H, static_cast<uint32_t>(layer_tokens(a.layer)));
    }
  }
  return Status::OK();
}

Status Session::Attend(const AttendArgs& a, AttendInfo* info) {
  if (a.layer >= profile_.layers) {
    return InvalidArgument("layer " + std::to_string(a.layer) + " out of range (session has " +
                           std::to_string(profile_.layers) + " layers)");
  }
  const SelectionMode mode = a.mode == SelectionMode::kDefault ? options_.mode : a.mode;
  const bool hybrid = mode == SelectionMode::kRetrievalHeads || mode == SelectionMode::kHybrid;
  if (hybrid) {
    // Checked before the token is appended, so a refused call changes nothing.
    KVMEM_RETURN_IF_ERROR(CheckHybridProfile(profile_, mode));
    KVMEM_RETURN_IF_ERROR(EffectiveRetrieval(a.retrieval).status());
  }
  BeginOp();
  Layer& layer = layers_[a.layer];
  const uint32_t H = profile_.kv_heads, D = profile_.head_dim;
  const uint64_t row = uint64_t{D} * DTypeSize(profile_.dtype);
  // Attention over this layer's chunks and tail, after the new token lands and before sealing
  // moves rows around: every chunk (dense), or per KV head sinks ∪ selected chunks ∪ recent
  // window ∪ tail (index). Retrieval-heads modes run even before any chunk is sealed: a
  // retrieval head's (empty) selection still marks its KV-head index as selected for later
  // layers. The device search reads the chunk-block table it mirrored; blocks that eviction
  // moved would be stale there, so sessions that ever evicted stay on the host search.
  const bool sparse = hybrid || (mode == SelectionMode::kIndex && !IsDenseLayer(a.layer) && !chunks_.empty());
  const bool try_device = sparse && !hybrid && UseDeviceSearch() &&
                          stat_evicted_.load(std::memory_order_relaxed) == 0;
  // On the device search a decode step's new rows go up with q and the search writes them
  // into the tail (no copy of their own); if the device search does not run, they are copied
  // before the host attention (KVMEM_DEVICE_NEW_ROWS=copy: always copied first, for A/B runs).
  const bool fuse_rows = a.new_k != nullptr && try_device && pool_->has_device_search() &&
                         FusedNewRows();
  std::vector<PoolCopy> rows;

  if (a.new_k != nullptr) {
    if (layer.pending >= kMaxLayerSkew) {
      return FailedPrecondition("layer " + std::to_string(a.layer) + " is already " +
                                std::to_string(layer.pending) +
                                " tokens ahead of the slowest layer");
    }
    if (layer.tail_tokens >= tail_capacity_) {
      return ResourceExhausted("layer " + std::to_string(a.layer) +
                               " tail is full (chunks could not be sealed; KV pool full?)");
    }
    // This token completes in every layer with this call: log it first (all-or-nothing).
    if (journal_ && layer.pending == 0 && layers_ahead_ + 1 == profile_.layers) {
      KVMEM_RETURN_IF_ERROR(LogCompletingToken(a));
    }
    // Every head's K and V row in one batch (on the device: one upload and one launch).
    const uint64_t tail_v = layer.tail_block + uint64_t{H} * tail_capacity_ * row;
    rows.resize(2 * size_t{H});
    for (uint32_t h = 0; h < H; ++h) {
      const uint64_t at = (uint64_t{h} * tail_capacity_ + layer.tail_tokens) * row;
      rows[2 * h] = {layer.tail_block + at, static_cast<const uint8_t*>(a.new_k) + h * row, 0, row};
      rows[2 * h + 1] = {tail_v + at, static_cast<const uint8_t*>(a.new_v) + h * row, 0, row};
    }
    if (!fuse_rows) KVMEM_RETURN_IF_ERROR(pool_->CopyBatch(rows, nullptr));
    ++layer.tail_tokens;
    if (++layer.pending == 1) ++layers_ahead_;
    if (pending_boundaries_.size() < layer.pending) pending_boundaries_.push_back(a.boundary);
  }

  bool on_device = false;
  if (try_device) {
    Status st;
    {
      PhaseTimer t(AttendPhase::kCatchUp);
      st = CatchUpIndex(/*all_heads=*/true);
    }
    bool fall_back = false;  // to the host search: what the device search does not serve
    if (st.ok()) {
      const uint32_t budget = a.budget_tokens ? a.budget_tokens : options_.default_budget_tokens;
      st = AttendOnDevice(a, budget, info, fuse_rows);
      fall_back = st.code() == StatusCode::kUnavailable || st.code() == StatusCode::kUnimplemented ||
                  st.code() == StatusCode::kResourceExhausted;
    }
    // Whatever failed, the new rows are in the tail before anything else reads it.
    if (!st.ok() && fuse_rows) KVMEM_RETURN_IF_ERROR(pool_->CopyBatch(rows, nullptr));
    if (st.ok()) {
      on_device = true;
    } else if (!fall_back) {
      return st;
    }
  }
  if (!on_device) KVMEM_RETURN_IF_ERROR(AttendOnHost(a, mode, hybrid, sparse, info));

  // A token every layer now holds is complete: chunk it.
  PhaseTimer seal_timer(AttendPhase::kSeal);
  Status seal_status;
  while (layers_ahead_ == profile_.layers) {
    layers_ahead_ = 0;
    for (Layer& l : layers_)
      if (--l.pending > 0) ++layers_ahead_;
    ++tokens_;
    const uint8_t b = pending_boundaries_.front();
    pending_boundaries_.pop_front();
    unsealed_boundaries_.push_back(b);
    boundary_log_.push_back(static_cast<char>(b));
    index::Chunker trial = chunker_;
    std::vector<uint32_t> sealed;
    trial.Push(unsealed_boundaries_, &sealed);
    Status s = SealAndStore(sealed, 0, nullptr, nullptr);
    if (s.ok()) {
      chunker_ = std::move(trial);
      unsealed_boundaries_.clear();
    } else {
      // The tokens stay in the tail unchunked; their boundaries are re-fed next time.
      seal_status = s.WithContext("sealing a chunk");
    }
  }
  stat_tokens_ = tokens_;
  stat_tail_ = layers_[0].tail_tokens;
  TouchNow();
  if (journal_ && a.new_k != nullptr) {
    journal_->ChunksSealed(*this);
    MarkStoredChunks();
  }
  return seal_status;
}

SessionStats Session::Stats() const {
  SessionStats s;
  s.tokens = stat_tokens_.load(std::memory_order_relaxed);
  s.chunks = stat_chunks_.load(std::memory_order_relaxed);
  s.tail_tokens = stat_tail_.load(std::memory_order_relaxed);
  s.bytes = stat_bytes_.load(std::memory_order_relaxed);
  s.host_bytes = stat_host_bytes_.load(std::memory_order_relaxed);
  s.disk_bytes = stat_disk_bytes_.load(std::memory_order_relaxed);
  s.fetched_blocks = stat_fetched_.load(std::memory_order_relaxed);
  s.prefetched_blocks = stat_prefetched_.load(std::memory_order_relaxed);
  s.evicted_blocks = stat_evicted_.load(std::memory_order_relaxed);
  if (memory_) {
    s.memory_blocks = memory_->blocks();
    s.memory_bytes = memory_->bytes();  // device tier, like bytes
    s.bytes += s.memory_bytes;
    s.host_bytes += memory_->host_bytes();
    s.disk_bytes += memory_->disk_bytes();
    s.fetched_blocks += memory_->fetched();
    s.evicted_blocks += memory_->evicted();
  }
  s.created_unix_ms = created_ms_.load(std::memory_order_relaxed);
  s.last_used_unix_ms = last_used_ms_.load(std::memory_order_relaxed);
  return s;
}

double Session::mean_chunk_tokens() const {
  const uint64_t c = stat_chunks_.load(std::memory_order_relaxed);
  if (c == 0) return 0;
  const uint64_t sealed_tokens = stat_tokens_.load() - stat_tail_.load();
  return static_cast<double>(sealed_tokens) / static_cast<double>(c);
}

Status Session::ReadChunkBlock(uint32_t chunk, uint32_t layer, std::string* out) const {
  if (chunk >= chunks_.size() || layer >= profile_.layers) {
    return OutOfRange("ReadChunkBlock: chunk " + std::to_string(chunk) + " layer " +
                      std::to_string(layer) + " out of range");
  }
  const Chunk& c = chunks_[chunk];
  out->resize(BlockBytes(c.tokens));
  return ReadBlock(chunk, layer, 0, out->size(), reinterpret_cast<uint8_t*>(out->data()));
}

Status Session::LogCompletingToken(const AttendArgs& a) {
  const uint32_t L = profile_.layers, H = profile_.kv_heads;
  const uint64_t row = uint64_t{profile_.head_dim} * DTypeSize(profile_.dtype);
  // [layers][kv_heads][1][head_dim] for K and V: other layers hold the token in their tail at
  // index tail_tokens - pending; this layer's row arrives with the call.
  std::vector<uint8_t> k(uint64_t{L} * H * row), v(k.size());
  for (uint32_t l = 0; l < L; ++l) {
    for (uint32_t h = 0; h < H; ++h) {
      uint8_t* dk = k.data() + (uint64_t{l} * H + h) * row;
      uint8_t* dv = v.data() + (uint64_t{l} * H + h) * row;
      if (l == a.layer) {
        std::memcpy(dk, static_cast<const uint8_t*>(a.new_k) + h * row, row);
        std::memcpy(dv, static_cast<const uint8_t*>(a.new_v) + h * row, row);
        continue;
      }
      const Layer& lay = layers_[l];
      const uint64_t idx = lay.tail_tokens - lay.pending;
      const uint64_t at = lay.tail_block + (uint64_t{h} * tail_capacity_ + idx) * row;
      KVMEM_RETURN_IF_ERROR(pool_->CopyOut(dk, at, row));
      KVMEM_RETURN_IF_ERROR(pool_->CopyOut(dv, at + uint64_t{H} * tail_capacity_ * row, row));
    }
  }
  const uint8_t b = pending_boundaries_.empty() ? a.boundary : pending_boundaries_.front();
  return journal_->LogTokens(tokens_, 1, k.data(), v.data(), &b);
}

Status Session::RestoreChunks(std::span<const uint32_t> tokens,
                              std::span<const std::string_view> boundaries, bool from_own_store,
                              bool load, const RestoreReader& read, ParallelPool* workers) {
  if (!load && !from_own_store) return InvalidArgument("RestoreChunks: only stored blocks can stay on disk");
  if (boundaries.size() != tokens.size()) return InvalidArgument("RestoreChunks: boundary count mismatch");
  const uint32_t L = profile_.layers;
  if (layers_ahead_ != 0 || layers_[0].tail_tokens != 0 || !unsealed_boundaries_.empty()) {
    return FailedPrecondition("RestoreChunks: the session already holds tail tokens");
  }
  const size_t n = tokens.size();
  for (size_t i = 0; i < n; ++i) {
    if (tokens[i] == 0 || boundaries[i].size() != tokens[i]) {
      return InvalidArgument("RestoreChunks: chunk " + std::to_string(i) + " has a bad shape");
    }
  }
  // Destinations first, on this thread (the allocator may evict); a block the device budget
  // cannot hold stays in RocksDB (own store only) and is still read and checked below.
  std::vector<Chunk> fresh(n);
  uint64_t reserved = 0, on_disk = 0, start = tokens_;
  auto release = [&] {
    for (Chunk& c : fresh)
      for (Block& b : c.blocks) FreeBlock(c.tokens, b);
  };
  for (size_t i = 0; i < n; ++i) {
    Chunk& c = fresh[i];
    c.start = start;
    c.tokens = tokens[i];
    start += tokens[i];
    c.blocks.resize(L);
    const uint64_t bytes = BlockBytes(tokens[i]);
    for (uint32_t l = 0; l < L; ++l) {
      c.blocks[l].disk = from_own_store;  // it is read from the session's own records
      c.blocks[l].tick = op_tick_;
      if (!load) {
        on_disk += bytes;
        continue;
      }
      auto off = AllocateBlock(bytes);
      if (!off.ok()) {
        if (from_own_store && off.status().code() == StatusCode::kResourceExhausted && tiers_ != nullptr) {
          on_disk += bytes;
          continue;
        }
        release();
        return off.status().WithContext("restoring chunk " + std::to_string(chunks_.size() + i));
      }
      c.blocks[l].dev = *off;
      reserved += pool_->allocator().ReservedBytes(bytes);
    }
  }
  // Read (and, by the reader, check) every block, one layer per task: a layer's blocks are
  // read in chunk order, so one sequential reader per layer serves. Copies go straight into
  // the pool; page faults and copies spread over the workers with the reads.
  std::vector<Status> layer_status(L);
  auto run_layer = [&](uint32_t l) {
    std::string_view block;
    for (size_t i = 0; i < n; ++i) {
      const uint64_t bytes = BlockBytes(fresh[i].tokens);
      Status st = read(l, static_cast<uint32_t>(i), &block);
      if (st.ok() && block.size() != bytes) {
        st = InvalidArgument("RestoreChunks: layer " + std::to_string(l) + " block has " +
                             std::to_string(block.size()) + " bytes, expected " +
                             std::to_string(bytes));
      }
      const uint64_t dev = fresh[i].blocks[l].dev;
      if (st.ok() && dev != kNotResident) st = pool_->CopyIn(dev, block.data(), bytes);
      if (!st.ok()) {
        layer_status[l] = std::move(st);
        return;
      }
    }
  };
  if (workers != nullptr && workers->threads() > 0 && L > 1) {
    workers->For(L, run_layer);
  } else {
    for (uint32_t l = 0; l < L; ++l) {
      run_layer(l);
      if (!layer_status[l].ok()) break;
    }
  }
  for (const Status& st : layer_status) {
    if (!st.ok()) {
      release();
      return st;
    }
  }
  for (Chunk& c : fresh) {
    for (uint32_t l = 0; l < L; ++l) {
      const uint64_t dev = c.blocks[l].dev;
      layers_[l].chunk_spans.push_back(
          {dev == kNotResident ? 0 : ElemOffset(dev), c.tokens, 0, c.tokens});
      ++layers_[l].spans_key;
      if (dev == kNotResident) layers_[l].maybe_cold = true;
    }
    tokens_ += c.tokens;
    chunks_.push_back(std::move(c));
  }
  for (std::string_view b : boundaries) boundary_log_.append(b);
  if (from_own_store) stored_marked_ = static_cast<uint32_t>(chunks_.size());
  stat_bytes_ += reserved;
  stat_disk_bytes_ += on_disk;
  stat_chunks_ = chunks_.size();
  return Status::OK();
}

Status Session::FinishChunkRestore() {
  chunker_.ResumeAt(tokens_);
  stat_tokens_ = tokens_;
  stat_tail_ = 0;
  TouchNow();
  return index_enabled_ ? CatchUpIndex(index_all_heads_) : Status::OK();
}

}  // namespace kvmem

// --- Tiers ---

namespace kvmem {

void Session::BeginOp() {
  if (tiers_ != nullptr) op_tick_ = tiers_->NextTick();
}

void Session::MarkStoredChunks() {
  if (!journal_) return;
  const uint32_t stored = std::min<uint32_t>(journal_->stored_chunks(), chunk_count());
  for (; stored_marked_ < stored; ++stored_marked_) {
    for (Block& b : chunks_[stored_marked_].blocks) b.disk = true;
  }
}

bool Session::Pinned(uint32_t chunk) const {
  const Chunk& c = chunks_[chunk];
  if (c.start < options_.sink_tokens) return true;
  const uint64_t sealed = chunks_.back().start + chunks_.back().tokens;
  return options_.recent_window > 0 && c.start + c.tokens > sealed - std::min<uint64_t>(sealed, options_.recent_window);
}

Tier Session::BlockTier(uint32_t chunk, uint32_t layer) const {
  const Block& b = chunks_[chunk].blocks[layer];
  if (b.dev != kNotResident) return Tier::kDevice;
  return b.host ? Tier::kHost : Tier::kDisk;
}

Status Session::ReadBlock(uint32_t chunk, uint32_t layer, uint64_t at, uint64_t bytes,
                          uint8_t* dst) const {
  const Chunk& c = chunks_[chunk];
  const Block& b = c.blocks[layer];
  if (b.dev != kNotResident) return pool_->CopyOut(dst, b.dev + at, bytes);
  if (b.host) {
    std::memcpy(dst, b.host.get() + at, bytes);
    return Status::OK();
  }
  if (tiers_ == nullptr || tiers_->store() == nullptr || !b.disk) {
    return Internal("session " + std::to_string(id_) + ": block of chunk " +
                    std::to_string(chunk) + " layer " + std::to_string(layer) + " has no copy");
  }
  const ChunkName name{tenant_, id_, layer, chunk};
  ChunkValue v;
  KVMEM_RETURN_IF_ERROR(options_.durability == Durability::kDurable
                            ? tiers_->store()->GetChunk(name, &v)
                            : tiers_->store()->GetSpill(name, &v));
  if (v.payload().size() != BlockBytes(c.tokens)) {
    return DataLoss(name.ToString() + ": " + std::to_string(v.payload().size()) +
                    " bytes stored, expected " + std::to_string(BlockBytes(c.tokens)));
  }
  std::memcpy(dst, v.payload().data() + at, bytes);
  return Status::OK();
}

Status Session::FetchBlock(uint32_t chunk, uint32_t layer, bool prefetch) {
  Chunk& c = chunks_[chunk];
  Block& b = c.blocks[layer];
  if (b.dev != kNotResident) return Status::OK();
  const Tier from = b.host ? Tier::kHost : Tier::kDisk;
  const uint64_t bytes = BlockBytes(c.tokens);
  // A prefetch is a guess: it takes free pool space only, never evicts for it.
  KVMEM_ASSIGN_OR_RETURN(uint64_t off, prefetch ? pool_->Allocate(bytes) : AllocateBlock(bytes));
  Status st;
  if (b.host) {
    st = pool_->CopyIn(off, b.host.get(), bytes);
  } else {
    ChunkValue v;
    const ChunkName name{tenant_, id_, layer, chunk};
    st = tiers_ == nullptr || tiers_->store() == nullptr
             ? Internal(name.ToString() + ": no copy to fetch")
             : (options_.durability == Durability::kDurable ? tiers_->store()->GetChunk(name, &v)
                                                            : tiers_->store()->GetSpill(name, &v));
    if (st.ok() && v.payload().size() != bytes) {
      st = DataLoss(name.ToString() + ": " + std::to_string(v.payload().size()) +
                    " bytes stored, expected " + std::to_string(bytes));
    }
    if (st.ok()) st = pool_->CopyIn(off, v.payload().data(), bytes);
    if (st.ok()) GlobalMetrics().restore_bytes[static_cast<int>(Tier::kDisk)] += bytes;
  }
  if (!st.ok()) {
    pool_->Free(off);
    return st.WithContext("fetching back chunk " + std::to_string(chunk) + " layer " +
                          std::to_string(layer));
  }
  if (b.host) {
    b.host.reset();
    tiers_->ReleaseHost(bytes);
    stat_host_bytes_ -= bytes;
  } else {
    stat_disk_bytes_ -= bytes;
  }
  b.dev = off;
  b.tick = std::max(b.tick, op_tick_);
  layers_[layer].chunk_spans[chunk].offset = ElemOffset(off);
  ++layers_[layer].spans_key;
  stat_bytes_ += pool_->allocator().ReservedBytes(bytes);
  (prefetch ? stat_prefetched_ : stat_fetched_)++;
  GlobalMetrics().fetch_backs[static_cast<int>(from)]++;
  return Status::OK();
}

Status Session::FetchBlocks(uint32_t layer, std::span<const uint32_t> chunks) {
  // Host copies and sessions without a store go one by one; RocksDB ones below.
  std::vector<uint32_t> disk;
  for (uint32_t c : chunks) {
    const Block& b = chunks_[c].blocks[layer];
    if (b.dev != kNotResident) continue;
    if (b.host || tiers_ == nullptr || tiers_->store() == nullptr) {
      KVMEM_RETURN_IF_ERROR(FetchBlock(c, layer, /*prefetch=*/false));
    } else {
      disk.push_back(c);
    }
  }
  if (disk.empty()) return Status::OK();
  // Destinations first (this may evict other blocks, never ones this op ticked).
  std::vector<uint64_t> offsets;
  offsets.reserve(disk.size());
  Status alloc;
  for (uint32_t c : disk) {
    auto off = AllocateBlock(BlockBytes(chunks_[c].tokens));
    if (!off.ok()) {
      alloc = off.status();
      break;
    }
    offsets.push_back(*off);
  }
  // Read, check and copy: on a host pool straight into the block, the CRC taken in the same
  // pass as the copy. Contiguous shares over the search pool's threads (RocksDB reads are
  // thread-safe), one reused read buffer per share.
  const size_t n = offsets.size();
  const ChunkStore* store = tiers_->store();
  const bool spill = options_.durability != Durability::kDurable;
  std::vector<Status> done(n);
  const uint32_t shares = g_search_pool == nullptr || n < 8
                              ? 1
                              : static_cast<uint32_t>(std::min<size_t>(g_search_pool->threads() + 1, n / 4));
  ForEachHead(shares, [&](uint32_t share) {
    ChunkValue scratch;
    std::vector<uint8_t> staging;
    for (size_t j = n * share / shares; j < n * (share + 1) / shares; ++j) {
      const uint32_t c = disk[j];
      const uint64_t bytes = BlockBytes(chunks_[c].tokens);
      const ChunkName name{tenant_, id_, layer, c};
      if (pool_->is_host()) {
        done[j] = store->ReadBlockInto(spill, name, &scratch,
                                       static_cast<uint8_t*>(pool_->base()) + offsets[j], bytes);
      } else {
        done[j] = store->ReadBlockInto(spill, name, &scratch, nullptr, bytes);
        if (done[j].ok()) done[j] = pool_->CopyIn(offsets[j], scratch.payload().data(), bytes);
      }
    }
  });
  Status first_error;
  for (size_t j = 0; j < n; ++j) {
    const uint32_t c = disk[j];
    if (!done[j].ok()) {
      pool_->Free(offsets[j]);
      if (first_error.ok()) {
        first_error = done[j].WithContext("fetching back chunk " + std::to_string(c) + " layer " +
                                          std::to_string(layer));
      }
      continue;
    }
    Block& b = chunks_[c].blocks[layer];
    const uint64_t bytes = BlockBytes(chunks_[c].tokens);
    b.dev = offsets[j];
    b.tick = std::max(b.tick, op_tick_);
    layers_[layer].chunk_spans[c].offset = ElemOffset(offsets[j]);
    ++layers_[layer].spans_key;
    stat_disk_bytes_ -= bytes;
    stat_bytes_ += pool_->allocator().ReservedBytes(bytes);
    stat_fetched_++;
    GlobalMetrics().fetch_backs[static_cast<int>(Tier::kDisk)]++;
    GlobalMetrics().restore_bytes[static_cast<int>(Tier::kDisk)] += bytes;
  }
  KVMEM_RETURN_IF_ERROR(first_error);
  return alloc;
}

Status Session::MakeResident(uint32_t layer) {
  if (op_tick_ == 0) BeginOp();
  // The layer's stamp first, so fetching one block cannot evict another of this layer. Its
  // blocks are walked only when one may be out of the pool: a dense 128K layer has ~8.8K
  // chunks, whose blocks (one allocation per chunk) cost ~100 µs to visit on the dev VM.
  Layer& lay = layers_[layer];
  lay.used_tick = op_tick_;
  if (!lay.maybe_cold) return Status::OK();
  std::vector<uint32_t> missing;
  for (uint32_t c = 0; c < chunks_.size(); ++c) {
    if (chunks_[c].blocks[layer].dev == kNotResident) missing.push_back(c);
  }
  if (!missing.empty()) KVMEM_RETURN_IF_ERROR(FetchBlocks(layer, missing));
  lay.maybe_cold = false;
  return Status::OK();
}

Status Session::EnsureOnDisk(uint32_t chunk, uint32_t layer) {
  Chunk& c = chunks_[chunk];
  Block& b = c.blocks[layer];
  if (b.disk) return Status::OK();
  const ChunkName name{tenant_, id_, layer, chunk};
  if (options_.durability == Durability::kDurable) {
    return FailedPrecondition(name.ToString() + " is not stored yet (the journal retries)");
  }
  if (tiers_ == nullptr || tiers_->store() == nullptr) return FailedPrecondition("no store to spill to");
  const uint64_t bytes = BlockBytes(c.tokens);
  std::vector<uint8_t> staging;
  const uint8_t* src = b.host.get();
  if (src == nullptr) {
    if (pool_->is_host()) {
      src = static_cast<const uint8_t*>(pool_->base()) + b.dev;
    } else {
      staging.resize(bytes);
      KVMEM_RETURN_IF_ERROR(pool_->CopyOut(staging.data(), b.dev, bytes));
      src = staging.data();
    }
  }
  KVMEM_RETURN_IF_ERROR(tiers_->store()->PutSpill(name, src, bytes));
  spilled_ = true;
  b.disk = true;
  GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)] += bytes;
  return Status::OK();
}

void Session::CollectEvictable(Tier from, bool running_op,
                               std::vector<EvictionCandidate>* out) const {
  CollectMemoryEvictable(from, running_op, out);
  if (tiers_ == nullptr || chunks_.empty()) return;
  const bool can_disk = tiers_->store() != nullptr;
  const bool can_host = tiers_->host_capacity() > 0;
  for (uint32_t c = 0; c < chunks_.size(); ++c) {
    if (Pinned(c)) continue;
    for (uint32_t l = 0; l < profile_.layers; ++l) {
      const Block& b = chunks_[c].blocks[l];
      const uint64_t tick = std::max(b.tick, layers_[l].used_tick);
      if (running_op && tick >= op_tick_) continue;  // in use by the running op
      const bool here = from == Tier::kDevice ? b.dev != kNotResident : b.host != nullptr;
      if (!here) continue;
      // Somewhere to go: the host tier (device blocks), a disk copy, or a spill.
      const bool to_disk = b.disk || (can_disk && options_.durability == Durability::kEphemeral);
      if (!to_disk && !(from == Tier::kDevice && can_host)) continue;
      out->push_back({const_cast<Session*>(this), c, l, tick});
    }
  }
}

void Session::CollectMemoryEvictable(Tier from, bool running_op,
                                     std::vector<EvictionCandidate>* out) const {
  if (!memory_ || tiers_ == nullptr) return;
  std::vector<MemoryEvictable> m;
  memory_->CollectEvictable(from, running_op ? std::max<uint64_t>(op_tick_, 1) : 0, &m);
  for (const MemoryEvictable& e : m) {
    out->push_back({const_cast<Session*>(this), 0, 0, e.tick, /*memory=*/true, e.id});
  }
}

Result<uint64_t> Session::Evict(const EvictionCandidate& c, Tier to) {
  if (c.memory) return memory_ ? memory_->Evict(c.memory_id, to) : Result<uint64_t>(uint64_t{0});
  return EvictBlock(c.chunk, c.layer, to);
}

Status Session::FetchMemoryBlocks(std::span<const uint64_t> ids) {
  if (!memory_) return Status::OK();
  BeginOp();
  return memory_->Fetch(ids);
}

Result<uint64_t> Session::EvictBlock(uint32_t chunk, uint32_t layer, Tier to) {
  Chunk& c = chunks_[chunk];
  Block& b = c.blocks[layer];
  const uint64_t bytes = BlockBytes(c.tokens);
  if (b.dev != kNotResident) {
    if (to == Tier::kHost && tiers_ != nullptr && tiers_->TryReserveHost(bytes)) {
      b.host.reset(new uint8_t[bytes]);
      if (Status st = pool_->CopyOut(b.host.get(), b.dev, bytes); !st.ok()) {
        b.host.reset();
        tiers_->ReleaseHost(bytes);
        return st;
      }
      stat_host_bytes_ += bytes;
    } else {
      KVMEM_RETURN_IF_ERROR(EnsureOnDisk(chunk, layer));
      stat_disk_bytes_ += bytes;
    }
    const uint64_t freed = pool_->allocator().ReservedBytes(bytes);
    pool_->Free(b.dev);
    b.dev = kNotResident;
    layers_[layer].maybe_cold = true;
    stat_bytes_ -= freed;
    stat_evicted_++;
    GlobalMetrics().evictions[static_cast<int>(Tier::kDevice)]++;
    return freed;
  }
  if (b.host) {
    KVMEM_RETURN_IF_ERROR(EnsureOnDisk(chunk, layer));
    b.host.reset();
    tiers_->ReleaseHost(bytes);
    stat_host_bytes_ -= bytes;
    stat_disk_bytes_ += bytes;
    stat_evicted_++;
    GlobalMetrics().evictions[static_cast<int>(Tier::kHost)]++;
    return bytes;
  }
  return uint64_t{0};
}

EvictResult Session::EvictAll(Tier to) {
  EvictResult r;
  std::vector<EvictionCandidate> cands;
  CollectEvictable(Tier::kDevice, /*running_op=*/false, &cands);
  if (to == Tier::kDisk) CollectEvictable(Tier::kHost, /*running_op=*/false, &cands);
  for (const EvictionCandidate& e : cands) {
    auto freed = Evict(e, to);
    if (!freed.ok()) {
      r.last_error = freed.status();
      continue;
    }
    // Device blocks going to disk pass through no host copy; host ones follow.
    const bool on_host = e.memory ? memory_->BlockTier(e.memory_id) == Tier::kHost
                                   : chunks_[e.chunk].blocks[e.layer].host != nullptr;
    if (to == Tier::kDisk && on_host) {
      auto again = Evict(e, Tier::kDisk);
      if (!again.ok()) r.last_error = again.status();
    }
    r.bytes += *freed;
    r.blocks++;
  }
  return r;
}

void Session::Prefetch() {
  if (prefetch_layer_ < 0 || tiers_ == nullptr) return;
  const uint32_t layer = static_cast<uint32_t>(prefetch_layer_);
  std::vector<uint32_t> chunks = std::move(prefetch_chunks_);
  prefetch_layer_ = -1;
  prefetch_chunks_.clear();
  BeginOp();
  const SlabAllocator& a = pool_->allocator();
  const double high = tiers_->options().high_watermark * static_cast<double>(a.capacity_bytes());
  for (uint32_t c : chunks) {
    if (c >= chunks_.size() || chunks_[c].blocks[layer].dev != kNotResident) continue;
    const uint64_t need = a.ReservedBytes(BlockBytes(chunks_[c].tokens));
    if (static_cast<double>(a.allocated_bytes() + need) > high) break;  // no eviction for a guess
    if (Status s = FetchBlock(c, layer, /*prefetch=*/true); !s.ok()) {
      KVMEM_LOG_WARN("session {}: prefetch of chunk {} layer {}: {}", id_, c, layer, s.ToString());
      break;
    }
  }
}

Status Session::ReadTail(uint32_t* n, std::string* keys, std::string* values) const {
  if (layers_ahead_ != 0) {
    return FailedPrecondition("session " + std::to_string(id_) +
                              ": a decode step has appended to only some layers; finish it first");
  }
  const uint32_t L = profile_.layers, H = profile_.kv_heads, T = layers_[0].tail_tokens;
  const uint64_t row = uint64_t{profile_.head_dim} * DTypeSize(profile_.dtype);
  *n = T;
  keys->resize(uint64_t{L} * H * T * row);
  values->resize(keys->size());
  for (uint32_t l = 0; l < L; ++l) {
    const uint64_t tail_v = layers_[l].tail_block + uint64_t{H} * tail_capacity_ * row;
    for (uint32_t h = 0; h < H; ++h) {
      const uint64_t src = uint64_t{h} * tail_capacity_ * row;
      const uint64_t dst = (uint64_t{l} * H + h) * T * row;
      KVMEM_RETURN_IF_ERROR(pool_->CopyOut(keys->data() + dst, layers_[l].tail_block + src, T * row));
      KVMEM_RETURN_IF_ERROR(pool_->CopyOut(values->data() + dst, tail_v + src, T * row));
    }
  }
  return Status::OK();
}

}  // namespace kvmem
