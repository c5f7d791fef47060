// kvmem-bench-e2e: what a worker sees. One Attend round trip (client -> kvmemd -> backend ->
// client) per layer at a given context, through a real kvmemd over shared memory, in index
// mode (search + sparse attention) and dense mode, with a Ping round trip as the transport
// floor measured in the same run.
//
//   kvmem-bench-e2e --json FILE [--contexts 8192,32768,131072] [--budget 2048] [--iters N]
//                   [--host-search] [--config FILE] [--layers L]
//
// Two more rows per context, kvmem_e2e_decode and kvmem_e2e_decode_dense, time decode steps in
// index and dense mode: each Attend also appends the token's K/V (the mean per step, with p50 /
// p90).
//
// Where the time goes: the daemon's kvmem_attend_phase_seconds (admin /metrics) is read
// before and after each timed loop; the rows carry the mean per phase (daemon_phase_us) and
// the daemon's own request time (daemon_request_us). --host-search starts kvmemd with
// KVMEM_DEVICE_SEARCH=off (index search on the host even on the CUDA backend) for A/B runs.
// --config passes a kvmemd config file (e.g. deploy/kvmemd-fidelity.json: its session
// defaults then shape the index-mode sessions; the rows carry the file's name as `config`).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
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

// GET http://127.0.0.1:port/path (the daemon's admin endpoint); empty on failure.
std::string HttpGet(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return {};
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    (void)!::write(fd, req.data(), req.size());
    char buf[65536];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

// Sum and count of every labelled sample of a Prometheus histogram family, by label value.
struct PhaseTotals {
  std::map<std::string, std::pair<double, double>> v;  // label -> (sum seconds, count)
};
PhaseTotals ReadHistogram(int port, const std::string& family, const std::string& label) {
  PhaseTotals t;
  const std::string text = HttpGet(port, "/metrics");
  std::istringstream in(text);
  std::string line;
  const std::string pre = family + "_";
  while (std::getline(in, line)) {
    if (line.rfind(pre, 0) != 0) continue;
    const bool sum = line.rfind(family + "_sum{", 0) == 0, count = line.rfind(family + "_count{", 0) == 0;
    if (!sum && !count) continue;
    const size_t l0 = line.find(label + "=\"");
    if (l0 == std::string::npos) continue;
    const size_t v0 = l0 + label.size() + 2, v1 = line.find('"', v0);
    const std::string key = line.substr(v0, v1 - v0);
    const double val = std::stod(line.substr(line.rfind(' ') + 1));
    (sum ? t.v[key].first : t.v[key].second) = val;
  }
  return t;
}

// Mean microseconds per observation between two snapshots, by label.
json MeanDelta(const PhaseTotals& a, const PhaseTotals& b) {
  json j = json::object();
  for (const auto& [k, v] : b.v) {
    auto it = a.v.find(k);
    const double ds = v.first - (it == a.v.end() ? 0 : it->second.first);
    const double dc = v.second - (it == a.v.end() ? 0 : it->second.second);
    if (dc > 0) j[k] = ds / dc * 1e6;
  }
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  std::vector<uint64_t> contexts = {8192, 32768, 131072};
  uint32_t budget = 2048;
  int iters = 200;
  std::string backend = "auto";
  bool host_search = false;
  std::string config;
  uint32_t layers = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) json_path = argv[++i];
    else if (a == "--budget" && i + 1 < argc) budget = static_cast<uint32_t>(std::stoul(argv[++i]));
    else if (a == "--iters" && i + 1 < argc) iters = std::stoi(argv[++i]);
    else if (a == "--backend" && i + 1 < argc) backend = argv[++i];
    else if (a == "--host-search") host_search = true;
    else if (a == "--config" && i + 1 < argc) config = argv[++i];
    else if (a == "--layers" && i + 1 < argc) layers = std::max(1, std::stoi(argv[++i]));
    else if (a == "--contexts" && i + 1 < argc) {
      contexts.clear();
      std::stringstream ss(argv[++i]);
      std::string tok;
      while (std::getline(ss, tok, ',')) contexts.push_back(std::stoull(tok));
    } else {
      std::fprintf(stderr, "usage: kvmem-bench-e2e --json FILE [--contexts a,b] [--budget N] [--iters N] [--backend B] "
                           "[--host-search] [--config FILE] [--layers N]\n");
      return 2;
    }
  }
  // Llama-3-8B-like layer: 32 query heads, 8 KV heads, head dim 128, bf16. One layer per
  // session by default (the per-layer round trip is what is measured); --layers L gives the
  // session L layers (the same keys in each) and the decode row then runs a step as L Attends,
  // one per layer, the token complete (and a chunk sealed) at the last.
  const uint32_t HQ = 32, HKV = 8, D = 128;
  uint64_t max_ctx = *std::max_element(contexts.begin(), contexts.end());
  const uint64_t pool_bytes = max_ctx * HKV * D * 2 * 2 * 3 * layers + (1ull << 30);
  if (host_search) ::setenv("KVMEM_DEVICE_SEARCH", "off", 1);  // inherited by kvmemd
  const int admin_port = kvmem::testing::FreePort();
  std::vector<std::string> args{"--progress", "poll", "--executors", "0", "--backend", backend,
                                "--device-memory", std::to_string(pool_bytes), "--admin",
                                "127.0.0.1:" + std::to_string(admin_port)};
  if (!config.empty()) args.insert(args.begin(), {"--config", config});
  kvmem::testing::DaemonProcess d(args);
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
  if (!config.empty()) out["config"] = config;
  out["results"] = json::array();
  out["append"] = json::array();
  std::vector<double> ping;
  for (int i = 0; i < 3000; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    (void)cl.Ping(i);
    ping.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  out["ping_rtt_p50_us"] = Median(ping);
  // n + kWarmup Attend calls (the first kWarmup warm up): the n timed round trips in us, the tokens KV head 0
  // attended in the last, and the daemon's mean phase and request times over the timed ones.
  // `before(i)` may change the request first. `failed` when a call did.
  struct Timed {
    std::vector<double> us;
    uint32_t attended = 0;
    json phases, req_us;
    bool failed = false;
  };
  constexpr int kWarmup = 5;
  // Timed calls of a dense row: dense attention over more than 32K tokens is slow on the CPU
  // backend, so a tenth of them there (at least 10).
  auto timed_calls = [&](bool dense, uint64_t T) {
    return dense && T > 32768 ? std::max(10, iters / 10) : iters;
  };
  auto timed_attends = [&](uint64_t session, AttendRequest& req, int n,
                           const std::function<void(int)>& before) {
    Timed t;
    PhaseTotals ph0, rq0;
    for (int i = 0; i < n + kWarmup; ++i) {
      if (before) before(i);
      auto t0 = std::chrono::steady_clock::now();
      auto r = cl.Attend(session, req);
      const double dt = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      if (!r.ok()) {
        std::fprintf(stderr, "attend: %s\n", r.status().ToString().c_str());
        t.failed = true;
        return t;
      }
      t.attended = r->tokens_attended[0];
      if (i >= kWarmup) t.us.push_back(dt);
      if (i == kWarmup - 1) {
        ph0 = ReadHistogram(admin_port, "kvmem_attend_phase_seconds", "phase");
        rq0 = ReadHistogram(admin_port, "kvmem_request_duration_seconds", "op");
      }
    }
    t.phases = MeanDelta(ph0, ReadHistogram(admin_port, "kvmem_attend_phase_seconds", "phase"));
    const json req_us = MeanDelta(rq0, ReadHistogram(admin_port, "kvmem_request_duration_seconds", "op"));
    t.req_us = req_us.contains("Attend") ? req_us["Attend"] : json();
    return t;
  };
  std::mt19937_64 rng(7);
  std::normal_distribution<float> n01;
  std::printf("%-8s %-8s %-18s %12s %14s\n", "context", "budget", "method", "us_per_layer", "tokens/head");
  for (uint64_t T : contexts) {
    kvmem::client::SessionOptions so;
    so.mode = kvmem::client::Mode::kIndex;
    so.default_budget_tokens = budget;
    auto id = cl.CreateSession({layers, HQ, HKV, D, DType::kBF16}, so);
    if (!id.ok()) {
      std::fprintf(stderr, "%s\n", id.status().ToString().c_str());
      return 1;
    }
    // Topic-structured keys (segments of 512 tokens share a direction), appended in 8K pieces.
    std::vector<float> topic(static_cast<size_t>(HKV) * D);
    const uint64_t piece = 8192;
    std::vector<uint16_t> k(uint64_t{layers} * HKV * piece * D), v(k.size());
    std::vector<uint8_t> bounds(piece);
    std::vector<uint16_t> probe_keys(HKV * D);
    double append_ms = 0;  // the AppendKV calls only (not the generation of their keys)
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
      for (uint32_t l = 1; l < layers; ++l) {  // the same keys and values in every layer
        std::copy_n(k.begin(), uint64_t{HKV} * n * D, k.begin() + uint64_t{l} * HKV * n * D);
        std::copy_n(v.begin(), uint64_t{HKV} * n * D, v.begin() + uint64_t{l} * HKV * n * D);
      }
      const auto t_append = std::chrono::steady_clock::now();
      auto r = cl.AppendKV(*id, TensorView{k.data(), DType::kBF16, {layers, HKV, n, D}},
                           TensorView{v.data(), DType::kBF16, {layers, HKV, n, D}},
                           std::span<const uint8_t>(bounds.data(), n));
      append_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_append).count();
      if (!r.ok()) {
        std::fprintf(stderr, "append: %s\n", r.status().ToString().c_str());
        return 1;
      }
    }
    (void)cl.Ping();  // lets index upkeep after the last append finish before timing
    {
      // The prefill's AppendKV calls (8K-token pieces, K and V), for the record: not a target.
      const double ms = append_ms;
      const double gb = static_cast<double>(T) * layers * HKV * D * 2 * 2 / 1e9;
      out["append"].push_back({{"context", T}, {"ms", ms}, {"gbps", gb / (ms / 1e3)}});
      std::printf("%-8llu append %.1f ms (%.2f GB/s of K/V)\n", static_cast<unsigned long long>(T), ms, gb / (ms / 1e3));
    }
    std::vector<uint16_t> q(HQ * D);
    for (uint32_t qh = 0; qh < HQ; ++qh)
      for (uint32_t dd = 0; dd < D; ++dd) q[qh * D + dd] = probe_keys[(qh / (HQ / HKV)) * D + dd];
    for (auto mode : {kvmem::client::Mode::kIndex, kvmem::client::Mode::kDense}) {
      AttendRequest req;
      req.q = TensorView{q.data(), DType::kBF16, {HQ, D}};
      req.mode = mode;
      req.budget_tokens = budget;
      const bool dense = mode == kvmem::client::Mode::kDense;
      const Timed tm = timed_attends(*id, req, timed_calls(dense, T), nullptr);
      if (tm.failed) return 1;
      std::string method = dense ? "kvmem_e2e_attend_dense" : "kvmem_e2e_attend";
      if (host_search && !dense) method += "_host_search";
      out["results"].push_back({{"context", T}, {"batch", 1}, {"budget", budget}, {"method", method},
                                {"us_per_layer", Median(tm.us)}, {"tokens_attended_per_head", tm.attended},
                                {"daemon_phase_us", tm.phases}, {"daemon_request_us", tm.req_us}});
      std::printf("%-8llu %-8u %-30s %10.1f %10u  daemon %s  phases %s\n",
                  static_cast<unsigned long long>(T), budget, method.c_str(), Median(tm.us), tm.attended,
                  tm.req_us.dump().c_str(), tm.phases.dump().c_str());
    }
    // Decode steps, as a worker runs them: each Attend also appends the new token's K/V row
    // (new_k / new_v), so the session grows by one token per step and seals a chunk every ~15;
    // the round trip then includes the append, and the step after a seal the chunk's copies,
    // the index insert and the device mirror's upload (Maintain runs after the previous reply).
    // us_per_layer is the mean over the steps (what a decode stream pays per token), with the
    // median and the 90th percentile beside it. kvmem_e2e_decode_dense: the same in dense mode
    // (fewer steps above 32K, as the dense row).
    for (auto mode : {kvmem::client::Mode::kIndex, kvmem::client::Mode::kDense}) {
      const bool dense = mode == kvmem::client::Mode::kDense;
      const char* method = dense ? "kvmem_e2e_decode_dense" : "kvmem_e2e_decode";
      const int steps = timed_calls(dense, T);
      AttendRequest req;
      req.q = TensorView{q.data(), DType::kBF16, {HQ, D}};
      req.mode = mode;
      req.budget_tokens = budget;
      std::vector<uint16_t> nk(HKV * D), nv(HKV * D);
      req.new_k = TensorView{nk.data(), DType::kBF16, {HKV, D}};
      req.new_v = TensorView{nv.data(), DType::kBF16, {HKV, D}};
      // With L layers a step is L Attends (layer 0 .. L-1, the same new row in each).
      const uint64_t first = T + (dense ? static_cast<uint64_t>(iters + kWarmup) : 0);  // after the index steps
      const Timed tm = timed_attends(*id, req, steps * static_cast<int>(layers), [&](int i) {
        req.layer = static_cast<uint32_t>(i) % layers;
        const uint64_t t = first + static_cast<uint64_t>(i) / layers;
        if (req.layer != 0) return;
        if (t % 512 == 0)
          for (auto& x : topic) x = n01(rng) * 1.5f;
        for (uint32_t h = 0; h < HKV; ++h)
          for (uint32_t dd = 0; dd < D; ++dd) {
            nk[h * D + dd] = kvmem::FloatToBF16(topic[h * D + dd] + n01(rng) * 0.4f);
            nv[h * D + dd] = kvmem::FloatToBF16(n01(rng));
          }
        req.boundary = t % 11 == 10 ? 3 : 1;
      });
      if (tm.failed) return 1;
      const std::vector<double>& us = tm.us;
      double mean = 0;
      for (double x : us) mean += x;
      mean /= static_cast<double>(us.size());
      std::vector<double> sorted = us;
      std::sort(sorted.begin(), sorted.end());
      const double p90 = sorted[sorted.size() * 9 / 10];
      out["results"].push_back({{"context", T}, {"batch", 1}, {"budget", budget}, {"method", method},
                                {"layers", layers}, {"us_per_layer", mean}, {"p50_us", Median(us)}, {"p90_us", p90},
                                {"steps", us.size()}, {"tokens_attended_per_head", tm.attended},
                                {"daemon_phase_us", tm.phases}, {"daemon_request_us", tm.req_us}});
      std::printf("%-8llu %-8u %-30s %10.1f %10u  p50 %.1f p90 %.1f  daemon %s  phases %s\n",
                  static_cast<unsigned long long>(T), budget, method, mean, tm.attended, Median(us), p90,
                  tm.req_us.dump().c_str(), tm.phases.dump().c_str());
    }
    (void)cl.DropSession(*id);
  }
  std::printf("ping rtt p50 %.2f us; backend %s\n", out["ping_rtt_p50_us"].get<double>(), cl.server().backend.c_str());
  c->reset();
  d.Stop();
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(2) << "\n";
  return 0;
}
