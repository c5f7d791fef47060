// Modes retrieval_heads and hybrid in a session (LycheeDecode): which KV heads select, which
// reuse, which attend densely, layer by layer over decode passes; the retrieval head's blocks
// against a brute-force scan; every Attend output against a double-precision reference over
// exactly the token set the head attended.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <cstdlib>
#include <cstring>
#include <set>

#include "daemon/parallel.h"
#include "daemon/session.h"
#include "testing/reference.h"
#include "testing/staged_pool.h"
#include "testing/seed.h"

namespace kvmem {
namespace {

using testing::StagedPool;

constexpr uint32_t L = 5, HQ = 8, HKV = 2, D = 32, G = HQ / HKV;
constexpr uint32_t kSinks = 16, kBudget = 128, kBlock = 16;
constexpr uint64_t kPrefill = 1500, kCapacity = 1600;

// Layer 0 is dense (its mask entry is ignored); retrieval heads: (1,0), (2,1), (4,0).
ModelProfile Profile() {
  ModelProfile p{L, HQ, HKV, D, DType::kF32};
  p.dense_layers = {0};
  p.retrieval_head_mask.assign(L * HKV, 0);
  p.retrieval_head_mask[0 * HKV + 1] = 1;
  p.retrieval_head_mask[1 * HKV + 0] = 1;
  p.retrieval_head_mask[2 * HKV + 1] = 1;
  p.retrieval_head_mask[4 * HKV + 0] = 1;
  return p;
}

struct Fixture {
  std::unique_ptr<KVPool> pool;
  std::unique_ptr<Session> session;
  std::vector<uint8_t> keys, values;  // [L][HKV][kCapacity][D] f32
  uint64_t T = 0;                     // tokens held
  float* K(uint32_t l, uint32_t h, uint64_t t) {
    return reinterpret_cast<float*>(keys.data()) + ((uint64_t{l} * HKV + h) * kCapacity + t) * D;
  }
  float* V(uint32_t l, uint32_t h, uint64_t t) {
    return reinterpret_cast<float*>(values.data()) + ((uint64_t{l} * HKV + h) * kCapacity + t) * D;
  }
};

Fixture Make(SelectionMode mode, std::mt19937_64& rng, bool staged = false,
             const ModelProfile& profile = Profile()) {
  Fixture f;
  if (staged) {
    f.pool = std::make_unique<StagedPool>(256ull << 20);
  } else {
    f.pool = std::move(*CreateHostPool({256ull << 20, 1ull << 20}));
  }
  SessionOptions o;
  o.mode = mode;
  o.sink_tokens = kSinks;
  o.default_budget_tokens = kBudget;
  o.retrieval.block_tokens = kBlock;
  auto s = Session::Create(9, "t", profile, o, f.pool.get());
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  f.session = std::move(*s);
  f.keys.assign(uint64_t{L} * HKV * kCapacity * D * 4, 0);
  f.values.assign(f.keys.size(), 0);
  std::normal_distribution<float> n01;
  for (uint32_t l = 0; l < L; ++l)
    for (uint32_t h = 0; h < HKV; ++h)
      for (uint64_t t = 0; t < kCapacity; ++t)
        for (uint32_t d = 0; d < D; ++d) {
          f.K(l, h, t)[d] = n01(rng) + (t / 100 % 3 == d % 3 ? 1.5f : 0.f);
          f.V(l, h, t)[d] = n01(rng);
        }
  // Prefill in the session's layout [L][HKV][n][D].
  std::vector<float> k(uint64_t{L} * HKV * kPrefill * D), v(k.size());
  for (uint32_t l = 0; l < L; ++l)
    for (uint32_t h = 0; h < HKV; ++h) {
      std::copy_n(f.K(l, h, 0), kPrefill * D, &k[(uint64_t{l} * HKV + h) * kPrefill * D]);
      std::copy_n(f.V(l, h, 0), kPrefill * D, &v[(uint64_t{l} * HKV + h) * kPrefill * D]);
    }
  std::vector<uint8_t> bounds(kPrefill);
  for (uint64_t t = 0; t < kPrefill; ++t) bounds[t] = t % 11 == 10 ? 3 : 1;
  EXPECT_TRUE(f.session->AppendKV(kPrefill, k.data(), v.data(), bounds.data()).ok());
  f.T = kPrefill;
  return f;
}

std::vector<float> RandomQuery(std::mt19937_64& rng) {
  std::normal_distribution<float> n01;
  std::vector<float> q(HQ * D);
  for (float& x : q) x = n01(rng);
  return q;
}

// Brute-force block scores (max over each block of q̄·k, double) of head h over [kSinks, sealed).
std::vector<double> BruteBlockScores(Fixture& f, uint32_t l, uint32_t h, const std::vector<float>& q,
                                     uint64_t sealed) {
  std::vector<double> qbar(D, 0.0);
  for (uint32_t g = 0; g < G; ++g)
    for (uint32_t d = 0; d < D; ++d) qbar[d] += q[(h * G + g) * D + d] / double(G);
  std::vector<double> s((sealed - kSinks + kBlock - 1) / kBlock, -1e300);
  for (uint64_t t = kSinks; t < sealed; ++t) {
    double dot = 0;
    for (uint32_t d = 0; d < D; ++d) dot += qbar[d] * f.K(l, h, t)[d];
    s[(t - kSinks) / kBlock] = std::max(s[(t - kSinks) / kBlock], dot);
  }
  return s;
}

struct Expect {
  HeadRole role;
  uint32_t source;
};

// One decode pass over every layer (a new token), checking roles and outputs.
void Pass(Fixture& f, SelectionMode mode, std::mt19937_64& rng, const std::vector<std::vector<Expect>>& want) {
  std::normal_distribution<float> n01;
  const SessionStats before = f.session->Stats();
  const uint64_t sealed = before.tokens - before.tail_tokens;
  std::vector<HeadSelection> made(HKV);  // retrieval selections of this pass, by KV head
  const uint64_t t_new = f.T;
  for (uint32_t l = 0; l < L; ++l) {
    std::vector<float> nk(HKV * D), nv(HKV * D);
    for (uint32_t h = 0; h < HKV; ++h)
      for (uint32_t d = 0; d < D; ++d) {
        nk[h * D + d] = f.K(l, h, t_new)[d] = n01(rng);
        nv[h * D + d] = f.V(l, h, t_new)[d] = n01(rng);
      }
    const auto q = RandomQuery(rng);
    std::vector<float> out(HQ * D);
    AttendArgs a;
    a.layer = l;
    a.q = q.data();
    a.q_dtype = DType::kF32;
    a.new_k = nk.data();
    a.new_v = nv.data();
    a.out = out.data();
    a.out_dtype = DType::kF32;
    AttendInfo info;
    ASSERT_TRUE(f.session->Attend(a, &info).ok());
    ASSERT_EQ(info.selection.size(), HKV);
    std::vector<std::vector<uint64_t>> attended(HKV);
    for (uint32_t h = 0; h < HKV; ++h) {
      const HeadSelection& s = info.selection[h];
      SCOPED_TRACE("layer " + std::to_string(l) + " head " + std::to_string(h));
      EXPECT_EQ(s.role, want[l][h].role);
      if (s.role == HeadRole::kRetrieval || s.role == HeadRole::kReused) {
        EXPECT_EQ(s.source_layer, want[l][h].source);
      }
      std::set<uint64_t> ts;
      const bool all = s.role == HeadRole::kDense || s.role == HeadRole::kRetrieval;
      if (all) {
        for (uint64_t t = 0; t <= t_new; ++t) ts.insert(t);
      } else {
        for (uint64_t t = 0; t < kSinks; ++t) ts.insert(t);
        for (uint64_t t = sealed; t <= t_new; ++t) ts.insert(t);  // tail, new token included
        for (size_t i = 0; i < s.starts.size(); ++i)
          for (uint64_t t = s.starts[i]; t < s.ends[i]; ++t) ts.insert(t);
      }
      if (s.role == HeadRole::kRetrieval) {
        made[h] = s;
        uint64_t selected = 0;
        for (size_t i = 0; i < s.starts.size(); ++i) selected += s.ends[i] - s.starts[i];
        if (mode == SelectionMode::kRetrievalHeads) {
          // Top budget/block blocks of the brute-force scan (near-ties may swap).
          EXPECT_TRUE(s.chunks.empty());
          const auto brute = BruteBlockScores(f, l, h, q, sealed);
          auto sorted = brute;
          std::sort(sorted.begin(), sorted.end(), std::greater<double>());
          ASSERT_EQ(s.starts.size(), kBudget / kBlock);
          for (size_t i = 0; i < s.starts.size(); ++i) {
            ASSERT_EQ((s.starts[i] - kSinks) % kBlock, 0u);
            const uint64_t j = (s.starts[i] - kSinks) / kBlock;
            EXPECT_GE(brute[j], sorted[kBudget / kBlock - 1] - 1e-3);
            EXPECT_NEAR(s.scores[i], brute[j], 1e-3);
          }
        } else {
          EXPECT_FALSE(s.chunks.empty());
          EXPECT_LE(selected, kBudget + kSinks);
          EXPECT_GT(selected, kBudget / 2);
        }
      }
      if (s.role == HeadRole::kReused) {
        // Exactly the selection the retrieval head at source_layer made for this KV head.
        ASSERT_EQ(made[h].role, HeadRole::kRetrieval) << "reused a selection not made this pass";
        EXPECT_EQ(s.starts, made[h].starts);
        EXPECT_EQ(s.ends, made[h].ends);
      }
      EXPECT_EQ(info.tokens_attended[h], ts.size());
      attended[h].assign(ts.begin(), ts.end());
    }
    const auto ref = testing::ReferenceAttentionOver(f.keys, f.values, DType::kF32, HKV, kCapacity, D,
                                                     l, q, HQ, attended);
    EXPECT_LT(testing::RelativeError(out, ref), 1e-4) << "layer " << l;
  }
  f.T += 1;
}

constexpr HeadRole kR = HeadRole::kRetrieval, kU = HeadRole::kReused, kD = HeadRole::kDense;

void RunPasses(SelectionMode mode, bool staged = false) {
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  Fixture f = Make(mode, rng, staged);
  // First pass: dense before any selection at an index, then reuse of the last retrieval
  // layer below.
  Pass(f, mode, rng,
       {{{kD, 0}, {kD, 0}}, {{kR, 1}, {kD, 0}}, {{kU, 1}, {kR, 2}}, {{kU, 1}, {kU, 2}}, {{kR, 4}, {kU, 2}}});
  // Later passes: a selection made at or after layer l in the previous pass is not reused
  // at l (head 1 at layer 1: its last selection came from layer 2).
  for (int pass = 0; pass < 2; ++pass) {
    Pass(f, mode, rng,
         {{{kD, 0}, {kD, 0}}, {{kR, 1}, {kD, 0}}, {{kU, 1}, {kR, 2}}, {{kU, 1}, {kU, 2}}, {{kR, 4}, {kU, 2}}});
  }
}

TEST(SessionHybrid, RetrievalHeadsRolesReuseAndOutputs) { RunPasses(SelectionMode::kRetrievalHeads); }

TEST(SessionHybrid, HybridRolesReuseAndOutputs) { RunPasses(SelectionMode::kHybrid); }

// Retrieval heads of one layer scanned / searched in parallel (the daemon's --search-threads).
TEST(SessionHybrid, ParallelSearchPoolSameChecks) {
  ParallelPool pool(3);
  SetSearchPool(&pool);
  RunPasses(SelectionMode::kRetrievalHeads);
  RunPasses(SelectionMode::kHybrid);
  // Every head of layer 1 a retrieval head: the heads are scanned / searched concurrently and
  // must select what a sequential run selects.
  ModelProfile all = Profile();
  for (uint32_t h = 0; h < HKV; ++h) all.retrieval_head_mask[1 * HKV + h] = 1;
  const uint64_t seed = ::kvmem::testing::TestSeed();
  for (SelectionMode mode : {SelectionMode::kRetrievalHeads, SelectionMode::kHybrid}) {
    std::mt19937_64 rng_a(seed), rng_b(seed), rq(seed + 3);
    Fixture par = Make(mode, rng_a, false, all), seq = Make(mode, rng_b, false, all);
    const auto q = RandomQuery(rq);
    SetSearchPool(&pool);
    auto a = par.session->Retrieve(RetrieveArgs{1, q.data(), DType::kF32});
    SetSearchPool(nullptr);
    auto b = seq.session->Retrieve(RetrieveArgs{1, q.data(), DType::kF32});
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->bytes_read, b->bytes_read);
    for (uint32_t h = 0; h < HKV; ++h) {
      EXPECT_EQ(a->heads[h].role, HeadRole::kRetrieval);
      EXPECT_FALSE(a->heads[h].starts.empty());
      EXPECT_EQ(a->heads[h].starts, b->heads[h].starts) << "head " << h;
    }
  }
  SetSearchPool(nullptr);
}

// The same checks through a pool the session must copy out of (the CUDA backend's paths).
TEST(SessionHybrid, StagedPoolRolesReuseAndOutputs) {
  RunPasses(SelectionMode::kRetrievalHeads, /*staged=*/true);
  RunPasses(SelectionMode::kHybrid, /*staged=*/true);
}

TEST(SessionHybrid, StagedPoolSelectsWhatTheHostPoolSelects) {
  const uint64_t seed = ::kvmem::testing::TestSeed();
  for (SelectionMode mode : {SelectionMode::kRetrievalHeads, SelectionMode::kHybrid}) {
    std::mt19937_64 rng_a(seed), rng_b(seed);
    Fixture host = Make(mode, rng_a), staged = Make(mode, rng_b, /*staged=*/true);
    std::mt19937_64 rng(seed + 7);
    for (uint32_t l : {1u, 2u}) {
      const auto q = RandomQuery(rng);
      auto a = host.session->Retrieve(RetrieveArgs{l, q.data(), DType::kF32});
      auto b = staged.session->Retrieve(RetrieveArgs{l, q.data(), DType::kF32});
      ASSERT_TRUE(a.ok() && b.ok());
      EXPECT_EQ(a->bytes_read, b->bytes_read);
      for (uint32_t h = 0; h < HKV; ++h) {
        EXPECT_EQ(a->heads[h].role, b->heads[h].role);
        EXPECT_EQ(a->heads[h].starts, b->heads[h].starts) << "layer " << l << " head " << h;
        EXPECT_EQ(a->heads[h].ends, b->heads[h].ends);
      }
    }
    EXPECT_GT(static_cast<StagedPool*>(staged.pool.get())->copies_out, 0u);
  }
}

// The CUDA backend's scan path (Session::ScanRetrievalHeadsOnDevice: every retrieval head of a
// layer in one pool call, spans over the pool, rules on the host) selects and attends what the
// host pool's per-head scan does.
TEST(SessionHybrid, PoolScanSelectsAndAttendsWhatTheHostScanDoes) {
  const uint64_t seed = ::kvmem::testing::TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng_a(seed), rng_b(seed);
  Fixture host = Make(SelectionMode::kRetrievalHeads, rng_a);
  Fixture staged = Make(SelectionMode::kRetrievalHeads, rng_b, /*staged=*/true);
  auto* pool = static_cast<StagedPool*>(staged.pool.get());
  pool->device_scan = true;
  const uint64_t copies_before = pool->copies_out;
  std::mt19937_64 rng(seed + 11);
  std::normal_distribution<float> n01;
  for (int pass = 0; pass < 2; ++pass) {
    for (uint32_t l = 0; l < L; ++l) {
      SCOPED_TRACE("pass " + std::to_string(pass) + " layer " + std::to_string(l));
      const auto q = RandomQuery(rng);
      std::vector<float> nk(HKV * D), nv(HKV * D);
      for (float& x : nk) x = n01(rng);
      for (float& x : nv) x = n01(rng);
      std::vector<float> out_a(HQ * D), out_b(HQ * D), lse_a(HQ), lse_b(HQ);
      AttendArgs a;
      a.layer = l;
      a.q = q.data();
      a.q_dtype = DType::kF32;
      a.new_k = nk.data();
      a.new_v = nv.data();
      a.out_dtype = DType::kF32;
      a.want_selection = true;
      AttendInfo ia, ib;
      a.out = out_a.data();
      a.lse = lse_a.data();
      ASSERT_TRUE(host.session->Attend(a, &ia).ok());
      a.out = out_b.data();
      a.lse = lse_b.data();
      ASSERT_TRUE(staged.session->Attend(a, &ib).ok());
      EXPECT_FALSE(ia.device_scan);
      const bool has_retrieval = l != 0 && (Profile().IsRetrievalHead(l, 0) || Profile().IsRetrievalHead(l, 1));
      EXPECT_EQ(ib.device_scan, has_retrieval);
      EXPECT_EQ(ia.bytes_read, ib.bytes_read);
      EXPECT_EQ(ia.tokens_attended, ib.tokens_attended);
      ASSERT_EQ(ia.selection.size(), ib.selection.size());
      for (size_t h = 0; h < ia.selection.size(); ++h) {
        EXPECT_EQ(ia.selection[h].role, ib.selection[h].role) << "head " << h;
        EXPECT_EQ(ia.selection[h].starts, ib.selection[h].starts) << "head " << h;
        EXPECT_EQ(ia.selection[h].ends, ib.selection[h].ends) << "head " << h;
        EXPECT_EQ(ia.selection[h].scores, ib.selection[h].scores) << "head " << h;
      }
      for (uint32_t i = 0; i < HQ * D; ++i) ASSERT_NEAR(out_a[i], out_b[i], 1e-4f) << i;
      for (uint32_t i = 0; i < HQ; ++i) ASSERT_NEAR(lse_a[i], lse_b[i], 1e-4f) << i;
    }
  }
  EXPECT_GT(pool->scans, 0u);
  EXPECT_EQ(pool->copies_out, copies_before) << "the scan should not stage keys through CopyOut";
}

TEST(SessionHybrid, RetrieveFollowsTheSameStateAsAttend) {
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  Fixture f = Make(SelectionMode::kRetrievalHeads, rng);
  const auto q = RandomQuery(rng);
  // Fresh session: layer 3 has no selection below it for either head.
  auto r = f.session->Retrieve(RetrieveArgs{3, q.data(), DType::kF32});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->heads[0].role, kD);
  EXPECT_EQ(r->heads[1].role, kD);
  EXPECT_TRUE(r->heads[0].starts.empty());
  // Retrieval at layer 1 (head 0) is kept and reused at layer 3, bytes = one full key scan.
  auto r1 = f.session->Retrieve(RetrieveArgs{1, q.data(), DType::kF32});
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(r1->heads[0].role, kR);
  EXPECT_EQ(r1->bytes_read, (f.session->Stats().tokens - f.session->Stats().tail_tokens - kSinks) * D * 4);
  auto r3 = f.session->Retrieve(RetrieveArgs{3, q.data(), DType::kF32});
  ASSERT_TRUE(r3.ok());
  EXPECT_EQ(r3->heads[0].role, kU);
  EXPECT_EQ(r3->heads[0].source_layer, 1u);
  EXPECT_EQ(r3->heads[0].starts, r1->heads[0].starts);
  EXPECT_EQ(r3->heads[1].role, kD);
  // Rules per request: ratio 0.25 keeps a quarter of the blocks.
  RetrieveArgs ra{1, q.data(), DType::kF32};
  ra.retrieval.rule = index::BlockRule::kRatio;
  ra.retrieval.rule_value = 0.25f;
  auto rr = f.session->Retrieve(ra);
  ASSERT_TRUE(rr.ok());
  const uint64_t blocks = (kPrefill - f.session->Stats().tail_tokens - kSinks + kBlock - 1) / kBlock;
  EXPECT_EQ(rr->heads[0].starts.size(), (blocks + 3) / 4);
  // Token level: block 1.
  ra.retrieval = {};
  ra.retrieval.block_tokens = 1;
  ra.budget_tokens = 40;
  auto rt = f.session->Retrieve(ra);
  ASSERT_TRUE(rt.ok());
  ASSERT_EQ(rt->heads[0].starts.size(), 40u);
  for (size_t i = 0; i < 40; ++i) EXPECT_EQ(rt->heads[0].ends[i], rt->heads[0].starts[i] + 1);
  // Exact search is an index-mode request.
  EXPECT_EQ(f.session->Retrieve(RetrieveArgs{1, q.data(), DType::kF32, 0, 5}).status().code(),
            StatusCode::kInvalidArgument);
}

