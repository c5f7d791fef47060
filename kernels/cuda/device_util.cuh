// Small device helpers shared by the CUDA kernels: dtype loads/stores, 16-byte streaming loads,
// warp reductions. Internal to kernels/cuda.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"

namespace kvmem::kernels::cuda {

// Clusters of `cluster` blocks (of `threads` threads, `dyn_smem` bytes of dynamic shared memory
// each) of `kernel` that the device runs at once (cudaOccupancyMaxActiveClusters); 0 on an error.
template <typename Kernel>
int MaxActiveClusters(Kernel kernel, uint32_t cluster, uint32_t threads, size_t dyn_smem) {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
  cfg.gridDim = dim3(cluster);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = dyn_smem;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

__device__ __forceinline__ size_t DTypeSizeDevice(DType t) { return t == DType::kF32 ? 4 : 2; }

// The GPU's global nanosecond timer (%globaltimer), for the kernels' diagnostics.
__device__ __forceinline__ uint64_t GlobalTimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// Element i of an array of E (float, __half or __nv_bfloat16) as a float.
template <typename E>
__device__ __forceinline__ float LoadAs(const void* p, size_t i) {
  if constexpr (std::is_same_v<E, float>) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (std::is_same_v<E, __half>) {
    return __half2float(static_cast<const __half*>(p)[i]);
  } else {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

// Elements i and i + 1 (i even, p aligned to two elements) as floats, with one load.
template <typename E>
__device__ __forceinline__ float2 LoadPairAs(const void* p, size_t i) {
  if constexpr (std::is_same_v<E, float>) {
    return static_cast<const float2*>(p)[i / 2];
  } else if constexpr (std::is_same_v<E, __half>) {
    return __half22float2(static_cast<const __half2*>(p)[i / 2]);
  } else {
    return __bfloat1622float2(static_cast<const __nv_bfloat162*>(p)[i / 2]);
  }
}

// f(E{}) with E the element type of `t`. For loads of a runtime dtype: the branch is taken once,
// outside f, so f's loads are independent and all in flight together (LoadElem's switch per
// element kept each load behind the previous one: one memory round trip per element).
template <typename F>
__device__ __forceinline__ void WithElemType(DType t, F&& f) {
  switch (t) {
    case DType::kF32:
      f(float{});
      return;
    case DType::kF16:
      f(__half{});
      return;
    case DType::kBF16:
      f(__nv_bfloat16{});
      return;
  }
}

__device__ __forceinline__ float LoadElem(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  return 0.f;
}

__device__ __forceinline__ void StoreElem(void* p, DType t, size_t i, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::kF16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    case DType::kBF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
  }
}

template <typename KV>
__device__ __forceinline__ float ToFloat(KV x);
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float ToFloat<__half>(__half x) {
  return __half2float(x);
}

// Read-once data: skip L1, ask L2 for 256-byte prefetch.
__device__ __forceinline__ uint4 LoadStreaming(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// Asks L2 to fetch the 16-byte units inside [p, p + bytes) (a hint: cp.async.bulk.prefetch, no
// completion to wait for, no fault past what is asked), in kPiece pieces spread over `workers`
// threads, `me` being this one. Only whole units inside the range are asked for.
__device__ __forceinline__ void PrefetchL2(const void* p, size_t bytes, uint32_t me, uint32_t workers) {
  constexpr size_t kPiece = 16 * 1024;
  if (p == nullptr) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + 15) & ~uintptr_t{15}, hi = (a + bytes) & ~uintptr_t{15};
  if (hi <= lo) return;
  for (uintptr_t x = lo + size_t{me} * kPiece; x < hi; x += size_t{workers} * kPiece) {
    const uint32_t n = static_cast<uint32_t>(hi - x < kPiece ? hi - x : kPiece);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(x), "r"(n) : "memory");
  }
}

// 8 packed 16-bit elements to float.
template <typename KV>
__device__ __forceinline__ void Unpack8(const uint4& r, float* f);

template <>
__device__ __forceinline__ void Unpack8<__nv_bfloat16>(const uint4& r, float* f) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void Unpack8<__half>(const uint4& r, float* f) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 x = __half22float2(h);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

__device__ __forceinline__ float WarpMax(float x) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

}  // namespace kvmem::kernels::cuda
