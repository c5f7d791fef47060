// Tenant isolation against a real kvmemd with two tenants (issue 9): a tenant cannot list,
// read, append to, attend to, retrieve from, verify or drop another tenant's sessions, and
// gets NOT_FOUND (as for a missing id, so ids do not leak); quotas are per tenant; a wrong or
// missing token gets UNAUTHENTICATED and nothing else; admin endpoints refuse tenant tokens.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "client/client.h"
#include "testing/daemon_process.h"
#include "testing/http_get.h"
#include "testing/raw_connection.h"
#include "testing/reference.h"
#include "wire/framing.h"

namespace kvmem {
namespace {

namespace w = ::kvmem::wire;
using testing::DaemonProcess;

constexpr uint32_t L = 2, HQ = 4, HKV = 2, D = 16;
constexpr char kAlice[] = "token-alice-123";
constexpr char kBob[] = "token-bob-4567";
constexpr char kAdmin[] = "admin-secret-890";

class IsolationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = std::filesystem::temp_directory_path() /
           ("kvmem-isolation-" + std::to_string(::getpid()) + ".json");
    std::ofstream(cfg_) << R"({"tenants": {")" << kAlice << R"(": "alice", ")" << kBob
                        << R"(": "bob"}, "admin_token": ")" << kAdmin
                        << R"(", "max_sessions_per_tenant": 3})";
    admin_port_ = testing::FreePort();
    daemon_ = std::make_unique<DaemonProcess>(
        std::vector<std::string>{"--config", cfg_.string(), "--admin",
                                 "127.0.0.1:" + std::to_string(admin_port_)},
        kAlice);
    ASSERT_TRUE(daemon_->ready());
  }
  void TearDown() override {
    if (daemon_) {
      EXPECT_EQ(daemon_->Stop(), 0);
    }
    std::filesystem::remove(cfg_);
  }
  std::unique_ptr<client::Client> As(const std::string& token) {
    client::ClientOptions o;
    o.token = token;
    auto c = client::Client::Connect(daemon_->address(), o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? std::move(*c) : nullptr;
  }

  std::filesystem::path cfg_;
  uint16_t admin_port_ = 0;
  std::unique_ptr<DaemonProcess> daemon_;
};

TEST_F(IsolationTest, TenantCannotTouchAnotherTenantsSessions) {
  auto alice = As(kAlice);
  auto bob = As(kBob);
  ASSERT_TRUE(alice && bob);
  client::SessionOptions durable;
  durable.durable = true;
  ASSERT_TRUE(alice->CreateSession({L, HQ, HKV, D, DType::kBF16}, durable, 4242).ok());
  std::mt19937_64 rng(1);
  const uint64_t T = 100;
  auto kv = testing::RandomTensor(rng, DType::kBF16, size_t{L} * HKV * T * D);
  const client::TensorView t{kv.data(), DType::kBF16, {L, HKV, T, D}};
  ASSERT_TRUE(alice->AppendKV(4242, t, t).ok());
  std::vector<float> q(HQ * D, 0.25f);
  client::AttendRequest req;
  req.q = {q.data(), DType::kF32, {HQ, D}};
  req.out_dtype = DType::kF32;
  auto before = alice->Attend(4242, req);
  ASSERT_TRUE(before.ok());

  // Every op on alice's id from bob: NOT_FOUND, the same answer as for an id nobody uses.
  auto expect_hidden = [&](const Status& s, const char* op) {
    EXPECT_EQ(s.code(), StatusCode::kNotFound) << op << ": " << s.ToString();
    EXPECT_EQ(s.message().find("alice"), std::string::npos) << op << " leaks the owner: " << s.message();
  };
  auto bl = bob->ListSessions();
  ASSERT_TRUE(bl.ok());
  EXPECT_TRUE(bl->empty());
  for (uint64_t id : {uint64_t{4242}, uint64_t{777}}) {  // alice's id, and an unused one
    expect_hidden(bob->SessionInfo(id).status(), "SessionInfo");
    expect_hidden(bob->AppendKV(id, t, t).status(), "AppendKV");
    expect_hidden(bob->Attend(id, req).status(), "Attend");
    expect_hidden(bob->Retrieve(id, 0, req.q, 0, 2).status(), "Retrieve");
    expect_hidden(bob->VerifySession(id).status(), "VerifySession");
    expect_hidden(bob->DropSession(id), "DropSession");
  }
  // Bob may use the same id for his own (durable) session; dropping it leaves alice's alone.
  ASSERT_TRUE(bob->CreateSession({L, HQ, HKV, D, DType::kBF16}, durable, 4242).ok());
  ASSERT_TRUE(bob->AppendKV(4242, t, t).ok());
  EXPECT_TRUE(bob->DropSession(4242).ok());

  auto info = alice->SessionInfo(4242);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens, T);
  EXPECT_EQ(info->tenant, "alice");
  auto after = alice->Attend(4242, req);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->out, before->out);
  auto verify = alice->VerifySession(4242);
  ASSERT_TRUE(verify.ok()) << verify.status().ToString();
  EXPECT_TRUE(verify->ok);
  EXPECT_EQ(verify->tokens, T);
  auto al = alice->ListSessions();
  ASSERT_TRUE(al.ok());
  ASSERT_EQ(al->size(), 1u);
  EXPECT_EQ((*al)[0].id, 4242u);
}

