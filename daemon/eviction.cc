#include "daemon/eviction.h"

#include <algorithm>
#include <mutex>
#include <vector>

#include "common/units.h"
#include "daemon/kv_pool.h"
#include "daemon/session.h"

namespace kvmem {

bool TierContext::TryReserveHost(uint64_t bytes) {
  uint64_t used = host_used_.load(std::memory_order_relaxed);
  do {
    if (used + bytes > options_.host_memory_bytes) return false;
  } while (!host_used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  return true;
}

EvictResult EvictLeastRecentlySelected(std::span<const std::shared_ptr<Session>> sessions,
                                       Tier from, uint64_t bytes, Session* self,
                                       const std::string& tenant, bool self_in_op) {
  EvictResult r;
  if (bytes == 0) return r;
  // Lock what can be locked without waiting: a session busy on another executor is skipped
  // (its blocks are in use right now anyway), so no lock order is needed.
  std::vector<std::unique_lock<std::mutex>> locks;
  std::vector<EvictionCandidate> cands;
  bool self_listed = false;
  for (const auto& s : sessions) {
    if (!tenant.empty() && s->tenant() != tenant) continue;
    if (s.get() == self) {
      self_listed = true;
      s->CollectEvictable(from, self_in_op, &cands);
      continue;
    }
    std::unique_lock<std::mutex> lock(s->op_mu(), std::try_to_lock);
    if (!lock.owns_lock()) continue;
    s->CollectEvictable(from, /*running_op=*/false, &cands);
    locks.push_back(std::move(lock));
  }
  if (self != nullptr && !self_listed && (tenant.empty() || self->tenant() == tenant)) {
    self->CollectEvictable(from, self_in_op, &cands);  // e.g. a session being restored, not registered yet
  }
  std::sort(cands.begin(), cands.end(), [](const EvictionCandidate& a, const EvictionCandidate& b) {
    return a.tick < b.tick;
  });
  const Tier to = from == Tier::kDevice ? Tier::kHost : Tier::kDisk;
  for (const EvictionCandidate& c : cands) {
    if (r.bytes >= bytes) break;
    auto freed = c.session->Evict(c, to);
    if (!freed.ok()) {
      r.last_error = freed.status();
      continue;
    }
    r.bytes += *freed;
    if (*freed > 0) r.blocks++;
  }
  return r;
}

Status MakeDeviceRoom(std::span<const std::shared_ptr<Session>> sessions, const TierContext& tiers,
                      Session* self, uint64_t bytes) {
  const SlabAllocator& a = tiers.pool()->allocator();
  const double low = tiers.options().low_watermark * static_cast<double>(a.capacity_bytes());
  const double over = static_cast<double>(a.allocated_bytes() + bytes) - low;
  const uint64_t target = std::max<uint64_t>(bytes, over > 0 ? static_cast<uint64_t>(over) : 0);
  EvictResult r = EvictLeastRecentlySelected(sessions, Tier::kDevice, target, self, "");
  if (r.bytes >= bytes) return Status::OK();
  return ResourceExhausted("eviction freed " + FormatBytes(r.bytes) + " of " + FormatBytes(bytes) +
                           " (the rest is sinks, recent windows, tails or in use)" +
                           (r.last_error.ok() ? std::string() : "; last error: " + r.last_error.ToString()));
}

}  // namespace kvmem
