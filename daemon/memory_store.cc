#include "daemon/memory_store.h"

#include <cmath>
#include <unordered_set>

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
  for (const auto& [id, b] : blocks_) pool_->Free(b.offset);
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

Status MemoryStore::Store(std::span<const uint64_t> ids, const NewMemoryBlocks& b, bool journal) {
  const uint64_t pb = options_.payload_bytes();
  std::vector<uint64_t> offsets;
  offsets.reserve(b.n);
  auto release = [&] {
    for (uint64_t off : offsets) pool_->Free(off);
  };
  for (uint32_t i = 0; i < b.n; ++i) {
    auto off = pool_->Allocate(pb);
    if (!off.ok()) {
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
  std::vector<Block> fresh(b.n);
  for (uint32_t i = 0; i < b.n; ++i) {
    fresh[i].info = MemoryBlockInfo{ids[i], b.span_starts[i], b.span_ends[i],
                                    b.labels.empty() ? std::string() : b.labels[i]};
    fresh[i].offset = offsets[i];
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
  for (Block& blk : fresh) blocks_.emplace(blk.info.id, std::move(blk));
  stat_blocks_ = blocks_.size();
  stat_bytes_ += pool_->allocator().ReservedBytes(pb) * b.n;
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

Status MemoryStore::Restore(std::span<const uint64_t> ids, const NewMemoryBlocks& b) {
  KVMEM_RETURN_IF_ERROR(CheckBlocks(b));
  if (ids.size() != b.n) return Internal("memory restore: id count mismatch");
  KVMEM_RETURN_IF_ERROR(Store(ids, b, /*journal=*/false));
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
  return pool_->CopyOut(out, it->second.offset, options_.payload_bytes());
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
  const uint64_t reserved = pool_->allocator().ReservedBytes(options_.payload_bytes());
  for (uint64_t id : ids) {
    auto it = blocks_.find(id);
    pool_->Free(it->second.offset);
    blocks_.erase(it);
    tree_.Remove(id).IgnoreError();  // present: checked above
  }
  stat_blocks_ = blocks_.size();
  stat_bytes_ -= reserved * ids.size();
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
