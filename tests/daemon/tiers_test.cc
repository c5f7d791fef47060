// Tiers in process, on the CPU backend (the KV pool's host memory is the "device" tier):
// eviction device -> host -> RocksDB and fetch-back keep Attend outputs bit-identical;
// the least recently *selected* blocks go first, sinks and the recent window never; chunks
// selected on layer l are prefetched for layer l + 1; durable sessions evict without writing;
// an append / evict / drop loop returns pool, host and RocksDB space to the baseline.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "daemon/chunk_store.h"
#include "daemon/eviction.h"
#include "daemon/kv_pool.h"
#include "daemon/metrics.h"
#include "daemon/session.h"
#include "daemon/tiers.h"
#include "testing/reference.h"
#include "testing/session_ops.h"

namespace kvmem {
namespace {

using testing::AppendRandom;
using testing::F32Attend;
using testing::RandomTensor;

ModelProfile Profile3() { return ModelProfile{3, 4, 2, 32, DType::kBF16, {}, {}, "t"}; }

class TiersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("kvmem-tiers-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    StoreOptions so;
    so.path = (dir_ / "db").string();
    so.fail_writes_flag_file = (dir_ / "fail-writes").string();
    auto st = ChunkStore::Open(so);
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    store_ = std::move(*st);
    MakePool(64ull << 20, 1ull << 20);
  }
  void TearDown() override {
    sessions_.clear();
    tiers_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }
  // A pool of `bytes` (64 KiB slabs so small pools still have many) and a host tier.
  void MakePool(uint64_t bytes, uint64_t host_bytes, double high = 0.9, double low = 0.75) {
    sessions_.clear();
    tiers_.reset();
    SlabAllocator::Options po;
    po.capacity_bytes = bytes;
    po.slab_bytes = 64ull << 10;
    po.retain_bytes = 0;
    auto pool = CreateHostPool(po);
    ASSERT_TRUE(pool.ok());
    pool_ = std::move(*pool);
    TierOptions to;
    to.host_memory_bytes = host_bytes;
    to.high_watermark = high;
    to.low_watermark = low;
    tiers_ = std::make_unique<TierContext>(pool_.get(), to);
    tiers_->set_store(store_.get());
    // What Service::MakeRoom does, over this test's sessions.
    tiers_->make_room = [this](Session* self, uint64_t bytes) {
      return MakeDeviceRoom(sessions_, *tiers_, self, bytes);
    };
  }
  Session* New(uint64_t id, SelectionMode mode = SelectionMode::kIndex,
               Durability d = Durability::kEphemeral) {
    SessionOptions o;
    o.chunker = {8, 24};
    o.sink_tokens = 16;
    o.recent_window = 32;
    o.default_budget_tokens = 64;
    o.mode = mode;
    o.durability = d;
    auto s = Session::Create(id, "acme", Profile3(), o, pool_.get(), tiers_.get());
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (d == Durability::kDurable) {
      EXPECT_TRUE(MakeDurable(store_.get(), s->get()).ok());
    }
    sessions_.push_back(std::shared_ptr<Session>(std::move(*s)));
    return sessions_.back().get();
  }
  static Status Append(Session* s, std::mt19937_64& rng, uint32_t n) { return AppendRandom(s, rng, n); }
  // A session that keeps memory blocks: gate keys [8], payloads [16][64] f32 (4 KiB each).
  static constexpr uint32_t kGate = 8, kRows = 16, kDim = 64;
  static constexpr uint64_t kPayload = uint64_t{kRows} * kDim * 4;
  Session* NewWithMemory(uint64_t id, Durability d) {
    SessionOptions o;
    o.chunker = {8, 24};
    o.sink_tokens = 16;
    o.recent_window = 32;
    o.mode = SelectionMode::kDense;
    o.durability = d;
    o.memory.gate_dim = kGate;
    o.memory.payload_rows = kRows;
    o.memory.payload_dim = kDim;
    o.memory.payload_dtype = DType::kF32;
    auto s = Session::Create(id, "acme", Profile3(), o, pool_.get(), tiers_.get());
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (d == Durability::kDurable) {
      EXPECT_TRUE(MakeDurable(store_.get(), s->get()).ok());
    }
    sessions_.push_back(std::shared_ptr<Session>(std::move(*s)));
    return sessions_.back().get();
  }
  struct MemBlocks {
    std::vector<float> keys, payloads;
    std::vector<uint64_t> starts, ends;
    NewMemoryBlocks View() const {
      NewMemoryBlocks b;
      b.n = static_cast<uint32_t>(starts.size());
      b.gate_keys = keys.data();
      b.payloads = reinterpret_cast<const uint8_t*>(payloads.data());
      b.span_starts = starts;
      b.span_ends = ends;
      for (uint32_t i = 0; i < b.n; ++i) b.labels.push_back("b" + std::to_string(starts[i]));
      return b;
    }
    const float* Payload(size_t i) const { return &payloads[i * kRows * kDim]; }
  };
  static MemBlocks MakeMem(std::mt19937_64& rng, uint32_t n) {
    std::normal_distribution<float> g(0.f, 1.f);
    MemBlocks b;
    for (uint32_t i = 0; i < n * kGate; ++i) b.keys.push_back(g(rng));
    for (uint64_t i = 0; i < n * kRows * kDim; ++i) b.payloads.push_back(g(rng));
    for (uint32_t i = 0; i < n; ++i) {
      b.starts.push_back(1000 + i);
      b.ends.push_back(2000 + i);
    }
    return b;
  }
  static std::vector<uint64_t> PutMem(Session* s, const MemBlocks& b) {
    s->BeginMemoryOp();
    auto ids = s->memory()->Put(b.View(), 1u << 20);
    EXPECT_TRUE(ids.ok()) << ids.status().ToString();
    return ids.ok() ? *ids : std::vector<uint64_t>{};
  }
  static uint64_t CountMemTier(Session* s, std::span<const uint64_t> ids, Tier t) {
    uint64_t n = 0;
    for (uint64_t id : ids) n += s->memory()->BlockTier(id) == t;
    return n;
  }
  // Attend outputs (f32) on every layer for fixed queries, in `mode`, and the selections.
  struct Outs {
    std::vector<std::vector<float>> out;
    std::vector<std::vector<uint32_t>> selected;  // per layer: head 0's chunks
  };
  static Outs Attend(Session* s, uint64_t seed, SelectionMode mode) {
    std::mt19937_64 rng(seed);
    const ModelProfile& p = s->profile();
    Outs o;
    for (uint32_t l = 0; l < p.layers; ++l) {
      auto q = RandomTensor(rng, DType::kF32, p.q_heads * p.head_dim);
      std::vector<float> out(p.q_heads * p.head_dim);
      const AttendArgs a = F32Attend(l, reinterpret_cast<const float*>(q.data()), out.data(), mode);
      AttendInfo info;
      Status st = s->Attend(a, &info);
      EXPECT_TRUE(st.ok()) << st.ToString();
      o.out.push_back(out);
      o.selected.push_back(info.selection.empty() ? std::vector<uint32_t>{} : info.selection[0].chunks);
    }
    return o;
  }
  static void ExpectSame(const Outs& a, const Outs& b) {
    ASSERT_EQ(a.out.size(), b.out.size());
    for (size_t l = 0; l < a.out.size(); ++l) {
      EXPECT_EQ(0, std::memcmp(a.out[l].data(), b.out[l].data(), a.out[l].size() * sizeof(float)))
          << "layer " << l;
      EXPECT_EQ(a.selected[l], b.selected[l]) << "layer " << l;
    }
  }
  uint64_t CountTier(Session* s, Tier t) {
    uint64_t n = 0;
    for (uint32_t c = 0; c < s->chunk_count(); ++c)
      for (uint32_t l = 0; l < s->profile().layers; ++l) n += s->BlockTier(c, l) == t;
    return n;
  }

