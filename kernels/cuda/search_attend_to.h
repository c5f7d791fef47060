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

}  // namespace kvmem::kernels::cuda
