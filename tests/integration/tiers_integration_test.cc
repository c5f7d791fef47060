// Tiers against a real kvmemd (CPU backend): a tenant memory quota refuses a write that
// eviction cannot make room for, naming tenant, quota and need, and admits writes that
// eviction can make room for; Attend outputs are bit-identical after `kvmemctl session evict`
// and after the daemon evicted by itself; SessionInfo counts the fetch-backs; TTL expiry and
// Drop free the device tier.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "client/client.h"
#include "client/synthetic_stream.h"
#include "testing/daemon_process.h"
#include "testing/reference.h"

namespace kvmem {
namespace {

using client::AttendRequest;
using client::Client;
using client::Profile;
using client::SyntheticStream;
using client::TensorView;
using testing::DaemonProcess;

constexpr uint32_t L = 2, HQ = 4, HKV = 2, D = 32;
constexpr DType kDt = DType::kBF16;
constexpr uint64_t kBytesPerToken = uint64_t{L} * 2 * HKV * D * 2;  // K + V, every layer: 512

class TiersIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("kvmem-tiersit-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    client_.reset();
    daemon_.reset();
    std::filesystem::remove_all(dir_);
  }
  void Start(const std::string& config_json, std::vector<std::string> extra = {}) {
    const auto cfg = dir_ / "kvmemd.json";
    std::ofstream(cfg) << config_json;
    std::vector<std::string> args = {"--data-dir", (dir_ / "data").string(), "--executors", "1",
                                     "--config", cfg.string()};
    args.insert(args.end(), extra.begin(), extra.end());
    daemon_ = std::make_unique<DaemonProcess>(args);
    ASSERT_TRUE(daemon_->ready()) << "kvmemd did not start";
    auto c = Client::Connect(daemon_->address());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    client_ = std::move(*c);
  }
  static Profile Prof() { return Profile{L, HQ, HKV, D, kDt, {}, {}, "tiers"}; }
  Result<client::AppendResult> Append(uint64_t id, const SyntheticStream& s, uint64_t start, uint32_t n) {
    std::vector<uint8_t> k, v;
    s.Fill(start, n, &k, &v);
    return client_->AppendKV(id, TensorView{k.data(), kDt, {L, HKV, n, D}},
                             TensorView{v.data(), kDt, {L, HKV, n, D}}, s.Boundaries(start, n));
  }
  // Attention outputs (raw f32 bytes) for fixed queries on every layer, in `mode`.
  std::vector<std::vector<uint8_t>> Outputs(uint64_t id, client::Mode mode) {
    std::vector<std::vector<uint8_t>> outs;
    std::mt19937_64 rng(99);
    for (uint32_t l = 0; l < L; ++l) {
      auto q = testing::RandomTensor(rng, DType::kF32, HQ * D);
      AttendRequest req;
      req.layer = l;
      req.q = TensorView{q.data(), DType::kF32, {HQ, D}};
      req.mode = mode;
      req.out_dtype = DType::kF32;
      auto r = client_->Attend(id, req);
      EXPECT_TRUE(r.ok()) << r.status().ToString();
      outs.push_back(r.ok() ? r->out : std::vector<uint8_t>{});
    }
    return outs;
  }
  std::string Kvmemctl(const std::string& args) {
    const std::string cmd = testing::BinDir() + "/kvmemctl --addr " + daemon_->address() + " " + args;
    std::string out;
    FILE* p = ::popen(cmd.c_str(), "r");
    if (p == nullptr) return out;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    ::pclose(p);
    return out;
  }

