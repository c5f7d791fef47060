// Operations pieces without a daemon: the Prometheus rendering, the Grafana dashboard against
// it, admin/config validation, config includes, rendezvous placement.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <thread>
#include <vector>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "client/cluster.h"
#include "daemon/config.h"
#include "daemon/executor.h"
#include "daemon/health.h"
#include "daemon/kv_pool.h"
#include "daemon/metrics.h"

namespace kvmem {
namespace {

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Sample names (without labels) in a Prometheus text exposition.
std::set<std::string> SampleNames(const std::string& text) {
  std::set<std::string> names;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    names.insert(line.substr(0, line.find_first_of("{ ")));
  }
  return names;
}

TEST(Metrics, EveryFamilyHasHelpTypeAndSamples) {
  GlobalMetrics().RecordRequest(3, std::chrono::microseconds(30), 0);  // Ping
  GlobalMetrics().RecordRequest(3, std::chrono::milliseconds(3), 5);
  MetricsSources src;
  src.version = "test";
  src.backend = "cpu";
  src.started = std::chrono::steady_clock::now();
  const std::string text = RenderPrometheus(src);
  const auto names = SampleNames(text);
  for (const std::string& f : MetricFamilyNames()) {
    EXPECT_NE(text.find("# TYPE " + f + " "), std::string::npos) << f;
    EXPECT_NE(text.find("# HELP " + f + " "), std::string::npos) << f;
    const bool histogram = text.find("# TYPE " + f + " histogram") != std::string::npos;
    EXPECT_TRUE(names.count(histogram ? f + "_bucket" : f)) << f;
  }
  EXPECT_NE(text.find("kvmem_requests_total{op=\"Ping\"} 2"), std::string::npos);
  EXPECT_NE(text.find("kvmem_request_duration_seconds_bucket{op=\"Ping\",le=\"+Inf\"} 2"),
            std::string::npos);
  EXPECT_NE(text.find("kvmem_request_duration_seconds_bucket{op=\"Ping\",le=\"5e-05\"} 1"),
            std::string::npos);
  EXPECT_NE(text.find("kvmem_errors_total{code=\"NOT_FOUND\"} 1"), std::string::npos);
  for (const char* tier : {"device", "host", "disk"}) {
    EXPECT_NE(text.find(std::string("kvmem_tier_bytes{tier=\"") + tier + "\"}"), std::string::npos)
        << tier;
    EXPECT_NE(text.find(std::string("kvmem_spill_bytes_total{tier=\"") + tier + "\"}"),
              std::string::npos);
  }
  // Reply ops are not request ops.
  EXPECT_EQ(text.find("op=\"PingReply\""), std::string::npos);
}

TEST(Metrics, HistogramBucketsAreCumulative) {
  LatencyHistogram h;
  h.Observe(std::chrono::microseconds(1));
  h.Observe(std::chrono::milliseconds(20));
  h.Observe(std::chrono::seconds(100));
  const auto s = h.Read();
  EXPECT_EQ(s.count, 3u);
  EXPECT_EQ(s.buckets[0], 1u);
  EXPECT_EQ(s.buckets.back(), 1u);  // beyond 10 s
}

TEST(Grafana, EveryQueriedMetricIsExported) {
  const std::string path = std::string(KVMEM_SOURCE_DIR) + "/deploy/grafana/kvmem.json";
  auto dash = nlohmann::json::parse(Slurp(path), nullptr, false);
  ASSERT_FALSE(dash.is_discarded()) << path << " is not valid JSON";
  MetricsSources src;
  src.started = std::chrono::steady_clock::now();
  const auto names = SampleNames(RenderPrometheus(src));
  const std::regex metric("kvmem_[a-z0-9_]+");
  int queried = 0;
  ASSERT_TRUE(dash["panels"].is_array());
  for (const auto& panel : dash["panels"]) {
    for (const auto& t : panel["targets"]) {
      const std::string expr = t["expr"].get<std::string>();
      for (auto it = std::sregex_iterator(expr.begin(), expr.end(), metric);
           it != std::sregex_iterator(); ++it) {
        ++queried;
        EXPECT_TRUE(names.count(it->str()))
            << panel["title"] << ": " << it->str() << " is not in /metrics";
      }
    }
  }
  EXPECT_GE(queried, 20);
}

TEST(Config, AdminOffLoopbackNeedsNoToken) {
  DaemonConfig c;
  EXPECT_TRUE(c.Validate().ok());
  c.admin = "off";
  EXPECT_TRUE(c.Validate().ok());
  c.admin = "127.0.0.1:7421";
  EXPECT_TRUE(c.Validate().ok());
}

TEST(Config, NonLoopbackAdminRequiresToken) {
  DaemonConfig c;
  c.admin = "0.0.0.0:7421";
  Status s = c.Validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("admin_token"), std::string::npos) << s.ToString();
  c.admin_token = "an-admin-token";
  EXPECT_TRUE(c.Validate().ok());
  c.admin = "not-an-address";
  EXPECT_FALSE(c.Validate().ok());
}

