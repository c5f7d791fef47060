// Modes retrieval_heads and hybrid through a real kvmemd: every Attend output equals a
// double-precision reference over exactly the tokens its KV head attended (sinks ∪ the
// selection it made or reused ∪ tail, or everything for dense heads), the roles follow the
// mask across layers, and masks arrive inline, from kvmemctl --retrieval-heads FILE and from
// the daemon config (retrieval_head_masks by profile name).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "client/client.h"
#include "common/dtype.h"
#include "kernels/cuda_ops.h"
#include "testing/cross_backend.h"
#include "testing/daemon_process.h"
#include "testing/reference.h"
#include "testing/seed.h"

namespace kvmem {
namespace {

using client::AttendRequest;
using client::Client;
using client::HeadRole;
using client::Profile;
using client::TensorView;
using testing::DaemonProcess;

constexpr uint32_t L = 4, HQ = 8, HKV = 2, D = 64;
constexpr uint64_t T0 = 3000, kCap = T0 + 4;
constexpr uint32_t kSinks = 16;

// Layer 0 dense; retrieval heads (1, 0) and (2, 1).
std::vector<uint8_t> Mask() {
  std::vector<uint8_t> m(L * HKV, 0);
  m[1 * HKV + 0] = 1;
  m[2 * HKV + 1] = 1;
  return m;
}

void CheckMode(Client& client, client::Mode mode, std::mt19937_64& rng) {
  SCOPED_TRACE(mode == client::Mode::kHybrid ? "hybrid" : "retrieval_heads");
  const DType dt = DType::kBF16;
  Profile p{L, HQ, HKV, D, dt, {0}, Mask(), "hybrid-test"};
  client::SessionOptions so;
  so.mode = mode;
  so.sink_tokens = kSinks;
  so.default_budget_tokens = 256;
  so.retrieval.block_tokens = 32;
  auto id = client.CreateSession(p, so);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  // K/V kept by us as [L][HKV][kCap][D]; the prefill sends the first T0 tokens.
  auto keys = testing::RandomTensor(rng, dt, size_t{L} * HKV * kCap * D);
  auto values = testing::RandomTensor(rng, dt, keys.size() / DTypeSize(dt));
  const size_t esz = DTypeSize(dt);
  std::vector<uint8_t> pk(size_t{L} * HKV * T0 * D * esz), pv(pk.size());
  for (size_t lh = 0; lh < L * HKV; ++lh) {
    std::memcpy(&pk[lh * T0 * D * esz], &keys[lh * kCap * D * esz], T0 * D * esz);
    std::memcpy(&pv[lh * T0 * D * esz], &values[lh * kCap * D * esz], T0 * D * esz);
  }
  std::vector<uint8_t> bounds(T0);
  for (size_t i = 0; i < T0; ++i) bounds[i] = i % 13 == 12 ? 3 : 1;
  auto appended = client.AppendKV(*id, TensorView{pk.data(), dt, {L, HKV, T0, D}},
                                  TensorView{pv.data(), dt, {L, HKV, T0, D}}, bounds);
  ASSERT_TRUE(appended.ok()) << appended.status().ToString();
  auto info = client.SessionInfo(*id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->profile.retrieval_head_mask, Mask());
  EXPECT_EQ(info->options.retrieval.block_tokens, 32u);
  const uint64_t sealed = info->tokens - info->tail_tokens;

  // One decode pass: a new token in every layer.
  const HeadRole want[L][HKV] = {{HeadRole::kDense, HeadRole::kDense},
                                 {HeadRole::kRetrieval, HeadRole::kDense},
                                 {HeadRole::kReused, HeadRole::kRetrieval},
                                 {HeadRole::kReused, HeadRole::kReused}};
  std::vector<client::HeadSelection> made(HKV);
  for (uint32_t l = 0; l < L; ++l) {
    std::vector<uint8_t> nk(HKV * D * esz), nv(nk.size());
    auto fresh_k = testing::RandomTensor(rng, dt, HKV * D), fresh_v = testing::RandomTensor(rng, dt, HKV * D);
    for (uint32_t h = 0; h < HKV; ++h) {
      std::memcpy(&keys[((size_t{l} * HKV + h) * kCap + T0) * D * esz], &fresh_k[h * D * esz], D * esz);
      std::memcpy(&values[((size_t{l} * HKV + h) * kCap + T0) * D * esz], &fresh_v[h * D * esz], D * esz);
    }
    std::vector<float> q(HQ * D);
    std::normal_distribution<float> n01;
    for (auto& x : q) x = n01(rng);
    AttendRequest req;
    req.layer = l;
    req.q = TensorView{q.data(), DType::kF32, {HQ, D}};
    req.new_k = TensorView{fresh_k.data(), dt, {HKV, D}};
    req.new_v = TensorView{fresh_v.data(), dt, {HKV, D}};
    req.return_selection = true;
    req.out_dtype = DType::kF32;
    auto r = client.Attend(*id, req);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->selection.size(), HKV) << "layer " << l;
    std::vector<std::vector<uint64_t>> attended(HKV);
    for (uint32_t h = 0; h < HKV; ++h) {
      const client::HeadSelection& s = r->selection[h];
      EXPECT_EQ(s.role, want[l][h]) << "layer " << l << " head " << h;
      std::set<uint64_t> ts;
      if (s.role == HeadRole::kDense || s.role == HeadRole::kRetrieval) {  // full attention
        for (uint64_t t = 0; t <= T0; ++t) ts.insert(t);
      } else {
        for (uint64_t t = 0; t < kSinks; ++t) ts.insert(t);
        for (uint64_t t = sealed; t <= T0; ++t) ts.insert(t);
        for (size_t i = 0; i < s.starts.size(); ++i)
          for (uint64_t t = s.starts[i]; t < s.ends[i]; ++t) ts.insert(t);
        EXPECT_LT(ts.size(), T0 / 4) << "a sparse head attended most of the context";
      }
      if (s.role == HeadRole::kRetrieval) {
        made[h] = s;
        EXPECT_EQ(s.source_layer, l);
        EXPECT_FALSE(s.starts.empty());
        EXPECT_EQ(s.chunks.empty(), mode == client::Mode::kRetrievalHeads);
      }
      if (s.role == HeadRole::kReused) {
        EXPECT_EQ(s.source_layer, made[h].source_layer);
        EXPECT_EQ(s.starts, made[h].starts);
        EXPECT_EQ(s.ends, made[h].ends);
      }
      EXPECT_EQ(r->tokens_attended[h], ts.size());
      attended[h].assign(ts.begin(), ts.end());
    }
    std::vector<float> out(HQ * D);
    ConvertToFloat(r->out.data(), r->out_dtype, out.size(), out.data());
    const auto ref = testing::ReferenceAttentionOver(keys, values, dt, HKV, kCap, D, l, q, HQ, attended);
    EXPECT_LT(testing::RelativeError(out, ref), 1e-4) << "layer " << l;
  }