  std::filesystem::path dir_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
};

TEST_F(TiersIntegrationTest, QuotaRefusesWhatEvictionCannotFreeAndAdmitsTheRest) {
  Start(R"({"tenant_memory_quota": "1MiB"})");
  SyntheticStream stream(7, L, HKV, D, kDt);
  client::SessionOptions o;
  o.mode = client::Mode::kIndex;
  o.recent_window = 64;
  ASSERT_TRUE(client_->CreateSession(Prof(), o, 1).ok());
  // 4096 tokens = 2 MiB in one write: more than the whole quota, eviction cannot help.
  auto big = Append(1, stream, 0, 4096);
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), StatusCode::kResourceExhausted) << big.status().ToString();
  const std::string& m = big.status().message();
  EXPECT_NE(m.find("tenant default"), std::string::npos) << m;
  EXPECT_NE(m.find("quota 1.0 MiB"), std::string::npos) << m;
  EXPECT_NE(m.find("needs 2."), std::string::npos) << m;  // 2 MiB + size-class rounding
  // The same tokens in 256-token writes: each one evicts the tenant's coldest blocks.
  uint64_t at = 0;
  for (int i = 0; i < 16; ++i, at += 256) {
    auto r = Append(1, stream, at, 256);
    ASSERT_TRUE(r.ok()) << "write " << i << ": " << r.status().ToString();
  }
  auto info = client_->SessionInfo(1);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens, 4096u);
  EXPECT_LE(info->bytes, 1ull << 20);
  EXPECT_GT(info->disk_bytes, 0u);
  EXPECT_GT(info->evicted_blocks, 0u);
  EXPECT_GE(info->bytes + info->disk_bytes, 4096 * kBytesPerToken - 64 * kBytesPerToken);
  // Dense attention over all of it fetches everything back (over quota while reading is
  // allowed: quotas are checked when a write is admitted) and matches the reference.
  const auto outs = Outputs(1, client::Mode::kDense);
  info = client_->SessionInfo(1);
  ASSERT_TRUE(info.ok());
  EXPECT_GT(info->fetched_blocks, 0u);
  EXPECT_EQ(info->disk_bytes, 0u);
  // The next write evicts back under the quota.
  {
    auto r = Append(1, stream, at, 16);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  info = client_->SessionInfo(1);
  ASSERT_TRUE(info.ok());
  EXPECT_LE(info->bytes, 1ull << 20);
  // Identical to a fresh session fed the same tokens while nothing was evicted? The quota
  // is per tenant, so drop the first and compare against the outputs computed above.
  ASSERT_TRUE(client_->DropSession(1).ok());
  ASSERT_TRUE(client_->CreateSession(Prof(), o, 2).ok());
  for (uint64_t t = 0; t < 4096; t += 256) ASSERT_TRUE(Append(2, stream, t, 256).ok());
  EXPECT_EQ(Outputs(2, client::Mode::kDense), outs);
}

TEST_F(TiersIntegrationTest, EvictCommandAndSelfEvictionKeepAttendIdentical) {
  // A 16 MiB device tier with a 1 MiB host tier.
  Start("{}", {"--device-memory", "16MiB", "--host-memory", "1MiB"});
  SyntheticStream stream(11, L, HKV, D, kDt);
  client::SessionOptions o;
  o.mode = client::Mode::kIndex;
  o.default_budget_tokens = 256;
  ASSERT_TRUE(client_->CreateSession(Prof(), o, 5).ok());
  for (uint64_t t = 0; t < 6000; t += 1000) {
    auto r = Append(5, stream, t, 1000);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  const auto sparse = Outputs(5, client::Mode::kIndex);
  const auto dense = Outputs(5, client::Mode::kDense);

  // kvmemctl session evict --to host: the host tier fills (1 MiB), the rest goes to RocksDB.
  const std::string out = Kvmemctl("session evict 5 --to host --json");
  auto j = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << out;
  EXPECT_GT(j["blocks"].get<uint64_t>(), 0u) << out;
  EXPECT_GT(j["host_bytes"].get<uint64_t>(), 0u) << out;
  EXPECT_LE(j["host_bytes"].get<uint64_t>(), 1ull << 20) << out;
  EXPECT_GT(j["disk_bytes"].get<uint64_t>(), 0u) << out;
  EXPECT_EQ(Outputs(5, client::Mode::kIndex), sparse);
  auto info = client_->SessionInfo(5);
  ASSERT_TRUE(info.ok());
  const uint64_t fetched = info->fetched_blocks;
  EXPECT_GT(fetched, 0u);
  // Everything to RocksDB, then dense attention brings every block back.
  auto e = client_->EvictSession(5, /*to_disk=*/true);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_EQ(e->host_bytes, 0u);
  EXPECT_EQ(Outputs(5, client::Mode::kDense), dense);
  EXPECT_EQ(Outputs(5, client::Mode::kIndex), sparse);
  info = client_->SessionInfo(5);
  ASSERT_TRUE(info.ok());
  EXPECT_GT(info->fetched_blocks, fetched);

  // Self-eviction: a second session's writes push the pool past its watermarks.
  ASSERT_TRUE(client_->CreateSession(Prof(), o, 6).ok());
  for (uint64_t t = 0; t < 30000; t += 1000) {
    auto r = Append(6, stream, t, 1000);
    ASSERT_TRUE(r.ok()) << "token " << t << ": " << r.status().ToString();
  }
  info = client_->SessionInfo(6);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens, 30000u);  // 14.6 MiB of K/V beside session 5 in a 16 MiB pool
  auto five = client_->SessionInfo(5);
  ASSERT_TRUE(five.ok());
  EXPECT_GT(five->disk_bytes + info->disk_bytes, 0u);
  EXPECT_EQ(Outputs(5, client::Mode::kDense), dense);
}

