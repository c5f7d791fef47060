// Executor threads: session operations sharded by session id, so one session's operations run
// in order on one thread and different sessions run in parallel.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace kvmem {

// steady_clock time as nanoseconds since the clock's epoch: what ExecutorPool's threads publish
// for their running task and the health monitor for the event loop's tick, in an atomic each.
inline int64_t SteadyNanos(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

// Fault injection for tests: returns once `path` no longer exists (polling every 10 ms); at once
// when `path` is empty.
void HoldWhileFileExists(const std::string& path);

class ExecutorPool {
 public:
  // threads == 0: Submit runs the task inline on the caller's thread.
  explicit ExecutorPool(uint32_t threads);
  ~ExecutorPool();  // drains queued tasks, then joins

  void Submit(uint64_t shard_key, std::function<void()> task);
  // Runs every queued task, then stops the threads. Idempotent.
  void Shutdown();
  uint32_t threads() const { return static_cast<uint32_t>(workers_.size()); }

  // The threads running one task for longer than `limit` at `now` (a wedged GPU, a store call
  // that never returns), for the daemon's stall watchdog; lock-free, any thread.
  struct Busy {
    uint32_t stalled = 0;                    // threads over the limit
    std::chrono::nanoseconds longest{0};     // the longest-running task's time so far
    int thread = -1;                         // its thread's index (-1: every thread idle)
  };
  Busy Check(std::chrono::steady_clock::time_point now, std::chrono::nanoseconds limit) const;

  // Fault injection for tests (kvmemd --fault-stall-flag): while `path` exists, each thread
  // holds its next task before running it (counted as running: what a stuck operation looks
  // like). Set before the first Submit.
  void SetFaultStallFlag(std::string path) { fault_stall_flag_ = std::move(path); }

 private:
  struct Worker {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> queue;  // guarded by mu
    bool stop = false;                        // guarded by mu
    // steady_clock nanoseconds when the running task started; 0 while idle.
    std::atomic<int64_t> busy_since{0};
    std::thread thread;
  };
  void Loop(Worker* w);

  std::vector<std::unique_ptr<Worker>> workers_;
  std::string fault_stall_flag_;
};

}  // namespace kvmem
