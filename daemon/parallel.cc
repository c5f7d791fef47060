#include "daemon/parallel.h"

namespace kvmem {

ParallelPool::ParallelPool(uint32_t threads) {
  for (uint32_t i = 0; i < threads; ++i) workers_.emplace_back([this] { Loop(); });
}

ParallelPool::~ParallelPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ParallelPool::Drain(const std::function<void(uint32_t)>& fn, uint32_t n) {
  for (uint32_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) fn(i);
}

void ParallelPool::Loop() {
  uint64_t seen = 0;
  const std::function<void(uint32_t)>* fn = nullptr;
  uint32_t n = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      // The job is read here, under mu_, never after: a worker that woke after its job's For()
      // had returned (fn_ already null) would otherwise read fn_ / n_ unlocked while the next
      // For() resets next_ to 0, and call a null or stale function (a kvmemd abort under a
      // stream of appends on the 16-core GPU host has its backtrace here). A job counted in busy_
      // cannot end before this worker is done with it, so fn stays valid while it runs.
      fn = fn_;
      n = n_;
      if (fn == nullptr) continue;  // that For() is over
      ++busy_;
    }
    Drain(*fn, n);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--busy_ == 0) done_cv_.notify_all();
    }
  }
}

void ParallelPool::For(uint32_t n, const std::function<void(uint32_t)>& fn) {
  if (workers_.empty() || n <= 1) {
    for (uint32_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::lock_guard<std::mutex> call(call_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    n_ = n;
    next_.store(0);
    ++generation_;
  }
  cv_.notify_all();
  Drain(fn, n);
  // Workers that woke hold busy_ until they finish their iterations.
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return busy_ == 0 && next_.load() >= n_; });
  fn_ = nullptr;
}

}  // namespace kvmem
