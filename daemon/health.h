// kvmemd's health checks, run once a second on the main event loop: the loop's own tick (for
// /healthz, loop_stall_seconds), device failures (a CUDA error that left the GPU context
// unusable, on_device_failure) and executor stalls (a session operation running past
// executor_stall_seconds, on_executor_stall). They decide readiness beside startup and shutdown
// and, with the exit actions, end the process for its service manager to restart.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "daemon/executor.h"

namespace kvmem {

// Seconds from a SteadyNanos stamp (such as HealthMonitor::loop_tick_ns) to `now`; 0 when the
// stamp is later.
double SecondsSince(const std::atomic<int64_t>& tick_ns, std::chrono::steady_clock::time_point now);

struct HealthOptions {
  uint32_t executor_stall_seconds = 60;  // 0: no stall check
  bool exit_on_stall = false;            // on_executor_stall "exit"
  bool exit_on_device_failure = false;   // on_device_failure "exit"
  // Tests (kvmemd --fault-device-failure-flag): while this file exists, a tick counts one
  // device failure (once).
  std::string fault_device_failure_flag;
};

class HealthMonitor {
 public:
  // `ready` is the readiness flag /readyz reports (set by main after startup); `exit_process`
  // ends the process with the given status (main: sd STOPPING=1, then _Exit).
  HealthMonitor(HealthOptions options, const ExecutorPool* executors, std::atomic<bool>* ready,
                std::function<void(int)> exit_process);

  // One check at `now` (the loop's tick). Device failures are counted from construction on
  // (kvmem_device_failures_total); stalls by ExecutorPool::Check.
  void Tick(std::chrono::steady_clock::time_point now);
  // Shutting down: a stall that ends no longer makes the daemon ready.
  void SetStopping() { stopping_ = true; }

  // The steady_clock nanoseconds of the last tick (AdminSources::loop_tick_ns).
  const std::atomic<int64_t>* loop_tick_ns() const { return &loop_tick_ns_; }
  bool stalled() const { return stalled_; }
  bool device_failed() const { return device_failed_; }

  static constexpr int kExitStatus = 70;

 private:
  void CheckDevice();
  void CheckStall(std::chrono::steady_clock::time_point now);

  const HealthOptions options_;
  const ExecutorPool* const executors_;
  std::atomic<bool>* const ready_;
  const std::function<void(int)> exit_process_;
  const uint64_t failures_at_start_;
  std::atomic<int64_t> loop_tick_ns_;
  bool stalled_ = false;
  bool device_failed_ = false;
  bool stopping_ = false;
};

}  // namespace kvmem
