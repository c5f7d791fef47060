// Memory blocks through a real kvmemd: put / select (every gate) / get / list / drop, payload
// bytes in the session's bytes, bad input, a loaded bilinear scorer, and durable blocks that
// survive kill -9.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include "client/client.h"
#include "common/tensor_file.h"
#include "daemon/chunk_store.h"
#include "testing/daemon_process.h"
#include "testing/reference.h"

#include <nlohmann/json.hpp>

namespace kvmem {
namespace {

using client::Client;
using client::MemoryGate;
using client::Profile;
using client::TensorView;
using testing::DaemonProcess;
using testing::Kvmemctl;

constexpr uint32_t kDg = 24, kRows = 2, kDm = 8;

class MemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("kvmem-mem-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    client_.reset();
    daemon_.reset();
    std::filesystem::remove_all(dir_);
  }
  void Start(std::vector<std::string> extra = {}) {
    client_.reset();
    daemon_.reset();
    std::vector<std::string> args = {"--data-dir", (dir_ / "data").string(), "--executors", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    daemon_ = std::make_unique<DaemonProcess>(args);
    ASSERT_TRUE(daemon_->ready()) << "kvmemd did not start";
    client::ClientOptions o;
    o.request_timeout_ms = 5000;
    auto c = Client::Connect(daemon_->address(), o);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    client_ = std::move(*c);
  }
  static Profile Prof() { return Profile{1, 2, 1, 16, DType::kBF16, {}, {}, "mem"}; }
  static client::SessionOptions WithMemory(bool durable = false, std::string scorer = "") {
    client::SessionOptions o;
    o.durable = durable;
    o.memory.gate_dim = kDg;
    o.memory.payload_rows = kRows;
    o.memory.payload_dim = kDm;
    o.memory.payload_dtype = DType::kF32;
    o.memory.scorer_file = std::move(scorer);
    return o;
  }

  // n random blocks: clustered keys, distinct payloads, spans and labels.
  struct Blocks {
    std::vector<float> keys, payloads;
    std::vector<uint64_t> starts, ends;
    std::vector<std::string> labels;
  };
  static Blocks MakeBlocks(std::mt19937_64& rng, uint32_t n, uint64_t first_token) {
    std::normal_distribution<float> g(0.f, 1.f);
    Blocks b;
    std::vector<float> centres(4 * kDg);
    for (auto& v : centres) v = g(rng);
    for (uint32_t i = 0; i < n; ++i) {
      const float* c = &centres[(rng() % 4) * kDg];
      for (uint32_t d = 0; d < kDg; ++d) b.keys.push_back(c[d] + 0.4f * g(rng));
      for (uint32_t j = 0; j < kRows * kDm; ++j) b.payloads.push_back(g(rng));
      b.starts.push_back(first_token + 4096ull * i);
      b.ends.push_back(first_token + 4096ull * (i + 1));
      b.labels.push_back("chunk-" + std::to_string(first_token / 4096 + i));
    }
    return b;
  }
  Result<client::PutMemoryResult> Put(uint64_t id, const Blocks& b) {
    const uint64_t n = b.starts.size();
    client::MemoryBlocksToPut p;
    p.gate_keys = TensorView{b.keys.data(), DType::kF32, {n, kDg}};
    p.payloads = TensorView{b.payloads.data(), DType::kF32, {n, kRows, kDm}};
    p.span_starts = b.starts;
    p.span_ends = b.ends;
    p.labels = b.labels;
    return client_->PutMemoryBlocks(id, p);
  }
  Result<client::MemorySelection> Select(uint64_t id, const std::vector<float>& q, uint32_t k,
                                         MemoryGate gate, uint32_t budget = 0) {
    return client_->SelectMemory(id, TensorView{q.data(), DType::kF32, {kDg}}, k, gate, budget);
  }
  static std::vector<float> Query(std::mt19937_64& rng, const Blocks& b) {
    std::normal_distribution<float> g(0.f, 1.f);
    const size_t i = rng() % b.starts.size();
    std::vector<float> q(kDg);
    for (uint32_t d = 0; d < kDg; ++d) q[d] = b.keys[i * kDg + d] + 0.5f * g(rng);
    return q;
  }
  // Reference top-k by q·k in double over the live blocks (ids -> row of b).
  static std::vector<uint64_t> Reference(const Blocks& b, const std::map<uint64_t, size_t>& live,
                                         const std::vector<float>& q, uint32_t k) {
    std::vector<std::pair<double, uint64_t>> s;
    for (const auto& [id, row] : live) {
      double v = 0;
      for (uint32_t d = 0; d < kDg; ++d) v += double{q[d]} * b.keys[row * kDg + d];
      s.push_back({-v, id});
    }
    std::sort(s.begin(), s.end());
    std::vector<uint64_t> out;
    for (size_t i = 0; i < std::min<size_t>(k, s.size()); ++i) out.push_back(s[i].second);
    return out;
  }

  std::filesystem::path dir_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
};

TEST_F(MemoryTest, PutSelectGetListDrop) {
  Start();
  auto id = client_->CreateSession(Prof(), WithMemory());
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  const uint64_t bytes_before = client_->SessionInfo(*id)->bytes;
  std::mt19937_64 rng(7);
  const Blocks b = MakeBlocks(rng, 600, 0);
  auto put = Put(*id, b);
  ASSERT_TRUE(put.ok()) << put.status().ToString();
  ASSERT_EQ(put->ids.size(), 600u);
  EXPECT_EQ(put->blocks, 600u);
  std::map<uint64_t, size_t> live;
  for (size_t i = 0; i < put->ids.size(); ++i) live[put->ids[i]] = i;
  ASSERT_EQ(live.size(), 600u);
  // Payload bytes count in the session's bytes (pool-reserved, so at least the raw size).
  const uint64_t raw = 600ull * kRows * kDm * 4;
  EXPECT_GE(put->bytes, raw);
  EXPECT_EQ(client_->SessionInfo(*id)->bytes, bytes_before + put->bytes);
  EXPECT_EQ(client_->SessionInfo(*id)->memory_blocks, 600u);
  EXPECT_EQ(client_->SessionInfo(*id)->memory_bytes, put->bytes);

  for (int i = 0; i < 40; ++i) {
    const std::vector<float> q = Query(rng, b);
    const uint32_t k = 1 + static_cast<uint32_t>(rng() % 12);
    auto exact = Select(*id, q, k, MemoryGate::kTreeExact);
    auto scan = Select(*id, q, k, MemoryGate::kLinearScan);
    auto dflt = Select(*id, q, k, MemoryGate::kDefault);
    auto all_leaves = Select(*id, q, k, MemoryGate::kTreeBudget, 100000);
    ASSERT_TRUE(exact.ok() && scan.ok() && dflt.ok() && all_leaves.ok()) << exact.status().ToString();
    EXPECT_EQ(exact->ids, scan->ids);
    EXPECT_EQ(exact->scores, scan->scores);
    EXPECT_EQ(dflt->ids, exact->ids);  // default gate: tree_exact
    EXPECT_EQ(all_leaves->ids, exact->ids);
    EXPECT_TRUE(exact->exact);
    EXPECT_EQ(exact->ids, Reference(b, live, q, k));
    // Payloads and metadata come back in rank order.
    ASSERT_EQ(exact->payloads.size(), size_t{k} * kRows * kDm * 4);
    ASSERT_EQ(exact->blocks.size(), k);
    for (uint32_t j = 0; j < k; ++j) {
      const size_t row = live.at(exact->ids[j]);
      EXPECT_EQ(0, std::memcmp(exact->payloads.data() + size_t{j} * kRows * kDm * 4,
                               &b.payloads[row * kRows * kDm], kRows * kDm * 4));
      EXPECT_EQ(exact->blocks[j].id, exact->ids[j]);
      EXPECT_EQ(exact->blocks[j].span_start, b.starts[row]);
      EXPECT_EQ(exact->blocks[j].label, b.labels[row]);
    }
  }
  // Budgeted: at most the leaf budget, never more keys than exist.
  auto one_leaf = Select(*id, Query(rng, b), 5, MemoryGate::kTreeBudget, 1);
  ASSERT_TRUE(one_leaf.ok());
  EXPECT_EQ(one_leaf->leaves_visited, 1u);
  EXPECT_EQ(one_leaf->ids.size(), 5u);

  // Get: payloads and gate keys in request order.
  const std::vector<uint64_t> want = {put->ids[5], put->ids[0], put->ids[599]};
  auto got = client_->GetMemoryBlocks(*id, want, /*return_gate_keys=*/true);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_EQ(got->blocks.size(), 3u);
  for (size_t j = 0; j < 3; ++j) {
    const size_t row = live.at(want[j]);
    EXPECT_EQ(got->blocks[j].id, want[j]);
    EXPECT_EQ(got->blocks[j].span_end, b.ends[row]);
    EXPECT_EQ(0, std::memcmp(got->payloads.data() + j * kRows * kDm * 4,
                             &b.payloads[row * kRows * kDm], kRows * kDm * 4));
    EXPECT_TRUE(std::equal(b.keys.begin() + row * kDg, b.keys.begin() + (row + 1) * kDg,
                           got->gate_keys.begin() + j * kDg));
  }

  // List pages through ids in order.
  auto page1 = client_->ListMemoryBlocks(*id, 0, 250);
  ASSERT_TRUE(page1.ok());
  ASSERT_EQ(page1->blocks.size(), 250u);
  EXPECT_EQ(page1->total_blocks, 600u);
  EXPECT_EQ(page1->options.gate_dim, kDg);
  auto page3 = client_->ListMemoryBlocks(*id, put->ids[499], 250);
  ASSERT_TRUE(page3.ok());
  ASSERT_EQ(page3->blocks.size(), 100u);
  EXPECT_EQ(page3->blocks.front().id, put->ids[500]);

  // Drop: gone from select, get and list; bytes returned.
  std::vector<uint64_t> drop(put->ids.begin(), put->ids.begin() + 300);
  auto left = client_->DropMemoryBlocks(*id, drop);
  ASSERT_TRUE(left.ok()) << left.status().ToString();
  EXPECT_EQ(*left, 300u);
  for (uint64_t d : drop) live.erase(d);
  for (int i = 0; i < 20; ++i) {
    const std::vector<float> q = Query(rng, b);
    auto r = Select(*id, q, 10, MemoryGate::kTreeExact);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->ids, Reference(b, live, q, 10));
  }
  EXPECT_EQ(client_->GetMemoryBlocks(*id, std::vector<uint64_t>{drop[3]}).status().code(),
            StatusCode::kNotFound);
  EXPECT_EQ(client_->ListMemoryBlocks(*id)->total_blocks, 300u);
  EXPECT_EQ(client_->SessionInfo(*id)->bytes, bytes_before + put->bytes / 2);
  // New ids never reuse dropped ones.
  auto more = Put(*id, MakeBlocks(rng, 3, 1 << 30));
  ASSERT_TRUE(more.ok());
  EXPECT_GT(more->ids.front(), put->ids.back());
}

TEST_F(MemoryTest, BadInputIsRefusedAndNothingChanges) {
  Start();
  std::mt19937_64 rng(3);
  auto plain = client_->CreateSession(Prof());
  ASSERT_TRUE(plain.ok());
  const Blocks b = MakeBlocks(rng, 4, 0);
  auto no_mem = Put(*plain, b);
  EXPECT_EQ(no_mem.status().code(), StatusCode::kFailedPrecondition) << no_mem.status().ToString();
  EXPECT_NE(no_mem.status().message().find("keeps no memory blocks"), std::string::npos);

  client::SessionOptions bad = WithMemory();
  bad.memory.payload_rows = 0;
  EXPECT_EQ(client_->CreateSession(Prof(), bad).status().code(), StatusCode::kInvalidArgument);
  bad = WithMemory();
  bad.memory.scorer_file = "w.safetensors";  // this daemon has no memory_scorer_dir
  EXPECT_EQ(client_->CreateSession(Prof(), bad).status().code(), StatusCode::kFailedPrecondition);

  auto id = client_->CreateSession(Prof(), WithMemory());
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(Put(*id, b).ok());
  auto expect = [&](const Status& s, StatusCode code, const char* needle) {
    EXPECT_EQ(s.code(), code) << s.ToString();
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.ToString();
  };
  client::MemoryBlocksToPut p;
  p.gate_keys = TensorView{b.keys.data(), DType::kF32, {4, kDg - 1}};  // wrong key dim
  p.payloads = TensorView{b.payloads.data(), DType::kF32, {4, kRows, kDm}};
  p.span_starts = b.starts;
  p.span_ends = b.ends;
  expect(client_->PutMemoryBlocks(*id, p).status(), StatusCode::kInvalidArgument, "gate_keys");
  p.gate_keys = TensorView{b.keys.data(), DType::kF32, {4, kDg}};
  p.payloads = TensorView{b.payloads.data(), DType::kF16, {4, kRows, kDm}};  // wrong dtype
  expect(client_->PutMemoryBlocks(*id, p).status(), StatusCode::kInvalidArgument, "payloads");
  p.payloads = TensorView{b.payloads.data(), DType::kF32, {4, kRows, kDm}};
  std::vector<float> nan_keys = b.keys;
  nan_keys[kDg + 3] = std::nanf("");
  p.gate_keys = TensorView{nan_keys.data(), DType::kF32, {4, kDg}};
  expect(client_->PutMemoryBlocks(*id, p).status(), StatusCode::kInvalidArgument, "NaN");
  p.gate_keys = TensorView{b.keys.data(), DType::kF32, {4, kDg}};
  p.span_ends = {1, 2, 3};
  expect(client_->PutMemoryBlocks(*id, p).status(), StatusCode::kInvalidArgument, "span");
  p.span_ends = b.ends;
  p.span_ends[2] = 0;  // end before start
  expect(client_->PutMemoryBlocks(*id, p).status(), StatusCode::kInvalidArgument, "span start");
  p.span_ends = b.ends;
  p.labels = {"a", std::string(5000, 'x'), "c", "d"};
  expect(client_->PutMemoryBlocks(*id, p).status(), StatusCode::kInvalidArgument, "label");
  EXPECT_EQ(client_->ListMemoryBlocks(*id)->total_blocks, 4u);  // nothing added

  std::vector<float> q(kDg, 0.5f);
  expect(Select(*id, q, 0, MemoryGate::kTreeExact).status(), StatusCode::kInvalidArgument, "k");
  std::vector<float> q_long(kDg + 1, 0.5f);  // one element too many (and backed by memory)
  expect(client_->SelectMemory(*id, TensorView{q_long.data(), DType::kF32, {kDg + 1}}, 3).status(),
         StatusCode::kInvalidArgument, "query");
  q[1] = INFINITY;
  expect(Select(*id, q, 3, MemoryGate::kTreeExact).status(), StatusCode::kInvalidArgument, "NaN or Inf");
  q[1] = 0.5f;
  expect(Select(*id, q, 3, MemoryGate::kScorer).status(), StatusCode::kFailedPrecondition, "scorer");
  expect(Select(*id + 1, q, 3, MemoryGate::kTreeExact).status(), StatusCode::kNotFound, "session");
  // bf16 queries are accepted.
  std::vector<uint16_t> qb(kDg, FloatToBF16(0.5f));
  EXPECT_TRUE(client_->SelectMemory(*id, TensorView{qb.data(), DType::kBF16, {kDg}}, 2).ok());

  // Drop is all or nothing.
  auto listed = client_->ListMemoryBlocks(*id);
  const uint64_t first = listed->blocks[0].id;
  expect(client_->DropMemoryBlocks(*id, std::vector<uint64_t>{first, 999999}).status(),
         StatusCode::kNotFound, "999999");
  expect(client_->DropMemoryBlocks(*id, std::vector<uint64_t>{first, first}).status(),
         StatusCode::kInvalidArgument, "twice");
  EXPECT_EQ(client_->ListMemoryBlocks(*id)->total_blocks, 4u);
  // The daemon carries on.
  EXPECT_TRUE(client_->Ping().ok());
}

TEST_F(MemoryTest, BilinearScorerFromSafetensors) {
  const std::filesystem::path scorers = dir_ / "scorers";
  std::filesystem::create_directories(scorers);
  std::mt19937_64 rng(11);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> W(kDg * kDg), v(kDg), u(kDg);
  for (auto& x : W) x = 0.3f * g(rng);
  for (auto& x : v) x = g(rng);
  for (auto& x : u) x = g(rng);
  const float bias = 0.75f;
  ASSERT_TRUE(WriteSafetensors((scorers / "bilinear.safetensors").string(),
                               {{"W", FileDType::kF32, {kDg, kDg}, W.data()},
                                {"v", FileDType::kF32, {kDg}, v.data()},
                                {"u", FileDType::kF32, {kDg}, u.data()},
                                {"bias", FileDType::kF32, {1}, &bias}})
                  .ok());
  std::vector<float> bad(kDg + 1, 1.f);
  ASSERT_TRUE(WriteSafetensors((scorers / "wrong_dim.safetensors").string(),
                               {{"w_key", FileDType::kF32, {kDg + 1}, bad.data()}})
                  .ok());
  const std::filesystem::path cfg = dir_ / "kvmemd.json";
  std::ofstream(cfg) << "{\"memory_scorer_dir\": \"" << scorers.string() << "\"}\n";
  Start({"--config", cfg.string()});

  auto wrong = client_->CreateSession(Prof(), WithMemory(false, "wrong_dim.safetensors"));
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument) << wrong.status().ToString();
  EXPECT_NE(wrong.status().message().find("w_key"), std::string::npos);
  EXPECT_EQ(client_->CreateSession(Prof(), WithMemory(false, "../x.safetensors")).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->CreateSession(Prof(), WithMemory(false, "missing.safetensors")).status().code(),
            StatusCode::kNotFound);

