// Boundary-aware streaming chunker (LycheeCluster §chunking).
//
// Input: one boundary class per token (0 none, 1 word, 2 clause, 3 sentence end,
// 4 line/structural, 5 section), meaning "a cut is allowed right after this token, with this
// strength". A chunk starting at token s ends after the token in [s+min-1, s+max-1] with the
// strongest class, the earliest among equals; when every candidate is class 0 the cut is forced
// at max tokens. The decision for a chunk needs at most `max_tokens` classes (or stops early at
// a class-5 boundary, which nothing can beat), so the result does not depend on how tokens are
// batched: pushing all at once or one by one seals the same chunks.
//
// The open tail (tokens not yet sealed) stays unsealed until enough classes arrive.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"

namespace kvmem::index {

inline constexpr uint8_t kMaxBoundaryClass = 5;

struct ChunkerOptions {
  // Shortest chunk. Default: 8 (see docs/architecture.md for the measurement behind it).
  uint32_t min_tokens = 8;
  // Longest chunk; a cut is forced here. Default: 24.
  uint32_t max_tokens = 24;
};

class Chunker {
 public:
  explicit Chunker(ChunkerOptions options = {});

  // OK when 1 <= min_tokens <= max_tokens <= 4096.
  static Status Validate(const ChunkerOptions& options);

  // Feeds the classes of the next tokens; appends the length of every chunk sealed by them to
  // *sealed (in order). Classes above 5 are treated as 5.
  void Push(std::span<const uint8_t> classes, std::vector<uint32_t>* sealed);

  // Seals the whole tail as one final chunk (if non-empty), ignoring min_tokens; returns its
  // length or 0. Used when a session is finalised, never on the decode path.
  uint32_t SealTail();

  // Restore: the state of a chunker that has sealed exactly `sealed_tokens` tokens and holds no
  // tail (a cut depends only on the classes after the previous cut, so this is exact).
  void ResumeAt(uint64_t sealed_tokens) {
    pending_.clear();
    head_ = 0;
    sealed_tokens_ = sealed_tokens;
  }

  uint64_t sealed_tokens() const { return sealed_tokens_; }
  uint32_t tail_tokens() const { return static_cast<uint32_t>(pending_.size() - head_); }
  // Classes of the tail tokens, oldest first.
  std::span<const uint8_t> tail_classes() const {
    return std::span<const uint8_t>(pending_.data() + head_, pending_.size() - head_);
  }
  const ChunkerOptions& options() const { return options_; }

 private:
  // Returns the length of the next chunk if it can be decided now, else 0.
  uint32_t NextCut() const;

  ChunkerOptions options_;
  std::vector<uint8_t> pending_;  // classes of the tail, from index head_
  size_t head_ = 0;
  uint64_t sealed_tokens_ = 0;
};

}  // namespace kvmem::index
