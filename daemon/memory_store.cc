#include "daemon/memory_store.h"

#include <cmath>
#include <cstring>
#include <unordered_set>

#include "daemon/chunk_store.h"
#include "daemon/eviction.h"

namespace kvmem {

std::string_view MemoryGateName(MemoryGate g) {
  switch (g) {
    case MemoryGate::kDefault: return "default";
    case MemoryGate::kTreeExact: return "tree_exact";
    case MemoryGate::kTreeBudget: return "tree_budget";
    case MemoryGate::kLinearScan: return "linear";
    case MemoryGate::kScorer: return "scorer";
  }
  return "unknown";
}

Status ValidateMemoryOptions(const MemoryOptions& o) {
  if (!o.enabled()) {
    if (o.payload_rows || o.payload_dim || !o.scorer_file.empty()) {
      return InvalidArgument("memory options: gate_dim is 0 but payload or scorer is set");
    }
    return Status::OK();
  }
  if (o.gate_dim > kMaxGateDim) {
    return InvalidArgument("memory options: gate_dim " + std::to_string(o.gate_dim) +
                           " exceeds " + std::to_string(kMaxGateDim));
  }
  if (o.payload_rows == 0 || o.payload_dim == 0) {
    return InvalidArgument("memory options: payload_rows and payload_dim must be > 0");
  }
  if (o.payload_bytes() > kMaxMemoryPayloadBytes) {
    return InvalidArgument("memory options: a payload of " + std::to_string(o.payload_rows) +
                           " x " + std::to_string(o.payload_dim) + " exceeds 64 MiB");
  }
  if (o.default_gate == MemoryGate::kDefault ||
      static_cast<uint8_t>(o.default_gate) > static_cast<uint8_t>(MemoryGate::kScorer)) {
    return InvalidArgument("memory options: default_gate must name a gate");
  }
  return Status::OK();
}

MemoryStore::MemoryStore(MemoryOptions options, KVPool* pool,
                         std::shared_ptr<const MemoryScorer> scorer, index::GateTreeOptions tree)
    : options_(std::move(options)),
      pool_(pool),
      scorer_(std::move(scorer)),
      tree_(options_.gate_dim, tree) {}

MemoryStore::~MemoryStore() {
  for (auto& [id, b] : blocks_) FreeBlock(b);
}

void MemoryStore::FreeBlock(Block& b) {
  if (b.dev != kNotResident) {
    pool_->Free(b.dev);
    b.dev = kNotResident;
  }
  if (b.host) {
    b.host.reset();
    if (hooks_.tiers != nullptr) hooks_.tiers->ReleaseHost(options_.payload_bytes());
  }
}

Result<uint64_t> MemoryStore::AllocatePayload() {
  return hooks_.allocate ? hooks_.allocate(options_.payload_bytes())
                         : pool_->Allocate(options_.payload_bytes());
}

Status MemoryStore::CheckBlocks(const NewMemoryBlocks& b) const {
  if (b.n == 0) return InvalidArgument("no memory blocks given");
  if (b.span_starts.size() != b.n || b.span_ends.size() != b.n) {
    return InvalidArgument("span_starts and span_ends need " + std::to_string(b.n) +
                           " entries (have " + std::to_string(b.span_starts.size()) + " and " +
                           std::to_string(b.span_ends.size()) + ")");
  }
  if (!b.labels.empty() && b.labels.size() != b.n) {
    return InvalidArgument("labels has " + std::to_string(b.labels.size()) + " entries for " +
                           std::to_string(b.n) + " blocks");
  }
  for (const std::string& l : b.labels) {
    if (l.size() > kMaxMemoryLabelBytes) {
      return InvalidArgument("a block label has " + std::to_string(l.size()) + " bytes (max " +
                             std::to_string(kMaxMemoryLabelBytes) + ")");
    }
  }
  for (uint32_t i = 0; i < b.n; ++i) {
    if (b.span_starts[i] > b.span_ends[i]) {
      return InvalidArgument("block " + std::to_string(i) + ": span start " +
                             std::to_string(b.span_starts[i]) + " > end " +
                             std::to_string(b.span_ends[i]));
    }
  }
  const size_t keys = size_t{b.n} * options_.gate_dim;
  for (size_t i = 0; i < keys; ++i) {
    if (!std::isfinite(b.gate_keys[i])) {
      return InvalidArgument("gate key of block " + std::to_string(i / options_.gate_dim) +
                             " contains NaN or Inf");
    }
  }
  return Status::OK();
}

Status MemoryStore::Store(std::span<const uint64_t> ids, const NewMemoryBlocks& b, bool journal,
                          bool stay_on_disk_if_full) {
  const uint64_t pb = options_.payload_bytes();
  std::vector<uint64_t> offsets;
  offsets.reserve(b.n);
  auto release = [&] {
    for (uint64_t off : offsets) {
      if (off != kNotResident) pool_->Free(off);
    }
  };
  for (uint32_t i = 0; i < b.n; ++i) {
    auto off = AllocatePayload();
    if (!off.ok()) {
      if (stay_on_disk_if_full && off.status().code() == StatusCode::kResourceExhausted) {
        offsets.push_back(kNotResident);  // its record is in RocksDB: fetched when selected
        continue;
      }
      release();
      return off.status().WithContext("memory blocks: payload " + std::to_string(i) + " of " +
                                      std::to_string(b.n));
    }
    offsets.push_back(*off);
    if (Status s = pool_->CopyIn(*off, b.payloads + size_t{i} * pb, pb); !s.ok()) {
      release();
      return s;
    }
  }
  const uint64_t tick = Tick();
  std::vector<Block> fresh(b.n);
  for (uint32_t i = 0; i < b.n; ++i) {
    fresh[i].info = MemoryBlockInfo{ids[i], b.span_starts[i], b.span_ends[i],
                                    b.labels.empty() ? std::string() : b.labels[i]};
    fresh[i].dev = offsets[i];
    fresh[i].tick = tick;
  }
  if (journal && journal_) {
    std::vector<MemoryBlockRecord> recs(b.n);
    for (uint32_t i = 0; i < b.n; ++i) {
      recs[i] = MemoryBlockRecord{&fresh[i].info, b.gate_keys + size_t{i} * options_.gate_dim,
                                  b.payloads + size_t{i} * pb};
    }
    if (Status s = journal_->LogPut(recs); !s.ok()) {
      release();
      return s;
    }
  }
  if (Status s = tree_.Insert(ids, std::span(b.gate_keys, size_t{b.n} * options_.gate_dim));
      !s.ok()) {
    // Checked up front; only a duplicate stored id on restore can get here.
    release();
    return s;
  }
  // A durable session's blocks are in RocksDB once logged (or restored from there).
  const bool on_disk = journal_ != nullptr || stay_on_disk_if_full;
  uint64_t resident = 0, cold = 0;
  for (Block& blk : fresh) {
    blk.disk = on_disk;
    (blk.dev != kNotResident ? resident : cold)++;
    blocks_.emplace(blk.info.id, std::move(blk));
  }
  stat_blocks_ = blocks_.size();
  stat_bytes_ += pool_->allocator().ReservedBytes(pb) * resident;
  stat_disk_bytes_ += pb * cold;
  return Status::OK();
}

Result<std::vector<uint64_t>> MemoryStore::Put(const NewMemoryBlocks& b, uint64_t max_blocks) {
  KVMEM_RETURN_IF_ERROR(CheckBlocks(b));
  if (blocks_.size() + b.n > max_blocks) {
    return ResourceExhausted("memory blocks: " + std::to_string(blocks_.size()) + " held + " +
                             std::to_string(b.n) + " new exceeds max_blocks " +
                             std::to_string(max_blocks));
  }
  std::vector<uint64_t> ids(b.n);
  for (uint32_t i = 0; i < b.n; ++i) ids[i] = next_id_ + i;
  KVMEM_RETURN_IF_ERROR(Store(ids, b, /*journal=*/true));
  next_id_ += b.n;
  return ids;
}

Status MemoryStore::Restore(std::span<const uint64_t> ids, const NewMemoryBlocks& b,
                            bool stay_on_disk_if_full) {
  KVMEM_RETURN_IF_ERROR(CheckBlocks(b));
  if (ids.size() != b.n) return Internal("memory restore: id count mismatch");
  KVMEM_RETURN_IF_ERROR(Store(ids, b, /*journal=*/false, stay_on_disk_if_full));
  for (uint64_t id : ids) next_id_ = std::max(next_id_, id + 1);
  return Status::OK();
}

Result<MemorySelection> MemoryStore::Select(std::span<const float> query, uint32_t k,
                                            MemoryGate gate, uint32_t budget_leaves) const {
  if (gate == MemoryGate::kDefault) gate = options_.default_gate;
  if (budget_leaves == 0) budget_leaves = options_.budget_leaves;
  if (budget_leaves == 0) budget_leaves = kDefaultBudgetLeaves;
  Result<index::GateResult> r = InvalidArgument("unknown gate");
  double offset = 0;
  switch (gate) {
    case MemoryGate::kTreeExact: r = tree_.SearchExact(query, k); break;
    case MemoryGate::kTreeBudget: r = tree_.SearchBudget(query, k, budget_leaves); break;
    case MemoryGate::kLinearScan: r = tree_.Scan(query, k); break;
    case MemoryGate::kScorer: {
      if (!scorer_) {
        return FailedPrecondition(
            "SelectMemory: gate scorer needs scorer weights (session memory.scorer_file or the "
            "daemon's memory_scorer_file)");
      }
      KVMEM_RETURN_IF_ERROR(tree_.SearchExact(query, 0).status());  // shape and NaN checks
      std::vector<float> t;
      scorer_->Transform(query, &t, &offset);
      r = tree_.SearchExact(t, k);
      break;
    }
    default:
      return InvalidArgument("SelectMemory: unknown gate " +
                             std::to_string(static_cast<int>(gate)));
  }
  if (!r.ok()) return r.status().WithContext("SelectMemory");
  MemorySelection s;
  s.ids = std::move(r->ids);
  s.scores = std::move(r->scores);
  if (offset != 0) {
    for (float& v : s.scores) v = static_cast<float>(v + offset);
  }
  s.exact = r->exact;
  s.keys_scored = r->cost.keys_scored;
  s.leaves_visited = r->cost.leaves_visited;
  return s;
}

Result<const MemoryBlockInfo*> MemoryStore::Info(uint64_t id) const {
  auto it = blocks_.find(id);
  if (it == blocks_.end()) return NotFound("memory block " + std::to_string(id) + " not found");
  return &it->second.info;
}

Status MemoryStore::ReadPayload(uint64_t id, void* out) const {
  auto it = blocks_.find(id);
  if (it == blocks_.end()) return NotFound("memory block " + std::to_string(id) + " not found");
  const Block& b = it->second;
  if (b.dev != kNotResident) return pool_->CopyOut(out, b.dev, options_.payload_bytes());
  if (b.host) {
    std::memcpy(out, b.host.get(), options_.payload_bytes());
    return Status::OK();
  }
  return ReadDisk(id, static_cast<uint8_t*>(out));
}

Status MemoryStore::ReadDisk(uint64_t id, uint8_t* out) const {
  const uint64_t pb = options_.payload_bytes();
  if (journal_) return journal_->ReadPayload(id, out);
  ChunkStore* store = hooks_.tiers != nullptr ? hooks_.tiers->store() : nullptr;
  if (store == nullptr) return Internal("memory block " + std::to_string(id) + " has no copy");
  std::string payload;
  KVMEM_RETURN_IF_ERROR(store->GetMemorySpill(hooks_.tenant, hooks_.session, id, &payload));
  if (payload.size() != pb) {
    return DataLoss("spilled memory block (tenant " + hooks_.tenant + ", session " +
                    std::to_string(hooks_.session) + ", block " + std::to_string(id) + "): " +
                    std::to_string(payload.size()) + " bytes, expected " + std::to_string(pb));
  }
  std::memcpy(out, payload.data(), pb);
  return Status::OK();
}

Tier MemoryStore::BlockTier(uint64_t id) const {
  auto it = blocks_.find(id);
  if (it == blocks_.end()) return Tier::kDisk;
  if (it->second.dev != kNotResident) return Tier::kDevice;
  return it->second.host ? Tier::kHost : Tier::kDisk;
}

Status MemoryStore::Fetch(std::span<const uint64_t> ids) {
  const uint64_t tick = Tick();
  // Every tick first, so fetching one block cannot evict another of this op.
  for (uint64_t id : ids) {
    auto it = blocks_.find(id);
    if (it != blocks_.end()) it->second.tick = std::max(it->second.tick, tick);
  }
  const uint64_t pb = options_.payload_bytes();
  std::vector<uint8_t> staging;
  for (uint64_t id : ids) {
    auto it = blocks_.find(id);
    if (it == blocks_.end() || it->second.dev != kNotResident) continue;
    Block& b = it->second;
    const Tier from = b.host ? Tier::kHost : Tier::kDisk;
    KVMEM_ASSIGN_OR_RETURN(uint64_t off, AllocatePayload());
    Status st;
    if (b.host) {
      st = pool_->CopyIn(off, b.host.get(), pb);
    } else {
      staging.resize(pb);
      st = ReadDisk(id, staging.data());
      if (st.ok()) st = pool_->CopyIn(off, staging.data(), pb);
    }
    if (!st.ok()) {
      pool_->Free(off);
      return st.WithContext("fetching back memory block " + std::to_string(id));
    }
    if (b.host) {
      b.host.reset();
      hooks_.tiers->ReleaseHost(pb);
      stat_host_bytes_ -= pb;
    } else {
      stat_disk_bytes_ -= pb;
      GlobalMetrics().restore_bytes[static_cast<int>(Tier::kDisk)] += pb;
    }
    b.dev = off;
    stat_bytes_ += pool_->allocator().ReservedBytes(pb);
    stat_fetched_++;
    GlobalMetrics().fetch_backs[static_cast<int>(from)]++;
  }
  return Status::OK();
}

void MemoryStore::CollectEvictable(Tier from, uint64_t skip_from_tick,
                                   std::vector<MemoryEvictable>* out) const {
  if (hooks_.tiers == nullptr) return;
  const bool can_disk = journal_ != nullptr || hooks_.tiers->store() != nullptr;
  const bool can_host = hooks_.tiers->host_capacity() > 0;
  for (const auto& [id, b] : blocks_) {
    if (skip_from_tick > 0 && b.tick >= skip_from_tick) continue;
    const bool here = from == Tier::kDevice ? b.dev != kNotResident : b.host != nullptr;
    if (!here) continue;
    if (!(b.disk || can_disk) && !(from == Tier::kDevice && can_host)) continue;
    out->push_back({id, b.tick});
  }
}

Result<uint64_t> MemoryStore::Evict(uint64_t id, Tier to) {
  auto it = blocks_.find(id);
  if (it == blocks_.end() || hooks_.tiers == nullptr) return uint64_t{0};
  Block& b = it->second;
  const uint64_t pb = options_.payload_bytes();
  // Makes sure RocksDB holds the payload: a durable block's record is there since its put;
  // an ephemeral one is spilled (no WAL, like chunk blocks).
  auto ensure_on_disk = [&]() -> Status {
    if (b.disk) return Status::OK();
    ChunkStore* store = hooks_.tiers->store();
    if (store == nullptr) return FailedPrecondition("no store to spill memory blocks to");
    std::vector<uint8_t> staging;
    const uint8_t* src = b.host.get();
    if (src == nullptr) {
      staging.resize(pb);
      KVMEM_RETURN_IF_ERROR(pool_->CopyOut(staging.data(), b.dev, pb));
      src = staging.data();
    }
    KVMEM_RETURN_IF_ERROR(store->PutMemorySpill(hooks_.tenant, hooks_.session, id, src, pb));
    spilled_ = true;
    b.disk = true;
    GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)] += pb;
    return Status::OK();
  };
  if (b.dev != kNotResident) {
    if (to == Tier::kHost && hooks_.tiers->TryReserveHost(pb)) {
      b.host.reset(new uint8_t[pb]);
      if (Status st = pool_->CopyOut(b.host.get(), b.dev, pb); !st.ok()) {
        b.host.reset();
        hooks_.tiers->ReleaseHost(pb);
        return st;
      }
      stat_host_bytes_ += pb;
    } else {
      KVMEM_RETURN_IF_ERROR(ensure_on_disk());
      stat_disk_bytes_ += pb;
    }
    const uint64_t freed = pool_->allocator().ReservedBytes(pb);
    pool_->Free(b.dev);
    b.dev = kNotResident;
    stat_bytes_ -= freed;
    stat_evicted_++;
    GlobalMetrics().evictions[static_cast<int>(Tier::kDevice)]++;
    return freed;
  }
  if (b.host) {
    KVMEM_RETURN_IF_ERROR(ensure_on_disk());
    b.host.reset();
    hooks_.tiers->ReleaseHost(pb);
    stat_host_bytes_ -= pb;
    stat_disk_bytes_ += pb;
    stat_evicted_++;
    GlobalMetrics().evictions[static_cast<int>(Tier::kHost)]++;
    return pb;
  }
  return uint64_t{0};
}

