// kvmemd end to end over UCX: a real daemon process, the client library, TCP and shared
// memory. create -> append 4K tokens x 4 layers -> attend -> compare with the reference -> drop.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <thread>

#include "client/client.h"
#include "testing/daemon_process.h"
#include "testing/http_get.h"
#include "testing/reference.h"
#include "testing/seed.h"

namespace kvmem {
namespace {

using client::AttendRequest;
using client::Client;
using client::ClientOptions;
using client::Profile;
using client::TensorView;
using testing::DaemonProcess;

struct E2ECase {
  std::string transport;
  std::string progress;
  DType dtype;
  std::string rndv = "auto";  // kvmemd --ucx-rndv-scheme: who copies the 8 MiB of K/V
};

// An Attend of `layer` with a random f32 query for each of the HQ heads (N(0, 4)) kept in `q`.
AttendRequest RandomAttend(std::mt19937_64& rng, uint32_t layer, uint32_t HQ, uint32_t D,
                           DType out_dtype, std::vector<float>* q) {
  q->resize(size_t{HQ} * D);
  std::normal_distribution<float> n01;
  for (auto& x : *q) x = n01(rng) * 2;
  AttendRequest req;
  req.layer = layer;
  req.q = TensorView{q->data(), DType::kF32, {HQ, D}};
  req.out_dtype = out_dtype;
  return req;
}

class E2ETest : public ::testing::TestWithParam<E2ECase> {};

TEST_P(E2ETest, CreateAppendAttendDrop) {
  const E2ECase c = GetParam();
  DaemonProcess d({"--progress", c.progress, "--ucx-rndv-scheme", c.rndv});
  ASSERT_TRUE(d.ready()) << "kvmemd did not start";
  ClientOptions o;
  o.transport = c.transport;
  auto cl = Client::Connect(d.address(), o);
  ASSERT_TRUE(cl.ok()) << cl.status().ToString();
  Client& client = **cl;
  const std::string lanes = client.TransportInfo();
  if (c.transport == "tcp") {
    EXPECT_NE(lanes.find("tcp"), std::string::npos) << lanes;
    EXPECT_EQ(lanes.find("sysv"), std::string::npos) << lanes;
  } else {
    EXPECT_TRUE(lanes.find("sysv") != std::string::npos || lanes.find("posix") != std::string::npos) << lanes;
  }

  const uint32_t L = 4, HQ = 8, HKV = 2, D = 64;
  const uint64_t T = 4096;
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  Profile p{L, HQ, HKV, D, c.dtype, {}, {}, "e2e"};
  auto id = client.CreateSession(p);
  ASSERT_TRUE(id.ok()) << id.status().ToString();

  const size_t elems = static_cast<size_t>(L) * HKV * T * D;
  auto keys = testing::RandomTensor(rng, c.dtype, elems);
  auto values = testing::RandomTensor(rng, c.dtype, elems);
  std::vector<uint8_t> bounds(T);
  for (size_t i = 0; i < T; ++i) bounds[i] = static_cast<uint8_t>(i % 11 == 10 ? 3 : (i % 3 == 0 ? 2 : 1));
  auto appended = client.AppendKV(*id, TensorView{keys.data(), c.dtype, {L, HKV, T, D}},
                                  TensorView{values.data(), c.dtype, {L, HKV, T, D}}, bounds);
  ASSERT_TRUE(appended.ok()) << appended.status().ToString();
  EXPECT_EQ(appended->tokens, T);
  EXPECT_GT(appended->chunks, T / 24);

  for (uint32_t layer = 0; layer < L; ++layer) {
    std::vector<float> q;
    AttendRequest req = RandomAttend(rng, layer, HQ, D, c.dtype, &q);
    req.return_lse = true;
    auto r = client.Attend(*id, req);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    std::vector<float> out(HQ * D);
    ConvertToFloat(r->out.data(), r->out_dtype, out.size(), out.data());
    auto ref = testing::ReferenceAttention(keys, values, c.dtype, L, HKV, T, D, layer, q, HQ);
    EXPECT_LT(testing::RelativeError(out, ref), testing::OutputTolerance(c.dtype)) << "layer " << layer;
    ASSERT_EQ(r->lse.size(), HQ);
    ASSERT_EQ(r->tokens_attended.size(), HKV);
    EXPECT_EQ(r->tokens_attended[0], T);
  }

  auto info = client.SessionInfo(*id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens, T);
  EXPECT_EQ(info->layers.size(), L);
  EXPECT_GT(info->mean_chunk_tokens, 7.9f);

  ASSERT_TRUE(client.DropSession(*id).ok());
  EXPECT_EQ(client.SessionInfo(*id).status().code(), StatusCode::kNotFound);
  auto list = client.ListSessions();
  ASSERT_TRUE(list.ok());
  EXPECT_TRUE(list->empty());
  EXPECT_EQ(d.Stop(), 0) << "kvmemd did not exit 0 within 5 s of SIGTERM";
}

INSTANTIATE_TEST_SUITE_P(
    Transports, E2ETest,
    ::testing::Values(E2ECase{"tcp", "event", DType::kBF16}, E2ECase{"shm", "event", DType::kBF16},
                      E2ECase{"shm", "poll", DType::kF16}, E2ECase{"auto", "event", DType::kF32},
                      E2ECase{"shm", "poll", DType::kBF16, "put_zcopy"},
                      E2ECase{"shm", "event", DType::kF32, "get_zcopy"}),
    [](const auto& info) {
      return info.param.transport + "_" + info.param.progress + "_" + std::string(DTypeName(info.param.dtype)) +
             (info.param.rndv == "auto" ? "" : "_" + info.param.rndv);
    });

// Dense-mode decode steps through kvmemd: each Attend appends the step's token to every layer's
// tail, seals a chunk every few steps, and must equal the reference over every token so far. On
// the CUDA backend each layer keeps its plan from step to step and patches it for the appended
// token (kvmem_dense_plans_total{how="patched"}); a seal plans afresh.
TEST(E2E, DenseDecodeStepsMatchTheReference) {
  const uint16_t admin = testing::FreePort();
  DaemonProcess d({"--admin", "127.0.0.1:" + std::to_string(admin)});
  ASSERT_TRUE(d.ready());
  auto cl = Client::Connect(d.address());
  ASSERT_TRUE(cl.ok()) << cl.status().ToString();
  Client& client = **cl;
  const uint32_t L = 2, HQ = 8, HKV = 2, D = 64;
  const uint64_t T0 = 1000;
  const int steps = 40;
  const DType dt = DType::kBF16;
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  auto id = client.CreateSession(Profile{L, HQ, HKV, D, dt, {}, {}, "e2e"});
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  // rows[layer][head]: every token's K (and V) row so far, in order.
  const size_t row = size_t{D} * DTypeSize(dt);
  std::vector<std::vector<std::vector<uint8_t>>> krows(L, std::vector<std::vector<uint8_t>>(HKV)),
      vrows = krows;
  const auto keys = testing::RandomTensor(rng, dt, size_t{L} * HKV * T0 * D);
  const auto values = testing::RandomTensor(rng, dt, keys.size() / DTypeSize(dt));
  for (uint32_t l = 0; l < L; ++l)
    for (uint32_t h = 0; h < HKV; ++h) {
      const size_t at = (size_t{l} * HKV + h) * T0 * row;
      krows[l][h].assign(keys.begin() + at, keys.begin() + at + T0 * row);
      vrows[l][h].assign(values.begin() + at, values.begin() + at + T0 * row);
    }
  std::vector<uint8_t> bounds(T0);
  for (size_t i = 0; i < T0; ++i) bounds[i] = i % 11 == 10 ? 3 : 1;
  ASSERT_TRUE(client.AppendKV(*id, TensorView{keys.data(), dt, {L, HKV, T0, D}},
                              TensorView{values.data(), dt, {L, HKV, T0, D}}, bounds)
                  .ok());
  uint64_t T = T0;
  for (int step = 0; step < steps; ++step) {
    const auto nk = testing::RandomTensor(rng, dt, size_t{HKV} * D);
    const auto nv = testing::RandomTensor(rng, dt, size_t{HKV} * D);
    for (uint32_t l = 0; l < L; ++l) {
      for (uint32_t h = 0; h < HKV; ++h) {
        krows[l][h].insert(krows[l][h].end(), nk.begin() + h * row, nk.begin() + (h + 1) * row);
        vrows[l][h].insert(vrows[l][h].end(), nv.begin() + h * row, nv.begin() + (h + 1) * row);
      }
      std::vector<float> q;
      AttendRequest req = RandomAttend(rng, l, HQ, D, dt, &q);
      req.mode = client::Mode::kDense;
      req.new_k = TensorView{nk.data(), dt, {HKV, D}};
      req.new_v = TensorView{nv.data(), dt, {HKV, D}};
      req.boundary = (T + 1) % 11 == 10 ? 3 : 1;
      auto r = client.Attend(*id, req);
      ASSERT_TRUE(r.ok()) << "step " << step << " layer " << l << ": " << r.status().ToString();
      ASSERT_EQ(r->tokens_attended[0], T + 1);
      // The reference over this layer's rows, laid out [L = 1][HKV][T + 1][D].
      std::vector<uint8_t> k, v;
      for (uint32_t h = 0; h < HKV; ++h) {
        k.insert(k.end(), krows[l][h].begin(), krows[l][h].end());
        v.insert(v.end(), vrows[l][h].begin(), vrows[l][h].end());
      }
      std::vector<float> out(HQ * D);
      ConvertToFloat(r->out.data(), r->out_dtype, out.size(), out.data());
      const auto ref = testing::ReferenceAttention(k, v, dt, 1, HKV, T + 1, D, 0, q, HQ);
      EXPECT_LT(testing::RelativeError(out, ref), testing::OutputTolerance(dt))
          << "step " << step << " layer " << l;
    }
    ++T;
  }
  if (client.server().backend.rfind("cuda", 0) == 0) {
    const double patched = testing::MetricValue(admin, "kvmem_dense_plans_total{how=\"patched\"}");
    const double planned = testing::MetricValue(admin, "kvmem_dense_plans_total{how=\"planned\"}");
    EXPECT_EQ(patched + planned, double{L} * steps);
    EXPECT_GT(patched, planned) << "the kept plans were not patched";
    EXPECT_GE(planned, double{L});  // at least each layer's first
  }
  EXPECT_EQ(d.Stop(), 0);
}

// Many threads share one client; each drives its own session through decode steps.
TEST(E2E, ConcurrentClientsAndAsyncCalls) {
  DaemonProcess d({"--executors", "2"});
  ASSERT_TRUE(d.ready());
  auto cl = Client::Connect(d.address());
  ASSERT_TRUE(cl.ok());
  const uint32_t L = 2, HQ = 4, HKV = 2, D = 32;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      auto id = (*cl)->CreateSession(Profile{L, HQ, HKV, D, DType::kF32});
      if (!id.ok()) { failures++; return; }
      std::vector<float> k(L * HKV * D), q(HQ * D);
      for (int step = 0; step < 50; ++step) {
        for (auto& x : k) x = std::normal_distribution<float>()(rng);
        for (auto& x : q) x = std::normal_distribution<float>()(rng);
        std::vector<client::Future<client::AttendResult>> fs;
        for (uint32_t l = 0; l < L; ++l) {
          AttendRequest r;
          r.layer = l;
          r.q = TensorView{q.data(), DType::kF32, {HQ, D}};
          r.new_k = TensorView{k.data() + l * HKV * D, DType::kF32, {HKV, D}};
          r.new_v = r.new_k;
          r.out_dtype = DType::kF32;
          fs.push_back((*cl)->AttendAsync(*id, r));
        }
        for (auto& f : fs) {
          auto res = f.Get();
          if (!res.ok() || res->tokens_attended[0] != static_cast<uint32_t>(step + 1)) failures++;
        }
      }
      if (!(*cl)->DropSession(*id).ok()) failures++;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(d.Stop(), 0);
}

// Index mode and Retrieve through the daemon: the exact top chunks match a brute-force ranking
// computed here from the tensors we sent; index-mode Attend stays within budget.
TEST(E2E, IndexModeRetrieveAndAttend) {
  DaemonProcess d;
  ASSERT_TRUE(d.ready());
  auto cl = Client::Connect(d.address());
  ASSERT_TRUE(cl.ok());
  const uint32_t L = 2, HQ = 8, HKV = 2, D = 64;
  const uint64_t T = 4096;
  client::SessionOptions so;
  so.mode = client::Mode::kIndex;
  so.default_budget_tokens = 512;
  auto id = (*cl)->CreateSession(Profile{L, HQ, HKV, D, DType::kF32}, so);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  std::normal_distribution<float> n01;
  std::vector<float> k(static_cast<size_t>(L) * HKV * T * D), v(k.size());
  std::vector<float> topic(D);
  for (size_t row = 0; row < static_cast<size_t>(L) * HKV * T; ++row) {
    if (row % 256 == 0)
      for (auto& x : topic) x = n01(rng) * 2;
    for (uint32_t dd = 0; dd < D; ++dd) {
      k[row * D + dd] = topic[dd] + n01(rng) * 0.5f;
      v[row * D + dd] = n01(rng);
    }
  }
  std::vector<uint8_t> bounds(T);
  for (uint64_t t = 0; t < T; ++t) bounds[t] = t % 13 == 12 ? 3 : 1;
  ASSERT_TRUE((*cl)->AppendKV(*id, TensorView{k.data(), DType::kF32, {L, HKV, T, D}},
                              TensorView{v.data(), DType::kF32, {L, HKV, T, D}}, bounds).ok());
  auto info = (*cl)->SessionInfo(*id);
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->layers.size(), L);
  EXPECT_GE(info->layers[0].tree_depth, 1u);

