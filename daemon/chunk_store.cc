#include "daemon/chunk_store.h"

#include <rocksdb/db.h>
#include <rocksdb/iterator.h>
#include <rocksdb/options.h>
#include <rocksdb/table.h>
#include <rocksdb/cache.h>
#include <rocksdb/write_batch.h>

#include <cstring>
#include <type_traits>
#include <filesystem>

#include "daemon/crc32c.h"

namespace kvmem {
namespace {

constexpr uint8_t kRecordVersion = 1;
constexpr size_t kRecordHeader = 5;  // version + crc32c
constexpr char kHeaderTag = 'H';
constexpr char kChunkEntryTag = 'C';
constexpr char kTailTag = 'T';

void PutBE(std::string* s, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
uint64_t GetBE(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
void PutLE32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
uint32_t GetLE32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

void AppendTenantSession(std::string* k, std::string_view tenant, uint64_t session) {
  PutBE(k, tenant.size(), 2);
  k->append(tenant);
  PutBE(k, session, 8);
}

uint32_t RecordCrc(std::string_view key, const void* payload, size_t n) {
  return Crc32c(payload, n, Crc32c(key.data(), key.size()));
}

std::string EncodeRecord(std::string_view key, const void* payload, size_t n) {
  std::string v;
  v.reserve(kRecordHeader + n);
  v.push_back(static_cast<char>(kRecordVersion));
  PutLE32(&v, RecordCrc(key, payload, n));
  v.append(static_cast<const char*>(payload), n);
  return v;
}

// Checks a record; on success *payload views into `value`. `what` names the record in
// errors: a string or a callable returning one (built only on failure: the hot read path).
inline std::string Name(const std::string& s) { return s; }
template <typename F>
  requires std::is_invocable_r_v<std::string, F>
std::string Name(const F& f) {
  return f();
}
template <typename What>
Status DecodeRecord(std::string_view key, std::string_view value, const What& what_arg,
                    std::string_view* payload) {
  if (value.size() >= kRecordHeader && static_cast<uint8_t>(value[0]) == kRecordVersion) {
    const std::string_view body = value.substr(kRecordHeader);
    if (GetLE32(value.data() + 1) == RecordCrc(key, body.data(), body.size())) {
      *payload = body;
      return Status::OK();
    }
  }
  const std::string what = Name(what_arg);
  if (value.size() < kRecordHeader) {
    return DataLoss(what + ": record truncated (" + std::to_string(value.size()) + " bytes)");
  }
  if (static_cast<uint8_t>(value[0]) != kRecordVersion) {
    return DataLoss(what + ": unknown record version " +
                    std::to_string(static_cast<uint8_t>(value[0])));
  }
  const uint32_t stored = GetLE32(value.data() + 1);
  const std::string_view body = value.substr(kRecordHeader);
  const uint32_t actual = RecordCrc(key, body.data(), body.size());
  if (stored != actual) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "stored %08x, computed %08x", stored, actual);
    return DataLoss(what + ": checksum mismatch (" + buf + ")");
  }
  *payload = body;
  return Status::OK();
}

// Parses the (tenant, session) after a leading tag byte (or none).
bool ParseTenantSession(std::string_view key, size_t at, std::string* tenant, uint64_t* session,
                        size_t* end) {
  if (key.size() < at + 2) return false;
  const size_t len = GetBE(key.data() + at, 2);
  if (key.size() < at + 2 + len + 8) return false;
  tenant->assign(key.data() + at + 2, len);
  *session = GetBE(key.data() + at + 2 + len, 8);
  *end = at + 2 + len + 8;
  return true;
}

std::string UpperBound(std::string prefix) {
  prefix.append(16, '\xff');
  return prefix;
}

}  // namespace

Status FromRocksStatus(const rocksdb::Status& s, std::string_view what) {
  if (s.ok()) return Status::OK();
  std::string msg = std::string(what) + ": rocksdb: " + s.ToString();
  if (s.IsNotFound()) return NotFound(std::move(msg));
  if (s.IsCorruption()) return DataLoss(std::move(msg));
  if (s.IsNoSpace()) return ResourceExhausted(std::move(msg) + " (disk full)");
  if (s.IsIOError() || s.IsBusy() || s.IsTryAgain() || s.IsTimedOut() || s.IsAborted()) {
    return Unavailable(std::move(msg));
  }
  if (s.IsInvalidArgument()) return InvalidArgument(std::move(msg));
  if (s.IsNotSupported()) return Unimplemented(std::move(msg));
  return Internal(std::move(msg));
}

std::string ChunkName::ToString() const {
  return "chunk (tenant " + tenant + ", session " + std::to_string(session) + ", layer " +
         std::to_string(layer) + ", chunk " + std::to_string(chunk) + ")";
}

ChunkStore::Batch::Batch() : wb_(std::make_unique<rocksdb::WriteBatch>()) {}
ChunkStore::Batch::~Batch() = default;
size_t ChunkStore::Batch::bytes() const { return wb_->GetDataSize(); }

ChunkStore::ChunkStore(StoreOptions options) : options_(std::move(options)) {}

ChunkStore::~ChunkStore() {
  if (db_) {
    for (auto* cf : {chunks_cf_, manifests_cf_, blocks_cf_, spill_cf_}) {
      if (cf) db_->DestroyColumnFamilyHandle(cf).PermitUncheckedError();
    }
    db_->Close().PermitUncheckedError();
  }
}

Result<std::unique_ptr<ChunkStore>> ChunkStore::Open(const StoreOptions& options) {
  if (options.path.empty()) return InvalidArgument("store: path is empty");
  std::error_code ec;
  std::filesystem::create_directories(options.path, ec);
  if (ec) return Unavailable("store: cannot create '" + options.path + "': " + ec.message());
  std::unique_ptr<ChunkStore> store(new ChunkStore(options));

  rocksdb::DBOptions dbo;
  dbo.create_if_missing = true;
  dbo.create_missing_column_families = true;
  dbo.max_background_jobs = 2;
  dbo.max_total_wal_size = 1ull << 30;
  // Recovery after a crash keeps the replayed WAL in memtables instead of flushing before
  // Open returns: the restart path reads them right away, the flush happens in the background.
  dbo.avoid_flush_during_recovery = true;
  // Closing must not flush memtables (the WAL already holds every acknowledged write): kvmemd
  // promises to exit within 5 s of SIGTERM whatever the memtables hold.
  dbo.avoid_flush_during_shutdown = true;
  rocksdb::ColumnFamilyOptions small;
  small.write_buffer_size = options.write_buffer_size;
  // Tail segments (tokens logged before they are chunked) can be large and are deleted soon
  // after: as blobs their tombstones stay small in the LSM.
  small.enable_blob_files = options.enable_blob_files;
  small.min_blob_size = options.min_blob_size;
  small.blob_file_size = options.blob_file_size;
  small.enable_blob_garbage_collection = true;
  // One explicitly sized block cache for every family (copies of `small` share the factory).
  rocksdb::BlockBasedTableOptions table;
  table.block_cache = rocksdb::NewLRUCache(options.block_cache_bytes);
  small.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  rocksdb::ColumnFamilyOptions chunks = small;
  chunks.enable_blob_files = options.enable_blob_files;
  chunks.min_blob_size = options.min_blob_size;
  chunks.blob_file_size = options.blob_file_size;
  chunks.enable_blob_garbage_collection = true;
  chunks.compression = rocksdb::kNoCompression;  // K/V floats do not compress
  chunks.blob_compression_type = rocksdb::kNoCompression;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
      {rocksdb::kDefaultColumnFamilyName, small},
      {"chunks", chunks},
      {"manifests", small},
      {"memory_blocks", chunks},
      {"spill", chunks}};
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  KVMEM_RETURN_IF_ERROR(FromRocksStatus(rocksdb::DB::Open(dbo, options.path, cfs, &handles, &raw),
                                        "store: open '" + options.path + "'"));
  store->db_.reset(raw);
  store->default_cf_ = handles[0];
  store->chunks_cf_ = handles[1];
  store->manifests_cf_ = handles[2];
  store->blocks_cf_ = handles[3];
  store->spill_cf_ = handles[4];
  // Spilled blocks belonged to ephemeral sessions of the previous process: drop them all
  // (drop and recreate the family: one manifest write, so only when it holds anything).
  bool spilled = false;
  {
    std::unique_ptr<rocksdb::Iterator> it(raw->NewIterator(rocksdb::ReadOptions(), store->spill_cf_));
    it->SeekToFirst();
    spilled = it->Valid();
  }
  if (spilled) {
    rocksdb::ColumnFamilyHandle* fresh = nullptr;
    rocksdb::Status ds = raw->DropColumnFamily(store->spill_cf_);
    if (ds.ok()) {
      raw->DestroyColumnFamilyHandle(store->spill_cf_).PermitUncheckedError();
      store->spill_cf_ = nullptr;
      ds = raw->CreateColumnFamily(chunks, "spill", &fresh);
      store->spill_cf_ = fresh;
    }
    KVMEM_RETURN_IF_ERROR(FromRocksStatus(ds, "store: clearing the spill family"));
  }
  // The default family's handle is owned by the DB; keep it out of the destroy list.
  raw->DestroyColumnFamilyHandle(handles[0]).PermitUncheckedError();
  store->default_cf_ = raw->DefaultColumnFamily();
  return store;
}

