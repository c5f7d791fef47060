// kvmem-bench-transport: Ping round trips and AppendKV throughput through a real kvmemd over
// shared memory and TCP, against ucx_perftest (ucp_am_lat, ucp_am_bw 1 MiB) run in the same
// process tree and the same transports, so the comparison is like for like.
//
//   kvmem-bench-transport --json bench/results/transport.json [--quick] [--rounds R] [--window W]
//                         [--transports shm,tcp] [--machine TEXT] [--commit SHA] [--daemon-arg FLAG]...
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <map>

#include "client/client.h"
#include "testing/daemon_process.h"

namespace {

using kvmem::DType;
using kvmem::client::Client;
using kvmem::client::ClientOptions;
using kvmem::client::TensorView;
using nlohmann::json;

struct Args {
  std::string json_path;
  bool quick = false;
  int pings = 20000;
  int appends = 600;
  int rounds = 3;
  int window = 8;  // AppendKV requests in flight (ucx_perftest's bandwidth tests keep 32)
  std::vector<std::string> transports = {"shm", "tcp"};
  std::string machine;  // prefix of the "machine" field (where the run happened)
  std::string commit;   // overrides `git rev-parse` (a bundle run outside the checkout)
  std::vector<std::string> daemon_args;  // extra kvmemd flags (--daemon-arg, repeatable)
};

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

std::string Run(const std::string& cmd) {
  std::string out;
  FILE* f = popen(cmd.c_str(), "r");
  if (!f) return out;
  std::array<char, 4096> buf;
  while (fgets(buf.data(), buf.size(), f)) out += buf.data();
  pclose(f);
  return out;
}

// Runs a ucx_perftest server + client pair; returns the fields of the "Final:" line. With
// `lanes`, the client logs at info level and *lanes gets the transports its endpoint used
// (UCX's "ep_cfg" line), so the report shows the baseline ran over the same lanes as kvmemd.
std::vector<double> Perftest(const std::string& tls, const std::string& test, size_t size, int iters,
                             std::string* lanes = nullptr) {
  const uint16_t port = kvmem::testing::FreePort();
  const std::string env = "UCX_TLS=" + tls + " " + (lanes ? "UCX_LOG_LEVEL=info " : "");
  const std::string server = env + "ucx_perftest -p " + std::to_string(port) + " >/dev/null 2>&1 &";
  std::system(server.c_str());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const std::string client = env + "timeout 120 ucx_perftest 127.0.0.1 -p " + std::to_string(port) + " -t " + test +
                             " -s " + std::to_string(size) + " -n " + std::to_string(iters) + " 2>&1";
  const std::string out = Run(client);
  std::smatch m;
  std::vector<double> fields;
  const std::regex final_re(R"(Final:\s+([0-9.\s]+))");
  if (std::regex_search(out, m, final_re)) {
    std::istringstream ss(m[1].str());
    double x;
    while (ss >> x) fields.push_back(x);
  }
  if (fields.size() < 6) std::fprintf(stderr, "ucx_perftest %s failed:\n%s\n", test.c_str(), out.c_str());
  if (lanes != nullptr) {
    const std::regex ep_re(R"(ep_cfg\[\d+\]:\s*(.*))");
    if (std::regex_search(out, m, ep_re)) *lanes = m[1].str();
  }
  return fields;
}

// GET http://127.0.0.1:port/path (the daemon's admin endpoint); the body, or "" on failure.
std::string HttpGet(uint16_t port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return {};
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) {
    const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (::send(fd, req.data(), req.size(), 0) == static_cast<ssize_t>(req.size())) {
      char buf[65536];
      for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) out.append(buf, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  const auto body = out.find("\r\n\r\n");
  return body == std::string::npos ? std::string() : out.substr(body + 4);
}

// kvmem_append_phase_seconds{phase} sums and counts from a /metrics text: phase -> {sum_s, n}.
std::map<std::string, std::pair<double, double>> AppendPhases(const std::string& text) {
  std::map<std::string, std::pair<double, double>> m;
  const std::regex re(R"re(kvmem_append_phase_seconds_(sum|count)\{phase="([a-z_]+)"\} ([0-9.eE+-]+))re");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it) {
    auto& e = m[(*it)[2].str()];
    ((*it)[1].str() == "sum" ? e.first : e.second) = std::stod((*it)[3].str());
  }
  return m;
}

// Mean microseconds per AppendKV in each phase between two /metrics readings (empty when the
// daemon has no such metric: an older kvmemd).
json PhaseMeans(const std::map<std::string, std::pair<double, double>>& a,
                const std::map<std::string, std::pair<double, double>>& b) {
  json out = json::object();
  for (const auto& [k, v] : b) {
    const auto it = a.find(k);
    const double s0 = it == a.end() ? 0 : it->second.first, n0 = it == a.end() ? 0 : it->second.second;
    if (v.second > n0) out[k] = (v.first - s0) / (v.second - n0) * 1e6;
  }
  return out;
}

// memcpy of `bytes` per call, GB/s: from one source into one hot destination (the cache-resident
// case ucp_am_bw's single buffers see), and into a 128 MiB destination walked in order (the
// case of a KV pool being filled).
std::pair<double, double> MemcpyGbps(size_t bytes) {
  std::vector<uint8_t> src(bytes, 1), hot(bytes);
  std::vector<uint8_t> cold(128u << 20);
  const size_t slots = cold.size() / bytes;
  std::memset(cold.data(), 0, cold.size());
  auto time = [&](auto dst_of) {
    const int n = 512;
    for (int i = 0; i < 32; ++i) std::memcpy(dst_of(i), src.data(), bytes);
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) std::memcpy(dst_of(i), src.data(), bytes);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return static_cast<double>(bytes) * n / s / 1e9;
  };
  const double h = time([&](int) { return hot.data(); });
  const double c = time([&](int i) { return cold.data() + (static_cast<size_t>(i) % slots) * bytes; });
  return {h, c};
}

