// CopySegments (kernels/cuda_ops.h): many device-to-device copies in one launch, for the device
// pool's batched copies (an append's rows from a staged upload, a seal's rows from the tail into
// chunk blocks, the tail's shift). One block per segment at a time (grid-stride over segments);
// a block moves its segment in steps of blockDim.x 16-byte words, every thread loading its word
// before any stores (one barrier between), so a segment whose destination overlaps its own
// source is copied as memmove would: forward when the destination is below the source,
// backward when above.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda_ops.h"

namespace kvmem::kernels::cuda {
namespace {

constexpr int kCopyThreads = 256;

template <typename W>
__device__ void MoveSegment(uint8_t* dst, const uint8_t* src, uint64_t bytes) {
  const uint64_t words = bytes / sizeof(W);
  const uint64_t step = kCopyThreads;
  const uint64_t steps = (words + step - 1) / step;
  const bool backward = dst > src && dst < src + bytes;  // overlapping, destination above
  auto* d = reinterpret_cast<W*>(dst);
  const auto* s = reinterpret_cast<const W*>(src);
  for (uint64_t k = 0; k < steps; ++k) {
    const uint64_t i = (backward ? steps - 1 - k : k) * step + threadIdx.x;
    W w{};
    if (i < words) w = s[i];
    __syncthreads();  // every load of this step before any store of it
    if (i < words) d[i] = w;
    __syncthreads();  // and every store before the next step's loads
  }
}

__global__ void __launch_bounds__(kCopyThreads) CopySegmentsKernel(const CopySegment* segs, uint32_t n) {
  for (uint32_t k = blockIdx.x; k < n; k += gridDim.x) {
    const CopySegment g = segs[k];
    auto* dst = reinterpret_cast<uint8_t*>(g.dst);
    const auto* src = reinterpret_cast<const uint8_t*>(g.src);
    if (((g.dst | g.src | g.bytes) & 15u) == 0) {
      MoveSegment<uint4>(dst, src, g.bytes);
    } else {
      MoveSegment<uint8_t>(dst, src, g.bytes);
    }
  }
}

}  // namespace

Status CopySegments(const CopySegment* segments, uint32_t count, void* stream) {
  if (count == 0) return Status::OK();
  const uint32_t grid = count < 1024u ? count : 1024u;
  CopySegmentsKernel<<<grid, kCopyThreads, 0, static_cast<cudaStream_t>(stream)>>>(segments, count);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("CopySegments");
  return Status::OK();
}

}  // namespace kvmem::kernels::cuda
