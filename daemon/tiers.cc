#include "daemon/tiers.h"

#include <chrono>
#include <cstring>
#include <map>
#include <thread>

#include "common/log.h"
#include "daemon/parallel.h"
#include "daemon/service.h"
#include "wire/framing.h"

namespace kvmem {
namespace w = ::kvmem::wire;
namespace {

// Tail segment payload: [n u32 LE][boundaries n][K [layers][kv_heads][n][head_dim]][V same].
std::string EncodeTail(uint32_t n, const uint8_t* keys, const uint8_t* values,
                       const uint8_t* boundaries, uint64_t kv_bytes) {
  std::string p;
  p.reserve(4 + n + 2 * kv_bytes);
  for (int i = 0; i < 4; ++i) p.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  p.append(reinterpret_cast<const char*>(boundaries), n);
  p.append(reinterpret_cast<const char*>(keys), kv_bytes);
  p.append(reinterpret_cast<const char*>(values), kv_bytes);
  return p;
}

struct Shape {
  uint32_t layers, heads;
  uint64_t row;  // bytes per (token, head) row
  explicit Shape(const ModelProfile& p)
      : layers(p.layers), heads(p.kv_heads), row(uint64_t{p.head_dim} * DTypeSize(p.dtype)) {}
  uint64_t TokensBytes(uint64_t n) const { return uint64_t{layers} * heads * n * row; }
  uint64_t BlockBytes(uint64_t n) const { return 2 * uint64_t{heads} * n * row; }
};

// Decoded tail segment: views into the payload.
struct TailView {
  uint32_t n = 0;
  const uint8_t* bounds = nullptr;
  const uint8_t* keys = nullptr;
  const uint8_t* values = nullptr;
};

Status ParseTail(const std::string& payload, const Shape& sh, const std::string& what,
                 TailView* t) {
  if (payload.size() < 4) return DataLoss(what + ": too short");
  uint32_t n = 0;
  for (int i = 3; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(payload[i]);
  const uint64_t kv = sh.TokensBytes(n);
  if (payload.size() != 4 + n + 2 * kv) {
    return DataLoss(what + ": size " + std::to_string(payload.size()) + " does not match " +
                    std::to_string(n) + " tokens of this profile");
  }
  const auto* p = reinterpret_cast<const uint8_t*>(payload.data());
  t->n = n;
  t->bounds = p + 4;
  t->keys = p + 4 + n;
  t->values = t->keys + kv;
  return Status::OK();
}

// Copies tokens [from, from + m) of a [layers][heads][n][row] tensor into a
// [layers][heads][m][row] one.
void SliceTokens(const Shape& sh, const uint8_t* src, uint32_t n, uint32_t from, uint32_t m,
                 uint8_t* dst) {
  for (uint64_t lh = 0; lh < uint64_t{sh.layers} * sh.heads; ++lh) {
    std::memcpy(dst + lh * m * sh.row, src + (lh * n + from) * sh.row, m * sh.row);
  }
}

class StoreJournal final : public SessionJournal {
 public:
  StoreJournal(ChunkStore* store, std::string tenant, uint64_t id, const ModelProfile& profile)
      : store_(store), tenant_(std::move(tenant)), id_(id), shape_(profile) {}

  // State after a restore: chunks [0, stored_chunks) stored, live tail segments and the
  // boundaries of tokens from bound_base on.
  void Resume(uint32_t stored_chunks, std::map<uint64_t, uint32_t> segments, uint64_t bound_base,
              std::string boundaries) {
    stored_chunks_ = stored_chunks;
    segments_ = std::move(segments);
    bound_base_ = bound_base;
    boundaries_ = std::move(boundaries);
  }

  Status LogTokens(uint64_t start, uint32_t n, const uint8_t* keys, const uint8_t* values,
                   const uint8_t* boundaries) override {
    if (start != bound_base_ + boundaries_.size()) {
      return Internal("journal: tokens logged out of order (" + std::to_string(start) +
                      ", expected " + std::to_string(bound_base_ + boundaries_.size()) + ")");
    }
    ChunkStore::Batch b;
    store_->PutTail(&b, tenant_, id_, start,
                    EncodeTail(n, keys, values, boundaries, shape_.TokensBytes(n)));
    KVMEM_RETURN_IF_ERROR(store_->Write(&b).WithContext(
        "session " + std::to_string(id_) + ": logging tokens " + std::to_string(start) + ".." +
        std::to_string(start + n)));
    segments_[start] = n;
    boundaries_.append(reinterpret_cast<const char*>(boundaries), n);
    return Status::OK();
  }

  void CancelTokens(uint64_t start) override {
    ChunkStore::Batch b;
    store_->DeleteTail(&b, tenant_, id_, start);
    if (Status s = store_->Write(&b); !s.ok()) {
      KVMEM_LOG_WARN("session {}: could not cancel logged tokens from {}: {}", id_, start,
                     s.ToString());
    }
    segments_.erase(start);
    if (start >= bound_base_ && start - bound_base_ <= boundaries_.size()) {
      boundaries_.resize(start - bound_base_);
    }
  }

  uint32_t stored_chunks() const override { return stored_chunks_; }

  void ChunksSealed(const Session& s) override {
    const uint32_t count = s.chunk_count();
    if (count <= stored_chunks_) return;
    if (Status st = StoreChunks(s, count); !st.ok()) {
      // The tokens stay durable as tail segments; the next call retries.
      KVMEM_LOG_WARN("session {}: storing chunks {}..{} deferred: {}", id_, stored_chunks_,
                     count, st.ToString());
    }
  }

 private:
  Status StoreChunks(const Session& s, uint32_t count) {
    constexpr size_t kBatchBytes = 32u << 20;
    std::string block;
    ChunkStore::Batch b;
    auto batch = std::make_unique<ChunkStore::Batch>();
    for (uint32_t c = stored_chunks_; c < count; ++c) {
      const uint64_t start = s.chunk_start(c);
      const uint32_t tokens = s.chunk_tokens(c);
      if (start < bound_base_ || start + tokens > bound_base_ + boundaries_.size()) {
        return Internal("journal: chunk " + std::to_string(c) + " outside logged tokens");
      }
      for (uint32_t l = 0; l < shape_.layers; ++l) {
        KVMEM_RETURN_IF_ERROR(s.ReadChunkBlock(c, l, &block));
        store_->PutChunk(batch.get(), ChunkName{tenant_, id_, l, c}, block.data(), block.size());
      }
      StoredChunkEntry e{c, start, tokens, boundaries_.substr(start - bound_base_, tokens)};
      store_->PutChunkEntry(batch.get(), tenant_, id_, e);
      if (batch->bytes() >= kBatchBytes && c + 1 < count) {
        // Chunk records and entries are idempotent; segments go only in the last batch.
        KVMEM_RETURN_IF_ERROR(store_->Write(batch.get()));
        batch = std::make_unique<ChunkStore::Batch>();
      }
    }
    const uint64_t sealed_end = s.chunk_start(count - 1) + s.chunk_tokens(count - 1);
    // Segments wholly inside stored chunks go with one range delete (cheap for later scans).
    // The range ends at the start of the first segment that outlives sealed_end: segments
    // written by this journal are contiguous, but a restored store may hold overlapping ones,
    // and ending the range at the last covered segment's end would then delete a segment that
    // starts inside it and holds tokens past sealed_end (found by fuzz_store_records).
    std::vector<uint64_t> gone;
    uint64_t delete_to = 0;
    for (const auto& [start, n] : segments_) {
      if (start + n > sealed_end) {
        delete_to = std::min(delete_to, start);
        break;
      }
      gone.push_back(start);
      delete_to = start + n;
    }
    // A segment that straddles sealed_end (e.g. a prefill append whose last tokens stay in
    // the tail) would keep every one of its tokens on disk and be read whole at restart. When
    // the session's tail is exactly the logged tokens past sealed_end, all live segments are
    // replaced by one holding just those (same batch: the range delete, then the put, which
    // has the higher sequence number). Mid decode step the tail cannot be read: keep them.
    const uint64_t logged_end = bound_base_ + boundaries_.size();
    uint32_t tail_n = 0;
    std::string tail_k, tail_v;
    const bool straddles = !segments_.empty() && segments_.size() > gone.size() &&
                           segments_.rbegin()->first + segments_.rbegin()->second == logged_end;
    if (straddles && logged_end == s.tokens() && s.ReadTail(&tail_n, &tail_k, &tail_v).ok() &&
        tail_n == logged_end - sealed_end) {
      gone.clear();
      for (const auto& [start, n] : segments_) gone.push_back(start);
      store_->DeleteTailRange(batch.get(), tenant_, id_, logged_end);
      if (tail_n > 0) {
        const auto* b = reinterpret_cast<const uint8_t*>(boundaries_.data()) + (sealed_end - bound_base_);
        store_->PutTail(batch.get(), tenant_, id_, sealed_end,
                        EncodeTail(tail_n, reinterpret_cast<const uint8_t*>(tail_k.data()),
                                   reinterpret_cast<const uint8_t*>(tail_v.data()), b,
                                   shape_.TokensBytes(tail_n)));
      }
    } else {
      tail_n = 0;
      if (!gone.empty()) store_->DeleteTailRange(batch.get(), tenant_, id_, delete_to);
    }
    KVMEM_RETURN_IF_ERROR(store_->Write(batch.get()));
    for (uint64_t g : gone) segments_.erase(g);
    if (tail_n > 0) segments_[sealed_end] = tail_n;
    boundaries_.erase(0, sealed_end - bound_base_);
    bound_base_ = sealed_end;
    stored_chunks_ = count;
    return Status::OK();
  }

  ChunkStore* const store_;
  const std::string tenant_;
  const uint64_t id_;
  const Shape shape_;
  uint32_t stored_chunks_ = 0;
  std::map<uint64_t, uint32_t> segments_;  // live tail segments: start -> tokens
  uint64_t bound_base_ = 0;                // first token whose boundary is in boundaries_
  std::string boundaries_;                 // classes of tokens not yet in a stored chunk
};

// Memory block record payload (column family memory_blocks, docs/wire-format.md):
// [span_start u64 LE][span_end u64 LE][label_len u16 LE][label][gate_dim u32 LE]
// [gate key f32 LE x gate_dim][payload_bytes u32 LE][payload].
template <typename T>
void PutLE(std::string* s, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) s->push_back(static_cast<char>((uint64_t{v} >> (8 * i)) & 0xFF));
}
template <typename T>
T GetLE(const char* p) {
  uint64_t v = 0;
  for (size_t i = sizeof(T); i-- > 0;) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return static_cast<T>(v);
}

std::string EncodeMemoryBlock(const MemoryBlockRecord& r, uint32_t gate_dim, uint64_t payload_bytes) {
  std::string p;
  p.reserve(30 + r.info->label.size() + gate_dim * 4 + payload_bytes);
  PutLE<uint64_t>(&p, r.info->span_start);
  PutLE<uint64_t>(&p, r.info->span_end);
  PutLE<uint16_t>(&p, static_cast<uint16_t>(std::min<size_t>(r.info->label.size(), 0xFFFF)));
  p.append(r.info->label, 0, 0xFFFF);
  PutLE<uint32_t>(&p, gate_dim);
  p.append(reinterpret_cast<const char*>(r.gate_key), size_t{gate_dim} * sizeof(float));
  PutLE<uint32_t>(&p, static_cast<uint32_t>(payload_bytes));
  p.append(reinterpret_cast<const char*>(r.payload), payload_bytes);
  return p;
}

// Block id 0 is never assigned: its record holds the session's next block id (u64 LE).
constexpr uint64_t kNextIdRecord = 0;

struct MemoryBlockView {
  MemoryBlockInfo info;
  const char* gate_key = nullptr;  // gate_dim floats (unaligned)
  const char* payload = nullptr;
};

Status DecodeMemoryBlock(std::string_view p, const MemoryOptions& o, const std::string& what,
                         MemoryBlockView* v) {
  auto bad = [&](const char* why) { return DataLoss(what + ": " + why); };
  if (p.size() < 18) return bad("too short");
  v->info.span_start = GetLE<uint64_t>(p.data());
  v->info.span_end = GetLE<uint64_t>(p.data() + 8);
  const size_t label = GetLE<uint16_t>(p.data() + 16);
  size_t at = 18;
  if (p.size() < at + label + 4) return bad("truncated label");
  v->info.label.assign(p.data() + at, label);
  at += label;
  if (GetLE<uint32_t>(p.data() + at) != o.gate_dim) return bad("gate key dimension differs from the session's");
  at += 4;
  if (p.size() < at + size_t{o.gate_dim} * 4 + 4) return bad("truncated gate key");
  v->gate_key = p.data() + at;
  at += size_t{o.gate_dim} * 4;
  if (GetLE<uint32_t>(p.data() + at) != o.payload_bytes() || p.size() != at + 4 + o.payload_bytes()) {
    return bad("payload size differs from the session's memory geometry");
  }
  v->payload = p.data() + at + 4;
  return Status::OK();
}

class StoreMemoryJournal final : public MemoryJournal {
 public:
  StoreMemoryJournal(ChunkStore* store, std::string tenant, uint64_t id, MemoryOptions o)
      : store_(store), tenant_(std::move(tenant)), id_(id), o_(std::move(o)) {}
  Status LogPut(std::span<const MemoryBlockRecord> blocks) override {
    ChunkStore::Batch b;
    uint64_t next = 0;
    for (const MemoryBlockRecord& r : blocks) {
      store_->PutMemoryBlock(&b, tenant_, id_, r.info->id,
                             EncodeMemoryBlock(r, o_.gate_dim, o_.payload_bytes()));
      next = std::max(next, r.info->id + 1);
    }
    // The id high-water mark (block id 0 is never assigned) goes in the same batch, so ids of
    // dropped blocks are not handed out again after a restart.
    std::string mark;
    PutLE<uint64_t>(&mark, next);
    store_->PutMemoryBlock(&b, tenant_, id_, kNextIdRecord, mark);
    return store_->Write(&b).WithContext("session " + std::to_string(id_) + ": storing " +
                                         std::to_string(blocks.size()) + " memory blocks");
  }
  Status LogDrop(std::span<const uint64_t> ids) override {
    ChunkStore::Batch b;
    for (uint64_t id : ids) store_->DeleteMemoryBlock(&b, tenant_, id_, id);
    return store_->Write(&b).WithContext("session " + std::to_string(id_) + ": dropping " +
                                         std::to_string(ids.size()) + " memory blocks");
  }
  Status ReadPayload(uint64_t block, uint8_t* out) const override {
    std::string payload;
    KVMEM_RETURN_IF_ERROR(store_->GetMemoryBlock(tenant_, id_, block, &payload));
    MemoryBlockView v;
    KVMEM_RETURN_IF_ERROR(DecodeMemoryBlock(
        payload, o_,
        "memory block (tenant " + tenant_ + ", session " + std::to_string(id_) + ", block " +
            std::to_string(block) + ")",
        &v));
    std::memcpy(out, v.payload, o_.payload_bytes());
    return Status::OK();
  }

