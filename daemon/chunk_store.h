// The RocksDB store behind durable sessions (docs/architecture.md, "Storage tiers and
// durability"; key encoding in docs/wire-format.md).
//
// Column families:
//   chunks         tenant|session|layer|chunk -> one chunk block of one layer (K then V rows)
//   manifests      'H'|tenant|session          -> session header (profile, options)
//                  'C'|tenant|session|chunk    -> chunk table entry (start, tokens, boundaries)
//                  'T'|tenant|session|start    -> tail segment: tokens not yet in a stored
//                                                 chunk, every layer, with their boundaries
//   memory_blocks  tenant|session|id              -> one memory block (span, label, gate key,
//                                                 payload)
//   spill          tenant|session|layer|chunk -> a chunk block of an *ephemeral* session
//                  evicted from memory; written without the WAL and emptied at every Open
//                  (spilled data does not outlive the process, by design)
// Every value is a record: [version u8 = 1][crc32c u32 LE][payload], the CRC-32C taken over
// key bytes then payload, so a value moved under another key fails the check as well. Reads
// check it every time; a mismatch is DATA_LOSS naming the record.
//
// Thread-safety: every method may be called from any thread (RocksDB is thread-safe; Batch is
// owned by its caller).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace rocksdb {
class DB;
class PinnableSlice;
class ColumnFamilyHandle;
class Status;
class WriteBatch;
}  // namespace rocksdb

namespace kvmem {

// The one translation point from rocksdb::Status: NotFound -> NOT_FOUND, Corruption ->
// DATA_LOSS, IOError(no space) -> RESOURCE_EXHAUSTED, other IO errors / Busy / TryAgain ->
// UNAVAILABLE, InvalidArgument -> INVALID_ARGUMENT, the rest INTERNAL. `what` names the
// operation ("store: put chunk ...").
Status FromRocksStatus(const rocksdb::Status& s, std::string_view what);

struct StoreOptions {
  // Directory of the RocksDB database; created if missing. Default: "" (must be set).
  std::string path;
  // fsync the WAL before a write is acknowledged. false: acknowledged = appended to the WAL
  // with write(2), i.e. in the kernel's page cache: it survives a crash or kill -9 of kvmemd,
  // not a power loss or kernel crash. true: it survives those too, at one fsync per write.
  // Default: false.
  bool sync_writes = false;
  // Put chunk values at or above min_blob_size bytes into BlobDB blob files (the LSM then
  // holds small references and compactions do not rewrite K/V bytes). Default: true.
  bool enable_blob_files = true;
  // Default: 4096 (chunk values are 16 KiB and up; tail segments and table entries stay
  // inline). See docs/architecture.md for the measurement.
  uint64_t min_blob_size = 4096;
  // Default: 256 MiB.
  uint64_t blob_file_size = 256ull << 20;
  // Memtable size per column family. Default: 64 MiB.
  uint64_t write_buffer_size = 64ull << 20;
  // RocksDB block cache (LRU, shared by every column family); it fills up to this size under
  // load and stays filled. Default: 8 MiB (the size RocksDB 7 picks when none is given).
  uint64_t block_cache_bytes = 8ull << 20;
  // Fault injection for tests: while a file exists at this path, every write fails as if the
  // disk were full (rocksdb::Status::NoSpace through FromRocksStatus). Default: "" (off).
  std::string fail_writes_flag_file;
};

// Names one stored chunk; ToString() is what error messages print.
struct ChunkName {
  std::string tenant;
  uint64_t session = 0;
  uint32_t layer = 0;
  uint32_t chunk = 0;
  std::string ToString() const;
};

// A session as stored: the header payload plus its chunk table and tail segments.
struct StoredChunkEntry {
  uint32_t chunk = 0;
  uint64_t start = 0;
  uint32_t tokens = 0;
  std::string boundaries;  // one class per token
};
struct StoredTailSegment {
  uint64_t start = 0;
  uint32_t tokens = 0;
  std::string payload;  // TailSegment encoding (see tiers.cc)
};
struct StoredSessionRef {
  std::string tenant;
  uint64_t session = 0;
  std::string header;  // header payload (verified)
  Status status;       // non-OK when the header record failed its check
};

// A fetched chunk's payload, viewing memory this object owns (no copy out of RocksDB's read
// buffer). Reusable across fetches.
class ChunkValue {
 public:
  ChunkValue();
  ~ChunkValue();
  ChunkValue(const ChunkValue&) = delete;
  ChunkValue& operator=(const ChunkValue&) = delete;
  std::string_view payload() const { return payload_; }

 private:
  friend class ChunkStore;
  std::unique_ptr<rocksdb::PinnableSlice> pin_;
  std::string_view payload_;
};

class ChunkStore {
 public:
  // A set of writes applied atomically by Write().
  class Batch {
   public:
    Batch();
    ~Batch();
    Batch(const Batch&) = delete;
    Batch& operator=(const Batch&) = delete;
    size_t bytes() const;

