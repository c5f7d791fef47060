// The CUDA device pool: one cudaMalloc arena, copies on the pool's stream, and span attention
// through kernels::cuda (plan on the host, one upload, one launch, copy back).
//
// Copies into the pool and within it are only enqueued (the stream orders them before every
// later launch and copy); a batch of them is one upload and one launch (CopySegments). Copies
// out wait for the stream. KVMEM_DEVICE_COPIES=sync: every copy synchronous and one at a time,
// as before (for A/B runs).
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/units.h"
#include "daemon/graph_cache.h"
#include "daemon/kv_pool.h"
#include "daemon/metrics.h"
#include "kernels/cuda/search_attend_to.h"
#include "kernels/cuda_ops.h"

namespace kvmem {
namespace {

static_assert(cudaErrorECCUncorrectable == 214 && cudaErrorIllegalAddress == 700 &&
                  cudaErrorLaunchTimeout == 702 && cudaErrorAssert == 710 &&
                  cudaErrorHardwareStackError == 714 && cudaErrorIllegalInstruction == 715 &&
                  cudaErrorMisalignedAddress == 716 && cudaErrorInvalidAddressSpace == 717 &&
                  cudaErrorInvalidPc == 718 && cudaErrorLaunchFailure == 719,
              "IsFatalCudaError (kv_pool.cc) lists these codes by value");

// An error that left the context unusable: counted in kvmem_device_failures_total, which
// kvmemd's health check turns into not ready (or an exit, on_device_failure), and said so, since
// every later device operation fails the same way (Cuda(), DevicePool::Kernels()).
Status ContextLost(const std::string& msg) {
  GlobalMetrics().device_failures++;
  return Internal(msg + " (the GPU context is unusable until kvmemd restarts)");
}

// A CUDA error as a Status; one that leaves the context unusable (IsFatalCudaError) through
// ContextLost.
Status Cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::OK();
  const std::string msg = std::string(what) + ": " + cudaGetErrorString(e);
  return IsFatalCudaError(static_cast<int>(e)) ? ContextLost(msg) : Internal(msg);
}

// Bytes rounded up to 256: every section of a staging buffer starts 256-byte aligned.
size_t Room(size_t bytes) { return (bytes + 255) / 256 * 256; }

class DevicePool final : public KVPool {
 public:
  ~DevicePool() override {
    graphs_.Clear();
    for (cudaEvent_t e : events_) {
      if (e) cudaEventDestroy(e);
    }
    if (stream_) cudaStreamSynchronize(stream_);
    if (stream_) cudaStreamDestroy(stream_);
    if (pinned_) cudaFreeHost(pinned_);
    if (mapped_) cudaFreeHost(mapped_);
    for (void* p : {base_, d_io_, d_ws_, d_sws_, d_scan_})
      if (p) cudaFree(p);
  }

