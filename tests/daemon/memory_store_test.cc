// MemoryStore in process: gates against brute force, the linear scorer from a safetensors file,
// all-or-nothing puts and drops under injected journal failures and a full pool, limits.
#include "daemon/memory_store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>

#include "common/tensor_file.h"
#include "daemon/kv_pool.h"
#include "daemon/memory_scorer.h"

namespace kvmem {
namespace {

constexpr uint32_t kDg = 12, kRows = 2, kDm = 4;

MemoryOptions Opts() {
  MemoryOptions o;
  o.gate_dim = kDg;
  o.payload_rows = kRows;
  o.payload_dim = kDm;
  o.payload_dtype = DType::kF32;
  return o;
}

struct Blocks {
  std::vector<float> keys, payloads;
  std::vector<uint64_t> starts, ends;
  NewMemoryBlocks View() const {
    NewMemoryBlocks b;
    b.n = static_cast<uint32_t>(starts.size());
    b.gate_keys = keys.data();
    b.payloads = reinterpret_cast<const uint8_t*>(payloads.data());
    b.span_starts = starts;
    b.span_ends = ends;
    return b;
  }
};

Blocks Make(std::mt19937_64& rng, uint32_t n) {
  std::normal_distribution<float> g(0.f, 1.f);
  Blocks b;
  for (uint32_t i = 0; i < n * kDg; ++i) b.keys.push_back(g(rng));
  for (uint32_t i = 0; i < n * kRows * kDm; ++i) b.payloads.push_back(g(rng));
  for (uint32_t i = 0; i < n; ++i) {
    b.starts.push_back(i * 10);
    b.ends.push_back(i * 10 + 10);
  }
  return b;
}

// Fails LogPut / LogDrop while `fail` is set.
class FlakyJournal final : public MemoryJournal {
 public:
  explicit FlakyJournal(bool* fail) : fail_(fail) {}
  Status LogPut(std::span<const MemoryBlockRecord> blocks) override {
    if (*fail_) return Unavailable("injected journal failure");
    puts += blocks.size();
    return Status::OK();
  }
  Status LogDrop(std::span<const uint64_t> ids) override {
    if (*fail_) return Unavailable("injected journal failure");
    drops += ids.size();
    return Status::OK();
  }
  Status ReadPayload(uint64_t, uint8_t*) const override { return Unimplemented("no disk copy"); }
  size_t puts = 0, drops = 0;