  std::filesystem::path dir_;
  std::unique_ptr<ChunkStore> store_;
  std::unique_ptr<KVPool> pool_;
  std::unique_ptr<TierContext> tiers_;
  std::vector<std::shared_ptr<Session>> sessions_;
  RestoreStats stats_;
};

TEST_F(TiersTest, EvictionToHostAndDiskKeepsAttendIdentical) {
  std::mt19937_64 rng(1);
  Session* s = New(1);
  ASSERT_TRUE(Append(s, rng, 700).ok());
  const uint64_t device_before = s->Stats().bytes;
  const Outs dense = Attend(s, 7, SelectionMode::kDense);
  const Outs sparse = Attend(s, 8, SelectionMode::kIndex);
  ASSERT_FALSE(sparse.selected[0].empty());

  // Device -> host (1 MiB host tier holds part of it; the rest goes to RocksDB).
  EvictResult r = s->EvictAll(Tier::kHost);
  ASSERT_TRUE(r.last_error.ok()) << r.last_error.ToString();
  EXPECT_GT(r.blocks, 0u);
  SessionStats st = s->Stats();
  EXPECT_LT(st.bytes, device_before);
  EXPECT_GT(st.host_bytes, 0u);
  EXPECT_LE(st.host_bytes, 1ull << 20);
  EXPECT_EQ(tiers_->host_used(), st.host_bytes);
  // Sinks (chunks starting before token 16) and the recent window never leave.
  for (uint32_t l = 0; l < 3; ++l) {
    EXPECT_EQ(s->BlockTier(0, l), Tier::kDevice);
    EXPECT_EQ(s->BlockTier(s->chunk_count() - 1, l), Tier::kDevice);
  }
  ExpectSame(sparse, Attend(s, 8, SelectionMode::kIndex));
  EXPECT_GT(s->Stats().fetched_blocks, 0u);  // the selected ones came back

  // Everything evictable to RocksDB, then attention over every chunk (all fetched back).
  r = s->EvictAll(Tier::kDisk);
  ASSERT_TRUE(r.last_error.ok()) << r.last_error.ToString();
  st = s->Stats();
  EXPECT_EQ(st.host_bytes, 0u);
  EXPECT_EQ(tiers_->host_used(), 0u);
  EXPECT_GT(st.disk_bytes, 0u);
  EXPECT_GT(CountTier(s, Tier::kDisk), 3u * (s->chunk_count() - 6));
  const uint64_t fetched = s->Stats().fetched_blocks;
  ExpectSame(dense, Attend(s, 7, SelectionMode::kDense));
  EXPECT_EQ(CountTier(s, Tier::kDisk), 0u);
  EXPECT_GT(s->Stats().fetched_blocks, fetched);
  EXPECT_EQ(s->Stats().disk_bytes, 0u);
  EXPECT_EQ(s->Stats().bytes, device_before);

  // Evicting again writes nothing (the spilled copy is still valid) and reads the same.
  const uint64_t spilled = GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)].load();
  s->EvictAll(Tier::kDisk);
  EXPECT_EQ(GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)].load(), spilled);
  ExpectSame(sparse, Attend(s, 8, SelectionMode::kIndex));
  // Exact search reads keys from wherever they are: same top chunks as before eviction.
  s->EvictAll(Tier::kDisk);
  std::vector<float> q(4 * 32, 0.25f);
  auto ret = s->Retrieve(1, q.data(), DType::kF32, 0, 5);
  ASSERT_TRUE(ret.ok()) << ret.status().ToString();
  EXPECT_EQ(ret->heads[0].chunks.size(), 5u);
}

