// kvmem-bench-session-host: the host's share of Session::Attend on a GPU pool, measured on any
// machine. The pool keeps K/V in host memory like the CPU backend but poses as a device pool
// (is_host() false) and does no math: Attend returns at once, PooledBlockScores and
// TokenLogits write fixed pseudo-random scores. What is left is everything the daemon does on the host
// per Attend before and after the device work: index catch-up and host search, the retrieval
// rules, residency, span lists, the attention plan (cuda::PlanAttend, as the CUDA pool calls
// it, into a kept plan) and the staging copies of q and the plan image.
//
//   kvmem-bench-session-host --json FILE [--contexts 32768,131072] [--iters 30]
//                            [--modes dense,retrieval_heads,index,index_fidelity]
//                            [--search-threads N]   (kvmemd's search_threads; default 0)
//                            [--fidelity-config F]  (default: the source tree's deploy/kvmemd-fidelity.json)
//
// Layer 1 of a two-layer session (32 q / 8 KV heads, D 128, bf16, sentence ends every 16 tokens,
// topic-structured keys) is timed; layer 0 is attended first in every pass (the retrieval modes reuse its
// selections). Modes: dense; retrieval_heads with 1 retrieval head in layer 1 (every head of
// layer 0 is one); index (host search: this pool has no device search); index_fidelity (index
// with deploy/kvmemd-fidelity.json's session defaults: chunks of 2-4 tokens, rescoring of 4x the
// budget token by token: the candidates' logits come from one TokenLogits call per layer and
// call, `logit_launches_per_call`; `copy_outs_per_call` counts key reads out of the pool, each a
// synchronous cudaMemcpy on the CUDA pool, which a pool without TokenLogits would need). Median µs per call, and
// the mean µs per call of each of the daemon's Attend phases (kvmem_attend_phase_seconds) over
// the timed calls of layer 1 and layer 0's calls between them (`phases_us_per_pass`).
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "daemon/config.h"
#include "daemon/kv_pool.h"
#include "daemon/metrics.h"
#include "daemon/parallel.h"
#include "daemon/session.h"
#include "kernels/cuda_ops.h"

namespace kvmem::bench {
namespace {

constexpr uint32_t kHq = 32, kHkv = 8, kD = 128;

// Host memory posing as a device pool, with no math (see the file comment).
class NoMathPool final : public KVPool {
 public:
  static Result<std::unique_ptr<NoMathPool>> Create(const SlabAllocator::Options& o) {
    KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<KVPool> host, CreateHostPool(o));
    auto p = std::unique_ptr<NoMathPool>(new NoMathPool(std::move(host)));
    KVMEM_ASSIGN_OR_RETURN(p->allocator_, SlabAllocator::Create(o));
    p->base_ = p->host_->base();
    return p;
  }
  bool is_host() const override { return false; }
  Status CopyIn(uint64_t dst, const void* src, uint64_t bytes) override { return host_->CopyIn(dst, src, bytes); }
  Status CopyOut(void* dst, uint64_t src, uint64_t bytes) override {
    ++copy_outs;  // each a synchronous cudaMemcpy on the CUDA pool
    return host_->CopyOut(dst, src, bytes);
  }
  uint64_t copy_outs = 0;
  Status CopyWithin(uint64_t dst, uint64_t src, uint64_t bytes) override {
    return host_->CopyWithin(dst, src, bytes);
  }
  // What the CUDA pool does on the host: plan into a kept plan, stage q and the image.
  Status Attend(kernels::AttendProblem* problems, uint32_t count, ParallelPool* /*workers*/) override {
    KVMEM_RETURN_IF_ERROR(kernels::cuda::PlanAttend(problems, count, {}, &plan_));
    staging_.resize(plan_.image.size() + size_t{kHq} * kD * 2);
    std::memcpy(staging_.data(), plan_.image.data(), plan_.image.size());
    std::memcpy(staging_.data() + plan_.image.size(), problems[0].q, size_t{kHq} * kD * 2);
    return Status::OK();
  }
  Status PooledBlockScores(const kernels::PooledBlockScoresView& v) override {
    const uint32_t blocks = kernels::PooledNumBlocks(v.total_tokens, v.block_tokens);
    for (uint32_t h = 0; h < v.num_heads; ++h) {
      for (uint32_t b = 0; b < blocks; ++b) {
        v.scores[size_t{h} * blocks + b] = static_cast<float>((b * 2654435761u + h * 97u) % 1000) * 1e-3f;
      }
    }
    return Status::OK();
  }
  // Rescoring logits, as the CUDA pool's TokenLogits on the host: the inputs staged, fixed
  // pseudo-random logits copied back.
  Status TokenLogits(const kernels::TokenLogitsView& v) override {
    ++logit_launches;
    const size_t G = v.q_heads / v.kv_heads, n = size_t{v.total_tokens} * G;
    staging_.resize(std::max(staging_.size(), size_t{v.num_items} * (sizeof(kernels::KVSpan) + 8) + n * 4));
    std::memcpy(staging_.data(), v.spans, size_t{v.num_items} * sizeof(kernels::KVSpan));
    for (size_t i = 0; i < n; ++i) v.logits[i] = static_cast<float>((i * 2654435761u) % 1000) * 1e-3f;
    return Status::OK();
  }
  uint64_t logit_launches = 0;
  std::string Describe() const override { return "host memory, no math (posing as a device pool)"; }