  for (int trial = 0; trial < 4; ++trial) {
    const uint32_t layer = trial % L;
    std::vector<float> q(HQ * D);
    const uint64_t target = rng() % T;
    for (uint32_t qh = 0; qh < HQ; ++qh)
      for (uint32_t dd = 0; dd < D; ++dd)
        q[qh * D + dd] = k[((static_cast<size_t>(layer) * HKV + qh / (HQ / HKV)) * T + target) * D + dd];
    auto exact = (*cl)->Retrieve(*id, layer, TensorView{q.data(), DType::kF32, {HQ, D}}, 0, 5);
    ASSERT_TRUE(exact.ok()) << exact.status().ToString();
    ASSERT_EQ(exact->heads.size(), HKV);
    for (uint32_t h = 0; h < HKV; ++h) {
      const auto& sel = exact->heads[h];
      ASSERT_EQ(sel.chunks.size(), 5u);
      // The best chunk's score is the best key score over the whole context for this head.
      double best = -1e300;
      for (uint64_t t = 0; t < T - info->tail_tokens; ++t)
        for (uint32_t g = 0; g < HQ / HKV; ++g) {
          double dot = 0;
          for (uint32_t dd = 0; dd < D; ++dd)
            dot += static_cast<double>(q[(h * (HQ / HKV) + g) * D + dd]) * k[((static_cast<size_t>(layer) * HKV + h) * T + t) * D + dd];
          best = std::max(best, dot);
        }
      EXPECT_NEAR(sel.scores[0], best, 1e-3 * std::fabs(best));
      for (size_t i = 1; i < sel.scores.size(); ++i) EXPECT_LE(sel.scores[i], sel.scores[i - 1]);
    }
    AttendRequest req;
    req.layer = layer;
    req.q = TensorView{q.data(), DType::kF32, {HQ, D}};
    req.out_dtype = DType::kF32;
    req.return_selection = true;
    auto r = (*cl)->Attend(*id, req);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->selection.size(), HKV);
    for (uint32_t h = 0; h < HKV; ++h) {
      EXPECT_LT(r->tokens_attended[h], T / 2) << "index mode attended most of the context";
      uint64_t sel_tokens = 0;
      for (size_t i = 0; i < r->selection[h].chunks.size(); ++i) sel_tokens += r->selection[h].ends[i] - r->selection[h].starts[i];
      EXPECT_LE(sel_tokens, 512u + 32u);
    }
  }
  EXPECT_EQ(d.Stop(), 0);
}

