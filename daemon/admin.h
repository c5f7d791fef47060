// The admin HTTP endpoint (Boost.Beast): health, readiness, Prometheus metrics and a JSON view
// of the sessions, for probes, scrapers and operators.
//
//   GET /healthz       200 "ok" while the process serves requests
//   GET /readyz        200 "ready" once the daemon flipped ready (after startup restore and
//                      listen), 503 before that and while stopping
//   GET /metrics       Prometheus text format (daemon/metrics.h)
//   GET /v1/sessions   JSON array, the fields of `kvmemctl session list --json`, all tenants
//   GET /v1/status     JSON object: version, backend, gpu, uptime, memory per tier, sessions
//
// Authentication: when a token is configured every path except /healthz and /readyz needs
// `Authorization: Bearer <token>` (401 otherwise). Probes stay unauthenticated: they reveal
// nothing and kubelet cannot read Secrets into probe headers.
//
// Threading: the server runs its own io_context on one thread, so rendering /metrics never
// runs on the thread that progresses UCX (in event mode that is the daemon's io_context).
// Handlers read atomics and snapshot session pointers (Service::SnapshotSessions).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "common/status.h"
#include "daemon/metrics.h"

namespace kvmem {

class Service;
struct TransportCounters;

struct AdminOptions {
  // HOST:PORT to bind. Default: "127.0.0.1:7421".
  std::string listen = "127.0.0.1:7421";
  // Bearer token for /metrics and /v1/*; empty = none (only allowed on loopback, enforced by
  // DaemonConfig::Validate). Default: "".
  std::string token;
};

// What the admin endpoint reports on; everything outlives the AdminServer.
struct AdminSources {
  const Service* service = nullptr;
  const TransportCounters* transport = nullptr;
  uint64_t device_capacity_bytes = 0;
  std::string backend;
  std::string gpu = "none";
  std::string version;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  const std::atomic<bool>* ready = nullptr;
  // Liveness of the daemon's event loop (which progresses UCX and runs the timers): the
  // steady_clock nanoseconds of its last one-second tick. /healthz answers 503 once it is
  // older than loop_stall_seconds (0: never). Null: not tracked.
  const std::atomic<int64_t>* loop_tick_ns = nullptr;
  uint32_t loop_stall_seconds = 0;
};

class AdminServer {
 public:
  AdminServer(AdminOptions options, AdminSources sources);
  ~AdminServer();  // stops

  // Binds and starts serving on the admin thread. UNAVAILABLE if the address is in use.
  Status Start();
  void Stop();
  uint16_t port() const { return port_; }
  bool ready() const;
  // Seconds since the event loop's last tick (0 when not tracked).
  double LoopLagSeconds() const;
  // /healthz: alive unless the event loop has not ticked for loop_stall_seconds.
  bool alive() const;

  // The response body of each endpoint (exposed for tests and benchmarks).
  std::string MetricsText() const;
  std::string SessionsJson() const;
  std::string StatusJson() const;

 private:
  struct Impl;
  const AdminOptions options_;
  const AdminSources sources_;
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
  uint16_t port_ = 0;
};

}  // namespace kvmem