   private:
    friend class ChunkStore;
    std::unique_ptr<rocksdb::WriteBatch> wb_;
  };

  static Result<std::unique_ptr<ChunkStore>> Open(const StoreOptions& options);
  ~ChunkStore();
  ChunkStore(const ChunkStore&) = delete;
  ChunkStore& operator=(const ChunkStore&) = delete;

  // Key encodings (docs/wire-format.md). Tenant = u16 BE length + bytes; integers big-endian
  // so RocksDB's bytewise order is numeric order.
  static std::string SessionPrefix(std::string_view tenant, uint64_t session);
  static std::string ChunkKey(const ChunkName& c);
  static std::string HeaderKey(std::string_view tenant, uint64_t session);
  static std::string ChunkEntryKey(std::string_view tenant, uint64_t session, uint32_t chunk);
  static std::string TailKey(std::string_view tenant, uint64_t session, uint64_t start);
  static std::string MemoryBlockKey(std::string_view tenant, uint64_t session, uint64_t id);

  void PutChunk(Batch* b, const ChunkName& c, const void* data, size_t bytes) const;
  void PutHeader(Batch* b, std::string_view tenant, uint64_t session, std::string_view payload) const;
  void PutChunkEntry(Batch* b, std::string_view tenant, uint64_t session,
                     const StoredChunkEntry& e) const;
  void PutTail(Batch* b, std::string_view tenant, uint64_t session, uint64_t start,
               std::string_view payload) const;
  void DeleteTail(Batch* b, std::string_view tenant, uint64_t session, uint64_t start) const;
  // Deletes every tail segment starting before `end`.
  void DeleteTailRange(Batch* b, std::string_view tenant, uint64_t session, uint64_t end) const;

  // Memory blocks (column family memory_blocks; payload encoding in daemon/tiers.cc).
  void PutMemoryBlock(Batch* b, std::string_view tenant, uint64_t session, uint64_t id,
                      std::string_view payload) const;
  void DeleteMemoryBlock(Batch* b, std::string_view tenant, uint64_t session, uint64_t id) const;
  // Calls fn(id, payload) for every stored block of the session in id order, each checked
  // (DATA_LOSS naming the block on a bad checksum); stops at the first non-OK status.
  Status ScanMemoryBlocks(std::string_view tenant, uint64_t session,
                          const std::function<Status(uint64_t id, std::string_view payload)>& fn) const;
  // Test hook: flips one byte of a stored memory block's payload (keeping the old CRC).
  Status CorruptMemoryBlockForTest(std::string_view tenant, uint64_t session, uint64_t id,
                                   size_t byte_offset);

  // Applies the batch atomically, through the WAL (synced when options.sync_writes).
  Status Write(Batch* b);
  // Batches written so far (an idle detector compares two readings).
  uint64_t write_count() const { return writes_.load(std::memory_order_relaxed); }

  // Reads and checks one chunk; DATA_LOSS naming it when the checksum fails, NOT_FOUND when
  // absent. Reads skip RocksDB's own block/blob checksum pass: the record CRC-32C (over key and
  // value, hardware-accelerated) is checked instead, end to end.
  Status GetChunk(const ChunkName& c, ChunkValue* value) const;
  Status GetChunk(const ChunkName& c, std::string* payload) const;  // copying form

  // Fetch-back: reads one chunk block (from `chunks`, or with `spill` from the spill family)
  // into `scratch` (reused across calls: its buffer is kept, so repeated reads do not
  // allocate), checks it (version, payload size == `bytes`, CRC-32C over key and payload) and
  // with `dst` copies the payload there in the same pass as the CRC (the source is read once).
  // DATA_LOSS naming the block on a mismatch (dst then holds garbage); NOT_FOUND when absent.
  // Without dst the checked payload is scratch->payload(). Thread-safe (distinct scratch).
  Status ReadBlockInto(bool spill, const ChunkName& c, ChunkValue* scratch, uint8_t* dst,
                       size_t bytes) const;

  // Reads every chunk of `layer` for chunks [0, count) in order, checking each; calls
  // fn(chunk, payload) per chunk. Sequential (one iterator).
  class LayerCursor;
  Result<std::unique_ptr<LayerCursor>> OpenLayer(std::string_view tenant, uint64_t session,
                                                 uint32_t layer) const;

  // Every stored session header.
  Result<std::vector<StoredSessionRef>> ListSessions() const;
  // One session header (verified); NOT_FOUND when absent.
  Status GetHeader(std::string_view tenant, uint64_t session, std::string* payload) const;
  Result<std::vector<StoredChunkEntry>> ChunkTable(std::string_view tenant, uint64_t session) const;
  Result<std::vector<StoredTailSegment>> TailSegments(std::string_view tenant, uint64_t session) const;

  // Deletes every record of the session (atomic, through the WAL).
  Status DeleteSession(std::string_view tenant, uint64_t session);