  Status Init(const SlabAllocator::Options& o, int device, std::string fault_trap_flag) {
    device_ = device;
    fault_trap_flag_ = std::move(fault_trap_flag);
    KVMEM_RETURN_IF_ERROR(Cuda(cudaSetDevice(device), "cudaSetDevice"));
    cudaDeviceProp prop{};
    KVMEM_RETURN_IF_ERROR(Cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
    name_ = prop.name;
    KVMEM_RETURN_IF_ERROR(Cuda(cudaMalloc(&base_, o.capacity_bytes),
                               ("cudaMalloc of the " + FormatBytes(o.capacity_bytes) + " KV arena").c_str()));
    KVMEM_RETURN_IF_ERROR(Cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
    KVMEM_ASSIGN_OR_RETURN(allocator_, SlabAllocator::Create(o));
    return Status::OK();
  }

  bool is_host() const override { return false; }
  std::string Describe() const override { return "cuda:" + std::to_string(device_) + " " + name_; }

  // From pageable host memory: cudaMemcpyAsync returns once it has staged `src`, so the caller
  // may reuse it; the copy itself runs in stream order.
  Status CopyIn(uint64_t dst, const void* src, uint64_t bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    if (SyncCopies()) {
      return Synchronous([&] { return cudaMemcpy(static_cast<uint8_t*>(base_) + dst, src, bytes, cudaMemcpyHostToDevice); },
                         "copy in");
    }
    return Cuda(cudaMemcpyAsync(static_cast<uint8_t*>(base_) + dst, src, bytes, cudaMemcpyHostToDevice, stream_),
                "copy in");
  }
  Status CopyOut(void* dst, uint64_t src, uint64_t bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    if (SyncCopies()) {
      return Synchronous([&] { return cudaMemcpy(dst, static_cast<const uint8_t*>(base_) + src, bytes, cudaMemcpyDeviceToHost); },
                         "copy out");
    }
    // After every copy and launch enqueued before it.
    KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(dst, static_cast<const uint8_t*>(base_) + src, bytes,
                                               cudaMemcpyDeviceToHost, stream_), "copy out"));
    return Cuda(cudaStreamSynchronize(stream_), "copy out");
  }
  Status CopyOutBatch(std::span<const PoolRead> reads) override {
    if (SyncCopies()) return KVPool::CopyOutBatch(reads);
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    uint64_t total = 0;
    for (const PoolRead& r : reads) total += Room(r.bytes);
    KVMEM_RETURN_IF_ERROR(GrowPinned(total));
    uint64_t at = 0;
    for (const PoolRead& r : reads) {  // after every copy and launch enqueued before them
      KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(pinned_ + at, static_cast<const uint8_t*>(base_) + r.src_offset,
                                                 r.bytes, cudaMemcpyDeviceToHost, stream_), "copy out"));
      at += Room(r.bytes);
    }
    KVMEM_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "copy out"));
    at = 0;
    for (const PoolRead& r : reads) {
      std::memcpy(r.dst, pinned_ + at, r.bytes);
      at += Room(r.bytes);
    }
    return Status::OK();
  }
  Status CopyWithin(uint64_t dst, uint64_t src, uint64_t bytes) override {
    if (!SyncCopies()) {
      if (dst < src + bytes && src < dst + bytes) {
        const PoolCopy op{dst, nullptr, src, bytes};
        return MoveWithin(std::span<const PoolCopy>(&op, 1));
      }
      std::lock_guard<std::mutex> lock(mu_);
      cudaSetDevice(device_);
      return Cuda(cudaMemcpyAsync(static_cast<uint8_t*>(base_) + dst, static_cast<uint8_t*>(base_) + src, bytes,
                                  cudaMemcpyDeviceToDevice, stream_), "copy within");
    }
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    // Overlapping moves (tail shifts) go through a bounce when the ranges overlap.
    if (dst < src + bytes && src < dst + bytes) {
      KVMEM_RETURN_IF_ERROR(Grow(&d_io_, &io_bytes_, bytes));
      KVMEM_RETURN_IF_ERROR(Synchronous(
          [&] { return cudaMemcpy(d_io_, static_cast<uint8_t*>(base_) + src, bytes, cudaMemcpyDeviceToDevice); },
          "copy within"));
      return Synchronous([&] { return cudaMemcpy(static_cast<uint8_t*>(base_) + dst, d_io_, bytes, cudaMemcpyDeviceToDevice); },
                         "copy within");
    }
    return Synchronous([&] {
      return cudaMemcpy(static_cast<uint8_t*>(base_) + dst, static_cast<uint8_t*>(base_) + src, bytes,
                        cudaMemcpyDeviceToDevice);
    }, "copy within");
  }

  // One upload ([segments | the host ops' rows] through pinned staging) and one CopySegments
  // launch per batch (per 64 MiB of rows), nothing waited for.
  Status CopyBatch(std::span<const PoolCopy> ops, ParallelPool* workers,
                   std::optional<DType> reject_non_finite) override {
    if (SyncCopies()) return KVPool::CopyBatch(ops, workers, reject_non_finite);
    KVMEM_RETURN_IF_ERROR(CheckHostSources(ops, reject_non_finite));
    return Scatter(ops, /*overlapping=*/false);
  }
  Status MoveWithin(std::span<const PoolCopy> ops) override {
    if (SyncCopies()) return KVPool::MoveWithin(ops);
    return Scatter(ops, /*overlapping=*/true);
  }

  Status Attend(kernels::AttendProblem* problems, uint32_t count, ParallelPool* /*workers*/) override {
    return AttendPlanned(problems, count, nullptr, 0);
  }

  // KVMEM_DENSE_PLAN=fresh in kvmemd's environment plans every dense Attend afresh (A/B runs).
  Status AttendDense(kernels::AttendProblem* problem, ParallelPool* /*workers*/,
                     kernels::cuda::DenseAttendPlanCache* kept, uint64_t key) override {
    static const bool fresh = EnvIs("KVMEM_DENSE_PLAN", "fresh");
    return AttendPlanned(problem, 1, fresh ? nullptr : kept, key);
  }

  // Attend, planned into the pool's own plan, or with `kept` (one dense problem) patched or
  // planned into the caller's (PlanAttendDenseStep).
  Status AttendPlanned(kernels::AttendProblem* problems, uint32_t count,
                       kernels::cuda::DenseAttendPlanCache* kept, uint64_t key) {
    if (count == 0) return Status::OK();
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    KVMEM_RETURN_IF_ERROR(MaybeTrap());
    AttendPhaseClock phases;  // sub-phases of host_attend, as of device_search_attend
    // Every q into one device buffer, outputs and lse back through another; q and the plan
    // image go up from pinned staging [q | image | out], so the copies are truly asynchronous
    // (the image of a 128K-token dense layer is ~1.7 MB).
    std::vector<size_t> q_off(count), out_off(count), lse_off(count);
    size_t in_bytes = 0, out_bytes = 0;
    for (uint32_t i = 0; i < count; ++i) {
      const auto& p = problems[i];
      q_off[i] = in_bytes;
      in_bytes += Room(static_cast<size_t>(p.q_heads) * p.head_dim * DTypeSize(p.q_dtype));
      out_off[i] = out_bytes;
      out_bytes += Room(static_cast<size_t>(p.q_heads) * p.head_dim * DTypeSize(p.out_dtype));
      lse_off[i] = out_bytes;
      out_bytes += Room(static_cast<size_t>(p.q_heads) * 4);
    }
    KVMEM_RETURN_IF_ERROR(Grow(&d_io_, &io_bytes_, in_bytes + out_bytes));
    auto* d_in = static_cast<uint8_t*>(d_io_);
    auto* d_out = d_in + in_bytes;
    std::vector<kernels::AttendProblem> dev(problems, problems + count);
    for (uint32_t i = 0; i < count; ++i) {
      dev[i].pool = base_;
      dev[i].q = d_in + q_off[i];
      dev[i].out = d_out + out_off[i];
      dev[i].lse = reinterpret_cast<float*>(d_out + lse_off[i]);
    }
    // A member plan (its image's capacity reused from call to call), or the caller's kept one.
    Status planned;
    if (kept != nullptr) {
      bool patched = false;
      planned = kernels::cuda::PlanAttendDenseStep(dev[0], key, kept, &patched);
      if (planned.ok()) GlobalMetrics().dense_plans[patched ? 1 : 0]++;  // not shapes left to the host
    } else {
      planned = kernels::cuda::PlanAttend(dev.data(), count, {}, &attend_plan_);
    }
    const kernels::cuda::AttendPlan& plan = kept != nullptr ? kept->plan : attend_plan_;
    if (planned.code() == StatusCode::kUnimplemented) return AttendOnHost(problems, count);
    KVMEM_RETURN_IF_ERROR(planned);
    KVMEM_RETURN_IF_ERROR(Grow(&d_ws_, &ws_bytes_, plan.workspace_bytes));
    const size_t image_bytes = plan.image.size();
    KVMEM_RETURN_IF_ERROR(GrowPinned(in_bytes + Room(image_bytes) + out_bytes));
    uint8_t* h_in = pinned_;
    uint8_t* h_image = h_in + in_bytes;
    uint8_t* h_out = h_image + Room(image_bytes);
    for (uint32_t i = 0; i < count; ++i) {
      const auto& p = problems[i];
      std::memcpy(h_in + q_off[i], p.q, static_cast<size_t>(p.q_heads) * p.head_dim * DTypeSize(p.q_dtype));
    }
    std::memcpy(h_image, plan.image.data(), image_bytes);
    phases.Mark(AttendPhase::kDevicePlan);
    KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(d_in, h_in, in_bytes, cudaMemcpyHostToDevice, stream_), "stage q"));
    KVMEM_RETURN_IF_ERROR(
        Cuda(cudaMemcpyAsync(d_ws_, h_image, image_bytes, cudaMemcpyHostToDevice, stream_), "stage the attention plan"));
    KVMEM_RETURN_IF_ERROR(Kernels(kernels::cuda::LaunchAttend(plan, d_ws_, stream_)));
    KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(h_out, d_out, out_bytes, cudaMemcpyDeviceToHost, stream_), "copy out"));
    phases.Mark(AttendPhase::kDeviceLaunch);
    KVMEM_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "attention"));
    phases.Mark(AttendPhase::kDeviceWait);
    for (uint32_t i = 0; i < count; ++i) {
      const auto& p = problems[i];
      std::memcpy(p.out, h_out + out_off[i], static_cast<size_t>(p.q_heads) * p.head_dim * DTypeSize(p.out_dtype));
      if (p.lse) std::memcpy(p.lse, h_out + lse_off[i], static_cast<size_t>(p.q_heads) * 4);
    }
    return Status::OK();
  }

 bool has_device_search() const override { return true; }

  Status SyncTrees(std::span<const TreeSync> syncs) override {
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    if (SyncCopies()) {
      for (const TreeSync& t : syncs) KVMEM_RETURN_IF_ERROR(Kernels(t.tree->Sync(*t.flat, stream_)));
      return Status::OK();
    }
    Status st;
    for (const TreeSync& t : syncs) {
      st = t.tree->Sync(*t.flat, stream_, &stager_);
      if (!st.ok()) break;
    }
    // What was staged goes up even after a failure: the trees before it count it as uploaded.
    Status flushed = stager_.Flush(stream_);
    return Kernels(st.ok() ? flushed : st);
  }

  // One upload of q and the plan image (and a decode step's new K/V rows, which the search
  // writes into the tail; or, with KVMEM_DEVICE_INLINE=on, no new rows and when they fit, q and
  // the image as the search's kernel parameters), the search and the attention launches, one
  // copy back (out + lse, the per-head results [+ selection]), one synchronisation.
  Status SearchAttend(DeviceSearchRequest* req, DeviceSearchReply* reply) override {
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    KVMEM_RETURN_IF_ERROR(MaybeTrap());
    AttendPhaseClock phases;  // sub-phases of device_search_attend
    kernels::cuda::SearchAttendProblem dev = req->problem;
    const kernels::AttendProblem& a = req->problem.attend;
    const size_t q_bytes = size_t{a.q_heads} * a.head_dim * DTypeSize(a.q_dtype);
    const size_t out_bytes = size_t{a.q_heads} * a.head_dim * DTypeSize(a.out_dtype);
    const size_t q_room = Room(q_bytes);
    const size_t out_room = Room(out_bytes);
    const size_t lse_bytes = size_t{a.q_heads} * sizeof(float);
    const size_t lse_room = Room(lse_bytes);
    const size_t res_bytes = size_t{a.kv_heads} * sizeof(kernels::cuda::SearchTaskResult);
    const size_t res_room = Room(res_bytes);
    // A decode step's new K / V rows go up with q (the search writes them into the tail).
    const bool rows = req->new_k != nullptr && req->new_v != nullptr;
    const size_t row_bytes = rows ? size_t{a.kv_heads} * a.head_dim * DTypeSize(a.kv_dtype) : 0;
    const size_t half_rows = Room(row_bytes), rows_room = 2 * half_rows;
    // One device buffer [out | lse | results | new rows | q | workspace]: the new rows, q and
    // the plan image (at the workspace's start) go up in one copy, out, lse and the per-head
    // results come back in one, and neither carries bytes the other direction needs (the image
    // stays on the device).
    const size_t io_room = out_room + lse_room + res_room + rows_room + q_room;
    // KVMEM_DEVICE_RESULTS=mapped: the attention writes out and lse, and the search its
    // per-head results, straight into mapped pinned host memory [out | lse | results]: no copy
    // back. Not for requests that want the selection (that stays in the workspace).
    const bool mapped = MappedResults() && !req->want_selection;
    if (mapped) KVMEM_RETURN_IF_ERROR(GrowMapped(out_room + lse_room + res_bytes));
    uint8_t* m_out = mapped ? mapped_dev_ : nullptr;
    // The plan holds the q / out / lse pointers: plan again when the buffer had to grow.
    kernels::cuda::SearchAttendPlan plan;
    uint8_t* d_in = nullptr;
    for (int pass = 0;; ++pass) {
      if (d_sws_ == nullptr) KVMEM_RETURN_IF_ERROR(Grow(&d_sws_, &sws_bytes_, io_room + (1u << 20)));
      d_in = static_cast<uint8_t*>(d_sws_);
      uint8_t* out_base = mapped ? m_out : d_in;
      dev.attend.pool = base_;
      dev.attend.q = d_in + io_room - q_room;
      dev.new_k = rows ? d_in + io_room - q_room - rows_room : nullptr;
      dev.new_v = rows ? d_in + io_room - q_room - half_rows : nullptr;
      dev.attend.out = out_base;
      dev.attend.lse = reinterpret_cast<float*>(out_base + out_room);
      KVMEM_RETURN_IF_ERROR(kernels::cuda::PlanSearchAttend(&dev, 1, {}, &plan));
      if (io_room + plan.workspace_bytes <= sws_bytes_) break;
      if (pass > 0) return Internal("device search: workspace did not grow");
      KVMEM_RETURN_IF_ERROR(Grow(&d_sws_, &sws_bytes_, io_room + plan.workspace_bytes));
    }
    uint8_t* d_q = d_in + io_room - q_room;
    uint8_t* d_up = d_q - rows_room;  // [new K rows | new V rows | q | plan image]
    uint8_t* d_ws = d_in + io_room;
    auto* d_res = reinterpret_cast<kernels::cuda::SearchTaskResult*>(
        (mapped ? m_out : d_in) + out_room + lse_room);
    // Pinned staging: [new rows | q | plan image] up in one copy, [out | lse | results] down in
    // one (and, when the request wants it, the selection from the workspace in a second), so
    // the copies are truly asynchronous.
    const size_t up = rows_room + q_room + plan.image.size();
    const size_t down = mapped ? 0 : out_room + lse_room + res_bytes;
    const size_t sel_bytes = req->want_selection ? plan.runs_off - plan.selected_off : 0;
    KVMEM_RETURN_IF_ERROR(GrowPinned(Room(up) + Room(down) + sel_bytes + 256));
    uint8_t* h_up = pinned_;  // [new K rows | new V rows | q | plan image]
    uint8_t* h_down = pinned_ + Room(up);
    uint8_t* h_sel = h_down + Room(down);
    // Not with graphs (a replay repeats the parameters it was captured with).
    const bool try_inline = !GraphSubmit() && InlineSubmit() && !rows;
    auto stage = [&] {
      if (rows) {
        std::memcpy(h_up, req->new_k, row_bytes);
        std::memcpy(h_up + half_rows, req->new_v, row_bytes);
      }
      std::memcpy(h_up + rows_room, a.q, q_bytes);
      std::memcpy(h_up + rows_room + q_room, plan.image.data(), plan.image.size());
    };
    if (!try_inline) stage();
    phases.Mark(AttendPhase::kDevicePlan);
    // KVMEM_DEVICE_TIMELINE=1: events around each stream operation (not with graphs).
    const bool timeline = Timeline() && !GraphSubmit() && EnsureEvents().ok();
    const auto t_enqueue = timeline ? std::chrono::steady_clock::now()
                                    : std::chrono::steady_clock::time_point{};
    auto mark = [&](int i) {
      if (timeline) cudaEventRecord(events_[i], stream_);
    };
    auto enqueue = [&]() -> Status {
      mark(0);
      bool launched = false;
      if (try_inline) {
        // q and the plan image as the search's kernel parameters: no upload on the stream.
        mark(1);
        KVMEM_RETURN_IF_ERROR(Kernels(kernels::cuda::LaunchSearchAttendInline(
            plan, d_ws, a.q, q_bytes, d_q, d_res, stream_, &launched)));
      }
      if (!launched) {
        if (try_inline) stage();
        KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(d_up, h_up, up, cudaMemcpyHostToDevice, stream_),
                                   "stage q and the search plan"));
        mark(1);
        KVMEM_RETURN_IF_ERROR(Kernels(kernels::cuda::LaunchSearchAttendTo(plan, d_ws, d_res, stream_)));
      }
      mark(2);
      if (mapped) return Status::OK();
      KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(h_down, d_in, down, cudaMemcpyDeviceToHost, stream_),
                                 "copy out and the search results"));
      if (sel_bytes > 0) {
        KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(h_sel, d_ws + plan.selected_off, sel_bytes,
                                                   cudaMemcpyDeviceToHost, stream_),
                                   "copy the selection"));
      }
      mark(3);
      return Status::OK();
    };
    cudaGraphExec_t exec = nullptr;
    if (GraphSubmit()) {
      // Everything a replay depends on besides the bytes in the pinned staging (which the graph's
      // copy reads when it runs): addresses, sizes, the plan's layout and launch shapes, and the
      // kernel variants chosen when it was captured (the attention's copy path follows its split
      // size, the flat search the trees' sizes: every variant computes the same, so a stale one
      // would only be slower, or fall back to the host search past the flat search's limits).
      const GraphKey key{reinterpret_cast<uint64_t>(d_in), reinterpret_cast<uint64_t>(h_up),
                         reinterpret_cast<uint64_t>(h_down), up, down, q_room, sel_bytes,
                         plan.num_tasks, plan.num_items, plan.max_selected, plan.head_dim,
                         plan.group, static_cast<uint64_t>(plan.kv_dtype),
                         static_cast<uint64_t>(plan.q_dtype), static_cast<uint64_t>(plan.out_dtype),
                         plan.tasks_off, plan.items_off, plan.runs_off, plan.counters_off,
                         plan.results_off, plan.selected_off, plan.scores_off, plan.scratch_off,
                         plan.partials_off, plan.cluster_size, plan.attend_cluster,
                         reinterpret_cast<uint64_t>(d_res), plan.run_source_off,
                         plan.uniform_splits, plan.split_tokens,
                         kernels::cuda::TreeSearchUsesFlat(plan) ? 1u : 0u};
      exec = GraphFor(key, enqueue);
    }
    if (exec != nullptr) {
      KVMEM_RETURN_IF_ERROR(Cuda(cudaGraphLaunch(exec, stream_), "search attend graph"));
    } else {
      GlobalMetrics().device_direct_submits++;
      KVMEM_RETURN_IF_ERROR(enqueue());
    }
    phases.Mark(AttendPhase::kDeviceLaunch);
    KVMEM_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "search attend"));
    phases.Mark(AttendPhase::kDeviceWait);
    if (timeline) ObserveTimeline(t_enqueue, mapped ? 2 : 3);
    if (mapped) {
      std::memcpy(a.out, mapped_, out_bytes);
      if (a.lse) std::memcpy(a.lse, mapped_ + out_room, lse_bytes);
      reply->heads.resize(plan.num_tasks);
      std::memcpy(reply->heads.data(), mapped_ + out_room + lse_room, res_bytes);
      reply->max_selected = plan.max_selected;
      return Status::OK();
    }
    std::memcpy(a.out, h_down, out_bytes);
    if (a.lse) std::memcpy(a.lse, h_down + out_room, lse_bytes);
    reply->heads.resize(plan.num_tasks);
    std::memcpy(reply->heads.data(), h_down + out_room + lse_room, res_bytes);
    reply->max_selected = plan.max_selected;
    if (req->want_selection) {
      const size_t n = size_t{plan.num_tasks} * plan.max_selected;
      reply->selected.resize(n);
      reply->scores.resize(n);
      std::memcpy(reply->selected.data(), h_sel, n * 4);
      std::memcpy(reply->scores.data(), h_sel + (plan.scores_off - plan.selected_off), n * 4);
    }
    return Status::OK();
  }

  // One upload ([q | spans | prefix | heads] through pinned memory), one launch, one copy of
  // the scores back, one synchronisation.
  Status PooledBlockScores(const kernels::PooledBlockScoresView& v) override {
    if (v.num_heads == 0 || v.total_tokens == 0) return Status::OK();
    for (uint32_t i = 0; i < v.num_spans; ++i) {
      if (v.spans[i].offset % 8 != 0) return Unimplemented("device block scan: unaligned span");
    }
    const size_t score_bytes =
        size_t{v.num_heads} * kernels::PooledNumBlocks(v.total_tokens, v.block_tokens) * sizeof(float);
    const std::array<HostSection, 4> in{{{v.q, size_t{v.q_heads} * v.head_dim * sizeof(float)},
                                         {v.spans, size_t{v.num_spans} * sizeof(kernels::KVSpan)},
                                         {v.span_prefix, (size_t{v.num_spans} + 1) * sizeof(uint32_t)},
                                         {v.heads, size_t{v.num_heads} * sizeof(uint32_t)}}};
    return StagedCall(in, v.scores, score_bytes, "block scan", [&](const std::array<uint8_t*, 4>& d, uint8_t* out) {
      kernels::PooledBlockScoresView dv = v;
      dv.pool = base_;
      dv.q = reinterpret_cast<const float*>(d[0]);
      dv.spans = reinterpret_cast<const kernels::KVSpan*>(d[1]);
      dv.span_prefix = reinterpret_cast<const uint32_t*>(d[2]);
      dv.heads = reinterpret_cast<const uint32_t*>(d[3]);
      dv.scores = reinterpret_cast<float*>(out);
      return Kernels(kernels::cuda::PooledBlockScores(dv, stream_));
    });
  }

  // The same shape of call: [q | spans | heads | prefix] up, total_tokens × G logits back.
  Status TokenLogits(const kernels::TokenLogitsView& v) override {
    if (v.num_items == 0 || v.total_tokens == 0) return Status::OK();
    const size_t logit_bytes = size_t{v.total_tokens} * (v.q_heads / v.kv_heads) * sizeof(float);
    const std::array<HostSection, 4> in{{{v.q, size_t{v.q_heads} * v.head_dim * sizeof(float)},
                                         {v.spans, size_t{v.num_items} * sizeof(kernels::KVSpan)},
                                         {v.item_head, size_t{v.num_items} * sizeof(uint32_t)},
                                         {v.token_prefix, (size_t{v.num_items} + 1) * sizeof(uint32_t)}}};
    return StagedCall(in, v.logits, logit_bytes, "rescoring logits", [&](const std::array<uint8_t*, 4>& d, uint8_t* out) {
      kernels::TokenLogitsView dv = v;
      dv.pool = base_;
      dv.q = reinterpret_cast<const float*>(d[0]);
      dv.spans = reinterpret_cast<const kernels::KVSpan*>(d[1]);
      dv.item_head = reinterpret_cast<const uint32_t*>(d[2]);
      dv.token_prefix = reinterpret_cast<const uint32_t*>(d[3]);
      dv.logits = reinterpret_cast<float*>(out);
      return Kernels(kernels::cuda::TokenLogits(dv, stream_));
    });
  }

 private:
  // A small op's call through the scan buffers: the host `in` sections go up in one copy
  // through pinned memory (each at a 256-byte rounded offset), `launch(device sections, device
  // output)` enqueues the kernel, and `out_bytes` come back into `out` after one
  // synchronisation.
  struct HostSection {
    const void* p;
    size_t bytes;
  };
  template <size_t N, typename Launch>
  Status StagedCall(const std::array<HostSection, N>& in, void* out, size_t out_bytes, const char* what,
                    Launch&& launch) {
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    std::array<size_t, N> off{};
    size_t up = 0;
    for (size_t i = 0; i < N; ++i) {
      off[i] = up;
      up += Room(in[i].bytes);
    }
    KVMEM_RETURN_IF_ERROR(Grow(&d_scan_, &scan_bytes_, up + out_bytes));
    KVMEM_RETURN_IF_ERROR(GrowPinned(up + out_bytes));
    auto* d = static_cast<uint8_t*>(d_scan_);
    std::array<uint8_t*, N> dev{};
    for (size_t i = 0; i < N; ++i) {
      std::memcpy(pinned_ + off[i], in[i].p, in[i].bytes);
      dev[i] = d + off[i];
    }
    KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(d, pinned_, up, cudaMemcpyHostToDevice, stream_), what));
    KVMEM_RETURN_IF_ERROR(launch(dev, d + up));
    KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(pinned_ + up, d + up, out_bytes, cudaMemcpyDeviceToHost, stream_), what));
    KVMEM_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), what));
    std::memcpy(out, pinned_ + up, out_bytes);
    return Status::OK();
  }

  // Shapes the CUDA kernel does not cover (fp32 K/V, head_dim other than 64/128, ...): copy the
  // attended rows to the host and run the CPU kernel. Correct, slow; for completeness only.
  Status AttendOnHost(kernels::AttendProblem* problems, uint32_t count) {
    // The rows' copies below run on the legacy stream, which does not wait for the pool's
    // (non-blocking) stream: the uploads enqueued there first.
    KVMEM_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "attend on host"));
    for (uint32_t pi = 0; pi < count; ++pi) {
      kernels::AttendProblem& p = problems[pi];
      const uint64_t esize = DTypeSize(p.kv_dtype), D = p.head_dim, H = p.kv_heads;
      std::vector<kernels::KVSpan> spans;
      std::vector<uint32_t> head_begin(1, 0);
      std::vector<uint64_t> offsets;
      uint64_t total = 0;  // elements
      for (uint32_t h = 0; h < H; ++h) {
        uint32_t first, last;
        kernels::HeadSpans(p, h, &first, &last);
        for (uint32_t i = first; i < last; ++i) {
          const uint64_t n = p.spans[i].end - p.spans[i].begin;
          offsets.push_back(total);
          spans.push_back({total, static_cast<uint32_t>(n), 0, static_cast<uint32_t>(n)});
          total += 2 * H * n * D;
        }
        head_begin.push_back(static_cast<uint32_t>(spans.size()));
      }
      std::vector<uint8_t> host(total * esize);
      size_t k = 0;
      for (uint32_t h = 0; h < H; ++h) {
        uint32_t first, last;
        kernels::HeadSpans(p, h, &first, &last);
        for (uint32_t i = first; i < last; ++i, ++k) {
          const kernels::KVSpan& s = p.spans[i];
          const uint64_t n = s.end - s.begin;
          const uint64_t src_k = s.offset + (uint64_t{h} * s.stride_tokens + s.begin) * D;
          const uint64_t src_v = src_k + H * s.stride_tokens * D;
          const uint64_t dst_k = offsets[k] + uint64_t{h} * n * D;
          const uint64_t dst_v = offsets[k] + H * n * D + uint64_t{h} * n * D;
          // mu_ is held by Attend: copy directly.
          const auto* base = static_cast<const uint8_t*>(base_);
          KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpy(host.data() + dst_k * esize, base + src_k * esize, n * D * esize,
                                                cudaMemcpyDeviceToHost), "copy out"));
          KVMEM_RETURN_IF_ERROR(Cuda(cudaMemcpy(host.data() + dst_v * esize, base + src_v * esize, n * D * esize,
                                                cudaMemcpyDeviceToHost), "copy out"));
        }
      }
      kernels::AttendProblem hp = p;
      hp.pool = host.data();
      hp.spans = spans.data();
      hp.head_span_begin = head_begin.data();
      hp.num_spans = static_cast<uint32_t>(spans.size());
      KVMEM_RETURN_IF_ERROR(kernels::ValidateAttendProblem(hp));
      kernels::AttendCpuBlocked(&hp, 1);
    }
    return Status::OK();
  }

  // Scatter flushes once this many bytes of host rows are staged (after the op that reaches it).
  static constexpr size_t kScatterGroupBytes = size_t{64} << 20;

  // ops' copies through the stager (kernels::cuda::CopyStager): their host rows staged in
  // pinned memory, then one upload and one CopySegments launch per kScatterGroupBytes of rows.
  // `overlapping`: each op's destination may overlap its own source (moved as one segment).
  Status Scatter(std::span<const PoolCopy> ops, bool overlapping) {
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    auto* base = static_cast<uint8_t*>(base_);
    for (const PoolCopy& op : ops) {
      if (op.src != nullptr) {
        if (Status st = stager_.Add(base + op.dst, op.src, op.bytes); !st.ok()) {
          stager_.Clear();  // the caller drops the batch (and may free its destinations)
          return st;
        }
      } else {
        stager_.AddDevice(base + op.dst, base + op.src_offset, op.bytes, overlapping);
      }
      if (stager_.staged_bytes() >= kScatterGroupBytes) KVMEM_RETURN_IF_ERROR(Kernels(stager_.Flush(stream_)));
    }
    return Kernels(stager_.Flush(stream_));
  }
  static bool SyncCopies() {
    static const bool on = EnvIs("KVMEM_DEVICE_COPIES", "sync");
    return on;
  }
  // A legacy-stream cudaMemcpy made synchronous both ways (KVMEM_DEVICE_COPIES=sync): after all
  // work on the pool's stream, which the legacy stream does not wait for (the stream is
  // non-blocking), and finished before anything enqueued after it (from pageable memory
  // cudaMemcpy may return before its DMA lands; device to device it returns at once).
  template <typename Copy>
  Status Synchronous(Copy copy, const char* what) {
    KVMEM_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), what));
    KVMEM_RETURN_IF_ERROR(Cuda(copy(), what));
    return Cuda(cudaStreamSynchronize(cudaStreamLegacy), what);
  }

  // Whether kvmemd's environment sets `name` to `value` (the A/B switches below, read once).
  static bool EnvIs(const char* name, const char* value) {
    const char* e = std::getenv(name);
    return e != nullptr && std::strcmp(e, value) == 0;
  }
  // The device search's upload, two launches and copy back are captured into a CUDA graph per
  // layout (the attention's programmatic dependency becomes a programmatic edge) and replayed
  // with one cudaGraphLaunch (GraphFor). The default since session 24 (at 128K batch 1 five
  // interleaved e2e rounds gave 63.4-72.8 us, mean 66.1, against 68.6-71.0, mean 70.2, enqueued
  // directly). KVMEM_DEVICE_SUBMIT=copy in kvmemd's environment enqueues the four calls on the
  // stream instead; so do the two diagnostics that need them enqueued (KVMEM_DEVICE_TIMELINE=1,
  // KVMEM_DEVICE_INLINE=on).
  friend bool ::kvmem::DeviceGraphSubmit();
  static bool GraphSubmit() {
    static const bool on = [] {
      const char* e = std::getenv("KVMEM_DEVICE_SUBMIT");
      const bool copy = e != nullptr && std::strcmp(e, "copy") == 0;
      if (e != nullptr && *e != 0 && !copy && std::strcmp(e, "graph") != 0) {
        std::fprintf(stderr, "kvmem: KVMEM_DEVICE_SUBMIT=%s is neither graph nor copy; using graph\n", e);
      }
      return !copy && !Timeline() && !InlineSubmit();
    }();
    return on;
  }
  static bool Timeline() {
    static const bool on = EnvIs("KVMEM_DEVICE_TIMELINE", "1");
    return on;
  }
  Status EnsureEvents() {
    for (cudaEvent_t& e : events_) {
      if (e == nullptr) KVMEM_RETURN_IF_ERROR(Cuda(cudaEventCreate(&e), "cudaEventCreate"));
    }
    return Status::OK();
  }
  // Device durations between the events of one SearchAttend (after its synchronisation), and
  // the host time from the first enqueue to the wake-up that the device span does not explain.
  void ObserveTimeline(std::chrono::steady_clock::time_point t_enqueue, int last) {
    const auto host = std::chrono::steady_clock::now() - t_enqueue;
    float ms[3] = {0.f, 0.f, 0.f};
    for (int i = 0; i < last; ++i) {
      if (cudaEventElapsedTime(&ms[i], events_[i], events_[i + 1]) != cudaSuccess) return;
    }
    auto& ph = GlobalMetrics().attend_phase;
    auto ns = [](float m) { return std::chrono::nanoseconds(static_cast<int64_t>(m * 1e6f)); };
    ph[static_cast<int>(AttendPhase::kGpuCopyUp)].Observe(ns(ms[0]));
    ph[static_cast<int>(AttendPhase::kGpuKernels)].Observe(ns(ms[1]));
    if (last == 3) ph[static_cast<int>(AttendPhase::kGpuCopyDown)].Observe(ns(ms[2]));
    const auto span = ns(ms[0] + ms[1] + ms[2]);
    ph[static_cast<int>(AttendPhase::kGpuUnaccounted)].Observe(
        host > span ? std::chrono::duration_cast<std::chrono::nanoseconds>(host - span)
                    : std::chrono::nanoseconds(0));
  }
  static bool MappedResults() {
    static const bool on = EnvIs("KVMEM_DEVICE_RESULTS", "mapped");
    return on;
  }
  // KVMEM_DEVICE_INLINE=on: q and the plan image as the search's kernel parameters instead of
  // an upload (A/B timing; not yet timed on the H200 at run 22's kernels, so off by default).
  static bool InlineSubmit() {
    static const bool on = EnvIs("KVMEM_DEVICE_INLINE", "on");
    return on;
  }
  // Grow-only mapped pinned host memory the kernels write the device search's outputs into.
  Status GrowMapped(size_t need) {
    if (need <= mapped_bytes_) return Status::OK();
    if (mapped_) {
      DropGraphs();
      cudaFreeHost(mapped_);
    }
    mapped_ = mapped_dev_ = nullptr;
    mapped_bytes_ = 0;
    const size_t bytes = std::max<size_t>(need, 64 << 10);
    void* p = nullptr;
    void* d = nullptr;
    KVMEM_RETURN_IF_ERROR(Cuda(cudaHostAlloc(&p, bytes, cudaHostAllocMapped), "cudaHostAlloc mapped"));
    mapped_ = static_cast<uint8_t*>(p);
    KVMEM_RETURN_IF_ERROR(Cuda(cudaHostGetDevicePointer(&d, p, 0), "cudaHostGetDevicePointer"));
    mapped_dev_ = static_cast<uint8_t*>(d);
    mapped_bytes_ = bytes;
    return Status::OK();
  }
  using GraphKey = std::array<uint64_t, 31>;
  // The instantiated graph for `key` (GraphCache's policy: replayed when cached, captured from
  // `enqueue` on the layout's second sighting); nullptr when the caller should enqueue directly:
  // a first sighting, or capture or instantiation failing, which turns graphs off for this pool.
  template <typename F>
  cudaGraphExec_t GraphFor(const GraphKey& key, F&& enqueue) {
    if (graph_failed_) return nullptr;
    cudaGraphExec_t exec = nullptr;
    switch (graphs_.Find(key, &exec)) {
      case Graphs::Action::kReplay:
        GlobalMetrics().device_graph_replays++;
        return exec;
      case Graphs::Action::kDirect:
        return nullptr;
      case Graphs::Action::kCapture:
        break;
    }
    cudaGraph_t graph = nullptr;
    Status st = Cuda(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "begin capture");
    if (st.ok()) {
      Status enq = enqueue();
      Status end = Cuda(cudaStreamEndCapture(stream_, &graph), "end capture");
      st = !enq.ok() ? enq : end;
    }
    if (st.ok()) st = Cuda(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    if (graph) cudaGraphDestroy(graph);
    if (!st.ok()) {
      (void)cudaGetLastError();
      if (exec) cudaGraphExecDestroy(exec);
      graph_failed_ = true;
      std::fprintf(stderr, "kvmem: device search graph off (%s); enqueueing directly\n",
                   st.ToString().c_str());
      return nullptr;
    }
    graphs_.Insert(key, exec);
    GlobalMetrics().device_graph_captures++;
    return exec;
  }
  // Before a buffer a graph may use (the pinned staging, the mapped results, the device
  // scratch) is freed: every cached graph goes. A graph keeps the addresses it was captured
  // with, and a later allocation can return the same address, so the key would match a graph
  // whose copies refer to the freed allocation (the H200 crashed in cudaGraphLaunch so, under
  // kvmem-stress, before graphs were dropped here). The buffers only grow, so this is rare.
  void DropGraphs() { graphs_.Clear(); }

  // A kernels-library call's Status, counted as Cuda() counts an error when it failed with the
  // context unusable. The library's Status carries no cudaError_t; such an error is sticky, so
  // the runtime's last error or a query of the stream (which does not wait) returns it again.
  Status Kernels(Status s) {
    if (s.ok()) return s;
    cudaError_t e = cudaPeekAtLastError();
    if (!IsFatalCudaError(static_cast<int>(e))) e = cudaStreamQuery(stream_);
    return IsFatalCudaError(static_cast<int>(e)) ? ContextLost(s.message()) : s;
  }

  // kvmemd --fault-device-trap-flag: while the file exists, each device attention first launches
  // a kernel that traps (a real fault: the context is unusable from then on), for tests on a GPU.
  Status MaybeTrap() {
    std::error_code ec;
    if (fault_trap_flag_.empty() || !std::filesystem::exists(fault_trap_flag_, ec)) return Status::OK();
    return Kernels(kernels::cuda::LaunchTrap(stream_));
  }

  // Grow-only pinned host staging (the uploads and copies back of every launch).
  Status GrowPinned(size_t need) {
    need += 512;  // alignment slack between the up and down halves
    if (need <= pinned_bytes_) return Status::OK();
    if (pinned_) {
      DropGraphs();
      cudaFreeHost(pinned_);
    }
    pinned_ = nullptr;
    const size_t bytes = std::max(need, pinned_bytes_ * 2);
    void* p = nullptr;
    KVMEM_RETURN_IF_ERROR(Cuda(cudaHostAlloc(&p, bytes, cudaHostAllocDefault), "cudaHostAlloc staging"));
    pinned_ = static_cast<uint8_t*>(p);
    pinned_bytes_ = bytes;
    return Status::OK();
  }

  // Grow-only device scratch; a new workspace is zero-filled (the attention counters need it).
  Status Grow(void** p, size_t* have, size_t need) {
    if (need <= *have) return Status::OK();
    if (*p) {
      // Enqueued copies and launches may still read the old buffer.
      KVMEM_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "scratch grow"));
      DropGraphs();
      cudaFree(*p);
    }
    *p = nullptr;
    const size_t bytes = std::max(need, *have * 2);
    KVMEM_RETURN_IF_ERROR(Cuda(cudaMalloc(p, bytes), "cudaMalloc scratch"));
    // On the stream: ordered before every copy and launch that uses the buffer (a plain
    // cudaMemset runs on the legacy stream, which this non-blocking stream does not wait for).
    KVMEM_RETURN_IF_ERROR(Cuda(cudaMemsetAsync(*p, 0, bytes, stream_), "cudaMemset scratch"));
    *have = bytes;
    return Status::OK();
  }

  int device_ = 0;
  std::string name_;
  std::string fault_trap_flag_;  // MaybeTrap
  cudaStream_t stream_ = nullptr;
  std::mutex mu_;
  void* d_io_ = nullptr;
  size_t io_bytes_ = 0;
  void* d_ws_ = nullptr;
  size_t ws_bytes_ = 0;
  void* d_sws_ = nullptr;  // search + attention workspace
  size_t sws_bytes_ = 0;
  void* d_scan_ = nullptr;  // block scan: inputs, then scores
  size_t scan_bytes_ = 0;
  uint8_t* pinned_ = nullptr;  // host staging of every upload and copy back
  size_t pinned_bytes_ = 0;
  kernels::cuda::AttendPlan attend_plan_;  // Attend's, kept for its image's capacity
  struct DestroyExec {
    void operator()(cudaGraphExec_t e) const { cudaGraphExecDestroy(e); }
  };
  // GraphSubmit(): 16 graphs kept, 64 layouts awaiting their second use.
  using Graphs = GraphCache<GraphKey, cudaGraphExec_t, DestroyExec>;
  Graphs graphs_{16, 64, DestroyExec{}};
  bool graph_failed_ = false;
  uint8_t* mapped_ = nullptr;      // KVMEM_DEVICE_RESULTS=mapped: host view
  uint8_t* mapped_dev_ = nullptr;  // its device address
  size_t mapped_bytes_ = 0;
  cudaEvent_t events_[4] = {};  // KVMEM_DEVICE_TIMELINE=1
  kernels::cuda::CopyStager stager_;  // batched copies in and within, tree mirror uploads
};

}  // namespace

Result<std::unique_ptr<KVPool>> CreateDevicePool(const SlabAllocator::Options& o, int device,
                                                 std::string fault_trap_flag) {
  if (CudaDeviceCount() <= device) return Unavailable("no CUDA device " + std::to_string(device) + " visible");
  auto pool = std::make_unique<DevicePool>();
  KVMEM_RETURN_IF_ERROR(pool->Init(o, device, std::move(fault_trap_flag)));
  return std::unique_ptr<KVPool>(std::move(pool));
}

bool DeviceGraphSubmit() { return DevicePool::GraphSubmit(); }

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace kvmem