TEST(Config, UcxRndvScheme) {
  DaemonConfig c;
  EXPECT_EQ(c.ucx_rndv_scheme, "auto");
  for (const char* ok : {"auto", "get_zcopy", "put_zcopy"}) {
    c.ucx_rndv_scheme = ok;
    EXPECT_TRUE(c.Validate().ok()) << ok;
  }
  c.ucx_rndv_scheme = "put";
  Status s = c.Validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("ucx_rndv_scheme"), std::string::npos) << s.ToString();
}

TEST(Config, IncludeMergesSecretsFile) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("kvmem-cfg-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir / "secret");
  std::ofstream(dir / "main.json") << R"({"listen": "0.0.0.0:7420", "admin": "0.0.0.0:7421",
                                         "include": "secret/tokens.json"})";
  std::ofstream(dir / "secret/tokens.json")
      << R"({"tenants": {"tenant-token-a": "a"}, "admin_token": "admin-token-x"})";
  DaemonConfig c;
  ASSERT_TRUE(LoadConfigFile((dir / "main.json").string(), &c).ok());
  EXPECT_EQ(c.tenants.at("tenant-token-a"), "a");
  EXPECT_EQ(c.admin_token, "admin-token-x");
  EXPECT_TRUE(c.Validate().ok());
  std::ofstream(dir / "loop.json") << R"({"include": "loop.json"})";
  EXPECT_FALSE(LoadConfigFile((dir / "loop.json").string(), &c).ok());
  std::filesystem::remove_all(dir);
}

// An included file is the base: the including file's own keys win, whether their names sort
// before "include" (admin, backend) or after it (listen, session_defaults).
TEST(Config, IncludedFileIsTheBaseTheIncludingFileOverrides) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("kvmem-cfg-order-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "base.json") << R"({"backend": "cuda", "listen": "127.0.0.1:1111",
      "log_level": "debug", "session_defaults": {"chunk_min_tokens": 2, "chunk_max_tokens": 4}})";
  std::ofstream(dir / "main.json") << R"({"backend": "cpu", "include": "base.json",
      "listen": "127.0.0.1:2222", "session_defaults": {"chunk_max_tokens": 6}})";
  DaemonConfig c;
  ASSERT_TRUE(LoadConfigFile((dir / "main.json").string(), &c).ok());
  EXPECT_EQ(c.backend, "cpu");                // sorts before "include": still this file's
  EXPECT_EQ(c.listen, "127.0.0.1:2222");      // sorts after it
  EXPECT_EQ(c.log_level, "debug");            // only in the included file
  EXPECT_EQ(c.session_defaults.chunker.min_tokens, 2u);  // per key: the base's
  EXPECT_EQ(c.session_defaults.chunker.max_tokens, 6u);  // and this file's
  std::filesystem::remove_all(dir);
}

TEST(Config, SessionDefaultsSetIndexSearchAndTree) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("kvmem-cfg-search-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "search.json") << R"({"session_defaults": {
      "search_aggregation": "max_bound", "search_traversal": "levelwise",
      "search_node_radius_weight": 0.5, "search_chunk_radius_weight": 0,
      "search_rescore_overfetch": 4, "search_rescore_granularity": "token",
      "tree_levels": 1, "tree_fine_cluster_chunks": 8, "tree_min_chunks_to_cluster": 100000}})";
  DaemonConfig c;
  Status s = LoadConfigFile((dir / "search.json").string(), &c);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const SessionOptions& o = c.session_defaults;
  EXPECT_EQ(o.search.aggregation, index::GroupAggregation::kMaxBound);
  EXPECT_EQ(o.search.traversal, index::BudgetTraversal::kLevelwise);
  EXPECT_FLOAT_EQ(o.search.node_radius_weight, 0.5f);
  EXPECT_FLOAT_EQ(o.search.chunk_radius_weight, 0.0f);
  EXPECT_FLOAT_EQ(o.rescore_overfetch, 4.0f);
  EXPECT_TRUE(o.rescore_tokens);
  EXPECT_EQ(o.tree.levels, 1u);
  EXPECT_EQ(o.tree.fine_cluster_chunks, 8u);
  EXPECT_EQ(o.tree.min_chunks_to_cluster, 100000u);
  EXPECT_TRUE(c.Validate().ok());
  for (const char* bad : {R"({"session_defaults": {"search_aggregation": "sum"}})",
                          R"({"session_defaults": {"search_chunk_radius_weight": 2}})",
                          R"({"session_defaults": {"search_node_radius_weight": "x"}})",
                          R"({"session_defaults": {"tree_levels": 0}})",
                          R"({"session_defaults": {"search_rescore_granularity": "page"}})"}) {
    std::ofstream(dir / "bad.json") << bad;
    DaemonConfig b;
    Status st = LoadConfigFile((dir / "bad.json").string(), &b);
    if (st.ok()) st = b.Validate();
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << bad;
  }
  std::filesystem::remove_all(dir);
}