uint32_t Nodes(const LayerIndexInfo& info) {
  return std::accumulate(info.nodes_per_level.begin(), info.nodes_per_level.end(), 0u);
}

TEST(SessionHybrid, HybridIndexesOnlyRetrievalHeadsUntilAnIndexRequest) {
  const uint64_t seed = ::kvmem::testing::TestSeed();
  std::mt19937_64 rng_a(seed), rng_b(seed);
  Fixture hybrid = Make(SelectionMode::kHybrid, rng_a);
  Fixture index = Make(SelectionMode::kIndex, rng_b);
  // Layer 3 has no retrieval head and layer 0 is dense: their trees stay empty (a root per
  // KV head); layers 1, 2 and 4 hold one indexed head each.
  for (uint32_t l : {0u, 3u}) EXPECT_EQ(Nodes(hybrid.session->IndexInfo(l)), HKV) << "layer " << l;
  for (uint32_t l : {1u, 2u, 4u}) {
    EXPECT_GT(Nodes(hybrid.session->IndexInfo(l)), HKV) << "layer " << l;
    EXPECT_LT(Nodes(hybrid.session->IndexInfo(l)), Nodes(index.session->IndexInfo(l))) << "layer " << l;
  }
  // An index-mode request indexes every tree, exactly as an index session would have.
  std::mt19937_64 rng(seed + 1);
  const auto q = RandomQuery(rng);
  RetrieveArgs ra{3, q.data(), DType::kF32, 128};
  ra.mode = SelectionMode::kIndex;
  auto a = hybrid.session->Retrieve(ra);
  auto b = index.session->Retrieve(ra);
  ASSERT_TRUE(a.ok() && b.ok());
  for (uint32_t l = 0; l < L; ++l) {
    EXPECT_EQ(hybrid.session->IndexInfo(l).nodes_per_level, index.session->IndexInfo(l).nodes_per_level);
  }
  for (uint32_t h = 0; h < HKV; ++h) EXPECT_EQ(a->heads[h].chunks, b->heads[h].chunks);
}

