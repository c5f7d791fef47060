// Daemon metrics: lock-free counters the request path bumps, and the Prometheus text renderer
// the admin endpoint calls.
//
// Concurrency: every counter is a relaxed atomic. The transport thread records per-op latency
// (it is the only writer of those histograms, so the increments never contend); executors and
// the index bump the other counters. Rendering reads the atomics and takes no lock of the
// request path except a brief shared lock on the session registry to copy session pointers
// (Service::SnapshotSessions); formatting happens after that lock is released.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace kvmem {

class Service;
struct TransportCounters;

// Storage tiers (daemon/eviction.h): the KV pool, the host tier, RocksDB.
enum class Tier : uint8_t { kDevice = 0, kHost = 1, kDisk = 2 };
inline constexpr int kNumTiers = 3;
const char* TierName(Tier t);

// Latency histogram bucket upper bounds, in seconds (Prometheus `le`). 5 us .. 10 s.
inline constexpr std::array<double, 20> kLatencyBucketsSeconds = {
    5e-6,  10e-6, 25e-6, 50e-6,  100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3,
    10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,    2.5,  5.0,    10.0};

// Cumulative-friendly histogram: one relaxed atomic per bucket plus +Inf, count and sum.
class LatencyHistogram {
 public:
  void Observe(std::chrono::nanoseconds d);
  struct Snapshot {
    std::array<uint64_t, kLatencyBucketsSeconds.size() + 1>
        buckets{};  // non-cumulative; last = +Inf
    uint64_t count = 0;
    uint64_t sum_ns = 0;
  };
  Snapshot Read() const;

 private:
  std::array<std::atomic<uint64_t>, kLatencyBucketsSeconds.size() + 1> buckets_{};
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_ns_{0};
};

// Where an Attend's time goes on the daemon (kvmem_attend_phase_seconds{phase=...}).
enum class AttendPhase : uint8_t {
  kCatchUp = 0,       // index catch-up: summaries of newly sealed chunks into the trees
  kHostSearch,        // budgeted search on the host (q to fp32, every KV head)
  kSpans,             // sinks ∪ selection ∪ recent ∪ tail spans on the host
  kHostAttend,        // KVPool::Attend: plan, copies, kernel (or CPU attention), sync
  kDeviceSync,        // device tree mirrors and block table brought up to date
  kDeviceSearchAttend,  // device search + attention: uploads, two launches, copies, sync
  kSeal,              // sealing completed tokens into chunks after the attention
  // Inside kDeviceSearchAttend (the CUDA pool's SearchAttend), for where its time goes:
  kDevicePlan,    // host planning and staging q + the plan image in pinned memory
  kDeviceLaunch,  // enqueueing the upload, the two launches and the two copies back
  kDeviceWait,    // waiting for the stream (the device work not yet done when enqueued)
  // Inside kHostSearch when the session rescores candidates (search_rescore_*):
  kRescoreSearch,  // the summary searches of every KV head (4x the budget, say), in parallel
  kRescoreLogits,  // the candidates' exact logits: one pool call (device) or per head (host)
  kRescoreSelect,  // the budget's chunks or tokens picked from the logits, every KV head
  // KVMEM_DEVICE_TIMELINE=1 only (events around the device search's stream operations; device
  // durations, not host phases, so they overlap the three above):
  kGpuCopyUp,      // the upload of q and the plan image, on the device
  kGpuKernels,     // the search and the attention (first kernel start to last kernel end)
  kGpuCopyDown,    // the copy back, on the device
  kGpuUnaccounted,  // host enqueue start to wake-up, minus the device's first-to-last event span
  // Session::Maintain, after every reply (not part of the request, but the session's next
  // request waits for it): the trees' lazy upkeep, then the device mirrors brought up to date.
  kMaintainTrees,
  kMaintainDevice,
  // Inside kDeviceSync and kMaintainDevice, for the trees that moved: their exports
  // (ClusterTree::ExportFlat) and the mirrors' uploads (conversion, staging, the flush).
  kMirrorExport,
  kMirrorUpload,
  // Inside kSeal: the copies into the new chunks' blocks (the tail's shift, the new rows) and
  // the index's catch-up (the chunks' keys summarised and inserted into the trees).
  kSealCopies,
  kSealIndex,
  // The request around Session::Attend (the transport's and the service's share of
  // kvmem_request_duration_seconds{op="Attend"}): arrival to payload complete (the receive or
  // eager copy), to handler start (parse, executor queue), the service's checks before the
  // session's Attend (session lookup, q's resolution and NaN/Inf check, buffers), the session's
  // Attend whole, the reply's build after it, and handler end to the reply's send.
  kRequestReceive,
  kRequestQueue,
  kRequestChecks,
  kSessionAttend,
  kRequestPack,
  kRequestReply,
  kCount
};
inline constexpr int kNumAttendPhases = static_cast<int>(AttendPhase::kCount);
const char* AttendPhaseName(AttendPhase p);

// Where an AppendKV's time goes (kvmem_append_phase_seconds{phase=...}), measured by the
// transport from the message's arrival (AM callback) to its reply send. The phases of one
// request follow each other; requests overlap (receive of one while another is handled).
enum class AppendPhase : uint8_t {
  kReceive = 0,  // arrival to payload complete: the rendezvous receive (or eager copy)
  kQueue,        // payload complete to handler start: parse, executor queue
  kHandle,       // Service::Handle: checks, chunking, the store below, reply build
  kStore,        // inside handle: the copy (and NaN/Inf check) into the KV pool's blocks
  kReply,        // handler done to reply send on the transport thread
  kCount
};
inline constexpr int kNumAppendPhases = static_cast<int>(AppendPhase::kCount);
const char* AppendPhaseName(AppendPhase p);

// Wire op and status code spaces are small enums (schemas/kvmem.fbs); arrays indexed by their
// values keep recording branch-free. Values beyond the arrays are folded into the last slot.
inline constexpr int kMaxOps = 64;
inline constexpr int kMaxCodes = 32;

struct DaemonMetrics {
  // Requests answered, by wire op (the request's Body type), and their latency from message
  // arrival (AM callback) to reply send, measured by the transport.
  std::array<std::atomic<uint64_t>, kMaxOps> requests{};
  std::array<LatencyHistogram, kMaxOps> latency{};
  // Replies that carried a non-OK status, by wire Code (includes transport refusals).
  std::array<std::atomic<uint64_t>, kMaxCodes> errors{};
  // Tier movement, counted in (chunk, layer) blocks: evictions by the tier left, fetch_backs by
  // the tier read from; spill_bytes to and restore_bytes from kDisk.
  std::array<std::atomic<uint64_t>, kNumTiers> evictions{};
  std::array<std::atomic<uint64_t>, kNumTiers> fetch_backs{};
  std::array<std::atomic<uint64_t>, kNumTiers> spill_bytes{};
  std::array<std::atomic<uint64_t>, kNumTiers> restore_bytes{};
  // Cluster-index nodes visited by searches (Retrieve / index-mode Attend).
  std::atomic<uint64_t> search_nodes_visited{0};
  // Attend time by phase (see AttendPhase).
  std::array<LatencyHistogram, kNumAttendPhases> attend_phase{};
  // AppendKV time by phase (see AppendPhase).
  std::array<LatencyHistogram, kNumAppendPhases> append_phase{};
  // AppendKV payloads received in place (AppendLanding) and stored without a copy, and those
  // whose plan no longer held at the handler (copied back, then stored as usual).
  std::atomic<uint64_t> append_landed{0};
  std::atomic<uint64_t> append_gathered{0};
  // Config reloads (SIGHUP), by outcome.
  std::atomic<uint64_t> reloads_ok{0};
  std::atomic<uint64_t> reloads_failed{0};
  std::atomic<uint64_t> idle_trims{0};  // completed idle trims (daemon/main.cc)
  // Stall watchdog (daemon/health.cc, once a second): episodes begun (some executor thread ran one
  // task past executor_stall_seconds), threads over the limit now, and the longest-running
  // task's time so far at the last check (microseconds; 0 when every thread is idle).
  std::atomic<uint64_t> executor_stalls{0};
  std::atomic<uint64_t> executors_stalled{0};
  std::atomic<uint64_t> executor_longest_task_us{0};
  // CUDA errors that left the device pool's context unusable (IsFatalCudaError, kv_pool.h).
  std::atomic<uint64_t> device_failures{0};
  // Dense attention plans on the GPU (dense mode and dense layers): [0] planned afresh, [1] a
  // kept plan patched for the token appended since (kernels::cuda::PlanAttendDenseStep).
  std::atomic<uint64_t> dense_plans[2] = {};
  // Device searches (index-mode Attend on the CUDA pool) by how they were submitted: replayed
  // from a cached CUDA graph, captured into a new one (then replayed), or enqueued directly (a
  // layout seen for the first time, or graphs off).
  std::atomic<uint64_t> device_graph_replays{0};
  std::atomic<uint64_t> device_graph_captures{0};
  std::atomic<uint64_t> device_direct_submits{0};

  void RecordRequest(int op, std::chrono::nanoseconds latency_ns, int code);
};

// The process-wide instance; the index and the transport bump it without plumbing.
DaemonMetrics& GlobalMetrics();

// Consecutive phases of one Attend: Mark(p) observes the time since the previous mark (or the
// clock's start) into kvmem_attend_phase_seconds{phase=p}.
class AttendPhaseClock {
 public:
  void Mark(AttendPhase p) {
    const auto now = std::chrono::steady_clock::now();
    GlobalMetrics().attend_phase[static_cast<int>(p)].Observe(now - t_);
    t_ = now;
  }

 private:
  std::chrono::steady_clock::time_point t_ = std::chrono::steady_clock::now();
};

// What /metrics reads besides GlobalMetrics(). Pointers may be null (that family is omitted).
struct MetricsSources {
  const Service* service = nullptr;
  const TransportCounters* transport = nullptr;
  uint64_t device_capacity_bytes = 0;
  std::string backend;
  std::string version;
  std::chrono::steady_clock::time_point started;
  bool ready = false;
  double loop_lag_seconds = 0;  // since the event loop's last tick (AdminServer::LoopLagSeconds)
};

// Prometheus text exposition format 0.0.4.
std::string RenderPrometheus(const MetricsSources& sources);

// Names of every metric family RenderPrometheus emits (for tests and docs).
std::vector<std::string> MetricFamilyNames();

}  // namespace kvmem
