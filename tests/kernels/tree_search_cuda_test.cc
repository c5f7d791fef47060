// The fused GPU search + sparse attention (kernels/cuda_ops.h, SearchAttend) against the CPU:
// the selection of every KV head equals ClusterTree::SearchBudget (default best-first options)
// chunk for chunk and score for score, and the attention output equals AttendCpu over the spans
// the daemon would build (sinks ∪ selection ∪ recent window ∪ tail). Covers bulk-built,
// flat and lazily grown + maintained trees, incremental DeviceTree syncs, several problems in
// one launch. Fresh random data per run; skips without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "index/cluster_tree.h"
#include "index/summary.h"
#include "kernels/attention.h"
#include "kernels/cuda/search_attend_to.h"
#include "kernels/cuda_ops.h"
#include "kernels/cuda_test_util.h"
#include "testing/seed.h"

namespace kvmem::kernels {
namespace {

namespace kc = kvmem::kernels::cuda;


constexpr uint32_t kD = 128;

struct DeviceMem {
  void* p = nullptr;
  explicit DeviceMem(size_t bytes) { cudaMalloc(&p, std::max<size_t>(bytes, 256)); }
  ~DeviceMem() { cudaFree(p); }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
};

// One session-layer: chunk blocks K[H][t][D] V[H][t][D] (stride = tokens), then a tail block.
struct Session {
  uint32_t H, G;
  std::vector<uint32_t> tokens;
  std::vector<uint64_t> start, block;  // block: element offset in the pool
  uint64_t tail_off = 0;
  uint32_t tail_cap = 64, tail_len = 0;
  std::vector<uint16_t> pool;  // bf16, host copy
  std::vector<index::ClusterTree> trees;
  std::vector<kc::DeviceTree> dev_trees;
  std::vector<FlatTree> exports;  // kept from sync to sync (RunConfig::partial_export)

  Session(uint32_t h, uint32_t g) : H(h), G(g), dev_trees(h), exports(h) {}
  uint64_t sealed() const { return start.empty() ? 0 : start.back() + tokens.back(); }
};

// Appends `n` chunks of topic-structured keys; inserts them into the trees.
void AddChunks(std::mt19937_64& rng, Session* s, uint32_t n, bool insert) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> topic(size_t{s->H} * kD);
  for (uint32_t c = 0; c < n; ++c) {
    if (c % 24 == 0) {
      for (auto& x : topic) x = 1.5f * nd(rng);
    }
    const uint32_t t = 8 + static_cast<uint32_t>(rng() % 17);
    const uint64_t off = s->pool.size();
    s->start.push_back(s->sealed());
    s->tokens.push_back(t);
    s->block.push_back(off);
    s->pool.resize(off + 2ull * s->H * t * kD);
    for (uint32_t h = 0; h < s->H; ++h) {
      std::vector<float> keys(size_t{t} * kD);
      for (uint32_t i = 0; i < t; ++i) {
        for (uint32_t d = 0; d < kD; ++d) {
          const uint16_t k = FloatToBF16(topic[h * kD + d] + 0.5f * nd(rng));
          const uint16_t v = FloatToBF16(nd(rng));
          s->pool[off + (uint64_t{h} * t + i) * kD + d] = k;
          s->pool[off + (uint64_t{s->H + h} * t + i) * kD + d] = v;
          keys[size_t{i} * kD + d] = BF16ToFloat(k);
        }
      }
      if (insert) {
        auto sum = index::SummarizeKeys(keys.data(), t, kD);
        ASSERT_TRUE(sum.ok());
        ASSERT_TRUE(s->trees[h].Insert(static_cast<uint32_t>(s->tokens.size() - 1), *sum, t).ok());
      }
    }
  }
}

// The tail block (random, `len` of `cap` tokens used) after the chunks.
void SetTail(std::mt19937_64& rng, Session* s, uint32_t len) {
  std::normal_distribution<float> nd(0.f, 1.f);
  s->tail_off = s->pool.size();
  s->tail_len = len;
  s->pool.resize(s->tail_off + 2ull * s->H * s->tail_cap * kD);
  for (uint64_t i = s->tail_off; i < s->pool.size(); ++i) s->pool[i] = FloatToBF16(nd(rng));
}

// Session::BuildSparseSpans on the host, for one head's selection.
void HostSpans(const Session& s, uint32_t h, const std::vector<uint32_t>& sel, uint32_t sinks,
               uint64_t recent_from, std::vector<KVSpan>* spans) {
  struct Piece {
    uint32_t chunk, begin, end;
  };
  std::vector<Piece> pieces;
  const uint32_t n = static_cast<uint32_t>(s.tokens.size());
  for (uint32_t c = 0; c < n && s.start[c] < sinks; ++c) {
    pieces.push_back({c, 0, static_cast<uint32_t>(std::min<uint64_t>(s.tokens[c], sinks - s.start[c]))});
  }
  for (uint32_t c = n; c-- > 0 && s.start[c] + s.tokens[c] > recent_from;) {
    const uint64_t b = std::max(recent_from, s.start[c]) - s.start[c];
    pieces.push_back({c, static_cast<uint32_t>(b), s.tokens[c]});
  }
  for (uint32_t c : sel) pieces.push_back({c, 0, s.tokens[c]});
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) {
    return a.chunk != b.chunk ? a.chunk < b.chunk : a.begin < b.begin;
  });
  for (size_t i = 0; i < pieces.size();) {
    Piece cur = pieces[i++];
    while (i < pieces.size() && pieces[i].chunk == cur.chunk && pieces[i].begin <= cur.end) {
      cur.end = std::max(cur.end, pieces[i].end);
      ++i;
    }
    spans->push_back({s.block[cur.chunk], s.tokens[cur.chunk], cur.begin, cur.end});
  }
  (void)h;
  spans->push_back({s.tail_off, s.tail_cap, 0, s.tail_len});
}

