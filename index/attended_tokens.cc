#include "index/attended_tokens.h"

#include <algorithm>
#include <string>

namespace kvmem::index {

Result<std::vector<TokenRange>> AttendedTokens(const ClusterTree& tree,
                                               std::span<const uint32_t> selected_chunks,
                                               uint32_t sink_tokens, uint64_t context_tokens) {
  if (context_tokens < tree.total_tokens()) {
    return InvalidArgument("attended tokens: context of " + std::to_string(context_tokens) +
                           " tokens is shorter than the " + std::to_string(tree.total_tokens()) +
                           " sealed ones");
  }
  std::vector<TokenRange> ranges;
  ranges.reserve(selected_chunks.size() + 2);
  const uint64_t sinks = std::min<uint64_t>(sink_tokens, context_tokens);
  if (sinks > 0) ranges.push_back({0, sinks});
  std::vector<bool> used(tree.num_chunks(), false);
  for (uint32_t c : selected_chunks) {
    if (c >= tree.num_chunks()) {
      return InvalidArgument("attended tokens: unknown chunk " + std::to_string(c));
    }
    if (used[c]) return InvalidArgument("attended tokens: chunk " + std::to_string(c) + " twice");
    used[c] = true;
    const uint64_t begin = std::max(tree.chunk_start(c), sinks);
    const uint64_t end = tree.chunk_start(c) + tree.chunk_tokens(c);
    if (begin < end) ranges.push_back({begin, end});
  }
  if (tree.total_tokens() < context_tokens) {
    ranges.push_back({std::max(tree.total_tokens(), sinks), context_tokens});
    if (ranges.back().begin >= ranges.back().end) ranges.pop_back();
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const TokenRange& a, const TokenRange& b) { return a.begin < b.begin; });
  std::vector<TokenRange> merged;
  for (const TokenRange& r : ranges) {
    if (!merged.empty() && r.begin <= merged.back().end) {
      merged.back().end = std::max(merged.back().end, r.end);
    } else {
      merged.push_back(r);
    }
  }
  return merged;
}

uint64_t CountTokens(std::span<const TokenRange> ranges) {
  uint64_t n = 0;
  for (const TokenRange& r : ranges) n += r.end - r.begin;
  return n;
}

}  // namespace kvmem::index