TEST_F(TiersTest, DurableEvictionDropsTheResidentCopyAndReadsTheStoredOne) {
  std::mt19937_64 rng(2);
  Session* s = New(2, SelectionMode::kIndex, Durability::kDurable);
  ASSERT_TRUE(Append(s, rng, 500).ok());
  const Outs before = Attend(s, 3, SelectionMode::kDense);
  const uint64_t spilled = GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)].load();
  EvictResult r = s->EvictAll(Tier::kDisk);
  ASSERT_TRUE(r.last_error.ok()) << r.last_error.ToString();
  EXPECT_GT(r.blocks, 0u);
  EXPECT_EQ(GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)].load(), spilled);
  ExpectSame(before, Attend(s, 3, SelectionMode::kDense));
  // A corrupted stored chunk is reported by name when it is fetched back.
  s->EvictAll(Tier::kDisk);
  uint32_t victim = 0;
  for (uint32_t c = 0; c < s->chunk_count(); ++c)
    if (s->BlockTier(c, 1) == Tier::kDisk) victim = c;
  ASSERT_GT(victim, 0u);
  ASSERT_TRUE(store_->CorruptChunkForTest({"acme", 2, 1, victim}, 5).ok());
  std::vector<float> q(4 * 32, 0.5f), out(q.size());
  Status st = s->Attend(F32Attend(1, q.data(), out.data(), SelectionMode::kDense), nullptr);
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("layer 1, chunk " + std::to_string(victim)), std::string::npos)
      << st.ToString();
}

TEST_F(TiersTest, PoolPressureEvictsLeastRecentlySelectedFirst) {
  // 3 layers x 2 heads x 32 dims bf16: 768 B of K+V per token. An 8 MiB pool; a full pool
  // evicts down to the low watermark (85% here).
  MakePool(8ull << 20, 0, 0.95, 0.85);
  std::mt19937_64 rng(3);
  Session* a = New(10);
  ASSERT_TRUE(Append(a, rng, 3000).ok());  // 2.2 MiB
  // Select a few chunks of a on layer 0 (Retrieve updates recency, like Attend).
  std::vector<float> q(4 * 32);
  for (auto& x : q) x = std::normal_distribution<float>(0, 1)(rng);
  auto sel = a->Retrieve(0, q.data(), DType::kF32, 256, 0);
  ASSERT_TRUE(sel.ok());
  std::vector<uint32_t> chosen = sel->heads[0].chunks;
  chosen.insert(chosen.end(), sel->heads[1].chunks.begin(), sel->heads[1].chunks.end());
  ASSERT_FALSE(chosen.empty());
  // b's appends fill the pool: a's cold blocks go to RocksDB first, its selected ones and
  // b's newer ones stay.
  Session* b = New(11);
  for (int i = 0; i < 4; ++i) {
    Status st = Append(b, rng, 2000);
    ASSERT_TRUE(st.ok()) << "append " << i << ": " << st.ToString();
  }
  EXPECT_GT(a->Stats().evicted_blocks, 0u);
  EXPECT_GT(CountTier(a, Tier::kDisk), 0u);
  EXPECT_EQ(CountTier(b, Tier::kDisk), 0u);
  for (uint32_t c : chosen) EXPECT_EQ(a->BlockTier(c, 0), Tier::kDevice) << "chunk " << c;
  for (uint32_t l = 0; l < 3; ++l) EXPECT_EQ(a->BlockTier(0, l), Tier::kDevice);  // sink
  // Keep going: far more K/V than the pool holds passes through it.
  for (int i = 0; i < 6; ++i) {
    Status st = Append(b, rng, 3000);
    ASSERT_TRUE(st.ok()) << "append " << i << ": " << st.ToString();
  }
  EXPECT_EQ(b->tokens(), 26000u);  // 19 MiB of K/V through an 8 MiB pool
  EXPECT_GT(CountTier(b, Tier::kDisk), 0u);
  for (uint32_t l = 0; l < 3; ++l) EXPECT_EQ(a->BlockTier(0, l), Tier::kDevice);  // sink
  // Selecting an evicted chunk fetches it back in the request path.
  const uint64_t fetched = a->Stats().fetched_blocks;
  const Outs o = Attend(a, 4, SelectionMode::kDense);
  EXPECT_GT(a->Stats().fetched_blocks, fetched);
  EXPECT_EQ(CountTier(a, Tier::kDisk), 0u);
  EXPECT_EQ(o.out.size(), 3u);
}

