// CPU references of kernels/index_ops.h and DenseAttendCpu against brute-force definitions, and
// the CUDA attention planner's packing (host only, so it runs everywhere).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "kernels/attention.h"
#include "kernels/cuda_ops.h"
#include "kernels/detail/attention_plan_layout.h"
#include "kernels/index_ops.h"
#include "testing/seed.h"

namespace kvmem::kernels {
namespace {

std::mt19937_64 FreshRng() { return ::kvmem::testing::SeededRng(); }

TEST(IndexOpsCpu, BoundsDominateExactChunkScores) {
  auto rng = FreshRng();
  std::normal_distribution<float> nd(0.f, 1.f);
  const uint32_t hkv = 2, D = 32, G = 4, n = 50;
  std::vector<KVSpan> chunks;
  uint64_t total = 0;
  for (uint32_t i = 0; i < n; ++i) {
    chunks.push_back({total, 16, 0, 1 + static_cast<uint32_t>(rng() % 16)});
    total += 2ull * hkv * 16 * D;
  }
  std::vector<float> pool(total);
  for (float& x : pool) x = nd(rng);
  std::vector<float> cen(n * hkv * D), rad(n * hkv), nrm(n * hkv);
  ChunkSummaryCpu(
      {pool.data(), DType::kF32, hkv, D, chunks.data(), n, cen.data(), rad.data(), nrm.data()});
  std::vector<float> q(G * D);
  for (float& x : q) x = nd(rng);
  std::vector<uint32_t> pn, pg, ih, ig;
  std::vector<KVSpan> ich;
  for (uint32_t c = 0; c < n; ++c) {
    for (uint32_t h = 0; h < hkv; ++h) {
      pn.push_back(c * hkv + h);
      pg.push_back(0);
      ih.push_back(h);
      ig.push_back(0);
      ich.push_back(chunks[c]);
    }
  }
  const uint32_t m = static_cast<uint32_t>(pn.size());
  std::vector<float> b(m), s(m);
  NodeBoundsCpu({cen.data(), rad.data(), q.data(), G, D, pn.data(), pg.data(), m, b.data()});
  ChunkMaxScoresCpu({pool.data(), DType::kF32, hkv, D, q.data(), G, ich.data(), ih.data(),
                     ig.data(), m, s.data()});
  for (uint32_t i = 0; i < m; ++i) {
    EXPECT_GE(b[i], s[i]) << i;
    // Brute force max over keys and group.
    const KVSpan& c = ich[i];
    float best = -std::numeric_limits<float>::infinity();
    for (uint32_t t = c.begin; t < c.end; ++t) {
      const float* k = &pool[c.offset + (ih[i] * c.stride_tokens + t) * D];
      for (uint32_t g = 0; g < G; ++g) {
        float dot = 0;
        for (uint32_t d = 0; d < D; ++d) dot += q[g * D + d] * k[d];
        best = std::max(best, dot);
      }
    }
    EXPECT_FLOAT_EQ(s[i], best);
  }
}

TEST(IndexOpsCpu, TopKMatchesFullSort) {
  auto rng = FreshRng();
  std::normal_distribution<float> nd(0.f, 1.f);
  const uint32_t n = 500, k = 40, rows = 3;
  std::vector<float> s(rows * n);
  for (float& x : s) x = std::round(nd(rng) * 3.f) / 3.f;  // ties
  std::vector<uint32_t> idx(rows * k);
  TopKCpu({s.data(), rows, n, k, idx.data(), nullptr});
  for (uint32_t r = 0; r < rows; ++r) {
    std::vector<uint32_t> all(n);
    for (uint32_t i = 0; i < n; ++i) all[i] = i;
    const float* row = &s[r * n];
    std::stable_sort(all.begin(), all.end(),
                     [row](uint32_t a, uint32_t b) { return row[a] > row[b]; });
    for (uint32_t j = 0; j < k; ++j) EXPECT_EQ(idx[r * k + j], all[j]);
  }
  EXPECT_FALSE(ValidateTopKView({s.data(), rows, n, n + 1, idx.data(), nullptr}).ok());
}

TEST(IndexOpsCpu, PooledMeanEqualsMeanKeyScore) {
  auto rng = FreshRng();
  std::normal_distribution<float> nd(0.f, 1.f);
  const uint32_t hkv = 2, hq = 4, D = 16, cap = 40;
  std::vector<float> pool(2 * hkv * cap * D);
  for (float& x : pool) x = nd(rng);
  std::vector<KVSpan> spans{{0, cap, 3, 20}, {0, cap, 25, 40}};
  std::vector<uint32_t> prefix{0, 17, 32};
  std::vector<float> q(hq * D);
  for (float& x : q) x = nd(rng);
  const uint32_t B = 8, nb = PooledNumBlocks(32, B), head = 1;
  std::vector<float> mx(nb), mean(nb);
  PooledBlockScoresView v{pool.data(), DType::kF32,     hkv,           hq, D,
                          q.data(),    spans.data(),    prefix.data(), 2,  32,
                          B,           BlockPool::kMax, &head,         1,  mx.data()};
  PooledBlockScoresCpu(v);
  v.mode = BlockPool::kMean;
  v.scores = mean.data();
  PooledBlockScoresCpu(v);
  // Token order: 3..19 then 25..39.
  std::vector<uint32_t> toks;
  for (uint32_t t = 3; t < 20; ++t) toks.push_back(t);
  for (uint32_t t = 25; t < 40; ++t) toks.push_back(t);
  for (uint32_t j = 0; j < nb; ++j) {
    double m = -1e30, sum = 0;
    uint32_t cnt = 0;
    for (uint32_t p = j * B; p < std::min<uint32_t>(32, (j + 1) * B); ++p, ++cnt) {
      const float* k = &pool[(head * cap + toks[p]) * D];
      double dot = 0;
      for (uint32_t d = 0; d < D; ++d) dot += 0.5 * (q[2 * D + d] + q[3 * D + d]) * k[d];
      m = std::max(m, dot);
      sum += dot;
    }
    EXPECT_NEAR(mx[j], m, 1e-4);
    EXPECT_NEAR(mean[j], sum / cnt, 1e-4);
  }
}

// TokenLogitsCpu against the definition (double sums over the keys as stored), and the host
// pool's TokenLogitsBlocked (both instruction sets) against TokenLogitsCpu within float
// rounding: every dtype, GQA groups of 1 and 4, spans that start inside their block, items of
// several heads, empty items.
TEST(IndexOpsCpu, TokenLogitsBlockedMatchesReference) {
  auto rng = FreshRng();
  std::normal_distribution<float> nd(0.f, 1.f);
  for (DType kv : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (uint32_t G : {1u, 4u}) {
      SCOPED_TRACE(std::string(DTypeName(kv)) + " G " + std::to_string(G));
      const uint32_t hkv = 3, hq = hkv * G, D = 128, cap = 48, blocks = 5;
      const size_t esize = DTypeSize(kv);
      // Blocks of [K heads][cap][D] then [V heads][cap][D], back to back.
      const size_t block_elems = size_t{2} * hkv * cap * D;
      std::vector<float> vals(blocks * block_elems);
      for (float& x : vals) x = nd(rng) * 2.f;
      std::vector<uint8_t> pool(vals.size() * esize);
      ConvertFromFloat(vals.data(), vals.size(), kv, pool.data());
      std::vector<float> stored(vals.size());  // the keys as the pool holds them
      ConvertToFloat(pool.data(), kv, vals.size(), stored.data());
      std::vector<float> q(size_t{hq} * D);
      for (float& x : q) x = nd(rng);
      std::vector<KVSpan> spans;
      std::vector<uint32_t> heads, prefix{0};
      for (uint32_t i = 0; i < 12; ++i) {
        const uint32_t b = static_cast<uint32_t>(rng() % blocks);
        const uint32_t begin = static_cast<uint32_t>(rng() % cap);
        // Every fourth item empty; the others 1..cap - begin tokens (some longer than a block of 32).
        const uint32_t end = i % 4 == 3 ? begin : begin + 1 + static_cast<uint32_t>(rng() % (cap - begin));
        spans.push_back({b * block_elems, cap, begin, end});
        heads.push_back(static_cast<uint32_t>(rng() % hkv));
        prefix.push_back(prefix.back() + (end - begin));
      }
      const uint32_t total = prefix.back();
      const float scale = 1.f / std::sqrt(static_cast<float>(D));
      const float kPoison = -12345.f;
      std::vector<float> ref(size_t{total} * G + 1, kPoison), fast(ref), base(ref);
      TokenLogitsView v{pool.data(),  kv,     hkv,         hq,         D,     scale, q.data(),
                        spans.data(), heads.data(), prefix.data(), 12, total, ref.data()};
      TokenLogitsCpu(v);
      v.logits = fast.data();
      TokenLogitsBlocked(v);
      v.logits = base.data();
      TokenLogitsBlocked(v, CpuIsa::kBaseline);
      EXPECT_EQ(ref.back(), kPoison);  // guard after the last logit
      EXPECT_EQ(fast.back(), kPoison);
      EXPECT_EQ(base.back(), kPoison);
      for (uint32_t i = 0; i < 12; ++i) {
        const KVSpan& s = spans[i];
        for (uint32_t t = s.begin; t < s.end; ++t) {
          const float* k = &stored[s.offset + (size_t{heads[i]} * cap + t) * D];
          for (uint32_t g = 0; g < G; ++g) {
            const float* qg = &q[(size_t{heads[i]} * G + g) * D];
            double dot = 0, mag = 0;
            for (uint32_t d = 0; d < D; ++d) {
              dot += double{qg[d]} * k[d];
              mag += std::abs(double{qg[d]} * k[d]);
            }
            const size_t at = (size_t{prefix[i]} + t - s.begin) * G + g;
            EXPECT_FLOAT_EQ(ref[at], static_cast<float>(dot * scale)) << i << " " << t << " " << g;
            // Float sums of D products: error within a few ulps of the sum of magnitudes.
            const double tol = 1e-6 * mag * scale + 1e-30;
            EXPECT_NEAR(fast[at], ref[at], tol) << i << " " << t << " " << g;
            EXPECT_NEAR(base[at], ref[at], tol) << i << " " << t << " " << g;
          }
        }
      }
    }
  }
}

TEST(DenseAttendCpu, MatchesAttendCpuOnSameData) {
  auto rng = FreshRng();
  std::normal_distribution<float> nd(0.f, 1.f);
  const uint32_t B = 2, hq = 8, hkv = 2, D = 32, cap = 50;
  // Dense layout K[b][h][cap][D], V likewise; the pool layout puts K then V per block, so each
  // sequence becomes one block of the pool with the same rows.
  std::vector<float> k(B * hkv * cap * D), v(k.size()), q(B * hq * D);
  for (float& x : k) x = nd(rng);
  for (float& x : v) x = nd(rng);
  for (float& x : q) x = nd(rng);
  std::vector<uint32_t> lens{cap, 17};
  std::vector<float> out(B * hq * D), lse(B * hq);
  DenseAttendView dv{k.data(),    v.data(),   DType::kF32, B,         hq,   hkv,
                     D,           cap,        lens.data(), cap,       0.2f, q.data(),
                     DType::kF32, out.data(), DType::kF32, lse.data()};
  ASSERT_TRUE(ValidateDenseAttendView(dv).ok());
  DenseAttendCpu(dv);
  for (uint32_t b = 0; b < B; ++b) {
    std::vector<float> pool(2 * hkv * cap * D);
    std::copy_n(&k[b * hkv * cap * D], hkv * cap * D, pool.begin());
    std::copy_n(&v[b * hkv * cap * D], hkv * cap * D, pool.begin() + hkv * cap * D);
    KVSpan span{0, cap, 0, lens[b]};
    std::vector<float> o2(hq * D), l2(hq);
    AttendProblem p{pool.data(), DType::kF32, hq,      hkv, D,         0.2f,        &q[b * hq * D],
                    DType::kF32, &span,       nullptr, 1,   o2.data(), DType::kF32, l2.data()};
    AttendCpu(&p, 1);
    for (uint32_t i = 0; i < hq * D; ++i) EXPECT_FLOAT_EQ(out[b * hq * D + i], o2[i]);
    for (uint32_t i = 0; i < hq; ++i) EXPECT_FLOAT_EQ(lse[b * hq + i], l2[i]);
  }
}

// The planner must cover every head's tokens exactly once, in order, within the split size and
// the runs-per-item cap, and give empty heads one empty item.
TEST(AttendPlan, CoversEveryTokenOnce) {
  auto rng = FreshRng();
  const uint32_t hq = 8, hkv = 4, D = 128;
  std::vector<KVSpan> spans;
  std::vector<uint32_t> hb;
  for (uint32_t h = 0; h < hkv; ++h) {
    hb.push_back(static_cast<uint32_t>(spans.size()));
    if (h == 2) continue;
    const int n = h == 3 ? 600 : 1 + static_cast<int>(rng() % 20);
    for (int s = 0; s < n; ++s) {
      const uint32_t a = static_cast<uint32_t>(rng() % 50);
      const uint32_t len = h == 3 ? 1 : static_cast<uint32_t>(rng() % 700);
      spans.push_back({8ull * (rng() % 1000), 1024, a, a + len});
    }
  }
  hb.push_back(static_cast<uint32_t>(spans.size()));
  alignas(16) static uint8_t fake[16];
  AttendProblem p{fake,
                  DType::kBF16,
                  hq,
                  hkv,
                  D,
                  1.f,
                  fake,
                  DType::kBF16,
                  spans.data(),
                  hb.data(),
                  static_cast<uint32_t>(spans.size()),
                  fake,
                  DType::kBF16,
                  nullptr};
  // Without clusters, and with clusters of 4 and 16 splits (every task a multiple of them).
  for (uint32_t cluster : {1u, 4u, 16u}) {
  SCOPED_TRACE("cluster " + std::to_string(cluster));
  cuda::AttendPlanOptions opt;
  opt.target_blocks = 64;
  opt.min_split_tokens = 64;
  opt.cluster = cluster;
  cuda::AttendPlan plan;
  ASSERT_TRUE(cuda::PlanAttend(&p, 1, opt, &plan).ok());
  ASSERT_EQ(plan.cluster_size, cluster);
  using detail::AttendItemDesc;
  using detail::AttendRunDesc;
  using detail::AttendTaskDesc;
  const auto* tasks = reinterpret_cast<const AttendTaskDesc*>(plan.image.data() + plan.tasks_off);
  const auto* items = reinterpret_cast<const AttendItemDesc*>(plan.image.data() + plan.items_off);
  const auto* runs = reinterpret_cast<const AttendRunDesc*>(plan.image.data() + plan.runs_off);
  ASSERT_EQ(plan.num_tasks, hkv);
  uint32_t item = 0;
  for (uint32_t h = 0; h < hkv; ++h) {
    // Expected row sequence of the head.
    std::vector<uint64_t> want;
    for (uint32_t s = hb[h]; s < hb[h + 1]; ++s) {
      for (uint32_t t = spans[s].begin; t < spans[s].end; ++t) {
        want.push_back(spans[s].offset + (1ull * h * spans[s].stride_tokens + t) * D);
      }
    }
    std::vector<uint64_t> got;
    ASSERT_GE(tasks[h].num_splits, 1u);
    ASSERT_EQ(tasks[h].num_splits % cluster, 0u);
    for (uint32_t sp = 0; sp < tasks[h].num_splits; ++sp, ++item) {
      const AttendItemDesc& it = items[item];
      ASSERT_EQ(it.task, h);
      ASSERT_EQ(it.split, sp);
      if (plan.run_stride > 0) {
        ASSERT_EQ(it.run_begin, item * plan.run_stride);
        ASSERT_LE(it.run_end - it.run_begin, plan.run_stride);
      }
      ASSERT_LE(it.run_end - it.run_begin, detail::kMaxRunsPerItem);
      ASSERT_LE(it.tokens, plan.split_tokens);
      uint32_t tok = 0;
      for (uint32_t r = it.run_begin; r < it.run_end; ++r) {
        ASSERT_GT(runs[r].len, 0u);
        for (uint32_t t = 0; t < runs[r].len; ++t) got.push_back(runs[r].k_off + 1ull * t * D);
        tok += runs[r].len;
        const KVSpan& any = spans[hb[h]];
        ASSERT_EQ(runs[r].v_off - runs[r].k_off, 1ull * hkv * any.stride_tokens * D);
      }
      ASSERT_EQ(tok, it.tokens);
    }
    ASSERT_EQ(got, want) << "head " << h;
    if (h == 2) {
      ASSERT_EQ(tasks[h].num_splits, cluster);
    }
  }
  ASSERT_EQ(item, plan.num_items);
  }
}

}  // namespace
// Hybrid heads (LycheeDecode): a retrieval head attends the whole context while sparse heads
// attend their budget. The planner cuts tasks by tokens, so the retrieval head gets splits in
// proportion to its tokens and no split does more work than another (host-only planning, no
// device needed).
TEST(AttendPlan, RetrievalHeadsGetProportionallyMoreSplits) {
  const uint32_t hq = 16, hkv = 4, D = 128;
  std::vector<KVSpan> spans;
  std::vector<uint32_t> hb{0};
  std::vector<uint64_t> tokens(hkv, 0);
  for (uint32_t h = 0; h < hkv; ++h) {
    // Head 0: every chunk of a 64K context (16-token chunks) + tail; heads 1..3: 128 chunks
    // (2K tokens) scattered over it + tail.
    const uint32_t chunks = h == 0 ? 4096 : 128;
    for (uint32_t c = 0; c < chunks; ++c) {
      const uint64_t chunk = h == 0 ? c : (c * 31 + h) % 4096;
      spans.push_back({chunk * 16 * hkv * 2 * D, 16, 0, 16});
      tokens[h] += 16;
    }
    spans.push_back({uint64_t{4096} * 16 * hkv * 2 * D, 28, 0, 5});
    tokens[h] += 5;
    hb.push_back(static_cast<uint32_t>(spans.size()));
  }
  alignas(16) static uint8_t fake[16];
  AttendProblem p{fake, DType::kBF16, hq, hkv, D, 1.f, fake, DType::kBF16, spans.data(), hb.data(),
                  static_cast<uint32_t>(spans.size()), fake, DType::kBF16, nullptr};
  cuda::AttendPlan plan;
  ASSERT_TRUE(cuda::PlanAttend(&p, 1, {}, &plan).ok());
  const auto* tasks = reinterpret_cast<const detail::AttendTaskDesc*>(plan.image.data() + plan.tasks_off);
  const auto* items = reinterpret_cast<const detail::AttendItemDesc*>(plan.image.data() + plan.items_off);
  for (uint32_t h = 0; h < hkv; ++h) {
    const uint64_t want = (tokens[h] + plan.split_tokens - 1) / plan.split_tokens;
    EXPECT_EQ(tasks[h].num_splits, want) << "head " << h;
  }
  EXPECT_GE(tasks[0].num_splits, 20 * tasks[1].num_splits);
  uint32_t longest = 0;
  for (uint32_t i = 0; i < plan.num_items; ++i) {
    EXPECT_LE(items[i].tokens, plan.split_tokens);
    longest = std::max(longest, items[i].tokens);
  }
  EXPECT_EQ(longest, plan.split_tokens);  // full splits everywhere but each task's last one

  // The unbalanced baseline of kvmem-bench-retrieval: the same split count for every task, so
  // the retrieval head's splits are many times longer than the sparse heads'.
  cuda::AttendPlanOptions uniform;
  uniform.splits_per_task = 32;
  cuda::AttendPlan fixed;
  ASSERT_TRUE(cuda::PlanAttend(&p, 1, uniform, &fixed).ok());
  const auto* ftasks = reinterpret_cast<const detail::AttendTaskDesc*>(fixed.image.data() + fixed.tasks_off);
  const auto* fitems = reinterpret_cast<const detail::AttendItemDesc*>(fixed.image.data() + fixed.items_off);
  std::vector<uint32_t> longest_of(hkv, 0);
  std::vector<uint64_t> covered(hkv, 0);
  for (uint32_t i = 0; i < fixed.num_items; ++i) {
    longest_of[fitems[i].task] = std::max(longest_of[fitems[i].task], fitems[i].tokens);
    covered[fitems[i].task] += fitems[i].tokens;
  }
  for (uint32_t h = 0; h < hkv; ++h) {
    // Splits are 64-token multiples, so a short task may get fewer than asked.
    EXPECT_LE(ftasks[h].num_splits, 32u) << "head " << h;
    EXPECT_EQ(covered[h], tokens[h]) << "head " << h;  // every token in exactly one split
  }
  EXPECT_EQ(ftasks[0].num_splits, 32u);
  EXPECT_EQ(longest_of[0], fixed.split_tokens);
  EXPECT_GE(longest_of[0], 10 * longest_of[1]);
}


// A dense layer (every head attends every span, one problem; in clusters of splits or not, as
// on the H200): the heads share one run table (head 0's runs, each with its head stride), the
// other heads' items point at head 0's runs, and run + task x head_stride walks every head's
// rows in order, every token once.
TEST(AttendPlan, DenseHeadsShareOneRunTable) {
  const uint32_t hq = 32, hkv = 8, D = 128;
  std::mt19937 rng(5);
  alignas(16) static uint8_t fake[16];
  std::vector<KVSpan> spans;
  for (uint32_t c = 0; c < 2000; ++c) {
    const uint32_t stride = c + 1 < 2000 ? 24 : 256;  // the last one a tail block
    const uint32_t len = c + 1 < 2000 ? 8 + rng() % 17 : 100;
    spans.push_back({(rng() % 1000000) * 8, stride, 0, len});
  }
  AttendProblem p{};
  p.pool = p.q = p.out = fake;
  p.kv_dtype = p.q_dtype = p.out_dtype = DType::kBF16;
  p.q_heads = hq;
  p.kv_heads = hkv;
  p.head_dim = D;
  p.scale = 1.f;
  p.spans = spans.data();
  p.num_spans = static_cast<uint32_t>(spans.size());
  for (const uint32_t cluster : {1u, 4u}) {
    SCOPED_TRACE("cluster " + std::to_string(cluster));
    cuda::AttendPlanOptions options;
    options.cluster = cluster;
    cuda::AttendPlan plan;
    ASSERT_TRUE(cuda::PlanAttend(&p, 1, options, &plan).ok());
    ASSERT_EQ(plan.cluster_size, cluster);
    const auto* items =
        reinterpret_cast<const detail::AttendItemDesc*>(plan.image.data() + plan.items_off);
    const auto* runs =
        reinterpret_cast<const detail::AttendRunDesc*>(plan.image.data() + plan.runs_off);
    ASSERT_EQ(plan.num_items % hkv, 0u);
    const uint32_t per_head = plan.num_items / hkv;
    uint64_t head0_runs = 0;
    for (uint32_t i = 0; i < per_head; ++i) head0_runs += items[i].run_end - items[i].run_begin;
    EXPECT_EQ(plan.num_runs, head0_runs);  // one head's runs, not hkv heads'
    EXPECT_EQ(plan.run_stride, 0u);
    for (uint32_t h = 0; h < hkv; ++h) {
      std::vector<uint64_t> want, got;
      for (const KVSpan& sp : spans) {
        for (uint32_t t = sp.begin; t < sp.end; ++t)
          want.push_back(sp.offset + (1ull * h * sp.stride_tokens + t) * D);
      }
      for (uint32_t i = h * per_head; i < (h + 1) * per_head; ++i) {
        const detail::AttendItemDesc& it = items[i];
        ASSERT_EQ(it.task, h);
        ASSERT_EQ(it.run_begin, items[i - h * per_head].run_begin);
        uint32_t tok = 0;
        for (uint32_t r = it.run_begin; r < it.run_end; ++r) {
          const uint64_t k = runs[r].k_off + uint64_t{it.task} * runs[r].head_stride;
          const uint64_t v = runs[r].v_off + uint64_t{it.task} * runs[r].head_stride;
          ASSERT_GT(runs[r].head_stride, 0u);
          ASSERT_EQ(v - k, 1ull * hkv * runs[r].head_stride);
          for (uint32_t t = 0; t < runs[r].len; ++t) got.push_back(k + 1ull * t * D);
          tok += runs[r].len;
        }
        ASSERT_EQ(tok, it.tokens);
      }
      ASSERT_EQ(got, want) << "head " << h;
    }
  }
}

// Two plans alike, field by field and byte by byte.
void ExpectSamePlan(const cuda::AttendPlan& a, const cuda::AttendPlan& b) {
  EXPECT_EQ(a.image, b.image);
  EXPECT_EQ(a.workspace_bytes, b.workspace_bytes);
  EXPECT_EQ(a.num_tasks, b.num_tasks);
  EXPECT_EQ(a.num_items, b.num_items);
  EXPECT_EQ(a.num_runs, b.num_runs);
  EXPECT_EQ(a.split_tokens, b.split_tokens);
  EXPECT_EQ(a.total_tokens, b.total_tokens);
  EXPECT_EQ(a.cluster_size, b.cluster_size);
  EXPECT_EQ(a.run_stride, b.run_stride);
  EXPECT_EQ(a.head_shared_runs, b.head_shared_runs);
  EXPECT_EQ(a.items_off, b.items_off);
  EXPECT_EQ(a.runs_off, b.runs_off);
  EXPECT_EQ(a.counters_off, b.counters_off);
}

// A dense layer's decode stream: each step appends a token to the tail (the last span); every
// ~15 steps a seal moves the tail's oldest tokens into a new chunk span (the caller's key
// changes). PlanAttendDenseStep patches the kept plan on most steps and plans afresh on the
// others, and its plan is always PlanAttend's for the step's problem, byte for byte.
TEST(AttendPlan, DenseStepPatchesTheTailAndEqualsAFreshPlan) {
  const uint32_t hq = 32, hkv = 8, D = 128, tail_cap = 256;
  std::mt19937 rng(7);
  alignas(16) static uint8_t fake[64];
  std::vector<KVSpan> spans;
  uint64_t at = 0;
  for (uint32_t c = 0; c < 1500; ++c) {
    const uint32_t len = 8 + rng() % 17;
    spans.push_back({at, len, 0, len});
    at += 2ull * hkv * len * D;
  }
  const uint64_t tail_off = at;
  spans.push_back({tail_off, tail_cap, 0, 20});
  AttendProblem p{};
  p.pool = fake;
  p.q = fake + 16;
  p.out = fake + 32;
  p.kv_dtype = p.q_dtype = p.out_dtype = DType::kBF16;
  p.q_heads = hq;
  p.kv_heads = hkv;
  p.head_dim = D;
  p.scale = 1.f / std::sqrt(128.f);
  cuda::DenseAttendPlanCache cache;
  uint64_t key = 1;
  int patched_steps = 0, planned_steps = 0;
  for (int step = 0; step < 400; ++step) {
    KVSpan& tail = spans.back();
    if (step % 15 == 14) {  // a seal: the tail's first tokens become a chunk
      const uint32_t n = 8 + rng() % 8;
      spans.insert(spans.end() - 1, {at, n, 0, n});
      at += 2ull * hkv * n * D;
      spans.back().end -= n;
      ++key;
    } else if (step % 97 == 96) {  // a fetched block moved: the caller's key changes
      spans[rng() % 100].offset += 8;
      ++key;
    } else if (step == 200) {  // another output buffer: the scalars differ
      p.out = fake + 48;
    } else if (step > 0) {
      ++tail.end;
    }
    p.spans = spans.data();
    p.num_spans = static_cast<uint32_t>(spans.size());
    bool patched = false;
    ASSERT_TRUE(cuda::PlanAttendDenseStep(p, key, &cache, &patched).ok());
    cuda::AttendPlan fresh;
    ASSERT_TRUE(cuda::PlanAttend(&p, 1, {}, &fresh).ok());
    SCOPED_TRACE("step " + std::to_string(step) + (patched ? " patched" : " planned"));
    ExpectSamePlan(cache.plan, fresh);
    if (::testing::Test::HasFailure()) return;
    (patched ? patched_steps : planned_steps)++;
    if (step % 15 == 14 || step % 97 == 96 || step == 200) {
      EXPECT_FALSE(patched);
    }
  }
  EXPECT_GT(patched_steps, 300);  // most steps
  EXPECT_GE(planned_steps, 28);   // every seal, key change and scalar change, and the first
}

// PlanAttend keeps the capacity of the plan's image from call to call (the daemon plans every
// Attend into one AttendPlan) and writes only what the layout holds, zeroing the rest: a plan
// made over a used one, whose image is filled with garbage first, is byte for byte the fresh
// plan. Shapes: a dense layer (runs at a fixed stride per item), a small per-head selection,
// a retrieval head beside sparse heads (runs packed: a fixed stride would cost too much), and
// clusters of splits (empty splits padding every task).
TEST(AttendPlan, ReusedPlanMatchesAFreshOne) {
  const uint32_t hq = 16, hkv = 4, D = 128;
  std::mt19937 rng(11);
  alignas(16) static uint8_t fake[16];
  struct Shape {
    std::vector<KVSpan> spans;
    std::vector<uint32_t> hb;  // empty: every head attends every span
    cuda::AttendPlanOptions opt;
  };
  auto chunks = [&](uint32_t n, std::vector<KVSpan>* out) {
    for (uint32_t c = 0; c < n; ++c) {
      const uint32_t len = 8 + rng() % 17;
      out->push_back({(rng() % 1000000) * 8, len, 0, len});
    }
  };
  std::vector<Shape> shapes(4);
  chunks(3000, &shapes[0].spans);  // dense
  for (uint32_t h = 0, at = 0; h < hkv; ++h) {
    shapes[1].hb.push_back(at);
    chunks(20, &shapes[1].spans);
    at = static_cast<uint32_t>(shapes[1].spans.size());
  }
  shapes[1].hb.push_back(static_cast<uint32_t>(shapes[1].spans.size()));
  shapes[1].opt.target_blocks = 16;
  shapes[1].opt.min_split_tokens = 64;
  for (uint32_t h = 0; h < hkv; ++h) {  // head 0 attends 300 chunks, the others 4
    shapes[2].hb.push_back(static_cast<uint32_t>(shapes[2].spans.size()));
    chunks(h == 0 ? 300 : 4, &shapes[2].spans);
  }
  shapes[2].hb.push_back(static_cast<uint32_t>(shapes[2].spans.size()));
  shapes[2].opt.max_split_tokens = 256 * 24;  // long splits: head 0's run tables overflow
  shapes[2].opt.min_split_tokens = 256 * 24;
  shapes[2].opt.target_blocks = 4;
  chunks(50, &shapes[3].spans);
  shapes[3].opt.cluster = 4;
  shapes[3].opt.target_blocks = 64;
  shapes[3].opt.min_split_tokens = 64;
  cuda::AttendPlan kept;
  bool strided = false, packed = false;
  for (size_t i : {0, 1, 2, 3, 0, 2}) {
    SCOPED_TRACE("shape " + std::to_string(i));
    Shape& sh = shapes[i];
    AttendProblem p{fake, DType::kBF16, hq, hkv, D, 1.f, fake, DType::kBF16, sh.spans.data(),
                    sh.hb.empty() ? nullptr : sh.hb.data(), static_cast<uint32_t>(sh.spans.size()),
                    fake, DType::kBF16, nullptr};
    std::fill(kept.image.begin(), kept.image.end(), uint8_t{0xab});
    cuda::AttendPlan fresh;
    ASSERT_TRUE(cuda::PlanAttend(&p, 1, sh.opt, &fresh).ok());
    ASSERT_TRUE(cuda::PlanAttend(&p, 1, sh.opt, &kept).ok());
    EXPECT_TRUE(kept.image == fresh.image);
    EXPECT_EQ(kept.workspace_bytes, fresh.workspace_bytes);
    EXPECT_EQ(kept.num_items, fresh.num_items);
    EXPECT_EQ(kept.num_runs, fresh.num_runs);
    EXPECT_EQ(kept.run_stride, fresh.run_stride);
    EXPECT_EQ(kept.runs_off, fresh.runs_off);
    EXPECT_EQ(kept.counters_off, fresh.counters_off);
    EXPECT_EQ(kept.cluster_size, fresh.cluster_size);
    (fresh.run_stride > 0 ? strided : packed) = true;
    // The merge counters start at zero in the image.
    const auto* counters = reinterpret_cast<const uint32_t*>(kept.image.data() + kept.counters_off);
    for (uint32_t t = 0; t < kept.num_tasks; ++t) EXPECT_EQ(counters[t], 0u);
  }
  EXPECT_TRUE(strided);
  EXPECT_TRUE(packed);
}

// The fused search + attention plan: the attention's blocks find their task and split from the
// block index when every task has the same splits (uniform_splits), so the items must lie task by
// task, split by split; the search's per-task run sources get a section of their own.
TEST(SearchAttendPlan, UniformSplitsMatchTheItemsAndRunSourcesHaveTheirSection) {
  alignas(16) static uint8_t fake[16];
  const uint32_t hq = 32, hkv = 8, D = 128;
  std::vector<FlatTreeView> trees(hkv);
  for (auto& t : trees) {
    t.num_nodes = 3;
    t.num_chunks = 100;
    t.num_levels = 2;
  }
  auto problem = [&](uint32_t budget, uint32_t tail) {
    cuda::SearchAttendProblem p;
    p.attend = AttendProblem{fake, DType::kBF16, hq, hkv, D, 1.f, fake, DType::kBF16, nullptr,
                             nullptr, 0, fake, DType::kBF16, nullptr};
    p.trees = trees.data();
    p.chunk_block = reinterpret_cast<const uint64_t*>(fake);
    p.params.budget_tokens = budget;
    p.sink_tokens = 16;
    p.tail = {0, 256, 0, tail};
    return p;
  };
  for (const bool same : {true, false}) {
    SCOPED_TRACE(same ? "same shapes" : "one longer problem");
    std::vector<cuda::SearchAttendProblem> ps = {problem(2048, 40), problem(same ? 2048 : 8192, 40)};
    cuda::AttendPlanOptions opt;
    opt.min_split_tokens = 64;
    cuda::SearchAttendPlan plan;
    ASSERT_TRUE(cuda::PlanSearchAttend(ps.data(), 2, opt, &plan).ok());
    ASSERT_EQ(plan.num_tasks, 2 * hkv);
    const auto* items =
        reinterpret_cast<const detail::AttendItemDesc*>(plan.image.data() + plan.items_off);
    bool equal = true;
    for (uint32_t b = 0; b < plan.num_items; ++b) {
      equal = equal && items[b].num_splits == items[0].num_splits;
    }
    EXPECT_EQ(equal, same);
    if (same) {
      const uint32_t S = plan.uniform_splits;
      ASSERT_GT(S, 1u);
      EXPECT_EQ(plan.num_items, plan.num_tasks * S);
      for (uint32_t b = 0; b < plan.num_items; ++b) {
        EXPECT_EQ(items[b].task, b / S) << "item " << b;
        EXPECT_EQ(items[b].split, b % S) << "item " << b;
        EXPECT_EQ(items[b].num_splits, S);
      }
    } else {
      EXPECT_EQ(plan.uniform_splits, 0u);
    }
    // [runs | run sources | scratch]: each task's fixed pieces go in its first item's run slots.
    EXPECT_EQ(plan.run_source_off % 256, 0u);
    EXPECT_GE(plan.run_source_off, plan.runs_off + size_t{plan.num_items} * detail::kMaxRunsPerItem *
                                                       sizeof(detail::AttendRunDesc));
    EXPECT_LE(plan.run_source_off + plan.num_tasks * sizeof(detail::SearchRunHeader),
              plan.scratch_off);
    EXPECT_LE(plan.scratch_off, plan.workspace_bytes);
    // The selection (which the attention reads) stays before the runs, where the daemon copies it.
    EXPECT_LE(plan.selected_off + size_t{plan.num_tasks} * plan.max_selected * 4, plan.scores_off);
    EXPECT_LE(plan.scores_off, plan.runs_off);
  }
}

// detail::EdgesOf, which the search's fixed pieces and the attention's runs share: a chunk's sink
// part, selected part and recent part cover it once, token by token as the sinks and the recent
// window say.
TEST(SearchAttendPlan, ChunkEdgesSplitEveryTokenOnce) {
  auto rng = FreshRng();
  for (int it = 0; it < 20000; ++it) {
    const uint64_t start = rng() % 200, sinks = rng() % 64, recent_from = rng() % 260;
    const uint32_t tokens = 1 + static_cast<uint32_t>(rng() % 40);
    const detail::ChunkEdges e = detail::EdgesOf(start, tokens, sinks, recent_from);
    ASSERT_LE(e.a, tokens);
    ASSERT_LE(e.b, tokens);
    uint32_t selected = 0;
    for (uint32_t t = 0; t < tokens; ++t) {
      const uint64_t pos = start + t;
      const bool sink = t < e.a, recent = t >= e.b;
      ASSERT_EQ(sink, pos < sinks) << start << " " << tokens << " " << sinks << " " << recent_from;
      ASSERT_EQ(recent, pos >= recent_from) << start << " " << tokens << " " << recent_from;
      selected += !sink && !recent ? 1u : 0u;
    }
    ASSERT_EQ(e.selected(), selected);
  }
}

}  // namespace kvmem::kernels
