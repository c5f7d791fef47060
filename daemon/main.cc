// kvmemd: the KV-cache memory daemon.
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include <malloc.h>

#include <atomic>
#include <condition_variable>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/log.h"
#include "common/units.h"
#include "daemon/admin.h"
#include "daemon/chunk_store.h"
#include "daemon/config.h"
#include "daemon/executor.h"
#include "daemon/health.h"
#include "daemon/kv_pool.h"
#include "daemon/metrics.h"
#include "daemon/parallel.h"
#include "daemon/reload.h"
#include "daemon/sd_notify.h"
#include "daemon/service.h"
#include "daemon/transport.h"

namespace {

constexpr char kUsage[] = R"(kvmemd - KV-cache memory daemon for long-context LLM inference

Usage: kvmemd [options]

  --listen HOST:PORT     UCX listen address            (default 127.0.0.1:7420)
  --data-dir DIR         persistent state directory    (default ./var/kvmem)
  --config FILE          JSON config file; flags given on the command line win
  --backend B            auto | cpu | cuda             (default auto)
  --log-level L          trace|debug|info|warn|error   (default info)
  --progress M           event | poll                  (default event)
  --executors N          session executor threads, 0 = inline (default 2)
  --search-threads N     threads one index search (and on the CPU backend one attention) fans
                         out over (default: by core count)
  --device-memory SIZE   KV pool size (device tier), e.g. 8GiB (default 4GiB)
  --host-memory SIZE     host tier for evicted blocks, e.g. 16GiB; 0 = none (default 0)
  --restore M            eager | lazy: load durable K/V at start, or check it and fetch it
                         when first selected                                (default eager)
  --max-message SIZE     largest accepted message      (default 1GiB)
  --ucx-error-mode M     none | peer                   (default none; none allows shared memory)
  --ucx-rndv-scheme S    auto | get_zcopy | put_zcopy  (default auto; large-payload rendezvous)
  --append-landing B     on: packed AppendKV payloads are received straight into their chunk
                         blocks (host pool; slower with UCX 1.13, whose IOV receive leaves CMA);
                         off: into a receive buffer, then copied (default off)
  --admin HOST:PORT|off  admin HTTP: /healthz /readyz /metrics /v1/sessions (default 127.0.0.1:7421)
  --sync-writes B        true: fsync the WAL before acknowledging a durable write (survives
                         power loss); false: write(2) only (survives kill -9)   (default false)
  --version              print the version and exit
  --help                 this text

With no tenants configured, kvmemd serves one tenant ("default") without tokens and refuses to
listen on non-loopback addresses. SIGTERM/SIGINT stop it gracefully (in-flight requests finish).
SIGHUP re-reads the config file: log level, tenant tokens and quotas (docs/operations.md).
)";

struct Flags {
  std::vector<std::pair<std::string, std::string>> values;
  std::string config;
};

int Fail(const std::string& msg) {
  std::fprintf(stderr, "kvmemd: %s\n", msg.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kvmem;
  // Message staging buffers are large (MiBs) and short-lived: keep them in the heap instead of
  // fresh mmaps, so receiving does not page-fault on every message.
  mallopt(M_MMAP_THRESHOLD, 512 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  Flags flags;
  static const char* kValued[] = {"--listen",   "--data-dir",      "--config",     "--backend",
                                  "--log-level", "--progress",     "--executors",  "--device-memory", "--host-memory", "--restore",
                                  "--max-message", "--ucx-error-mode", "--ucx-rndv-scheme", "--search-threads",
                                  "--admin", "--sync-writes", "--fault-fail-writes-flag", "--fault-stall-flag",
                                  "--fault-loop-stall-flag", "--fault-device-failure-flag", "--fault-device-trap-flag",
                                  "--append-landing"};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (a == "--version") {
      std::puts("kvmemd 0.1.0");
      return 0;
    }
    std::string value;
    const size_t eq = a.find('=');
    if (eq != std::string::npos) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
    }
    bool known = false;
    for (const char* k : kValued) known |= (a == k);
    if (!known) return Fail("unknown option '" + a + "' (see --help)");
    if (eq == std::string::npos) {
      if (i + 1 >= argc) return Fail("option " + a + " needs a value");
      value = argv[++i];
    }
    if (a == "--config") flags.config = value;
    else flags.values.emplace_back(a, value);
  }

  // Embedded defaults, then the config file, then flags; run again on SIGHUP.
  auto build_config = [&flags](DaemonConfig* out) -> Status {
    DaemonConfig& config = *out;
    config = DaemonConfig{};
    if (!flags.config.empty()) {
      KVMEM_RETURN_IF_ERROR(LoadConfigFile(flags.config, &config));
    }
    for (const auto& [k, v] : flags.values) {
      auto Fail = [](const std::string& msg) { return InvalidArgument(msg); };
      if (k == "--listen") config.listen = v;
      else if (k == "--admin") config.admin = v;
      else if (k == "--data-dir") config.data_dir = v;
      else if (k == "--backend") config.backend = v;
      else if (k == "--log-level") config.log_level = v;
      else if (k == "--progress") config.progress = v;
      else if (k == "--ucx-error-mode") config.ucx_error_mode = v;
      else if (k == "--ucx-rndv-scheme") config.ucx_rndv_scheme = v;
      else if (k == "--restore") config.restore = v;
      else if (k == "--executors") {
        char* end = nullptr;
        const long n = std::strtol(v.c_str(), &end, 10);
        if (*end || n < 0) return Fail("--executors needs a non-negative integer");
        config.executors = static_cast<uint32_t>(n);
      } else if (k == "--search-threads") {
        char* end = nullptr;
        const long n = std::strtol(v.c_str(), &end, 10);
        if (*end || n < 0 || n > 256) return Fail("--search-threads needs an integer in [0, 256]");
        config.search_threads = static_cast<uint32_t>(n);
      } else if (k == "--device-memory") {
        auto b = ParseBytes(v);
        if (!b.ok()) return Fail("--device-memory: " + b.status().message());
        config.device_memory_bytes = *b;
      } else if (k == "--host-memory") {
        auto b = ParseBytes(v);
        if (!b.ok()) return Fail("--host-memory: " + b.status().message());
        config.host_memory_bytes = *b;
      } else if (k == "--max-message") {
        auto b = ParseBytes(v);
        if (!b.ok()) return Fail("--max-message: " + b.status().message());
        config.max_message_bytes = *b;
      }
    }
    return Status::OK();
  };
  // Store options are read once (not reloadable).
  StoreOptions store_opts;
  bool append_landing = false;
  std::string fault_stall_flag, fault_loop_stall_flag, fault_device_failure_flag, fault_device_trap_flag;
  for (const auto& [k, v] : flags.values) {
    if (k == "--append-landing") {
      if (v != "on" && v != "off") return Fail("--append-landing needs on or off");
      append_landing = v == "on";
    }
    if (k == "--fault-fail-writes-flag") store_opts.fail_writes_flag_file = v;
    if (k == "--fault-stall-flag") fault_stall_flag = v;
    if (k == "--fault-loop-stall-flag") fault_loop_stall_flag = v;
    if (k == "--fault-device-failure-flag") fault_device_failure_flag = v;
    if (k == "--fault-device-trap-flag") fault_device_trap_flag = v;
    if (k == "--sync-writes") {
      if (v != "true" && v != "false") return Fail("--sync-writes needs true or false");
      store_opts.sync_writes = v == "true";
    }
  }
  DaemonConfig config;
  if (Status s = build_config(&config); !s.ok()) return Fail(s.ToString());
  // Before any thread starts: glibc sizes its arena limit on the first thread that needs one.
  if (config.malloc_arena_max > 0) mallopt(M_ARENA_MAX, static_cast<int>(config.malloc_arena_max));
  if (Status s = InitLogging(config.log_level); !s.ok()) return Fail(s.ToString());
  if (Status s = config.Validate(); !s.ok()) return Fail(s.ToString());

  std::error_code ec;
  std::filesystem::create_directories(config.data_dir, ec);
  if (ec) return Fail("cannot create data dir '" + config.data_dir + "': " + ec.message());

  std::string backend = config.backend;
  if (backend == "auto") backend = CudaDeviceCount() > 0 ? "cuda" : "cpu";
  SlabAllocator::Options pool_opts;
  pool_opts.capacity_bytes = config.device_memory_bytes;
  // A slab holds one size class; a small pool (tiny budgets, tests) needs smaller slabs to
  // have one for every class in use: 1/512 of the pool, between 64 KiB and 4 MiB.
  while (pool_opts.slab_bytes > (64u << 10) && pool_opts.slab_bytes * 512 > pool_opts.capacity_bytes) {
    pool_opts.slab_bytes /= 2;
  }
  auto pool = backend == "cuda" ? CreateDevicePool(pool_opts, 0, fault_device_trap_flag) : CreateHostPool(pool_opts);
  if (!pool.ok()) return Fail("backend " + backend + ": " + pool.status().ToString());
  backend = (*pool)->Describe();
  KVMEM_LOG_INFO("kvmemd 0.1.0: backend={} pool={} host tier={} data_dir={} tenants={}", backend,
                 FormatBytes(config.device_memory_bytes), FormatBytes(config.host_memory_bytes),
                 config.data_dir,
                 config.tenants.empty() ? std::string("default (no tokens)")
                                        : std::to_string(config.tenants.size()));

  store_opts.path = (std::filesystem::path(config.data_dir) / "db").string();
  store_opts.block_cache_bytes = config.store_block_cache_bytes;
  auto store = ChunkStore::Open(store_opts);
  if (!store.ok()) return Fail(store.status().ToString());

  ParallelPool search_pool(config.search_threads);
  SetSearchPool(config.search_threads > 0 ? &search_pool : nullptr);
  // Appends copy on a couple of threads of their own (session.h, SetAppendPool).
  ParallelPool append_pool(std::min(kAppendCopyThreads, config.search_threads));
  SetAppendPool(config.search_threads > 0 ? &append_pool : nullptr);
  boost::asio::io_context io;
  Service service(config, pool->get(), backend);
  service.AttachStore(store->get());
  // Durable sessions are back before the listener accepts anyone (and before /readyz says so).
  if (Status s = service.RestoreDurableSessions(); !s.ok()) return Fail(s.ToString());
  ExecutorPool executors(config.executors);
  if (!fault_stall_flag.empty()) executors.SetFaultStallFlag(fault_stall_flag);
  TransportOptions topts;
  topts.listen = config.listen;
  topts.poll = config.progress == "poll";
  topts.peer_error_handling = config.ucx_error_mode == "peer";
  topts.rndv_scheme = config.ucx_rndv_scheme;
  topts.append_landing = append_landing;
  topts.max_message_bytes = config.max_message_bytes;
  topts.max_inflight_per_endpoint = config.max_inflight_per_endpoint;
  topts.max_connections = config.max_connections;
  topts.idle_timeout = std::chrono::seconds(config.client_idle_timeout_seconds);
  UcxServer server(topts, &service, &executors, &io);
  if (Status s = server.Start(); !s.ok()) return Fail(s.ToString());

  // --- Operations: admin HTTP, readiness, systemd notify + watchdog, SIGHUP reload ---
  const auto started = std::chrono::steady_clock::now();
  std::atomic<bool> ready{false};
  // The one-second health checks (daemon/health.h): the loop's tick for /healthz, device
  // failures, executor stalls; an exit action ends the process for its service manager.
  // (The monitor counts device failures from its construction on: one during startup ends it.)
  if (GlobalMetrics().device_failures.load() > 0) {
    return Fail("a CUDA error left the GPU context unusable during startup (restore); see the log");
  }
  HealthOptions hopts;
  hopts.executor_stall_seconds = config.executor_stall_seconds;
  hopts.exit_on_stall = config.on_executor_stall == "exit";
  hopts.exit_on_device_failure = config.on_device_failure == "exit";
  hopts.fault_device_failure_flag = fault_device_failure_flag;
  HealthMonitor health(hopts, &executors, &ready, [](int status) {
    sd::Notify("STOPPING=1");
    std::_Exit(status);
  });
  std::unique_ptr<AdminServer> admin;
  if (config.admin != "off") {
    AdminOptions aopts;
    aopts.listen = config.admin;
    aopts.token = config.admin_token;
    AdminSources src;
    src.service = &service;
    src.transport = &server.counters();
    src.device_capacity_bytes = (*pool)->allocator().capacity_bytes();
    src.backend = backend;
    src.gpu = backend == "cpu" ? "none" : backend;  // "cuda:N <device name>"
    src.version = "0.1.0";
    src.started = started;
    src.ready = &ready;
    src.loop_tick_ns = health.loop_tick_ns();
    src.loop_stall_seconds = config.loop_stall_seconds;
    admin = std::make_unique<AdminServer>(aopts, src);
    if (Status s = admin->Start(); !s.ok()) return Fail(s.ToString());
  }
  boost::asio::steady_timer watchdog(io);
  const auto watchdog_every = sd::WatchdogInterval() / 2;
  std::function<void()> arm_watchdog = [&] {
    if (watchdog_every.count() == 0) return;
    watchdog.expires_after(watchdog_every);
    watchdog.async_wait([&](const boost::system::error_code& e) {
      if (e) return;
      sd::Notify("WATCHDOG=1");  // from the io_context: a wedged event loop stops the pings
      arm_watchdog();
    });
  };
  arm_watchdog();

  // Once a second on the control io_context: the health checks, then session TTL expiry.
  boost::asio::steady_timer ttl_timer(io);
  std::function<void()> arm_ttl = [&] {
    ttl_timer.expires_after(std::chrono::seconds(1));
    ttl_timer.async_wait([&](const boost::system::error_code& e) {
      if (e) return;
      // Before the expiry, which could wait on a session a stuck task holds.
      health.Tick(std::chrono::steady_clock::now());
      HoldWhileFileExists(fault_loop_stall_flag);  // tests: a wedged event loop
      const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::system_clock::now().time_since_epoch());
      service.ExpireIdleSessions(static_cast<uint64_t>(now.count()));
      arm_ttl();
    });
  };
  arm_ttl();

  boost::asio::signal_set hup(io, SIGHUP);
  std::function<void()> wait_hup = [&] {
    hup.async_wait([&](const boost::system::error_code& e, int) {
      if (e) return;
      sd::Notify("RELOADING=1");
      DaemonConfig fresh;
      std::vector<std::string> ignored;
      Status s = build_config(&fresh);
      if (s.ok()) s = ApplyReload(fresh, &config, &service, &ignored);
      if (s.ok()) {
        GlobalMetrics().reloads_ok++;
        KVMEM_LOG_INFO("SIGHUP: configuration reloaded (tenants={}, log_level={})",
                       config.tenants.size(), config.log_level);
        for (const auto& k : ignored) KVMEM_LOG_WARN("SIGHUP: '{}' changed but needs a restart", k);
      } else {
        GlobalMetrics().reloads_failed++;
        KVMEM_LOG_ERROR("SIGHUP: reload failed, keeping the running configuration: {}", s.ToString());
      }
      sd::Notify("READY=1");
      wait_hup();
    });
  };
  wait_hup();

  // Idle trim (config idle_trim_seconds): its own thread, since a memtable flush may take a
  // while and must not stall the io_context.
  std::mutex idle_mu;
  std::condition_variable idle_cv;
  bool idle_exit = false;
  std::thread idle_trim;
  if (config.idle_trim_seconds > 0) {
    idle_trim = std::thread([&, period = std::chrono::seconds(config.idle_trim_seconds)] {
      SlabAllocator& alloc = (*pool)->allocator();
      ChunkStore* st = store->get();
      uint64_t allocs = alloc.allocation_count(), writes = st->write_count();
      bool trimmed = true, flushed = true;
      std::unique_lock lock(idle_mu);
      while (!idle_cv.wait_for(lock, period, [&] { return idle_exit; })) {
        const uint64_t a = alloc.allocation_count(), w = st->write_count();
        if (w != writes) flushed = false;
        if (a != allocs || w != writes) {
          allocs = a;
          writes = w;
          trimmed = false;
          continue;
        }
        if (trimmed) continue;  // once per idle period
        trimmed = true;
        // Flush first: the memtables it frees are then trimmed with the rest.
        if (!flushed) {
          if (Status s = st->Flush(); !s.ok()) KVMEM_LOG_WARN("idle trim: store flush: {}", s.ToString());
          flushed = true;
        }
        const uint64_t released = alloc.ReleaseRetained();
        const uint64_t buffers = ReleaseRetainedReceiveBuffers();
        malloc_trim(0);
        GlobalMetrics().idle_trims++;
        KVMEM_LOG_DEBUG("idle trim: released {} of retained KV slabs and {} of receive "
                        "buffers, flushed memtables", FormatBytes(released), FormatBytes(buffers));
      }
    });
  }

  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  bool stopping = false;
  signals.async_wait([&](const boost::system::error_code& e, int sig) {
    if (e || stopping) return;
    stopping = true;
    health.SetStopping();
    ready = false;
    sd::Notify("STOPPING=1");
    KVMEM_LOG_INFO("signal {}: shutting down", sig);
    watchdog.cancel();
    ttl_timer.cancel();
    hup.cancel();
    server.Stop(std::chrono::milliseconds(4000), [&] { io.stop(); });
  });
  std::signal(SIGPIPE, SIG_IGN);
  // Durable sessions were restored above: ready once listening.
  ready = true;
  sd::Notify("READY=1\nSTATUS=serving on " + config.listen);
  KVMEM_LOG_INFO("ready");
  io.run();
  if (idle_trim.joinable()) {
    {
      std::lock_guard lock(idle_mu);
      idle_exit = true;
    }
    idle_cv.notify_all();
    idle_trim.join();
  }
  if (admin) admin->Stop();
  executors.Shutdown();
  service.DropAll();  // sessions (and their journals) go before the store closes
  // No memtable flush here: it can take seconds with a large store, and the WAL already holds
  // every acknowledged write (restart replays it). Syncing the WAL is enough and fast.
  if (Status st = (*store)->SyncWal(); !st.ok()) KVMEM_LOG_WARN("store WAL sync at shutdown: {}", st.ToString());
  KVMEM_LOG_INFO("stopped");
  return 0;
}
