// CUDA versions of the kernels in kernels/attention.h and kernels/index_ops.h.
//
// This header needs no CUDA headers: streams are `void*` (a cudaStream_t; nullptr = the legacy
// default stream) and every call returns a Status. Pointers inside the views are device memory
// unless a comment says host. Calls only enqueue work: outputs are ready when the stream is.
// A launch error (bad configuration, no device) comes back as a Status; an asynchronous fault
// shows up at the next synchronising call. Without a CUDA build or a GPU every entry point
// returns UNAVAILABLE (DeviceCount() == 0), so callers and tests can skip cleanly.
//
// head_dim 128 runs on tensor cores (mma.sync, products exact to fp32 level), its K/V rows
// brought in by bulk copies (pairs of rows for splits of <= 1024 tokens, single rows above);
// KVMEM_ATTN_PATH=simt (CUDA cores), tc-cpasync (cp.async copies), tc-bulk or tc-pairs forces one
// kernel, for debugging and A-B timing. Supported on CUDA: head_dim 64 or
// 128; GQA group (q_heads / kv_heads) 1, 2, 4 or 8; K/V bf16 or fp16 (fp32 K/V: CPU only); q and
// out fp32, fp16 or bf16; fp32 accumulation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "kernels/attention.h"
#include "kernels/index_ops.h"
#include "kernels/tree_search.h"