  // Retrieve: the retrieval head at layer 1 with a top_p rule over single tokens.
  std::vector<float> q(HQ * D, 0.f);
  client::RetrieveRequest rr;
  rr.layer = 1;
  rr.q = TensorView{q.data(), DType::kF32, {HQ, D}};
  rr.retrieval.rule = client::SelectionRule::kTopP;
  rr.retrieval.rule_value = 0.5f;
  rr.retrieval.block_tokens = 1;
  auto got = client.Retrieve(*id, rr);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->heads[0].role, HeadRole::kRetrieval);
  EXPECT_EQ(got->heads[1].role, HeadRole::kDense);
  if (mode == client::Mode::kRetrievalHeads) {
    // q = 0: every token scores 0, so top-p 0.5 keeps the first half of the tokens past the
    // sinks (ties by position), one token per range.
    auto now = client.SessionInfo(*id);  // the pass may have sealed a chunk
    ASSERT_TRUE(now.ok());
    const uint64_t selectable = now->tokens - now->tail_tokens - kSinks;
    EXPECT_GE(got->heads[0].starts.size(), selectable / 2);  // rounding may add one
    EXPECT_LE(got->heads[0].starts.size(), selectable / 2 + 1);
    EXPECT_EQ(got->heads[0].starts.front(), kSinks);
    EXPECT_EQ(got->bytes_read, selectable * D * esz);
  }
  rr.retrieval.rule_value = 1.5f;
  EXPECT_EQ(client.Retrieve(*id, rr).status().code(), StatusCode::kInvalidArgument);
  // Enum values this daemon does not know are refused by name, and the session carries on.
  rr.retrieval = {};
  rr.retrieval.rule = static_cast<client::SelectionRule>(99);
  auto unknown = client.Retrieve(*id, rr);
  EXPECT_EQ(unknown.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("retrieval_rule"), std::string::npos);
  rr.retrieval = {};
  rr.retrieval.pooling = static_cast<client::BlockPooling>(7);
  EXPECT_EQ(client.Retrieve(*id, rr).status().code(), StatusCode::kInvalidArgument);
  rr.retrieval = {};
  EXPECT_TRUE(client.Retrieve(*id, rr).ok());
  EXPECT_TRUE(client.DropSession(*id).ok());
}

