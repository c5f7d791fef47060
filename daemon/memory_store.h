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
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "daemon/kv_pool.h"
#include "daemon/metrics.h"
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
  // Reads the stored payload of block `id` back (checked; DATA_LOSS naming it on a bad
  // record): the disk tier of a durable session's blocks.
  virtual Status ReadPayload(uint64_t id, uint8_t* out) const = 0;
};

class ChunkStore;
class TierContext;

// How a session's memory blocks reach the tiers (daemon/eviction.h): set by the session.
// Without hooks (a store made alone, e.g. in tests) payloads live in the pool only.
struct MemoryTierHooks {
  // A pool block of `bytes`; may evict least recently selected blocks to make room.
  std::function<Result<uint64_t>(uint64_t bytes)> allocate;
  // The running operation's recency tick (blocks it touches get it; eviction skips them).
  std::function<uint64_t()> tick;
  TierContext* tiers = nullptr;  // host budget and the spill store; null: no eviction
  std::string tenant;
  uint64_t session = 0;
};

// One memory block that may leave its tier (see Session::CollectEvictable).
struct MemoryEvictable {
  uint64_t id = 0;
  uint64_t tick = 0;
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
  // stay_on_disk_if_full (a durable session's own records): a payload the device budget
  // cannot hold stays in RocksDB until selected instead of failing the restore.
  Status Restore(std::span<const uint64_t> ids, const NewMemoryBlocks& blocks,
                 bool stay_on_disk_if_full = false);

  // Top-k blocks for `query` ([gate_dim]) under `gate` (kDefault = the session's);
  // budget_leaves 0 = the session's. FAILED_PRECONDITION for kScorer without a scorer.
  Result<MemorySelection> Select(std::span<const float> query, uint32_t k, MemoryGate gate,
                                 uint32_t budget_leaves) const;

  // NOT_FOUND when absent.
  Result<const MemoryBlockInfo*> Info(uint64_t id) const;
  // Copies the payload of `id` (payload_bytes()) to out from whichever tier holds it (without
  // moving it); NOT_FOUND when absent.
  Status ReadPayload(uint64_t id, void* out) const;

  // --- Tiers (docs/architecture.md, "Memory blocks in the tiers") ---
  void SetTierHooks(MemoryTierHooks hooks) { hooks_ = std::move(hooks); }
  // Marks `ids` as used by the running op (tick) and brings the cold ones into the device
  // tier: host copies, or RocksDB (the memory_blocks record of a durable session, the spill
  // record of an ephemeral one, CRC checked). Unknown ids are skipped (callers check them).
  Status Fetch(std::span<const uint64_t> ids);
  // Blocks held in `from` (kDevice / kHost) that can move (somewhere to go; with
  // skip_from_tick > 0, not used by an op with that tick or later).
  void CollectEvictable(Tier from, uint64_t skip_from_tick, std::vector<MemoryEvictable>* out) const;
  // Moves one block out of its tier: device -> host when `to` is kHost and the host budget
  // allows, else -> RocksDB (spilled first for an ephemeral session; a durable one's record
  // exists already); host -> RocksDB. Returns the bytes freed in the tier it left.
  Result<uint64_t> Evict(uint64_t id, Tier to);
  Tier BlockTier(uint64_t id) const;  // kDisk for an unknown id
  uint64_t host_bytes() const { return stat_host_bytes_.load(std::memory_order_relaxed); }
  uint64_t disk_bytes() const { return stat_disk_bytes_.load(std::memory_order_relaxed); }
  uint64_t fetched() const { return stat_fetched_.load(std::memory_order_relaxed); }
  uint64_t evicted() const { return stat_evicted_.load(std::memory_order_relaxed); }
  // Whether an ephemeral block was ever spilled (the session deletes its spill records).
  bool spilled() const { return spilled_; }
  // The stored gate key ([gate_dim]); NOT_FOUND when absent.
  Result<const float*> GateKey(uint64_t id) const;

  // Drops the ids. All or nothing: NOT_FOUND naming the first absent (or repeated) id.
  Status Drop(std::span<const uint64_t> ids);

  // Blocks with id > after_id, in id order, at most limit.
  std::vector<const MemoryBlockInfo*> List(uint64_t after_id, uint32_t limit) const;

  // Durability: attach after any restore. MarkStored: every block has a RocksDB copy now (a
  // durable session made from a snapshot image), so evicting it writes nothing.
  void MarkStored() {
    for (auto& [id, b] : blocks_) b.disk = true;
  }
  void AttachJournal(std::unique_ptr<MemoryJournal> journal) { journal_ = std::move(journal); }

  uint64_t blocks() const { return stat_blocks_.load(std::memory_order_relaxed); }
  // Pool bytes reserved for payloads in the device tier (what the session's bytes count);
  // host_bytes() / disk_bytes() hold the evicted ones.
  uint64_t bytes() const { return stat_bytes_.load(std::memory_order_relaxed); }
  uint64_t next_id() const { return next_id_; }
  // Restore path: ids below `id` were handed out before (possibly dropped since); never reuse them.
  void RaiseNextId(uint64_t id) { next_id_ = std::max(next_id_, id); }

 private:
  static constexpr uint64_t kNotResident = ~0ull;
  // A payload's live copy is in the pool (dev), else in the host tier (host), else only in
  // RocksDB (disk). disk also marks a valid RocksDB copy of a resident payload (payloads are
  // immutable), so evicting it again writes nothing.
  struct Block {
    MemoryBlockInfo info;
    uint64_t dev = kNotResident;  // payload block in the pool
    std::unique_ptr<uint8_t[]> host;
    bool disk = false;
    uint64_t tick = 0;
  };
  // Allocates and fills payload blocks for `ids`; on error frees what it took.
  Status Store(std::span<const uint64_t> ids, const NewMemoryBlocks& b, bool journal,
               bool stay_on_disk_if_full = false);
  Result<uint64_t> AllocatePayload();
  uint64_t Tick() const { return hooks_.tick ? hooks_.tick() : 0; }
  Status ReadDisk(uint64_t id, uint8_t* out) const;
  void FreeBlock(Block& b);
  Status CheckBlocks(const NewMemoryBlocks& b) const;

  const MemoryOptions options_;
  KVPool* const pool_;
  std::shared_ptr<const MemoryScorer> scorer_;
  index::GateTree tree_;
  std::map<uint64_t, Block> blocks_;
  uint64_t next_id_ = 1;
  std::unique_ptr<MemoryJournal> journal_;
  MemoryTierHooks hooks_;
  bool spilled_ = false;
  std::atomic<uint64_t> stat_blocks_{0};
  std::atomic<uint64_t> stat_bytes_{0};
  std::atomic<uint64_t> stat_host_bytes_{0};
  std::atomic<uint64_t> stat_disk_bytes_{0};
  std::atomic<uint64_t> stat_fetched_{0};
  std::atomic<uint64_t> stat_evicted_{0};
};

}  // namespace kvmem