struct RunConfig {
  uint32_t budget = 512;
  uint32_t sinks = 16;
  uint32_t recent_window = 0;
  uint32_t cluster_size = 0;  // SearchAttendPlan::cluster_size (0: the device's choice)
  // LaunchSearchAttendInline (one session): q and the plan in the kernel's parameters, over a
  // poisoned workspace that nothing is uploaded to.
  bool inline_launch = false;
  // The trees' uploads staged in one CopyStager and flushed once before the launch (how the
  // daemon's device pool syncs a layer's mirrors).
  bool staged_sync = false;
  // Export only the node rows the mirror lacks (rows_held()), into objects kept from sync to
  // sync (the inserts since are applied; the mirror uploads only what changed since).
  bool partial_export = false;
};

// Runs the fused launch over `sessions` and checks selection and output of every head.
void CheckSessions(std::mt19937_64& rng, std::vector<Session*> sessions, const RunConfig& cfg) {
  // KVMEM_TEST_TRACE=1: each launch's configuration on stderr before it runs, so a launch that
  // never returns shows which one it is (session 25 found a hang this way).
  if (const char* e = std::getenv("KVMEM_TEST_TRACE"); e != nullptr && std::string(e) == "1") {
    const char* flat = std::getenv("KVMEM_SEARCH_FLAT");
    std::fprintf(stderr, "check: %zu sessions, budget %u, cluster %u, flat %s\n", sessions.size(),
                 cfg.budget, cfg.cluster_size, flat ? flat : "auto");
  }
  const uint32_t P = static_cast<uint32_t>(sessions.size());
  const uint32_t H = sessions[0]->H, G = sessions[0]->G, HQ = H * G;
  std::normal_distribution<float> nd(0.f, 1.f);
  // Device pools, q, out, lse; block tables.
  std::vector<std::unique_ptr<DeviceMem>> pools, blocks;
  std::vector<std::vector<FlatTreeView>> views(P);
  std::vector<uint16_t> q(size_t{P} * HQ * kD);
  std::vector<float> qf(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q[i] = FloatToBF16(nd(rng));
    qf[i] = BF16ToFloat(q[i]);
  }
  // Half the query groups aim at a real key of their head (the case search is for).
  for (uint32_t p = 0; p < P; ++p) {
    const Session& s = *sessions[p];
    for (uint32_t h = 0; h < H; ++h) {
      if (rng() % 2) continue;
      const uint32_t c = static_cast<uint32_t>(rng() % s.tokens.size());
      for (uint32_t g = 0; g < G; ++g) {
        for (uint32_t d = 0; d < kD; ++d) {
          const size_t i = (size_t{p} * HQ + h * G + g) * kD + d;
          q[i] = FloatToBF16(0.3f * qf[i] + BF16ToFloat(s.pool[s.block[c] + uint64_t{h} * s.tokens[c] * kD + d]));
          qf[i] = BF16ToFloat(q[i]);
        }
      }
    }
  }
  DeviceMem q_d(q.size() * 2), out_d(q.size() * 2), lse_d(size_t{P} * HQ * 4);
  CUDA_OK(cudaMemcpy(q_d.p, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(out_d.p, 0xff, q.size() * 2));  // poison (NaN)
  std::vector<kc::SearchAttendProblem> probs(P);
  kc::CopyStager stager;
  for (uint32_t p = 0; p < P; ++p) {
    Session& s = *sessions[p];
    pools.emplace_back(new DeviceMem(s.pool.size() * 2));
    CUDA_OK(cudaMemcpy(pools[p]->p, s.pool.data(), s.pool.size() * 2, cudaMemcpyHostToDevice));
    blocks.emplace_back(new DeviceMem(s.block.size() * 8));
    CUDA_OK(cudaMemcpy(blocks[p]->p, s.block.data(), s.block.size() * 8, cudaMemcpyHostToDevice));
    for (uint32_t h = 0; h < H; ++h) {
      FlatTree fresh;
      FlatTree& flat = cfg.partial_export ? s.exports[h] : fresh;
      const NodeRowsHeld held = s.dev_trees[h].rows_held();
      s.trees[h].ExportFlat(&flat, s.dev_trees[h].chunks_epoch() == s.trees[h].chunks_epoch()
                                          ? s.dev_trees[h].chunks_held()
                                          : 0,
                            cfg.partial_export ? &held : nullptr);
      ST_OK(s.dev_trees[h].Sync(flat, nullptr, cfg.staged_sync ? &stager : nullptr));
      views[p].push_back(s.dev_trees[h].view());
    }
    kc::SearchAttendProblem& sp = probs[p];
    sp.attend.pool = pools[p]->p;
    sp.attend.kv_dtype = DType::kBF16;
    sp.attend.q_heads = HQ;
    sp.attend.kv_heads = H;
    sp.attend.head_dim = kD;
    sp.attend.scale = 1.f / std::sqrt(static_cast<float>(kD));
    sp.attend.q = static_cast<uint16_t*>(q_d.p) + size_t{p} * HQ * kD;
    sp.attend.q_dtype = DType::kBF16;
    sp.attend.out = static_cast<uint16_t*>(out_d.p) + size_t{p} * HQ * kD;
    sp.attend.out_dtype = DType::kBF16;
    sp.attend.lse = static_cast<float*>(lse_d.p) + size_t{p} * HQ;
    sp.trees = views[p].data();
    sp.chunk_block = static_cast<const uint64_t*>(blocks[p]->p);
    sp.params.budget_tokens = cfg.budget;
    sp.params.skip_tokens_below = cfg.sinks;
    sp.sink_tokens = cfg.sinks;
    const uint64_t sealed = s.sealed();
    sp.recent_from = sealed > cfg.recent_window ? sealed - cfg.recent_window : 0;
    sp.recent_window = cfg.recent_window;
    sp.tail = {s.tail_off, s.tail_cap, 0, s.tail_len};
  }
  ST_OK(stager.Flush(nullptr));  // nothing staged unless cfg.staged_sync
  kc::SearchAttendPlan plan;
  kc::AttendPlanOptions opt;
  opt.min_split_tokens = 64;  // several splits per head: the merge path runs
  ST_OK(kc::PlanSearchAttend(probs.data(), P, opt, &plan));
  plan.cluster_size = cfg.cluster_size;
  DeviceMem ws(plan.workspace_bytes);
  auto launch = [&] {
    if (!cfg.inline_launch) {
      ST_OK(kc::LaunchSearchAttend(plan, ws.p, nullptr));
      return;
    }
    bool launched = false;
    ST_OK(kc::LaunchSearchAttendInline(plan, ws.p, q.data(), q.size() * 2, q_d.p, nullptr, nullptr,
                                       &launched));
    ASSERT_TRUE(launched) << "q + plan image: " << q.size() * 2 + plan.image.size() << " bytes";
  };
  if (cfg.inline_launch) {
    ASSERT_EQ(P, 1u);
    CUDA_OK(cudaMemset(ws.p, 0xff, plan.workspace_bytes));  // nothing may rely on an upload
    CUDA_OK(cudaMemset(q_d.p, 0xff, q.size() * 2));          // the search puts q there
  } else {
    CUDA_OK(cudaMemset(ws.p, 0, plan.workspace_bytes));
    ST_OK(kc::UploadSearchAttendPlan(plan, ws.p, nullptr));
  }
  launch();
  CUDA_OK(cudaDeviceSynchronize());
  // Twice on the same workspace (graph-replay safety): same answer.
  std::vector<uint16_t> out(q.size()), out2(q.size());
  CUDA_OK(cudaMemcpy(out.data(), out_d.p, out.size() * 2, cudaMemcpyDeviceToHost));
  launch();
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(out2.data(), out_d.p, out.size() * 2, cudaMemcpyDeviceToHost));
  EXPECT_EQ(out, out2);
  const uint32_t T = plan.num_tasks;
  std::vector<kc::SearchTaskResult> res(T);
  std::vector<uint32_t> sel(size_t{T} * plan.max_selected);
  std::vector<float> scores(sel.size());
  auto* ws8 = static_cast<uint8_t*>(ws.p);
  CUDA_OK(cudaMemcpy(res.data(), ws8 + plan.results_off, T * sizeof(res[0]), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(sel.data(), ws8 + plan.selected_off, sel.size() * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(scores.data(), ws8 + plan.scores_off, sel.size() * 4, cudaMemcpyDeviceToHost));
  uint32_t nonempty = 0;
  for (uint32_t p = 0; p < P; ++p) {
    Session& s = *sessions[p];
    std::vector<KVSpan> spans;
    std::vector<uint32_t> head_begin(1, 0);
    for (uint32_t h = 0; h < H; ++h) {
      const uint32_t t = p * H + h;
      SCOPED_TRACE("problem " + std::to_string(p) + " head " + std::to_string(h));
      ASSERT_EQ(res[t].status, 0u);
      index::BudgetSearchOptions o;
      o.skip_tokens_below = cfg.sinks;
      std::span<const float> group(qf.data() + (size_t{p} * HQ + h * G) * kD, size_t{G} * kD);
      auto cpu = s.trees[h].SearchBudget(group, cfg.budget, o);
      ASSERT_TRUE(cpu.ok());
      std::vector<std::pair<uint32_t, float>> a, b;
      for (size_t i = 0; i < cpu->chunks.size(); ++i) a.push_back({cpu->chunks[i], cpu->scores[i]});
      for (uint32_t i = 0; i < res[t].num_selected; ++i) {
        b.push_back({sel[size_t{t} * plan.max_selected + i], scores[size_t{t} * plan.max_selected + i]});
      }
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      EXPECT_EQ(a, b);
      EXPECT_EQ(res[t].selected_tokens, cpu->tokens);
      nonempty += a.empty() ? 0 : 1;
      const uint64_t sealed = s.sealed();
      const size_t before = spans.size();
      HostSpans(s, h, cpu->chunks, cfg.sinks,
                sealed > cfg.recent_window ? sealed - cfg.recent_window : 0, &spans);
      uint32_t attended = 0;
      for (size_t i = before; i < spans.size(); ++i) attended += spans[i].end - spans[i].begin;
      EXPECT_EQ(res[t].attended_tokens, attended);
      head_begin.push_back(static_cast<uint32_t>(spans.size()));
    }
    AttendProblem cp{};
    cp.pool = s.pool.data();
    cp.kv_dtype = DType::kBF16;
    cp.q_heads = HQ;
    cp.kv_heads = H;
    cp.head_dim = kD;
    cp.scale = 1.f / std::sqrt(static_cast<float>(kD));
    cp.q = qf.data() + size_t{p} * HQ * kD;
    cp.q_dtype = DType::kF32;
    cp.spans = spans.data();
    cp.head_span_begin = head_begin.data();
    cp.num_spans = static_cast<uint32_t>(spans.size());
    std::vector<float> ref(size_t{HQ} * kD);
    cp.out = ref.data();
    cp.out_dtype = DType::kF32;
    ST_OK(ValidateAttendProblem(cp));
    AttendCpu(&cp, 1);
    for (uint32_t qh = 0; qh < HQ; ++qh) {
      double e2 = 0, r2 = 0;
      for (uint32_t d = 0; d < kD; ++d) {
        const double x = BF16ToFloat(out[(size_t{p} * HQ + qh) * kD + d]), y = ref[size_t{qh} * kD + d];
        ASSERT_FALSE(std::isnan(x)) << "output not written, head " << qh;
        e2 += (x - y) * (x - y);
        r2 += y * y;
      }
      EXPECT_LT(std::sqrt(e2 / r2), 1e-2) << "problem " << p << " query head " << qh;
    }
  }
  EXPECT_GT(nonempty, 0u);
}

std::mt19937_64 FreshRng() { return ::kvmem::testing::SeededRng(); }

Session* NewSession(std::vector<std::unique_ptr<Session>>* keep, uint32_t H, uint32_t G,
                    index::ClusterTreeOptions o = {}) {
  keep->emplace_back(new Session(H, G));
  for (uint32_t h = 0; h < H; ++h) keep->back()->trees.emplace_back(kD, o);
  return keep->back().get();
}

TEST(TreeSearchCuda, BulkTreesSeveralSessionsMatchCpu) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  std::vector<std::unique_ptr<Session>> keep;
  std::vector<Session*> ss;
  for (int p = 0; p < 3; ++p) {
    Session* s = NewSession(&keep, 4, 4);
    AddChunks(rng, s, 300 + 150 * p, /*insert=*/true);
    for (auto& t : s->trees) t.Maintain();
    SetTail(rng, s, 5 + p * 20);
    ss.push_back(s);
  }
  EXPECT_GE(ss[0]->trees[0].Stats().depth, 2u);
  for (uint32_t budget : {64u, 512u, 2048u}) {
    SCOPED_TRACE("budget " + std::to_string(budget));
    CheckSessions(rng, ss, {budget, 16, 0});
  }
  CheckSessions(rng, ss, {700, 40, 100});  // a recent window and chunks straddling the sinks
  // Every cluster size (blocks sharing one search): the same selection as the CPU, by the flat
  // search (these trees fit it: the default here) and by rounds of leaves.
  for (const char* flat : {"on", "off"}) {
    SCOPED_TRACE(std::string("KVMEM_SEARCH_FLAT=") + flat);
    ASSERT_EQ(setenv("KVMEM_SEARCH_FLAT", flat, 1), 0);
    for (uint32_t cluster : {1u, 2u, 4u, 8u, 16u}) {
      SCOPED_TRACE("cluster " + std::to_string(cluster));
      CheckSessions(rng, ss, {1024, 16, 0, cluster});
      CheckSessions(rng, ss, {333, 40, 100, cluster});
    }
  }
  unsetenv("KVMEM_SEARCH_FLAT");
}

// Many chunks per head (large pools and commits): every cluster size agrees with the CPU.
TEST(TreeSearchCuda, LargeTreesEveryClusterSizeMatchesCpu) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  std::vector<std::unique_ptr<Session>> keep;
  Session* s = NewSession(&keep, 2, 4);
  AddChunks(rng, s, 4000, /*insert=*/true);
  for (auto& t : s->trees) t.Maintain();
  SetTail(rng, s, 17);
  // The flat search takes clusters of 2 and more here (2000 chunks per block at most), the
  // rounds the rest; "off" runs the rounds everywhere.
  for (const char* flat : {"on", "off"}) {
    SCOPED_TRACE(std::string("KVMEM_SEARCH_FLAT=") + flat);
    ASSERT_EQ(setenv("KVMEM_SEARCH_FLAT", flat, 1), 0);
    for (uint32_t cluster : {1u, 2u, 4u, 8u, 16u}) {
      SCOPED_TRACE("cluster " + std::to_string(cluster));
      for (uint32_t budget : {2048u, 8192u}) CheckSessions(rng, {s}, {budget, 16, 0, cluster});
    }
    // Commit slices: a first slice of barely the remaining budget (so the scan usually needs
    // the second; the flat search's first gather likewise, so it usually gathers again), and
    // no slicing at all. The kernel reads the variables at every launch.
    for (const char* slack : {"1", "off"}) {
      SCOPED_TRACE(std::string("KVMEM_SEARCH_SLICE_SLACK=") + slack);
      ASSERT_EQ(setenv("KVMEM_SEARCH_SLICE_SLACK", slack, 1), 0);
      for (uint32_t cluster : {1u, 2u, 9u}) {
        SCOPED_TRACE("cluster " + std::to_string(cluster));
        for (uint32_t budget : {512u, 2048u}) CheckSessions(rng, {s}, {budget, 16, 0, cluster});
      }
      unsetenv("KVMEM_SEARCH_SLICE_SLACK");
    }
  }
  unsetenv("KVMEM_SEARCH_FLAT");
}