 private:
  ChunkStore* const store_;
  const std::string tenant_;
  const uint64_t id_;
  const MemoryOptions o_;
};

std::string SessionName(const std::string& tenant, uint64_t id) {
  return "session (tenant " + tenant + ", session " + std::to_string(id) + ")";
}

// Re-adds a session's stored memory blocks (in groups, checked) under their stored ids.
Status RestoreMemoryBlocks(const ChunkStore& store, const std::string& tenant, uint64_t id,
                           MemoryStore* mem, RestoreStats* stats, bool own) {
  const MemoryOptions& o = mem->options();
  constexpr size_t kGroup = 4096;
  std::vector<uint64_t> ids;
  std::vector<float> keys;
  std::string payloads;
  std::vector<uint64_t> starts, ends;
  std::vector<std::string> labels;
  auto flush = [&]() -> Status {
    if (ids.empty()) return Status::OK();
    NewMemoryBlocks b;
    b.n = static_cast<uint32_t>(ids.size());
    b.gate_keys = keys.data();
    b.payloads = reinterpret_cast<const uint8_t*>(payloads.data());
    b.span_starts = starts;
    b.span_ends = ends;
    b.labels = std::move(labels);
    KVMEM_RETURN_IF_ERROR(mem->Restore(ids, b, /*stay_on_disk_if_full=*/own));
    ids.clear();
    keys.clear();
    payloads.clear();
    starts.clear();
    ends.clear();
    labels.clear();
    return Status::OK();
  };
  KVMEM_RETURN_IF_ERROR(store.ScanMemoryBlocks(
      tenant, id, [&](uint64_t block, std::string_view payload) -> Status {
        if (block == kNextIdRecord) {
          if (payload.size() != 8) {
            return DataLoss("memory block id mark (tenant " + tenant + ", session " +
                            std::to_string(id) + "): " + std::to_string(payload.size()) + " bytes");
          }
          mem->RaiseNextId(GetLE<uint64_t>(payload.data()));
          return Status::OK();
        }
        MemoryBlockView v;
        KVMEM_RETURN_IF_ERROR(DecodeMemoryBlock(
            payload, o,
            "memory block (tenant " + tenant + ", session " + std::to_string(id) + ", block " +
                std::to_string(block) + ")",
            &v));
        ids.push_back(block);
        const size_t at = keys.size();
        keys.resize(at + o.gate_dim);
        std::memcpy(&keys[at], v.gate_key, size_t{o.gate_dim} * sizeof(float));
        payloads.append(v.payload, o.payload_bytes());
        starts.push_back(v.info.span_start);
        ends.push_back(v.info.span_end);
        labels.push_back(std::move(v.info.label));
        stats->bytes += payload.size();
        return ids.size() >= kGroup ? flush() : Status::OK();
      }));
  return flush();
}

// Rebuilds a session from the stored image (src_tenant, src_id) (header already decoded into
// r->profile / r->options) as session (r->tenant, r->id). own: the image is the session's own
// durable records (restart): the journal is attached and blocks count as stored. Otherwise
// (a snapshot) the session gets no journal.
Status RestoreOne(ChunkStore* store, KVPool* pool, TierContext* tiers, const std::string& src_tenant,
                  uint64_t src_id, bool own, RestoredSession* r, RestoreStats* stats,
                  ParallelPool* workers) {
  const Shape sh(r->profile);
  const std::string name = SessionName(src_tenant, src_id);
  KVMEM_ASSIGN_OR_RETURN(std::vector<StoredChunkEntry> table, store->ChunkTable(src_tenant, src_id));
  KVMEM_ASSIGN_OR_RETURN(std::vector<StoredTailSegment> tails, store->TailSegments(src_tenant, src_id));
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Session> s,
                         Session::Create(r->id, r->tenant, r->profile, r->options, pool, tiers));
  uint64_t next = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    if (table[i].chunk != i || table[i].start != next) {
      return DataLoss(name + ": chunk table entry " + std::to_string(i) + " is missing or out of order");
    }
    next += table[i].tokens;
  }
  std::vector<std::unique_ptr<ChunkStore::LayerCursor>> cursors;
  for (uint32_t l = 0; l < sh.layers; ++l) {
    KVMEM_ASSIGN_OR_RETURN(auto c, store->OpenLayer(src_tenant, src_id, l));
    cursors.push_back(std::move(c));
  }
  // Stored chunks go straight into pool blocks: one sequential cursor per layer (4 MiB
  // readahead), layers read, checked and copied in parallel on `workers`; each cursor's
  // payload view stays valid until its next call.
  std::vector<uint32_t> tokens(table.size());
  std::vector<std::string_view> bounds(table.size());
  for (size_t c = 0; c < table.size(); ++c) {
    tokens[c] = table[c].tokens;
    bounds[c] = table[c].boundaries;
  }
  std::vector<uint64_t> layer_bytes(sh.layers, 0);
  auto read = [&](uint32_t l, uint32_t c, std::string_view* block) -> Status {
    KVMEM_RETURN_IF_ERROR(cursors[l]->Next(c, block));
    if (block->size() != sh.BlockBytes(tokens[c])) {
      return DataLoss(ChunkName{src_tenant, src_id, l, c}.ToString() + ": " +
                      std::to_string(block->size()) + " bytes, expected " +
                      std::to_string(sh.BlockBytes(tokens[c])));
    }
    layer_bytes[l] += block->size();
    return Status::OK();
  };
  const bool load = !own || tiers == nullptr || tiers->options().restore_resident;
  if (!table.empty()) {
    KVMEM_RETURN_IF_ERROR(s->RestoreChunks(tokens, bounds, own, load, read, workers)
                              .WithContext(name + ": restoring " + std::to_string(table.size()) +
                                           " stored chunks"));
  }
  for (uint64_t b : layer_bytes) stats->bytes += b;
  std::vector<uint8_t> keys, values;
  KVMEM_RETURN_IF_ERROR(s->FinishChunkRestore().WithContext(name));
  // Tail segments: tokens past the stored chunks, in order, without gaps.
  std::map<uint64_t, uint32_t> live;
  std::string tail_bounds;
  const uint64_t table_end = next;
  for (const StoredTailSegment& seg : tails) {
    const std::string what = name + " tail segment at token " + std::to_string(seg.start);
    TailView t;
    KVMEM_RETURN_IF_ERROR(ParseTail(seg.payload, sh, what, &t));
    stats->bytes += seg.payload.size();
    if (seg.start + t.n <= next) continue;  // covered by stored chunks
    if (seg.start > next) {
      return DataLoss(what + ": tokens " + std::to_string(next) + ".." +
                      std::to_string(seg.start) + " are missing");
    }
    live[seg.start] = t.n;
    const uint32_t from = static_cast<uint32_t>(next - seg.start), m = t.n - from;
    keys.resize(sh.TokensBytes(m));
    values.resize(keys.size());
    SliceTokens(sh, t.keys, t.n, from, m, keys.data());
    SliceTokens(sh, t.values, t.n, from, m, values.data());
    KVMEM_RETURN_IF_ERROR(
        s->AppendKV(m, keys.data(), values.data(), t.bounds + from).status().WithContext(
            what));
    tail_bounds.append(reinterpret_cast<const char*>(t.bounds + from), m);
    next += m;
  }
  if (s->chunk_count() < table.size()) {
    return DataLoss(name + ": replay sealed " + std::to_string(s->chunk_count()) +
                    " chunks, the chunk table has " + std::to_string(table.size()));
  }
  for (size_t i = 0; i < table.size(); ++i) {
    if (s->chunk_start(static_cast<uint32_t>(i)) != table[i].start ||
        s->chunk_tokens(static_cast<uint32_t>(i)) != table[i].tokens) {
      return DataLoss(name + ": replay cut chunk " + std::to_string(i) +
                      " differently from the stored chunk table");
    }
  }
  if (MemoryStore* mem = s->memory()) {
    KVMEM_RETURN_IF_ERROR(RestoreMemoryBlocks(*store, src_tenant, src_id, mem, stats, own));
    if (own) {
      mem->AttachJournal(
          std::make_unique<StoreMemoryJournal>(store, r->tenant, r->id, mem->options()));
    }
  }
  if (own) {
    auto journal = std::make_unique<StoreJournal>(store, r->tenant, r->id, r->profile);
    journal->Resume(static_cast<uint32_t>(table.size()), std::move(live), table_end,
                    std::move(tail_bounds));
    s->AttachJournal(std::move(journal));
    s->journal()->ChunksSealed(*s);  // chunks sealed by the replay but not stored yet
    s->MarkStoredChunks();
  }
  stats->tokens += s->tokens();
  stats->chunks += s->chunk_count();
  r->session = std::move(s);
  return Status::OK();
}