TEST_F(IsolationTest, SessionQuotaIsPerTenant) {
  auto alice = As(kAlice);
  auto bob = As(kBob);
  ASSERT_TRUE(alice && bob);
  for (uint64_t id = 1; id <= 3; ++id) ASSERT_TRUE(alice->CreateSession({L, HQ, HKV, D, DType::kBF16}, {}, id).ok());
  auto over = alice->CreateSession({L, HQ, HKV, D, DType::kBF16}, {}, 4);
  EXPECT_EQ(over.status().code(), StatusCode::kResourceExhausted) << over.status().ToString();
  EXPECT_NE(over.status().message().find("max_sessions_per_tenant"), std::string::npos);
  // Alice at her limit does not take anything from bob.
  for (uint64_t id = 1; id <= 3; ++id) EXPECT_TRUE(bob->CreateSession({L, HQ, HKV, D, DType::kBF16}, {}, id).ok());
  EXPECT_EQ(bob->CreateSession({L, HQ, HKV, D, DType::kBF16}, {}, 4).status().code(),
            StatusCode::kResourceExhausted);
  // Dropping one frees one slot for its tenant only.
  ASSERT_TRUE(alice->DropSession(2).ok());
  EXPECT_EQ(bob->CreateSession({L, HQ, HKV, D, DType::kBF16}, {}, 5).status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_TRUE(alice->CreateSession({L, HQ, HKV, D, DType::kBF16}, {}, 5).ok());
}

std::vector<uint8_t> Header(const flatbuffers::FlatBufferBuilder& fbb) {
  return {fbb.GetBufferPointer(), fbb.GetBufferPointer() + fbb.GetSize()};
}

testing::RawConnection::ReplyInfo SendHello(testing::RawConnection& raw, const char* token) {
  flatbuffers::FlatBufferBuilder fbb;
  auto body = w::CreateHelloDirect(fbb, w::kProtocolVersion, "isolation", token);
  fbb.Finish(w::MakeEnvelope(fbb, 1, body, 0));
  return raw.Send(Header(fbb), {});
}

// What an unauthenticated connection gets for ordinary requests.
void ExpectNothingWorks(testing::RawConnection& raw, const char* when) {
  {
    flatbuffers::FlatBufferBuilder fbb;
    auto body = w::CreateListSessions(fbb);
    fbb.Finish(w::MakeEnvelope(fbb, 2, body, 0));
    auto r = raw.Send(Header(fbb), {});
    ASSERT_TRUE(r.received) << when;
    EXPECT_EQ(r.status.code(), StatusCode::kUnauthenticated) << when << ": " << r.status.ToString();
  }
  for (uint64_t id : {uint64_t{4242}, uint64_t{1}}) {
    flatbuffers::FlatBufferBuilder fbb;
    auto body = w::CreateSessionInfo(fbb, id);
    fbb.Finish(w::MakeEnvelope(fbb, 3, body, 0));
    auto r = raw.Send(Header(fbb), {});
    ASSERT_TRUE(r.received) << when;
    EXPECT_EQ(r.status.code(), StatusCode::kUnauthenticated) << when << ": " << r.status.ToString();
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    auto body = w::CreateDropSession(fbb, 4242);
    fbb.Finish(w::MakeEnvelope(fbb, 4, body, 0));
    auto r = raw.Send(Header(fbb), {});
    ASSERT_TRUE(r.received) << when;
    EXPECT_EQ(r.status.code(), StatusCode::kUnauthenticated) << when << ": " << r.status.ToString();
  }
}

TEST_F(IsolationTest, WrongOrMissingTokenGetsNothing) {
  auto alice = As(kAlice);
  ASSERT_TRUE(alice);
  ASSERT_TRUE(alice->CreateSession({L, HQ, HKV, D, DType::kBF16}, {}, 4242).ok());
  client::ClientOptions bad, none;
  bad.token = "not-a-token";
  EXPECT_EQ(client::Client::Connect(daemon_->address(), bad).status().code(), StatusCode::kUnauthenticated);
  EXPECT_EQ(client::Client::Connect(daemon_->address(), none).status().code(), StatusCode::kUnauthenticated);

  testing::RawConnection raw;
  ASSERT_TRUE(raw.Connect(daemon_->address()).ok());
  ExpectNothingWorks(raw, "before Hello");
  EXPECT_EQ(SendHello(raw, "not-a-token").status.code(), StatusCode::kUnauthenticated);
  ExpectNothingWorks(raw, "after a wrong token");
  EXPECT_EQ(SendHello(raw, "").status.code(), StatusCode::kUnauthenticated);
  ExpectNothingWorks(raw, "after an empty token");
  // A failed Hello on an authenticated connection drops its tenant.
  ASSERT_TRUE(SendHello(raw, kAlice).status.ok());
  EXPECT_EQ(SendHello(raw, "token-alice-12").status.code(), StatusCode::kUnauthenticated);
  ExpectNothingWorks(raw, "after a failed re-Hello");
  // Alice's session is untouched.
  EXPECT_TRUE(alice->SessionInfo(4242).ok());
}

TEST_F(IsolationTest, AdminEndpointsRefuseTenantTokens) {
  for (const char* path : {"/metrics", "/v1/sessions", "/v1/status"}) {
    EXPECT_EQ(testing::HttpGet(admin_port_, path).status, 401) << path;
    EXPECT_EQ(testing::HttpGet(admin_port_, path, kAlice).status, 401) << path;
    EXPECT_EQ(testing::HttpGet(admin_port_, path, kBob).status, 401) << path;
    EXPECT_EQ(testing::HttpGet(admin_port_, path, "admin-secret-89").status, 401) << path;
    EXPECT_EQ(testing::HttpGet(admin_port_, path, kAdmin).status, 200) << path;
  }
  EXPECT_EQ(testing::HttpGet(admin_port_, "/healthz").status, 200);
}

}  // namespace
}  // namespace kvmem
