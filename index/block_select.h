// Retrieval-head selection rules (LycheeDecode): which scored blocks a retrieval KV head keeps.
//
// A retrieval head scores its context in blocks (kernels::PooledBlockScores; block_tokens = 1
// is token level) with its GQA group's mean query. A rule then keeps blocks:
//   kTopK       the `k` best blocks (the daemon derives k from the token budget)
//   kRatio      the ⌈value · n⌉ best blocks, value in (0, 1]
//   kThreshold  every block whose probability p_j ≥ value, value in (0, 1)
//   kTopP       the fewest best blocks whose probabilities sum to ≥ value, value in (0, 1]
// with p = softmax(scale · scores) over the n blocks (scale = 1/sqrt(head_dim) makes p the
// attention mass the mean query would put on each block's pooled key). Probabilities make
// threshold and top-p independent of the scores' scale. Every rule keeps at least one block
// when n > 0 (the best one), so a retrieval head always hands its sparse heads a selection.
// Ranking is by score descending, ties by the lower block index, NaN below every number.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"

namespace kvmem::index {

enum class BlockRule : uint8_t { kTopK = 0, kRatio = 1, kThreshold = 2, kTopP = 3 };

struct BlockRuleOptions {
  // Default: kTopK.
  BlockRule rule = BlockRule::kTopK;
  // kTopK: blocks kept (0 keeps one). Default: 32.
  uint32_t k = 32;
  // kRatio / kThreshold / kTopP parameter (see above); unused by kTopK. Default: 0.9.
  float value = 0.9f;
  // Softmax scale for kThreshold / kTopP. Default: 1 / sqrt(128).
  float scale = 0.08838834764831845f;
};

// INVALID_ARGUMENT naming the rule when `value` is outside its range, or scale is not a
// positive finite number.
Status ValidateBlockRule(const BlockRuleOptions& o);

// Indices of the kept blocks, best first. `scores` may be empty (then nothing is kept).
std::vector<uint32_t> SelectBlocks(std::span<const float> scores, const BlockRuleOptions& o);

// "top_k", "ratio", "threshold", "top_p".
const char* BlockRuleName(BlockRule r);

}  // namespace kvmem::index