// Writes the complete image of `s` (header, chunk blocks from whatever tier holds them, chunk
// table, the tail as one segment) under (tenant, id) in the durable-session format, in batches
// of ~32 MiB with the header in the last one: an image without its header is not listed.
// Returns the tail's start and length.
Status PersistImage(ChunkStore* store, const Session& s, const std::string& tenant, uint64_t id,
                    uint64_t* tail_start, uint32_t* tail_n, uint64_t* bytes) {
  constexpr size_t kBatchBytes = 32u << 20;
  const Shape sh(s.profile());
  std::string keys, values;
  KVMEM_RETURN_IF_ERROR(s.ReadTail(tail_n, &keys, &values));
  *tail_start = s.tokens() - *tail_n;
  auto batch = std::make_unique<ChunkStore::Batch>();
  std::string block;
  *bytes = 0;
  for (uint32_t c = 0; c < s.chunk_count(); ++c) {
    for (uint32_t l = 0; l < sh.layers; ++l) {
      KVMEM_RETURN_IF_ERROR(s.ReadChunkBlock(c, l, &block));
      store->PutChunk(batch.get(), ChunkName{tenant, id, l, c}, block.data(), block.size());
      *bytes += block.size();
    }
    const StoredChunkEntry e{c, s.chunk_start(c), s.chunk_tokens(c),
                             std::string(s.boundaries(s.chunk_start(c), s.chunk_tokens(c)))};
    store->PutChunkEntry(batch.get(), tenant, id, e);
    if (batch->bytes() >= kBatchBytes) {
      KVMEM_RETURN_IF_ERROR(store->Write(batch.get()));
      batch = std::make_unique<ChunkStore::Batch>();
    }
  }
  if (*tail_n > 0) {
    const std::string_view b = s.boundaries(*tail_start, *tail_n);
    store->PutTail(batch.get(), tenant, id, *tail_start,
                   EncodeTail(*tail_n, reinterpret_cast<const uint8_t*>(keys.data()),
                              reinterpret_cast<const uint8_t*>(values.data()),
                              reinterpret_cast<const uint8_t*>(b.data()), sh.TokensBytes(*tail_n)));
    *bytes += 2 * sh.TokensBytes(*tail_n);
  }
  // Memory blocks, from whichever tier holds their payloads, and the id high-water mark.
  if (const MemoryStore* mem = s.memory()) {
    const MemoryOptions& o = mem->options();
    std::string payload(o.payload_bytes(), '\0');
    for (const MemoryBlockInfo* info : mem->List(0, UINT32_MAX)) {
      KVMEM_ASSIGN_OR_RETURN(const float* key, mem->GateKey(info->id));
      KVMEM_RETURN_IF_ERROR(mem->ReadPayload(info->id, payload.data()));
      const MemoryBlockRecord rec{info, key, reinterpret_cast<const uint8_t*>(payload.data())};
      store->PutMemoryBlock(batch.get(), tenant, id, info->id,
                            EncodeMemoryBlock(rec, o.gate_dim, o.payload_bytes()));
      *bytes += o.payload_bytes();
      if (batch->bytes() >= kBatchBytes) {
        KVMEM_RETURN_IF_ERROR(store->Write(batch.get()));
        batch = std::make_unique<ChunkStore::Batch>();
      }
    }
    std::string mark;
    PutLE<uint64_t>(&mark, mem->next_id());
    store->PutMemoryBlock(batch.get(), tenant, id, kNextIdRecord, mark);
  }
  store->PutHeader(batch.get(), tenant, id, EncodeSessionHeader(id, s.profile(), s.options()));
  return store->Write(batch.get());
}

}  // namespace

