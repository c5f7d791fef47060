#include "daemon/executor.h"

namespace kvmem {

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
    task();
  }
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
