// Durable sessions over the RocksDB ChunkStore: the journal that logs a session's tokens and
// stores its sealed chunks, session headers, and restore at start (docs/architecture.md,
// "Storage tiers and durability").
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "daemon/chunk_store.h"
#include "daemon/kv_pool.h"
#include "daemon/session.h"

namespace kvmem {

// Header payload for a session: a FlatBuffer of the wire table CreateSession (id, profile,
// resolved options), so it evolves with the schema's append-only rules.
std::string EncodeSessionHeader(uint64_t id, const ModelProfile& profile,
                                const SessionOptions& options);
// Options not on the wire (tree, search) come from `defaults`.
Status DecodeSessionHeader(const std::string& payload, const SessionOptions& defaults,
                           ModelProfile* profile, SessionOptions* options);

// Writes the header of a new durable session and attaches its journal. Non-OK: nothing
// attached, the header may or may not exist (DeleteSession cleans up).
Status MakeDurable(ChunkStore* store, Session* session);

struct RestoredSession {
  std::string tenant;
  uint64_t id = 0;
  std::unique_ptr<Session> session;  // null when status is not OK
  Status status;                     // why it could not be restored (names the record)
  ModelProfile profile;              // from the header, when readable
  SessionOptions options;
};

struct RestoreStats {
  uint64_t sessions = 0;
  uint64_t failed = 0;
  uint64_t tokens = 0;
  uint64_t chunks = 0;
  uint64_t bytes = 0;
  double seconds = 0;
};

// Rebuilds every stored session into `pool`: K/V back into blocks, chunk table and chunker
// state by replaying the stored tokens through Session::AppendKV (chunking is batch-
// independent, so the same chunks seal), index trees rebuilt on the way, journal attached.
// Every chunk's checksum is checked. One session's failure does not stop the others.
// With `tiers`, chunks that do not fit the device budget stay in RocksDB (fetched when
// selected) instead of failing the restore. Layers are read, checked and copied in parallel
// on RestoreThreads() helper threads (nothing else runs before ready).
Result<std::vector<RestoredSession>> RestoreSessions(ChunkStore* store, KVPool* pool,
                                                     const SessionOptions& defaults,
                                                     RestoreStats* stats,
                                                     TierContext* tiers = nullptr);

// Helper threads RestoreSessions uses besides the caller: min(8, cores) - 1.
uint32_t RestoreThreads();

// Re-reads every stored chunk and tail segment of one session and checks checksums and
// sizes. Result: tokens and chunks seen, and one line per bad record.
struct VerifyReport {
  uint64_t tokens = 0;
  uint64_t chunks = 0;
  uint64_t memory_blocks = 0;  // memory blocks read (with `memory`)
  std::vector<std::string> bad;
};
// With `memory` (the session's memory options) also re-reads and checks its memory blocks.
Result<VerifyReport> VerifySession(const ChunkStore& store, const std::string& tenant,
                                   uint64_t id, const ModelProfile& profile,
                                   const MemoryOptions* memory = nullptr);

// --- Snapshots (docs/operations.md, "Snapshots") ---
// A snapshot is a durable, consistent point-in-time image of a session (ephemeral or durable)
// under a name unique per tenant, stored in the durable-session format under the reserved
// stored-tenant SnapshotTenant(tenant) and id SnapshotId(name) (a 64-bit FNV-1a hash), so it
// survives restarts and is checked by the same CRCs. Restart does not restore images as
// sessions; Restore makes a new session from one.
inline constexpr std::string_view kSnapshotTenantPrefix = "\x01snapshot\x01";
bool IsSnapshotTenant(std::string_view stored_tenant);
std::string SnapshotTenant(std::string_view tenant);
uint64_t SnapshotId(std::string_view name);

struct SnapshotInfo {
  uint64_t tokens = 0;
  uint64_t chunks = 0;
  uint64_t bytes = 0;  // K/V bytes written
};
// Writes the image of `s` (caller holds its op_mu: the image is the state between two ops).
// ALREADY_EXISTS when the name is taken; FAILED_PRECONDITION mid decode step; a write error
// leaves no snapshot behind.
Result<SnapshotInfo> WriteSnapshot(ChunkStore* store, const Session& s, const std::string& name);
// A new session (tenant, new_id) from snapshot `name` of `tenant`: same profile, options
// (durability as given), tokens, chunks and tail; durable: its records are written before it
// is returned. NOT_FOUND when there is no such snapshot; DATA_LOSS naming a bad record.
Result<std::unique_ptr<Session>> RestoreSnapshot(ChunkStore* store, KVPool* pool, TierContext* tiers,
                                                 const std::string& tenant, const std::string& name,
                                                 uint64_t new_id, Durability durability,
                                                 const SessionOptions& defaults);
Status DeleteSnapshot(ChunkStore* store, const std::string& tenant, const std::string& name);

}  // namespace kvmem
