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

// Where the plan image starts in a mapped launch's source buffer: [q (q_bytes) | image].
size_t SearchMappedImageOffset(size_t q_bytes);

// As LaunchSearchAttendTo with nothing uploaded before it: the search reads q and the plan image
// from mapped pinned host memory, src_dev (its device address) = [q (q_bytes) | plan image at
// SearchMappedImageOffset(q_bytes)], which the caller keeps unchanged until the launches have
// completed; it copies each task's q to q_dev (where the plan's q pointers point), writes the
// attention's items and zeroes its merge counters. *launched = false (and nothing enqueued)
// unless task t's q is at q_dev + t * (group x head_dim q values), one problem's q as the daemon
// plans; the caller then uploads and uses LaunchSearchAttendTo.
Status LaunchSearchAttendMapped(const SearchAttendPlan& plan, void* workspace, const void* q_dev,
                                size_t q_bytes, const void* src_dev, SearchTaskResult* results,
                                void* stream, bool* launched);

}  // namespace kvmem::kernels::cuda