uint32_t RestoreThreads() {
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  return std::min(8u, cores) - 1;
}

bool IsSnapshotTenant(std::string_view stored_tenant) {
  return stored_tenant.starts_with(kSnapshotTenantPrefix);
}

std::string SnapshotTenant(std::string_view tenant) {
  return std::string(kSnapshotTenantPrefix) + std::string(tenant);
}

uint64_t SnapshotId(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return h | 1;  // never 0
}

namespace {
// The stored header of snapshot `name` of `tenant`; NOT_FOUND naming it when there is none.
Status SnapshotHeader(const ChunkStore* store, const std::string& tenant, const std::string& name,
                      std::string* header) {
  Status st = store->GetHeader(SnapshotTenant(tenant), SnapshotId(name), header);
  if (st.code() == StatusCode::kNotFound) return NotFound("snapshot '" + name + "' not found");
  return st;
}
}  // namespace

Result<SnapshotInfo> WriteSnapshot(ChunkStore* store, const Session& s, const std::string& name) {
  if (name.empty() || name.size() > 256) return InvalidArgument("snapshot name must be 1..256 bytes");
  const std::string ns = SnapshotTenant(s.tenant());
  const uint64_t id = SnapshotId(name);
  std::string header;
  if (Status st = store->GetHeader(ns, id, &header); st.ok()) {
    return AlreadyExists("snapshot '" + name + "' already exists (drop it first)");
  } else if (st.code() != StatusCode::kNotFound) {
    return st;
  }
  // Leftovers of a snapshot that failed half-way (no header) go first.
  KVMEM_RETURN_IF_ERROR(store->DeleteSession(ns, id));
  SnapshotInfo info;
  uint64_t tail_start = 0;
  uint32_t tail_n = 0;
  Status st = PersistImage(store, s, ns, id, &tail_start, &tail_n, &info.bytes);
  if (!st.ok()) {
    store->DeleteSession(ns, id).IgnoreError();
    return st.WithContext("snapshot '" + name + "'");
  }
  info.tokens = s.tokens();
  info.chunks = s.chunk_count();
  return info;
}