// --append-landing on: packed appends (several in flight) are received straight into their
// chunk blocks over UCX's IOV receive; what is stored must be exactly what was sent.
// An Attend of a Llama-3-8B-like layer (q: 32 x 128 bf16 = 8 KiB) travels eager, not by
// rendezvous (an extra round trip; UCX 1.13 chose it for these sizes even over shared memory);
// an AppendKV of 1 MiB still goes by rendezvous.
TEST(E2E, SmallRequestsAreEagerLargeOnesRendezvous) {
  for (const std::string transport : {"shm", "tcp"}) {
    SCOPED_TRACE(transport);
    const uint16_t admin = testing::FreePort();
    DaemonProcess d({"--admin", "127.0.0.1:" + std::to_string(admin)});
    ASSERT_TRUE(d.ready());
    ClientOptions o;
    o.transport = transport;
    auto cl = Client::Connect(d.address(), o);
    ASSERT_TRUE(cl.ok()) << cl.status().ToString();
    const uint32_t L = 1, HQ = 32, HKV = 8, D = 128;
    const uint64_t T = 256;
    const DType dt = DType::kBF16;
    std::mt19937_64 rng = ::kvmem::testing::SeededRng();
    auto id = (*cl)->CreateSession(Profile{L, HQ, HKV, D, dt, {}, {}, "e2e"});
    ASSERT_TRUE(id.ok());
    const std::string eager = "kvmem_ucx_messages_received_total{protocol=\"eager\"}";
    const std::string rndv = "kvmem_ucx_messages_received_total{protocol=\"rendezvous\"}";
    const double rndv0 = testing::MetricValue(admin, rndv);
    ASSERT_GE(rndv0, 0) << "no " << rndv << " in /metrics";
    auto keys = testing::RandomTensor(rng, dt, size_t{L} * HKV * T * D);
    auto values = testing::RandomTensor(rng, dt, size_t{L} * HKV * T * D);
    std::vector<uint8_t> bounds(T, 1);
    ASSERT_TRUE((*cl)->AppendKV(*id, TensorView{keys.data(), dt, {L, HKV, T, D}},
                                TensorView{values.data(), dt, {L, HKV, T, D}}, bounds).ok());
    const double rndv1 = testing::MetricValue(admin, rndv), eager1 = testing::MetricValue(admin, eager);
    EXPECT_GE(rndv1, rndv0 + 1) << "a 1 MiB AppendKV should go by rendezvous";
    std::vector<uint16_t> q(size_t{HQ} * D);
    for (auto& x : q) x = FloatToBF16(std::normal_distribution<float>()(rng));
    AttendRequest req;
    req.q = TensorView{q.data(), dt, {HQ, D}};
    constexpr int kAttends = 20;
    for (int i = 0; i < kAttends; ++i) ASSERT_TRUE((*cl)->Attend(*id, req).ok());
    EXPECT_EQ(testing::MetricValue(admin, rndv), rndv1) << "an 8 KiB q went by rendezvous";
    EXPECT_GE(testing::MetricValue(admin, eager), eager1 + kAttends);
    cl->reset();
    EXPECT_EQ(d.Stop(), 0);
  }
}

