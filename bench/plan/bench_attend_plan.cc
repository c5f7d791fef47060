// kvmem-bench-attend-plan: host time of cuda::PlanAttend (no GPU needed), the planner every
// Attend that is not the fused device search goes through on the CUDA backend: dense mode, dense
// layers, retrieval heads (they attend the whole context) and the host search. Llama-3-8B-like
// layer (32 query heads, 8 KV heads, D = 128), daemon-like chunk blocks of 8..24 tokens.
//
//   kvmem-bench-attend-plan --json FILE [--contexts 8192,32768,131072] [--iters 200]
//
// Rows: method `plan_reused` (one AttendPlan planned into again and again, as kvmemd does) and
// `plan_fresh` (a new AttendPlan per call: the image allocated and faulted in every time), for
// `dense` (every chunk of the layer, all heads) and `sparse` (2048 tokens of chunks per head),
// against `image_copy`: a memcpy of the plan's image bytes into a reused buffer, the floor of
// writing the image once (measured in the same run). Medians in µs.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cuda_ops.h"

namespace {

using kvmem::DType;
using kvmem::kernels::AttendProblem;
using kvmem::kernels::KVSpan;
namespace kc = kvmem::kernels::cuda;

constexpr uint32_t kQHeads = 32, kKVHeads = 8, kD = 128;

template <typename F>
double MedianUs(int iters, F&& f) {
  std::vector<double> us;
  for (int i = 0; i < iters + 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const double dt = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (i >= 3) us.push_back(dt);
  }
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  std::vector<uint64_t> contexts{8192, 32768, 131072};
  int iters = 200;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (a == "--iters" && i + 1 < argc) {
      iters = std::max(1, std::stoi(argv[++i]));
    } else if (a == "--contexts" && i + 1 < argc) {
      contexts.clear();
      std::stringstream ss(argv[++i]);
      for (std::string t; std::getline(ss, t, ',');) contexts.push_back(std::stoull(t));
    } else {
      std::fprintf(stderr, "usage: kvmem-bench-attend-plan --json FILE [--contexts 8192,...] [--iters N]\n");
      return 2;
    }
  }
  alignas(16) static uint8_t fake[16];
  nlohmann::json out{{"bench", "kvmem-bench-attend-plan"},
                     {"shape", {{"q_heads", kQHeads}, {"kv_heads", kKVHeads}, {"head_dim", kD},
                                {"chunk_tokens", "8..24"}, {"sparse_tokens_per_head", 2048}}},
                     {"iters", iters},
                     {"results", nlohmann::json::array()}};
  std::printf("%-8s %-7s %-13s %10s %8s %10s\n", "context", "mode", "method", "us", "runs", "image_kb");
  for (uint64_t ctx : contexts) {
    std::mt19937 rng(static_cast<uint32_t>(ctx));
    std::vector<KVSpan> chunks;  // the layer's chunk blocks, element offsets as the pool's
    uint64_t off = 0;
    for (uint64_t tok = 0; tok < ctx;) {
      const uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(8 + rng() % 17, ctx - tok));
      chunks.push_back({off, len, 0, len});
      off += uint64_t{2} * kKVHeads * len * kD;
      tok += len;
    }
    for (const char* mode : {"dense", "sparse"}) {
      std::vector<KVSpan> spans;
      std::vector<uint32_t> head_begin;
      if (std::string(mode) == "dense") {
        spans = chunks;
      } else {
        for (uint32_t h = 0; h < kKVHeads; ++h) {
          head_begin.push_back(static_cast<uint32_t>(spans.size()));
          std::vector<uint32_t> pick(chunks.size());
          for (uint32_t i = 0; i < pick.size(); ++i) pick[i] = i;
          std::shuffle(pick.begin(), pick.end(), rng);
          uint32_t got = 0;
          std::vector<uint32_t> sel;
          for (uint32_t c : pick) {
            if (got >= 2048) break;
            sel.push_back(c);
            got += chunks[c].end;
          }
          std::sort(sel.begin(), sel.end());
          for (uint32_t c : sel) spans.push_back(chunks[c]);
        }
        head_begin.push_back(static_cast<uint32_t>(spans.size()));
      }
      AttendProblem p{fake, DType::kBF16, kQHeads, kKVHeads, kD, 0.088f, fake, DType::kBF16,
                      spans.data(), head_begin.empty() ? nullptr : head_begin.data(),
                      static_cast<uint32_t>(spans.size()), fake, DType::kBF16, nullptr};
      kc::AttendPlan kept;
      if (!kc::PlanAttend(&p, 1, {}, &kept).ok()) {
        std::fprintf(stderr, "PlanAttend failed\n");
        return 1;
      }
      std::vector<uint8_t> copy(kept.image.size());
      const double reused = MedianUs(iters, [&] { (void)kc::PlanAttend(&p, 1, {}, &kept); });
      const double fresh = MedianUs(iters, [&] {
        kc::AttendPlan plan;
        (void)kc::PlanAttend(&p, 1, {}, &plan);
      });
      const double floor = MedianUs(iters, [&] {
        std::memcpy(copy.data(), kept.image.data(), copy.size());
        asm volatile("" ::"r"(copy.data()) : "memory");
      });
      for (auto [method, us] : {std::pair{"plan_reused", reused}, {"plan_fresh", fresh}, {"image_copy", floor}}) {
        out["results"].push_back({{"context", ctx}, {"mode", mode}, {"method", method}, {"us", us},
                                  {"runs", kept.num_runs}, {"image_bytes", kept.image.size()}});
        std::printf("%-8llu %-7s %-13s %10.1f %8u %10.1f\n", static_cast<unsigned long long>(ctx), mode,
                    method, us, kept.num_runs, kept.image.size() / 1024.0);
      }
    }
  }
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(2) << "\n";
  return 0;
}
