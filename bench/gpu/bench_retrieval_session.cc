// kvmem-bench-retrieval-session: Session::Attend of one retrieval_heads layer on the CUDA pool,
// as kvmemd runs it (no transport): 32 q / 8 KV heads, D 128, bf16, budget 4096, 64-token
// blocks. Two layers: every KV head of layer 0 is a retrieval head (so every KV-head index has
// a kept selection), layer 1 has `--retrieval N` retrieval heads and its other heads reuse
// layer 0's selections; each pass attends layer 0, then layer 1, and only layer 1 is timed (the
// steady state of a layer with retrieval and sparse heads). Run it twice in one device call, with
// KVMEM_DEVICE_SCAN unset (retrieval heads scored by one device launch per layer) and with
// KVMEM_DEVICE_SCAN=off (the earlier path: each retrieval head's keys copied to the host chunk
// by chunk and scored by the CPU kernel), to compare the two scan paths end to end.
//
//   kvmem-bench-retrieval-session --json FILE [--contexts 32768,131072] [--retrieval 1]
//                                 [--iters 30] [--machine NAME] [--commit SHA]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/gpu/bench_args.h"
#include "common/dtype.h"
#include "daemon/session.h"

namespace kvmem::bench {
namespace {

constexpr uint32_t kHq = 32, kHkv = 8, kD = 128;

int Main(int argc, char** argv) {
  std::string json, machine, commit = "unknown";
  std::vector<uint32_t> contexts{32768, 131072};
  uint32_t nret = 1;
  int iters = 30;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "missing value for %s\n", k.c_str());
      return 1;
    }
    const char* v = argv[++i];
    if (k == "--json") json = v;
    else if (k == "--contexts") contexts = ParseList(v);
    else if (k == "--retrieval") nret = static_cast<uint32_t>(std::stoul(v));
    else if (k == "--iters") iters = std::atoi(v);
    else if (k == "--machine") machine = v;
    else if (k == "--commit") commit = v;
    else {
      std::fprintf(stderr, "unknown argument %s\n", k.c_str());
      return 1;
    }
  }
  const char* scan_env = std::getenv("KVMEM_DEVICE_SCAN");
  const std::string scan = scan_env != nullptr && std::string(scan_env) == "off" ? "staged_host" : "device";
  auto pool = CreateDevicePool({8ull << 30, 4ull << 20}, 0);
  if (!pool.ok()) {
    std::fprintf(stderr, "%s\n", pool.status().ToString().c_str());
    return 1;
  }
  std::mt19937_64 rng(7);
  std::normal_distribution<float> n01;
  nlohmann::json rows = nlohmann::json::array();
  for (uint32_t ctx : contexts) {
    ModelProfile p{2, kHq, kHkv, kD, DType::kBF16};
    p.retrieval_head_mask.assign(2 * kHkv, 0);
    for (uint32_t h = 0; h < kHkv; ++h) p.retrieval_head_mask[h] = 1;
    for (uint32_t i = 0; i < nret; ++i) p.retrieval_head_mask[kHkv + i * kHkv / nret] = 1;
    SessionOptions o;
    o.mode = SelectionMode::kRetrievalHeads;
    o.sink_tokens = 16;
    o.default_budget_tokens = 4096;
    o.retrieval.block_tokens = 64;
    auto s = Session::Create(1, "bench", p, o, pool->get());
    if (!s.ok()) {
      std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
      return 1;
    }
    // Prefill in slices of 8K tokens ([layers][kv_heads][n][D]); sentence ends every ~16 tokens.
    const uint32_t slice = 8192;
    std::vector<uint16_t> k(size_t{2} * kHkv * slice * kD), v(k.size());
    std::vector<uint8_t> bounds(slice);
    for (uint32_t done = 0; done < ctx; done += slice) {
      for (auto& x : k) x = FloatToBF16(n01(rng));
      for (auto& x : v) x = FloatToBF16(n01(rng));
      for (uint32_t t = 0; t < slice; ++t) bounds[t] = (done + t) % 16 == 15 ? 3 : 1;
      auto r = (*s)->AppendKV(slice, k.data(), v.data(), bounds.data());
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
        return 1;
      }
    }
    std::vector<uint16_t> q(kHq * kD), out(kHq * kD);
    std::vector<float> lse(kHq);
    std::vector<double> us;
    bool device_scan = false;
    uint64_t reused = 0;
    // The staged path takes milliseconds per call at these sizes: fewer iterations.
    const int n = scan == "device" ? iters : std::max(3, iters / 6);
    for (int it = 0; it < n + 2; ++it) {
      for (auto& x : q) x = FloatToBF16(n01(rng));
      AttendArgs a;
      a.layer = 0;
      a.q = q.data();
      a.out = out.data();
      a.lse = lse.data();
      if (Status st0 = (*s)->Attend(a, nullptr); !st0.ok()) {
        std::fprintf(stderr, "%s\n", st0.ToString().c_str());
        return 1;
      }
      a.layer = 1;
      AttendInfo info;
      const auto t0 = std::chrono::steady_clock::now();
      const Status st = (*s)->Attend(a, &info);
      const auto t1 = std::chrono::steady_clock::now();
      if (!st.ok()) {
        std::fprintf(stderr, "%s\n", st.ToString().c_str());
        return 1;
      }
      device_scan = info.device_scan;
      reused = 0;
      for (const HeadSelection& hs : info.selection) reused += hs.role == HeadRole::kReused ? 1 : 0;
      if (it >= 2) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::sort(us.begin(), us.end());
    nlohmann::json r;
    r["context"] = ctx;
    r["retrieval_heads"] = nret;
    r["scan"] = scan;
    r["device_scan"] = device_scan;
    r["sparse_heads_reusing"] = reused;
    r["attend_us_median"] = us[us.size() / 2];
    r["attend_us_min"] = us.front();
    r["iterations"] = us.size();
    rows.push_back(r);
    std::printf("%-8u ret %u reuse %lu scan %-12s attend median %10.1f us (min %.1f, n %zu)\n", ctx, nret,
                static_cast<unsigned long>(reused), scan.c_str(), us[us.size() / 2], us.front(), us.size());
  }
  nlohmann::json doc;
  doc["benchmark"] = "kvmem-bench-retrieval-session";
  doc["machine"] = machine;
  doc["pool"] = (*pool)->Describe();
  doc["commit"] = commit;
  doc["params"] = {{"q_heads", kHq}, {"kv_heads", kHkv}, {"head_dim", kD}, {"dtype", "bf16"},
                   {"budget_tokens", 4096}, {"block_tokens", 64}, {"sinks", 16}};
  doc["rows"] = rows;
  if (!json.empty()) std::ofstream(json) << doc.dump(2) << "\n";
  return 0;
}

}  // namespace
}  // namespace kvmem::bench

int main(int argc, char** argv) { return kvmem::bench::Main(argc, argv); }