std::string ChunkStore::SessionPrefix(std::string_view tenant, uint64_t session) {
  std::string k;
  AppendTenantSession(&k, tenant, session);
  return k;
}

std::string ChunkStore::ChunkKey(const ChunkName& c) {
  std::string k = SessionPrefix(c.tenant, c.session);
  PutBE(&k, c.layer, 4);
  PutBE(&k, c.chunk, 4);
  return k;
}

std::string ChunkStore::HeaderKey(std::string_view tenant, uint64_t session) {
  std::string k(1, kHeaderTag);
  AppendTenantSession(&k, tenant, session);
  return k;
}

std::string ChunkStore::ChunkEntryKey(std::string_view tenant, uint64_t session, uint32_t chunk) {
  std::string k(1, kChunkEntryTag);
  AppendTenantSession(&k, tenant, session);
  PutBE(&k, chunk, 4);
  return k;
}

std::string ChunkStore::TailKey(std::string_view tenant, uint64_t session, uint64_t start) {
  std::string k(1, kTailTag);
  AppendTenantSession(&k, tenant, session);
  PutBE(&k, start, 8);
  return k;
}

std::string ChunkStore::MemoryBlockKey(std::string_view tenant, uint64_t session, uint64_t id) {
  std::string k = SessionPrefix(tenant, session);
  PutBE(&k, id, 8);
  return k;
}