Result<std::unique_ptr<Session>> RestoreSnapshot(ChunkStore* store, KVPool* pool, TierContext* tiers,
                                                 const std::string& tenant, const std::string& name,
                                                 uint64_t new_id, Durability durability,
                                                 const SessionOptions& defaults) {
  const std::string ns = SnapshotTenant(tenant);
  const uint64_t id = SnapshotId(name);
  std::string header;
  KVMEM_RETURN_IF_ERROR(SnapshotHeader(store, tenant, name, &header));
  RestoredSession r;
  r.tenant = tenant;
  r.id = new_id;
  KVMEM_RETURN_IF_ERROR(DecodeSessionHeader(header, defaults, &r.profile, &r.options));
  r.options.durability = durability;
  RestoreStats stats;
  KVMEM_RETURN_IF_ERROR(RestoreOne(store, pool, tiers, ns, id, /*own=*/false, &r, &stats,
                                       /*workers=*/nullptr)
                            .WithContext("restoring snapshot '" + name + "'"));
  if (durability == Durability::kDurable) {
    // The new session's own records: the same image under its id, then its journal.
    Session& s = *r.session;
    uint64_t tail_start = 0, bytes = 0;
    uint32_t tail_n = 0;
    if (Status st = PersistImage(store, s, tenant, new_id, &tail_start, &tail_n, &bytes); !st.ok()) {
      store->DeleteSession(tenant, new_id).IgnoreError();
      return st.WithContext("restoring snapshot '" + name + "' as a durable session");
    }
    auto journal = std::make_unique<StoreJournal>(store, tenant, new_id, s.profile());
    std::map<uint64_t, uint32_t> segments;
    if (tail_n > 0) segments[tail_start] = tail_n;
    journal->Resume(s.chunk_count(), std::move(segments), tail_start,
                    std::string(s.boundaries(tail_start, tail_n)));
    s.AttachJournal(std::move(journal));
    s.MarkStoredChunks();
    if (MemoryStore* mem = s.memory()) {
      mem->AttachJournal(std::make_unique<StoreMemoryJournal>(store, tenant, new_id, mem->options()));
      mem->MarkStored();  // PersistImage wrote every block under the new id
    }
  }
  return std::move(r.session);
}

