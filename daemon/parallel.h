// A small fixed pool for fork-join work inside one request (per-KV-head index search, the copy of
// an append into its chunk blocks). The caller runs a share of the iterations itself, so a pool
// of 0 threads is plain sequential code.
//
// Workers spin for kSpinMicros after a job before sleeping on the condition variable, and the
// caller spins as long for the workers to finish: a fork-join every ~100 us (a stream of 1 MiB
// appends) then costs no futex wake-ups, which took longer than the work itself (a worker woke
// after the caller had done most of the copy alone). Idle, the pool sleeps as before.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kvmem {

class ParallelPool {
 public:
  explicit ParallelPool(uint32_t threads);
  ~ParallelPool();
  ParallelPool(const ParallelPool&) = delete;
  ParallelPool& operator=(const ParallelPool&) = delete;

  // Runs fn(i) for i in [0, n), spread over the pool and the calling thread; returns when all
  // are done. Concurrent callers are serialised (one fork-join at a time).
  void For(uint32_t n, const std::function<void(uint32_t)>& fn);
  uint32_t threads() const { return static_cast<uint32_t>(workers_.size()); }

 private:
  void Loop();
  void Drain();

  std::mutex call_mu_;  // one For() at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  const std::function<void(uint32_t)>* fn_ = nullptr;  // guarded by mu_
  uint32_t n_ = 0;                                       // guarded by mu_
  uint64_t generation_ = 0;                              // guarded by mu_
  uint32_t busy_ = 0;                                    // guarded by mu_
  bool stop_ = false;                                    // guarded by mu_
  std::atomic<uint32_t> next_{0};
  std::atomic<uint64_t> published_{0};  // generation_, readable without mu_ (spinning workers)
  std::atomic<uint32_t> running_{0};    // busy_, likewise (the spinning caller)
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> workers_;
};

}  // namespace kvmem
