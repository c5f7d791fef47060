// kvmem-bench-cpu-attend: the CPU backend's attention kernel (kernels::AttendCpuBlocked) on one
// thread, per layer: 32 query heads, 8 KV heads, D = 128, bf16 K/V/q/out, the keys in chunk
// blocks of 8..24 tokens as the daemon stores them, every KV head attending `tokens` of them
// (2048: an index-mode budget; 8192 and 32768: dense layers).
//
//   kvmem-bench-cpu-attend --json FILE [--tokens 2048,8192,32768] [--iters 20]
//
// Methods: `blocked_auto` (what the CPU backend runs: AVX2 + FMA where the CPU has them),
// `blocked_auto_workers` (the same, the KV heads spread over a daemon ParallelPool of
// hardware threads - 1 workers plus the caller, as the host pool does with kvmemd's search
// threads), `blocked_baseline` (the baseline x86-64 build), `reference` (AttendCpu, plain
// loops), all in the same run. Median µs per layer; GB/s of K/V bytes read.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/dtype.h"
#include "daemon/parallel.h"
#include "kernels/attention.h"

namespace {

using kvmem::DType;
using kvmem::kernels::AttendProblem;
using kvmem::kernels::CpuIsa;
using kvmem::kernels::KVSpan;

constexpr uint32_t kHq = 32, kHkv = 8, kD = 128;

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  std::vector<uint32_t> sizes{2048, 8192, 32768};
  int iters = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--json") {
      json_path = argv[i + 1];
    } else if (a == "--iters") {
      iters = std::max(1, std::atoi(argv[i + 1]));
    } else if (a == "--tokens") {
      sizes.clear();
      std::stringstream ss(argv[i + 1]);
      for (std::string t; std::getline(ss, t, ',');) sizes.push_back(static_cast<uint32_t>(std::stoul(t)));
    } else {
      std::fprintf(stderr, "usage: kvmem-bench-cpu-attend --json FILE [--tokens 2048,...] [--iters N]\n");
      return 2;
    }
  }
  std::mt19937 rng(5);
  std::normal_distribution<float> n01;
  nlohmann::json out{{"bench", "kvmem-bench-cpu-attend"},
                     {"shape", {{"q_heads", kHq}, {"kv_heads", kHkv}, {"head_dim", kD}, {"dtype", "bf16"},
                                {"chunk_tokens", "8..24"}}},
                     {"avx2_fma", kvmem::kernels::CpuHasAvx2Fma()},
                     {"workers_threads", std::max(1u, std::thread::hardware_concurrency())},
                     {"results", nlohmann::json::array()}};
  std::printf("%-8s %-22s %12s %8s\n", "tokens", "method", "us/layer", "GB/s");
  static kvmem::ParallelPool workers(std::max(1u, std::thread::hardware_concurrency()) - 1);
  for (uint32_t tokens : sizes) {
    // Chunk blocks [K: kv_heads x len x D][V: same], back to back.
    std::vector<KVSpan> spans;
    uint64_t elems = 0;
    for (uint32_t got = 0; got < tokens;) {
      const uint32_t len = std::min<uint32_t>(8 + rng() % 17, tokens - got);
      spans.push_back({elems, len, 0, len});
      elems += uint64_t{2} * kHkv * len * kD;
      got += len;
    }
    std::vector<uint16_t> pool(elems), q(kHq * kD), o(kHq * kD);
    for (auto& x : pool) x = kvmem::FloatToBF16(n01(rng));
    for (auto& x : q) x = kvmem::FloatToBF16(n01(rng));
    std::vector<float> lse(kHq);
    AttendProblem p{pool.data(), DType::kBF16, kHq, kHkv, kD, 1.f / std::sqrt(float(kD)), q.data(), DType::kBF16,
                    spans.data(), nullptr, static_cast<uint32_t>(spans.size()), o.data(), DType::kBF16, lse.data()};
    const double bytes = static_cast<double>(elems) * 2;
    struct Method {
      const char* name;
      void (*run)(const AttendProblem*);
    };
    const Method methods[] = {
        {"blocked_auto", [](const AttendProblem* pp) { kvmem::kernels::AttendCpuBlocked(pp, 1, CpuIsa::kAuto); }},
        {"blocked_auto_workers",
         [](const AttendProblem* pp) {
           workers.For(pp->kv_heads, [pp](uint32_t h) { kvmem::kernels::AttendCpuBlockedHead(*pp, h); });
         }},
        {"blocked_baseline", [](const AttendProblem* pp) { kvmem::kernels::AttendCpuBlocked(pp, 1, CpuIsa::kBaseline); }},
        {"reference", [](const AttendProblem* pp) { kvmem::kernels::AttendCpu(pp, 1); }},
    };
    for (const Method& m : methods) {
      std::vector<double> us;
      const int n = std::string(m.name) == "reference" ? std::max(3, iters / 4) : iters;
      for (int i = 0; i < n + 1; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        m.run(&p);
        const double dt = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        if (i > 0) us.push_back(dt);
      }
      std::sort(us.begin(), us.end());
      const double med = us[us.size() / 2];
      out["results"].push_back({{"tokens_per_head", tokens}, {"method", m.name}, {"us_per_layer", med},
                                {"gbps", bytes / med / 1e3}});
      std::printf("%-8u %-22s %12.1f %8.2f\n", tokens, m.name, med, bytes / med / 1e3);
    }
  }
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(2) << "\n";
  return 0;
}