// A dense Attend uses every block of its layer: the layer is stamped with the op's tick (not
// each block), and eviction takes a block's tick as the later of its own and its layer's. Pool
// pressure then evicts the session's other layers first; the stamped layer stays resident.
TEST_F(TiersTest, ADenseAttendKeepsItsLayerRecent) {
  MakePool(8ull << 20, 0, 0.95, 0.85);
  std::mt19937_64 rng(4);
  Session* a = New(12, SelectionMode::kDense);
  ASSERT_TRUE(Append(a, rng, 3000).ok());  // 2.2 MiB, 0.73 MiB per layer
  std::vector<float> q(4 * 32, 0.25f), out(q.size());
  ASSERT_TRUE(a->Attend(F32Attend(1, q.data(), out.data(), SelectionMode::kDense), nullptr).ok());
  Session* b = New(13);
  for (int i = 0; i < 4; ++i) {
    Status st = Append(b, rng, 2000);
    ASSERT_TRUE(st.ok()) << "append " << i << ": " << st.ToString();
  }
  uint64_t on_disk[3] = {0, 0, 0};
  for (uint32_t c = 0; c < a->chunk_count(); ++c)
    for (uint32_t l = 0; l < 3; ++l) on_disk[l] += a->BlockTier(c, l) == Tier::kDisk;
  EXPECT_GT(on_disk[0], 0u);
  EXPECT_GT(on_disk[2], 0u);
  EXPECT_EQ(on_disk[1], 0u);
  // Its evicted blocks come back for the next dense Attend of a layer, which sees the same
  // keys and values as a session that never left the pool would (checked in
  // EvictionToHostAndDiskKeepsAttendIdentical); here: nothing of layer 0 is left out.
  const uint64_t fetched = a->Stats().fetched_blocks;
  ASSERT_TRUE(a->Attend(F32Attend(0, q.data(), out.data(), SelectionMode::kDense), nullptr).ok());
  EXPECT_EQ(a->Stats().fetched_blocks - fetched, on_disk[0]);
  for (uint32_t c = 0; c < a->chunk_count(); ++c) EXPECT_EQ(a->BlockTier(c, 0), Tier::kDevice);
}

TEST_F(TiersTest, ChunksSelectedOnALayerArePrefetchedForTheNext) {
  std::mt19937_64 rng(5);
  Session* s = New(20);
  ASSERT_TRUE(Append(s, rng, 800).ok());
  s->EvictAll(Tier::kDisk);
  std::vector<float> q(4 * 32, 0.3f), out(q.size());
  AttendInfo info;
  ASSERT_TRUE(s->Attend(F32Attend(0, q.data(), out.data()), &info).ok());
  std::vector<uint32_t> chosen;
  for (const auto& h : info.selection) chosen.insert(chosen.end(), h.chunks.begin(), h.chunks.end());
  std::sort(chosen.begin(), chosen.end());
  chosen.erase(std::unique(chosen.begin(), chosen.end()), chosen.end());
  uint64_t cold = 0;
  for (uint32_t c : chosen) cold += s->BlockTier(c, 1) != Tier::kDevice;
  ASSERT_GT(cold, 0u);
  EXPECT_EQ(s->Stats().prefetched_blocks, 0u);
  s->Prefetch();  // Service::AfterReply does this after the reply is sent
  EXPECT_EQ(s->Stats().prefetched_blocks, cold);
  for (uint32_t c : chosen) EXPECT_EQ(s->BlockTier(c, 1), Tier::kDevice) << "chunk " << c;
  // Layer 2 was not prefetched for (only l + 1).
  uint64_t layer2_cold = 0;
  for (uint32_t c : chosen) layer2_cold += s->BlockTier(c, 2) != Tier::kDevice;
  EXPECT_GT(layer2_cold, 0u);
}

