// Operations end to end against real kvmemd processes: the admin endpoint, the admin token,
// SIGHUP reload of tenant tokens, and three daemons behind kvmem::client::Cluster.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <csignal>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "client/cluster.h"
#include "common/dtype.h"
#include "daemon/kv_pool.h"
#include "daemon/sd_notify.h"
#include "testing/daemon_process.h"
#include "testing/http_get.h"

namespace kvmem {
namespace {

// kvmemd runs with --backend auto: "cpu" with gpu "none" here, "cuda:N NAME" (and the same in
// `gpu`) on a machine with a GPU.
void ExpectBackendPair(const nlohmann::json& j) {
  const std::string backend = j["backend"].get<std::string>();
  if (backend == "cpu") {
    EXPECT_EQ(j["gpu"], "none");
  } else {
    EXPECT_EQ(backend.rfind("cuda:", 0), 0u) << backend;
    EXPECT_EQ(j["gpu"], backend);
  }
}

using testing::DaemonProcess;
using testing::FreePort;
using testing::HttpGet;
using testing::Kvmemctl;
using testing::MetricValue;

client::Profile SmallProfile() {
  client::Profile p;
  p.layers = 2;
  p.q_heads = 4;
  p.kv_heads = 2;
  p.head_dim = 16;
  p.dtype = DType::kF32;
  return p;
}

std::filesystem::path WriteConfig(const std::string& name, const std::string& body) {
  const auto path = std::filesystem::temp_directory_path() /
                    ("kvmem-ops-" + std::to_string(::getpid()) + "-" + name + ".json");
  std::ofstream(path) << body;
  return path;
}

TEST(Admin, HealthReadyMetricsSessions) {
  const uint16_t admin = FreePort();
  DaemonProcess d({"--admin", "127.0.0.1:" + std::to_string(admin)});
  ASSERT_TRUE(d.ready());
  EXPECT_EQ(HttpGet(admin, "/healthz").status, 200);
  EXPECT_EQ(HttpGet(admin, "/readyz").status, 200);
  EXPECT_EQ(HttpGet(admin, "/nope").status, 404);

  auto c = client::Client::Connect(d.address());
  ASSERT_TRUE(c.ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE((*c)->Ping(i).ok());
  auto id = (*c)->CreateSession(SmallProfile(), {}, 77);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ((*c)->SessionInfo(999).status().code(), StatusCode::kNotFound);

  auto m = HttpGet(admin, "/metrics");
  ASSERT_EQ(m.status, 200);
  EXPECT_NE(m.body.find("kvmem_requests_total{op=\"Ping\"} 5"), std::string::npos) << m.body;
  EXPECT_NE(m.body.find("kvmem_request_duration_seconds_count{op=\"Ping\"} 5"), std::string::npos);
  EXPECT_NE(m.body.find("kvmem_requests_total{op=\"CreateSession\"} 1"), std::string::npos);
  EXPECT_NE(m.body.find("kvmem_errors_total{code=\"NOT_FOUND\"} 1"), std::string::npos);
  EXPECT_NE(m.body.find("kvmem_sessions{tenant=\"default\"} 1"), std::string::npos);
  EXPECT_NE(m.body.find("kvmem_ucx_endpoints_open 1"), std::string::npos);
  EXPECT_NE(m.body.find("kvmem_ready 1"), std::string::npos);

  auto s = HttpGet(admin, "/v1/sessions");
  ASSERT_EQ(s.status, 200);
  auto j = nlohmann::json::parse(s.body);
  ASSERT_EQ(j.size(), 1u);
  EXPECT_EQ(j[0]["id"], 77);
  EXPECT_EQ(j[0]["tenant"], "default");
  EXPECT_EQ(j[0]["layers"], 2);
  EXPECT_EQ(j[0]["dtype"], "fp32");
  for (const char* k :
       {"q_heads", "kv_heads", "head_dim", "tokens", "chunks", "tail_tokens", "mean_chunk_tokens",
        "bytes", "mode", "durable", "label", "created_unix_ms", "last_used_unix_ms"}) {
    EXPECT_TRUE(j[0].contains(k)) << k;
  }
  auto st = nlohmann::json::parse(HttpGet(admin, "/v1/status").body);
  ExpectBackendPair(st);
  EXPECT_EQ(st["sessions"], 1);
  EXPECT_EQ(st["tiers"].size(), 3u);

  // kvmemctl status fields travel in HelloReply.
  const auto& info = (*c)->server();
  EXPECT_EQ(info.gpu, st["gpu"].get<std::string>());
  ASSERT_EQ(info.tiers.size(), 3u);
  EXPECT_EQ(info.tiers[0].tier, "device");
  EXPECT_GT(info.tiers[0].capacity_bytes, 0u);
  EXPECT_EQ(d.Stop(), 0);
}

// Index searches bump kvmem_search_nodes_visited_total (Retrieve and index-mode Attend).
TEST(Admin, SearchNodesVisitedCounts) {
  const uint16_t admin = FreePort();
  DaemonProcess d({"--admin", "127.0.0.1:" + std::to_string(admin)});
  ASSERT_TRUE(d.ready());
  auto c = client::Client::Connect(d.address());
  ASSERT_TRUE(c.ok());
  client::Profile p = SmallProfile();
  client::SessionOptions so;
  so.mode = client::Mode::kIndex;
  so.default_budget_tokens = 64;
  auto id = (*c)->CreateSession(p, so);
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  const uint64_t T = 512;
  std::vector<float> kv(static_cast<size_t>(p.layers) * p.kv_heads * T * p.head_dim);
  for (size_t i = 0; i < kv.size(); ++i)
    kv[i] = static_cast<float>((i * 2654435761u) % 1000) / 500.0f - 1.0f;
  client::TensorView k{kv.data(), DType::kF32, {p.layers, p.kv_heads, T, p.head_dim}};
  ASSERT_TRUE((*c)->AppendKV(*id, k, k).ok());
  std::vector<float> q(p.q_heads * p.head_dim, 0.25f);
  auto r =
      (*c)->Retrieve(*id, 0, client::TensorView{q.data(), DType::kF32, {p.q_heads, p.head_dim}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const double visited = MetricValue(admin, "kvmem_search_nodes_visited_total");
  ASSERT_GE(visited, 0) << "the sample is missing";
  EXPECT_EQ(visited, static_cast<double>(r->nodes_visited));
  EXPECT_GT(r->nodes_visited, 0u);
}

TEST(Admin, NonLoopbackAdminWithoutTokenRefusesToStart) {
  const uint16_t admin = FreePort();
  DaemonProcess d({"--admin", "0.0.0.0:" + std::to_string(admin)});
  EXPECT_FALSE(d.ready());
}

TEST(Admin, TokenGuardsMetricsButNotProbes) {
  const uint16_t admin = FreePort();
  const auto cfg = WriteConfig("admintoken", R"({"admin_token": "s3cret-admin"})");
  DaemonProcess d({"--config", cfg.string(), "--admin", "127.0.0.1:" + std::to_string(admin)});
  ASSERT_TRUE(d.ready());
  EXPECT_EQ(HttpGet(admin, "/healthz").status, 200);
  EXPECT_EQ(HttpGet(admin, "/readyz").status, 200);
  EXPECT_EQ(HttpGet(admin, "/metrics").status, 401);
  EXPECT_EQ(HttpGet(admin, "/metrics", "wrong").status, 401);
  EXPECT_EQ(HttpGet(admin, "/v1/sessions").status, 401);
  EXPECT_EQ(HttpGet(admin, "/metrics", "s3cret-admin").status, 200);
  EXPECT_EQ(HttpGet(admin, "/v1/sessions", "s3cret-admin").status, 200);
  std::filesystem::remove(cfg);
}

TEST(Reload, SighupSwapsTokensAndKeepsSessions) {
  const auto cfg = WriteConfig("reload", R"({"tenants": {"old-token-1234": "team"}})");
  const uint16_t admin = FreePort();
  DaemonProcess d({"--config", cfg.string(), "--admin", "127.0.0.1:" + std::to_string(admin)},
                  "old-token-1234");
  ASSERT_TRUE(d.ready());
  client::ClientOptions old_opts;
  old_opts.token = "old-token-1234";
  auto before = client::Client::Connect(d.address(), old_opts);
  ASSERT_TRUE(before.ok());
  ASSERT_TRUE((*before)->CreateSession(SmallProfile(), {}, 5).ok());

  std::ofstream(cfg) << R"({"tenants": {"new-token-5678": "team"}, "log_level": "debug",
                           "max_sessions_per_tenant": 1})";
  ASSERT_EQ(::kill(d.pid(), SIGHUP), 0);
  // Wait for the reload to land (visible in /metrics).
  bool reloaded = false;
  for (int i = 0; i < 100 && !reloaded; ++i) {
    reloaded =
        HttpGet(admin, "/metrics").body.find("kvmem_config_reloads_total{result=\"ok\"} 1") !=
        std::string::npos;
    if (!reloaded) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(reloaded);

  client::ClientOptions o = old_opts;
  o.connect_timeout_ms = 2000;
  auto refused = client::Client::Connect(d.address(), o);
  EXPECT_EQ(refused.status().code(), StatusCode::kUnauthenticated) << refused.status().ToString();
  o.token = "new-token-5678";
  auto fresh = client::Client::Connect(d.address(), o);
  ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
  auto list = (*fresh)->ListSessions();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].id, 5u);
  // The reloaded quota applies: the tenant already holds 1 session.
  EXPECT_EQ((*fresh)->CreateSession(SmallProfile(), {}, 6).status().code(),
            StatusCode::kResourceExhausted);
  // The connection authenticated before the reload keeps working.
  EXPECT_TRUE((*before)->SessionInfo(5).ok());

  // A broken file changes nothing.
  std::ofstream(cfg) << "{ not json";
  ASSERT_EQ(::kill(d.pid(), SIGHUP), 0);
  bool failed = false;
  for (int i = 0; i < 100 && !failed; ++i) {
    failed =
        HttpGet(admin, "/metrics").body.find("kvmem_config_reloads_total{result=\"failed\"} 1") !=
        std::string::npos;
    if (!failed) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(failed);
  EXPECT_TRUE(client::Client::Connect(d.address(), o).ok());
  EXPECT_EQ(d.Stop(), 0);
  std::filesystem::remove(cfg);
}

TEST(Kvmemctl, StatusTopAndMergedListOverTwoDaemons) {
  DaemonProcess a, b;
  ASSERT_TRUE(a.ready() && b.ready());
  const std::string addrs = a.address() + "," + b.address();
  int rc = -1;
  for (int i = 0; i < 6; ++i) {
    Kvmemctl(
        "--addr " + addrs + " session create --layers 2 --q-heads 4 --kv-heads 2 --head-dim 16",
        &rc);
    ASSERT_EQ(rc, 0);
  }
  auto one = nlohmann::json::parse(Kvmemctl("--addr " + a.address() + " --json status", &rc));
  ASSERT_EQ(rc, 0);
  ExpectBackendPair(one);
  EXPECT_GE(one["uptime_seconds"].get<double>(), 0.0);
  ASSERT_EQ(one["tiers"].size(), 3u);
  EXPECT_EQ(one["tiers"][0]["tier"], "device");
  EXPECT_GT(one["tiers"][0]["capacity_bytes"].get<uint64_t>(), 0u);

  auto both = nlohmann::json::parse(Kvmemctl("--addr " + addrs + " --json status", &rc));
  ASSERT_EQ(rc, 0);
  ASSERT_EQ(both["daemons"].size(), 2u);
  EXPECT_EQ(both["daemons"][0]["sessions"].get<int>() + both["daemons"][1]["sessions"].get<int>(),
            6);

  auto list = nlohmann::json::parse(Kvmemctl("--addr " + addrs + " --json session list", &rc));
  ASSERT_EQ(rc, 0);
  ASSERT_EQ(list["sessions"].size(), 6u);
  for (const auto& s : list["sessions"]) EXPECT_TRUE(s.contains("address"));

  const std::string top =
      Kvmemctl("--addr " + addrs + " --json top --iterations 2 --interval 0.05", &rc);
  ASSERT_EQ(rc, 0);
  std::istringstream lines(top);
  std::string line;
  int n = 0;
  while (std::getline(lines, line)) {
    auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["iteration"], n);
    EXPECT_EQ(j["sessions_total"], 6);
    EXPECT_EQ(j["top"].size(), 6u);
    ++n;
  }
  EXPECT_EQ(n, 2);
  const std::string text = Kvmemctl("--addr " + addrs + " top --iterations 1", &rc);
  EXPECT_EQ(rc, 0);
  EXPECT_NE(text.find("TOK/S"), std::string::npos) << text;
}

// A fault flag's path for this process, absent (the fault is off until the test creates it).
std::filesystem::path FaultFlag(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("kvmem-ops-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove(p);
  return p;
}

// Polls `pred` every 50 ms for up to 10 s.
template <typename Pred>
bool Eventually(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return pred();
}

// A stuck executor (kvmemd --fault-stall-flag holds each executor thread's next task while the
// file exists, as a wedged GPU kernel holds its thread): once a task has run past
// executor_stall_seconds, /readyz answers 503 and the stall metrics say so; when it ends the
// request is answered and kvmemd is ready again.
TEST(Stall, ReadyzAndMetricsFollowAStuckExecutor) {
  const uint16_t admin = FreePort();
  const auto cfg = WriteConfig("stall", R"({"executor_stall_seconds": 1})");
  const auto flag = FaultFlag("stall-flag");
  DaemonProcess d({"--config", cfg.string(), "--admin", "127.0.0.1:" + std::to_string(admin),
                   "--fault-stall-flag", flag.string()});
  ASSERT_TRUE(d.ready());
  EXPECT_EQ(HttpGet(admin, "/readyz").status, 200);
  auto c = client::Client::Connect(d.address());
  ASSERT_TRUE(c.ok());
  std::ofstream(flag) << "stuck";
  auto created = std::async(std::launch::async, [&] { return (*c)->CreateSession(SmallProfile(), {}, 5); });
  EXPECT_TRUE(Eventually([&] { return HttpGet(admin, "/readyz").status == 503; }));
  const std::string m = HttpGet(admin, "/metrics").body;
  EXPECT_NE(m.find("kvmem_executors_stalled 1"), std::string::npos) << m;
  EXPECT_NE(m.find("kvmem_executor_stalls_total 1"), std::string::npos);
  EXPECT_NE(m.find("kvmem_ready 0"), std::string::npos);
  const auto health = nlohmann::json::parse(HttpGet(admin, "/v1/status").body)["health"];
  EXPECT_EQ(health["executors_stalled"], 1);
  EXPECT_GE(health["executor_longest_task_seconds"].get<double>(), 1.0);
  EXPECT_EQ(health["alive"], true);
  EXPECT_EQ(HttpGet(admin, "/healthz").status, 200);  // alive: the event loop still answers
  std::filesystem::remove(flag);
  auto id = created.get();
  EXPECT_TRUE(id.ok()) << id.status().ToString();
  EXPECT_TRUE(Eventually([&] { return HttpGet(admin, "/readyz").status == 200; }));
  const std::string after = HttpGet(admin, "/metrics").body;
  EXPECT_NE(after.find("kvmem_executors_stalled 0"), std::string::npos);
  EXPECT_NE(after.find("kvmem_executor_stalls_total 1"), std::string::npos);
  EXPECT_EQ(d.Stop(), 0);
  std::filesystem::remove(cfg);
}

// A wedged event loop (--fault-loop-stall-flag holds its one-second tick while the file exists):
// past loop_stall_seconds /healthz answers 503, so a Kubernetes liveness probe restarts kvmemd
// (the admin endpoint runs on a thread of its own and would otherwise answer 200); once the loop
// runs again /healthz answers 200.
TEST(Stall, HealthzFailsWhileTheEventLoopIsStuck) {
  const uint16_t admin = FreePort();
  const auto cfg = WriteConfig("loop-stall", R"({"loop_stall_seconds": 2})");
  const auto flag = FaultFlag("loop-flag");
  DaemonProcess d({"--config", cfg.string(), "--admin", "127.0.0.1:" + std::to_string(admin),
                   "--fault-loop-stall-flag", flag.string()});
  ASSERT_TRUE(d.ready());
  EXPECT_EQ(HttpGet(admin, "/healthz").status, 200);
  const double lag = MetricValue(admin, "kvmem_event_loop_lag_seconds");
  ASSERT_GE(lag, 0) << "the sample is missing";
  EXPECT_LT(lag, 2.0);
  std::ofstream(flag) << "stuck";
  EXPECT_TRUE(Eventually([&] { return HttpGet(admin, "/healthz").status == 503; }));
  EXPECT_NE(HttpGet(admin, "/healthz").body.find("event loop stalled"), std::string::npos);
  std::filesystem::remove(flag);
  EXPECT_TRUE(Eventually([&] { return HttpGet(admin, "/healthz").status == 200; }));
  EXPECT_EQ(d.Stop(), 0);
  std::filesystem::remove(cfg);
}

// A CUDA error that leaves the GPU context unusable (--fault-device-failure-flag counts one, as the
// device pool does for an illegal address or a launch failure): /readyz answers 503 from then on
// and kvmem_device_failures_total says why; with on_device_failure "exit" kvmemd exits with 70.
TEST(Stall, DeviceFailureMakesKvmemdUnreadyForGood) {
  const uint16_t admin = FreePort();
  const auto flag = FaultFlag("device-failure-flag");
  DaemonProcess d({"--admin", "127.0.0.1:" + std::to_string(admin), "--fault-device-failure-flag",
                   flag.string()});
  ASSERT_TRUE(d.ready());
  EXPECT_EQ(HttpGet(admin, "/readyz").status, 200);
  std::ofstream(flag) << "xid";
  EXPECT_TRUE(Eventually([&] { return HttpGet(admin, "/readyz").status == 503; }));
  EXPECT_NE(HttpGet(admin, "/metrics").body.find("kvmem_device_failures_total 1"), std::string::npos);
  EXPECT_EQ(nlohmann::json::parse(HttpGet(admin, "/v1/status").body)["health"]["device_failures"], 1);
  std::filesystem::remove(flag);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_EQ(HttpGet(admin, "/readyz").status, 503);  // nothing in the process recovers it
  EXPECT_EQ(HttpGet(admin, "/healthz").status, 200);
  EXPECT_EQ(d.Stop(), 0);

  const auto cfg = WriteConfig("device-exit", R"({"on_device_failure": "exit"})");
  DaemonProcess e({"--config", cfg.string(), "--fault-device-failure-flag", flag.string()});
  ASSERT_TRUE(e.ready());
  std::ofstream(flag) << "xid";
  EXPECT_EQ(e.WaitExit(std::chrono::seconds(10)), 70);
  std::filesystem::remove(flag);
  std::filesystem::remove(cfg);
}

// The same with a real fault on a GPU: --fault-device-trap-flag makes the device pool launch a
// kernel that traps before an attention, which leaves the CUDA context unusable. The request fails
// saying so, every later one fails too, /readyz answers 503 for good and the failures are counted;
// with on_device_failure "exit" kvmemd exits with 70. Skipped without a GPU.
TEST(Stall, RealDeviceFaultOnTheGpu) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible: real device fault test skipped";
  client::Profile p = SmallProfile();
  p.head_dim = 128;
  p.dtype = DType::kBF16;
  const uint64_t T = 256;
  std::vector<uint16_t> kv(static_cast<size_t>(p.layers) * p.kv_heads * T * p.head_dim);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = FloatToBF16(static_cast<float>(i % 17) / 17.0f - 0.5f);
  const client::TensorView k{kv.data(), DType::kBF16, {p.layers, p.kv_heads, T, p.head_dim}};
  std::vector<float> q(p.q_heads * p.head_dim, 0.125f);
  client::AttendRequest req;
  req.q = client::TensorView{q.data(), DType::kF32, {p.q_heads, p.head_dim}};
  // A session with its KV on the device, and an attention that works before the fault.
  auto attend_ready = [&](DaemonProcess& d) -> std::pair<std::unique_ptr<client::Client>, uint64_t> {
    auto c = client::Client::Connect(d.address());
    EXPECT_TRUE(c.ok());
    if (!c.ok()) return {};
    auto id = (*c)->CreateSession(p, {});
    EXPECT_TRUE(id.ok()) << id.status().ToString();
    EXPECT_TRUE((*c)->AppendKV(*id, k, k).ok());
    auto r = (*c)->Attend(*id, req);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return {std::move(*c), *id};
  };
  const uint16_t admin = FreePort();
  const auto flag = FaultFlag("device-trap-flag");
  DaemonProcess d({"--admin", "127.0.0.1:" + std::to_string(admin), "--backend", "cuda",
                   "--fault-device-trap-flag", flag.string()});
  ASSERT_TRUE(d.ready());
  auto [c, id] = attend_ready(d);
  ASSERT_TRUE(c != nullptr);
  EXPECT_EQ(HttpGet(admin, "/readyz").status, 200);
  std::ofstream(flag) << "trap";
  auto failed = c->Attend(id, req);
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.status().message().find("unusable"), std::string::npos) << failed.status().ToString();
  std::filesystem::remove(flag);
  auto again = c->Attend(id, req);  // no trap now: the context stays unusable
  EXPECT_FALSE(again.ok());
  EXPECT_TRUE(Eventually([&] { return HttpGet(admin, "/readyz").status == 503; }));
  EXPECT_GE(MetricValue(admin, "kvmem_device_failures_total"), 2) << "both attentions count";
  EXPECT_EQ(HttpGet(admin, "/healthz").status, 200);
  c.reset();
  d.Stop();  // the exit status after a device fault is not the point here

