// The hook through which a Session makes its writes durable (implemented by tiers.cc over the
// RocksDB ChunkStore). A session without a journal is ephemeral.
#pragma once

#include <cstdint>

#include "common/status.h"

namespace kvmem {

class Session;

class SessionJournal {
 public:
  virtual ~SessionJournal() = default;

  // Tokens [start, start + n) are complete in every layer and about to be stored. keys and
  // values: [layers][kv_heads][n][head_dim] in the profile dtype; boundaries: [n]. Called
  // before the session changes anything: a non-OK status makes the operation fail with nothing
  // stored. OK means the tokens are acknowledged in the sense of StoreOptions::sync_writes.
  virtual Status LogTokens(uint64_t start, uint32_t n, const uint8_t* keys,
                           const uint8_t* values, const uint8_t* boundaries) = 0;

  // The session could not store tokens logged at `start` after all: forget them (best effort;
  // a crash in between brings them back, which only happens when the client saw an error).
  virtual void CancelTokens(uint64_t start) = 0;

  // The session has sealed chunks up to chunk_count(); store the new ones. Failures are kept
  // and retried on the next call (the tokens are already durable as tail segments).
  virtual void ChunksSealed(const Session& session) = 0;

  // Chunks [0, n) are in the store (their blocks may then be dropped from memory and read
  // back from there).
  virtual uint32_t stored_chunks() const = 0;
};

}  // namespace kvmem
