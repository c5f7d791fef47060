// kvmemd: the KV-cache memory daemon.
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include <malloc.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "common/log.h"
#include "common/units.h"
#include "daemon/config.h"
#include "daemon/executor.h"
#include "daemon/kv_pool.h"
#include "daemon/parallel.h"
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
  --search-threads N     threads one index search fans out over (default: by core count)
  --device-memory SIZE   KV pool size, e.g. 8GiB       (default 4GiB)
  --max-message SIZE     largest accepted message      (default 1GiB)
  --ucx-error-mode M     none | peer                   (default none; none allows shared memory)
  --version              print the version and exit
  --help                 this text

With no tenants configured, kvmemd serves one tenant ("default") without tokens and refuses to
listen on non-loopback addresses. SIGTERM/SIGINT stop it gracefully (in-flight requests finish).
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
                                  "--log-level", "--progress",     "--executors",  "--device-memory",
                                  "--max-message", "--ucx-error-mode", "--search-threads"};
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

  DaemonConfig config;
  if (!flags.config.empty()) {
    Status s = LoadConfigFile(flags.config, &config);
    if (!s.ok()) return Fail(s.ToString());
  }
  for (const auto& [k, v] : flags.values) {
    Status s;
    if (k == "--listen") config.listen = v;
    else if (k == "--data-dir") config.data_dir = v;
    else if (k == "--backend") config.backend = v;
    else if (k == "--log-level") config.log_level = v;
    else if (k == "--progress") config.progress = v;
    else if (k == "--ucx-error-mode") config.ucx_error_mode = v;
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
    } else if (k == "--max-message") {
      auto b = ParseBytes(v);
      if (!b.ok()) return Fail("--max-message: " + b.status().message());
      config.max_message_bytes = *b;
    }
  }
  if (Status s = InitLogging(config.log_level); !s.ok()) return Fail(s.ToString());
  if (Status s = config.Validate(); !s.ok()) return Fail(s.ToString());

  std::error_code ec;
  std::filesystem::create_directories(config.data_dir, ec);
  if (ec) return Fail("cannot create data dir '" + config.data_dir + "': " + ec.message());

  std::string backend = config.backend;
  if (backend == "auto") backend = CudaDeviceCount() > 0 ? "cuda" : "cpu";
  SlabAllocator::Options pool_opts;
  pool_opts.capacity_bytes = config.device_memory_bytes;
  auto pool = backend == "cuda" ? CreateDevicePool(pool_opts, 0) : CreateHostPool(pool_opts);
  if (!pool.ok()) return Fail("backend " + backend + ": " + pool.status().ToString());
  backend = (*pool)->Describe();
  KVMEM_LOG_INFO("kvmemd 0.1.0: backend={} pool={} data_dir={} tenants={}", backend,
                 FormatBytes(config.device_memory_bytes), config.data_dir,
                 config.tenants.empty() ? std::string("default (no tokens)")
                                        : std::to_string(config.tenants.size()));

  ParallelPool search_pool(config.search_threads);
  SetSearchPool(config.search_threads > 0 ? &search_pool : nullptr);
  boost::asio::io_context io;
  Service service(config, pool->get(), backend);
  ExecutorPool executors(config.executors);
  TransportOptions topts;
  topts.listen = config.listen;
  topts.poll = config.progress == "poll";
  topts.peer_error_handling = config.ucx_error_mode == "peer";
  topts.max_message_bytes = config.max_message_bytes;
  topts.max_inflight_per_endpoint = config.max_inflight_per_endpoint;
  UcxServer server(topts, &service, &executors, &io);
  if (Status s = server.Start(); !s.ok()) return Fail(s.ToString());

  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  bool stopping = false;
  signals.async_wait([&](const boost::system::error_code& e, int sig) {
    if (e || stopping) return;
    stopping = true;
    KVMEM_LOG_INFO("signal {}: shutting down", sig);
    server.Stop(std::chrono::milliseconds(4000), [&] { io.stop(); });
  });
  std::signal(SIGPIPE, SIG_IGN);
  KVMEM_LOG_INFO("ready");
  io.run();
  executors.Shutdown();
  KVMEM_LOG_INFO("stopped");
  return 0;
}
