// A session's compressed memory blocks (LycheeMemory; DESIGN "memory block"): per block a gate
// key [gate_dim] (fp32, host memory, in the GateTree), a payload [payload_rows][payload_dim] of
// payload_dtype (a block of the KV pool, the same arena and allocator as chunks, counted in the
// session's bytes), a source span and a label. SelectMemory ranks blocks by a gate: inner
// product through the tree (exact or leaf-budgeted), a linear scan, or a loaded scorer.
//
// Thread-safety: like Session (the caller holds the session's op mutex); blocks() and bytes()
// are atomics readable from anywhere.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "daemon/kv_pool.h"
#include "index/gate_tree.h"

namespace kvmem {

enum class MemoryGate : uint8_t {
  kDefault = 0,     // the session's default_gate
  kTreeExact = 1,   // exact top-k by q·k through the gate tree
  kTreeBudget = 2,  // best-first through the tree, at most budget_leaves leaves
  kLinearScan = 3,  // exact top-k by q·k, every key scored
  kScorer = 4,      // the loaded linear / bilinear scorer (exact, through the tree)
};
std::string_view MemoryGateName(MemoryGate g);  // "tree_exact", ...

// A relevance scorer over (query, gate key) whose weights are loaded from a file
// (daemon/memory_scorer.h). Both supported forms are affine in the key for a fixed query,
//   score(q, k) = t(q)·k + b(q),
// so the daemon searches them exactly through the gate tree with the transformed query t(q).
class MemoryScorer {
 public:
  virtual ~MemoryScorer() = default;
  virtual uint32_t dim() const = 0;
  // t(q) into *t ([dim]) and b(q) into *offset.
  virtual void Transform(std::span<const float> q, std::vector<float>* t, double* offset) const = 0;
  virtual std::string Describe() const = 0;  // e.g. "bilinear (scorer.safetensors)"
};

// Geometry and gate of a session's memory blocks (wire: MemoryOptions).
struct MemoryOptions {
  // Gate key dimension; 0 = the session keeps no memory blocks. Default: 0.
  uint32_t gate_dim = 0;
  // Payload shape [payload_rows][payload_dim] and element type. Default: 0, 0, bf16.
  uint32_t payload_rows = 0;
  uint32_t payload_dim = 0;
  DType payload_dtype = DType::kBF16;
  // Gate used when a request says kDefault. Default: kTreeExact.
  MemoryGate default_gate = MemoryGate::kTreeExact;
  // kTreeBudget leaf budget when a request gives none (0 = kDefaultBudgetLeaves). Default: 0.
  uint32_t budget_leaves = 0;
  // Scorer weights, a safetensors file relative to the daemon's memory_scorer_dir; "" = the
  // daemon's memory_scorer_file (if any). Default: "".
  std::string scorer_file;
  // Most blocks the session may hold (0 = the daemon's limit). Default: 0.
  uint64_t max_blocks = 0;

  bool enabled() const { return gate_dim > 0; }
  uint64_t payload_bytes() const {
    return uint64_t{payload_rows} * payload_dim * DTypeSize(payload_dtype);
  }
  bool operator==(const MemoryOptions&) const = default;
};
inline constexpr uint32_t kDefaultBudgetLeaves = 64;
// Limits checked by ValidateMemoryOptions.
inline constexpr uint32_t kMaxGateDim = 65536;
inline constexpr uint64_t kMaxMemoryPayloadBytes = 64ull << 20;
inline constexpr size_t kMaxMemoryLabelBytes = 4096;

Status ValidateMemoryOptions(const MemoryOptions& o);

struct MemoryBlockInfo {
  uint64_t id = 0;
  uint64_t span_start = 0;
  uint64_t span_end = 0;
  std::string label;
};

// New blocks for Put: n gate keys (fp32 [n][gate_dim]) and payloads ([n][rows][dim] in the
// payload dtype, contiguous), spans, labels (empty or n).
struct NewMemoryBlocks {
  uint32_t n = 0;
  const float* gate_keys = nullptr;
  const uint8_t* payloads = nullptr;
  std::span<const uint64_t> span_starts;
  std::span<const uint64_t> span_ends;
  std::vector<std::string> labels;
};

// A block as the persistence hook sees it.
struct MemoryBlockRecord {
  const MemoryBlockInfo* info;
  const float* gate_key;    // [gate_dim]
  const uint8_t* payload;   // payload_bytes()
};

// Persistence of a durable session's blocks (daemon/tiers.cc implements it over RocksDB).
// Both calls happen before the store changes: a non-OK status fails the operation with
// nothing changed.
class MemoryJournal {
 public:
  virtual ~MemoryJournal() = default;
  virtual Status LogPut(std::span<const MemoryBlockRecord> blocks) = 0;
  virtual Status LogDrop(std::span<const uint64_t> ids) = 0;
};

struct MemorySelection {
  std::vector<uint64_t> ids;   // best first, ties by lower id
  std::vector<float> scores;
  bool exact = true;
  uint64_t keys_scored = 0;
  uint64_t leaves_visited = 0;
};

class MemoryStore {
 public:
  // options must be valid and enabled; scorer may be null (then kScorer is refused).
  MemoryStore(MemoryOptions options, KVPool* pool, std::shared_ptr<const MemoryScorer> scorer,
              index::GateTreeOptions tree = {});
  ~MemoryStore();  // frees every payload block
  MemoryStore(const MemoryStore&) = delete;
  MemoryStore& operator=(const MemoryStore&) = delete;