TEST_F(TiersTest, SpillWriteFailureKeepsTheBlockAndNamesTheError) {
  std::mt19937_64 rng(6);
  Session* s = New(30);
  ASSERT_TRUE(Append(s, rng, 400).ok());
  const Outs before = Attend(s, 1, SelectionMode::kDense);
  { std::ofstream(dir_ / "fail-writes") << "x"; }
  EvictResult r = s->EvictAll(Tier::kDisk);
  std::filesystem::remove(dir_ / "fail-writes");
  EXPECT_EQ(r.blocks, 0u);
  EXPECT_EQ(r.last_error.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(r.last_error.message().find("disk full"), std::string::npos) << r.last_error.ToString();
  EXPECT_EQ(CountTier(s, Tier::kDisk), 0u);
  ExpectSame(before, Attend(s, 1, SelectionMode::kDense));
  // Once the disk has room again, eviction works.
  EXPECT_GT(s->EvictAll(Tier::kDisk).blocks, 0u);
  ChunkValue v;
  uint32_t spilled_chunk = 0;
  for (uint32_t c = 0; c < s->chunk_count(); ++c)
    if (s->BlockTier(c, 0) == Tier::kDisk) spilled_chunk = c;
  ASSERT_GT(spilled_chunk, 0u);
  ASSERT_TRUE(store_->GetSpill({"acme", 30, 0, spilled_chunk}, &v).ok());
  // Spilled blocks do not outlive the process: the next Open starts with an empty family.
  sessions_.clear();
  ASSERT_TRUE(store_->PutSpill({"acme", 31, 0, 0}, "orphan", 6).ok());  // as after a crash
  store_.reset();
  StoreOptions so;
  so.path = (dir_ / "db").string();
  auto reopened = ChunkStore::Open(so);
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  store_ = std::move(*reopened);
  EXPECT_EQ(store_->GetSpill({"acme", 31, 0, 0}, &v).code(), StatusCode::kNotFound);
}

TEST_F(TiersTest, AppendEvictDropLoopReturnsMemoryAndDiskToBaseline) {
  ASSERT_TRUE(store_->Compact().ok());
  const uint64_t disk_base = store_->LiveDataBytes();
  const uint64_t pool_base = pool_->allocator().allocated_bytes();
  ASSERT_EQ(pool_base, 0u);
  std::mt19937_64 rng(7);
  uint64_t peak_disk = 0;
  for (int i = 0; i < 12; ++i) {
    const bool durable = i % 3 == 2;
    Session* s = New(100 + i, SelectionMode::kIndex, durable ? Durability::kDurable : Durability::kEphemeral);
    ASSERT_TRUE(Append(s, rng, 600).ok());
    s->EvictAll(i % 2 ? Tier::kHost : Tier::kDisk);
    Attend(s, i, SelectionMode::kIndex);
    peak_disk = std::max(peak_disk, store_->LiveDataBytes());
    // Drop: memory in every tier (and spilled records) goes with the session object.
    sessions_.clear();
    if (durable) {
      ASSERT_TRUE(store_->DeleteSession("acme", 100 + i).ok());
    }
  }
  EXPECT_GT(peak_disk, disk_base);
  EXPECT_EQ(pool_->allocator().allocated_bytes(), pool_base);
  EXPECT_EQ(pool_->allocator().live_blocks(), 0u);
  EXPECT_EQ(tiers_->host_used(), 0u);
  ASSERT_TRUE(store_->Compact().ok());
  EXPECT_LE(store_->LiveDataBytes(), disk_base + 64 * 1024) << "peak " << peak_disk;
}

TEST_F(TiersTest, SnapshotIsAPointInTimeImageAndRestoreMakesANewSession) {
  std::mt19937_64 rng(8);
  Session* s = New(40);
  ASSERT_TRUE(Append(s, rng, 613).ok());  // chunks + a tail
  ASSERT_GT(s->Stats().tail_tokens, 0u);
  s->EvictAll(Tier::kDisk);  // the image is read from whatever tier holds each block
  const Outs dense = Attend(s, 9, SelectionMode::kDense);
  const Outs sparse = Attend(s, 10, SelectionMode::kIndex);
  auto info = WriteSnapshot(store_.get(), *s, "before-edit");
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->tokens, 613u);
  EXPECT_EQ(info->chunks, s->chunk_count());
  EXPECT_EQ(WriteSnapshot(store_.get(), *s, "before-edit").status().code(), StatusCode::kAlreadyExists);
  // The source goes on; the snapshot does not see it.
  ASSERT_TRUE(Append(s, rng, 50).ok());

  SessionOptions defaults;
  auto r = RestoreSnapshot(store_.get(), pool_.get(), tiers_.get(), "acme", "before-edit", 41,
                           Durability::kEphemeral, defaults);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  Session* e = (*r).get();
  sessions_.push_back(std::move(*r));
  EXPECT_EQ(e->tokens(), 613u);
  EXPECT_EQ(e->options().mode, SelectionMode::kIndex);
  EXPECT_EQ(e->options().recent_window, 32u);
  ExpectSame(dense, Attend(e, 9, SelectionMode::kDense));
  ExpectSame(sparse, Attend(e, 10, SelectionMode::kIndex));
  // Both continue identically from the same state.
  ASSERT_TRUE(Append(e, rng, 7).ok());
  EXPECT_EQ(e->tokens(), 620u);

  // Restored as durable: it survives a crash and restart like any durable session.
  auto d = RestoreSnapshot(store_.get(), pool_.get(), tiers_.get(), "acme", "before-edit", 42,
                           Durability::kDurable, defaults);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  ASSERT_TRUE(Append(d->get(), rng, 30).ok());
  const Outs durable_out = Attend(d->get(), 11, SelectionMode::kDense);
  d->reset();
  sessions_.clear();
  auto restored = RestoreSessions(store_.get(), pool_.get(), defaults, &stats_, tiers_.get());
  ASSERT_TRUE(restored.ok());
  ASSERT_EQ(restored->size(), 1u);  // session 42 only: snapshots are not sessions
  ASSERT_TRUE((*restored)[0].status.ok()) << (*restored)[0].status.ToString();
  EXPECT_EQ((*restored)[0].id, 42u);
  EXPECT_EQ((*restored)[0].session->tokens(), 643u);
  ExpectSame(durable_out, Attend((*restored)[0].session.get(), 11, SelectionMode::kDense));

  // A snapshot survives reopening the store; dropping it removes every record.
  restored->clear();
  store_.reset();
  StoreOptions so;
  so.path = (dir_ / "db").string();
  auto reopened = ChunkStore::Open(so);
  ASSERT_TRUE(reopened.ok());
  store_ = std::move(*reopened);
  tiers_->set_store(store_.get());
  auto again = RestoreSnapshot(store_.get(), pool_.get(), tiers_.get(), "acme", "before-edit", 43,
                               Durability::kEphemeral, defaults);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  ExpectSame(dense, Attend(again->get(), 9, SelectionMode::kDense));
  again->reset();
  ASSERT_TRUE(DeleteSnapshot(store_.get(), "acme", "before-edit").ok());
  EXPECT_EQ(RestoreSnapshot(store_.get(), pool_.get(), tiers_.get(), "acme", "before-edit", 44,
                            Durability::kEphemeral, defaults).status().code(),
            StatusCode::kNotFound);
  EXPECT_EQ(DeleteSnapshot(store_.get(), "acme", "before-edit").code(), StatusCode::kNotFound);
  // Another tenant cannot see a tenant's snapshots.
  Session* t = New(45);
  ASSERT_TRUE(Append(t, rng, 40).ok());
  ASSERT_TRUE(WriteSnapshot(store_.get(), *t, "mine").ok());
  EXPECT_EQ(RestoreSnapshot(store_.get(), pool_.get(), tiers_.get(), "other", "mine", 46,
                            Durability::kEphemeral, defaults).status().code(),
            StatusCode::kNotFound);
}

