// Executor threads: session operations sharded by session id, so one session's operations run
// in order on one thread and different sessions run in parallel.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvmem {

class ExecutorPool {
 public:
  // threads == 0: Submit runs the task inline on the caller's thread.
  explicit ExecutorPool(uint32_t threads);
  ~ExecutorPool();  // drains queued tasks, then joins

  void Submit(uint64_t shard_key, std::function<void()> task);
  // Runs every queued task, then stops the threads. Idempotent.
  void Shutdown();
  uint32_t threads() const { return static_cast<uint32_t>(workers_.size()); }

 private:
  struct Worker {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> queue;  // guarded by mu
    bool stop = false;                        // guarded by mu
    std::thread thread;
  };
  void Loop(Worker* w);

  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace kvmem
