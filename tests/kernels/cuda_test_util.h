// Shared by the CUDA parity tests: skip without a GPU, check CUDA calls and Status results.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "common/status.h"
#include "kernels/cuda_ops.h"

#define SKIP_WITHOUT_GPU()                                                         \
  do {                                                                             \
    if (::kvmem::kernels::cuda::DeviceCount() == 0)                                \
      GTEST_SKIP() << "no CUDA device visible: parity test skipped";               \
  } while (0)

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr
#define ST_OK(expr)                                         \
  do {                                                      \
    const ::kvmem::Status _s = (expr);                      \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s.ToString(); \
  } while (0)