// The lane summary of ucp_ep_print_info: its "lane[i]: ..." lines, joined.
std::string EpLanes(const std::string& info) {
  std::string lanes;
  std::istringstream in(info);
  for (std::string line; std::getline(in, line);) {
    const auto p = line.find("lane[");
    if (p == std::string::npos) continue;
    if (!lanes.empty()) lanes += "; ";
    lanes += line.substr(p);
  }
  return lanes;
}

json Measure(const Args& a, const std::string& transport) {
  json r;
  // Poll mode: the daemon's transport thread spins (the configuration for lowest latency);
  // one executor so the copy into the KV pool overlaps the next message's receive.
  const uint16_t admin_port = kvmem::testing::FreePort();
  std::vector<std::string> dargs = {"--backend", "cpu", "--progress", "poll", "--executors", "1", "--device-memory", "2GiB",
                                    "--admin", "127.0.0.1:" + std::to_string(admin_port)};
  dargs.insert(dargs.end(), a.daemon_args.begin(), a.daemon_args.end());
  kvmem::testing::DaemonProcess d(dargs);
  if (!d.ready()) {
    std::fprintf(stderr, "kvmemd did not start\n");
    std::exit(1);
  }
  ClientOptions o;
  o.transport = transport;
  o.spin_us = 1000000;  // spin while waiting: latency mode
  auto c = Client::Connect(d.address(), o);
  if (!c.ok()) {
    std::fprintf(stderr, "connect: %s\n", c.status().ToString().c_str());
    std::exit(1);
  }
  Client& cl = **c;

  // Ping round trips.
  for (int i = 0; i < 2000; ++i) (void)cl.Ping(i);
  std::vector<double> rtt;
  rtt.reserve(a.pings);
  for (int i = 0; i < a.pings; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    if (!cl.Ping(i).ok()) std::exit(1);
    rtt.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  r["ping_rtt_p50_us"] = Percentile(rtt, 0.50);
  r["ping_rtt_p99_us"] = Percentile(rtt, 0.99);

  // AppendKV throughput: one packed kv tensor [2, 1 layer, 8 heads, T tokens, 128] bf16 per
  // message (AppendKVPacked: one contiguous zero-copy send), --window in flight; a fresh
  // session every 128 MiB keeps the pool bounded and warm. Two sizes: a 1 MiB tensor (T = 256),
  // the same message size as the ucp_am_bw baseline, and K 1 MiB + V 1 MiB (T = 512), compared
  // with ucp_am_bw at 2 MiB.
  // Throughput uses its own connection whose waits sleep on the event fd: a spinning client
  // would take one of the machine's cores from the daemon's receive and copy threads.
  ClientOptions to;
  to.transport = transport;
  auto tc = Client::Connect(d.address(), to);
  if (!tc.ok()) {
    std::fprintf(stderr, "connect: %s\n", tc.status().ToString().c_str());
    std::exit(1);
  }
  Client& tcl = **tc;
  const uint32_t H = 8, D = 128;
  kvmem::client::Profile prof{1, H, H, D, DType::kBF16};
  auto append_gbps = [&](uint32_t T) {
    std::mt19937_64 rng(1);
    std::vector<uint16_t> kv(2 * static_cast<size_t>(H) * T * D);
    for (auto& x : kv) x = kvmem::FloatToBF16(std::normal_distribution<float>()(rng));
    std::vector<uint8_t> bounds(T, 1);
    for (size_t i = 10; i < T; i += 13) bounds[i] = 3;
    const TensorView kvt{kv.data(), DType::kBF16, {2, 1, H, T, D}};
    const int per_session = static_cast<int>((128u << 20) / (kv.size() * 2));
    uint64_t session = *tcl.CreateSession(prof);
    auto run = [&](int n) {
      std::vector<kvmem::client::Future<kvmem::client::AppendResult>> window;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < n; ++i) {
        if (i > 0 && i % per_session == 0) {
          for (auto& f : window) (void)f.Get();
          window.clear();
          (void)tcl.DropSession(session);
          session = *tcl.CreateSession(prof);
        }
        window.push_back(tcl.AppendKVPackedAsync(session, kvt, bounds));
        if (window.size() == static_cast<size_t>(a.window)) {
          auto res = window.front().Get();
          if (!res.ok()) {
            std::fprintf(stderr, "append: %s\n", res.status().ToString().c_str());
            std::exit(1);
          }
          window.erase(window.begin());
        }
      }
      for (auto& f : window) (void)f.Get();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    const int n = a.appends * 512 / static_cast<int>(T);  // the same bytes for both sizes
    (void)run(n / 4);                                      // warm the pool and the buffers
    const double secs = run(n);
    (void)tcl.DropSession(session);
    return static_cast<double>(kv.size()) * 2 * n / secs / 1e9;
  };
  // Per-phase means of the measured appends (warm-up included: both halves of each size).
  const auto m0 = AppendPhases(HttpGet(admin_port, "/metrics"));
  r["append_gbps"] = append_gbps(256);
  const std::string text1 = HttpGet(admin_port, "/metrics");
  const auto m1 = AppendPhases(text1);
  // Appends received in place (kvmemd with the landing path), over both sizes so far.
  for (const char* o : {"landed", "gathered"}) {
    std::smatch lm;
    const std::regex lre(std::string(R"re(kvmem_append_landings_total\{outcome=")re") + o + R"re("\} ([0-9]+))re");
    if (std::regex_search(text1, lm, lre)) r[std::string("appends_") + o] = std::stoull(lm[1].str());
  }
  r["append_message_bytes"] = 1 << 20;
  r["append_2mib_gbps"] = append_gbps(512);
  const auto m2 = AppendPhases(HttpGet(admin_port, "/metrics"));
  r["append_phase_us"] = PhaseMeans(m0, m1);
  r["append_2mib_phase_us"] = PhaseMeans(m1, m2);
  const auto [hot, cold] = MemcpyGbps(1 << 20);
  r["memcpy_1mib_hot_gbps"] = hot;
  r["memcpy_1mib_into_128mib_gbps"] = cold;
  r["kvmemd_ep_info"] = EpLanes(cl.TransportInfo());
  r["transport_lanes"] = cl.TransportInfo().find("sysv") != std::string::npos ? "shm(sysv)+cma" : cl.TransportInfo().find("tcp") != std::string::npos ? "tcp" : "other";
  tc->reset();
  c->reset();
  if (d.Stop() != 0) std::fprintf(stderr, "warning: kvmemd did not exit cleanly\n");

  // Baseline: UCX's own perftest, same transports. shm: sysv/posix + cma for rendezvous.
  const std::string tls = transport == "tcp" ? "tcp" : "sm,self";
  auto lat = Perftest(tls, "ucp_am_lat", 8, a.quick ? 20000 : 100000);
  std::string perftest_lanes;
  auto bw = Perftest(tls, "ucp_am_bw", 1 << 20, a.quick ? 1000 : 4000, &perftest_lanes);
  r["ucx_perftest_lanes"] = perftest_lanes;
  auto bw2 = Perftest(tls, "ucp_am_bw", 2 << 20, a.quick ? 500 : 2000);
  // Final: iterations, p50 latency (one way, us), avg, overall, bw avg (MiB/s), bw overall, ...
  r["ucx_am_rtt_us"] = lat.size() > 1 ? 2 * lat[1] : -1.0;
  r["ucx_am_bw_gbps"] = bw.size() > 5 ? bw[5] * 1048576.0 / 1e9 : -1.0;
  r["ucx_am_bw_2mib_gbps"] = bw2.size() > 5 ? bw2[5] * 1048576.0 / 1e9 : -1.0;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "--json" && i + 1 < argc) a.json_path = argv[++i];
    else if (s == "--quick") a.quick = true;
    else if (s == "--rounds" && i + 1 < argc) a.rounds = std::max(1, std::atoi(argv[++i]));
    else if (s == "--window" && i + 1 < argc) a.window = std::max(1, std::atoi(argv[++i]));
    else if (s == "--machine" && i + 1 < argc) a.machine = argv[++i];
    else if (s == "--commit" && i + 1 < argc) a.commit = argv[++i];
    else if (s == "--daemon-arg" && i + 1 < argc) a.daemon_args.push_back(argv[++i]);
    else if (s == "--transports" && i + 1 < argc) {
      a.transports.clear();
      std::istringstream ts(argv[++i]);
      for (std::string t; std::getline(ts, t, ',');) {
        if (t != "shm" && t != "tcp") {
          std::fprintf(stderr, "--transports: shm and/or tcp\n");
          return 2;
        }
        a.transports.push_back(t);
      }
    }
    else if (s == "--help") {
      std::puts("kvmem-bench-transport --json FILE [--quick] [--rounds R] [--window W] [--transports shm,tcp]\n"
                "                      [--machine TEXT] [--commit SHA] [--daemon-arg FLAG]...");
      return 0;
    } else {
      std::fprintf(stderr, "unknown argument %s\n", s.c_str());
      return 2;
    }
  }
  if (a.quick) {
    a.pings = 5000;
    a.appends = 256;
  }
  json out;
  char host[256] = {};
  gethostname(host, sizeof host);
  out["machine"] = (a.machine.empty() ? std::string() : a.machine + "; ") + std::string(host) + ", " +
                   std::to_string(std::thread::hardware_concurrency()) + " cpus";
  out["commit"] = Run("git rev-parse --short HEAD 2>/dev/null").substr(0, 12);
  if (!a.commit.empty()) out["commit"] = a.commit;
  if (!out["commit"].get<std::string>().empty() && out["commit"].get<std::string>().back() == '\n') {
    std::string c = out["commit"];
    c.pop_back();
    out["commit"] = c;
  }
  // Each round measures kvmemd and then UCX's own perftest back to back, so both see the same
  // machine state; the median of each over the rounds is reported (every round is kept in
  // "rounds"). On a shared or throttling machine one odd round would otherwise decide a ratio.
  for (const std::string& t : a.transports) {
    json best;
    json rounds = json::array();
    for (int i = 0; i < a.rounds; ++i) rounds.push_back(Measure(a, t));
    best = rounds[0];
    for (const char* k : {"ping_rtt_p50_us", "ping_rtt_p99_us", "ucx_am_rtt_us", "append_gbps", "ucx_am_bw_gbps",
                          "append_2mib_gbps", "ucx_am_bw_2mib_gbps"}) {
      std::vector<double> v;
      for (const json& r : rounds) v.push_back(r[k].get<double>());
      std::sort(v.begin(), v.end());
      best[k] = v[v.size() / 2];
    }
    best["rounds"] = rounds;
    best["append_window"] = a.window;
    out[t] = best;
  }
  out["kvmemd_args"] = a.daemon_args;
  std::printf("%-5s %12s %12s %12s %12s %12s %10s %10s\n", "", "ping p50 us", "ping p99 us", "ucx rtt us",
              "append GB/s", "ucx bw GB/s", "rtt ratio", "bw ratio");
  for (const std::string& t : a.transports) {
    const json& r = out[t];
    std::printf("%-5s %12.2f %12.2f %12.2f %12.2f %12.2f %10.2f %10.2f\n", t.c_str(), r["ping_rtt_p50_us"].get<double>(),
                r["ping_rtt_p99_us"].get<double>(), r["ucx_am_rtt_us"].get<double>(), r["append_gbps"].get<double>(),
                r["ucx_am_bw_gbps"].get<double>(),
                r["ping_rtt_p50_us"].get<double>() / r["ucx_am_rtt_us"].get<double>(),
                r["append_gbps"].get<double>() / r["ucx_am_bw_gbps"].get<double>());
  }
  for (const std::string& t : a.transports) {
    const json& r = out[t];
    std::printf("%-5s 2 MiB messages (K 1 MiB + V 1 MiB): append %.2f GB/s, ucp_am_bw 2 MiB %.2f GB/s, ratio %.2f\n", t.c_str(),
                r["append_2mib_gbps"].get<double>(), r["ucx_am_bw_2mib_gbps"].get<double>(),
                r["append_2mib_gbps"].get<double>() / r["ucx_am_bw_2mib_gbps"].get<double>());
  }
  for (const std::string& t : a.transports) {
    const json& r = out[t];
    if (!r.contains("append_phase_us") || r["append_phase_us"].empty()) continue;
    std::printf("%-5s 1 MiB append, mean us per request (round 1):", t.c_str());
    for (const auto& [k, v] : r["rounds"][0]["append_phase_us"].items()) std::printf(" %s %.1f", k.c_str(), v.get<double>());
    std::printf("; memcpy 1 MiB hot %.1f GB/s, into 128 MiB %.1f GB/s\n", r["rounds"][0]["memcpy_1mib_hot_gbps"].get<double>(),
                r["rounds"][0]["memcpy_1mib_into_128mib_gbps"].get<double>());
  }
  std::printf("targets (shm): ping p50 <= 3x ucx rtt, append (1 MiB messages) >= 0.6x ucx bw (1 MiB)\n");
  if (!a.json_path.empty()) {
    std::ofstream f(a.json_path);
    f << out.dump(2) << "\n";
  }
  return 0;
}