Status DeleteSnapshot(ChunkStore* store, const std::string& tenant, const std::string& name) {
  std::string header;
  KVMEM_RETURN_IF_ERROR(SnapshotHeader(store, tenant, name, &header));
  return store->DeleteSession(SnapshotTenant(tenant), SnapshotId(name));
}

std::string EncodeSessionHeader(uint64_t id, const ModelProfile& p, const SessionOptions& o) {
  flatbuffers::FlatBufferBuilder fbb(512);
  auto profile = ProfileToWire(fbb, p);
  auto options = OptionsToWire(fbb, o);
  fbb.Finish(w::CreateCreateSession(fbb, id, profile, options));
  return std::string(reinterpret_cast<const char*>(fbb.GetBufferPointer()), fbb.GetSize());
}

Status DecodeSessionHeader(const std::string& payload, const SessionOptions& defaults,
                           ModelProfile* profile, SessionOptions* options) {
  flatbuffers::Verifier v(reinterpret_cast<const uint8_t*>(payload.data()), payload.size());
  if (!v.VerifyBuffer<w::CreateSession>(nullptr)) return DataLoss("session header: not a valid FlatBuffer");
  const auto* cs = flatbuffers::GetRoot<w::CreateSession>(payload.data());
  const w::ModelProfile* p = cs->profile();
  const w::SessionOptions* o = cs->options();
  if (p == nullptr || o == nullptr) return DataLoss("session header: profile or options missing");
  KVMEM_ASSIGN_OR_RETURN(ModelProfile m, ProfileFromWire(p));
  SessionOptions s = defaults;
  s.chunker.min_tokens = o->chunk_min_tokens();
  s.chunker.max_tokens = o->chunk_max_tokens();
  s.sink_tokens = o->sink_tokens();
  s.recent_window = o->recent_window();
  s.default_budget_tokens = o->default_budget_tokens();
  s.mode = static_cast<SelectionMode>(o->mode());
  s.durability = static_cast<Durability>(o->durability());
  s.ttl_seconds = o->ttl_seconds();
  s.label = o->label() ? o->label()->str() : "";
  s.values_optional = o->values_optional();
  KVMEM_ASSIGN_OR_RETURN(s.memory, MemoryOptionsFromWire(o->memory()));
  KVMEM_RETURN_IF_ERROR(RetrievalFromWire(o, &s.retrieval).WithContext("session header"));
  *profile = std::move(m);
  *options = std::move(s);
  return Status::OK();
}

