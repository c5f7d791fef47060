// Index-mode Attend with the search on the device (CUDA pool) against the same session on the
// host pool (host search + CPU attention): the same selected chunks per KV head, the same
// attended token counts, outputs within bf16 tolerance; before and after decode steps that seal
// new chunks (the device mirrors are updated incrementally). Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/dtype.h"
#include "daemon/metrics.h"
#include "daemon/session.h"
#include "testing/seed.h"

namespace kvmem {
namespace {

constexpr uint32_t L = 2, HQ = 8, HKV = 2, D = 128;

std::unique_ptr<Session> NewSession(KVPool* pool, uint32_t recent) {
  SessionOptions o;
  o.mode = SelectionMode::kIndex;
  o.sink_tokens = 16;
  o.recent_window = recent;
  o.default_budget_tokens = 384;
  auto s = Session::Create(1, "t", {L, HQ, HKV, D, DType::kBF16}, o, pool);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return std::move(*s);
}

// Same q on both sessions, every layer; returns how many heads selected something.
uint32_t Compare(Session& dev, Session& host, std::mt19937_64& rng,
                 const std::vector<uint16_t>& keys, uint64_t T, const uint16_t* new_k,
                 const uint16_t* new_v) {
  std::normal_distribution<float> n01;
  uint32_t nonempty = 0;
  for (uint32_t l = 0; l < L; ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    // Each KV head's group looks for a random earlier key.
    std::vector<uint16_t> q(HQ * D);
    for (uint32_t qh = 0; qh < HQ; ++qh) {
      const uint64_t t = rng() % T;
      const uint32_t h = qh / (HQ / HKV);
      for (uint32_t d = 0; d < D; ++d) {
        q[qh * D + d] = FloatToBF16(BF16ToFloat(keys[((uint64_t{l} * HKV + h) * T + t) * D + d]) + 0.3f * n01(rng));
      }
    }
    std::vector<uint16_t> out_d(HQ * D), out_h(HQ * D);
    std::vector<float> lse_d(HQ), lse_h(HQ);
    AttendArgs a;
    a.layer = l;
    a.q = q.data();
    a.new_k = new_k ? new_k + l * HKV * D : nullptr;
    a.new_v = new_v ? new_v + l * HKV * D : nullptr;
    a.want_selection = true;
    a.out = out_d.data();
    a.lse = lse_d.data();
    AttendInfo di, hi;
    const Status sd = dev.Attend(a, &di);
    EXPECT_TRUE(sd.ok()) << sd.ToString();
    a.out = out_h.data();
    a.lse = lse_h.data();
    const Status sh = host.Attend(a, &hi);
    EXPECT_TRUE(sh.ok()) << sh.ToString();
    if (!sd.ok() || !sh.ok()) return nonempty;
    EXPECT_TRUE(di.device_search) << "the CUDA pool should have searched on the device";
    EXPECT_FALSE(hi.device_search);
    EXPECT_EQ(di.tokens_attended, hi.tokens_attended);
    EXPECT_EQ(di.selection.size(), hi.selection.size());
    if (di.selection.size() != HKV || hi.selection.size() != HKV) return nonempty;
    for (uint32_t h = 0; h < HKV; ++h) {
      EXPECT_EQ(di.selection[h].chunks, hi.selection[h].chunks) << "head " << h;
      EXPECT_EQ(di.selection[h].scores, hi.selection[h].scores) << "head " << h;
      EXPECT_EQ(di.selection[h].starts, hi.selection[h].starts) << "head " << h;
      nonempty += di.selection[h].chunks.empty() ? 0 : 1;
    }
    for (uint32_t qh = 0; qh < HQ; ++qh) {
      double e2 = 0, r2 = 0;
      for (uint32_t d = 0; d < D; ++d) {
        const double x = BF16ToFloat(out_d[qh * D + d]), y = BF16ToFloat(out_h[qh * D + d]);
        e2 += (x - y) * (x - y);
        r2 += y * y;
      }
      EXPECT_LT(std::sqrt(e2 / r2), 1e-2) << "query head " << qh;
      EXPECT_NEAR(lse_d[qh], lse_h[qh], 1e-3 * std::abs(lse_h[qh]) + 1e-3);
    }
  }
  return nonempty;
}

TEST(DeviceSearchTest, DeviceSearchMatchesHostSearchAcrossDecodeSteps) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible: device search test skipped";
  const uint64_t seed = ::kvmem::testing::TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto dev_pool = CreateDevicePool({512ull << 20, 1ull << 20}, 0);
  ASSERT_TRUE(dev_pool.ok()) << dev_pool.status().ToString();
  ASSERT_TRUE((*dev_pool)->has_device_search());
  auto host_pool = CreateHostPool({512ull << 20, 1ull << 20});
  ASSERT_TRUE(host_pool.ok());
  const DaemonMetrics& m = GlobalMetrics();
  const uint64_t replays0 = m.device_graph_replays, captures0 = m.device_graph_captures,
                 direct0 = m.device_direct_submits;
  // 4000 tokens: ~360 chunks wholly inside the window (session 20's kernel listed each and sent
  // windows over ~250 chunks to the host search; di.device_search checks it does not now).
  for (uint32_t recent : {0u, 40u, 4000u}) {
    SCOPED_TRACE("recent window " + std::to_string(recent));
    auto dev = NewSession(dev_pool->get(), recent);
    auto host = NewSession(host_pool->get(), recent);
    // Topic-structured keys: runs of 150 tokens share a direction.
    const uint64_t T = 5000;
    std::normal_distribution<float> n01;
    std::vector<uint16_t> keys(L * HKV * T * D), values(keys.size());
    for (uint32_t lh = 0; lh < L * HKV; ++lh) {
      std::vector<float> topic(D);
      for (uint64_t t = 0; t < T; ++t) {
        if (t % 150 == 0) {
          for (auto& x : topic) x = 1.5f * n01(rng);
        }
        for (uint32_t d = 0; d < D; ++d) {
          keys[(lh * T + t) * D + d] = FloatToBF16(topic[d] + 0.4f * n01(rng));
          values[(lh * T + t) * D + d] = FloatToBF16(n01(rng));
        }
      }
    }
    std::vector<uint8_t> bounds(T);
    for (uint64_t t = 0; t < T; ++t) bounds[t] = t % 11 == 10 ? 3 : 1;
    ASSERT_TRUE(dev->AppendKV(T, keys.data(), values.data(), bounds.data()).ok());
    ASSERT_TRUE(host->AppendKV(T, keys.data(), values.data(), bounds.data()).ok());
    uint32_t nonempty = 0;
    for (int i = 0; i < 3; ++i) nonempty += Compare(*dev, *host, rng, keys, T, nullptr, nullptr);
    // Decode steps: every layer gets a new token (sealing chunks now and then), then maintenance
    // (which also refreshes the device mirrors off the request path).
    std::vector<uint16_t> nk(L * HKV * D), nv(nk.size());
    for (int step = 0; step < 60; ++step) {
      for (size_t i = 0; i < nk.size(); ++i) {
        nk[i] = FloatToBF16(n01(rng));
        nv[i] = FloatToBF16(n01(rng));
      }
      nonempty += Compare(*dev, *host, rng, keys, T, nk.data(), nv.data());
      if (step % 20 == 19) {
        dev->Maintain();
        host->Maintain();
      }
    }
    EXPECT_GT(dev->chunk_count(), 5000u / 24);
    EXPECT_GT(nonempty, 0u);
  }
  // Graph submission (the default; KVMEM_DEVICE_SUBMIT=copy turns it off): a layout's first use
  // goes directly, its second is captured, later ones replay; the comparisons above checked the
  // replays' results (new q and plan bytes through the captured upload).
  const uint64_t replays = m.device_graph_replays - replays0,
                 captures = m.device_graph_captures - captures0,
                 direct = m.device_direct_submits - direct0;
  std::printf("[ graphs   ] %llu replayed, %llu captured, %llu direct\n",
              static_cast<unsigned long long>(replays), static_cast<unsigned long long>(captures),
              static_cast<unsigned long long>(direct));
  if (!DeviceGraphSubmit()) {
    EXPECT_EQ(replays + captures, 0u);
  } else {
    EXPECT_GT(captures, 0u);
    EXPECT_GT(replays, captures) << "layouts should repeat across decode steps";
    EXPECT_GE(direct, captures) << "every captured layout was first submitted directly";
  }
}

}  // namespace
}  // namespace kvmem
