// The policy of kvmemd's cache of captured CUDA graphs (daemon/device_pool.cc), apart from CUDA
// so it is tested on any machine: which submissions replay a cached graph, which capture one,
// which go directly, and which graphs are dropped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <utility>

namespace kvmem {

// Graphs (handles of type Exec, destroyed by Destroy) cached by layout key. A layout is submitted
// directly the first time it is seen and captured the second, so one used once (or one that
// changes every call) never pays for a capture; at most `max_graphs` are kept, the least recently
// used dropped first; at most `max_seen` layouts wait for their second use (forgotten all at once
// past that). Not thread-safe (the pool's lock covers it).
template <typename Key, typename Exec, typename Destroy>
class GraphCache {
 public:
  enum class Action { kReplay, kDirect, kCapture };

  GraphCache(size_t max_graphs, size_t max_seen, Destroy destroy)
      : max_graphs_(max_graphs), max_seen_(max_seen), destroy_(std::move(destroy)) {}
  ~GraphCache() { Clear(); }
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;

  // What to do for `key`: kReplay with *exec set, kDirect (its first sighting), or kCapture
  // (its second: capture, then Insert, or submit directly if the capture failed).
  Action Find(const Key& key, Exec* exec) {
    ++tick_;
    if (auto it = graphs_.find(key); it != graphs_.end()) {
      it->second.last_used = tick_;
      *exec = it->second.exec;
      return Action::kReplay;
    }
    if (seen_.erase(key) != 0) return Action::kCapture;
    if (seen_.size() >= max_seen_) seen_.clear();
    seen_.insert(key);
    return Action::kDirect;
  }

  // Keeps `exec` for `key` (after a kCapture), dropping the least recently used graph when full.
  void Insert(const Key& key, Exec exec) {
    if (auto it = graphs_.find(key); it != graphs_.end()) {
      destroy_(it->second.exec);
      graphs_.erase(it);
    }
    if (graphs_.size() >= max_graphs_ && !graphs_.empty()) {
      auto lru = graphs_.begin();
      for (auto it = graphs_.begin(); it != graphs_.end(); ++it) {
        if (it->second.last_used < lru->second.last_used) lru = it;
      }
      destroy_(lru->second.exec);
      graphs_.erase(lru);
    }
    graphs_.emplace(key, Entry{exec, tick_});
  }

  // Destroys every graph and forgets every sighting (before a buffer the graphs use is freed:
  // a later allocation may return its address, and a key would then match a stale graph).
  void Clear() {
    for (auto& [k, e] : graphs_) destroy_(e.exec);
    graphs_.clear();
    seen_.clear();
  }

  size_t size() const { return graphs_.size(); }

 private:
  struct Entry {
    Exec exec;
    uint64_t last_used;  // tick_ at its capture or last replay
  };
  size_t max_graphs_, max_seen_;
  Destroy destroy_;
  std::map<Key, Entry> graphs_;
  std::set<Key> seen_;
  uint64_t tick_ = 0;
};

}  // namespace kvmem
