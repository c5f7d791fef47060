// The token set one (layer, KV head) attends: sinks ∪ selected chunks ∪ tail.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "index/cluster_tree.h"

namespace kvmem::index {

struct TokenRange {
  uint64_t begin = 0;  // first token
  uint64_t end = 0;    // one past the last
  friend bool operator==(const TokenRange&, const TokenRange&) = default;
};

// Sorted, disjoint, merged ranges covering [0, min(sink_tokens, context_tokens)) ∪ the selected
// chunks' tokens ∪ the tail [tree.total_tokens(), context_tokens). Selected tokens inside the
// sinks are counted once (the sinks own them). InvalidArgument for an unknown or repeated chunk
// id, or context_tokens < tree.total_tokens() (the tail cannot be negative).
Result<std::vector<TokenRange>> AttendedTokens(const ClusterTree& tree,
                                               std::span<const uint32_t> selected_chunks,
                                               uint32_t sink_tokens, uint64_t context_tokens);

// Total tokens in the ranges.
uint64_t CountTokens(std::span<const TokenRange> ranges);

}  // namespace kvmem::index