TEST_F(TiersTest, SnapshotMidDecodeStepIsRefused) {
  std::mt19937_64 rng(9);
  Session* s = New(50, SelectionMode::kDense);
  ASSERT_TRUE(Append(s, rng, 100).ok());
  const ModelProfile& p = s->profile();
  auto k = RandomTensor(rng, p.dtype, p.kv_heads * p.head_dim);
  std::vector<float> q(p.q_heads * p.head_dim, 0.1f), out(q.size());
  // Layer 0 only: a decode step in progress.
  ASSERT_TRUE(s->Attend(F32Attend(0, q.data(), out.data(), SelectionMode::kDefault, k.data(), k.data()), nullptr).ok());
  auto r = WriteSnapshot(store_.get(), *s, "partial");
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << r.status().ToString();
  EXPECT_EQ(RestoreSnapshot(store_.get(), pool_.get(), tiers_.get(), "acme", "partial", 51,
                            Durability::kEphemeral, SessionOptions{}).status().code(),
            StatusCode::kNotFound);
}

TEST_F(TiersTest, LazyRestoreChecksEveryBlockAndFetchesOnFirstUse) {
  std::mt19937_64 rng(10);
  Session* s = New(60, SelectionMode::kDense, Durability::kDurable);
  ASSERT_TRUE(Append(s, rng, 700).ok());
  const Outs before = Attend(s, 12, SelectionMode::kDense);
  sessions_.clear();
  // Lazy: nothing of the stored chunks lands in the pool before the first use.
  TierOptions to;
  to.restore_resident = false;
  TierContext lazy(pool_.get(), to);
  lazy.set_store(store_.get());
  RestoreStats st;
  auto r = RestoreSessions(store_.get(), pool_.get(), SessionOptions{}, &st, &lazy);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->size(), 1u);
  ASSERT_TRUE((*r)[0].status.ok()) << (*r)[0].status.ToString();
  Session* l = (*r)[0].session.get();
  EXPECT_EQ(l->tokens(), 700u);
  EXPECT_GT(l->Stats().disk_bytes, 0u);
  EXPECT_EQ(CountTier(l, Tier::kDevice), 0u);
  ExpectSame(before, Attend(l, 12, SelectionMode::kDense));
  EXPECT_EQ(CountTier(l, Tier::kDisk), 0u);
  EXPECT_EQ(l->Stats().fetched_blocks, uint64_t{3} * l->chunk_count());
  r->clear();
  // A bad block fails the lazy restore at start, by name, as the eager one does.
  ASSERT_TRUE(store_->CorruptChunkForTest({"acme", 60, 2, 7}, 3).ok());
  auto bad = RestoreSessions(store_.get(), pool_.get(), SessionOptions{}, &st, &lazy);
  ASSERT_TRUE(bad.ok());
  ASSERT_EQ(bad->size(), 1u);
  EXPECT_EQ((*bad)[0].status.code(), StatusCode::kDataLoss);
  EXPECT_NE((*bad)[0].status.message().find("layer 2, chunk 7"), std::string::npos)
      << (*bad)[0].status.ToString();
}