TEST(SessionHybrid, BadRequestsChangeNothing) {
  auto pool = std::move(*CreateHostPool({64ull << 20, 1ull << 20}));
  SessionOptions o;
  o.mode = SelectionMode::kRetrievalHeads;
  ModelProfile no_mask{L, HQ, HKV, D, DType::kF32};
  auto s = Session::Create(1, "t", no_mask, o, pool.get());
  EXPECT_EQ(s.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.status().message().find("retrieval_head_mask"), std::string::npos);
  o.retrieval.rule = index::BlockRule::kThreshold;
  o.retrieval.rule_value = 1.5f;
  s = Session::Create(1, "t", Profile(), o, pool.get());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  o.retrieval = {};
  o.retrieval.block_tokens = 0;
  EXPECT_EQ(Session::Create(1, "t", Profile(), o, pool.get()).status().code(), StatusCode::kInvalidArgument);

  // A dense session asked for mode retrieval_heads without a mask: refused before the token
  // is appended.
  o = {};
  auto dense = std::move(*Session::Create(2, "t", no_mask, o, pool.get()));
  std::vector<float> q(HQ * D, 0.1f), kv(HKV * D, 0.2f), out(HQ * D);
  AttendArgs a;
  a.q = q.data();
  a.q_dtype = DType::kF32;
  a.new_k = kv.data();
  a.new_v = kv.data();
  a.out = out.data();
  a.out_dtype = DType::kF32;
  a.mode = SelectionMode::kHybrid;
  EXPECT_EQ(dense->Attend(a, nullptr).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(dense->layer_tokens(0), 0u);
  // A bad per-call rule is refused the same way.
  o.mode = SelectionMode::kRetrievalHeads;
  auto rh = std::move(*Session::Create(3, "t", Profile(), o, pool.get()));
  a.mode = SelectionMode::kDefault;
  a.retrieval.rule = index::BlockRule::kRatio;
  a.retrieval.rule_value = 3.f;
  EXPECT_EQ(rh->Attend(a, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(rh->layer_tokens(0), 0u);
  a.retrieval = {};
  EXPECT_TRUE(rh->Attend(a, nullptr).ok());
  EXPECT_EQ(rh->layer_tokens(0), 1u);
}

}  // namespace
}  // namespace kvmem