namespace kvmem::kernels::cuda {

// Number of CUDA devices usable by this process (0 without a CUDA build, driver or GPU).
int DeviceCount();

// Multiprocessor count of the current device (0 when none).
int MultiprocessorCount();

// ---- Sparse / dense decode attention over KVSpans (many problems, one launch) ----------------
//
// Work split. Each (problem, KV head) is a task; its token sequence is the concatenation of its
// spans. Tasks are cut into splits of about `split_tokens` tokens (by tokens, not by spans), so a
// head with a long span and a head with many short ones cost the same per token. One thread block
// runs one split: it loads each K/V row once for all the G query heads of the group, keeps an
// online softmax in fp32, and either writes the output directly (one split) or a partial
// (max, sum, unnormalised accumulator); the last split of a task to finish merges the partials by
// log-sum-exp (a per-task counter in the workspace, reset to zero by that block). One launch for
// every problem and head; safe to capture in a CUDA graph and replay.
//
// Device-memory contract. PlanAttend reads the problems on the host: their `spans` and
// `head_span_begin` are HOST pointers there; `pool`, `q`, `out` and `lse` are DEVICE pointers
// (copied into the plan, never dereferenced on the host). It packs, into `plan->image` (record
// layouts in kernels/detail/attention_plan_layout.h):
//   [tasks: one descriptor per (problem, KV head), for inspection]
//   [items: one per split = thread block, each carrying its task's pointers, scale, split index,
//    split count, partial slot and its range of runs]
//   [runs: (K element offset, V element offset, length) per piece of span, grouped by item; at
//    most kMaxRunsPerItem (256) per item]
//   [counters: one uint32 per task, zero]
// The caller copies the image to the start of a device workspace of plan->workspace_bytes with
// one async memcpy (UploadAttendPlan does it); the rest of the workspace holds the partials.
// LaunchAttend may then run any number of times on that workspace (graph replay included) as
// long as q, pool contents and the other pointees are what the plan was made for. Only one
// launch may use a workspace at a time (counters and partials live there).
// All problems in one plan share kv_dtype, q_dtype, out_dtype, head_dim and the GQA group; each
// has its own pool, scale, q, out, lse and spans. Pool offsets must keep rows 16-byte aligned
// (offset % 8 == 0 elements) and the pool pointer 16-byte aligned.

// Thread blocks of the span-attention kernel for this shape that the device runs at once
// (0 without a device). The planner's default target.
uint32_t AttendResidentBlocks(uint32_t head_dim, uint32_t group, DType kv_dtype);

struct AttendPlanOptions {
  // Splits aim at about this many thread blocks in total, so small problems run in one wave
  // (0: when the tasks fit the resident blocks, one wave of even splits: at most
  // AttendResidentBlocks / tasks splits per task, sized by the longest task; else
  // AttendResidentBlocks minus one per task, at least half of it; 528 without a device).
  // Default: 0
  uint32_t target_blocks = 0;
  // Bounds on tokens per split; the chosen size is a multiple of 64 inside these bounds.
  // Default: 128 and 4096
  uint32_t min_split_tokens = 128;
  uint32_t max_split_tokens = 4096;
  // 0: split every task by tokens as above (balanced: a task gets splits in proportion to its
  // tokens). N > 0: cut every task into at most N splits of equal tokens instead (rounded up to
  // a multiple of 64, the bounds above ignored), whatever its length: the fixed split count of a
  // per-head grid. This is the unbalanced baseline of kvmem-bench-retrieval (a retrieval head
  // attending the whole context next to sparse heads attending their budget), not something the
  // daemon uses.
  // Runs per split stay capped (kMaxRunsPerItem), which can add splits. Default: 0
  uint32_t splits_per_task = 0;
  // Thread-block clusters of splits: every task gets exactly C splits of equal tokens (a
  // multiple of C when run tables overflow), and the C splits of a cluster combine through
  // distributed shared memory (no global partial, counter or merge for a task that is one
  // cluster). 1: no clusters. 2, 4, 8 or 16: that C. kAttendClusterAuto: with the default
  // sizing (target_blocks and splits_per_task 0) and tasks of similar length, the largest power
  // of two <= min(16, resident blocks / tasks) whose clusters all run at once. 0: what
  // KVMEM_ATTN_CLUSTER says ("off", "auto" or a size), else no clusters. Measured on the H200
  // (bench/results/h200_run16_*): clusters are no faster than the one-kernel global merge
  // (equal at batch 1 budget 1024, slower elsewhere: fewer blocks in flight, cluster
  // scheduling), so they are off by default and kept for A/B runs. Default: 0
  uint32_t cluster = 0;
};

inline constexpr uint32_t kAttendClusterAuto = 0xffffffffu;

// Cluster size for `splits` splits per (problem, KV head): `option`, or when 0
// KVMEM_ATTN_CLUSTER; kAttendClusterAuto: the largest power of two <= min(splits, cap); 1 = no
// clusters.
uint32_t AttendClusterSize(uint32_t option, uint64_t splits, uint32_t cap);
// KVMEM_ATTN_CLUSTER as a size (1 for "off", kAttendClusterAuto for "auto"), 0 when unset.
uint32_t AttendClusterEnv();
// The planners' smallest split: `option` unless it is the default (128) and
// KVMEM_ATTN_MIN_SPLIT (16..4096, A/B runs) is set.
uint32_t AttendMinSplit(uint32_t option);
// Clusters of `cluster` blocks of the span-attention kernel the device runs at once (0 without
// a device).
uint32_t AttendActiveClusters(uint32_t head_dim, uint32_t group, DType kv_dtype, uint32_t cluster);
// Cluster size for `tasks` tasks of one cluster each: `option` (or when 0 KVMEM_ATTN_CLUSTER);
// for kAttendClusterAuto the largest power of two <= min(16, resident / tasks) whose clusters
// all run at once; 1 = no clusters.
uint32_t AttendTaskClusterSize(uint32_t option, uint64_t resident, uint64_t tasks, uint32_t head_dim,
                               uint32_t group, DType kv_dtype);

struct AttendPlan {
  std::vector<uint8_t> image;  // upload to the workspace start
  size_t workspace_bytes = 0;  // image + partials
  uint32_t num_tasks = 0;
  uint32_t num_items = 0;  // thread blocks of the launch
  uint32_t num_runs = 0;
  uint32_t split_tokens = 0;  // tokens per split (with splits_per_task: the largest of them)
                              // (the launch picks its copy path from it)
  uint64_t total_tokens = 0;  // summed over tasks (each KV row pair read once)
  DType kv_dtype = DType::kBF16;
  DType q_dtype = DType::kBF16;
  DType out_dtype = DType::kBF16;
  uint32_t head_dim = 0;
  uint32_t group = 0;
  // Blocks per thread-block cluster of the launch (1: none); every task has a multiple of it
  // splits, so cluster = consecutive splits of one task.
  uint32_t cluster_size = 1;
  // Runs of item i start at run i * run_stride (0: anywhere, as the item says).
  uint32_t run_stride = 0;
  // One problem whose heads all attend every span: the heads share head 0's runs (each run's
  // head_stride set; PlanAttend).
  bool head_shared_runs = false;
  // Byte offsets of the sections inside the workspace.
  size_t tasks_off = 0, items_off = 0, runs_off = 0, counters_off = 0, partials_off = 0;
  // The attention of LaunchSearchAttend: every block builds its split's runs from what the
  // search left (a detail::SearchRunHeader per task at run_source_off, the selection at
  // selected_off, max_selected slots per task) instead of reading run tables. uniform_splits:
  // every task has that many splits (block b is split b % S of task b / S, known before the
  // item is read); 0 when they differ.
  bool runs_from_search = false;
  size_t run_source_off = 0, selected_off = 0;
  uint32_t max_selected = 0, uniform_splits = 0;
};

// Host only (no device calls): validates and packs. INVALID_ARGUMENT for bad problems,
// UNIMPLEMENTED for shapes the CUDA kernel does not cover. The capacity of plan->image is kept
// (everything else of *plan is replaced): planning into the same AttendPlan again allocates
// nothing once it is large enough (kvmem-bench-attend-plan).
Status PlanAttend(const AttendProblem* problems, uint32_t count, const AttendPlanOptions& options,
                  AttendPlan* plan);

// A dense layer's plan kept from one decode step to the next (kvmemd keeps one per session and
// layer). Between seals a step changes the layer's problem only by the token appended to its
// last span (the tail), which grows the last split of every head by one token and leaves the
// rest of the plan as it was; PlanAttendDenseStep then patches those few bytes instead of
// planning ~8.8K runs again (a 128K layer).
struct DenseAttendPlanCache {
  AttendPlan plan;
  bool valid = false;
  uint64_t key = 0;       // the caller's stamp of every span but the last
  AttendProblem planned{};  // what `plan` was planned for (its spans pointer not used)
  KVSpan last{};          // its last span
};

// Plans `p` (one problem, head_span_begin null, the default AttendPlanOptions) into
// cache->plan. When the cache holds a plan for the same `key` (the caller changes it whenever
// any span but the last may have changed), the same scalars (pool, q, out, lse, dtypes, heads,
// scale) and span count, and `p`'s last span is the kept one with d >= 0 more tokens at its
// end, and PlanAttend would cut the grown problem into the same splits with the d tokens in
// each head's last split, the kept plan is patched (each head's last split and the shared last
// run grow by d) and *patched is set; else it plans afresh. Either way cache->plan is byte for
// byte what PlanAttend makes for `p`.
Status PlanAttendDenseStep(const AttendProblem& p, uint64_t key, DenseAttendPlanCache* cache,
                           bool* patched);

// One cudaMemcpyAsync of plan.image to `workspace` (host memory of the image stays owned by
// the plan; keep the plan alive until the stream has passed the copy).
Status UploadAttendPlan(const AttendPlan& plan, void* workspace, void* stream);

// The attention launch itself (one kernel).
Status LaunchAttend(const AttendPlan& plan, void* workspace, void* stream);

// Diagnostics (kvmem-bench-gpu, KVMEM_ATTN_TRACE=1): LaunchAttend with each thread block's
// thread 0 storing %globaltimer (ns) at kAttendTracePoints points into `trace` (device memory,
// plan.num_items * kAttendTracePoints values, block i's at i * kAttendTracePoints): 0 kernel
// entry, 1 run table in shared memory, 2 warp 0's first copies issued, 3 its Q fragments loaded,
// 4 its first tile arrived, 5 the token loop done (all warps; 2-5: tensor-core paths), 6 the
// block's partial written and counted (single-split items: output written), 7 block done (the
// task's last block: after the merge). Points a path does not pass stay as they were.
constexpr uint32_t kAttendTracePoints = 8;
Status LaunchAttendTraced(const AttendPlan& plan, void* workspace, void* stream, uint64_t* trace);

// ---- Dense decode attention on a contiguous cache -------------------------------------------
// Same kernel body as above over DenseAttendView (seq_lens is a DEVICE pointer here). The
// workspace must be zero-filled once before its first use; each launch leaves it reusable.
struct DenseAttendOptions {
  // As AttendPlanOptions (0: resident blocks of the dense kernel).
  uint32_t target_blocks = 0;
  uint32_t min_split_tokens = 128;
  uint32_t max_split_tokens = 4096;
  // As AttendPlanOptions::cluster (automatic: up to 8, where all clusters run at once): clusters
  // of consecutive splits of a (sequence, KV head); the split count is rounded up to a multiple
  // of the cluster size. Default: 0 (KVMEM_ATTN_CLUSTER, else none)
  uint32_t cluster = 0;
};

size_t DenseAttendWorkspaceBytes(const DenseAttendView& v, const DenseAttendOptions& options);
Status DenseAttend(const DenseAttendView& v, const DenseAttendOptions& options, void* workspace,
                   size_t workspace_bytes, void* stream);

// ---- Device-to-device copies ------------------------------------------------------------------
// One copy of CopySegments: `bytes` from device address `src` to device address `dst`. A
// segment's destination may overlap its own source (it is moved as memmove would) but no other
// segment's source or destination.
struct CopySegment {
  uint64_t dst = 0;
  uint64_t src = 0;
  uint64_t bytes = 0;
};
// Every segment of `segments` (device memory, `count` entries) in one launch: a block per
// segment at a time, 16-byte words when the segment's addresses and size allow, bytes otherwise.
Status CopySegments(const CopySegment* segments, uint32_t count, void* stream);

// Fault injection for tests (kvmemd --fault-device-trap-flag): a one-thread kernel that executes
// a trap instruction, which leaves the CUDA context unusable (a sticky error: cudaErrorLaunchFailure
// or cudaErrorIllegalInstruction at the next synchronising call, and from every call after it), as
// a faulting kernel does on a real GPU. Never called outside that fault.
Status LaunchTrap(void* stream);

// Many small uploads and device copies as one upload and one CopySegments launch. Add() copies
// its host bytes into pinned staging at once (the source may be reused on return); Flush()
// uploads [rows | segments] in one copy on `stream`, launches CopySegments and returns without
// waiting; the staging is refilled only after that upload has run (an event, waited for by the
// next Add). One stream per stager; not thread-safe.
class CopyStager {
 public:
  CopyStager() = default;
  ~CopyStager();
  CopyStager(const CopyStager&) = delete;
  CopyStager& operator=(const CopyStager&) = delete;

  // `bytes` from host memory `src` to device address `dst`.
  Status Add(void* dst, const void* src, size_t bytes);
  // `bytes` from device address `src` to device address `dst`; with `overlapping`, dst may
  // overlap its own src (memmove; the copy stays one segment, one block).
  void AddDevice(void* dst, const void* src, size_t bytes, bool overlapping);
  size_t staged_bytes() const { return used_; }
  bool empty() const { return segs_.empty(); }
  Status Flush(void* stream);
  // Drops what was added since the last flush (a batch that failed halfway).
  void Clear() {
    segs_.clear();
    staged_src_.clear();
    used_ = 0;
  }

 private:
  Status Wait();                              // the last flush's upload has read the staging
  Status ReservePinned(size_t bytes);         // keeps the staged bytes
  std::vector<CopySegment> segs_;
  std::vector<uint8_t> staged_src_;           // per segment: 1 = src is an offset in the staging
  uint8_t* pinned_ = nullptr;
  size_t cap_ = 0, used_ = 0;
  void* dev_ = nullptr;
  size_t dev_cap_ = 0;
  void* event_ = nullptr;                     // cudaEvent_t after the last upload
  bool in_flight_ = false;
};

// ---- Index ops (one launch each; views hold device pointers) ---------------------------------
Status ChunkSummary(const ChunkSummaryView& v, void* stream);
Status NodeBounds(const NodeBoundsView& v, void* stream);
Status ChunkMaxScores(const ChunkMaxScoresView& v, void* stream);
Status TokenLogits(const TokenLogitsView& v, void* stream);
// One block per row; exact and deterministic (same result as TopKCpu, bit for bit).
Status TopK(const TopKView& v, void* stream);
// 16-bit K/V with head_dim 64, 128 or 256 (and a 16-byte aligned pool) take vectorised loads:
// span offsets must then be multiples of 8 elements, as for attention.
Status PooledBlockScores(const PooledBlockScoresView& v, void* stream);

// ---- Cluster-tree search fused with sparse attention (kernels/tree_search.h) -----------------
//
// DeviceTree: one tree's flat arrays in device memory. Sync() uploads the chunk summaries it
// does not hold yet (they never change between Builds) and, when the tree changed, the node
// arrays and the leaf order (about 10% of the bytes at 16 chunks per leaf). Pass the FlatTree
// exported with chunks_from = chunks_held() (a different chunks_epoch starts over). Centroids go
// up as bfloat16 bits (kernels/tree_search.h): InvalidArgument, before anything is uploaded, for
// a centroid that is not bfloat16 values; Unimplemented for a head_dim not a multiple of 64.
class DeviceTree {
 public:
  DeviceTree() = default;
  ~DeviceTree();
  DeviceTree(const DeviceTree&) = delete;
  DeviceTree& operator=(const DeviceTree&) = delete;