  const auto cfg = WriteConfig("device-trap-exit", R"({"on_device_failure": "exit"})");
  DaemonProcess e({"--config", cfg.string(), "--backend", "cuda", "--fault-device-trap-flag", flag.string()});
  ASSERT_TRUE(e.ready());
  auto [c2, id2] = attend_ready(e);
  ASSERT_TRUE(c2 != nullptr);
  std::ofstream(flag) << "trap";
  EXPECT_FALSE(c2->Attend(id2, req).ok());
  EXPECT_EQ(e.WaitExit(std::chrono::seconds(10)), 70);
  std::filesystem::remove(flag);
  std::filesystem::remove(cfg);
}

// on_executor_stall "exit": kvmemd exits with status 70 for its service manager to restart it.
TEST(Stall, ExitActionExitsWithStatus70) {
  const auto cfg = WriteConfig("stall-exit", R"({"executor_stall_seconds": 1, "on_executor_stall": "exit"})");
  const auto flag = FaultFlag("stall-exit-flag");
  std::ofstream(flag) << "stuck";
  DaemonProcess d({"--config", cfg.string(), "--fault-stall-flag", flag.string()});
  ASSERT_TRUE(d.ready());
  client::ClientOptions o;
  o.request_timeout_ms = 15000;
  auto c = client::Client::Connect(d.address(), o);
  ASSERT_TRUE(c.ok());
  auto created = std::async(std::launch::async, [&] { return (*c)->CreateSession(SmallProfile(), {}, 6); });
  EXPECT_EQ(d.WaitExit(std::chrono::seconds(10)), 70);
  EXPECT_FALSE(created.get().ok());  // the daemon went away with the request
  std::filesystem::remove(flag);
  std::filesystem::remove(cfg);
}

// systemd's side of Type=notify: a datagram socket in NOTIFY_SOCKET, a watchdog interval.
TEST(Systemd, NotifiesReadyWatchdogAndStopping) {
  if (!sd::Compiled()) GTEST_SKIP() << "built without libsystemd: sd_notify is a no-op";
  const std::string path =
      (std::filesystem::temp_directory_path() / ("kvmem-notify-" + std::to_string(::getpid())))
          .string();
  ::unlink(path.c_str());
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  timeval tv{0, 100000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
  ::setenv("WATCHDOG_USEC", "200000", 1);  // pings expected every 100 ms
  DaemonProcess d;
  ::unsetenv("NOTIFY_SOCKET");
  ::unsetenv("WATCHDOG_USEC");
  ASSERT_TRUE(d.ready());
  std::string got;
  auto drain = [&](std::chrono::milliseconds for_ms) {
    const auto end = std::chrono::steady_clock::now() + for_ms;
    char buf[512];
    while (std::chrono::steady_clock::now() < end) {
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0) got += std::string(buf, static_cast<size_t>(n)) + "\n";
    }
  };
  drain(std::chrono::milliseconds(400));
  EXPECT_NE(got.find("READY=1"), std::string::npos) << got;
  EXPECT_NE(got.find("WATCHDOG=1"), std::string::npos) << got;
  ::kill(d.pid(), SIGHUP);
  drain(std::chrono::milliseconds(200));
  EXPECT_NE(got.find("RELOADING=1"), std::string::npos) << got;
  EXPECT_EQ(d.Stop(), 0);
  drain(std::chrono::milliseconds(100));
  EXPECT_NE(got.find("STOPPING=1"), std::string::npos) << got;
  ::close(fd);
  ::unlink(path.c_str());
}

TEST(Cluster, ThreeDaemonsPlacementListingRouting) {
  DaemonProcess a, b, c;
  ASSERT_TRUE(a.ready() && b.ready() && c.ready());
  const std::string spec = a.address() + "," + b.address() + "," + c.address();
  const std::string reversed = c.address() + "," + a.address() + ", " + b.address();
  auto one = client::Cluster::Connect(spec);
  auto two = client::Cluster::Connect(reversed);
  ASSERT_TRUE(one.ok() && two.ok());
  ASSERT_EQ((*one)->addresses().size(), 3u);
  EXPECT_EQ((*one)->addresses(), (*two)->addresses());

  std::set<std::string> used;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 12; ++i) {
    auto id = (*one)->CreateSession(SmallProfile());
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    ids.push_back(*id);
    EXPECT_EQ((*one)->AddressFor(*id), (*two)->AddressFor(*id));
    used.insert((*one)->AddressFor(*id));
  }
  EXPECT_GE(used.size(), 2u);  // 12 sessions over 3 daemons: P(all on one) ~ 1e-5

