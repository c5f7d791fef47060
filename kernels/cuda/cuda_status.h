// The one translation point from cudaError_t to Status (with file and line).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common/status.h"

namespace kvmem::kernels::cuda::detail {

inline Status FromCuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e == cudaSuccess) return Status::OK();
  std::string msg = std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                    ") at " + file + ":" + std::to_string(line);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver ||
      e == cudaErrorDevicesUnavailable) {
    return Unavailable(std::move(msg));
  }
  if (e == cudaErrorMemoryAllocation) return ResourceExhausted(std::move(msg));
  if (e == cudaErrorInvalidValue || e == cudaErrorInvalidConfiguration) {
    return InvalidArgument(std::move(msg));
  }
  return Internal(std::move(msg));
}

}  // namespace kvmem::kernels::cuda::detail

#define KVMEM_CUDA_RETURN_IF_ERROR(expr)                                                     \
  do {                                                                                       \
    const cudaError_t _kvmem_ce = (expr);                                                    \
    if (_kvmem_ce != cudaSuccess) {                                                          \
      return ::kvmem::kernels::cuda::detail::FromCuda(_kvmem_ce, #expr, __FILE__, __LINE__); \
    }                                                                                        \
  } while (0)

// After a launch: configuration errors are reported synchronously by cudaGetLastError.
#define KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED(name) KVMEM_CUDA_RETURN_IF_ERROR(cudaGetLastError())