// Issue 5: memory-block payloads move device -> host -> RocksDB like chunk blocks (an
// ephemeral session's to the spill family, a durable one's already have their record and
// are not written again), are counted in the tier stats, and come back unchanged when read.
TEST_F(TiersTest, MemoryBlocksMoveThroughTheTiersAndComeBackUnchanged) {
  for (Durability d : {Durability::kEphemeral, Durability::kDurable}) {
    SCOPED_TRACE(d == Durability::kDurable ? "durable" : "ephemeral");
    MakePool(64ull << 20, 1ull << 20);  // host tier: 1 MiB = 256 payloads
    Session* s = NewWithMemory(70 + static_cast<int>(d), d);
    MemoryStore* m = s->memory();
    std::mt19937_64 rng(31);
    const MemBlocks b = MakeMem(rng, 40);
    const std::vector<uint64_t> ids = PutMem(s, b);
    ASSERT_EQ(ids.size(), 40u);
    const uint64_t dev_bytes = m->bytes();
    EXPECT_GE(dev_bytes, 40 * kPayload);
    const uint64_t pool_with = pool_->allocator().allocated_bytes();
    // Device -> host.
    EvictResult r = s->EvictAll(Tier::kHost);
    ASSERT_TRUE(r.last_error.ok()) << r.last_error.ToString();
    EXPECT_EQ(CountMemTier(s, ids, Tier::kHost), 40u);
    EXPECT_EQ(m->bytes(), 0u);
    EXPECT_EQ(m->host_bytes(), 40 * kPayload);
    EXPECT_EQ(s->Stats().host_bytes, 40 * kPayload);
    EXPECT_EQ(tiers_->host_used(), 40 * kPayload);
    EXPECT_EQ(pool_->allocator().allocated_bytes(), pool_with - dev_bytes);
    EXPECT_GE(s->Stats().evicted_blocks, 40u);
    // Host -> RocksDB.
    const uint64_t spilled_before = GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)].load();
    r = s->EvictAll(Tier::kDisk);
    ASSERT_TRUE(r.last_error.ok()) << r.last_error.ToString();
    EXPECT_EQ(CountMemTier(s, ids, Tier::kDisk), 40u);
    EXPECT_EQ(m->host_bytes(), 0u);
    EXPECT_EQ(tiers_->host_used(), 0u);
    EXPECT_EQ(m->disk_bytes(), 40 * kPayload);
    EXPECT_EQ(s->Stats().disk_bytes, 40 * kPayload);
    const uint64_t spilled = GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)].load() - spilled_before;
    EXPECT_EQ(spilled, d == Durability::kDurable ? 0u : 40 * kPayload);
    // Reading through (Snapshot does) does not move them; fetching does, and counts.
    std::vector<float> got(kRows * kDim);
    ASSERT_TRUE(m->ReadPayload(ids[3], got.data()).ok());
    EXPECT_EQ(0, std::memcmp(got.data(), b.Payload(3), kPayload));
    EXPECT_EQ(m->BlockTier(ids[3]), Tier::kDisk);
    const std::vector<uint64_t> want = {ids[5], ids[17], ids[39]};
    const uint64_t fetched = s->Stats().fetched_blocks;
    ASSERT_TRUE(s->FetchMemoryBlocks(want).ok());
    EXPECT_EQ(s->Stats().fetched_blocks, fetched + 3);
    EXPECT_EQ(CountMemTier(s, want, Tier::kDevice), 3u);
    EXPECT_EQ(CountMemTier(s, ids, Tier::kDisk), 37u);
    EXPECT_EQ(m->disk_bytes(), 37 * kPayload);
    for (size_t i : {size_t{5}, size_t{17}, size_t{39}}) {
      ASSERT_TRUE(m->ReadPayload(ids[i], got.data()).ok());
      EXPECT_EQ(0, std::memcmp(got.data(), b.Payload(i), kPayload)) << "block " << i;
    }
    // Evicting a fetched block again writes nothing: its RocksDB copy is still valid.
    const uint64_t spilled_again = GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)].load();
    s->EvictAll(Tier::kDisk);
    EXPECT_EQ(GlobalMetrics().spill_bytes[static_cast<int>(Tier::kDisk)].load(), spilled_again);
    ASSERT_TRUE(s->FetchMemoryBlocks(ids).ok());
    for (size_t i = 0; i < ids.size(); ++i) {
      ASSERT_TRUE(m->ReadPayload(ids[i], got.data()).ok());
      EXPECT_EQ(0, std::memcmp(got.data(), b.Payload(i), kPayload)) << "block " << i;
    }
    EXPECT_EQ(m->disk_bytes(), 0u);
  }
}

// Under pool pressure payloads are evicted least recently selected first, with chunk blocks:
// payloads read since the put outlive the ones nobody read.
TEST_F(TiersTest, PoolPressureEvictsLeastRecentlySelectedMemoryBlocksFirst) {
  MakePool(4ull << 20, 0);  // device only: evicted blocks go to RocksDB
  Session* s = NewWithMemory(80, Durability::kEphemeral);
  std::mt19937_64 rng(32);
  const MemBlocks b = MakeMem(rng, 200);  // 800 KiB
  const std::vector<uint64_t> ids = PutMem(s, b);
  ASSERT_EQ(ids.size(), 200u);
  // The last 50 are read after the put (they stay resident: only their recency changes).
  const std::vector<uint64_t> unread(ids.begin(), ids.begin() + 150), read(ids.begin() + 150, ids.end());
  ASSERT_TRUE(s->FetchMemoryBlocks(read).ok());
  // K/V (newer still) until the full pool has to evict.
  for (int i = 0; i < 100 && s->Stats().evicted_blocks == 0; ++i) ASSERT_TRUE(Append(s, rng, 100).ok());
  ASSERT_GT(s->Stats().evicted_blocks, 0u);
  const uint64_t unread_out = unread.size() - CountMemTier(s, unread, Tier::kDevice);
  const uint64_t read_out = read.size() - CountMemTier(s, read, Tier::kDevice);
  EXPECT_GT(unread_out, 0u);
  // None of the recently read ones left while an unread one is still resident, and no chunk
  // block (sealed after both) left before every payload had.
  if (read_out > 0) {
    EXPECT_EQ(unread_out, unread.size());
  }
  if (CountTier(s, Tier::kDisk) > 0) {
    EXPECT_EQ(unread_out + read_out, ids.size());
  }
  EXPECT_GE(s->Stats().disk_bytes, unread_out * kPayload);
  // And they come back, unchanged, when read.
  ASSERT_TRUE(s->FetchMemoryBlocks(unread).ok());
  EXPECT_EQ(CountMemTier(s, unread, Tier::kDevice), unread.size());
  std::vector<float> got(kRows * kDim);
  for (size_t i = 0; i < ids.size(); i += 7) {
    ASSERT_TRUE(s->memory()->ReadPayload(ids[i], got.data()).ok());
    EXPECT_EQ(0, std::memcmp(got.data(), b.Payload(i), kPayload)) << "block " << i;
  }
}