void ChunkStore::PutMemoryBlock(Batch* b, std::string_view tenant, uint64_t session, uint64_t id,
                                std::string_view payload) const {
  const std::string key = MemoryBlockKey(tenant, session, id);
  b->wb_->Put(blocks_cf_, key, EncodeRecord(key, payload.data(), payload.size()))
      .PermitUncheckedError();
}

void ChunkStore::DeleteMemoryBlock(Batch* b, std::string_view tenant, uint64_t session,
                                   uint64_t id) const {
  b->wb_->Delete(blocks_cf_, MemoryBlockKey(tenant, session, id)).PermitUncheckedError();
}

void ChunkStore::PutBlock(rocksdb::WriteBatch* wb, rocksdb::ColumnFamilyHandle* cf,
                          const ChunkName& c, const void* data, size_t bytes) const {
  // K/V payloads are large: pass header and payload as parts instead of concatenating them.
  const std::string key = ChunkKey(c);
  std::string header;
  header.push_back(static_cast<char>(kRecordVersion));
  PutLE32(&header, RecordCrc(key, data, bytes));
  const rocksdb::Slice key_part(key), value_parts[2] = {
      rocksdb::Slice(header), rocksdb::Slice(static_cast<const char*>(data), bytes)};
  wb->Put(cf, rocksdb::SliceParts(&key_part, 1), rocksdb::SliceParts(value_parts, 2))
      .PermitUncheckedError();
}

void ChunkStore::PutChunk(Batch* b, const ChunkName& c, const void* data, size_t bytes) const {
  PutBlock(b->wb_.get(), chunks_cf_, c, data, bytes);
}

void ChunkStore::PutHeader(Batch* b, std::string_view tenant, uint64_t session,
                           std::string_view payload) const {
  const std::string key = HeaderKey(tenant, session);
  b->wb_->Put(manifests_cf_, key, EncodeRecord(key, payload.data(), payload.size()))
      .PermitUncheckedError();
}

void ChunkStore::PutChunkEntry(Batch* b, std::string_view tenant, uint64_t session,
                               const StoredChunkEntry& e) const {
  const std::string key = ChunkEntryKey(tenant, session, e.chunk);
  std::string p;
  PutBE(&p, e.start, 8);
  PutBE(&p, e.tokens, 4);
  p.append(e.boundaries);
  b->wb_->Put(manifests_cf_, key, EncodeRecord(key, p.data(), p.size())).PermitUncheckedError();
}

void ChunkStore::PutTail(Batch* b, std::string_view tenant, uint64_t session, uint64_t start,
                         std::string_view payload) const {
  const std::string key = TailKey(tenant, session, start);
  b->wb_->Put(manifests_cf_, key, EncodeRecord(key, payload.data(), payload.size()))
      .PermitUncheckedError();
}

void ChunkStore::DeleteTail(Batch* b, std::string_view tenant, uint64_t session,
                            uint64_t start) const {
  b->wb_->Delete(manifests_cf_, TailKey(tenant, session, start)).PermitUncheckedError();
}

void ChunkStore::DeleteTailRange(Batch* b, std::string_view tenant, uint64_t session,
                                 uint64_t end) const {
  b->wb_->DeleteRange(manifests_cf_, TailKey(tenant, session, 0), TailKey(tenant, session, end))
      .PermitUncheckedError();
}

Status ChunkStore::InjectedFault() const {
  if (options_.fail_writes_flag_file.empty()) return Status::OK();
  std::error_code ec;
  if (!std::filesystem::exists(options_.fail_writes_flag_file, ec)) return Status::OK();
  return FromRocksStatus(rocksdb::Status::NoSpace("injected fault: " + options_.fail_writes_flag_file),
                         "store: write");
}