Status MakeDurable(ChunkStore* store, Session* session) {
  ChunkStore::Batch b;
  store->PutHeader(&b, session->tenant(), session->id(),
                   EncodeSessionHeader(session->id(), session->profile(), session->options()));
  KVMEM_RETURN_IF_ERROR(store->Write(&b).WithContext("creating durable session " +
                                                     std::to_string(session->id())));
  session->AttachJournal(std::make_unique<StoreJournal>(store, session->tenant(), session->id(),
                                                        session->profile()));
  if (MemoryStore* mem = session->memory()) {
    mem->AttachJournal(std::make_unique<StoreMemoryJournal>(store, session->tenant(),
                                                            session->id(), mem->options()));
  }
  return Status::OK();
}

Result<std::vector<RestoredSession>> RestoreSessions(ChunkStore* store, KVPool* pool,
                                                     const SessionOptions& defaults,
                                                     RestoreStats* stats, TierContext* tiers) {
  const auto t0 = std::chrono::steady_clock::now();
  KVMEM_ASSIGN_OR_RETURN(std::vector<StoredSessionRef> refs, store->ListSessions());
  // Nothing else runs before ready: the restore borrows the cores (one task per layer).
  ParallelPool workers(RestoreThreads());
  std::vector<RestoredSession> out;
  for (StoredSessionRef& ref : refs) {
    if (IsSnapshotTenant(ref.tenant)) continue;  // snapshots are images, not sessions
    RestoredSession r;
    r.tenant = ref.tenant;
    r.id = ref.session;
    r.status = ref.status;
    if (r.status.ok()) r.status = DecodeSessionHeader(ref.header, defaults, &r.profile, &r.options);
    if (r.status.ok()) r.status = RestoreOne(store, pool, tiers, r.tenant, r.id, /*own=*/true, &r, stats, &workers);
    if (r.status.ok()) {
      ++stats->sessions;
    } else {
      ++stats->failed;
      r.session.reset();
    }
    out.push_back(std::move(r));
  }
  stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

Result<VerifyReport> VerifySession(const ChunkStore& store, const std::string& tenant,
                                   uint64_t id, const ModelProfile& profile,
                                   const MemoryOptions* memory) {
  const Shape sh(profile);
  VerifyReport rep;
  KVMEM_ASSIGN_OR_RETURN(std::vector<StoredChunkEntry> table, store.ChunkTable(tenant, id));
  std::string payload;
  uint64_t next = 0;
  for (const StoredChunkEntry& e : table) {
    for (uint32_t l = 0; l < sh.layers; ++l) {
      const ChunkName name{tenant, id, l, e.chunk};
      Status s = store.GetChunk(name, &payload);
      if (s.ok() && payload.size() != sh.BlockBytes(e.tokens)) {
        s = DataLoss(name.ToString() + ": wrong size");
      }
      if (!s.ok()) rep.bad.push_back(s.ToString());
    }
    ++rep.chunks;
    next = e.start + e.tokens;
  }
  auto tails = store.TailSegments(tenant, id);
  if (!tails.ok()) {
    rep.bad.push_back(tails.status().ToString());
  } else {
    for (const StoredTailSegment& seg : *tails) {
      TailView t;
      const std::string what = SessionName(tenant, id) + " tail segment at token " + std::to_string(seg.start);
      if (Status s = ParseTail(seg.payload, sh, what, &t); !s.ok()) {
        rep.bad.push_back(s.ToString());
        continue;
      }
      next = std::max<uint64_t>(next, seg.start + t.n);
    }
  }
  rep.tokens = next;
  if (memory != nullptr && memory->enabled()) {
    Status st = store.ScanMemoryBlocks(tenant, id, [&](uint64_t block, std::string_view payload) {
      if (block == kNextIdRecord) return Status::OK();
      MemoryBlockView v;
      if (Status d = DecodeMemoryBlock(payload, *memory,
                                       "memory block (tenant " + tenant + ", session " +
                                           std::to_string(id) + ", block " + std::to_string(block) + ")",
                                       &v);
          !d.ok()) {
        rep.bad.push_back(d.ToString());
      }
      ++rep.memory_blocks;
      return Status::OK();
    });
    // A failed checksum stops the scan; it names the block.
    if (!st.ok()) rep.bad.push_back(st.ToString());
  }
  return rep;
}

}  // namespace kvmem