  // Merged listing from the other client: every session once, on its owner.
  auto listing = (*two)->ListSessions();
  ASSERT_TRUE(listing.ok());
  EXPECT_TRUE(listing->failures.empty());
  ASSERT_EQ(listing->sessions.size(), ids.size());
  for (const auto& cs : listing->sessions) EXPECT_EQ(cs.address, (*two)->AddressFor(cs.session.id));

  // Each daemon holds exactly the sessions placed on it.
  for (const DaemonProcess* d : {&a, &b, &c}) {
    auto direct = client::Client::Connect(d->address());
    ASSERT_TRUE(direct.ok());
    auto mine = (*direct)->ListSessions();
    ASSERT_TRUE(mine.ok());
    size_t expected = 0;
    for (uint64_t id : ids) expected += (*one)->AddressFor(id) == d->address();
    EXPECT_EQ(mine->size(), expected) << d->address();
  }

  // Ops through the second client reach the owner: append, then read it back directly.
  const uint64_t target = ids[0];
  const client::Profile p = SmallProfile();
  std::vector<float> kv(p.layers * p.kv_heads * 3 * p.head_dim, 0.5f);
  client::TensorView k{kv.data(), DType::kF32, {p.layers, p.kv_heads, 3, p.head_dim}};
  auto app = (*two)->AppendKV(target, k, k);
  ASSERT_TRUE(app.ok()) << app.status().ToString();
  EXPECT_EQ(app->tokens, 3u);
  auto owner = client::Client::Connect((*one)->AddressFor(target));
  ASSERT_TRUE(owner.ok());
  auto info = (*owner)->SessionInfo(target);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tokens, 3u);
  EXPECT_TRUE((*two)->DropSession(target).ok());
  EXPECT_EQ((*one)->SessionInfo(target).status().code(), StatusCode::kNotFound);

  // A daemon going away fails only its share of the listing.
  const std::string gone = c.address();
  ASSERT_EQ(c.Stop(), 0);
  client::ClientOptions quick;
  quick.connect_timeout_ms = 500;
  auto three = client::Cluster::Connect(spec, quick);
  ASSERT_TRUE(three.ok());
  auto partial = (*three)->ListSessions();
  ASSERT_TRUE(partial.ok());
  ASSERT_EQ(partial->failures.size(), 1u);
  EXPECT_EQ(partial->failures[0].first, gone);
}

}  // namespace
}  // namespace kvmem