// Debian's librocksdb is not built with ThreadSanitizer. It merges concurrent writes into a
// group whose leader copies the followers' batches into the WAL and memtable, handing them over
// through std::atomic spin-waits inside the library that TSan cannot see; TSan then reports the
// leader's reads as races with the follower that built the batch (make tsan: 19 such reports in
// a 4-client kvmem-stress run, all with RocksDB's WritableFileWriter::Append / MemTable::Add /
// comparator or a batch copy under ChunkStore::Write). Under TSan, writes therefore go one at a
// time: each batch is written by the thread that built it. Reads take the lock's shared side: a
// Get or an iterator step compares keys in the memtable's skip list, whose entries a concurrent
// write publishes through atomics TSan cannot see either (reported as a comparator's memcmp
// racing MemTable::Add; make tsan's Stress test, 2 of 3 runs). Any race left is ours.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVMEM_TSAN_BUILD 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define KVMEM_TSAN_BUILD 1
#endif

std::unique_lock<std::shared_mutex> ChunkStore::TsanWriteLock() const {
#if defined(KVMEM_TSAN_BUILD)
  return std::unique_lock<std::shared_mutex>(tsan_mu_);
#else
  return std::unique_lock<std::shared_mutex>();
#endif
}

std::shared_lock<std::shared_mutex> ChunkStore::TsanReadLock() const {
#if defined(KVMEM_TSAN_BUILD)
  return std::shared_lock<std::shared_mutex>(tsan_mu_);
#else
  return std::shared_lock<std::shared_mutex>();
#endif
}

Status ChunkStore::Write(Batch* b) {
  KVMEM_RETURN_IF_ERROR(InjectedFault());
  writes_.fetch_add(1, std::memory_order_relaxed);
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync_writes;
  const auto tsan_lock = TsanWriteLock();
  rocksdb::Status s = db_->Write(wo, b->wb_.get());
  if (!s.ok() && !s.IsNoSpace()) {
    // A failed WAL write puts RocksDB into read-only mode; try to leave it for the next write.
    db_->Resume().PermitUncheckedError();
  }
  return FromRocksStatus(s, "store: write batch");
}

ChunkValue::ChunkValue() : pin_(std::make_unique<rocksdb::PinnableSlice>()) {}
ChunkValue::~ChunkValue() = default;

Status ChunkStore::GetChunk(const ChunkName& c, ChunkValue* value) const {
  return GetBlock(chunks_cf_, c, "", value);
}

Status ChunkStore::GetBlock(rocksdb::ColumnFamilyHandle* cf, const ChunkName& c,
                            const char* what_prefix, ChunkValue* value) const {
  const std::string key = ChunkKey(c);
  value->pin_->Reset();
  value->payload_ = {};
  rocksdb::ReadOptions ro;
  ro.verify_checksums = false;  // the record CRC-32C is checked instead
  auto what = [&c, what_prefix] { return what_prefix + c.ToString(); };
  const auto tsan_read = TsanReadLock();
  if (rocksdb::Status rs = db_->Get(ro, cf, key, value->pin_.get()); !rs.ok()) {
    return FromRocksStatus(rs, what());
  }
  return DecodeRecord(key, std::string_view(value->pin_->data(), value->pin_->size()), what,
                      &value->payload_);
}

Status ChunkStore::ReadBlockInto(bool spill, const ChunkName& c, ChunkValue* scratch,
                                 uint8_t* dst, size_t bytes) const {
  const std::string key = ChunkKey(c);
  rocksdb::PinnableSlice& v = *scratch->pin_;
  v.Reset();
  scratch->payload_ = {};
  rocksdb::ReadOptions ro;
  ro.verify_checksums = false;  // the record CRC-32C is checked instead
  auto what = [&c, spill] { return (spill ? "spilled " : "") + c.ToString(); };
  const auto tsan_read = TsanReadLock();
  if (rocksdb::Status rs = db_->Get(ro, spill ? spill_cf_ : chunks_cf_, key, &v); !rs.ok()) {
    return FromRocksStatus(rs, what());
  }
  const std::string_view value(v.data(), v.size());
  if (value.size() == kRecordHeader + bytes && static_cast<uint8_t>(value[0]) == kRecordVersion) {
    const char* body = value.data() + kRecordHeader;
    const uint32_t key_crc = Crc32c(key.data(), key.size());
    const uint32_t crc = dst != nullptr ? Crc32cCopy(dst, body, bytes, key_crc)
                                        : Crc32c(body, bytes, key_crc);
    if (GetLE32(value.data() + 1) == crc) {
      scratch->payload_ = std::string_view(body, bytes);
      return Status::OK();
    }
  }
  // Name what is wrong (version, CRC), then the size.
  std::string_view payload;
  KVMEM_RETURN_IF_ERROR(DecodeRecord(key, value, what, &payload));
  return DataLoss(what() + ": " + std::to_string(payload.size()) + " bytes stored, expected " +
                  std::to_string(bytes));
}

Status ChunkStore::GetChunk(const ChunkName& c, std::string* payload) const {
  ChunkValue v;
  KVMEM_RETURN_IF_ERROR(GetChunk(c, &v));
  payload->assign(v.payload());
  return Status::OK();
}

namespace {

class RocksLayerCursor final : public ChunkStore::LayerCursor {
 public:
  // read_lock: ChunkStore::TsanReadLock, held while the iterator moves.
  RocksLayerCursor(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* cf, ChunkName base,
                   std::function<std::shared_lock<std::shared_mutex>()> read_lock)
      : base_(std::move(base)), read_lock_(std::move(read_lock)) {
    prefix_ = ChunkStore::SessionPrefix(base_.tenant, base_.session);
    PutBE(&prefix_, base_.layer, 4);
    upper_ = UpperBound(prefix_);
    upper_slice_ = rocksdb::Slice(upper_);
    ro_.iterate_upper_bound = &upper_slice_;
    ro_.readahead_size = 4 << 20;
    ro_.fill_cache = false;
    ro_.verify_checksums = false;  // the record CRC-32C is checked instead
    const auto lock = read_lock_();
    it_.reset(db->NewIterator(ro_, cf));
    it_->Seek(prefix_);
  }
  Status Next(uint32_t expect, std::string_view* payload) override {
    ChunkName name = base_;
    name.chunk = expect;
    const auto lock = read_lock_();
    if (advance_) {
      it_->Next();
      advance_ = false;
    }
    if (!it_->Valid()) {
      KVMEM_RETURN_IF_ERROR(FromRocksStatus(it_->status(), name.ToString()));
      return NotFound(name.ToString() + ": missing from the store");
    }
    const rocksdb::Slice k = it_->key();
    if (k.size() != prefix_.size() + 4 || GetBE(k.data() + prefix_.size(), 4) != expect) {
      return NotFound(name.ToString() + ": missing from the store");
    }
    KVMEM_RETURN_IF_ERROR(DecodeRecord(std::string_view(k.data(), k.size()),
                                       std::string_view(it_->value().data(), it_->value().size()),
                                       [&name] { return name.ToString(); }, payload));
    // Advance lazily: the payload views the iterator's current value until the next call.
    advance_ = true;
    return Status::OK();
  }

 private:
  ChunkName base_;
  std::function<std::shared_lock<std::shared_mutex>()> read_lock_;
  std::string prefix_, upper_;
  rocksdb::Slice upper_slice_;
  rocksdb::ReadOptions ro_;
  std::unique_ptr<rocksdb::Iterator> it_;
  bool advance_ = false;
};

}  // namespace

Result<std::unique_ptr<ChunkStore::LayerCursor>> ChunkStore::OpenLayer(std::string_view tenant,
                                                                       uint64_t session,
                                                                       uint32_t layer) const {
  return std::unique_ptr<LayerCursor>(
      new RocksLayerCursor(db_.get(), chunks_cf_, ChunkName{std::string(tenant), session, layer, 0},
                           [this] { return TsanReadLock(); }));
}

// Visits every record of `cf` whose key starts with `prefix` (the iterator stops at `upper`, not
// past tombstones), in key order; stops at the first non-OK status from `fn`. The iterator moves
// under TsanReadLock, released while `fn` runs: `fn` may write to the store.
Status ChunkStore::ScanPrefix(
    rocksdb::ColumnFamilyHandle* cf, const std::string& prefix, const std::string& upper,
    std::string_view what,
    const std::function<Status(std::string_view key, std::string_view value)>& fn) const {
  const rocksdb::Slice upper_slice(upper);
  rocksdb::ReadOptions ro;
  ro.iterate_upper_bound = &upper_slice;
  ro.verify_checksums = false;  // every record's CRC-32C is checked by the caller instead
  std::unique_ptr<rocksdb::Iterator> it;
  {
    const auto lock = TsanReadLock();
    it.reset(db_->NewIterator(ro, cf));
    it->Seek(prefix);
  }
  for (;;) {
    std::string_view key, value;
    {
      const auto lock = TsanReadLock();
      if (!it->Valid() || !it->key().starts_with(prefix)) break;
      key = std::string_view(it->key().data(), it->key().size());
      value = std::string_view(it->value().data(), it->value().size());
    }
    KVMEM_RETURN_IF_ERROR(fn(key, value));
    const auto lock = TsanReadLock();
    it->Next();
  }
  const auto lock = TsanReadLock();
  return FromRocksStatus(it->status(), what);
}

Result<std::vector<StoredSessionRef>> ChunkStore::ListSessions() const {
  std::vector<StoredSessionRef> out;
  const std::string tag(1, kHeaderTag);
  const std::string upper(1, static_cast<char>(kHeaderTag + 1));
  KVMEM_RETURN_IF_ERROR(ScanPrefix(
      manifests_cf_, tag, upper, "store: list sessions",
      [&](std::string_view key, std::string_view value) -> Status {
        StoredSessionRef ref;
        size_t end = 0;
        if (!ParseTenantSession(key, 1, &ref.tenant, &ref.session, &end) || end != key.size()) {
          return DataLoss("store: malformed session header key");
        }
        std::string_view body;
        ref.status = DecodeRecord(key, value,
                                  "session header (tenant " + ref.tenant + ", session " +
                                      std::to_string(ref.session) + ")",
                                  &body);
        if (ref.status.ok()) ref.header.assign(body);
        out.push_back(std::move(ref));
        return Status::OK();
      }));
  return out;
}

Status ChunkStore::GetHeader(std::string_view tenant, uint64_t session, std::string* payload) const {
  const std::string key = HeaderKey(tenant, session);
  std::string value;
  const std::string what = "session header (tenant " + std::string(tenant) + ", session " +
                           std::to_string(session) + ")";
  const auto tsan_read = TsanReadLock();
  KVMEM_RETURN_IF_ERROR(FromRocksStatus(db_->Get(rocksdb::ReadOptions(), manifests_cf_, key, &value), what));
  std::string_view body;
  KVMEM_RETURN_IF_ERROR(DecodeRecord(key, value, what, &body));
  payload->assign(body);
  return Status::OK();
}

Result<std::vector<StoredChunkEntry>> ChunkStore::ChunkTable(std::string_view tenant,
                                                             uint64_t session) const {
  std::vector<StoredChunkEntry> out;
  std::string prefix(1, kChunkEntryTag);
  AppendTenantSession(&prefix, tenant, session);
  KVMEM_RETURN_IF_ERROR(ScanPrefix(
      manifests_cf_, prefix, UpperBound(prefix), "store: chunk table",
      [&](std::string_view key, std::string_view value) -> Status {
        StoredChunkEntry e;
        if (key.size() != prefix.size() + 4) return DataLoss("store: malformed chunk table key");
        e.chunk = static_cast<uint32_t>(GetBE(key.data() + prefix.size(), 4));
        const std::string what = "chunk table entry (tenant " + std::string(tenant) +
                                 ", session " + std::to_string(session) + ", chunk " +
                                 std::to_string(e.chunk) + ")";
        std::string_view body;
        KVMEM_RETURN_IF_ERROR(DecodeRecord(key, value, what, &body));
        if (body.size() < 12) return DataLoss(what + ": too short");
        e.start = GetBE(body.data(), 8);
        e.tokens = static_cast<uint32_t>(GetBE(body.data() + 8, 4));
        e.boundaries.assign(body.substr(12));
        if (e.boundaries.size() != e.tokens) return DataLoss(what + ": boundary count mismatch");
        out.push_back(std::move(e));
        return Status::OK();
      }));
  return out;
}

Result<std::vector<StoredTailSegment>> ChunkStore::TailSegments(std::string_view tenant,
                                                                uint64_t session) const {
  std::vector<StoredTailSegment> out;
  std::string prefix(1, kTailTag);
  AppendTenantSession(&prefix, tenant, session);
  KVMEM_RETURN_IF_ERROR(ScanPrefix(
      manifests_cf_, prefix, UpperBound(prefix), "store: tail segments",
      [&](std::string_view key, std::string_view value) -> Status {
        if (key.size() != prefix.size() + 8) return DataLoss("store: malformed tail key");
        StoredTailSegment t;
        t.start = GetBE(key.data() + prefix.size(), 8);
        const std::string what = "tail segment (tenant " + std::string(tenant) + ", session " +
                                 std::to_string(session) + ", token " + std::to_string(t.start) +
                                 ")";
        std::string_view body;
        KVMEM_RETURN_IF_ERROR(DecodeRecord(key, value, what, &body));
        t.payload.assign(body);
        out.push_back(std::move(t));
        return Status::OK();
      }));
  return out;
}

Status ChunkStore::PutRawForTest(bool chunks_family, std::string_view key,
                                 std::string_view value) {
  rocksdb::WriteOptions wo;
  const auto tsan_lock = TsanWriteLock();
  return FromRocksStatus(
      db_->Put(wo, chunks_family ? chunks_cf_ : manifests_cf_, rocksdb::Slice(key.data(), key.size()),
               rocksdb::Slice(value.data(), value.size())),
      "store: raw put");
}

Status ChunkStore::ClearForTest() {
  rocksdb::WriteBatch wb;
  for (auto* cf : {chunks_cf_, manifests_cf_}) {
    const auto tsan_read = TsanReadLock();
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf));
    for (it->SeekToFirst(); it->Valid(); it->Next()) wb.Delete(cf, it->key()).PermitUncheckedError();
    KVMEM_RETURN_IF_ERROR(FromRocksStatus(it->status(), "store: clear"));
  }
  const auto tsan_lock = TsanWriteLock();
  return FromRocksStatus(db_->Write(rocksdb::WriteOptions(), &wb), "store: clear");
}