// Snapshots carry memory blocks (ids, spans, labels, gate keys, payloads from whatever tier,
// the next id); Restore brings them back, durable targets store them under their own id.
TEST_F(TiersTest, SnapshotCarriesMemoryBlocks) {
  std::mt19937_64 rng(33);
  Session* s = NewWithMemory(90, Durability::kEphemeral);
  ASSERT_TRUE(Append(s, rng, 300).ok());
  const MemBlocks b = MakeMem(rng, 30);
  const std::vector<uint64_t> ids = PutMem(s, b);
  const std::vector<uint64_t> dropped = {ids[3], ids[4]};
  ASSERT_TRUE(s->memory()->Drop(dropped).ok());
  s->EvictAll(Tier::kDisk);  // the image reads payloads from RocksDB
  ASSERT_GT(s->memory()->disk_bytes(), 0u);
  const uint64_t next_id = s->memory()->next_id();
  ASSERT_TRUE(WriteSnapshot(store_.get(), *s, "with-memory").ok());
  PutMem(s, MakeMem(rng, 5));  // after the snapshot: not in it
  auto check = [&](Session* r) {
    MemoryStore* m = r->memory();
    ASSERT_NE(m, nullptr);
    EXPECT_EQ(m->blocks(), 28u);
    EXPECT_EQ(m->next_id(), next_id);
    std::vector<float> got(kRows * kDim);
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i == 3 || i == 4) {
        EXPECT_EQ(m->Info(ids[i]).status().code(), StatusCode::kNotFound);
        continue;
      }
      auto info = m->Info(ids[i]);
      ASSERT_TRUE(info.ok()) << info.status().ToString();
      EXPECT_EQ((*info)->span_start, b.starts[i]);
      EXPECT_EQ((*info)->span_end, b.ends[i]);
      EXPECT_EQ((*info)->label, "b" + std::to_string(b.starts[i]));
      auto key = m->GateKey(ids[i]);
      ASSERT_TRUE(key.ok());
      EXPECT_EQ(0, std::memcmp(*key, &b.keys[i * kGate], kGate * sizeof(float)));
      ASSERT_TRUE(m->ReadPayload(ids[i], got.data()).ok());
      EXPECT_EQ(0, std::memcmp(got.data(), b.Payload(i), kPayload)) << "block " << i;
    }
  };
  for (Durability d : {Durability::kEphemeral, Durability::kDurable}) {
    auto r = RestoreSnapshot(store_.get(), pool_.get(), tiers_.get(), "acme", "with-memory",
                             91 + static_cast<int>(d), d, SessionOptions{});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    check(r->get());
    if (d == Durability::kDurable) {
      // Its own records hold the blocks: a put after Restore and a restart keep all of them.
      Session* rs = r->get();
      rs->BeginMemoryOp();
      ASSERT_TRUE(rs->memory()->Put(MakeMem(rng, 2).View(), 1u << 20).ok());
      ASSERT_GT(rs->memory()->next_id(), next_id);
      r->reset();
      sessions_.clear();
      RestoreStats st;
      auto back = RestoreSessions(store_.get(), pool_.get(), SessionOptions{}, &st, tiers_.get());
      ASSERT_TRUE(back.ok());
      bool found = false;
      for (auto& one : *back) {
        if (one.id != 92) continue;
        found = true;
        ASSERT_TRUE(one.status.ok()) << one.status.ToString();
        EXPECT_EQ(one.session->memory()->blocks(), 30u);
        EXPECT_EQ(one.session->memory()->next_id(), next_id + 2);
      }
      EXPECT_TRUE(found);
    }
  }
}

// Drop (and TTL expiry, which drops) frees memory blocks in every tier: pool, host budget
// and the spilled records.
TEST_F(TiersTest, DroppingASessionFreesItsMemoryBlocksInEveryTier) {
  MakePool(64ull << 20, 256ull << 10);
  ASSERT_TRUE(store_->Compact().ok());
  const uint64_t disk_base = store_->LiveDataBytes();
  std::mt19937_64 rng(34);
  Session* s = NewWithMemory(95, Durability::kEphemeral);
  const MemBlocks b = MakeMem(rng, 200);  // 800 KiB: some go to the 256 KiB host tier
  const std::vector<uint64_t> ids = PutMem(s, b);
  s->EvictAll(Tier::kHost);
  const uint64_t on_host = CountMemTier(s, ids, Tier::kHost);
  EXPECT_GT(on_host, 0u);
  EXPECT_GT(CountMemTier(s, ids, Tier::kDisk), 0u);  // host full: straight to RocksDB
  EXPECT_GT(tiers_->host_used(), 0u);
  std::string payload;
  const auto disk_id = *std::find_if(ids.begin(), ids.end(), [&](uint64_t id) {
    return s->memory()->BlockTier(id) == Tier::kDisk;
  });
  ASSERT_TRUE(store_->GetMemorySpill("acme", 95, disk_id, &payload).ok());
  // Dropping single blocks frees their tier too.
  const std::vector<uint64_t> drop = {disk_id};
  ASSERT_TRUE(s->memory()->Drop(drop).ok());
  EXPECT_EQ(store_->GetMemorySpill("acme", 95, disk_id, &payload).code(), StatusCode::kNotFound);
  sessions_.clear();
  EXPECT_EQ(pool_->allocator().allocated_bytes(), 0u);
  EXPECT_EQ(pool_->allocator().live_blocks(), 0u);
  EXPECT_EQ(tiers_->host_used(), 0u);
  ASSERT_TRUE(store_->Compact().ok());
  EXPECT_LE(store_->LiveDataBytes(), disk_base + 64 * 1024);
  EXPECT_EQ(store_->GetMemorySpill("acme", 95, ids[0], &payload).code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvmem
