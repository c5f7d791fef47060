// A small fixed pool for fork-join work inside one request (per-KV-head index search). The
// caller runs a share of the iterations itself, so a pool of 0 threads is plain sequential code.
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
  void Drain(const std::function<void(uint32_t)>& fn, uint32_t n);

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
  std::vector<std::thread> workers_;
};

}  // namespace kvmem
