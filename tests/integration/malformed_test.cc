// A battery of malformed and hostile messages against a real kvmemd. Each must get a clear
// error status (the right code, a message naming the problem); afterwards the daemon still
// answers and an unrelated session's data and results are unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <random>

#include "client/client.h"
#include "testing/daemon_process.h"
#include "testing/raw_connection.h"
#include "testing/reference.h"
#include "wire/framing.h"

namespace kvmem {
namespace {

namespace w = ::kvmem::wire;
using testing::DaemonProcess;
using testing::RawConnection;

constexpr uint32_t L = 2, HQ = 4, HKV = 2, D = 16;

std::vector<uint8_t> Flatten(const w::TensorPacker& p) {
  std::vector<uint8_t> out;
  for (const auto& s : p.segments()) {
    const auto* b = static_cast<const uint8_t*>(s.ptr);
    out.insert(out.end(), b, b + s.bytes);
  }
  return out;
}

struct Built {
  flatbuffers::FlatBufferBuilder fbb{1024};
  w::TensorPacker packer;
  std::vector<std::vector<uint8_t>> keep;
  const void* Keep(std::vector<uint8_t> v) {
    keep.push_back(std::move(v));
    return keep.back().data();
  }
  std::vector<uint8_t> header() const {
    return std::vector<uint8_t>(fbb.GetBufferPointer(), fbb.GetBufferPointer() + fbb.GetSize());
  }
  std::vector<uint8_t> data() const { return Flatten(packer); }
};

struct Case {
  std::string name;
  StatusCode want;
  std::string want_in_message;  // substring the message must contain
  std::function<void(Built&, uint64_t session)> build;
  // Overrides of the raw bytes actually sent (for framing attacks).
  std::function<void(std::vector<uint8_t>& header, std::vector<uint8_t>& data)> mangle;
};

std::vector<uint8_t> Bf16(size_t n, float v) {
  std::vector<uint8_t> out(n * 2);
  for (size_t i = 0; i < n; ++i) StoreFromFloat(out.data(), DType::kBF16, i, v);
  return out;
}

void Append(Built& b, uint64_t session, uint32_t tokens, std::vector<uint64_t> shape, w::DType dt,
            std::vector<uint8_t> kv, std::vector<uint8_t> bounds = {}) {
  auto k = b.packer.Add(b.fbb, dt, shape, b.Keep(kv));
  auto v = b.packer.Add(b.fbb, dt, shape, b.Keep(kv));
  flatbuffers::Offset<w::Tensor> bt;
  if (!bounds.empty()) {
    const uint64_t bs[1] = {bounds.size()};
    bt = b.packer.Add(b.fbb, w::DType::U8, bs, b.Keep(bounds));
  }
  auto body = w::CreateAppendKV(b.fbb, session, tokens, k, v, bt);
  b.fbb.Finish(w::MakeEnvelope(b.fbb, 77, body, b.packer.bytes()));
}

void AttendMsg(Built& b, uint64_t session, uint32_t layer, std::vector<uint64_t> qshape, w::DType qdt,
               std::vector<uint8_t> q, bool with_k = false, bool with_v = false) {
  auto qt = b.packer.Add(b.fbb, qdt, qshape, b.Keep(q));
  flatbuffers::Offset<w::Tensor> nk, nv;
  const uint64_t ks[2] = {HKV, D};
  if (with_k) nk = b.packer.Add(b.fbb, w::DType::BF16, ks, b.Keep(Bf16(HKV * D, 0.1f)));
  if (with_v) nv = b.packer.Add(b.fbb, w::DType::BF16, ks, b.Keep(Bf16(HKV * D, 0.1f)));
  w::AttendBuilder ab(b.fbb);
  ab.add_session_id(session);
  ab.add_layer(layer);
  ab.add_q(qt);
  if (with_k) ab.add_new_k(nk);
  if (with_v) ab.add_new_v(nv);
  auto body = ab.Finish();
  b.fbb.Finish(w::MakeEnvelope(b.fbb, 78, body, b.packer.bytes()));
}

void Create(Built& b, uint64_t id, uint32_t layers, uint32_t hq, uint32_t hkv, uint32_t d) {
  auto prof = w::CreateModelProfile(b.fbb, layers, hq, hkv, d, w::DType::BF16);
  auto body = w::CreateCreateSession(b.fbb, id, prof, 0);
  b.fbb.Finish(w::MakeEnvelope(b.fbb, 79, body, 0));
}

std::vector<Case> Battery() {
  const size_t n4 = static_cast<size_t>(L) * HKV * 4 * D;
  std::vector<Case> c;
  c.push_back({"empty_header", StatusCode::kInvalidArgument, "envelope", nullptr,
               [](auto& h, auto&) { h.clear(); }});
  c.push_back({"truncated_header", StatusCode::kInvalidArgument, "verification",
               [](Built& b, uint64_t s) { Append(b, s, 4, {L, HKV, 4, D}, w::DType::BF16, Bf16(L * HKV * 4 * D, 1)); },
               [](auto& h, auto&) { h.resize(h.size() / 2); }});
  c.push_back({"garbage_header", StatusCode::kInvalidArgument, "verification", nullptr, [](auto& h, auto&) {
                 std::mt19937 rng(7);
                 h.resize(200);
                 for (auto& x : h) x = static_cast<uint8_t>(rng());
                 h[0] = 12;  // a plausible root offset
                 h[1] = h[2] = h[3] = 0;
               }});
  c.push_back({"no_body", StatusCode::kInvalidArgument, "no body",
               [](Built& b, uint64_t) {
                 w::EnvelopeBuilder e(b.fbb);
                 e.add_request_id(5);
                 b.fbb.Finish(e.Finish());
               },
               nullptr});
  // Found by fuzz_dispatch: a union type without its table used to crash the daemon.
  c.push_back({"body_type_without_body", StatusCode::kInvalidArgument, "carries none",
               [](Built& b, uint64_t) {
                 w::EnvelopeBuilder e(b.fbb);
                 e.add_request_id(15);
                 e.add_body_type(w::Body::Hello);
                 b.fbb.Finish(e.Finish());
               },
               nullptr});
  c.push_back({"reply_type_as_request", StatusCode::kInvalidArgument, "reply type",
               [](Built& b, uint64_t) {
                 auto body = w::CreatePingReply(b.fbb, 1);
                 b.fbb.Finish(w::MakeEnvelope(b.fbb, 6, body, 0));
               },
               nullptr});
  c.push_back({"wrong_union_type", StatusCode::kNotFound, "not found",
               [](Built& b, uint64_t) {
                 // A Ping table labelled as DropSession: verifies as a DropSession of id 424242.
                 auto ping = w::CreatePing(b.fbb, 424242);
                 w::EnvelopeBuilder e(b.fbb);
                 e.add_request_id(7);
                 e.add_body_type(w::Body::DropSession);
                 e.add_body(ping.Union());
                 b.fbb.Finish(e.Finish());
               },
               nullptr});
  c.push_back({"shape_mismatch", StatusCode::kInvalidArgument, "shape",
               [](Built& b, uint64_t s) { Append(b, s, 4, {L, HKV, 4, D / 2}, w::DType::BF16, Bf16(n4 / 2, 1)); }, nullptr});
  c.push_back({"wrong_dtype", StatusCode::kInvalidArgument, "dtype",
               [n4](Built& b, uint64_t s) {
                 std::vector<uint8_t> f(n4 * 4, 0);
                 Append(b, s, 4, {L, HKV, 4, D}, w::DType::F32, f);
               },
               nullptr});
  c.push_back({"tokens_disagree_with_shape", StatusCode::kInvalidArgument, "shape",
               [n4](Built& b, uint64_t s) { Append(b, s, 5, {L, HKV, 4, D}, w::DType::BF16, Bf16(n4, 1)); }, nullptr});
  c.push_back({"absurd_declared_size", StatusCode::kInvalidArgument, "",
               [](Built& b, uint64_t s) {
                 const uint64_t big = 1ull << 40;
                 const uint64_t shape[4] = {L, HKV, big, D};
                 auto k = w::CreateTensorDirect(b.fbb, w::DType::BF16, nullptr, 0, 0);
                 auto sv = b.fbb.CreateVector(shape, 4);
                 auto t = w::CreateTensor(b.fbb, w::DType::BF16, sv, 0, big * L * HKV * D * 2);
                 auto body = w::CreateAppendKV(b.fbb, s, static_cast<uint32_t>(big), t, t);
                 (void)k;
                 b.fbb.Finish(w::MakeEnvelope(b.fbb, 8, body, 0));
               },
               nullptr});
  c.push_back({"tensor_offset_past_data", StatusCode::kInvalidArgument, "exceeds",
               [n4](Built& b, uint64_t s) {
                 const uint64_t shape[4] = {L, HKV, 4, D};
                 auto sv = b.fbb.CreateVector(shape, 4);
                 auto t = w::CreateTensor(b.fbb, w::DType::BF16, sv, 1 << 20, n4 * 2);
                 auto body = w::CreateAppendKV(b.fbb, s, 4, t, t);
                 b.fbb.Finish(w::MakeEnvelope(b.fbb, 9, body, n4 * 2));
               },
               [n4](auto&, auto& d) { d.assign(n4 * 2, 0); }});
  c.push_back({"declared_data_bytes_mismatch", StatusCode::kInvalidArgument, "received",
               [n4](Built& b, uint64_t s) { Append(b, s, 4, {L, HKV, 4, D}, w::DType::BF16, Bf16(n4, 1)); },
               [](auto&, auto& d) { d.resize(d.size() - 64); }});
  c.push_back({"zero_tokens", StatusCode::kInvalidArgument, "tokens",
               [](Built& b, uint64_t s) { Append(b, s, 0, {L, HKV, 0, D}, w::DType::BF16, {}); }, nullptr});
  c.push_back({"bad_boundary_class", StatusCode::kInvalidArgument, "boundary",
               [n4](Built& b, uint64_t s) { Append(b, s, 4, {L, HKV, 4, D}, w::DType::BF16, Bf16(n4, 1), {1, 9, 0, 0}); },
               nullptr});
  c.push_back({"nan_in_keys", StatusCode::kInvalidArgument, "NaN",
               [n4](Built& b, uint64_t s) {
                 Append(b, s, 4, {L, HKV, 4, D}, w::DType::BF16, Bf16(n4, std::numeric_limits<float>::quiet_NaN()));
               },
               nullptr});
  c.push_back({"missing_values", StatusCode::kInvalidArgument, "values",
               [n4](Built& b, uint64_t s) {
                 const uint64_t shape[4] = {L, HKV, 4, D};
                 auto k = b.packer.Add(b.fbb, w::DType::BF16, shape, b.Keep(Bf16(n4, 1)));
                 auto body = w::CreateAppendKV(b.fbb, s, 4, k, 0);
                 b.fbb.Finish(w::MakeEnvelope(b.fbb, 10, body, b.packer.bytes()));
               },
               nullptr});
  c.push_back({"unknown_session", StatusCode::kNotFound, "not found",
               [](Built& b, uint64_t) { AttendMsg(b, 999999, 0, {HQ, D}, w::DType::BF16, Bf16(HQ * D, 1)); }, nullptr});
  c.push_back({"layer_out_of_range", StatusCode::kInvalidArgument, "layer",
               [](Built& b, uint64_t s) { AttendMsg(b, s, L, {HQ, D}, w::DType::BF16, Bf16(HQ * D, 1)); }, nullptr});
  c.push_back({"q_wrong_shape", StatusCode::kInvalidArgument, "shape",
               [](Built& b, uint64_t s) { AttendMsg(b, s, 0, {HQ + 1, D}, w::DType::BF16, Bf16((HQ + 1) * D, 1)); },
               nullptr});
  c.push_back({"q_integer_dtype", StatusCode::kInvalidArgument, "dtype",
               [](Built& b, uint64_t s) { AttendMsg(b, s, 0, {HQ, D}, w::DType::I32, std::vector<uint8_t>(HQ * D * 4)); },
               nullptr});
  c.push_back({"q_nan", StatusCode::kInvalidArgument, "NaN",
               [](Built& b, uint64_t s) {
                 AttendMsg(b, s, 0, {HQ, D}, w::DType::BF16, Bf16(HQ * D, std::numeric_limits<float>::infinity()));
               },
               nullptr});
  c.push_back({"new_k_without_new_v", StatusCode::kInvalidArgument, "together",
               [](Built& b, uint64_t s) { AttendMsg(b, s, 0, {HQ, D}, w::DType::BF16, Bf16(HQ * D, 1), true, false); },
               nullptr});
  c.push_back({"create_gqa_mismatch", StatusCode::kInvalidArgument, "multiple",
               [](Built& b, uint64_t) { Create(b, 31337, 2, 6, 4, 16); }, nullptr});
  c.push_back({"create_id_zero", StatusCode::kInvalidArgument, "nonzero",
               [](Built& b, uint64_t) { Create(b, 0, 2, 4, 2, 16); }, nullptr});
  c.push_back({"create_duplicate", StatusCode::kAlreadyExists, "exists",
               [](Built& b, uint64_t s) { Create(b, s, L, HQ, HKV, D); }, nullptr});
  c.push_back({"create_huge_profile", StatusCode::kInvalidArgument, "layers",
               [](Built& b, uint64_t) { Create(b, 5150, 100000, 4, 2, 16); }, nullptr});
  c.push_back({"drop_unknown", StatusCode::kNotFound, "not found",
               [](Built& b, uint64_t) {
                 auto body = w::CreateDropSession(b.fbb, 123456789);
                 b.fbb.Finish(w::MakeEnvelope(b.fbb, 11, body, 0));
               },
               nullptr});
  c.push_back({"oversize_message", StatusCode::kInvalidArgument, "max_message_bytes",
               [](Built& b, uint64_t) {
                 auto body = w::CreatePing(b.fbb, 1);
                 b.fbb.Finish(w::MakeEnvelope(b.fbb, 12, body, 2u << 20));
               },
               [](auto&, auto& d) { d.assign(2u << 20, 0xCD); }});
  c.push_back({"spilled_bytes_past_data", StatusCode::kInvalidArgument, "spilled",
               [](Built& b, uint64_t) {
                 w::EnvelopeBuilder e(b.fbb);
                 e.add_request_id(13);
                 e.add_spilled_bytes(1000);
                 b.fbb.Finish(e.Finish());
               },
               [](auto&, auto& d) { d.assign(100, 0); }});
  c.push_back({"hello_wrong_protocol", StatusCode::kFailedPrecondition, "protocol",
               [](Built& b, uint64_t) {
                 auto body = w::CreateHelloDirect(b.fbb, 999, "evil", "");
                 b.fbb.Finish(w::MakeEnvelope(b.fbb, 14, body, 0));
               },
               nullptr});
  return c;
}

TEST(Malformed, BatteryGetsClearErrorsAndDaemonCarriesOn) {
  DaemonProcess d({"--max-message", "1MiB"});
  ASSERT_TRUE(d.ready());
  auto cl = client::Client::Connect(d.address());
  ASSERT_TRUE(cl.ok());
  // The target session and a bystander with data.
  auto target = (*cl)->CreateSession({L, HQ, HKV, D, DType::kBF16});
  auto bystander = (*cl)->CreateSession({L, HQ, HKV, D, DType::kBF16});
  ASSERT_TRUE(target.ok() && bystander.ok());
  std::mt19937_64 rng(3);
  const uint64_t T = 300;
  auto kv = testing::RandomTensor(rng, DType::kBF16, static_cast<size_t>(L) * HKV * T * D);
  ASSERT_TRUE((*cl)->AppendKV(*bystander, {kv.data(), DType::kBF16, {L, HKV, T, D}}, {kv.data(), DType::kBF16, {L, HKV, T, D}}).ok());
  std::vector<float> q(HQ * D, 0.3f);
  client::AttendRequest req;
  req.q = {q.data(), DType::kF32, {HQ, D}};
  req.out_dtype = DType::kF32;
  auto before = (*cl)->Attend(*bystander, req);
  ASSERT_TRUE(before.ok());

  RawConnection raw;
  ASSERT_TRUE(raw.Connect(d.address()).ok());
  {  // Before Hello, everything but Ping/Hello is refused.
    Built b;
    AttendMsg(b, *target, 0, {HQ, D}, w::DType::BF16, Bf16(HQ * D, 1));
    auto r = raw.Send(b.header(), b.data());
    ASSERT_TRUE(r.received);
    EXPECT_EQ(r.status.code(), StatusCode::kUnauthenticated) << r.status.ToString();
  }
  {
    Built b;
    auto body = w::CreateHelloDirect(b.fbb, w::kProtocolVersion, "raw", "");
    b.fbb.Finish(w::MakeEnvelope(b.fbb, 1, body, 0));
    ASSERT_TRUE(raw.Send(b.header(), {}).status.ok());
  }

  const auto cases = Battery();
  ASSERT_GE(cases.size(), 20u);
  for (const Case& c : cases) {
    Built b;
    if (c.build) c.build(b, *target);
    std::vector<uint8_t> header = c.build ? b.header() : std::vector<uint8_t>{};
    std::vector<uint8_t> data = c.build ? b.data() : std::vector<uint8_t>{};
    if (c.mangle) c.mangle(header, data);
    auto r = raw.Send(header, data);
    ASSERT_TRUE(r.received) << c.name << ": no reply";
    EXPECT_EQ(r.status.code(), c.want) << c.name << ": " << r.status.ToString();
    EXPECT_NE(r.status.message().find(c.want_in_message), std::string::npos)
        << c.name << ": message '" << r.status.message() << "' should mention '" << c.want_in_message << "'";
    // After every bad message a normal request still succeeds.
    Built ping;
    auto body = w::CreatePing(ping.fbb, 99);
    ping.fbb.Finish(w::MakeEnvelope(ping.fbb, 2, body, 0));
    EXPECT_TRUE(raw.Send(ping.header(), {}).status.ok()) << "ping after " << c.name;
  }

  // Nothing leaked into the sessions.
  auto after = (*cl)->Attend(*bystander, req);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->out, before->out);
  auto info = (*cl)->SessionInfo(*target);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens, 0u);
  auto list = (*cl)->ListSessions();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), 2u);
  EXPECT_EQ(d.Stop(), 0);
}

