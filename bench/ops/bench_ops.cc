// kvmem-bench-ops: the cost of observing kvmemd.
//   1. GET /metrics with N sessions (default 1000): end-to-end over loopback HTTP, so an upper
//      bound on the render time. Target: p99 <= 5 ms.
//   2. Ping round trips with and without a 10 Hz /metrics scraper, in alternating rounds of the
//      same run (A B A B ...), so machine noise hits both arms alike. Target: p99 within noise.
//
//   kvmem-bench-ops --json bench/results/ops.json [--sessions 1000] [--rounds 4] [--round-s 2]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "client/client.h"
#include "testing/daemon_process.h"
#include "testing/http_get.h"

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

json Summary(const std::vector<double>& us) {
  return {{"count", us.size()},
          {"p50_us", Percentile(us, 0.50)},
          {"p90_us", Percentile(us, 0.90)},
          {"p99_us", Percentile(us, 0.99)},
          {"p999_us", Percentile(us, 0.999)},
          {"max_us", us.empty() ? 0 : *std::max_element(us.begin(), us.end())}};
}

std::string Command(const char* cmd) {
  std::string out;
  if (FILE* f = ::popen(cmd, "r")) {
    char buf[256];
    while (std::fgets(buf, sizeof buf, f)) out += buf;
    ::pclose(f);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  int sessions = 1000, rounds = 4, scrapes = 200;
  double round_s = 2.0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--json")
      json_path = next();
    else if (a == "--sessions")
      sessions = std::stoi(next());
    else if (a == "--rounds")
      rounds = std::stoi(next());
    else if (a == "--round-s")
      round_s = std::stod(next());
    else if (a == "--scrapes")
      scrapes = std::stoi(next());
    else {
      std::fprintf(
          stderr,
          "usage: kvmem-bench-ops [--json FILE] [--sessions N] [--rounds N] [--round-s S]\n");
      return 2;
    }
  }
  const uint16_t admin = kvmem::testing::FreePort();
  kvmem::testing::DaemonProcess d(
      {"--admin", "127.0.0.1:" + std::to_string(admin), "--device-memory", "2GiB"});
  if (!d.ready()) {
    std::fprintf(stderr, "kvmemd did not start\n");
    return 1;
  }
  auto c = kvmem::client::Client::Connect(d.address());
  if (!c.ok()) {
    std::fprintf(stderr, "%s\n", c.status().ToString().c_str());
    return 1;
  }
  kvmem::client::Profile p;
  p.layers = 4;
  p.q_heads = 8;
  p.kv_heads = 2;
  p.head_dim = 64;
  for (int i = 0; i < sessions; ++i) {
    kvmem::client::SessionOptions o;
    o.label = "bench-" + std::to_string(i);
    auto id = (*c)->CreateSession(p, o, static_cast<uint64_t>(i + 1));
    if (!id.ok()) {
      std::fprintf(stderr, "CreateSession: %s\n", id.status().ToString().c_str());
      return 1;
    }
  }

  // 1. /metrics render time.
  std::vector<double> metrics_us;
  size_t metrics_bytes = 0;
  for (int i = 0; i < scrapes; ++i) {
    const auto t0 = Clock::now();
    auto r = kvmem::testing::HttpGet(admin, "/metrics");
    const auto t1 = Clock::now();
    if (r.status != 200) {
      std::fprintf(stderr, "/metrics: HTTP %d\n", r.status);
      return 1;
    }
    metrics_bytes = r.body.size();
    metrics_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  std::vector<double> sessions_us;
  for (int i = 0; i < 50; ++i) {
    const auto t0 = Clock::now();
    auto r = kvmem::testing::HttpGet(admin, "/v1/sessions");
    sessions_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }

  // 2. Ping with / without a 10 Hz scraper, alternating rounds.
  std::vector<double> quiet_us, scraped_us;
  int scrapes_during = 0;
  for (int r = 0; r < 2 * rounds; ++r) {
    const bool scrape = r % 2 == 1;
    std::atomic<bool> stop{false};
    std::thread scraper;
    if (scrape) {
      scraper = std::thread([&] {
        auto next = Clock::now();
        while (!stop.load()) {
          kvmem::testing::HttpGet(admin, "/metrics");
          ++scrapes_during;
          next += std::chrono::milliseconds(100);
          std::this_thread::sleep_until(next);
        }
      });
    }
    auto& out = scrape ? scraped_us : quiet_us;
    const auto end = Clock::now() + std::chrono::duration<double>(round_s);
    uint64_t n = 0;
    while (Clock::now() < end) {
      const auto t0 = Clock::now();
      if (!(*c)->Ping(n++).ok()) return 1;
      out.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    stop = true;
    if (scraper.joinable()) scraper.join();
  }

  const json metrics = Summary(metrics_us);
  const json quiet = Summary(quiet_us);
  const json scraped = Summary(scraped_us);
  json out = {{"bench", "ops"},
              {"sessions", sessions},
              {"metrics_http_get", metrics},
              {"metrics_body_bytes", metrics_bytes},
              {"metrics_target_p99_us", 5000},
              {"metrics_meets_target", metrics["p99_us"].get<double>() <= 5000},
              {"sessions_http_get", Summary(sessions_us)},
              {"ping_without_scrape", quiet},
              {"ping_with_scrape_10hz", scraped},
              {"scrapes_during_ping", scrapes_during},
              {"rounds", rounds},
              {"round_s", round_s},
              {"hardware_threads", std::thread::hardware_concurrency()},
              {"machine", Command("uname -n")},
              {"cpu", Command("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")},
              {"loadavg_at_end", Command("cut -d' ' -f1-3 /proc/loadavg")},
              {"commit", Command("git rev-parse --short HEAD 2>/dev/null")},
              {"note",
               "GET /metrics timed end to end over loopback HTTP (connect + render + transfer), "
               "an upper bound on render time; Ping over UCX auto (shared memory), event "
               "progress, rounds alternate without/with scraping"}};
  std::printf(
      "GET /metrics (%d sessions, %zu bytes): p50 %.0f us, p99 %.0f us, max %.0f us (target p99 <= "
      "5000 us)\n",
      sessions, metrics_bytes, metrics["p50_us"].get<double>(), metrics["p99_us"].get<double>(),
      metrics["max_us"].get<double>());
  std::printf("Ping without scraping: p50 %.1f us, p99 %.1f us, p999 %.1f us (%zu pings)\n",
              quiet["p50_us"].get<double>(), quiet["p99_us"].get<double>(),
              quiet["p999_us"].get<double>(), quiet_us.size());
  std::printf(
      "Ping with 10 Hz /metrics: p50 %.1f us, p99 %.1f us, p999 %.1f us (%zu pings, %d scrapes)\n",
      scraped["p50_us"].get<double>(), scraped["p99_us"].get<double>(),
      scraped["p999_us"].get<double>(), scraped_us.size(), scrapes_during);
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(2) << "\n";
  return d.Stop() == 0 ? 0 : 1;
}
