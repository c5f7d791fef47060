#include "daemon/kv_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/memcopy.h"
#include "common/units.h"
#include "daemon/parallel.h"

namespace kvmem {

SlabAllocator::SlabAllocator(const Options& o, ReleaseFn on_release)
    : slab_bytes_(o.slab_bytes),
      num_slabs_(o.capacity_bytes / o.slab_bytes),
      on_release_(std::move(on_release)),
      slabs_(num_slabs_),
      is_warm_(num_slabs_, false),
      retain_slabs_(o.retain_bytes / o.slab_bytes) {}

Result<std::unique_ptr<SlabAllocator>> SlabAllocator::Create(const Options& o, ReleaseFn fn) {
  if (o.slab_bytes < (64u << 10) || !std::has_single_bit(o.slab_bytes)) {
    return InvalidArgument("slab_bytes must be a power of two >= 64 KiB");
  }
  if (o.capacity_bytes < o.slab_bytes) {
    return InvalidArgument("pool capacity " + FormatBytes(o.capacity_bytes) +
                           " is smaller than one slab (" + FormatBytes(o.slab_bytes) + ")");
  }
  if (o.capacity_bytes / o.slab_bytes > (1u << 30)) return InvalidArgument("too many slabs");
  return std::unique_ptr<SlabAllocator>(new SlabAllocator(o, std::move(fn)));
}

uint64_t SlabAllocator::ClassBytes(uint64_t bytes) const {
  if (bytes == 0) bytes = 1;
  if (bytes <= 512) return (bytes + 63) / 64 * 64;
  // Eight classes per doubling: step = 2^(floor(log2(bytes-1)) - 3).
  const int e = 63 - std::countl_zero(bytes - 1);
  const uint64_t step = uint64_t{1} << (e - 3);
  return (bytes + step - 1) / step * step;
}

uint64_t SlabAllocator::ReservedBytes(uint64_t bytes) const {
  const uint64_t c = ClassBytes(bytes);
  if (c <= slab_bytes_ / 4) return c;
  return (bytes + slab_bytes_ - 1) / slab_bytes_ * slab_bytes_;
}

Result<uint32_t> SlabAllocator::TakeSlabRun(uint32_t count) {
  if (count == 1 && !warm_.empty()) {  // resident memory first: no page faults
    const uint32_t i = warm_.back();
    warm_.pop_back();
    is_warm_[i] = false;
    ++slabs_used_;
    return i;
  }
  // First fit from a rotating hint; the slab table is small (capacity / slab size).
  const uint32_t n = static_cast<uint32_t>(num_slabs_);
  for (uint32_t pass = 0; pass < 2; ++pass) {
    uint32_t start = pass == 0 ? search_hint_ : 0;
    uint32_t end = pass == 0 ? n : std::min(search_hint_ + count, n);
    uint32_t run = 0;
    for (uint32_t i = start; i < end; ++i) {
      const Slab& s = slabs_[i];
      const bool free = s.class_bytes == 0 && s.run_slabs == 0 && !s.run_tail && !is_warm_[i];
      run = free ? run + 1 : 0;
      if (run == count) {
        const uint32_t first = i + 1 - count;
        search_hint_ = (i + 1) % n;
        slabs_used_ += count;
        return first;
      }
    }
  }
  if (!warm_.empty()) {  // resident free slabs block a long run: give them back and retry
    for (uint32_t i : warm_) {
      is_warm_[i] = false;
      if (on_release_) on_release_(uint64_t{i} * slab_bytes_, slab_bytes_);
    }
    warm_.clear();
    return TakeSlabRun(count);
  }
  return ResourceExhausted("KV pool full: no run of " + std::to_string(count) +
                           " free slab(s) of " + FormatBytes(slab_bytes_) + " in " +
                           FormatBytes(capacity_bytes()));
}

void SlabAllocator::ReleaseSlabRun(uint32_t first, uint32_t count) {
  for (uint32_t i = first; i < first + count; ++i) slabs_[i] = Slab{};
  slabs_used_ -= count;
  if (count == 1 && warm_.size() < retain_slabs_) {
    warm_.push_back(first);
    is_warm_[first] = true;
    return;
  }
  if (on_release_) on_release_(uint64_t{first} * slab_bytes_, uint64_t{count} * slab_bytes_);
}

uint64_t SlabAllocator::ReleaseRetained() {
  std::lock_guard<std::mutex> lock(mu_);
  for (uint32_t i : warm_) {
    is_warm_[i] = false;
    if (on_release_) on_release_(uint64_t{i} * slab_bytes_, slab_bytes_);
  }
  const uint64_t bytes = warm_.size() * slab_bytes_;
  warm_.clear();
  return bytes;
}

Result<uint64_t> SlabAllocator::Allocate(uint64_t bytes) {
  if (bytes > capacity_bytes()) {
    return ResourceExhausted("block of " + FormatBytes(bytes) + " exceeds the KV pool (" +
                             FormatBytes(capacity_bytes()) + ")");
  }
  const uint64_t cls = ClassBytes(bytes);
  allocations_.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(mu_);
  if (cls > slab_bytes_ / 4) {
    const uint32_t count = static_cast<uint32_t>((bytes + slab_bytes_ - 1) / slab_bytes_);
    KVMEM_ASSIGN_OR_RETURN(uint32_t first, TakeSlabRun(count));
    slabs_[first].run_slabs = count;
    slabs_[first].class_bytes = uint64_t{count} * slab_bytes_;
    for (uint32_t i = first + 1; i < first + count; ++i) slabs_[i].run_tail = true;
    allocated_ += uint64_t{count} * slab_bytes_;
    ++live_;
    return uint64_t{first} * slab_bytes_;
  }
  SizeClass& sc = classes_[cls];
  uint32_t slab_index;
  if (sc.partial.empty()) {
    KVMEM_ASSIGN_OR_RETURN(slab_index, TakeSlabRun(1));
    Slab& s = slabs_[slab_index];
    s.class_bytes = cls;
    const uint32_t slots = static_cast<uint32_t>(slab_bytes_ / cls);
    s.free_slots.resize(slots);
    for (uint32_t i = 0; i < slots; ++i) s.free_slots[i] = slots - 1 - i;  // pop low first
    sc.partial.push_back(slab_index);
  }
  slab_index = sc.partial.back();
  Slab& s = slabs_[slab_index];
  const uint32_t slot = s.free_slots.back();
  s.free_slots.pop_back();
  ++s.used;
  if (s.free_slots.empty()) sc.partial.pop_back();
  allocated_ += cls;
  ++live_;
  return uint64_t{slab_index} * slab_bytes_ + uint64_t{slot} * cls;
}

void SlabAllocator::Free(uint64_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t index = offset / slab_bytes_;
  if (index >= num_slabs_) {
    assert(false && "SlabAllocator::Free: offset outside the arena");
    return;
  }
  Slab& s = slabs_[index];
  if (s.run_slabs > 0) {
    assert(offset % slab_bytes_ == 0);
    allocated_ -= s.class_bytes;
    --live_;
    ReleaseSlabRun(static_cast<uint32_t>(index), s.run_slabs);
    return;
  }
  if (s.class_bytes == 0 || s.run_tail || s.used == 0) {
    assert(false && "SlabAllocator::Free: not a live block");
    return;
  }
  const uint64_t cls = s.class_bytes;
  const uint32_t slot = static_cast<uint32_t>((offset % slab_bytes_) / cls);
  SizeClass& sc = classes_[cls];
  if (s.free_slots.empty()) sc.partial.push_back(static_cast<uint32_t>(index));
  s.free_slots.push_back(slot);
  --s.used;
  allocated_ -= cls;
  --live_;
  if (s.used == 0) {
    sc.partial.erase(std::find(sc.partial.begin(), sc.partial.end(), static_cast<uint32_t>(index)));
    ReleaseSlabRun(static_cast<uint32_t>(index), 1);
  }
}

uint64_t SlabAllocator::allocated_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return allocated_;
}
uint64_t SlabAllocator::slabs_in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return slabs_used_;
}
uint64_t SlabAllocator::live_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_;
}

static Status NonFiniteInput() { return InvalidArgument("keys or values contain NaN or Inf"); }

Status KVPool::CheckHostSources(std::span<const PoolCopy> ops, std::optional<DType> reject_non_finite) {
  if (!reject_non_finite) return Status::OK();
  const size_t es = DTypeSize(*reject_non_finite);
  for (const PoolCopy& op : ops) {
    if (op.src != nullptr && HasNonFinite(op.src, *reject_non_finite, op.bytes / es)) return NonFiniteInput();
  }
  return Status::OK();
}

Status KVPool::CopyBatch(std::span<const PoolCopy> ops, ParallelPool* /*workers*/,
                         std::optional<DType> reject_non_finite) {
  KVMEM_RETURN_IF_ERROR(CheckHostSources(ops, reject_non_finite));
  for (const PoolCopy& op : ops) {
    KVMEM_RETURN_IF_ERROR(op.src != nullptr ? CopyIn(op.dst, op.src, op.bytes)
                                            : CopyWithin(op.dst, op.src_offset, op.bytes));
  }
  return Status::OK();
}

Status KVPool::CopyOutBatch(std::span<const PoolRead> reads) {
  for (const PoolRead& r : reads) KVMEM_RETURN_IF_ERROR(CopyOut(r.dst, r.src_offset, r.bytes));
  return Status::OK();
}

Status KVPool::MoveWithin(std::span<const PoolCopy> ops) {
  for (const PoolCopy& op : ops) {
    if (op.src != nullptr) return InvalidArgument("MoveWithin: a copy from host memory");
    KVMEM_RETURN_IF_ERROR(CopyWithin(op.dst, op.src_offset, op.bytes));
  }
  return Status::OK();
}

namespace {

// A batch this large is split over the workers (below it the fork-join costs more than it saves).
constexpr uint64_t kParallelCopyBytes = 256ull << 10;

// KVMEM_APPEND_FENCE=piece: a store fence after every piece, as before one per thread and batch
// (for A/B runs of the benchmark in one call; bench/README.md).
bool FencePerPiece() {
  static const bool per_piece = [] {
    const char* e = std::getenv("KVMEM_APPEND_FENCE");
    return e != nullptr && std::string_view(e) == "piece";
  }();
  return per_piece;
}

class HostPool final : public KVPool {
 public:
  HostPool(void* base, uint64_t mapped) : mapped_(mapped) { base_ = base; }
  ~HostPool() override { munmap(base_, mapped_); }

  Status Init(const SlabAllocator::Options& o) {
    auto* base = static_cast<uint8_t*>(base_);
    KVMEM_ASSIGN_OR_RETURN(allocator_, SlabAllocator::Create(o, [base](uint64_t off, uint64_t n) {
                             madvise(base + off, n, MADV_DONTNEED);
                           }));
    return Status::OK();
  }

  bool is_host() const override { return true; }
  Status CopyIn(uint64_t dst, const void* src, uint64_t bytes) override {
    std::memcpy(static_cast<uint8_t*>(base_) + dst, src, bytes);
    return Status::OK();
  }
  Status CopyOut(void* dst, uint64_t src, uint64_t bytes) override {
    std::memcpy(dst, static_cast<const uint8_t*>(base_) + src, bytes);
    return Status::OK();
  }
  Status CopyWithin(uint64_t dst, uint64_t src, uint64_t bytes) override {
    std::memmove(static_cast<uint8_t*>(base_) + dst, static_cast<uint8_t*>(base_) + src, bytes);
    return Status::OK();
  }
  Status CopyBatch(std::span<const PoolCopy> ops, ParallelPool* workers,
                   std::optional<DType> reject_non_finite) override {
    auto* base = static_cast<uint8_t*>(base_);
    std::atomic<bool> bad{false};
    const bool per_piece = FencePerPiece();
    auto run = [&](size_t a, size_t b) {
      bool found = false;
      for (size_t i = a; i < b; ++i) {
        const PoolCopy& op = ops[i];
        const uint8_t* src = op.src != nullptr ? static_cast<const uint8_t*>(op.src) : base + op.src_offset;
        if (op.src != nullptr && reject_non_finite) {
          found |= per_piece ? StreamingCopyChecked(base + op.dst, src, op.bytes, *reject_non_finite)
                             : StreamingCopyCheckedUnfenced(base + op.dst, src, op.bytes, *reject_non_finite);
        } else if (per_piece) {
          StreamingCopy(base + op.dst, src, op.bytes);
        } else {
          StreamingCopyUnfenced(base + op.dst, src, op.bytes);
        }
      }
      // One store fence per thread and batch, not per piece (common/memcopy.h); the pool's join
      // (or this return) then publishes the rows.
      StreamingFence();
      if (found) bad.store(true, std::memory_order_relaxed);
    };
    uint64_t total = 0;
    for (const PoolCopy& op : ops) total += op.bytes;
    const uint32_t parts = workers == nullptr ? 1 : workers->threads() + 1;
    if (parts == 1 || total < kParallelCopyBytes || ops.size() < parts) {
      run(0, ops.size());
      return bad.load() ? NonFiniteInput() : Status::OK();
    }
    // Contiguous ranges of ops with about equal bytes, one per thread.
    std::vector<size_t> cut(parts + 1, ops.size());
    cut[0] = 0;
    uint64_t acc = 0;
    uint32_t next = 1;
    for (size_t i = 0; i < ops.size() && next < parts; ++i) {
      acc += ops[i].bytes;
      if (acc * parts >= total * next) cut[next++] = i + 1;
    }
    workers->For(parts, [&](uint32_t p) { run(cut[p], cut[p + 1]); });
    return bad.load() ? NonFiniteInput() : Status::OK();
  }
  Status Attend(kernels::AttendProblem* problems, uint32_t count, ParallelPool* workers) override {
    std::vector<std::pair<uint32_t, uint32_t>> heads;  // (problem, KV head)
    for (uint32_t i = 0; i < count; ++i) {
      problems[i].pool = base_;
      KVMEM_RETURN_IF_ERROR(kernels::ValidateAttendProblem(problems[i]));
      for (uint32_t h = 0; h < problems[i].kv_heads; ++h) heads.emplace_back(i, h);
    }
    auto one = [&](uint32_t j) { kernels::AttendCpuBlockedHead(problems[heads[j].first], heads[j].second); };
    if (workers != nullptr && workers->threads() > 0 && heads.size() > 1) {
      workers->For(static_cast<uint32_t>(heads.size()), one);
    } else {
      for (uint32_t j = 0; j < heads.size(); ++j) one(j);
    }
    return Status::OK();
  }
  std::string Describe() const override { return "cpu"; }