  const MemoryOptions& options() const { return options_; }
  const MemoryScorer* scorer() const { return scorer_.get(); }
  // Set once after creation (the service loads the weights named in the config).
  void SetScorer(std::shared_ptr<const MemoryScorer> scorer) { scorer_ = std::move(scorer); }

  // Adds blocks with fresh ids (returned, increasing). All or nothing: INVALID_ARGUMENT for a
  // span with start > end, a non-finite key, a bad label count or a label over
  // kMaxMemoryLabelBytes; RESOURCE_EXHAUSTED past
  // max_blocks (the effective limit, given by the caller) or when the pool is full; the
  // journal's error when logging fails.
  Result<std::vector<uint64_t>> Put(const NewMemoryBlocks& blocks, uint64_t max_blocks);
  // Restore path: adds blocks under their stored ids, without journaling.
  Status Restore(std::span<const uint64_t> ids, const NewMemoryBlocks& blocks);

  // Top-k blocks for `query` ([gate_dim]) under `gate` (kDefault = the session's);
  // budget_leaves 0 = the session's. FAILED_PRECONDITION for kScorer without a scorer.
  Result<MemorySelection> Select(std::span<const float> query, uint32_t k, MemoryGate gate,
                                 uint32_t budget_leaves) const;

  // NOT_FOUND when absent.
  Result<const MemoryBlockInfo*> Info(uint64_t id) const;
  // Copies the payload of `id` (payload_bytes()) to out; NOT_FOUND when absent.
  Status ReadPayload(uint64_t id, void* out) const;
  // The stored gate key ([gate_dim]); NOT_FOUND when absent.
  Result<const float*> GateKey(uint64_t id) const;

  // Drops the ids. All or nothing: NOT_FOUND naming the first absent (or repeated) id.
  Status Drop(std::span<const uint64_t> ids);

  // Blocks with id > after_id, in id order, at most limit.
  std::vector<const MemoryBlockInfo*> List(uint64_t after_id, uint32_t limit) const;

  // Durability: attach after any restore.
  void AttachJournal(std::unique_ptr<MemoryJournal> journal) { journal_ = std::move(journal); }

  uint64_t blocks() const { return stat_blocks_.load(std::memory_order_relaxed); }
  // Pool bytes reserved for payloads (what the session's bytes count).
  uint64_t bytes() const { return stat_bytes_.load(std::memory_order_relaxed); }
  uint64_t next_id() const { return next_id_; }
  // Restore path: ids below `id` were handed out before (possibly dropped since); never reuse them.
  void RaiseNextId(uint64_t id) { next_id_ = std::max(next_id_, id); }

 private:
  struct Block {
    MemoryBlockInfo info;
    uint64_t offset = 0;  // payload block in the pool
  };
  // Allocates and fills payload blocks for `ids`; on error frees what it took.
  Status Store(std::span<const uint64_t> ids, const NewMemoryBlocks& b, bool journal);
  Status CheckBlocks(const NewMemoryBlocks& b) const;

  const MemoryOptions options_;
  KVPool* const pool_;
  std::shared_ptr<const MemoryScorer> scorer_;
  index::GateTree tree_;
  std::map<uint64_t, Block> blocks_;
  uint64_t next_id_ = 1;
  std::unique_ptr<MemoryJournal> journal_;
  std::atomic<uint64_t> stat_blocks_{0};
  std::atomic<uint64_t> stat_bytes_{0};
};

}  // namespace kvmem