 private:
  bool* fail_;
};

std::unique_ptr<KVPool> Pool(uint64_t bytes) {
  auto p = CreateHostPool({bytes, 64ull << 10});
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return std::move(*p);
}

TEST(MemoryStoreTest, GatesMatchBruteForceAndPayloadsRoundTrip) {
  auto pool = Pool(16ull << 20);
  MemoryStore m(Opts(), pool.get(), nullptr);
  std::mt19937_64 rng(1);
  const Blocks b = Make(rng, 300);
  auto ids = m.Put(b.View(), 1000);
  ASSERT_TRUE(ids.ok()) << ids.status().ToString();
  EXPECT_EQ(ids->front(), 1u);
  EXPECT_EQ(m.blocks(), 300u);
  EXPECT_EQ(m.bytes(), 300 * pool->allocator().ReservedBytes(kRows * kDm * 4));
  std::normal_distribution<float> g(0.f, 1.f);
  for (int t = 0; t < 30; ++t) {
    std::vector<float> q(kDg);
    for (auto& v : q) v = g(rng);
    std::vector<std::pair<double, uint64_t>> ref;
    for (uint32_t i = 0; i < 300; ++i) {
      double s = 0;
      for (uint32_t d = 0; d < kDg; ++d) s += double{q[d]} * b.keys[i * kDg + d];
      ref.push_back({-s, (*ids)[i]});
    }
    std::sort(ref.begin(), ref.end());
    for (MemoryGate gate : {MemoryGate::kTreeExact, MemoryGate::kLinearScan, MemoryGate::kDefault}) {
      auto sel = m.Select(q, 7, gate, 0);
      ASSERT_TRUE(sel.ok());
      ASSERT_EQ(sel->ids.size(), 7u);
      for (size_t j = 0; j < 7; ++j) EXPECT_EQ(sel->ids[j], ref[j].second) << MemoryGateName(gate);
      EXPECT_TRUE(sel->exact);
    }
  }
  std::vector<float> out(kRows * kDm);
  ASSERT_TRUE(m.ReadPayload((*ids)[42], out.data()).ok());
  EXPECT_TRUE(std::equal(out.begin(), out.end(), b.payloads.begin() + 42 * kRows * kDm));
  EXPECT_EQ(m.ReadPayload(9999, out.data()).code(), StatusCode::kNotFound);
  EXPECT_EQ(m.Select(std::vector<float>(kDg, 1.f), 3, MemoryGate::kScorer, 0).status().code(),
            StatusCode::kFailedPrecondition);
}

TEST(MemoryStoreTest, FailedPutsAndDropsChangeNothing) {
  auto pool = Pool(1ull << 20);  // 16 slabs of 64 KiB
  MemoryStore m(Opts(), pool.get(), nullptr);
  bool fail = false;
  auto journal = std::make_unique<FlakyJournal>(&fail);
  FlakyJournal* j = journal.get();
  m.AttachJournal(std::move(journal));
  std::mt19937_64 rng(2);
  ASSERT_TRUE(m.Put(Make(rng, 10).View(), 1000).ok());
  const uint64_t bytes = m.bytes(), allocated = pool->allocator().allocated_bytes();
  // The journal fails: nothing stored, no pool block leaked, no id used.
  fail = true;
  EXPECT_EQ(m.Put(Make(rng, 5).View(), 1000).status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(m.Drop(std::vector<uint64_t>{1, 2}).code(), StatusCode::kUnavailable);
  EXPECT_EQ(m.blocks(), 10u);
  EXPECT_EQ(m.bytes(), bytes);
  EXPECT_EQ(pool->allocator().allocated_bytes(), allocated);
  fail = false;
  auto more = m.Put(Make(rng, 1).View(), 1000);
  ASSERT_TRUE(more.ok());
  EXPECT_EQ(more->front(), 11u);
  // Over the limit, or more than the pool holds: refused whole.
  EXPECT_EQ(m.Put(Make(rng, 5).View(), 12).status().code(), StatusCode::kResourceExhausted);
  const Blocks huge = Make(rng, 40000);  // 40000 x 32 B reserved > 1 MiB
  EXPECT_EQ(m.Put(huge.View(), 1u << 20).status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(m.blocks(), 11u);
  EXPECT_EQ(pool->allocator().allocated_bytes(), allocated + pool->allocator().ReservedBytes(32));
  EXPECT_EQ(j->puts, 11u);
  // Drops: a missing or repeated id refuses the whole request.
  EXPECT_EQ(m.Drop(std::vector<uint64_t>{1, 77}).code(), StatusCode::kNotFound);
  EXPECT_EQ(m.Drop(std::vector<uint64_t>{1, 1}).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(m.Drop(std::vector<uint64_t>{1, 2}).ok());
  EXPECT_EQ(m.blocks(), 9u);
  EXPECT_EQ(j->drops, 2u);
  EXPECT_EQ(m.Info(1).status().code(), StatusCode::kNotFound);
}

TEST(MemoryStoreTest, BadBlocksAndOptions) {
  auto pool = Pool(4ull << 20);
  MemoryStore m(Opts(), pool.get(), nullptr);
  std::mt19937_64 rng(3);
  Blocks b = Make(rng, 4);
  b.keys[5] = INFINITY;
  EXPECT_EQ(m.Put(b.View(), 100).status().code(), StatusCode::kInvalidArgument);
  b = Make(rng, 4);
  b.ends[1] = 0;
  EXPECT_EQ(m.Put(b.View(), 100).status().code(), StatusCode::kInvalidArgument);
  b = Make(rng, 4);
  NewMemoryBlocks v = b.View();
  v.labels = {"a", "b"};
  EXPECT_EQ(m.Put(v, 100).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.blocks(), 0u);

  MemoryOptions o = Opts();
  EXPECT_TRUE(ValidateMemoryOptions(o).ok());
  EXPECT_TRUE(ValidateMemoryOptions(MemoryOptions{}).ok());  // disabled
  o.payload_dim = 0;
  EXPECT_FALSE(ValidateMemoryOptions(o).ok());
  o = Opts();
  o.payload_rows = 1 << 20;
  o.payload_dim = 1 << 10;  // 4 GiB payloads
  EXPECT_FALSE(ValidateMemoryOptions(o).ok());
  o = Opts();
  o.default_gate = MemoryGate::kDefault;
  EXPECT_FALSE(ValidateMemoryOptions(o).ok());
  MemoryOptions off;
  off.payload_rows = 2;  // geometry without a gate key
  EXPECT_FALSE(ValidateMemoryOptions(off).ok());
}

TEST(MemoryStoreTest, LinearScorerIsExactThroughTheTree) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("kvmem-scorer-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::mt19937_64 rng(4);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> wk(kDg), wqk(kDg), wq(kDg);
  for (auto* w : {&wk, &wqk, &wq})
    for (auto& x : *w) x = g(rng);
  const float bias = -1.5f;
  const std::string path = (dir / "linear.safetensors").string();
  ASSERT_TRUE(WriteSafetensors(path, {{"w_key", FileDType::kF32, {kDg}, wk.data()},
                                      {"w_query_key", FileDType::kF32, {kDg}, wqk.data()},
                                      {"w_query", FileDType::kF32, {kDg}, wq.data()},
                                      {"bias", FileDType::kF32, {}, &bias}})
                  .ok());
  auto scorer = LoadMemoryScorer(path, kDg);
  ASSERT_TRUE(scorer.ok()) << scorer.status().ToString();
  EXPECT_NE((*scorer)->Describe().find("linear"), std::string::npos);
  // Wrong dimension and missing weights are named.
  auto wrong = LoadMemoryScorer(path, kDg + 1);
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("w_key"), std::string::npos);
  const std::string empty = (dir / "empty.safetensors").string();
  ASSERT_TRUE(WriteSafetensors(empty, {{"unrelated", FileDType::kF32, {kDg}, wk.data()}}).ok());
  EXPECT_EQ(LoadMemoryScorer(empty, kDg).status().code(), StatusCode::kInvalidArgument);
  // Session-named files stay inside the configured directory.
  EXPECT_EQ(ResolveScorerPath("", "a.safetensors").status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ResolveScorerPath("/x", "../a").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ResolveScorerPath("/x", "/etc/passwd").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*ResolveScorerPath("/x", "s/a.safetensors"), "/x/s/a.safetensors");

  auto pool = Pool(16ull << 20);
  MemoryStore m(Opts(), pool.get(), *scorer);
  const Blocks b = Make(rng, 500);
  auto ids = m.Put(b.View(), 1000);
  ASSERT_TRUE(ids.ok());
  for (int t = 0; t < 20; ++t) {
    std::vector<float> q(kDg);
    for (auto& v : q) v = g(rng);
    std::vector<std::pair<double, uint64_t>> ref;
    for (uint32_t i = 0; i < 500; ++i) {
      double s = bias;
      for (uint32_t d = 0; d < kDg; ++d) {
        const double k = b.keys[i * kDg + d];
        s += double{wk[d]} * k + double{wqk[d]} * q[d] * k + double{wq[d]} * q[d];
      }
      ref.push_back({-s, (*ids)[i]});
    }
    std::sort(ref.begin(), ref.end());
    auto sel = m.Select(q, 5, MemoryGate::kScorer, 0);
    ASSERT_TRUE(sel.ok());
    EXPECT_TRUE(sel->exact);
    for (size_t j = 0; j < 5; ++j) {
      EXPECT_EQ(sel->ids[j], ref[j].second);
      EXPECT_NEAR(sel->scores[j], -ref[j].first, 1e-4 * (1 + std::abs(ref[j].first)));
    }
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvmem
