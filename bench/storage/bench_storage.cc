// kvmem-bench-storage: the RocksDB tier against raw RocksDB in the same run (issue 6).
//
//  spill   chunk-sized values written through ChunkStore (record framing + CRC-32C, one
//          WriteBatch per chunk like the session journal's chunk store path)
//          vs raw rocksdb::DB::Put of the same values into a DB with the same options.
//  fetch   ChunkStore::GetChunk (checksum checked) vs raw rocksdb::DB::Get, random order.
//  evict   the eviction path (daemon/eviction.h): an ephemeral session's blocks spilled to
//          RocksDB by Session::EvictAll(kDisk) and fetched back into the pool by
//          Session::MakeResident (what a selection of evicted chunks does), vs raw Put (no WAL,
//          like the spill) / Get of the same blocks under the same keys, in the same order.
//  restart Open + RestoreSessions (what kvmemd does before it reports ready: K/V back into the
//          pool, chunker replay, checksums) for durable sessions of growing size
//          vs Open + a raw iterator scan of the same chunks column family.
// Writes JSON (--json FILE) and prints a table.
#include <rocksdb/db.h>
#include <rocksdb/iterator.h>
#include <rocksdb/options.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include "client/synthetic_stream.h"
#include "daemon/chunk_store.h"
#include "daemon/config.h"
#include "daemon/eviction.h"
#include "daemon/kv_pool.h"
#include "daemon/parallel.h"
#include "daemon/session.h"
#include "daemon/tiers.h"

namespace {

using namespace kvmem;
using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

[[noreturn]] void Die(const std::string& m) {
  std::fprintf(stderr, "kvmem-bench-storage: %s\n", m.c_str());
  std::exit(1);
}
void Check(const Status& s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + s.ToString());
}
void Check(const rocksdb::Status& s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + s.ToString());
}

// A raw DB with the same column family options as ChunkStore's "chunks".
struct RawDb {
  rocksdb::DB* db = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> cfs;
  RawDb(const std::string& path, const StoreOptions& so) {
    rocksdb::DBOptions dbo;
    dbo.create_if_missing = true;
    dbo.create_missing_column_families = true;
    dbo.max_background_jobs = 2;
    rocksdb::ColumnFamilyOptions c;
    c.write_buffer_size = so.write_buffer_size;
    c.enable_blob_files = so.enable_blob_files;
    c.min_blob_size = so.min_blob_size;
    c.blob_file_size = so.blob_file_size;
    c.enable_blob_garbage_collection = true;
    c.compression = rocksdb::kNoCompression;
    Check(rocksdb::DB::Open(dbo, path, {{rocksdb::kDefaultColumnFamilyName, c}, {"chunks", c}}, &cfs, &db),
          "raw open");
  }
  ~RawDb() {
    for (auto* h : cfs) db->DestroyColumnFamilyHandle(h).PermitUncheckedError();
    delete db;
  }
};

// Appends `tokens` reproducible synthetic tokens in batches of 1024.
void AppendSynthetic(Session* s, uint64_t seed, uint64_t tokens) {
  const ModelProfile& p = s->profile();
  client::SyntheticStream stream(seed, p.layers, p.kv_heads, p.head_dim, p.dtype);
  std::vector<uint8_t> k, v;
  for (uint64_t t = 0; t < tokens;) {
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(1024, tokens - t));
    stream.Fill(t, n, &k, &v);
    auto b = stream.Boundaries(t, n);
    Check(s->AppendKV(n, k.data(), v.data(), b.data()).status(), "append");
    t += n;
  }
}

struct Spec {
  uint32_t layers = 8, kv_heads = 8, head_dim = 128, chunk_tokens = 16;
  DType dtype = DType::kBF16;
  uint64_t ValueBytes() const { return 2ull * kv_heads * chunk_tokens * head_dim * DTypeSize(dtype); }
};

}  // namespace

int main(int argc, char** argv) {
  std::string json_path, dir = "/tmp/kvmem-bench-storage", machine_note;
  uint64_t spill_mib = 512, evict_mib = 256;
  std::vector<uint64_t> restart_mib = {64, 256, 512};
  bool blob = true;
  int repeat = 3;
  // Raw baseline reads with RocksDB's block/blob checksum pass on? Off by default: the
  // strictest baseline (kvmem checks its own CRC-32C instead; Debian's RocksDB computes its
  // CRC in software, which alone caps verified reads near 1 GB/s).
  bool verify = false;
  uint64_t min_blob = 4096;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Die("option " + a + " needs a value");
      return argv[++i];
    };
    if (a == "--json") json_path = next();
    else if (a == "--dir") dir = next();
    else if (a == "--machine") machine_note = next();
    else if (a == "--spill-mib") spill_mib = std::stoull(next());
    else if (a == "--evict-mib") evict_mib = std::stoull(next());
    else if (a == "--no-blob") blob = false;
    else if (a == "--raw-verify") verify = true;
    else if (a == "--repeat") repeat = std::max(1, std::stoi(next()));
    else if (a == "--min-blob-size") min_blob = std::stoull(next());
    else if (a == "--restart-mib") {
      restart_mib.clear();
      std::string v = next();
      for (size_t p = 0; p < v.size();) {
        size_t q = v.find(',', p);
        restart_mib.push_back(std::stoull(v.substr(p, q - p)));
        p = q == std::string::npos ? v.size() : q + 1;
      }
    } else if (a == "--help") {
      std::puts("kvmem-bench-storage [--json FILE] [--dir DIR] [--machine TEXT] [--spill-mib N] [--evict-mib N] [--restart-mib A,B,C]\n"
                "                    [--no-blob] [--min-blob-size BYTES] [--repeat N] [--raw-verify]");
      return 0;
    } else {
      Die("unknown option " + a);
    }
  }
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  // The worker pool kvmemd runs with by default (search_threads): fetch-back spreads its CRC
  // checks and copies over it.
  const uint32_t search_threads = DefaultSearchThreads();
  ParallelPool search_pool(search_threads);
  SetSearchPool(search_threads > 0 ? &search_pool : nullptr);
  Spec spec;
  StoreOptions so;
  so.enable_blob_files = blob;
  so.min_blob_size = min_blob;
  const uint64_t vbytes = spec.ValueBytes();
  const uint64_t count = (spill_mib << 20) / vbytes;
  std::vector<std::string> values(256);
  {
    std::mt19937_64 rng(1);
    for (auto& v : values) {
      v.resize(vbytes);
      for (size_t i = 0; i < v.size(); i += 8) {
        const uint64_t x = rng();
        std::memcpy(v.data() + i, &x, std::min<size_t>(8, v.size() - i));
      }
    }
  }
  std::printf("value %llu bytes, %llu values (%llu MiB), blob files %s (min_blob_size %llu)\n",
              static_cast<unsigned long long>(vbytes), static_cast<unsigned long long>(count),
              static_cast<unsigned long long>(spill_mib), blob ? "on" : "off",
              static_cast<unsigned long long>(min_blob));

  // Spill and fetch, raw first then ours (alternating order would be fairer on a quiet box;
  // each side gets a fresh DB and a flush before reads).
  // Medians over `repeat` rounds; raw and ours alternate which goes first.
  std::vector<double> raw_puts, raw_gets, our_puts, our_gets;
  std::vector<uint64_t> order(count);
  for (uint64_t i = 0; i < count; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(2));
  const uint64_t reads = std::min<uint64_t>(count, 4096);
  for (int rep = 0; rep < repeat; ++rep) {
    double raw_put = 0, raw_get = 0, our_put = 0, our_get = 0;
    auto run_raw = [&] {
  {
    RawDb raw(dir + "/raw", so);
    rocksdb::WriteOptions wo;
    auto t = Clock::now();
    for (uint64_t i = 0; i < count; ++i) {
      const std::string key = ChunkStore::ChunkKey({"bench", 1, static_cast<uint32_t>(i % spec.layers),
                                                    static_cast<uint32_t>(i / spec.layers)});
      Check(raw.db->Put(wo, raw.cfs[1], key, values[i % values.size()]), "raw put");
    }
    raw_put = Since(t);
    Check(raw.db->Flush(rocksdb::FlushOptions(), raw.cfs[1]), "raw flush");
    Check(raw.db->CompactRange(rocksdb::CompactRangeOptions(), raw.cfs[1], nullptr, nullptr), "raw compact");
    rocksdb::PinnableSlice v;
    t = Clock::now();
    for (uint64_t r = 0; r < reads; ++r) {
      v.Reset();
      const uint64_t i = order[r];
      const std::string key = ChunkStore::ChunkKey({"bench", 1, static_cast<uint32_t>(i % spec.layers),
                                                    static_cast<uint32_t>(i / spec.layers)});
      rocksdb::ReadOptions ro;
      ro.verify_checksums = verify;
      Check(raw.db->Get(ro, raw.cfs[1], key, &v), "raw get");
    }
    raw_get = Since(t);
  }
  std::filesystem::remove_all(dir + "/raw");
    };
    auto run_ours = [&] {
  {
    StoreOptions o = so;
    o.path = dir + "/ours";
    auto store = ChunkStore::Open(o);
    Check(store.status(), "open");
    auto t = Clock::now();
    for (uint64_t i = 0; i < count; ++i) {
      ChunkStore::Batch b;
      (*store)->PutChunk(&b, {"bench", 1, static_cast<uint32_t>(i % spec.layers), static_cast<uint32_t>(i / spec.layers)},
                         values[i % values.size()].data(), vbytes);
      Check((*store)->Write(&b), "our write");
    }
    our_put = Since(t);
    Check((*store)->Flush(), "flush");
    Check((*store)->Compact(), "compact");  // no background compaction during the reads
    ChunkValue v;
    t = Clock::now();
    for (uint64_t r = 0; r < reads; ++r) {
      const uint64_t i = order[r];
      Check((*store)->GetChunk({"bench", 1, static_cast<uint32_t>(i % spec.layers), static_cast<uint32_t>(i / spec.layers)}, &v),
            "our get");
    }
    our_get = Since(t);
  }
  std::filesystem::remove_all(dir + "/ours");
    };
    if (rep % 2 == 0) {
      run_raw();
      run_ours();
    } else {
      run_ours();
      run_raw();
    }
    raw_puts.push_back(raw_put);
    raw_gets.push_back(raw_get);
    our_puts.push_back(our_put);
    our_gets.push_back(our_get);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double raw_put = median(raw_puts), raw_get = median(raw_gets), our_put = median(our_puts),
               our_get = median(our_gets);
  const double gb = static_cast<double>(count * vbytes) / 1e9, rgb = static_cast<double>(reads * vbytes) / 1e9;
  nlohmann::json out;
  out["spill_gbps"] = gb / our_put;
  out["rocksdb_put_gbps"] = gb / raw_put;
  out["fetch_gbps"] = rgb / our_get;
  out["rocksdb_get_gbps"] = rgb / raw_get;
  std::printf("%-8s %10s %10s %7s\n", "op", "kvmem GB/s", "raw GB/s", "ratio");
  std::printf("%-8s %10.3f %10.3f %6.0f%%\n", "spill", gb / our_put, gb / raw_put, 100 * raw_put / our_put);
  std::printf("%-8s %10.3f %10.3f %6.0f%%\n", "fetch", rgb / our_get, rgb / raw_get, 100 * raw_get / our_get);

  // Eviction path: spill and fetch-back of a session's blocks, against raw RocksDB.
  {
    ModelProfile prof{spec.layers, spec.kv_heads * 4, spec.kv_heads, spec.head_dim, spec.dtype, {}, {}, "bench"};
    const uint64_t token_bytes = 2ull * spec.layers * spec.kv_heads * spec.head_dim * DTypeSize(spec.dtype);
    const uint64_t tokens = (evict_mib << 20) / token_bytes;
    SlabAllocator::Options po;
    po.capacity_bytes = (evict_mib << 20) * 2 + (256ull << 20);
    auto pool = CreateHostPool(po);
    Check(pool.status(), "pool");
    StoreOptions o = so;
    o.path = dir + "/evict";
    auto store = ChunkStore::Open(o);
    Check(store.status(), "open");
    TierContext tiers(pool->get(), TierOptions{});
    tiers.set_store(store->get());
    SessionOptions opts;
    opts.sink_tokens = 0;
    auto s = Session::Create(1, "bench", prof, opts, pool->get(), &tiers);
    Check(s.status(), "session");
    AppendSynthetic(s->get(), 5, tokens);
    // The same blocks for the raw side, in the order eviction writes them (chunk, then layer).
    std::vector<std::pair<std::string, std::string>> blocks;
    uint64_t bytes = 0;
    for (uint32_t c = 0; c < (*s)->chunk_count(); ++c) {
      for (uint32_t l = 0; l < prof.layers; ++l) {
        std::string blk;
        Check((*s)->ReadChunkBlock(c, l, &blk), "read block");
        bytes += blk.size();
        blocks.emplace_back(ChunkStore::ChunkKey({"bench", 1, l, c}), std::move(blk));
      }
    }
    auto t = Clock::now();
    EvictResult er = (*s)->EvictAll(Tier::kDisk);
    const double spill_s = Since(t);
    Check(er.last_error, "evict");
    Check((*store)->Flush(), "flush");
    Check((*store)->Compact(), "compact");
    RawDb raw(dir + "/evict-raw", so);
    rocksdb::WriteOptions wo;
    wo.disableWAL = true;  // as the spill
    t = Clock::now();
    for (const auto& [key, val] : blocks) Check(raw.db->Put(wo, raw.cfs[1], key, val), "raw put");
    const double raw_put_s = Since(t);
    Check(raw.db->Flush(rocksdb::FlushOptions(), raw.cfs[1]), "raw flush");
    Check(raw.db->CompactRange(rocksdb::CompactRangeOptions(), raw.cfs[1], nullptr, nullptr), "raw compact");
    rocksdb::ReadOptions ro;
    ro.verify_checksums = verify;
    const uint32_t L = prof.layers;
    // Fetch-back rounds, ours and raw alternating: MakeResident of every layer (then every
    // block is dropped again: its disk copy stays valid, so that writes nothing), raw Get of
    // the same blocks in the same order (layer by layer, chunk by chunk), one thread.
    std::vector<double> fetch_samples, raw_get_samples;
    uint64_t moved = 0;
    auto ours = [&] {
      const uint64_t before = (*s)->Stats().fetched_blocks;
      auto t0 = Clock::now();
      for (uint32_t l = 0; l < L; ++l) Check((*s)->MakeResident(l), "fetch back");
      fetch_samples.push_back(Since(t0));
      moved = (*s)->Stats().fetched_blocks - before;
      Check((*s)->EvictAll(Tier::kDisk).last_error, "evict again");
    };
    auto raw_get = [&] {
      rocksdb::PinnableSlice pv;
      auto t0 = Clock::now();
      for (uint32_t l = 0; l < L; ++l) {
        for (size_t i = l; i < blocks.size(); i += L) {
          pv.Reset();
          Check(raw.db->Get(ro, raw.cfs[1], blocks[i].first, &pv), "raw get");
        }
      }
      raw_get_samples.push_back(Since(t0));
    };
    // Informative: the same raw Gets split over as many threads as fetch-back uses (the
    // search pool plus the caller), so a reader can tell parallelism from per-block cost.
    std::vector<double> raw_par_samples;
    auto raw_get_par = [&] {
      auto t0 = Clock::now();
      for (uint32_t l = 0; l < L; ++l) {
        std::vector<size_t> idx;
        for (size_t i = l; i < blocks.size(); i += L) idx.push_back(i);
        const size_t n = idx.size();
        const uint32_t shares = search_threads == 0 || n < 8
                                    ? 1
                                    : static_cast<uint32_t>(std::min<size_t>(search_threads + 1, n / 4));
        search_pool.For(shares, [&](uint32_t sh) {
          rocksdb::PinnableSlice pv;
          for (size_t j = n * sh / shares; j < n * (sh + 1) / shares; ++j) {
            pv.Reset();
            Check(raw.db->Get(ro, raw.cfs[1], blocks[idx[j]].first, &pv), "raw get");
          }
        });
      }
      raw_par_samples.push_back(Since(t0));
    };
    for (int rep = 0; rep < repeat; ++rep) {
      if (rep % 2 == 0) {
        ours();
        raw_get();
        raw_get_par();
      } else {
        raw_get_par();
        raw_get();
        ours();
      }
    }
    const double fetch_s = median(fetch_samples), raw_get_s = median(raw_get_samples);
    s->reset();
    store->reset();
    const double egb = static_cast<double>(bytes) / 1e9;
    out["eviction"] = {{"bytes", bytes}, {"blocks", blocks.size()}, {"blocks_evicted", er.blocks},
                       {"blocks_fetched", moved}, {"spill_gbps", egb / spill_s},
                       {"rocksdb_put_gbps", egb / raw_put_s}, {"fetch_gbps", egb / fetch_s},
                       {"rocksdb_get_gbps", egb / raw_get_s},
                       {"rocksdb_get_same_threads_gbps", egb / median(raw_par_samples)},
                       {"fetch_threads", search_threads + 1},
                       {"samples_seconds", {{"fetch", fetch_samples}, {"rocksdb_get", raw_get_samples},
                                            {"rocksdb_get_same_threads", raw_par_samples}}}};
    std::printf("%-8s %10.3f %10.3f %6.0f%%   (eviction path, %llu blocks)\n", "evict", egb / spill_s,
                egb / raw_put_s, 100 * raw_put_s / spill_s, static_cast<unsigned long long>(er.blocks));
    std::printf("%-8s %10.3f %10.3f %6.0f%%   (fetch-back through MakeResident)\n", "fetchbk", egb / fetch_s,
                egb / raw_get_s, 100 * raw_get_s / fetch_s);
    if (search_threads > 0) {
      std::printf("%-8s %10s %10.3f %6.0f%%   (raw Get on %u threads like fetch-back, informative)\n",
                  "", "", egb / median(raw_par_samples), 100 * median(raw_par_samples) / fetch_s,
                  search_threads + 1);
    }
  }
  std::filesystem::remove_all(dir + "/evict");
  std::filesystem::remove_all(dir + "/evict-raw");

  // Restart: a durable session of growing size written through the journal, then timed.
  out["restart"] = nlohmann::json::array();
  std::printf("%-16s %9s %9s %9s %7s %7s\n", "restart    MiB", "eager s", "lazy s", "scan s", "eager", "lazy");
  for (uint64_t mib : restart_mib) {
    const std::string path = dir + "/restart";
    std::filesystem::remove_all(path);
    ModelProfile prof{spec.layers, spec.kv_heads * 4, spec.kv_heads, spec.head_dim, spec.dtype, {}, {}, "bench"};
    const uint64_t token_bytes = 2ull * spec.layers * spec.kv_heads * spec.head_dim * DTypeSize(spec.dtype);
    const uint64_t tokens = (mib << 20) / token_bytes;
    SlabAllocator::Options po;
    po.capacity_bytes = (mib << 20) * 2 + (256ull << 20);
    uint64_t stored_bytes = 0;
    {
      auto pool = CreateHostPool(po);
      Check(pool.status(), "pool");
      StoreOptions o = so;
      o.path = path;
      auto store = ChunkStore::Open(o);
      Check(store.status(), "open");
      SessionOptions opts;
      opts.durability = Durability::kDurable;
      auto s = Session::Create(1, "bench", prof, opts, pool->get());
      Check(s.status(), "session");
      Check(MakeDurable(store->get(), s->get()), "durable");
      AppendSynthetic(s->get(), 3, tokens);
      stored_bytes = tokens * token_bytes;
      s->reset();
    }
    // Every variant starts from its own copy of the same on-disk state: the writer stopped
    // without a flush, as after kill -9, so opening replays the WAL (wal_replay; also the state
    // after a kvmemd SIGTERM, whose shutdown syncs the WAL without flushing memtables). Each
    // variant then flushes and is timed again from flushed SST/blob files (flushed). Medians
    // of `repeat` rounds, the order of the three variants rotating per round.
    struct Times {
      std::vector<double> eager, open, lazy, lazy_fetch, scan;
    };
    Times times[2];  // [wal_replay, flushed]
    RestoreStats st;
    auto restore = [&](const std::string& p, bool lazy, Times* out, int state) {
      auto pool = CreateHostPool(po);
      Check(pool.status(), "pool");
      TierOptions to;
      to.restore_resident = !lazy;
      TierContext tiers(pool->get(), to);
      auto t = Clock::now();
      StoreOptions o = so;
      o.path = p;
      auto store = ChunkStore::Open(o);
      Check(store.status(), "reopen");
      tiers.set_store(store->get());
      const double open_s = Since(t);
      RestoreStats one;
      auto r = RestoreSessions(store->get(), pool->get(), SessionOptions{}, &one, &tiers);
      Check(r.status(), "restore");
      const double total = Since(t);
      if (r->size() != 1 || !(*r)[0].status.ok()) Die("restore failed");
      if (lazy) {
        out->lazy.push_back(total);
        t = Clock::now();
        for (uint32_t l = 0; l < prof.layers; ++l) Check((*r)[0].session->MakeResident(l), "fetch all");
        out->lazy_fetch.push_back(Since(t));
      } else {
        out->eager.push_back(total);
        out->open.push_back(open_s);
        st = one;
      }
      r->clear();
      if (state == 0) Check((*store)->Flush(), "flush");  // the flushed round starts from here
    };
    auto scan = [&](const std::string& p, Times* out, int state) {
      auto t = Clock::now();
      rocksdb::DBOptions dbo;
      dbo.avoid_flush_during_recovery = true;  // as ChunkStore
      rocksdb::ColumnFamilyOptions c;
      c.enable_blob_files = so.enable_blob_files;
      c.min_blob_size = so.min_blob_size;
      std::vector<rocksdb::ColumnFamilyHandle*> hs;
      rocksdb::DB* db = nullptr;
      Check(rocksdb::DB::Open(dbo, p, {{rocksdb::kDefaultColumnFamilyName, c}, {"chunks", c}, {"manifests", c}, {"memory_blocks", c}, {"spill", c}}, &hs, &db), "raw reopen");
      rocksdb::ReadOptions ro;
      ro.readahead_size = 4 << 20;
      ro.fill_cache = false;
      ro.verify_checksums = verify;
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(ro, hs[1]));
      uint64_t sum = 0;
      for (it->SeekToFirst(); it->Valid(); it->Next()) sum += it->value().size();
      Check(it->status(), "scan");
      it.reset();
      out->scan.push_back(Since(t));
      if (state == 0) Check(db->Flush(rocksdb::FlushOptions(), hs), "raw flush");
      for (auto* h : hs) db->DestroyColumnFamilyHandle(h).PermitUncheckedError();
      delete db;
      if (sum == 0) Die("empty scan");
    };
    for (int rep = 0; rep < repeat; ++rep) {
      for (const char* suffix : {"-eager", "-lazy", "-raw"}) {
        std::filesystem::remove_all(path + suffix);
        std::filesystem::copy(path, path + suffix, std::filesystem::copy_options::recursive);
      }
      for (int state = 0; state < 2; ++state) {
        for (int k = 0; k < 3; ++k) {
          switch ((k + rep) % 3) {
            case 0: restore(path + "-eager", false, &times[state], state); break;
            case 1: restore(path + "-lazy", true, &times[state], state); break;
            default: scan(path + "-raw", &times[state], state); break;
          }
        }
      }
    }
    for (int state = 0; state < 2; ++state) {
      const Times& tm = times[state];
      const char* name = state == 0 ? "wal_replay" : "flushed";
      const double restore_s = median(tm.eager), lazy_s = median(tm.lazy), scan_s = median(tm.scan);
      out["restart"].push_back({{"state", name}, {"bytes", stored_bytes}, {"seconds", restore_s},
                                {"open_seconds", median(tm.open)}, {"lazy_seconds", lazy_s},
                                {"lazy_fetch_all_seconds", median(tm.lazy_fetch)},
                                {"rocksdb_scan_seconds", scan_s}, {"tokens", st.tokens}, {"chunks", st.chunks},
                                {"samples_seconds", {{"eager", tm.eager}, {"lazy", tm.lazy}, {"scan", tm.scan}}}});
      std::printf("%-10s %-5llu %9.3f %9.3f %9.3f %6.2fx %6.2fx  (lazy, then fetch all: %.3f s)\n", name,
                  static_cast<unsigned long long>(mib), restore_s, lazy_s, scan_s, restore_s / scan_s,
                  lazy_s / scan_s, median(tm.lazy_fetch));
    }
    for (const char* suffix : {"", "-eager", "-lazy", "-raw"}) std::filesystem::remove_all(path + suffix);
  }
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  std::string cpu;
  {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line))
      if (line.rfind("model name", 0) == 0) {
        cpu = line.substr(line.find(':') + 2);
        break;
      }
  }
  out["machine"] = {{"host", host}, {"cpu", cpu}, {"cores", std::thread::hardware_concurrency()},
                    {"search_threads", search_threads}, {"restore_threads", RestoreThreads()}};
  if (!machine_note.empty()) out["machine"]["note"] = machine_note;
  out["samples_seconds"] = {{"spill", our_puts}, {"rocksdb_put", raw_puts}, {"fetch", our_gets}, {"rocksdb_get", raw_gets}};
  out["notes"] =
      "restart: seconds = eager (ChunkStore::Open + RestoreSessions loading every block into a fresh "
      "host KV pool; layers read, CRC-checked and copied in parallel on machine.restore_threads helper "
      "threads), lazy_seconds = --restore lazy (every block read and CRC-checked, K/V left in RocksDB), "
      "lazy_fetch_all_seconds = what lazy moves to first use (MakeResident of every layer); each variant "
      "from its own copy of the same store, medians of parameters.repeat rounds (samples_seconds). "
      "wal_replay = after kill -9 and after a kvmemd SIGTERM (shutdown syncs the WAL without flushing); "
      "flushed = after RocksDB's flushes. rocksdb_scan_seconds = Open + one raw iterator over the chunks "
      "family (one thread). eviction: ephemeral session blocks spilled by EvictAll(kDisk) (no WAL) and "
      "fetched back by MakeResident (Get + CRC fused with the copy into the pool, spread over "
      "eviction.fetch_threads = kvmemd's default search pool + the caller) vs raw Put (no WAL) / Get (no "
      "copy, one thread) of the same blocks in the same order; rocksdb_get_same_threads_gbps = the raw "
      "Gets on fetch_threads threads (informative). Raw reads skip RocksDB's checksum pass unless "
      "raw_verify_checksums.";
  out["parameters"] = {{"repeat", repeat}, {"value_bytes", vbytes}, {"values", count}, {"reads", reads},
                       {"blob_files", blob}, {"raw_verify_checksums", verify}, {"min_blob_size", min_blob}, {"sync_writes", so.sync_writes},
                       {"profile", {{"layers", spec.layers}, {"kv_heads", spec.kv_heads}, {"head_dim", spec.head_dim},
                                    {"dtype", "bf16"}, {"chunk_tokens", spec.chunk_tokens}}}};
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(2) << "\n";
  std::filesystem::remove_all(dir);
  return 0;
}