 private:
  explicit NoMathPool(std::unique_ptr<KVPool> host) : host_(std::move(host)) {}
  std::unique_ptr<KVPool> host_;
  kernels::cuda::AttendPlan plan_;
  std::vector<uint8_t> staging_;
};

std::vector<uint32_t> ParseList(const std::string& s) {
  std::vector<uint32_t> v;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, ',');) v.push_back(static_cast<uint32_t>(std::stoul(t)));
  return v;
}

int Main(int argc, char** argv) {
  std::string json;
  std::vector<uint32_t> contexts{32768, 131072};
  int iters = 30;
  std::string modes = "dense,retrieval_heads,index,index_fidelity";
  uint32_t search_threads = 0;
  std::string fidelity_config = KVMEM_SOURCE_DIR "/deploy/kvmemd-fidelity.json";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--json") json = argv[i + 1];
    else if (k == "--contexts") contexts = ParseList(argv[i + 1]);
    else if (k == "--iters") iters = std::max(1, std::atoi(argv[i + 1]));
    else if (k == "--modes") modes = argv[i + 1];
    else if (k == "--search-threads") search_threads = static_cast<uint32_t>(std::atoi(argv[i + 1]));
    else if (k == "--fidelity-config") fidelity_config = argv[i + 1];
    else {
      std::fprintf(stderr, "usage: kvmem-bench-session-host --json FILE [--contexts 32768,131072] [--iters 30] "
                           "[--modes dense,retrieval_heads,index,index_fidelity] [--search-threads 0] "
                           "[--fidelity-config deploy/kvmemd-fidelity.json]\n");
      return 2;
    }
  }
  // kvmemd's search pool (config search_threads; 7 on a 16-core host): KV heads searched and
  // rescored in parallel. 0: on the calling thread.
  std::unique_ptr<ParallelPool> search_pool;
  if (search_threads > 0) {
    search_pool = std::make_unique<ParallelPool>(search_threads);
    SetSearchPool(search_pool.get());
  }
  // index_fidelity's sessions start from the profile's session defaults, as kvmemd's do.
  DaemonConfig fidelity_profile;
  if (modes.find("index_fidelity") != std::string::npos) {
    if (Status st = LoadConfigFile(fidelity_config, &fidelity_profile); !st.ok()) {
      std::fprintf(stderr, "%s\n", st.ToString().c_str());
      return 1;
    }
  }
  std::mt19937_64 rng(7);
  std::normal_distribution<float> n01;
  nlohmann::json rows = nlohmann::json::array();
  std::printf("%-8s %-16s %12s %12s\n", "context", "mode", "median_us", "min_us");
  for (uint32_t ctx : contexts) {
    for (int m = 0; m < 4; ++m) {
      const SelectionMode mode = m == 0   ? SelectionMode::kDense
                                 : m == 1 ? SelectionMode::kRetrievalHeads
                                          : SelectionMode::kIndex;
      const bool fidelity = m == 3;
      const char* name = m == 0 ? "dense" : m == 1 ? "retrieval_heads" : m == 2 ? "index" : "index_fidelity";
      if (("," + modes + ",").find(std::string(",") + name + ",") == std::string::npos) continue;
      auto pool = NoMathPool::Create({uint64_t{ctx} * 2 * kHkv * kD * 2 * 2 * 3 / 2 + (256ull << 20), 4ull << 20});
      if (!pool.ok()) {
        std::fprintf(stderr, "%s\n", pool.status().ToString().c_str());
        return 1;
      }
      ModelProfile p{2, kHq, kHkv, kD, DType::kBF16};
      p.retrieval_head_mask.assign(2 * kHkv, 0);
      for (uint32_t h = 0; h < kHkv; ++h) p.retrieval_head_mask[h] = 1;
      p.retrieval_head_mask[kHkv] = 1;
      SessionOptions o = fidelity ? fidelity_profile.session_defaults : SessionOptions{};
      o.mode = mode;
      o.sink_tokens = 16;
      o.default_budget_tokens = 2048;
      o.retrieval.block_tokens = 64;
      auto s = Session::Create(1, "bench", p, o, pool->get());
      if (!s.ok()) {
        std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
        return 1;
      }
      const uint32_t slice = 8192;
      std::vector<uint16_t> k(size_t{2} * kHkv * slice * kD), v(k.size());
      std::vector<uint8_t> bounds(slice);
      // Topic-structured keys as kvmem-bench-e2e's (every 512 tokens a new direction per layer
      // and head, plus noise): what the index is for; random keys would defeat its bounds.
      std::vector<float> topic(size_t{2} * kHkv * kD);
      for (uint32_t done = 0; done < ctx; done += slice) {
        for (uint32_t t = 0; t < slice; ++t) {
          if ((done + t) % 512 == 0) {
            for (auto& x : topic) x = n01(rng) * 1.5f;
          }
          for (uint32_t lh = 0; lh < 2 * kHkv; ++lh) {
            for (uint32_t d = 0; d < kD; ++d) {
              const size_t i = (size_t{lh} * slice + t) * kD + d;
              k[i] = FloatToBF16(topic[size_t{lh} * kD + d] + n01(rng) * 0.4f);
              v[i] = FloatToBF16(n01(rng));
            }
          }
        }
        for (uint32_t t = 0; t < slice; ++t) bounds[t] = (done + t) % 16 == 15 ? 3 : 1;
        if (auto r = (*s)->AppendKV(slice, k.data(), v.data(), bounds.data()); !r.ok()) {
          std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
          return 1;
        }
      }
      std::vector<uint16_t> q(kHq * kD), out(kHq * kD);
      std::vector<float> lse(kHq);
      std::vector<double> us;
      std::array<LatencyHistogram::Snapshot, kNumAttendPhases> before{};
      uint64_t copy_outs0 = 0, launches0 = 0;
      for (int it = 0; it < iters + 2; ++it) {
        if (it == 2) {
          for (int ph = 0; ph < kNumAttendPhases; ++ph) before[ph] = GlobalMetrics().attend_phase[ph].Read();
        }
        for (auto& x : q) x = FloatToBF16(n01(rng));
        AttendArgs a;
        a.q = q.data();
        a.out = out.data();
        a.lse = lse.data();
        a.layer = 0;
        if (Status st = (*s)->Attend(a, nullptr); !st.ok()) {
          std::fprintf(stderr, "%s\n", st.ToString().c_str());
          return 1;
        }
        a.layer = 1;
        if (it == 2) {
          copy_outs0 = (*pool)->copy_outs;
          launches0 = (*pool)->logit_launches;
        }
        const auto t0 = std::chrono::steady_clock::now();
        const Status st = (*s)->Attend(a, nullptr);
        const auto t1 = std::chrono::steady_clock::now();
        if (!st.ok()) {
          std::fprintf(stderr, "%s\n", st.ToString().c_str());
          return 1;
        }
        if (it >= 2) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        (*s)->Maintain();  // kvmemd's index upkeep after each reply (untimed, as there)
      }
      std::sort(us.begin(), us.end());
      nlohmann::json phases = nlohmann::json::object();
      std::string phase_text;
      for (int ph = 0; ph < kNumAttendPhases; ++ph) {
        const LatencyHistogram::Snapshot after = GlobalMetrics().attend_phase[ph].Read();
        if (after.count == before[ph].count) continue;
        const double mean = static_cast<double>(after.sum_ns - before[ph].sum_ns) / 1e3 / static_cast<double>(iters);
        phases[AttendPhaseName(static_cast<AttendPhase>(ph))] = mean;
        char buf[64];
        std::snprintf(buf, sizeof(buf), " %s %.1f", AttendPhaseName(static_cast<AttendPhase>(ph)), mean);
        phase_text += buf;
      }
      // Pool reads per timed call (layer 1), the untimed layer-0 calls between them excluded:
      // both layers make the same reads, so half of every pass's.
      const double copy_outs = static_cast<double>((*pool)->copy_outs - copy_outs0) / 2.0 / iters;
      const double launches = static_cast<double>((*pool)->logit_launches - launches0) / 2.0 / iters;
      rows.push_back({{"context", ctx}, {"mode", name}, {"median_us", us[us.size() / 2]}, {"min_us", us.front()},
                      {"iterations", us.size()}, {"phases_us_per_pass", phases}, {"copy_outs_per_call", copy_outs},
                      {"logit_launches_per_call", launches}});
      std::printf("%-8u %-16s %12.1f %12.1f  copy_outs %.0f  logit_launches %.0f  per pass:%s\n", ctx, name,
                  us[us.size() / 2], us.front(), copy_outs, launches, phase_text.c_str());
    }
  }
  nlohmann::json doc{{"bench", "kvmem-bench-session-host"},
                     {"params", {{"search_threads", search_threads}, {"q_heads", kHq}, {"kv_heads", kHkv}, {"head_dim", kD}, {"dtype", "bf16"},
                                 {"budget_tokens", 2048}, {"block_tokens", 64}, {"sinks", 16},
                                 {"retrieval_heads_layer1", 1}}},
                     {"rows", rows}};
  if (!json.empty()) std::ofstream(json) << doc.dump(2) << "\n";
  return 0;
}

}  // namespace
}  // namespace kvmem::bench

int main(int argc, char** argv) { return kvmem::bench::Main(argc, argv); }