  // Copies are ordered on `stream`; the host vectors may be reused once Sync returns. With a
  // `stager`, the uploads are staged there (one upload and launch for many trees when it is
  // flushed, which the caller does on the same stream before the tree is searched), and of a
  // full export's node rows only those whose stamps changed (FlatTree::node_row_stamps) are
  // converted and go up; without one, every node row does.
  // A partial export (FlatTree::node_rows_partial, made against rows_held()) uploads just its
  // rows; InvalidArgument, before anything is uploaded, when the mirror no longer holds the
  // rows it completes.
  Status Sync(const FlatTree& host, void* stream, CopyStager* stager = nullptr);
  // The node rows on the device (for ClusterTree::ExportFlat); valid until the next Sync.
  NodeRowsHeld rows_held() const { return {lineage_, row_stamps_}; }
  uint32_t chunks_held() const { return chunks_; }
  uint64_t chunks_epoch() const { return epoch_; }
  const FlatTreeView& view() const { return view_; }  // device pointers
  uint64_t bytes_uploaded() const { return uploaded_; }
  uint64_t device_bytes() const;

 private:
  struct Buffer {
    void* p = nullptr;
    size_t cap = 0;
  };
  // Makes `b` hold `bytes`, keeping the first `keep` bytes (device-to-device on growth).
  Status Reserve(Buffer* b, size_t bytes, size_t keep, void* stream);
  Buffer node_centroids_, nodes_, leaf_chunks_, chunk_centroids_, chunk_radius_, chunk_tokens_,
      chunk_start_;
  uint32_t chunks_ = 0;
  uint64_t epoch_ = ~0ull;
  uint64_t uploaded_ = 0;
  // The stamps (FlatTree::node_row_stamps) of the node rows on the device, by flat position,
  // and their lineage; empty: unknown (every row goes up).
  std::vector<uint64_t> row_stamps_;
  uint64_t lineage_ = 0;
  uint64_t version_held_ = ~0ull;  // FlatTree::version of the node records and leaf order held
  FlatTreeView view_;
};

// One (session, layer) decode step in index mode: every KV head searches its tree for
// `params.budget_tokens` and attends sinks ∪ selected chunks ∪ recent window ∪ tail, like
// daemon Session::BuildSparseSpans, without the host seeing the selection in between.
struct SearchAttendProblem {
  // pool, dtypes, heads, head_dim, scale, q, out, lse as for AttendProblem (DEVICE pointers);
  // spans / head_span_begin / num_spans are not used.
  AttendProblem attend;
  const FlatTreeView* trees = nullptr;      // HOST array [kv_heads] of device views
  const uint64_t* chunk_block = nullptr;    // DEVICE [num_chunks] element offset of each chunk's
                                            // K/V block (stride = its tokens) for this layer
  TreeSearchParams params;
  uint32_t sink_tokens = 0;                 // tokens [0, S) always attended
  uint64_t recent_from = 0;                 // sealed tokens at or past this always attended
  uint32_t recent_window = 0;               // = sealed - recent_from (sizes the splits)
  KVSpan tail{};                            // the open tail (end = its tokens; may be empty)
  // A decode step's new rows ([kv_heads][head_dim] each, kv dtype, DEVICE pointers), or null:
  // the search writes them to the tail's last row (tail.end - 1) before the attention reads
  // the tail, so the step needs no copy of its own. The tail must then be non-empty.
  const void* new_k = nullptr;
  const void* new_v = nullptr;
};

// Per (problem, KV head) result of the search, in the workspace after the launch.
struct SearchTaskResult {
  uint32_t status;           // 0 ok; otherwise a kSearchStatus* bit set: the head attended nothing
  uint32_t num_selected;     // chunks selected
  uint32_t selected_tokens;  // their counted tokens (not below the sinks)
  uint32_t attended_tokens;  // tokens the attention reads for this head
  uint32_t nodes_scored;     // node + chunk summaries scored
  uint32_t rounds;           // expansion rounds the search took
  // Within chunk scoring (ns, rank 0's slice): looking up the slice's chunks, scoring their rows.
  uint32_t score_ns[2];
  // Time inside the block (%globaltimer, ns): node scores, leaves, rounds, the end (the fixed
  // pieces of a one-block search, the attention's header, the results); then within
  // the rounds: leaf selection, chunk scoring, commit + sort, scan.
  uint32_t phase_ns[8];
};
constexpr uint32_t kSearchStatusTooManyLeaves = 1;      // > kSearchMaxLeaves leaf clusters
constexpr uint32_t kSearchStatusTooManyCandidates = 2;  // > kSearchMaxCandidates chunks scored
constexpr uint32_t kSearchStatusTooManyRuns = 4;        // > kMaxRunsPerItem runs in a split or fixed pieces
constexpr uint32_t kSearchStatusTooManyChunks = 8;      // > kSearchMaxChunks chunks
constexpr uint32_t kSearchMaxLeaves = 4096;
constexpr uint32_t kSearchMaxCandidates = 3072;
constexpr uint32_t kSearchMaxChunks = 131072;

struct SearchAttendPlan {
  std::vector<uint8_t> image;  // upload to the workspace start (UploadSearchAttendPlan)
  size_t workspace_bytes = 0;
  uint32_t num_tasks = 0;
  uint32_t num_items = 0;
  uint32_t max_selected = 0;  // selection slots per task
  uint32_t head_dim = 0, group = 0;
  DType kv_dtype = DType::kBF16, q_dtype = DType::kBF16, out_dtype = DType::kBF16;
  size_t tasks_off = 0, items_off = 0, runs_off = 0, counters_off = 0, results_off = 0,
         selected_off = 0, scores_off = 0, run_source_off = 0, scratch_off = 0, partials_off = 0;
  // Splits of every task when they are all the same (0 when they differ).
  uint32_t uniform_splits = 0;
  // Thread blocks per (problem, KV head) in LaunchTreeSearch: one thread-block cluster shares
  // each search (1 to 16). 0: the largest whose clusters all fit the device at once
  // (KVMEM_SEARCH_CLUSTER in the environment overrides it, for A/B timing). The selection is
  // the same for every size.
  // Default: 0
  uint32_t cluster_size = 0;
  // Blocks per thread-block cluster of the attention launch (AttendPlan::cluster_size).
  uint32_t attend_cluster = 1;
  // Tokens per attention split (the largest; AttendPlan::split_tokens, which picks the copy path).
  uint32_t split_tokens = 0;
};

// Host only: validates, sizes the splits from the most tokens a head can attend
// (sinks + budget + recent window + longest chunk + tail) and packs the image. UNIMPLEMENTED
// for shapes the kernels do not cover (head_dim other than 64/128, GQA group not 1/2/4/8, fp32
// K/V, trees deeper than kTreeSearchMaxLevels below the root).
Status PlanSearchAttend(const SearchAttendProblem* problems, uint32_t count,
                        const AttendPlanOptions& options, SearchAttendPlan* plan);
Status UploadSearchAttendPlan(const SearchAttendPlan& plan, void* workspace, void* stream);
// The search alone (one launch: one thread-block cluster per (problem, KV head)); it writes the
// selection, the results and what the attention builds its runs from (per task a
// detail::SearchRunHeader and the fixed pieces) into the workspace.
Status LaunchTreeSearch(const SearchAttendPlan& plan, void* workspace, void* stream);
// Search, then span attention over what it wrote: two launches, no host step between (the
// attention is a programmatic dependent launch: its blocks start while the search finishes and
// wait for the search's writes, then each builds its split's runs).
Status LaunchSearchAttend(const SearchAttendPlan& plan, void* workspace, void* stream);
// The cluster size LaunchTreeSearch uses for this plan (0 without a device).
uint32_t TreeSearchClusterSize(const SearchAttendPlan& plan);
// Whether LaunchTreeSearch runs the flat search for this plan (KVMEM_SEARCH_FLAT and the trees'
// sizes; false without a device): a launch captured in a CUDA graph keeps the variant it had.
bool TreeSearchUsesFlat(const SearchAttendPlan& plan);

}  // namespace kvmem::kernels::cuda