// Trees of more nodes than the search stages in shared memory (kSearchMaxCandidates): rank 0
// extends the chains alone and the other ranks list the leaves from the scratch; the rounds
// then go on as for a staged tree (leaves of ~2 chunks: ~3.5K leaves).
TEST(TreeSearchCuda, TreesOverTheStagingLimitMatchCpu) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  std::vector<std::unique_ptr<Session>> keep;
  index::ClusterTreeOptions o;
  o.fine_cluster_chunks = 2;
  o.max_fanout = 64;
  Session* s = NewSession(&keep, 2, 4, o);
  AddChunks(rng, s, 7000, /*insert=*/true);
  for (auto& t : s->trees) t.Maintain();
  SetTail(rng, s, 9);
  for (auto& t : s->trees) {
    uint32_t nodes = 0;
    const auto st = t.Stats();
    for (size_t l = 0; l + 1 < st.nodes_per_level.size(); ++l) nodes += st.nodes_per_level[l];
    ASSERT_GT(nodes, kc::kSearchMaxCandidates);
    ASSERT_LE(st.nodes_per_level.size() >= 2 ? st.nodes_per_level[st.nodes_per_level.size() - 2] : 0u,
              kc::kSearchMaxLeaves);
  }
  ASSERT_EQ(setenv("KVMEM_SEARCH_FLAT", "off", 1), 0);
  for (uint32_t cluster : {1u, 2u, 9u}) {
    SCOPED_TRACE("cluster " + std::to_string(cluster));
    for (uint32_t budget : {256u, 1024u}) CheckSessions(rng, {s}, {budget, 16, 0, cluster});
  }
  unsetenv("KVMEM_SEARCH_FLAT");
}

