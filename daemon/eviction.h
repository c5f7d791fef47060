// Memory budgets and eviction across the storage tiers (docs/architecture.md, "Tiers and
// eviction"): device (the KV pool) -> host (heap buffers under a byte budget) -> RocksDB.
//
// The unit that moves is one chunk block of one layer (K rows then V rows). Blocks are
// immutable once sealed, so a copy written to RocksDB stays valid: a block fetched back keeps
// its disk copy and evicting it again costs no write. Sinks, the recent window (pinned: always
// attended) and tails never move; summaries stay in the cluster trees, so search still sees
// evicted chunks and selecting one fetches it back.
//
// Thread-safety: TierContext's counters are atomics; make_room is called by a session's
// executor while it holds that session's op_mu. EvictLeastRecentlySelected only try-locks
// other sessions (a busy session is skipped), so two sessions evicting each other cannot
// deadlock.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "common/status.h"
#include "daemon/metrics.h"

namespace kvmem {

class ChunkStore;
class KVPool;
class Session;

struct TierOptions {
  // Host tier budget in bytes: blocks evicted from the device tier go here first. 0: no host
  // tier (device evicts straight to RocksDB). Default: 0.
  uint64_t host_memory_bytes = 0;
  // When a tier's use passes high_watermark x its capacity, least recently selected blocks
  // are evicted (after the reply is sent) until it is below low_watermark x capacity.
  // 0 < low < high <= 1. Defaults: 0.90 / 0.75.
  double high_watermark = 0.90;
  double low_watermark = 0.75;
  // Restart: true loads every restored durable block into the pool (eager); false checks
  // every block's CRC but leaves the K/V in RocksDB, to be fetched when first selected (lazy:
  // ready sooner, first requests slower). Default: true.
  bool restore_resident = true;
};

// What sessions share: the pool, the store (spill and fetch-back), the host budget, the
// recency clock and the hook that makes room in the device tier.
class TierContext {
 public:
  TierContext(KVPool* pool, TierOptions options) : pool_(pool), options_(options) {}

  KVPool* pool() const { return pool_; }
  ChunkStore* store() const { return store_; }
  void set_store(ChunkStore* store) { store_ = store; }
  const TierOptions& options() const { return options_; }

  // Monotonic recency clock: every operation takes a tick; blocks it selects get it.
  uint64_t NextTick() { return tick_.fetch_add(1, std::memory_order_relaxed) + 1; }

  // Host tier accounting. TryReserveHost fails when the bytes would pass the capacity (the
  // watermarks then move host blocks to RocksDB after the reply).
  bool TryReserveHost(uint64_t bytes);
  void ReleaseHost(uint64_t bytes) { host_used_.fetch_sub(bytes, std::memory_order_relaxed); }
  uint64_t host_used() const { return host_used_.load(std::memory_order_relaxed); }
  uint64_t host_capacity() const { return options_.host_memory_bytes; }

  // Frees at least `bytes` of the device tier for `self` (which holds its op_mu), evicting
  // least recently selected blocks of every session. Set by the session registry (Service);
  // unset: allocations simply fail when the pool is full.
  std::function<Status(Session* self, uint64_t bytes)> make_room;

 private:
  KVPool* const pool_;
  ChunkStore* store_ = nullptr;
  const TierOptions options_;
  std::atomic<uint64_t> tick_{0};
  std::atomic<uint64_t> host_used_{0};
};

struct EvictResult {
  uint64_t bytes = 0;   // bytes freed in the source tier
  uint64_t blocks = 0;  // blocks moved
  Status last_error;    // the last block that could not move (e.g. a failed spill write)
};

// Evicts least recently selected blocks held in tier `from` (kDevice or kHost) until `bytes`
// are freed or nothing evictable is left. Device blocks go to the host tier while it has room
// (within its capacity), else to RocksDB; host blocks go to RocksDB. `self` (may be null)
// is the session whose op_mu this thread holds: it is not locked again, and, with
// `self_in_op`, its blocks in use by the running op are skipped (false: a write being
// admitted, before the op starts). With `tenant` non-empty only that tenant's sessions are
// considered (quota enforcement).
EvictResult EvictLeastRecentlySelected(std::span<const std::shared_ptr<Session>> sessions,
                                       Tier from, uint64_t bytes, Session* self,
                                       const std::string& tenant, bool self_in_op = true);

// TierContext::make_room over `sessions`: evicts device blocks until `bytes` are free and, while
// at it, down to the low watermark (so a full pool does not evict block by block).
// RESOURCE_EXHAUSTED when less than `bytes` could be freed.
Status MakeDeviceRoom(std::span<const std::shared_ptr<Session>> sessions, const TierContext& tiers,
                      Session* self, uint64_t bytes);

}  // namespace kvmem