// Tenants: tokens map to tenants; a tenant never sees another's sessions.
TEST(Malformed, TokensAndTenantIsolation) {
  const auto cfg = std::filesystem::temp_directory_path() / ("kvmem-tenants-" + std::to_string(::getpid()) + ".json");
  {
    std::ofstream f(cfg);
    f << R"({"tenants": {"token-alice-123": "alice", "token-bob-4567": "bob"}})";
  }
  DaemonProcess d({"--config", cfg.string()}, "token-alice-123");
  ASSERT_TRUE(d.ready());
  client::ClientOptions alice_opts, bob_opts, bad_opts, none_opts;
  alice_opts.token = "token-alice-123";
  bob_opts.token = "token-bob-4567";
  bad_opts.token = "not-a-token";
  EXPECT_EQ(client::Client::Connect(d.address(), bad_opts).status().code(), StatusCode::kUnauthenticated);
  EXPECT_EQ(client::Client::Connect(d.address(), none_opts).status().code(), StatusCode::kUnauthenticated);
  auto alice = client::Client::Connect(d.address(), alice_opts);
  auto bob = client::Client::Connect(d.address(), bob_opts);
  ASSERT_TRUE(alice.ok() && bob.ok());
  EXPECT_EQ((*alice)->server().tenant, "alice");
  auto id = (*alice)->CreateSession({L, HQ, HKV, D, DType::kBF16}, {}, 4242);
  ASSERT_TRUE(id.ok());
  // Bob cannot see, read, attend to or drop it, and may use the same id for his own.
  EXPECT_TRUE((*bob)->ListSessions()->empty());
  EXPECT_EQ((*bob)->SessionInfo(4242).status().code(), StatusCode::kNotFound);
  std::vector<float> q(HQ * D, 1.f);
  client::AttendRequest req;
  req.q = {q.data(), DType::kF32, {HQ, D}};
  EXPECT_EQ((*bob)->Attend(4242, req).status().code(), StatusCode::kNotFound);
  EXPECT_EQ((*bob)->DropSession(4242).code(), StatusCode::kNotFound);
  EXPECT_TRUE((*bob)->CreateSession({L, HQ, HKV, D, DType::kBF16}, {}, 4242).ok());
  EXPECT_EQ((*alice)->ListSessions()->size(), 1u);
  EXPECT_TRUE((*alice)->SessionInfo(4242).ok());
  EXPECT_EQ(d.Stop(), 0);
  std::filesystem::remove(cfg);
}

}  // namespace
}  // namespace kvmem
