// Every resource a client can make kvmemd hold is bounded by config, with a clear error at the
// bound (issue 9). Bounds tested elsewhere: max_message_bytes (malformed_test,
// "oversize_message"), max_sessions_per_tenant (isolation_test, reload in ops_integration_test),
// device_memory (session_test FullPoolLeavesSessionIntact).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "client/client.h"
#include "testing/daemon_process.h"
#include "testing/reference.h"

namespace kvmem {
namespace {

using testing::DaemonProcess;

constexpr uint32_t L = 2, HQ = 4, HKV = 2, D = 16;

std::filesystem::path WriteConfig(const std::string& name, const std::string& text) {
  const auto p = std::filesystem::temp_directory_path() /
                 ("kvmem-limits-" + name + "-" + std::to_string(::getpid()) + ".json");
  std::ofstream(p) << text;
  return p;
}

// A kvmemd started with one config file; the daemon must stop cleanly at the end.
class Limits : public ::testing::Test {
 protected:
  void Start(const std::string& name, const std::string& config) {
    cfg_ = WriteConfig(name, config);
    d_ = std::make_unique<DaemonProcess>(std::vector<std::string>{"--config", cfg_.string()});
    ASSERT_TRUE(d_->ready());
  }
  // A client with one fresh session.
  void ConnectWithSession() {
    auto c = client::Client::Connect(d_->address());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    c_ = std::move(*c);
    auto id = c_->CreateSession({L, HQ, HKV, D, DType::kBF16});
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    id_ = *id;
  }
  void TearDown() override {
    c_.reset();
    if (d_) {
      EXPECT_EQ(d_->Stop(), 0);
    }
    if (!cfg_.empty()) std::filesystem::remove(cfg_);
  }

  std::filesystem::path cfg_;
  std::unique_ptr<DaemonProcess> d_;
  std::unique_ptr<client::Client> c_;
  uint64_t id_ = 0;
};

TEST_F(Limits, MaxConnectionsRejectsTheNextClientClearly) {
  Start("conns", R"({"max_connections": 3})");
  const DaemonProcess& d = *d_;
  // The readiness probe's connection may still be closing: wait until three fit.
  std::vector<std::unique_ptr<client::Client>> held;
  for (int attempt = 0; attempt < 200 && held.size() < 3; ++attempt) {
    auto c = client::Client::Connect(d.address());
    if (c.ok()) held.push_back(std::move(*c));
    else std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(held.size(), 3u);
  auto over = client::Client::Connect(d.address());
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), StatusCode::kResourceExhausted) << over.status().ToString();
  EXPECT_NE(over.status().message().find("max_connections"), std::string::npos) << over.status().ToString();
  // The connections inside the limit keep working; closing one makes room again.
  for (auto& c : held) EXPECT_TRUE(c->Ping(7).ok());
  held.pop_back();
  bool reconnected = false;
  for (int attempt = 0; attempt < 200 && !reconnected; ++attempt) {
    auto c = client::Client::Connect(d.address());
    reconnected = c.ok();
    if (!reconnected) {
      EXPECT_EQ(c.status().code(), StatusCode::kResourceExhausted) << c.status().ToString();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  EXPECT_TRUE(reconnected);
}

TEST_F(Limits, MaxTokensPerSessionRefusesAppendsAndDecodeTokens) {
  Start("tokens", R"({"max_tokens_per_session": 100})");
  ConnectWithSession();
  client::Client* c = c_.get();
  const uint64_t* id = &id_;
  std::mt19937_64 rng(2);
  auto append = [&](uint64_t n) {
    auto kv = testing::RandomTensor(rng, DType::kBF16, size_t{L} * HKV * n * D);
    const client::TensorView t{kv.data(), DType::kBF16, {L, HKV, n, D}};
    return c->AppendKV(*id, t, t);
  };
  ASSERT_TRUE(append(64).ok());
  auto over = append(64);
  EXPECT_EQ(over.status().code(), StatusCode::kResourceExhausted) << over.status().ToString();
  EXPECT_NE(over.status().message().find("max_tokens_per_session"), std::string::npos);
  EXPECT_EQ(c->SessionInfo(*id)->tokens, 64u);  // the refused append left nothing behind
  ASSERT_TRUE(append(36).ok());
  // At the bound, a decode token (Attend with new k/v) is refused too; reading still works.
  std::vector<float> q(HQ * D, 0.1f);
  auto nk = testing::RandomTensor(rng, DType::kBF16, size_t{HKV} * D);
  client::AttendRequest req;
  req.q = {q.data(), DType::kF32, {HQ, D}};
  auto read = c->Attend(*id, req);
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  req.new_k = client::TensorView{nk.data(), DType::kBF16, {HKV, D}};
  req.new_v = req.new_k;
  auto decode = c->Attend(*id, req);
  EXPECT_EQ(decode.status().code(), StatusCode::kResourceExhausted) << decode.status().ToString();
  EXPECT_NE(decode.status().message().find("max_tokens_per_session"), std::string::npos);
  EXPECT_EQ(c->SessionInfo(*id)->tokens, 100u);
}

TEST_F(Limits, MaxInflightPerEndpointRefusesTheExcessAndServesTheRest) {
  Start("inflight", R"({"max_inflight_per_endpoint": 2})");
  ConnectWithSession();
  client::Client* c = c_.get();
  const uint64_t* id = &id_;
  std::mt19937_64 rng(3);
  const uint64_t T = 4096;
  auto kv = testing::RandomTensor(rng, DType::kBF16, size_t{L} * HKV * T * D);
  const client::TensorView t{kv.data(), DType::kBF16, {L, HKV, T, D}};
  ASSERT_TRUE(c->AppendKV(*id, t, t).ok());
  std::vector<float> q(HQ * D, 0.1f);
  client::AttendRequest req;
  req.q = {q.data(), DType::kF32, {HQ, D}};
  // 64 pipelined requests on one connection: the daemon holds at most 2 at a time.
  std::vector<client::Future<client::AttendResult>> futures;
  for (int i = 0; i < 64; ++i) futures.push_back(c->AttendAsync(*id, req));
  int ok = 0, refused = 0;
  for (auto& f : futures) {
    auto r = f.Get();
    if (r.ok()) {
      ++ok;
    } else {
      EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status().ToString();
      EXPECT_NE(r.status().message().find("max 2"), std::string::npos) << r.status().ToString();
      ++refused;
    }
  }
  EXPECT_GE(ok, 2);
  EXPECT_GE(refused, 1);
  EXPECT_EQ(ok + refused, 64);
  EXPECT_TRUE(c->Attend(*id, req).ok());  // nothing stays counted
}

TEST_F(Limits, ZeroBoundsAreRefusedAtStartup) {
  for (const char* text : {R"({"max_connections": 0})", R"({"max_inflight_per_endpoint": 0})"}) {
    const auto cfg = WriteConfig("zero", text);
    DaemonProcess d({"--config", cfg.string()});
    EXPECT_FALSE(d.ready()) << text;
    std::filesystem::remove(cfg);
  }
}

}  // namespace
}  // namespace kvmem