TEST_F(TiersIntegrationTest, TtlExpiryAndDropFreeTheDeviceTier) {
  Start("{}");
  SyntheticStream stream(3, L, HKV, D, kDt);
  const uint64_t base = [&] {
    auto c = Client::Connect(daemon_->address());
    return c.ok() ? (*c)->server().tiers.at(0).used_bytes : ~0ull;
  }();
  EXPECT_EQ(base, 0u);
  client::SessionOptions o;
  o.ttl_seconds = 1;
  ASSERT_TRUE(client_->CreateSession(Prof(), o, 7).ok());
  ASSERT_TRUE(Append(7, stream, 0, 2000).ok());
  client::SessionOptions keep;
  ASSERT_TRUE(client_->CreateSession(Prof(), keep, 8).ok());
  ASSERT_TRUE(Append(8, stream, 0, 500).ok());
  // Expiry runs once a second; wait (bounded) until session 7 is gone.
  StatusCode code = StatusCode::kOk;
  for (int i = 0; i < 100 && code != StatusCode::kNotFound; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    code = client_->SessionInfo(7).status().code();
  }
  EXPECT_EQ(code, StatusCode::kNotFound);
  auto kept = client_->SessionInfo(8);
  ASSERT_TRUE(kept.ok()) << "a session without TTL must stay";
  // Only session 8's bytes remain; dropping it returns the device tier to the baseline.
  auto c = Client::Connect(daemon_->address());
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->server().tiers.at(0).used_bytes, kept->bytes);
  ASSERT_TRUE(client_->DropSession(8).ok());
  c = Client::Connect(daemon_->address());
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->server().tiers.at(0).used_bytes, base);
}

TEST_F(TiersIntegrationTest, SnapshotAndRestoreThroughKvmemctlSurviveARestart) {
  Start("{}");
  SyntheticStream stream(21, L, HKV, D, kDt);
  ASSERT_TRUE(client_->CreateSession(Prof(), {}, 30).ok());
  ASSERT_TRUE(Append(30, stream, 0, 1500).ok());
  const auto outs = Outputs(30, client::Mode::kDense);
  auto j = nlohmann::json::parse(Kvmemctl("session snapshot 30 nightly --json"), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["tokens"].get<uint64_t>(), 1500u);
  // Taken names are refused; the source keeps going without changing the snapshot.
  auto dup = client_->Snapshot(30, "nightly");
  EXPECT_EQ(dup.status().code(), StatusCode::kAlreadyExists) << dup.status().ToString();
  ASSERT_TRUE(Append(30, stream, 1500, 100).ok());
  j = nlohmann::json::parse(Kvmemctl("session restore nightly --id 31 --json"), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["tokens"].get<uint64_t>(), 1500u);
  EXPECT_EQ(Outputs(31, client::Mode::kDense), outs);

  // After a restart the snapshot is still there (ephemeral sessions 30 and 31 are not).
  client_.reset();
  daemon_.reset();
  Start("{}");
  EXPECT_EQ(client_->SessionInfo(30).status().code(), StatusCode::kNotFound);
  auto r = client_->Restore("nightly", 32, /*durable=*/true);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->tokens, 1500u);
  EXPECT_EQ(Outputs(32, client::Mode::kDense), outs);
  EXPECT_EQ(client_->Restore("nightly", 32).status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(client_->Restore("nope", 33).status().code(), StatusCode::kNotFound);
  const std::string dropped = Kvmemctl("session snapshot-drop nightly --json");
  EXPECT_NE(dropped.find("nightly"), std::string::npos) << dropped;
  EXPECT_EQ(client_->Restore("nightly", 34).status().code(), StatusCode::kNotFound);
  // The durable restored session survives the next restart.
  client_.reset();
  daemon_.reset();
  Start("{}");
  auto info = client_->SessionInfo(32);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->tokens, 1500u);
  EXPECT_EQ(Outputs(32, client::Mode::kDense), outs);
}

}  // namespace
}  // namespace kvmem
