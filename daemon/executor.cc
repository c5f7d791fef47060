#include "daemon/executor.h"

#include <filesystem>

namespace kvmem {

void HoldWhileFileExists(const std::string& path) {
  if (path.empty()) return;
  std::error_code ec;
  while (std::filesystem::exists(path, ec)) std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

ExecutorPool::ExecutorPool(uint32_t threads) {
  for (uint32_t i = 0; i < threads; ++i) {
    workers_.push_back(std::make_unique<Worker>());
    Worker* w = workers_.back().get();
    w->thread = std::thread([this, w] { Loop(w); });
  }
}

ExecutorPool::~ExecutorPool() { Shutdown(); }

void ExecutorPool::Submit(uint64_t key, std::function<void()> task) {
  if (workers_.empty()) {
    task();
    return;
  }
  // Mix the key so consecutive ids spread evenly.
  uint64_t h = key * 0x9E3779B97F4A7C15ull;
  Worker* w = workers_[(h >> 32) % workers_.size()].get();
  {
    std::lock_guard<std::mutex> lock(w->mu);
    w->queue.push_back(std::move(task));
  }
  w->cv.notify_one();
}

void ExecutorPool::Loop(Worker* w) {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(w->mu);
      w->cv.wait(lock, [w] { return w->stop || !w->queue.empty(); });
      if (w->queue.empty()) return;  // stop requested and drained
      task = std::move(w->queue.front());
      w->queue.pop_front();
    }
    const int64_t start = SteadyNanos(std::chrono::steady_clock::now());
    w->busy_since.store(start != 0 ? start : 1, std::memory_order_relaxed);
    HoldWhileFileExists(fault_stall_flag_);
    task();
    w->busy_since.store(0, std::memory_order_relaxed);
  }
}

ExecutorPool::Busy ExecutorPool::Check(std::chrono::steady_clock::time_point now,
                                       std::chrono::nanoseconds limit) const {
  Busy b;
  const int64_t t = SteadyNanos(now);
  for (size_t i = 0; i < workers_.size(); ++i) {
    const int64_t since = workers_[i]->busy_since.load(std::memory_order_relaxed);
    if (since == 0 || since > t) continue;
    const std::chrono::nanoseconds running(t - since);
    if (running > limit) ++b.stalled;
    if (running > b.longest) {
      b.longest = running;
      b.thread = static_cast<int>(i);
    }
  }
  return b;
}

void ExecutorPool::Shutdown() {
  for (auto& w : workers_) {
    {
      std::lock_guard<std::mutex> lock(w->mu);
      w->stop = true;
    }
    w->cv.notify_all();
  }
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
}

}  // namespace kvmem