  auto id = client_->CreateSession(Prof(), WithMemory(false, "bilinear.safetensors"));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  const Blocks b = MakeBlocks(rng, 400, 0);
  auto put = Put(*id, b);
  ASSERT_TRUE(put.ok());
  for (int i = 0; i < 20; ++i) {
    const std::vector<float> q = Query(rng, b);
    auto r = Select(*id, q, 6, MemoryGate::kScorer);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(r->exact);
    // Reference in double: qᵀ W k + v·k + u·q + bias.
    std::vector<std::pair<double, uint64_t>> ref;
    for (size_t row = 0; row < 400; ++row) {
      const float* k = &b.keys[row * kDg];
      double s = bias;
      for (uint32_t a = 0; a < kDg; ++a) {
        s += double{u[a]} * q[a] + double{v[a]} * k[a];
        for (uint32_t c = 0; c < kDg; ++c) s += double{q[a]} * W[a * kDg + c] * k[c];
      }
      ref.push_back({s, put->ids[row]});
    }
    ASSERT_GE(r->ids.size(), 6u);
    testing::ExpectTopKMatchesExact(std::vector<uint64_t>(r->ids.begin(), r->ids.begin() + 6),
                                    std::vector<float>(r->scores.begin(), r->scores.begin() + 6),
                                    std::move(ref), [](double s) { return 1e-3 * (1 + std::fabs(s)); });
  }
}

