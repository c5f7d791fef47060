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

void ParallelPool::Drain() {
  const auto* fn = fn_;
  const uint32_t n = n_;
  for (uint32_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) (*fn)(i);
}

void ParallelPool::Loop() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      ++busy_;
    }
    Drain();
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
  Drain();
  // Workers that woke hold busy_ until they finish their iterations.
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return busy_ == 0 && next_.load() >= n_; });
  fn_ = nullptr;
}

}  // namespace kvmem