TEST(E2E, PackedAppendsReceivedInPlace) {
  for (const std::string transport : {"shm", "tcp"}) {
    DaemonProcess d({"--append-landing", "on", "--search-threads", "2"});
    ASSERT_TRUE(d.ready());
    ClientOptions o;
    o.transport = transport;
    auto cl = Client::Connect(d.address(), o);
    ASSERT_TRUE(cl.ok()) << cl.status().ToString();
    const uint32_t L = 2, HQ = 8, HKV = 2, D = 64;
    const uint64_t T = 3000;
    const DType dt = DType::kBF16;
    std::mt19937_64 rng(5);
    auto id = (*cl)->CreateSession(Profile{L, HQ, HKV, D, dt, {}, {}, "e2e"});
    ASSERT_TRUE(id.ok());
    auto keys = testing::RandomTensor(rng, dt, size_t{L} * HKV * T * D);
    auto values = testing::RandomTensor(rng, dt, size_t{L} * HKV * T * D);
    std::vector<uint8_t> bounds(T);
    for (auto& b : bounds) b = static_cast<uint8_t>(rng() % 6 == 0 ? 3 : 1);
    const size_t row = D * DTypeSize(dt);
    // Batches of 1..600 tokens, packed [2][L][HKV][n][D], four in flight.
    std::vector<std::vector<uint8_t>> packed;
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    for (uint64_t t = 0; t < T;) {
      const uint64_t n = std::min<uint64_t>(T - t, 1 + rng() % 600);
      std::vector<uint8_t> buf(2 * size_t{L} * HKV * n * row);
      for (int kv = 0; kv < 2; ++kv)
        for (uint32_t lh = 0; lh < L * HKV; ++lh)
          std::memcpy(buf.data() + ((static_cast<size_t>(kv) * L * HKV + lh) * n) * row,
                      (kv ? values : keys).data() + (size_t{lh} * T + t) * row, n * row);
      packed.push_back(std::move(buf));
      ranges.push_back({t, n});
      t += n;
    }
    std::vector<client::Future<client::AppendResult>> window;
    for (size_t i = 0; i < packed.size(); ++i) {
      const auto [t, n] = ranges[i];
      window.push_back((*cl)->AppendKVPackedAsync(*id, TensorView{packed[i].data(), dt, {2, L, HKV, n, D}},
                                                  std::span<const uint8_t>(bounds.data() + t, n)));
      if (window.size() == 4) {
        ASSERT_TRUE(window.front().Get().ok());
        window.erase(window.begin());
      }
    }
    for (auto& f : window) ASSERT_TRUE(f.Get().ok());
    for (uint32_t layer = 0; layer < L; ++layer) {
      std::vector<float> q;
      const AttendRequest req = RandomAttend(rng, layer, HQ, D, DType::kF32, &q);
      auto r = (*cl)->Attend(*id, req);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      std::vector<float> out(HQ * D);
      std::memcpy(out.data(), r->out.data(), out.size() * sizeof(float));
      auto ref = testing::ReferenceAttention(keys, values, dt, L, HKV, T, D, layer, q, HQ);
      EXPECT_LT(testing::RelativeError(out, ref), 1e-4) << transport << " layer " << layer;
      EXPECT_EQ(r->tokens_attended[0], T);
    }
    cl->reset();
    EXPECT_EQ(d.Stop(), 0);
  }
}

TEST(E2E, NoDaemonIsUnavailable) {
  ClientOptions o;
  o.connect_timeout_ms = 500;
  auto cl = Client::Connect("127.0.0.1:" + std::to_string(testing::FreePort()), o);
  ASSERT_FALSE(cl.ok());
  EXPECT_EQ(cl.status().code(), StatusCode::kUnavailable) << cl.status().ToString();
}

}  // namespace
}  // namespace kvmem