  // Ephemeral spill (family `spill`, same key and record format as `chunks`). PutSpill writes
  // at once, without the WAL (a crash loses spilled blocks, and with them the ephemeral
  // session they belong to, which is gone anyway). GetSpill checks the record CRC like
  // GetChunk. DeleteSpill removes every spilled block of a session.
  Status PutSpill(const ChunkName& c, const void* data, size_t bytes);
  Status GetSpill(const ChunkName& c, ChunkValue* value) const;
  Status DeleteSpill(std::string_view tenant, uint64_t session);
  // Memory-block payloads of ephemeral sessions in the spill family, under
  // tenant|session|0xFFFFFFFF|id u64 (no layer is 0xFFFFFFFF, so chunk keys never collide;
  // DeleteSpill removes them with the session's chunks). Same record format and checks.
  static std::string MemorySpillKey(std::string_view tenant, uint64_t session, uint64_t id);
  Status PutMemorySpill(std::string_view tenant, uint64_t session, uint64_t id, const void* data,
                        size_t bytes);
  Status GetMemorySpill(std::string_view tenant, uint64_t session, uint64_t id,
                        std::string* payload) const;
  Status DeleteMemorySpill(std::string_view tenant, uint64_t session, uint64_t id);
  // One stored memory block record of a durable session (checked); NOT_FOUND when absent.
  Status GetMemoryBlock(std::string_view tenant, uint64_t session, uint64_t id,
                        std::string* payload) const;

  // RocksDB's estimate of live data (SST + blob bytes not yet garbage) over every family.
  // Accurate after Compact().
  uint64_t LiveDataBytes() const;

  // Memory RocksDB holds (for /metrics): block cache in use (one cache shared by the
  // families, which copy one options object), table readers (index and filter blocks of open
  // SST files), memtables. Thread-safe.
  struct MemoryUse {
    uint64_t block_cache = 0, table_readers = 0, memtables = 0;
  };
  MemoryUse Memory() const;

  // Flushes every memtable to SST/blob files and syncs the WAL (clean shutdown: the next
  // start then replays no WAL).
  Status Flush();
  // fsyncs the WAL only (fast; what shutdown does so a clean stop is power-loss safe too).
  Status SyncWal();

  // Full manual compaction of every family (drops deleted records and their blobs now rather
  // than in the background). Benchmarks use it to read from a quiet store.
  Status Compact();

  // Fuzzing hooks (tests/fuzz/fuzz_store_records.cc): PutRawForTest writes `value` as is under
  // `key` in the chunks family (chunks_family) or the manifests family, beneath the record
  // encoding; ClearForTest deletes every record of both families.
  Status PutRawForTest(bool chunks_family, std::string_view key, std::string_view value);
  Status ClearForTest();

  // Test hook: flips one byte of a stored chunk's payload in place (keeping the old CRC), so
  // the next read must report DATA_LOSS.
  Status CorruptChunkForTest(const ChunkName& c, size_t byte_offset);

  rocksdb::DB* db() const { return db_.get(); }
  const StoreOptions& options() const { return options_; }

 private:
  explicit ChunkStore(StoreOptions options);
  Status InjectedFault() const;
  // One chunk-block record (chunks and spill share key and record format).
  void PutBlock(rocksdb::WriteBatch* wb, rocksdb::ColumnFamilyHandle* cf, const ChunkName& c,
                const void* data, size_t bytes) const;
  Status GetBlock(rocksdb::ColumnFamilyHandle* cf, const ChunkName& c, const char* what_prefix,
                  ChunkValue* value) const;

  // In ThreadSanitizer builds only (chunk_store.cc says why): held around every RocksDB write,
  // and its shared side around every read (empty locks in other builds).
  std::unique_lock<std::shared_mutex> TsanWriteLock() const;
  std::shared_lock<std::shared_mutex> TsanReadLock() const;
  // Every record of `cf` under `prefix` (up to `upper`) in key order (chunk_store.cc).
  Status ScanPrefix(rocksdb::ColumnFamilyHandle* cf, const std::string& prefix,
                    const std::string& upper, std::string_view what,
                    const std::function<Status(std::string_view key, std::string_view value)>& fn)
      const;

  StoreOptions options_;
  mutable std::shared_mutex tsan_mu_;
  std::unique_ptr<rocksdb::DB> db_;
  rocksdb::ColumnFamilyHandle* default_cf_ = nullptr;
  rocksdb::ColumnFamilyHandle* chunks_cf_ = nullptr;
  rocksdb::ColumnFamilyHandle* manifests_cf_ = nullptr;
  rocksdb::ColumnFamilyHandle* blocks_cf_ = nullptr;
  std::atomic<uint64_t> writes_{0};
  rocksdb::ColumnFamilyHandle* spill_cf_ = nullptr;
};

// Walks one layer's chunks in chunk order.
class ChunkStore::LayerCursor {
 public:
  virtual ~LayerCursor() = default;
  // The next chunk, checked; `expect_chunk` must be the next id (NOT_FOUND/DATA_LOSS
  // otherwise). *payload stays valid until the next call (no copy is made).
  virtual Status Next(uint32_t expect_chunk, std::string_view* payload) = 0;
};

}  // namespace kvmem
