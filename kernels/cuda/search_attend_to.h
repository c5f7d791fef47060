// LaunchSearchAttend with the per-task results written to a caller's address (kept out of
// kernels/cuda_ops.h so that only its two users depend on it).
#pragma once

#include "kernels/cuda_ops.h"

namespace kvmem::kernels::cuda {

// As LaunchSearchAttend, but the search writes its SearchTaskResult per task to `results`
// (device-writable: device memory, or mapped pinned host memory so that nothing has to be
// copied back) instead of the workspace at plan.results_off.
Status LaunchSearchAttendTo(const SearchAttendPlan& plan, void* workspace,
                            SearchTaskResult* results, void* stream);

// Bytes of q + plan image an inline launch carries (kernel parameters are limited to 32 KB).
constexpr size_t kSearchInlineBytes = 28 * 1024;

// As LaunchSearchAttendTo with nothing uploaded before it: q (q_bytes at q_host, bound for
// q_dev, where the plan's q pointers point) and the plan image travel in the search kernel's
// parameters; the search copies q to q_dev, writes the attention's items and zeroes its merge
// counters. *launched = false (and nothing enqueued) when they do not fit kSearchInlineBytes or
// the plan has more than one problem's q; the caller then uploads and uses LaunchSearchAttendTo.
Status LaunchSearchAttendInline(const SearchAttendPlan& plan, void* workspace, const void* q_host,
                                size_t q_bytes, void* q_dev, SearchTaskResult* results,
                                void* stream, bool* launched);

}  // namespace kvmem::kernels::cuda
