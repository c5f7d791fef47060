#include "daemon/health.h"

#include <filesystem>
#include <system_error>

#include "common/log.h"
#include "daemon/metrics.h"

namespace kvmem {

double SecondsSince(const std::atomic<int64_t>& tick_ns, std::chrono::steady_clock::time_point now) {
  const int64_t n = SteadyNanos(now), tick = tick_ns.load(std::memory_order_relaxed);
  return n > tick ? static_cast<double>(n - tick) * 1e-9 : 0.0;
}

HealthMonitor::HealthMonitor(HealthOptions options, const ExecutorPool* executors,
                             std::atomic<bool>* ready, std::function<void(int)> exit_process)
    : options_(std::move(options)),
      executors_(executors),
      ready_(ready),
      exit_process_(std::move(exit_process)),
      failures_at_start_(GlobalMetrics().device_failures.load()),
      loop_tick_ns_(SteadyNanos(std::chrono::steady_clock::now())) {}

void HealthMonitor::Tick(std::chrono::steady_clock::time_point now) {
  loop_tick_ns_.store(SteadyNanos(now), std::memory_order_relaxed);
  CheckDevice();
  CheckStall(now);
}

void HealthMonitor::CheckDevice() {
  DaemonMetrics& m = GlobalMetrics();
  if (!options_.fault_device_failure_flag.empty() && m.device_failures.load() == failures_at_start_) {
    std::error_code ec;
    if (std::filesystem::exists(options_.fault_device_failure_flag, ec)) m.device_failures++;
  }
  if (device_failed_ || m.device_failures.load(std::memory_order_relaxed) == failures_at_start_) return;
  device_failed_ = true;
  ready_->store(false);
  KVMEM_LOG_ERROR("device failure: a CUDA error left the GPU context unusable; every device "
                  "operation fails until kvmemd restarts, and /readyz answers 503");
  if (options_.exit_on_device_failure) {
    KVMEM_LOG_ERROR("device failure: on_device_failure is exit: exiting with status {} for the "
                    "service manager to restart kvmemd (acknowledged writes are in the store's WAL)",
                    kExitStatus);
    exit_process_(kExitStatus);
  }
}

void HealthMonitor::CheckStall(std::chrono::steady_clock::time_point now) {
  if (options_.executor_stall_seconds == 0 || executors_ == nullptr) return;
  const ExecutorPool::Busy b = executors_->Check(now, std::chrono::seconds(options_.executor_stall_seconds));
  DaemonMetrics& m = GlobalMetrics();
  m.executors_stalled.store(b.stalled, std::memory_order_relaxed);
  m.executor_longest_task_us.store(
      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(b.longest).count()),
      std::memory_order_relaxed);
  if (b.stalled > 0 && !stalled_) {
    stalled_ = true;
    m.executor_stalls++;
    ready_->store(false);
    KVMEM_LOG_ERROR("stall: executor thread {} has run one task for {:.0f} s (executor_stall_seconds "
                    "{}); {} thread(s) over the limit: an operation is stuck (a wedged GPU kernel, "
                    "a store call that never returns); its sessions' requests wait behind it and "
                    "/readyz answers 503",
                    b.thread, std::chrono::duration<double>(b.longest).count(),
                    options_.executor_stall_seconds, b.stalled);
    if (options_.exit_on_stall) {
      KVMEM_LOG_ERROR("stall: on_executor_stall is exit: exiting with status {} for the service "
                      "manager to restart kvmemd (acknowledged writes are in the store's WAL)",
                      kExitStatus);
      exit_process_(kExitStatus);
    }
  } else if (b.stalled == 0 && stalled_) {
    stalled_ = false;
    if (!stopping_ && !device_failed_) ready_->store(true);
    KVMEM_LOG_WARN("stall over: no executor task runs past {} s now", options_.executor_stall_seconds);
  }
}

}  // namespace kvmem
