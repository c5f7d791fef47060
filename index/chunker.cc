#include "index/chunker.h"

#include <algorithm>
#include <string>

namespace kvmem::index {

Chunker::Chunker(ChunkerOptions options) : options_(options) {}

Status Chunker::Validate(const ChunkerOptions& o) {
  if (o.min_tokens < 1 || o.min_tokens > o.max_tokens || o.max_tokens > 4096) {
    return InvalidArgument("chunker: need 1 <= min_tokens (" + std::to_string(o.min_tokens) +
                           ") <= max_tokens (" + std::to_string(o.max_tokens) + ") <= 4096");
  }
  return Status::OK();
}

uint32_t Chunker::NextCut() const {
  const size_t avail = pending_.size() - head_;
  if (avail < options_.min_tokens) return 0;
  const size_t limit = std::min<size_t>(avail, options_.max_tokens);
  uint8_t best = 0;
  uint32_t best_len = 0;
  for (size_t len = options_.min_tokens; len <= limit; ++len) {
    const uint8_t c = std::min(pending_[head_ + len - 1], kMaxBoundaryClass);
    if (c > best) {
      best = c;
      best_len = static_cast<uint32_t>(len);
      if (best == kMaxBoundaryClass) return best_len;  // nothing stronger can follow
    }
  }
  if (avail < options_.max_tokens) return 0;  // a stronger boundary may still arrive
  return best > 0 ? best_len : options_.max_tokens;
}

void Chunker::Push(std::span<const uint8_t> classes, std::vector<uint32_t>* sealed) {
  pending_.insert(pending_.end(), classes.begin(), classes.end());
  for (uint32_t len = NextCut(); len != 0; len = NextCut()) {
    sealed->push_back(len);
    head_ += len;
    sealed_tokens_ += len;
  }
  // Compact once the consumed prefix dominates, keeping Push amortised O(n).
  if (head_ > 0 && head_ >= pending_.size() / 2) {
    pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(head_));
    head_ = 0;
  }
}

uint32_t Chunker::SealTail() {
  const uint32_t n = tail_tokens();
  sealed_tokens_ += n;
  pending_.clear();
  head_ = 0;
  return n;
}

}  // namespace kvmem::index