 private:
  uint64_t mapped_;
};

}  // namespace

Result<std::unique_ptr<KVPool>> CreateHostPool(const SlabAllocator::Options& o) {
  void* p = mmap(nullptr, o.capacity_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    return ResourceExhausted("cannot reserve " + FormatBytes(o.capacity_bytes) +
                             " of address space for the host KV pool: " + std::strerror(errno));
  }
  // Transparent huge pages where the kernel allows them (THP "madvise" mode): one fault per 2 MiB
  // instead of 512 while an append fills fresh memory, and fewer TLB misses for attention.
  // Releasing a 1 MiB slab (MADV_DONTNEED) splits its huge page; that is correct, merely slower.
  (void)madvise(p, o.capacity_bytes, MADV_HUGEPAGE);
  auto pool = std::make_unique<HostPool>(p, o.capacity_bytes);
  KVMEM_RETURN_IF_ERROR(pool->Init(o));
  return std::unique_ptr<KVPool>(std::move(pool));
}

Status KVPool::SyncTrees(std::span<const TreeSync>) {
  return Unimplemented("device tree search needs the CUDA backend (pool: " + Describe() + ")");
}

Status KVPool::SearchAttend(DeviceSearchRequest*, DeviceSearchReply*) {
  return Unimplemented("device tree search needs the CUDA backend (pool: " + Describe() + ")");
}

Status KVPool::PooledBlockScores(const kernels::PooledBlockScoresView&) {
  return Unimplemented("device block scan needs the CUDA backend (pool: " + Describe() + ")");
}

Status KVPool::TokenLogits(const kernels::TokenLogitsView&) {
  return Unimplemented("device rescoring logits need the CUDA backend (pool: " + Describe() + ")");
}

bool IsFatalCudaError(int code) {
  switch (code) {
    case 214:  // cudaErrorECCUncorrectable
    case 700:  // cudaErrorIllegalAddress
    case 702:  // cudaErrorLaunchTimeout
    case 710:  // cudaErrorAssert
    case 714:  // cudaErrorHardwareStackError
    case 715:  // cudaErrorIllegalInstruction
    case 716:  // cudaErrorMisalignedAddress
    case 717:  // cudaErrorInvalidAddressSpace
    case 718:  // cudaErrorInvalidPc
    case 719:  // cudaErrorLaunchFailure
      return true;
    default:
      return false;
  }
}

}  // namespace kvmem