Status ChunkStore::ScanMemoryBlocks(
    std::string_view tenant, uint64_t session,
    const std::function<Status(uint64_t id, std::string_view payload)>& fn) const {
  const std::string prefix = SessionPrefix(tenant, session);
  return ScanPrefix(
      blocks_cf_, prefix, UpperBound(prefix), "store: memory blocks",
      [&](std::string_view key, std::string_view value) -> Status {
        if (key.size() != prefix.size() + 8) return DataLoss("store: malformed memory block key");
        const uint64_t id = GetBE(key.data() + prefix.size(), 8);
        std::string_view body;
        KVMEM_RETURN_IF_ERROR(DecodeRecord(
            key, value,
            [&] {
              return "memory block (tenant " + std::string(tenant) + ", session " +
                     std::to_string(session) + ", block " + std::to_string(id) + ")";
            },
            &body));
        return fn(id, body);
      });
}

Status ChunkStore::CorruptMemoryBlockForTest(std::string_view tenant, uint64_t session,
                                             uint64_t id, size_t byte_offset) {
  const std::string key = MemoryBlockKey(tenant, session, id);
  std::string value;
  KVMEM_RETURN_IF_ERROR(FromRocksStatus(db_->Get(rocksdb::ReadOptions(), blocks_cf_, key, &value),
                                        "corrupt memory block"));
  if (value.size() <= kRecordHeader + byte_offset) return OutOfRange("corrupt: offset past value");
  value[kRecordHeader + byte_offset] ^= 0x5A;
  rocksdb::WriteOptions wo;
  wo.sync = true;
  return FromRocksStatus(db_->Put(wo, blocks_cf_, key, value), "corrupt memory block");
}

Status ChunkStore::DeleteSession(std::string_view tenant, uint64_t session) {
  KVMEM_RETURN_IF_ERROR(InjectedFault());
  rocksdb::WriteBatch wb;
  const std::string p = SessionPrefix(tenant, session);
  wb.DeleteRange(chunks_cf_, p, UpperBound(p)).PermitUncheckedError();
  wb.DeleteRange(blocks_cf_, p, UpperBound(p)).PermitUncheckedError();
  for (char tag : {kChunkEntryTag, kTailTag}) {
    const std::string tp = std::string(1, tag) + p;
    wb.DeleteRange(manifests_cf_, tp, UpperBound(tp)).PermitUncheckedError();
  }
  wb.Delete(manifests_cf_, HeaderKey(tenant, session)).PermitUncheckedError();
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync_writes;
  const auto tsan_lock = TsanWriteLock();
  return FromRocksStatus(db_->Write(wo, &wb), "store: delete session " + std::to_string(session));
}

Status ChunkStore::PutSpill(const ChunkName& c, const void* data, size_t bytes) {
  KVMEM_RETURN_IF_ERROR(InjectedFault());
  rocksdb::WriteBatch wb;
  PutBlock(&wb, spill_cf_, c, data, bytes);
  rocksdb::WriteOptions wo;
  wo.disableWAL = true;
  const auto tsan_lock = TsanWriteLock();
  return FromRocksStatus(db_->Write(wo, &wb), "store: spill " + c.ToString());
}

Status ChunkStore::GetSpill(const ChunkName& c, ChunkValue* value) const {
  return GetBlock(spill_cf_, c, "spilled ", value);
}

Status ChunkStore::DeleteSpill(std::string_view tenant, uint64_t session) {
  const std::string p = SessionPrefix(tenant, session);
  rocksdb::WriteOptions wo;
  wo.disableWAL = true;
  const auto tsan_lock = TsanWriteLock();
  return FromRocksStatus(db_->DeleteRange(wo, spill_cf_, p, UpperBound(p)),
                         "store: delete spilled blocks of session " + std::to_string(session));
}

std::string ChunkStore::MemorySpillKey(std::string_view tenant, uint64_t session, uint64_t id) {
  std::string k = SessionPrefix(tenant, session);
  PutBE(&k, 0xFFFFFFFFu, 4);
  PutBE(&k, id, 8);
  return k;
}

namespace {
std::string MemorySpillName(std::string_view tenant, uint64_t session, uint64_t id) {
  return "spilled memory block (tenant " + std::string(tenant) + ", session " +
         std::to_string(session) + ", block " + std::to_string(id) + ")";
}
}  // namespace

Status ChunkStore::PutMemorySpill(std::string_view tenant, uint64_t session, uint64_t id,
                                  const void* data, size_t bytes) {
  KVMEM_RETURN_IF_ERROR(InjectedFault());
  const std::string key = MemorySpillKey(tenant, session, id);
  rocksdb::WriteOptions wo;
  wo.disableWAL = true;
  const auto tsan_lock = TsanWriteLock();
  return FromRocksStatus(db_->Put(wo, spill_cf_, key, EncodeRecord(key, data, bytes)),
                         "store: spill " + MemorySpillName(tenant, session, id));
}