TEST(HybridHeads, AttendMatchesReferenceOnTheSelectedTokens) {
  DaemonProcess d;
  ASSERT_TRUE(d.ready());
  auto cl = Client::Connect(d.address());
  ASSERT_TRUE(cl.ok()) << cl.status().ToString();
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  CheckMode(**cl, client::Mode::kRetrievalHeads, rng);
  CheckMode(**cl, client::Mode::kHybrid, rng);
  // No mask: refused with a message that says what is missing.
  client::SessionOptions so;
  so.mode = client::Mode::kHybrid;
  auto bad = (*cl)->CreateSession(Profile{L, HQ, HKV, D, DType::kBF16, {}, {}, "x"}, so);
  EXPECT_EQ(bad.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(bad.status().message().find("retrieval_head_mask"), std::string::npos);
  EXPECT_EQ(d.Stop(), 0);
}

// The same requests to kvmemd --backend cuda and kvmemd --backend cpu, both modes, over decode
// passes that seal chunks: the same roles and source layers per head, best-first block scores
// equal within fp32 tolerance rank by rank, outputs within bf16 tolerance. A sparse head's
// output is compared when the selection it reuses is the same set on both (two near-tied blocks
// may swap at the rule's cut: device and host sum dot products in different orders). Skips
// without a GPU.
TEST(HybridHeads, CudaBackendMatchesCpuBackend) {
  if (kernels::cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible: cuda backend test skipped";
  constexpr uint32_t kL = 3, kHq = 16, kHkv = 4, kD = 128;
  constexpr uint64_t kT = 6000;
  testing::BackendPair daemons({});
  ASSERT_TRUE(daemons.ok());
  const uint64_t seed = ::kvmem::testing::TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  // Layer 0 dense; retrieval heads (1,0), (1,2), (2,1).
  std::vector<uint8_t> mask(kL * kHkv, 0);
  mask[1 * kHkv + 0] = mask[1 * kHkv + 2] = mask[2 * kHkv + 1] = 1;
  const DType dt = DType::kBF16;
  const testing::TopicKV kv(kL * kHkv, kT, kD, 150, rng);
  std::vector<uint8_t> bounds(kT);
  for (uint64_t t = 0; t < kT; ++t) bounds[t] = t % 11 == 10 ? 3 : 1;
  uint32_t compared = 0, total = 0;
  for (client::Mode mode : {client::Mode::kRetrievalHeads, client::Mode::kHybrid}) {
    SCOPED_TRACE(mode == client::Mode::kHybrid ? "hybrid" : "retrieval_heads");
    Profile p{kL, kHq, kHkv, kD, dt, {0}, mask, "cross-backend"};
    client::SessionOptions so;
    so.mode = mode;
    so.sink_tokens = kSinks;
    so.default_budget_tokens = 512;
    so.retrieval.block_tokens = 64;
    const auto [ig, ic] = daemons.Open(p, so, kv, bounds);
    ASSERT_FALSE(HasFailure());
    for (int pass = 0; pass < 12; ++pass) {
      std::vector<bool> same_kept(kHkv, true);
      for (uint32_t l = 0; l < kL; ++l) {
        SCOPED_TRACE("pass " + std::to_string(pass) + " layer " + std::to_string(l));
        const testing::DecodeStep step(kv, l, kHq, kHkv, rng);
        AttendRequest req = step.req;
        auto both = daemons.Attend(ig, ic, req, kHkv);
        ASSERT_TRUE(both.has_value());
        const client::AttendResult& rg = both->first;
        const client::AttendResult& rc = both->second;
        std::vector<bool> comparable(kHkv, true);
        for (uint32_t h = 0; h < kHkv; ++h) {
          const client::HeadSelection& x = rg.selection[h];
          const client::HeadSelection& y = rc.selection[h];
          EXPECT_EQ(x.role, y.role) << "head " << h;
          EXPECT_EQ(x.source_layer, y.source_layer) << "head " << h;
          if (x.role == HeadRole::kRetrieval) {
            ASSERT_EQ(x.scores.size(), y.scores.size()) << "head " << h;
            for (size_t i = 0; i < x.scores.size(); ++i) {
              EXPECT_NEAR(x.scores[i], y.scores[i], 2e-4 * (1 + std::fabs(y.scores[i]))) << "head " << h << " rank " << i;
            }
            auto xs = x.starts, ys = y.starts;
            std::sort(xs.begin(), xs.end());
            std::sort(ys.begin(), ys.end());
            same_kept[h] = xs == ys;
          } else if (x.role == HeadRole::kReused) {
            comparable[h] = same_kept[h];
          }
          if (comparable[h]) {
            EXPECT_EQ(rg.tokens_attended[h], rc.tokens_attended[h]) << "head " << h;
          }
        }
        total += kHq;
        compared += testing::ExpectOutputsAgree(rg, rc, kHq, kD, comparable);
      }
    }
    EXPECT_TRUE(daemons.g->DropSession(ig).ok());
    EXPECT_TRUE(daemons.c->DropSession(ic).ok());
  }
  EXPECT_GT(compared, total * 9 / 10) << "near ties at the rule's cut should be rare";
  EXPECT_EQ(daemons.gpu.Stop(), 0);
  EXPECT_EQ(daemons.cpu.Stop(), 0);
}

TEST(HybridHeads, MaskFromKvmemctlFileAndFromDaemonConfig) {
  const auto dir = std::filesystem::temp_directory_path() / ("kvmem-hybrid-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  {
    std::ofstream(dir / "heads.json") << R"({"retrieval_heads": [[0,0],[1,0],[0,1],[0,0]], "dense_layers": [0]})";
    std::ofstream(dir / "kvmemd.json") << R"({"retrieval_head_masks": {"tiny-llm": "heads.json"}})";
    std::ofstream(dir / "bad.json") << "[[0,0],[1,0]]";
  }
  DaemonProcess d({"--config", (dir / "kvmemd.json").string()});
  ASSERT_TRUE(d.ready());
  auto cl = Client::Connect(d.address());
  ASSERT_TRUE(cl.ok());
  // kvmemctl reads the file and sends the mask inline.
  int rc = -1;
  const std::string base = "--addr " + d.address() + " session create --layers 4 --q-heads 8 --kv-heads 2 "
                           "--head-dim 64 --mode retrieval_heads --rule top_p --rule-value 0.8 ";
  const std::string out = testing::Kvmemctl(base + "--retrieval-heads " + (dir / "heads.json").string(), &rc);
  ASSERT_EQ(rc, 0) << out;
  auto info = (*cl)->SessionInfo(std::stoull(out));
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->profile.retrieval_head_mask, Mask());
  EXPECT_EQ(info->profile.dense_layers, (std::vector<uint32_t>{0}));
  EXPECT_EQ(info->options.mode, client::Mode::kRetrievalHeads);
  EXPECT_EQ(info->options.retrieval.rule, client::SelectionRule::kTopP);
  EXPECT_FLOAT_EQ(info->options.retrieval.rule_value, 0.8f);
  // session show reports the roles' configuration.
  const std::string shown = testing::Kvmemctl("--addr " + d.address() + " --json session show " + out, &rc);
  ASSERT_EQ(rc, 0) << shown;
  EXPECT_NE(shown.find("\"retrieval_heads\":2"), std::string::npos) << shown;
  EXPECT_NE(shown.find("\"rule\":\"top_p\""), std::string::npos) << shown;
  // A mask of the wrong shape is refused before anything is sent (exit 1, daemon error path).
  testing::Kvmemctl(base + "--retrieval-heads " + (dir / "bad.json").string(), &rc);
  EXPECT_EQ(rc, 1);
  // The daemon fills in the mask of a known model name when the profile has none.
  client::SessionOptions so;
  so.mode = client::Mode::kHybrid;
  auto id = (*cl)->CreateSession(Profile{L, HQ, HKV, D, DType::kBF16, {}, {}, "tiny-llm"}, so);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  info = (*cl)->SessionInfo(*id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->profile.retrieval_head_mask, Mask());
  EXPECT_EQ(info->profile.dense_layers, (std::vector<uint32_t>{0}));
  // Same name, wrong shape: a clear error naming the config entry.
  auto bad = (*cl)->CreateSession(Profile{2, HQ, HKV, D, DType::kBF16, {}, {}, "tiny-llm"}, so);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("retrieval_head_masks.tiny-llm"), std::string::npos)
      << bad.status().ToString();
  EXPECT_EQ(d.Stop(), 0);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvmem
