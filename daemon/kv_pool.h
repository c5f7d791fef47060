// The KV pool: one arena per device taken at start, carved by a slab allocator into
// chunk-granular blocks (docs/architecture.md, "Device store").
//
// SlabAllocator is metadata only (byte offsets into an arena of known size), so the same code
// serves host memory (CPU backend) and device memory (CUDA backend). Small blocks come from
// size classes (8 per doubling, <= 12.5% internal waste) packed into fixed-size slabs; blocks
// larger than a quarter slab take a run of whole slabs. A slab whose blocks are all freed goes
// back to the arena (and, for host memory, its pages back to the OS).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "kernels/attention.h"
#include "kernels/cuda_ops.h"
#include "kernels/index_ops.h"

namespace kvmem {

class SlabAllocator {
 public:
  struct Options {
    // Arena size in bytes (rounded down to whole slabs). Default: 0 (must be set).
    uint64_t capacity_bytes = 0;
    // Slab size; a power of two >= 64 KiB. Default: 4 MiB.
    uint64_t slab_bytes = 4ull << 20;
    // Freed single slabs kept resident (reused first, before cold ones) up to this many bytes;
    // beyond it freed slabs are released (ReleaseFn). Keeps steady-state appends free of page
    // faults while memory still returns after a large drop. Default: 256 MiB.
    uint64_t retain_bytes = 256ull << 20;
  };

  // Called with (offset, bytes) of a slab range that became entirely free.
  using ReleaseFn = std::function<void(uint64_t offset, uint64_t bytes)>;

  static Result<std::unique_ptr<SlabAllocator>> Create(const Options& options,
                                                       ReleaseFn on_release = nullptr);

  // A 64-byte aligned block of at least `bytes`. RESOURCE_EXHAUSTED when the arena is full.
  Result<uint64_t> Allocate(uint64_t bytes);
  // Frees a block returned by Allocate. Freeing anything else is a programming error (checked).
  void Free(uint64_t offset);

  // Size actually reserved for a request of `bytes` (its class size or slab run).
  uint64_t ReservedBytes(uint64_t bytes) const;

  uint64_t capacity_bytes() const { return num_slabs_ * slab_bytes_; }
  uint64_t allocated_bytes() const;  // sum of reserved sizes of live blocks
  uint64_t slabs_in_use() const;
  uint64_t live_blocks() const;
  // Allocations so far (an idle detector compares two readings).
  uint64_t allocation_count() const { return allocations_.load(std::memory_order_relaxed); }
  // Releases every retained (warm) free slab now (ReleaseFn); returns the bytes released. For
  // idle periods: the next allocations page-fault again, memory goes back to the system.
  uint64_t ReleaseRetained();

 private:
  SlabAllocator(const Options& options, ReleaseFn on_release);

  struct Slab {
    uint64_t class_bytes = 0;  // 0: free; for a run, the run's total bytes (head slab only)
    uint32_t run_slabs = 0;    // >0 on the head slab of a large run
    bool run_tail = false;     // a non-head slab of a run
    uint32_t used = 0;         // live blocks in a class slab
    std::vector<uint32_t> free_slots;
  };
  struct SizeClass {
    std::vector<uint32_t> partial;  // slab indices with free slots
  };

  uint64_t ClassBytes(uint64_t bytes) const;
  Result<uint32_t> TakeSlabRun(uint32_t count);
  void ReleaseSlabRun(uint32_t first, uint32_t count);

  const uint64_t slab_bytes_;
  const uint64_t num_slabs_;
  ReleaseFn on_release_;
  mutable std::mutex mu_;
  std::vector<Slab> slabs_;            // guarded by mu_
  std::unordered_map<uint64_t, SizeClass> classes_;  // guarded by mu_
  uint64_t allocated_ = 0;             // guarded by mu_
  uint64_t live_ = 0;                  // guarded by mu_
  uint64_t slabs_used_ = 0;            // guarded by mu_
  uint32_t search_hint_ = 0;           // guarded by mu_
  std::vector<uint32_t> warm_;         // free slabs still resident, LIFO; guarded by mu_
  std::vector<bool> is_warm_;          // guarded by mu_
  const uint64_t retain_slabs_;
  std::atomic<uint64_t> allocations_{0};
};

// Index-mode attention of one (session, layer) with the cluster-tree search on the device
// (KVPool::SearchAttend): every KV head searches its DeviceTree and attends sinks ∪ selection ∪
// recent window ∪ tail, with no host step between search and attention.
struct DeviceSearchRequest {
  // attend.q / attend.out / attend.lse are HOST pointers (the pool stages them); attend.pool is
  // filled in by the pool; trees (host array of device views) and chunk_block (device) by the
  // caller.
  kernels::cuda::SearchAttendProblem problem;
  bool want_selection = false;  // also copy back the selected chunk ids and scores
  // A decode step's new K and V rows (HOST, [kv_heads][head_dim] each, kv dtype) for the
  // tail's last row, or null: they go up with q and the search writes them (problem.new_k /
  // new_v are filled in by the pool).
  const void* new_k = nullptr;
  const void* new_v = nullptr;
};

struct DeviceSearchReply {
  std::vector<kernels::cuda::SearchTaskResult> heads;  // per KV head
  uint32_t max_selected = 0;                           // row length of selected / scores
  std::vector<uint32_t> selected;                      // [kv_heads][max_selected] (if asked)
  std::vector<float> scores;
};

class ParallelPool;

// One copy of a batch: from host memory `src`, or (src == nullptr) from pool offset `src_offset`.
struct PoolCopy {
  uint64_t dst = 0;
  const void* src = nullptr;
  uint64_t src_offset = 0;
  uint64_t bytes = 0;
};

// One read out of the pool into host memory (KVPool::CopyOutBatch).
struct PoolRead {
  void* dst = nullptr;
  uint64_t src_offset = 0;
  uint64_t bytes = 0;
};

// Memory behind a SlabAllocator, with the copies the store needs. The host implementation is
// the CPU backend's "device"; a CUDA implementation issues async copies on a stream: copies in
// and within return once enqueued (the source may be reused), copies out once done, and every
// later copy and launch of the pool runs after them.
class KVPool {
 public:
  virtual ~KVPool() = default;

  Result<uint64_t> Allocate(uint64_t bytes) { return allocator_->Allocate(bytes); }
  void Free(uint64_t offset) { allocator_->Free(offset); }
  SlabAllocator& allocator() { return *allocator_; }

  // Base address of the arena (device pointer on the CUDA backend).
  void* base() const { return base_; }
  virtual bool is_host() const = 0;

  // Copies between host memory and the pool, and within the pool.
  virtual Status CopyIn(uint64_t dst_offset, const void* src, uint64_t bytes) = 0;
  virtual Status CopyOut(void* dst, uint64_t src_offset, uint64_t bytes) = 0;
  virtual Status CopyWithin(uint64_t dst_offset, uint64_t src_offset, uint64_t bytes) = 0;
  // Many independent copies (no destination overlaps another op's source or destination), e.g.
  // an append filling its chunk blocks. The default runs them in order; the host pool streams
  // them past the cache and, when `workers` is given and the batch is large, spreads them over
  // the workers. With `reject_non_finite`, copies from host memory are also checked for NaN /
  // Inf elements of that type: INVALID_ARGUMENT if any (destinations are then garbage).
  virtual Status CopyBatch(std::span<const PoolCopy> ops, ParallelPool* workers,
                           std::optional<DType> reject_non_finite = std::nullopt);
  // Moves within the pool (every op's src is nullptr): an op's destination may overlap its own
  // source (memmove), not another op's source or destination. The default runs CopyWithin in
  // order; the device pool does the batch in one upload and one launch.
  virtual Status MoveWithin(std::span<const PoolCopy> ops);
  // Many reads out of the pool, done when it returns. The default runs CopyOut in order; the
  // device pool enqueues them all into pinned staging and waits once (a seal's catch-up reads
  // the new chunk's keys of every layer).
  virtual Status CopyOutBatch(std::span<const PoolRead> reads);

  // Decode attention for problems whose spans index this pool. q, out and lse are HOST
  // pointers; `pool` is filled in here. The host pool runs the CPU kernel
  // (kernels::AttendCpuBlocked), its (problem, KV head) pairs spread over `workers` when given;
  // a device pool stages q to the device, launches one kernel for all problems and copies
  // out/lse back (`workers` unused). Problems in one call must share dtypes, head_dim and GQA
  // group.
  virtual Status Attend(kernels::AttendProblem* problems, uint32_t count, ParallelPool* workers) = 0;
  // Attend for one dense problem (head_span_begin null) of a decode stream, with the plan its
  // caller keeps for it from call to call and the caller's `key`, which changes whenever any
  // span but the last may have: a device pool patches the kept plan when only the last span
  // (the tail) grew since (kernels::cuda::PlanAttendDenseStep). The default is Attend.
  virtual Status AttendDense(kernels::AttendProblem* problem, ParallelPool* workers,
                             kernels::cuda::DenseAttendPlanCache* /*kept*/, uint64_t /*key*/) {
    return Attend(problem, 1, workers);
  }

  // The device search (CUDA pool only): SyncTrees brings device mirrors of cluster trees up
  // to date, each from its export (ClusterTree::ExportFlat from tree->chunks_held()), all of
  // their uploads in one staged copy and launch; SearchAttend runs search + attention in two
  // launches and copies out, lse and the per-head results back. UNIMPLEMENTED on pools
  // without it.
  struct TreeSync {
    kernels::cuda::DeviceTree* tree;
    const kernels::FlatTree* flat;
  };
  virtual bool has_device_search() const { return false; }
  virtual Status SyncTrees(std::span<const TreeSync> syncs);
  virtual Status SearchAttend(DeviceSearchRequest* request, DeviceSearchReply* reply);

  // Retrieval heads' block scores (kernels/index_ops.h) over keys in this pool, every head of
  // v.heads in one launch: q, spans, span_prefix, heads and scores are HOST pointers, `pool` is
  // filled in here. The device pool stages the inputs, launches kernels::cuda::PooledBlockScores
  // and copies the scores back (num_heads × blocks floats: 4 bytes per block of keys), then
  // returns. UNIMPLEMENTED on pools without it (the caller scores staged keys on the host).
  virtual Status PooledBlockScores(const kernels::PooledBlockScoresView& v);

  // Exact rescoring's token logits (kernels/index_ops.h) over keys in this pool, every item in
  // one launch: q, spans, item_head, token_prefix and logits are HOST pointers, `pool` is filled
  // in here. The device pool stages the inputs, launches kernels::cuda::TokenLogits and copies
  // the logits back (total_tokens × G floats), then returns. UNIMPLEMENTED on pools without it
  // (the caller reads the candidates' keys out and computes them on the host).
  virtual Status TokenLogits(const kernels::TokenLogitsView& v);

  // "cpu" or e.g. "cuda:0 NVIDIA H200".
  virtual std::string Describe() const = 0;

 protected:
  // CopyBatch's check of the ops from host memory: INVALID_ARGUMENT when one holds NaN / Inf
  // elements of that type (nothing to check without a type).
  static Status CheckHostSources(std::span<const PoolCopy> ops, std::optional<DType> reject_non_finite);

  void* base_ = nullptr;
  std::unique_ptr<SlabAllocator> allocator_;
};

// Host memory pool: an anonymous mapping reserved up front (MAP_NORESERVE), pages committed on
// first touch and returned to the OS when their slab empties.
Result<std::unique_ptr<KVPool>> CreateHostPool(const SlabAllocator::Options& options);

// Device memory pool on CUDA device `device`: the arena is one cudaMalloc taken at start.
// UNAVAILABLE when the build has no CUDA or no GPU is visible. Tests (kvmemd
// --fault-device-trap-flag): while the file `fault_trap_flag` exists, each device attention
// first launches a kernel that traps, a real fault that leaves the CUDA context unusable.
Result<std::unique_ptr<KVPool>> CreateDevicePool(const SlabAllocator::Options& options, int device,
                                                 std::string fault_trap_flag = {});

// Number of CUDA devices visible (0 without CUDA in the build).
int CudaDeviceCount();

// Whether device pools submit the device search as CUDA graph replays (kvmemd's environment,
// read once: not with KVMEM_DEVICE_SUBMIT=copy, KVMEM_DEVICE_TIMELINE=1 or KVMEM_DEVICE_INLINE=on;
// false without CUDA in the build).
bool DeviceGraphSubmit();

// Whether a CUDA runtime error (a cudaError_t value) leaves the CUDA context unusable until the
// process restarts, so that every later CUDA call fails too: an illegal address, instruction or
// address space in a kernel, a misaligned address, a failed or timed-out launch, a device-side
// assert, a hardware stack error, an uncorrectable ECC error. A device pool that sees one counts
// it (kvmem_device_failures_total) and kvmemd stops reporting ready (on_device_failure).
bool IsFatalCudaError(int code);

}  // namespace kvmem