Status ChunkStore::GetMemorySpill(std::string_view tenant, uint64_t session, uint64_t id,
                                  std::string* payload) const {
  const std::string key = MemorySpillKey(tenant, session, id);
  rocksdb::PinnableSlice v;
  rocksdb::ReadOptions ro;
  ro.verify_checksums = false;  // the record CRC-32C is checked instead
  const std::string what = MemorySpillName(tenant, session, id);
  const auto tsan_read = TsanReadLock();
  KVMEM_RETURN_IF_ERROR(FromRocksStatus(db_->Get(ro, spill_cf_, key, &v), what));
  std::string_view body;
  KVMEM_RETURN_IF_ERROR(DecodeRecord(key, std::string_view(v.data(), v.size()), what, &body));
  payload->assign(body);
  return Status::OK();
}

Status ChunkStore::DeleteMemorySpill(std::string_view tenant, uint64_t session, uint64_t id) {
  rocksdb::WriteOptions wo;
  wo.disableWAL = true;
  const auto tsan_lock = TsanWriteLock();
  return FromRocksStatus(db_->Delete(wo, spill_cf_, MemorySpillKey(tenant, session, id)),
                         "store: delete " + MemorySpillName(tenant, session, id));
}

Status ChunkStore::GetMemoryBlock(std::string_view tenant, uint64_t session, uint64_t id,
                                  std::string* payload) const {
  const std::string key = MemoryBlockKey(tenant, session, id);
  rocksdb::PinnableSlice v;
  rocksdb::ReadOptions ro;
  ro.verify_checksums = false;  // the record CRC-32C is checked instead
  const std::string what = "memory block (tenant " + std::string(tenant) + ", session " +
                           std::to_string(session) + ", block " + std::to_string(id) + ")";
  const auto tsan_read = TsanReadLock();
  KVMEM_RETURN_IF_ERROR(FromRocksStatus(db_->Get(ro, blocks_cf_, key, &v), what));
  std::string_view body;
  KVMEM_RETURN_IF_ERROR(DecodeRecord(key, std::string_view(v.data(), v.size()), what, &body));
  payload->assign(body);
  return Status::OK();
}

uint64_t ChunkStore::LiveDataBytes() const {
  uint64_t total = 0;
  for (auto* cf : {default_cf_, chunks_cf_, manifests_cf_, blocks_cf_, spill_cf_}) {
    uint64_t v = 0;
    if (db_->GetIntProperty(cf, rocksdb::DB::Properties::kEstimateLiveDataSize, &v)) total += v;
    if (db_->GetIntProperty(cf, rocksdb::DB::Properties::kLiveBlobFileSize, &v)) total += v;
    if (db_->GetIntProperty(cf, rocksdb::DB::Properties::kCurSizeAllMemTables, &v)) total += v;
  }
  return total;
}

ChunkStore::MemoryUse ChunkStore::Memory() const {
  MemoryUse m;
  for (auto* cf : {default_cf_, chunks_cf_, manifests_cf_, blocks_cf_, spill_cf_}) {
    uint64_t v = 0;
    if (db_->GetIntProperty(cf, rocksdb::DB::Properties::kBlockCacheUsage, &v)) {
      m.block_cache = std::max(m.block_cache, v);  // shared: each family reports the same cache
    }
    if (db_->GetIntProperty(cf, rocksdb::DB::Properties::kEstimateTableReadersMem, &v)) m.table_readers += v;
    if (db_->GetIntProperty(cf, rocksdb::DB::Properties::kCurSizeAllMemTables, &v)) m.memtables += v;
  }
  return m;
}

Status ChunkStore::Flush() {
  rocksdb::FlushOptions fo;
  fo.wait = true;
  KVMEM_RETURN_IF_ERROR(FromRocksStatus(
      db_->Flush(fo, {default_cf_, chunks_cf_, manifests_cf_, blocks_cf_, spill_cf_}), "store: flush"));
  return FromRocksStatus(db_->SyncWAL(), "store: sync WAL");
}

Status ChunkStore::SyncWal() { return FromRocksStatus(db_->SyncWAL(), "store: sync WAL"); }

Status ChunkStore::Compact() {
  rocksdb::CompactRangeOptions co;
  for (auto* cf : {default_cf_, chunks_cf_, manifests_cf_, blocks_cf_, spill_cf_}) {
    KVMEM_RETURN_IF_ERROR(
        FromRocksStatus(db_->CompactRange(co, cf, nullptr, nullptr), "store: compact"));
  }
  return Status::OK();
}

Status ChunkStore::CorruptChunkForTest(const ChunkName& c, size_t byte_offset) {
  const std::string key = ChunkKey(c);
  std::string value;
  KVMEM_RETURN_IF_ERROR(
      FromRocksStatus(db_->Get(rocksdb::ReadOptions(), chunks_cf_, key, &value), c.ToString()));
  if (value.size() <= kRecordHeader + byte_offset) return OutOfRange("corrupt: offset past value");
  value[kRecordHeader + byte_offset] ^= 0x5A;
  rocksdb::WriteOptions wo;
  wo.sync = true;
  const auto tsan_lock = TsanWriteLock();
  return FromRocksStatus(db_->Put(wo, chunks_cf_, key, value), "corrupt " + c.ToString());
}

}  // namespace kvmem
