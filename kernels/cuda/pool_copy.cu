// CopySegments (kernels/cuda_ops.h): many device-to-device copies in one launch, for the device
// pool's batched copies (an append's rows from a staged upload, a seal's rows from the tail into
// chunk blocks, the tail's shift). One block per segment at a time (grid-stride over segments);
// a block moves its segment in steps of blockDim.x 16-byte words, every thread loading its word
// before any stores (one barrier between), so a segment whose destination overlaps its own
// source is copied as memmove would: forward when the destination is below the source,
// backward when above.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

__global__ void TrapKernel() { __trap(); }

}  // namespace

Status CopySegments(const CopySegment* segments, uint32_t count, void* stream) {
  if (count == 0) return Status::OK();
  const uint32_t grid = count < 1024u ? count : 1024u;
  CopySegmentsKernel<<<grid, kCopyThreads, 0, static_cast<cudaStream_t>(stream)>>>(segments, count);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("CopySegments");
  return Status::OK();
}

Status LaunchTrap(void* stream) {
  TrapKernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>();
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("LaunchTrap");
  return Status::OK();
}

namespace {
constexpr size_t kSegmentBytes = 64 << 10;  // a longer copy is several segments (blocks)
size_t Round16(size_t x) { return (x + 15) / 16 * 16; }
}  // namespace

CopyStager::~CopyStager() {
  if (in_flight_) cudaEventSynchronize(static_cast<cudaEvent_t>(event_));
  if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
  if (pinned_) cudaFreeHost(pinned_);
  if (dev_) cudaFree(dev_);
}

Status CopyStager::Wait() {
  if (!in_flight_) return Status::OK();
  KVMEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)));
  in_flight_ = false;
  return Status::OK();
}

Status CopyStager::ReservePinned(size_t bytes) {
  if (bytes <= cap_) return Status::OK();
  const size_t cap = std::max(bytes, cap_ * 2);
  void* p = nullptr;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&p, cap, cudaHostAllocDefault));
  if (used_ > 0) std::memcpy(p, pinned_, used_);
  if (pinned_) cudaFreeHost(pinned_);
  pinned_ = static_cast<uint8_t*>(p);
  cap_ = cap;
  return Status::OK();
}

Status CopyStager::Add(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return Status::OK();
  KVMEM_RETURN_IF_ERROR(Wait());
  const size_t at = Round16(used_);
  KVMEM_RETURN_IF_ERROR(ReservePinned(at + bytes));
  std::memcpy(pinned_ + at, src, bytes);
  used_ = at + bytes;
  for (size_t from = 0; from < bytes; from += kSegmentBytes) {
    segs_.push_back({reinterpret_cast<uint64_t>(dst) + from, at + from, std::min(kSegmentBytes, bytes - from)});
    staged_src_.push_back(1);
  }
  return Status::OK();
}

void CopyStager::AddDevice(void* dst, const void* src, size_t bytes, bool overlapping) {
  const size_t piece = overlapping ? bytes : kSegmentBytes;  // bytes > 0 whenever the loop runs
  for (size_t from = 0; from < bytes; from += piece) {
    segs_.push_back({reinterpret_cast<uint64_t>(dst) + from, reinterpret_cast<uint64_t>(src) + from,
                     std::min(piece, bytes - from)});
    staged_src_.push_back(0);
  }
}

Status CopyStager::Flush(void* stream) {
  if (segs_.empty()) return Status::OK();
  auto s = static_cast<cudaStream_t>(stream);
  KVMEM_RETURN_IF_ERROR(Wait());  // only device copies were added since the last flush
  const size_t seg_at = Round16(used_);
  const size_t total = seg_at + segs_.size() * sizeof(CopySegment);
  KVMEM_RETURN_IF_ERROR(ReservePinned(total));
  if (total > dev_cap_) {
    KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));  // earlier launches may read it
    const size_t cap = std::max(total, dev_cap_ * 2);
    if (dev_) KVMEM_CUDA_RETURN_IF_ERROR(cudaFree(dev_));
    dev_ = nullptr;
    dev_cap_ = 0;
    KVMEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&dev_, cap));
    dev_cap_ = cap;
  }
  const uint64_t dev = reinterpret_cast<uint64_t>(dev_);
  auto* out = reinterpret_cast<CopySegment*>(pinned_ + seg_at);
  for (size_t i = 0; i < segs_.size(); ++i) {
    out[i] = segs_[i];
    if (staged_src_[i]) out[i].src += dev;
  }
  if (event_ == nullptr) {
    cudaEvent_t e = nullptr;
    KVMEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    event_ = e;
  }
  const uint32_t n = static_cast<uint32_t>(segs_.size());
  segs_.clear();
  staged_src_.clear();
  used_ = 0;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev_, pinned_, total, cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(static_cast<cudaEvent_t>(event_), s));
  in_flight_ = true;
  return CopySegments(reinterpret_cast<const CopySegment*>(static_cast<uint8_t*>(dev_) + seg_at), n, stream);
}

}  // namespace kvmem::kernels::cuda
