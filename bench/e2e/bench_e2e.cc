// kvmem-bench-e2e: what a worker sees. One Attend round trip (client -> kvmemd -> backend ->
// client) per layer at a given context, through a real kvmemd over shared memory, in index
// mode (search + sparse attention) and dense mode, with a Ping round trip as the transport
// floor measured in the same run.
//
//   kvmem-bench-e2e --json FILE [--contexts 8192,32768,131072] [--budget 2048] [--iters N]
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "client/client.h"
#include "testing/daemon_process.h"

namespace {

using kvmem::DType;
using kvmem::client::AttendRequest;
using kvmem::client::Client;
using kvmem::client::TensorView;
using nlohmann::json;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  std::vector<uint64_t> contexts = {8192, 32768, 131072};
  uint32_t budget = 2048;
  int iters = 200;
  std::string backend = "auto";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) json_path = argv[++i];
    else if (a == "--budget" && i + 1 < argc) budget = static_cast<uint32_t>(std::stoul(argv[++i]));
    else if (a == "--iters" && i + 1 < argc) iters = std::stoi(argv[++i]);
    else if (a == "--backend" && i + 1 < argc) backend = argv[++i];
    else if (a == "--contexts" && i + 1 < argc) {
      contexts.clear();
      std::stringstream ss(argv[++i]);
      std::string tok;
      while (std::getline(ss, tok, ',')) contexts.push_back(std::stoull(tok));
    } else {
      std::fprintf(stderr, "usage: kvmem-bench-e2e --json FILE [--contexts a,b] [--budget N] [--iters N] [--backend B]\n");
      return 2;
    }
  }
  // Llama-3-8B-like layer: 32 query heads, 8 KV heads, head dim 128, bf16. One layer per
  // session (the per-layer round trip is what is measured).
  const uint32_t HQ = 32, HKV = 8, D = 128;
  uint64_t max_ctx = *std::max_element(contexts.begin(), contexts.end());
  const uint64_t pool_bytes = max_ctx * HKV * D * 2 * 2 * 3 + (1ull << 30);
  kvmem::testing::DaemonProcess d({"--progress", "poll", "--executors", "0", "--backend", backend,
                                   "--device-memory", std::to_string(pool_bytes)});
  if (!d.ready()) {
    std::fprintf(stderr, "kvmemd did not start\n");
    return 1;
  }
  kvmem::client::ClientOptions o;
  o.transport = "shm";
  o.spin_us = 1000000;
  auto c = Client::Connect(d.address(), o);
  if (!c.ok()) {
    std::fprintf(stderr, "%s\n", c.status().ToString().c_str());
    return 1;
  }
  Client& cl = **c;
  json out;
  out["backend"] = cl.server().backend;
  out["results"] = json::array();
  std::vector<double> ping;
  for (int i = 0; i < 3000; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    (void)cl.Ping(i);
    ping.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  out["ping_rtt_p50_us"] = Median(ping);
  std::mt19937_64 rng(7);
  std::normal_distribution<float> n01;
  std::printf("%-8s %-8s %-18s %12s %14s\n", "context", "budget", "method", "us_per_layer", "tokens/head");
  for (uint64_t T : contexts) {
    kvmem::client::SessionOptions so;
    so.mode = kvmem::client::Mode::kIndex;
    so.default_budget_tokens = budget;
    auto id = cl.CreateSession({1, HQ, HKV, D, DType::kBF16}, so);
    if (!id.ok()) {
      std::fprintf(stderr, "%s\n", id.status().ToString().c_str());
      return 1;
    }
    // Topic-structured keys (segments of 512 tokens share a direction), appended in 8K pieces.
    std::vector<float> topic(static_cast<size_t>(HKV) * D);
    const uint64_t piece = 8192;
    std::vector<uint16_t> k(HKV * piece * D), v(k.size());
    std::vector<uint8_t> bounds(piece);
    std::vector<uint16_t> probe_keys(HKV * D);
    for (uint64_t done = 0; done < T; done += piece) {
      const uint64_t n = std::min(piece, T - done);
      for (uint64_t t = 0; t < n; ++t) {
        if ((done + t) % 512 == 0)
          for (auto& x : topic) x = n01(rng) * 1.5f;
        bounds[t] = (done + t) % 11 == 10 ? 3 : 1;
        for (uint32_t h = 0; h < HKV; ++h)
          for (uint32_t dd = 0; dd < D; ++dd) {
            k[(h * n + t) * D + dd] = kvmem::FloatToBF16(topic[h * D + dd] + n01(rng) * 0.4f);
            v[(h * n + t) * D + dd] = kvmem::FloatToBF16(n01(rng));
          }
      }
      if (done == 0)
        for (uint32_t h = 0; h < HKV; ++h)
          std::copy(k.begin() + (h * n + n / 2) * D, k.begin() + (h * n + n / 2 + 1) * D, probe_keys.begin() + h * D);
      auto r = cl.AppendKV(*id, TensorView{k.data(), DType::kBF16, {1, HKV, n, D}},
                           TensorView{v.data(), DType::kBF16, {1, HKV, n, D}}, std::span<const uint8_t>(bounds.data(), n));
      if (!r.ok()) {
        std::fprintf(stderr, "append: %s\n", r.status().ToString().c_str());
        return 1;
      }
    }
    (void)cl.Ping();  // lets index upkeep after the last append finish before timing
    std::vector<uint16_t> q(HQ * D);
    for (uint32_t qh = 0; qh < HQ; ++qh)
      for (uint32_t dd = 0; dd < D; ++dd) q[qh * D + dd] = probe_keys[(qh / (HQ / HKV)) * D + dd];
    for (auto mode : {kvmem::client::Mode::kIndex, kvmem::client::Mode::kDense}) {
      AttendRequest req;
      req.q = TensorView{q.data(), DType::kBF16, {HQ, D}};
      req.mode = mode;
      req.budget_tokens = budget;
      std::vector<double> us;
      uint32_t attended = 0;
      const int n_iter = mode == kvmem::client::Mode::kDense && T > 32768 ? std::max(10, iters / 10) : iters;
      for (int i = 0; i < n_iter + 5; ++i) {
        auto t0 = std::chrono::steady_clock::now();
        auto r = cl.Attend(*id, req);
        const double dt = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        if (!r.ok()) {
          std::fprintf(stderr, "attend: %s\n", r.status().ToString().c_str());
          return 1;
        }
        attended = r->tokens_attended[0];
        if (i >= 5) us.push_back(dt);
      }
      const char* method = mode == kvmem::client::Mode::kIndex ? "kvmem_e2e_attend" : "kvmem_e2e_attend_dense";
      out["results"].push_back({{"context", T}, {"batch", 1}, {"budget", budget}, {"method", method},
                                {"us_per_layer", Median(us)}, {"tokens_attended_per_head", attended}});
      std::printf("%-8llu %-8u %-18s %12.1f %14u\n", static_cast<unsigned long long>(T), budget, method, Median(us), attended);
    }
    (void)cl.DropSession(*id);
  }
  std::printf("ping rtt p50 %.2f us; backend %s\n", out["ping_rtt_p50_us"].get<double>(), cl.server().backend.c_str());
  c->reset();
  d.Stop();
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(2) << "\n";
  return 0;
}
