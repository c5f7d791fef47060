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
Result<std::vector<RestoredSession>> RestoreSessions(ChunkStore* store, KVPool* pool,
                                                     const SessionOptions& defaults,
                                                     RestoreStats* stats);

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

}  // namespace kvmem