TEST(Config, MallocArenasAndBlockCache) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("kvmem-cfg-mem-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  DaemonConfig d;
  EXPECT_EQ(d.malloc_arena_max, 2u);
  EXPECT_EQ(d.store_block_cache_bytes, 8ull << 20);
  std::ofstream(dir / "mem.json") << R"({"malloc_arena_max": 0, "store_block_cache": "16MiB"})";
  DaemonConfig c;
  Status s = LoadConfigFile((dir / "mem.json").string(), &c);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(c.malloc_arena_max, 0u);
  EXPECT_EQ(c.store_block_cache_bytes, 16ull << 20);
  for (const char* bad : {R"({"malloc_arena_max": -1})", R"({"malloc_arena_max": "2"})",
                          R"({"store_block_cache": "lots"})"}) {
    std::ofstream(dir / "bad.json") << bad;
    DaemonConfig b;
    EXPECT_EQ(LoadConfigFile((dir / "bad.json").string(), &b).code(), StatusCode::kInvalidArgument) << bad;
  }
  std::filesystem::remove_all(dir);
}

TEST(Config, ExecutorStallWatchdog) {
  DaemonConfig d;
  EXPECT_EQ(d.executor_stall_seconds, 60u);
  EXPECT_EQ(d.on_executor_stall, "report");
  EXPECT_EQ(d.loop_stall_seconds, 30u);
  EXPECT_EQ(d.on_device_failure, "report");
  const auto dir =
      std::filesystem::temp_directory_path() / ("kvmem-cfg-stall-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "stall.json") << R"({"executor_stall_seconds": 5, "on_executor_stall": "exit"})";
  DaemonConfig c;
  Status s = LoadConfigFile((dir / "stall.json").string(), &c);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(c.executor_stall_seconds, 5u);
  EXPECT_EQ(c.on_executor_stall, "exit");
  EXPECT_TRUE(c.Validate().ok());
  c.on_executor_stall = "abort";
  s = c.Validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("on_executor_stall must be report or exit"), std::string::npos) << s.message();
  c.on_executor_stall = "exit";
  c.on_device_failure = "retry";
  s = c.Validate();
  EXPECT_NE(s.message().find("on_device_failure must be report or exit"), std::string::npos) << s.message();
  std::filesystem::remove_all(dir);
}

// The stall watchdog's view of the executor threads: a task running past the limit is counted
// (with its thread and time), an idle pool reports nothing, and a thread held by the fault flag
// counts as running its task until the flag goes.
TEST(Executor, CheckReportsTasksRunningPastTheLimit) {
  ExecutorPool pool(2);
  using std::chrono::milliseconds;
  auto idle = pool.Check(std::chrono::steady_clock::now(), milliseconds(1));
  EXPECT_EQ(idle.stalled, 0u);
  EXPECT_EQ(idle.thread, -1);
  EXPECT_EQ(idle.longest.count(), 0);
  std::promise<void> started, release, done;
  std::shared_future<void> go = release.get_future().share();
  pool.Submit(1, [&] {
    started.set_value();
    go.wait();
    done.set_value();
  });
  started.get_future().wait();
  std::this_thread::sleep_for(milliseconds(120));
  auto b = pool.Check(std::chrono::steady_clock::now(), milliseconds(100));
  EXPECT_EQ(b.stalled, 1u);
  EXPECT_GE(b.thread, 0);
  EXPECT_GE(b.longest, milliseconds(120));
  // Under the limit: running, not stalled.
  b = pool.Check(std::chrono::steady_clock::now(), std::chrono::seconds(60));
  EXPECT_EQ(b.stalled, 0u);
  EXPECT_GE(b.longest, milliseconds(120));
  release.set_value();
  done.get_future().wait();
  // The thread clears its mark right after the task returns.
  for (int i = 0; i < 200 && pool.Check(std::chrono::steady_clock::now(), milliseconds(1)).thread != -1; ++i) {
    std::this_thread::sleep_for(milliseconds(5));
  }
  EXPECT_EQ(pool.Check(std::chrono::steady_clock::now(), milliseconds(1)).thread, -1);

  const auto flag = std::filesystem::temp_directory_path() / ("kvmem-stall-" + std::to_string(::getpid()));
  std::ofstream(flag) << "x";
  ExecutorPool held(1);
  held.SetFaultStallFlag(flag.string());
  std::atomic<bool> ran{false};
  held.Submit(7, [&] { ran = true; });
  std::this_thread::sleep_for(milliseconds(80));
  EXPECT_FALSE(ran);
  EXPECT_EQ(held.Check(std::chrono::steady_clock::now(), milliseconds(50)).stalled, 1u);
  std::filesystem::remove(flag);
  held.Shutdown();
  EXPECT_TRUE(ran);
  EXPECT_EQ(held.Check(std::chrono::steady_clock::now(), milliseconds(1)).thread, -1);
}

// The one-second health checks' decisions, with the clock passed in: a task past
// executor_stall_seconds makes the daemon unready once (counted once) and ready again when it
// ends; with the exit action the process is ended with status 70; a device failure (counted
// from the monitor's start) makes it unready for good, or ends it.
TEST(Health, StallsAndDeviceFailuresDecideReadiness) {
  using std::chrono::milliseconds;
  using std::chrono::seconds;
  ExecutorPool pool(1);
  std::atomic<bool> ready{true};
  std::vector<int> exits;
  HealthOptions o;
  o.executor_stall_seconds = 1;
  HealthMonitor h(o, &pool, &ready, [&](int status) { exits.push_back(status); });
  const auto t0 = std::chrono::steady_clock::now();
  h.Tick(t0);
  EXPECT_TRUE(ready);
  EXPECT_EQ(h.loop_tick_ns()->load(), SteadyNanos(t0));
  EXPECT_DOUBLE_EQ(SecondsSince(*h.loop_tick_ns(), t0 + milliseconds(1500)), 1.5);

  std::promise<void> started, release;
  std::shared_future<void> go = release.get_future().share();
  pool.Submit(1, [&] {
    started.set_value();
    go.wait();
  });
  started.get_future().wait();
  const uint64_t stalls0 = GlobalMetrics().executor_stalls.load();
  const auto t1 = std::chrono::steady_clock::now();
  h.Tick(t1 + milliseconds(500));  // running, under the limit
  EXPECT_FALSE(h.stalled());
  EXPECT_TRUE(ready);
  h.Tick(t1 + seconds(2));
  EXPECT_TRUE(h.stalled());
  EXPECT_FALSE(ready);
  EXPECT_EQ(GlobalMetrics().executor_stalls.load(), stalls0 + 1);
  EXPECT_EQ(GlobalMetrics().executors_stalled.load(), 1u);
  EXPECT_GE(GlobalMetrics().executor_longest_task_us.load(), 2'000'000u);
  h.Tick(t1 + seconds(3));  // the same stall: counted once
  EXPECT_EQ(GlobalMetrics().executor_stalls.load(), stalls0 + 1);
  EXPECT_TRUE(exits.empty());

  // The exit action, on a second monitor of the same pool.
  HealthOptions ox = o;
  ox.exit_on_stall = true;
  std::atomic<bool> ready_x{true};
  HealthMonitor hx(ox, &pool, &ready_x, [&](int status) { exits.push_back(status); });
  hx.Tick(t1 + seconds(2));
  EXPECT_EQ(exits, std::vector<int>{HealthMonitor::kExitStatus});

  release.set_value();
  for (int i = 0; i < 200 && pool.Check(std::chrono::steady_clock::now(), milliseconds(1)).thread != -1; ++i) {
    std::this_thread::sleep_for(milliseconds(5));
  }
  h.Tick(std::chrono::steady_clock::now());
  EXPECT_FALSE(h.stalled());
  EXPECT_TRUE(ready);
  EXPECT_EQ(GlobalMetrics().executors_stalled.load(), 0u);

  // Device failures count from the monitor's start; the readiness they take does not come back.
  exits.clear();
  std::atomic<bool> ready_d{true};
  HealthMonitor hd(HealthOptions{}, nullptr, &ready_d, [&](int status) { exits.push_back(status); });
  hd.Tick(std::chrono::steady_clock::now());
  EXPECT_TRUE(ready_d);
  GlobalMetrics().device_failures++;
  hd.Tick(std::chrono::steady_clock::now());
  EXPECT_TRUE(hd.device_failed());
  EXPECT_FALSE(ready_d);
  EXPECT_TRUE(exits.empty());
  HealthOptions od;
  od.exit_on_device_failure = true;
  HealthMonitor hdx(od, nullptr, &ready_d, [&](int status) { exits.push_back(status); });
  hdx.Tick(std::chrono::steady_clock::now());  // the failure before its start is not its own
  EXPECT_TRUE(exits.empty());
  GlobalMetrics().device_failures++;
  hdx.Tick(std::chrono::steady_clock::now());
  EXPECT_EQ(exits, std::vector<int>{HealthMonitor::kExitStatus});
}

