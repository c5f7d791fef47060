#include "daemon/parallel.h"

#include <chrono>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvmem {
namespace {

constexpr auto kSpinMicros = std::chrono::microseconds(200);

inline void CpuRelax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Spins until done() or kSpinMicros have passed; returns done().
template <typename Done>
bool SpinUntil(Done done) {
  const auto until = std::chrono::steady_clock::now() + kSpinMicros;
  for (unsigned i = 0;; ++i) {
    if (done()) return true;
    CpuRelax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) return done();
  }
}

}  // namespace

ParallelPool::ParallelPool(uint32_t threads) {
  for (uint32_t i = 0; i < threads; ++i) workers_.emplace_back([this] { Loop(); });
}

ParallelPool::~ParallelPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    stopping_ = true;
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
    SpinUntil([&] {
      return published_.load(std::memory_order_acquire) != seen || stopping_.load(std::memory_order_relaxed);
    });
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      ++busy_;
      running_.store(busy_, std::memory_order_relaxed);
    }
    Drain();
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_.store(--busy_, std::memory_order_release);
      if (busy_ == 0) done_cv_.notify_all();
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
    published_.store(generation_, std::memory_order_release);
  }
  cv_.notify_all();
  Drain();
  // Workers that woke hold busy_ until they finish their iterations; most finish within the spin.
  SpinUntil([&] { return running_.load(std::memory_order_acquire) == 0 && next_.load() >= n; });
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return busy_ == 0 && next_.load() >= n_; });
  fn_ = nullptr;
}

}  // namespace kvmem