Result<const float*> MemoryStore::GateKey(uint64_t id) const {
  const float* k = tree_.key(id);
  if (k == nullptr) return NotFound("memory block " + std::to_string(id) + " not found");
  return k;
}

Status MemoryStore::Drop(std::span<const uint64_t> ids) {
  std::unordered_set<uint64_t> seen;
  for (uint64_t id : ids) {
    if (!blocks_.count(id)) return NotFound("memory block " + std::to_string(id) + " not found");
    if (!seen.insert(id).second) {
      return InvalidArgument("memory block " + std::to_string(id) + " given twice");
    }
  }
  if (journal_) KVMEM_RETURN_IF_ERROR(journal_->LogDrop(ids));
  const uint64_t pb = options_.payload_bytes();
  const uint64_t reserved = pool_->allocator().ReservedBytes(pb);
  ChunkStore* store = hooks_.tiers != nullptr ? hooks_.tiers->store() : nullptr;
  for (uint64_t id : ids) {
    auto it = blocks_.find(id);
    Block& b = it->second;
    if (b.dev != kNotResident) stat_bytes_ -= reserved;
    if (b.host) stat_host_bytes_ -= pb;
    if (b.dev == kNotResident && !b.host) stat_disk_bytes_ -= pb;
    if (b.disk && !journal_ && store != nullptr) {
      // The spilled copy goes too (best effort: the session's spill range goes at its end).
      store->DeleteMemorySpill(hooks_.tenant, hooks_.session, id).IgnoreError();
    }
    FreeBlock(b);
    blocks_.erase(it);
    tree_.Remove(id).IgnoreError();  // present: checked above
  }
  stat_blocks_ = blocks_.size();
  return Status::OK();
}

std::vector<const MemoryBlockInfo*> MemoryStore::List(uint64_t after_id, uint32_t limit) const {
  std::vector<const MemoryBlockInfo*> out;
  for (auto it = blocks_.upper_bound(after_id); it != blocks_.end() && out.size() < limit; ++it) {
    out.push_back(&it->second.info);
  }
  return out;
}

}  // namespace kvmem