// The CUDA errors after which the context is unusable (every later call fails the same way),
// by cudaError_t value; device_pool.cc checks the values against the CUDA headers.
TEST(Device, FatalCudaErrorsAreTheStickyOnes) {
  for (int code : {214, 700, 702, 710, 714, 715, 716, 717, 718, 719}) EXPECT_TRUE(IsFatalCudaError(code)) << code;
  // Success, invalid value, out of memory, not ready, invalid device function: recoverable.
  for (int code : {0, 1, 2, 600, 98}) EXPECT_FALSE(IsFatalCudaError(code)) << code;
}

TEST(Config, ShippedConfigsLoad) {
  DaemonConfig c;
  const std::string path = std::string(KVMEM_SOURCE_DIR) + "/deploy/systemd/kvmemd.json";
  Status s = LoadConfigFile(path, &c);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(c.Validate().ok());
  // The fidelity profile: what docs/operations.md and bench/results/fidelity.json describe.
  DaemonConfig f;
  s = LoadConfigFile(std::string(KVMEM_SOURCE_DIR) + "/deploy/kvmemd-fidelity.json", &f);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(f.Validate().ok());
  const SessionOptions& o = f.session_defaults;
  EXPECT_EQ(o.chunker.min_tokens, 2u);
  EXPECT_EQ(o.chunker.max_tokens, 4u);
  EXPECT_EQ(o.search.aggregation, index::GroupAggregation::kMeanQuery);
  EXPECT_FLOAT_EQ(o.rescore_overfetch, 4.0f);
  EXPECT_TRUE(o.rescore_tokens);
}

TEST(Rendezvous, DeterministicBalancedAndStable) {
  const std::vector<std::string> three = {"10.0.0.1:7420", "10.0.0.2:7420", "10.0.0.3:7420"};
  const std::vector<std::string> two = {"10.0.0.1:7420", "10.0.0.3:7420"};
  std::map<size_t, int> load;
  int moved = 0;
  for (uint64_t id = 1; id <= 3000; ++id) {
    const size_t o = client::RendezvousOwner(id, three);
    EXPECT_EQ(o, client::RendezvousOwner(id, three));
    ++load[o];
    // Removing node 2 moves only its sessions.
    const std::string& after = two[client::RendezvousOwner(id, two)];
    if (o != 1) {
      EXPECT_EQ(after, three[o]);
    }
    moved += (after != three[o]);
  }
  for (const auto& [node, n] : load) EXPECT_NEAR(n, 1000, 150) << node;
  EXPECT_EQ(moved, load[1]);
  // Known value: placement must never change between releases (clients of different versions
  // share daemons).
  const size_t golden[] = {1, 0, 2, 1, 2, 1};  // ids 1..6
  for (uint64_t id = 1; id <= 6; ++id)
    EXPECT_EQ(client::RendezvousOwner(id, three), golden[id - 1]) << id;
}

TEST(Rendezvous, ResolveExpandsAndDeduplicates) {
  auto a = client::ResolveAddresses("127.0.0.1:1, 127.0.0.1:2,localhost:1");
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(*a, (std::vector<std::string>{"127.0.0.1:1", "127.0.0.1:2"}));
  EXPECT_FALSE(client::ResolveAddresses("nonsense").ok());
  EXPECT_FALSE(client::ResolveAddresses("").ok());
}

}  // namespace
}  // namespace kvmem