// q and the plan as the search kernel's parameters (kvmemd with KVMEM_DEVICE_INLINE=on): the same
// selection, output and replay behaviour as an uploaded plan, from a workspace nothing was
// uploaded to.
TEST(TreeSearchCuda, InlineLaunchMatchesCpu) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  std::vector<std::unique_ptr<Session>> keep;
  Session* s = NewSession(&keep, 4, 4);
  AddChunks(rng, s, 1500, /*insert=*/true);
  for (auto& t : s->trees) t.Maintain();
  SetTail(rng, s, 23);
  for (uint32_t cluster : {0u, 1u, 4u}) {
    SCOPED_TRACE("cluster " + std::to_string(cluster));
    for (uint32_t budget : {256u, 1024u}) {
      RunConfig cfg{budget, 16, 0, cluster};
      cfg.inline_launch = true;
      CheckSessions(rng, {s}, cfg);
    }
    RunConfig cfg{500, 40, 100, cluster};  // a recent window and chunks straddling the sinks
    cfg.inline_launch = true;
    CheckSessions(rng, {s}, cfg);
  }
}

// Recent windows of ~300 and ~450 chunks: more fixed pieces than one split's 256 run slots, and
// more chunks wholly inside the window than the 256 listed differences (rank 0 subtracts a
// selected one's tokens itself); session 20's kernel sent these heads to the host search.
TEST(TreeSearchCuda, LongRecentWindowMatchesCpu) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  std::vector<std::unique_ptr<Session>> keep;
  Session* s = NewSession(&keep, 4, 4);
  AddChunks(rng, s, 1500, /*insert=*/true);  // ~24K tokens
  for (auto& t : s->trees) t.Maintain();
  SetTail(rng, s, 37);
  for (uint32_t cluster : {0u, 1u}) {
    for (uint32_t window : {4800u, 7200u}) {
      for (uint32_t budget : {256u, 2048u}) {
        SCOPED_TRACE("cluster " + std::to_string(cluster) + " window " + std::to_string(window) +
                     " budget " + std::to_string(budget));
        CheckSessions(rng, {s}, {budget, 40, window, cluster});
      }
    }
  }
}

TEST(TreeSearchCuda, FlatThenGrownTreesSyncIncrementally) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  std::vector<std::unique_ptr<Session>> keep;
  index::ClusterTreeOptions o;
  o.levels = 1 + static_cast<uint32_t>(rng() % 3);
  Session* s = NewSession(&keep, 2, 8, o);
  AddChunks(rng, s, 40, true);  // below min_chunks_to_cluster: a flat list
  SetTail(rng, s, 0);           // no tail tokens
  EXPECT_EQ(s->trees[0].Stats().depth, 1u);
  CheckSessions(rng, {s}, {256, 16, 0});
  const uint64_t uploaded = s->dev_trees[0].bytes_uploaded();
  // Grow the session (the tail block moves after the new chunks), maintain, sync again.
  s->pool.resize(s->tail_off);
  AddChunks(rng, s, 400, true);
  for (auto& t : s->trees) t.Maintain();
  SetTail(rng, s, 33);
  RunConfig staged{1024, 16, 0};
  staged.staged_sync = true;  // the new chunks and the rebuilt nodes through one CopyStager
  CheckSessions(rng, {s}, staged);
  EXPECT_GT(s->dev_trees[0].bytes_uploaded(), uploaded);
  // A sync with no new chunks uploads the node arrays (bf16 centroid rows) and the leaf order only.
  {
    FlatTree flat;
    s->trees[0].ExportFlat(&flat, s->dev_trees[0].chunks_held());
    EXPECT_TRUE(flat.chunk_radius.empty());
    const uint64_t before = s->dev_trees[0].bytes_uploaded();
    ST_OK(s->dev_trees[0].Sync(flat, nullptr));
    EXPECT_EQ(s->dev_trees[0].bytes_uploaded() - before,
              flat.nodes.size() * (kD * 2 + sizeof(FlatTreeNode)) + flat.leaf_chunks.size() * 4);
  }
  AddChunks(rng, s, 30, true);  // lazy inserts without maintenance
  SetTail(rng, s, 64);
  RunConfig lazy{300, 16, 48};
  lazy.staged_sync = true;
  CheckSessions(rng, {s}, lazy);
  // Partial exports (the rows the mirror lacks), staged and plain, through inserts and repairs.
  for (int round = 0; round < 8; ++round) {
    s->pool.resize(s->tail_off);
    AddChunks(rng, s, round < 4 ? 25 : 1 + round % 3, true);  // later: a decode step's seals
    if (round % 4 == 1) {
      for (auto& t : s->trees) t.Maintain();
    }
    SetTail(rng, s, 20 + round);
    RunConfig partial{512, 16, 32};
    partial.staged_sync = round % 4 < 2;
    partial.partial_export = true;
    CheckSessions(rng, {s}, partial);
  }
  // A partial export made against rows the mirror does not hold (here: the tree's own current
  // rows after an insert the mirror has not seen) is refused before anything goes up.
  {
    s->pool.resize(s->tail_off);
    AddChunks(rng, s, 1, true);
    FlatTree now, flat;
    s->trees[0].ExportFlat(&now);
    const NodeRowsHeld claimed{now.lineage, now.node_row_stamps};
    s->trees[0].ExportFlat(&flat, s->dev_trees[0].chunks_held(), &claimed);
    ASSERT_TRUE(flat.node_rows_partial);
    EXPECT_TRUE(flat.node_rows_at.empty());
    const uint64_t before = s->dev_trees[0].bytes_uploaded();
    EXPECT_EQ(s->dev_trees[0].Sync(flat, nullptr).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(s->dev_trees[0].bytes_uploaded(), before);
  }
}

}  // namespace
}  // namespace kvmem::kernels