TEST_F(MemoryTest, DurableBlocksSurviveKill9) {
  Start();
  auto id = client_->CreateSession(Prof(), WithMemory(/*durable=*/true));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  std::mt19937_64 rng(5);
  Blocks all;
  std::map<uint64_t, size_t> live;
  for (int batch = 0; batch < 5; ++batch) {
    const Blocks b = MakeBlocks(rng, 150, 150ull * 4096 * batch);
    auto put = Put(*id, b);
    ASSERT_TRUE(put.ok()) << put.status().ToString();
    for (size_t i = 0; i < put->ids.size(); ++i) live[put->ids[i]] = all.starts.size() + i;
    all.keys.insert(all.keys.end(), b.keys.begin(), b.keys.end());
    all.payloads.insert(all.payloads.end(), b.payloads.begin(), b.payloads.end());
    all.starts.insert(all.starts.end(), b.starts.begin(), b.starts.end());
    all.ends.insert(all.ends.end(), b.ends.begin(), b.ends.end());
    all.labels.insert(all.labels.end(), b.labels.begin(), b.labels.end());
  }
  std::vector<uint64_t> drop;
  for (const auto& [bid, row] : live) {
    if (bid % 3 == 0) drop.push_back(bid);
  }
  ASSERT_TRUE(client_->DropMemoryBlocks(*id, drop).ok());
  for (uint64_t d : drop) live.erase(d);
  std::vector<std::vector<float>> queries;
  std::vector<client::MemorySelection> before;
  for (int i = 0; i < 10; ++i) {
    queries.push_back(Query(rng, all));
    auto r = Select(*id, queries.back(), 8, MemoryGate::kTreeExact);
    ASSERT_TRUE(r.ok());
    before.push_back(std::move(*r));
  }
  const uint64_t max_id = live.size() + drop.size();  // every id handed out (1..750)
  ASSERT_TRUE(std::count(drop.begin(), drop.end(), max_id) == 1);  // the highest one is dropped

  client_.reset();
  ::kill(daemon_->pid(), SIGKILL);
  ::waitpid(daemon_->pid(), nullptr, 0);
  Start();

  auto listed = client_->ListMemoryBlocks(*id, 0, 100000);
  ASSERT_TRUE(listed.ok()) << listed.status().ToString();
  ASSERT_EQ(listed->total_blocks, live.size());
  size_t j = 0;
  for (const auto& [bid, row] : live) {
    ASSERT_EQ(listed->blocks[j].id, bid);
    EXPECT_EQ(listed->blocks[j].span_start, all.starts[row]);
    EXPECT_EQ(listed->blocks[j].label, all.labels[row]);
    ++j;
  }
  for (size_t i = 0; i < queries.size(); ++i) {
    auto r = Select(*id, queries[i], 8, MemoryGate::kTreeExact);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->ids, before[i].ids);
    EXPECT_EQ(r->scores, before[i].scores);
    EXPECT_EQ(r->payloads, before[i].payloads);
  }
  auto verify = client_->VerifySession(*id);
  ASSERT_TRUE(verify.ok());
  EXPECT_TRUE(verify->ok);
  // Ids keep increasing after the restart, past dropped ones too; drops persist.
  auto more = Put(*id, MakeBlocks(rng, 2, 1 << 30));
  ASSERT_TRUE(more.ok()) << more.status().ToString();
  EXPECT_GT(more->ids.front(), max_id);
  EXPECT_EQ(client_->GetMemoryBlocks(*id, std::vector<uint64_t>{drop.front()}).status().code(),
            StatusCode::kNotFound);
  // Re-creating it with another memory geometry is refused, naming the field.
  client::SessionOptions other = WithMemory(true);
  other.memory.gate_dim = kDg + 8;
  auto conflict = client_->CreateSession(Prof(), other, *id);
  EXPECT_EQ(conflict.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(conflict.status().message().find("memory.gate_dim"), std::string::npos)
      << conflict.status().ToString();
  EXPECT_EQ(client_->CreateSession(Prof(), WithMemory(true), *id).status().code(),
            StatusCode::kAlreadyExists);
  // Dropping the session deletes its blocks from the store.
  ASSERT_TRUE(client_->DropSession(*id).ok());
  Start();
  EXPECT_EQ(client_->ListMemoryBlocks(*id).status().code(), StatusCode::kNotFound);
}


TEST_F(MemoryTest, KvmemctlMemoryCommands) {
  Start();
  const std::string addr = "--addr " + daemon_->address();
  int rc = -1;
  const std::string created = Kvmemctl(addr + " --json session create --layers 1 --q-heads 2 --kv-heads 1 "
                                       "--head-dim 16 --memory-gate-dim 4 --memory-rows 1 --memory-dim 2 "
                                       "--memory-dtype fp32", &rc);
  ASSERT_EQ(rc, 0) << created;
  const uint64_t sid = nlohmann::json::parse(created)["id"].get<uint64_t>();
  const std::string id = std::to_string(sid);
  // Keys and payloads as safetensors, spans as I64.
  const std::vector<float> keys = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0};
  const std::vector<float> pay = {1, 2, 3, 4, 5, 6};
  const std::vector<float> spans = {0, 10, 10, 20, 20, 30};
  const std::string kf = (dir_ / "keys.safetensors").string(), pf = (dir_ / "pay.safetensors").string(),
                    sf = (dir_ / "spans.safetensors").string();
  ASSERT_TRUE(WriteSafetensors(kf, {{"gate_keys", FileDType::kF32, {3, 4}, keys.data()}}).ok());
  ASSERT_TRUE(WriteSafetensors(pf, {{"payloads", FileDType::kBF16, {3, 1, 2}, pay.data()}}).ok());
  ASSERT_TRUE(WriteSafetensors(sf, {{"spans", FileDType::kF32, {3, 2}, spans.data()}}).ok());
  // Float spans are refused (token positions are integers).
  Kvmemctl(addr + " memory put " + id + " --keys " + kf + " --payloads " + pf + " --spans " + sf, &rc);
  EXPECT_EQ(rc, 1);
  const std::string put = Kvmemctl(addr + " --json memory put " + id + " --keys " + kf + " --payloads " + pf +
                                   " --labels a,b,c", &rc);
  ASSERT_EQ(rc, 0) << put;
  EXPECT_EQ(nlohmann::json::parse(put)["ids"], nlohmann::json({1, 2, 3}));
  const std::string sel = Kvmemctl(addr + " --json memory select " + id + " --query-values 0,2,1,0 --k 2", &rc);
  ASSERT_EQ(rc, 0) << sel;
  const auto js = nlohmann::json::parse(sel);
  ASSERT_EQ(js["blocks"].size(), 2u);
  EXPECT_EQ(js["blocks"][0]["id"], 2);
  EXPECT_EQ(js["blocks"][0]["label"], "b");
  EXPECT_EQ(js["blocks"][0]["score"], 2.0);
  EXPECT_EQ(js["blocks"][1]["id"], 3);
  EXPECT_TRUE(js["exact"].get<bool>());
  const std::string table = Kvmemctl(addr + " memory select " + id + " --query-values 0,2,1,0 --k 1 --gate linear", &rc);
  EXPECT_EQ(rc, 0);
  EXPECT_NE(table.find("SCORE"), std::string::npos) << table;
  EXPECT_EQ(Kvmemctl(addr + " --json memory drop " + id + " 2", &rc), "{\"blocks\":2,\"dropped\":1}\n");
  const auto listed = nlohmann::json::parse(Kvmemctl(addr + " --json memory list " + id, &rc));
  EXPECT_EQ(listed["total_blocks"], 2);
  EXPECT_EQ(listed["blocks"][1]["id"], 3);
  EXPECT_EQ(listed["gate_dim"], 4);
  // Errors: unknown block (1), usage (2).
  Kvmemctl(addr + " memory drop " + id + " 77", &rc);
  EXPECT_EQ(rc, 1);
  Kvmemctl(addr + " memory select " + id + " --k 2", &rc);
  EXPECT_EQ(rc, 2);
  auto got = client_->GetMemoryBlocks(sid, std::vector<uint64_t>{3});
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->payloads.size(), 8u);
  float v[2];
  std::memcpy(v, got->payloads.data(), 8);
  EXPECT_EQ(v[0], 5.f);  // bf16 in the file, fp32 in the session: exact for these values
  EXPECT_EQ(v[1], 6.f);
}

TEST_F(MemoryTest, DiskFullFailsMemoryWritesWithNothingChanged) {
  const std::string flag = (dir_ / "disk-full").string();
  Start({"--fault-fail-writes-flag", flag});
  auto id = client_->CreateSession(Prof(), WithMemory(/*durable=*/true));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  std::mt19937_64 rng(9);
  auto first = Put(*id, MakeBlocks(rng, 10, 0));
  ASSERT_TRUE(first.ok());
  const uint64_t bytes = client_->SessionInfo(*id)->bytes;
  std::ofstream(flag) << "full";
  auto failed = Put(*id, MakeBlocks(rng, 5, 1 << 20));
  ASSERT_EQ(failed.status().code(), StatusCode::kResourceExhausted) << failed.status().ToString();
  EXPECT_NE(failed.status().message().find("disk full"), std::string::npos);
  EXPECT_NE(failed.status().message().find("memory blocks"), std::string::npos);
  auto drop = client_->DropMemoryBlocks(*id, std::vector<uint64_t>{first->ids[0]});
  EXPECT_EQ(drop.status().code(), StatusCode::kResourceExhausted) << drop.status().ToString();
  EXPECT_EQ(client_->ListMemoryBlocks(*id)->total_blocks, 10u);
  EXPECT_EQ(client_->SessionInfo(*id)->bytes, bytes);  // the failed put's payloads were freed
  std::filesystem::remove(flag);
  auto second = Put(*id, MakeBlocks(rng, 5, 1 << 20));
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ(second->ids.front(), first->ids.back() + 1);  // the failed put used no ids
  client_.reset();
  ::kill(daemon_->pid(), SIGKILL);
  ::waitpid(daemon_->pid(), nullptr, 0);
  Start();
  EXPECT_EQ(client_->ListMemoryBlocks(*id)->total_blocks, 15u);
}

TEST_F(MemoryTest, CorruptStoredBlockIsNamedAndOtherSessionsServe) {
  Start();
  std::mt19937_64 rng(13);
  ASSERT_TRUE(client_->CreateSession(Prof(), WithMemory(true), 41).ok());
  ASSERT_TRUE(client_->CreateSession(Prof(), WithMemory(true), 42).ok());
  ASSERT_TRUE(Put(41, MakeBlocks(rng, 20, 0)).ok());
  ASSERT_TRUE(Put(42, MakeBlocks(rng, 20, 0)).ok());
  client_.reset();
  ASSERT_EQ(daemon_->Stop(), 0);
  {
    StoreOptions so;
    so.path = (dir_ / "data" / "db").string();
    auto store = ChunkStore::Open(so);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    ASSERT_TRUE((*store)->CorruptMemoryBlockForTest("default", 41, 7, 40).ok());
  }
  Start();
  EXPECT_EQ(client_->ListMemoryBlocks(42)->total_blocks, 20u);
  auto again = client_->CreateSession(Prof(), WithMemory(true), 41);
  ASSERT_EQ(again.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(again.status().message().find("memory block (tenant default, session 41, block 7)"),
            std::string::npos) << again.status().ToString();
  EXPECT_NE(again.status().message().find("checksum mismatch"), std::string::npos);
  auto v = client_->VerifySession(41);
  ASSERT_TRUE(v.ok());
  EXPECT_FALSE(v->ok);
  // Dropping it clears the stored blocks and the id.
  ASSERT_TRUE(client_->DropSession(41).ok());
  ASSERT_TRUE(client_->CreateSession(Prof(), WithMemory(true), 41).ok());
  EXPECT_EQ(client_->ListMemoryBlocks(41)->total_blocks, 0u);
}

// Issue 5: blocks live in the same tiers and quotas as chunks. A put is admitted against the
// tenant quota like AppendKV: refused (RESOURCE_EXHAUSTED naming the quota) when eviction
// cannot make room, admitted when evicting the tenant's least recently selected payloads
// can; evicted payloads are counted in the tier stats and come back, unchanged, when
// GetMemoryBlocks / SelectMemory return them.
TEST_F(MemoryTest, PutsAreAdmittedAgainstTheQuotaAndEvictedPayloadsComeBack) {
  const auto cfg = dir_ / "kvmemd.json";
  std::ofstream(cfg) << R"({"tenant_memory_quota": "64KiB"})";
  Start({"--config", cfg.string()});
  auto id = client_->CreateSession(Prof(), WithMemory());
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  std::mt19937_64 rng(21);
  const uint64_t pb = uint64_t{kRows} * kDm * 4;  // 64 bytes, one 64-byte pool slot each
  // 2000 payloads in one put (125 KiB): more than the quota with nothing to evict.
  const Blocks all = MakeBlocks(rng, 2000, 0);
  auto big = Put(*id, all);
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), StatusCode::kResourceExhausted) << big.status().ToString();
  EXPECT_NE(big.status().message().find("over its memory quota"), std::string::npos)
      << big.status().message();
  EXPECT_EQ(client_->SessionInfo(*id)->memory_blocks, 0u);
  // The same blocks in puts of 100: each one evicts the oldest payloads (spilled to RocksDB).
  std::vector<uint64_t> ids;
  for (uint32_t p = 0; p < 20; ++p) {
    Blocks part;
    part.keys.assign(all.keys.begin() + p * 100 * kDg, all.keys.begin() + (p + 1) * 100 * kDg);
    part.payloads.assign(all.payloads.begin() + p * 100 * kRows * kDm,
                         all.payloads.begin() + (p + 1) * 100 * kRows * kDm);
    part.starts.assign(all.starts.begin() + p * 100, all.starts.begin() + (p + 1) * 100);
    part.ends.assign(all.ends.begin() + p * 100, all.ends.begin() + (p + 1) * 100);
    part.labels.assign(all.labels.begin() + p * 100, all.labels.begin() + (p + 1) * 100);
    auto r = Put(*id, part);
    ASSERT_TRUE(r.ok()) << "put " << p << ": " << r.status().ToString();
    ids.insert(ids.end(), r->ids.begin(), r->ids.end());
  }
  auto info = client_->SessionInfo(*id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->memory_blocks, 2000u);
  EXPECT_LE(info->bytes, 64u << 10);
  EXPECT_GT(info->evicted_blocks, 0u);
  EXPECT_GT(info->disk_bytes, 0u);
  EXPECT_EQ(info->host_bytes, 0u);  // no host tier configured: evicted payloads went to RocksDB
  EXPECT_GE(info->memory_bytes + info->disk_bytes, 2000 * pb);
  // The first 100 were evicted first (least recently used); reading them fetches them back.
  const uint64_t fetched_before = info->fetched_blocks;
  auto got = client_->GetMemoryBlocks(*id, std::span(ids.data(), 100), /*return_gate_keys=*/true);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_EQ(got->payloads.size(), 100 * pb);
  EXPECT_EQ(0, std::memcmp(got->payloads.data(), all.payloads.data(), 100 * pb));
  EXPECT_EQ(got->gate_keys, std::vector<float>(all.keys.begin(), all.keys.begin() + 100 * kDg));
  info = client_->SessionInfo(*id);
  EXPECT_GE(info->fetched_blocks, fetched_before + 100);
  // Selections return the exact top-k with their payloads, from whatever tier held them.
  std::map<uint64_t, size_t> live;
  for (size_t i = 0; i < ids.size(); ++i) live[ids[i]] = i;
  for (int i = 0; i < 10; ++i) {
    const std::vector<float> q = Query(rng, all);
    auto sel = Select(*id, q, 8, MemoryGate::kTreeExact);
    ASSERT_TRUE(sel.ok()) << sel.status().ToString();
    EXPECT_EQ(sel->ids, Reference(all, live, q, 8));
    for (size_t j = 0; j < sel->ids.size(); ++j) {
      EXPECT_EQ(0, std::memcmp(sel->payloads.data() + j * pb,
                               &all.payloads[live.at(sel->ids[j]) * kRows * kDm], pb));
    }
  }
  // The next put evicts back under the quota (reads may exceed it, writes may not).
  auto more = Put(*id, MakeBlocks(rng, 10, 1u << 30));
  ASSERT_TRUE(more.ok()) << more.status().ToString();
  EXPECT_LE(client_->SessionInfo(*id)->bytes, 64u << 10);
}

}  // namespace
}  // namespace kvmem
