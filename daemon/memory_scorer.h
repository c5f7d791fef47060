// Learned gate scorers for memory blocks, loaded from a safetensors weights file
// through common/tensor_file.h. Two forms, both affine in the gate key k for a fixed query q, so
// SelectMemory searches them exactly through the gate tree with t(q) (daemon/memory_store.h):
//
//   linear    score = w_key·k + (w_query_key ⊙ q)·k + w_query·q + bias
//             tensors: w_key [D] and/or w_query_key [D]; optional w_query [D], bias [] or [1]
//             t(q) = w_key + w_query_key ⊙ q,   b(q) = w_query·q + bias
//   bilinear  score = qᵀ W k + v·k + u·q + bias
//             tensors: W [D, D] (rows: query dims, columns: key dims); optional v [D], u [D],
//             bias [] or [1]
//             t(q) = Wᵀ q + v,                  b(q) = u·q + bias
//
// D is the session's gate_dim. Weights may be F32, F16 or BF16 (anything tensor_file converts);
// they must be finite. A file holding W is bilinear, otherwise linear.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "daemon/memory_store.h"

namespace kvmem {

// INVALID_ARGUMENT naming the file and tensor for a missing / mis-shaped / non-finite weight;
// the reader's error for an unreadable or malformed file.
Result<std::shared_ptr<const MemoryScorer>> LoadMemoryScorer(const std::string& path,
                                                             uint32_t gate_dim);

// Where a session's scorer_file lives: `name` relative to `dir`, no "..", not absolute.
// FAILED_PRECONDITION when dir is empty (the daemon allows no session-named files).
Result<std::string> ResolveScorerPath(const std::string& dir, const std::string& name);

}  // namespace kvmem
