// Split-K flash-decoding with GQA over KV runs (sparse spans or a dense cache).
//
// A thread block (128 threads, 4 warps) runs one item = one split of one (problem, KV head)
// task: its run table (K/V row offsets and lengths) sits in shared memory, every K/V row is read
// from memory once and used by all G query heads of the group, softmax state is fp32 in log2
// units. Interchangeable token loops (AttendPath picks one for head_dim 128; KVMEM_ATTN_PATH
// forces one):
//   tensor cores (D = 128; "Tensor-core path" below): each warp streams its own 16-row tiles
//     through a 3-stage pipeline and runs S^T = K Q^T and O^T += V^T P^T on mma.m16n8k16 (tokens
//     and output dims as the MMA rows, the G heads as its columns). The rows come in by bulk
//     copies of row pairs (tc-pairs: splits of <= 1024 tokens), bulk copies of single rows
//     padded to 272 bytes (tc-bulk: longer splits, the dense kernel) or 16-byte cp.async into
//     XOR-swizzled rows (tc-cpasync, A/B only), completing on per-stage mbarriers (bulk) or
//     cp.async groups.
//   simt (any D): D/8 lanes own one row, 16-byte loads through a cp.async pipeline, dot products
//     by shuffle reduction (about 30% slower on H200).
// At the end the block combines its partial states in shared memory; a single-split task writes
// the output, otherwise the split writes a partial (max, sum, unnormalised accumulator) and the
// last split of the task to finish (per-task counter, threadFenceReduction pattern) merges all
// partials by log-sum-exp and resets the counter, so a workspace can be replayed in a graph.
// In a cluster launch (AttendPlan::cluster_size, the dense kernel's cluster) the C splits of a
// cluster combine through distributed shared memory instead: a task that is one cluster writes
// its output with no partial, counter or merge; a task of several clusters merges one partial
// per cluster.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda_ops.h"
#include "kernels/detail/attention_plan_layout.h"

namespace kvmem::kernels::cuda {
namespace {

namespace cg = cooperative_groups;

using ::kvmem::kernels::detail::AttendItemDesc;
using ::kvmem::kernels::detail::AttendRunDesc;
using ::kvmem::kernels::detail::ChunkEdges;
using ::kvmem::kernels::detail::EdgesOf;
using ::kvmem::kernels::detail::SearchRunHeader;
using ::kvmem::kernels::detail::kMaxRunsPerItem;
using ::kvmem::kernels::detail::PartialAccOffset;
using ::kvmem::kernels::detail::PartialFloats;

constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Static shared memory: the item's run table.
struct RunTable {  // runs of at least one token (the row pairs take a run's successor whole)
  uint64_t k_off[kMaxRunsPerItem];
  uint64_t v_off[kMaxRunsPerItem];
  uint32_t len[kMaxRunsPerItem];
  int is_last;
  alignas(8) unsigned long long mbar[16];  // bulk-copy path: one per (warp, stage)
};

constexpr int kMergeChunk = 256;  // splits per pass of the final merge

// ItemOutput::issue (KVMEM_ATTN_ISSUE=nocopy|nomath; diagnostics of the tensor-core paths that
// time the token loop's parts and give wrong results).
constexpr uint32_t kIssueNoCopy = 1;  // the token loop's math over whatever the stages hold
constexpr uint32_t kIssueNoMath = 2;  // the token loop's copies without the math

// Views of the dynamic area after the token loop: NG partial states (token groups or warps).
template <int D, int G, int NG>
struct CombineArea {
  static constexpr size_t kBytes =
      sizeof(float) * (size_t{NG} * G * (D + 2) + size_t{kMergeChunk} * G + 2 * G);
  float* m;    // [NG][G]
  float* l;    // [NG][G]
  float* acc;  // [NG][G][D]
  float* w;    // [kMergeChunk][G]
  float* mg;   // [G]
  float* lg;   // [G]
  __device__ explicit CombineArea(float* base)
      : m(base),
        l(base + NG * G),
        acc(base + 2 * NG * G),
        w(acc + NG * G * D),
        mg(w + kMergeChunk * G),
        lg(mg + G) {}
};

template <int D, int G>
struct Shape {
  static constexpr int kLanes = D / 8;  // lanes per token row
  static constexpr int kGroupsPerWarp = 32 / kLanes;
  static constexpr int kGroups = (kThreads / 32) * kGroupsPerWarp;
  static constexpr int kUnroll = G <= 4 ? 4 : 2;  // rows per group per pipeline stage
  static constexpr int kStages = 3;               // cp.async pipeline depth
  // Dynamic shared memory: the K/V pipeline, later reused by the combine / merge area.
  static constexpr size_t kPipeBytes = size_t{kStages} * kUnroll * 2 * kThreads * 16;
  static constexpr size_t kCombineBytes = CombineArea<D, G, kGroups>::kBytes;
  static constexpr size_t kDynBytes = kPipeBytes > kCombineBytes ? kPipeBytes : kCombineBytes;
};

struct ItemOutput {
  void* out;  // [G][D] of out_dtype
  DType out_dtype;
  float* lse;  // [G] or nullptr
  uint32_t num_splits;
  uint32_t split;
  float* partials;    // this task's first partial slot
  uint32_t* counter;  // this task's counter
  bool legacy_merge;  // KVMEM_ATTN_MERGE=legacy: the two-pass merge of run 15 (A/B runs)
  uint32_t issue;     // KVMEM_ATTN_ISSUE: kIssueNoCopy / kIssueNoMath (diagnostics), else 0
  unsigned long long* trace;  // LaunchAttendTraced: this block's kAttendTracePoints stamps
};

// LaunchAttendTraced: thread 0 stores %globaltimer at point k (kernels/cuda_ops.h lists them).
__device__ __forceinline__ void TraceStamp(const ItemOutput& o, int k) {
  if (o.trace != nullptr && threadIdx.x == 0) o.trace[k] = GlobalTimer();
}

// Writes output elements 4 * v4 .. 4 * v4 + 3 of a merged state (accumulator `a`, max M, sum
// Ls over the splits): a / Ls, and the query head's lse with its first element.
template <int D>
__device__ __forceinline__ void StoreMerged(const ItemOutput& o, int v4, const float4& a, float M,
                                            float Ls) {
  const float inv = Ls > 0.f ? 1.f / Ls : 0.f;
  StoreElem(o.out, o.out_dtype, v4 * 4 + 0, a.x * inv);
  StoreElem(o.out, o.out_dtype, v4 * 4 + 1, a.y * inv);
  StoreElem(o.out, o.out_dtype, v4 * 4 + 2, a.z * inv);
  StoreElem(o.out, o.out_dtype, v4 * 4 + 3, a.w * inv);
  if ((v4 * 4) % D == 0 && o.lse != nullptr) {
    o.lse[(v4 * 4) / D] = Ls > 0.f ? (M + log2f(Ls)) * kLn2 : -INFINITY;
  }
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, uint32_t src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The merge before the batched one (run 15), kept for A/B runs (KVMEM_ATTN_MERGE=legacy): pass 1
// (a warp per query head, lanes over splits) for (max, sum), then per chunk of splits the
// weights in shared memory and 8 splits of 16-byte loads in flight per thread.
template <int D, int G, int NG>
__device__ __noinline__ void LegacyMerge(CombineArea<D, G, NG>& ca, const ItemOutput& o,
                                         uint32_t ns) {
  constexpr float kNegInf = -INFINITY;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const uint32_t PF = PartialFloats(G, D);
  const int warp = tid >> 5;
  // Pass 1 (a warp per query head, lanes over splits): running (max, sum) per lane, then the
  // log-sum-exp combine across lanes. Loads are independent: one L2 round trip per 32 splits.
  for (int g = warp; g < G; g += kThreads / 32) {
    float M = kNegInf, Ls = 0.f;
    for (uint32_t sp = lane; sp < ns; sp += 32) {
      const float* part = o.partials + static_cast<size_t>(sp) * PF;
      const float ms = __ldcg(part + g), ls = __ldcg(part + G + g);
      if (ms != kNegInf) {
        const float mn = fmaxf(M, ms);
        Ls = Ls * exp2f(M - mn) + ls * exp2f(ms - mn);
        M = mn;
      }
    }
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, M, off);
      const float lo = __shfl_xor_sync(0xffffffffu, Ls, off);
      const float mn = fmaxf(M, mo);
      if (mn != kNegInf) {
        Ls =
            (M == kNegInf ? 0.f : Ls * exp2f(M - mn)) + (mo == kNegInf ? 0.f : lo * exp2f(mo - mn));
        M = mn;
      }
    }
    if (lane == 0) {
      ca.mg[g] = M;
      ca.lg[g] = Ls;
    }
  }
  __syncthreads();
  // Pass 2, per chunk of splits: weights w[s][g] in shared memory, then each thread adds its
  // 4 consecutive outputs of every split with one 16-byte load (G*D/4 <= 4 per thread).
  constexpr int kVec = G * D / 4;
  constexpr int KO = (kVec + kThreads - 1) / kThreads;
  float4 A[KO];
#pragma unroll
  for (int j = 0; j < KO; ++j) A[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (uint32_t c0 = 0; c0 < ns; c0 += kMergeChunk) {
    const uint32_t cn = min(static_cast<uint32_t>(kMergeChunk), ns - c0);
    for (uint32_t i = tid; i < cn * G; i += kThreads) {
      const uint32_t g = i % G;
      const float ms = __ldcg(o.partials + static_cast<size_t>(c0 + i / G) * PF + g);
      const float M = ca.mg[g];
      ca.w[i] = (ms == kNegInf || M == kNegInf) ? 0.f : exp2f(ms - M);
    }
    __syncthreads();
    const float* base = o.partials + static_cast<size_t>(c0) * PF + PartialAccOffset(G);
#pragma unroll 8
    for (uint32_t sp = 0; sp < cn; ++sp) {
#pragma unroll
      for (int j = 0; j < KO; ++j) {
        const int v4 = tid + j * kThreads;
        if (v4 < kVec) {
          const float4 a =
              __ldcg(reinterpret_cast<const float4*>(base + static_cast<size_t>(sp) * PF) + v4);
          const float w = ca.w[sp * G + (v4 * 4) / D];
          A[j].x = fmaf(a.x, w, A[j].x);
          A[j].y = fmaf(a.y, w, A[j].y);
          A[j].z = fmaf(a.z, w, A[j].z);
          A[j].w = fmaf(a.w, w, A[j].w);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < KO; ++j) {
    const int v4 = tid + j * kThreads;
    if (v4 < kVec) {
      const int g = (v4 * 4) / D;
      StoreMerged<D>(o, v4, A[j], ca.mg[g], ca.lg[g]);
    }
  }
}

// Blocks in this block's thread-block cluster (1 in a launch without clusters).
__device__ __forceinline__ uint32_t ClusterBlocks() {
  uint32_t n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  return n;
}

// Output (g, d) of a block's state from its NG warp groups' states in `ca`: the largest max M,
// and the sums of l and acc rescaled to it (M = -inf, Ls = A = 0 when no group saw a token).
template <int D, int G, int NG>
__device__ __forceinline__ void CombineGroups(const CombineArea<D, G, NG>& ca, int g, int d,
                                              float* M_out, float* Ls_out, float* A_out) {
  constexpr float kNegInf = -INFINITY;
  float M = kNegInf;
#pragma unroll
  for (int r = 0; r < NG; ++r) M = fmaxf(M, ca.m[r * G + g]);
  float Ls = 0.f, A = 0.f;
  if (M != kNegInf) {
#pragma unroll
    for (int r = 0; r < NG; ++r) {
      const float mr = ca.m[r * G + g];
      const float w = mr == kNegInf ? 0.f : exp2f(mr - M);
      Ls = fmaf(ca.l[r * G + g], w, Ls);
      A = fmaf(ca.acc[(r * G + g) * D + d], w, A);
    }
  }
  *M_out = M;
  *Ls_out = Ls;
  *A_out = A;
}

// After the NG partial states of the block are in `ca` (and a barrier): combine them, then
// write the output (one split) or a partial, and let the task's last split merge all partials.
// In a cluster launch (C = cluster blocks > 1; the planner puts C consecutive splits of one task
// in each cluster, split % C = cluster rank) the C blocks first combine their states through
// distributed shared memory, each rank one slice of the G x D outputs: a task that is one cluster
// writes its output without any global partial, counter or second pass; a task of several
// clusters writes one partial per cluster and its last block merges those.
template <int D, int G, int NG>
__device__ __forceinline__ void CombineAndMerge(RunTable& rt, CombineArea<D, G, NG>& ca,
                                                const ItemOutput& o) {
  constexpr float kNegInf = -INFINITY;
  const int tid = threadIdx.x;
  const uint32_t PF = PartialFloats(G, D);
  const uint32_t C = ClusterBlocks();
  uint32_t nparts = o.num_splits;  // partial states the task's last block merges
  if (C > 1) {
    // The block's state in its own shared memory, laid out as a partial (ca.w is free here).
    float* st = ca.w;
    for (int idx = tid; idx < G * D; idx += kThreads) {
      const int g = idx / D, d = idx % D;
      float M, Ls, A;
      CombineGroups(ca, g, d, &M, &Ls, &A);
      if (d == 0) {
        st[g] = M;
        st[G + g] = Ls;
      }
      st[PartialAccOffset(G) + idx] = A;
    }
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every rank's state is visible
    const uint32_t rank = cluster.block_rank();
    nparts = o.num_splits / C;
    const uint32_t part = o.split / C;
    const uint32_t E = G * D / C;  // outputs per rank
    for (uint32_t idx = rank * E + tid; idx < (rank + 1) * E; idx += kThreads) {
      const uint32_t g = idx / D, d = idx % D;
      constexpr uint32_t kMaxC = 16;
      float mr[kMaxC], lr[kMaxC], ar[kMaxC];
#pragma unroll
      for (uint32_t r = 0; r < kMaxC; ++r) {
        if (r < C) {
          const float* rs = cluster.map_shared_rank(st, r);
          mr[r] = rs[g];
          lr[r] = rs[G + g];
          ar[r] = rs[PartialAccOffset(G) + idx];
        }
      }
      float M = kNegInf;
#pragma unroll
      for (uint32_t r = 0; r < kMaxC; ++r) {
        if (r < C) M = fmaxf(M, mr[r]);
      }
      float Ls = 0.f, A = 0.f;
      if (M != kNegInf) {
#pragma unroll
        for (uint32_t r = 0; r < kMaxC; ++r) {
          if (r < C) {
            const float w = mr[r] == kNegInf ? 0.f : exp2f(mr[r] - M);
            Ls = fmaf(lr[r], w, Ls);
            A = fmaf(ar[r], w, A);
          }
        }
      }
      if (nparts == 1) {
        StoreElem(o.out, o.out_dtype, idx, Ls > 0.f ? A / Ls : 0.f);
        if (d == 0 && o.lse != nullptr) o.lse[g] = Ls > 0.f ? (M + log2f(Ls)) * kLn2 : kNegInf;
      } else {
        float* pp = o.partials + static_cast<size_t>(part) * PF;
        if (d == 0) {
          pp[g] = M;
          pp[G + g] = Ls;
        }
        pp[PartialAccOffset(G) + idx] = A;
      }
    }
    cluster.sync();  // no rank reuses or leaves its shared memory while another reads it
    if (nparts == 1) {
      TraceStamp(o, 6);
      TraceStamp(o, 7);
      return;
    }
  } else {
    for (int idx = tid; idx < G * D; idx += kThreads) {
      const int g = idx / D, d = idx % D;
      float M, Ls, A;
      CombineGroups(ca, g, d, &M, &Ls, &A);
      if (o.num_splits == 1) {
        StoreElem(o.out, o.out_dtype, idx, Ls > 0.f ? A / Ls : 0.f);
        if (d == 0 && o.lse != nullptr) o.lse[g] = Ls > 0.f ? (M + log2f(Ls)) * kLn2 : kNegInf;
      } else {
        float* part = o.partials + static_cast<size_t>(o.split) * PF;
        if (d == 0) {
          part[g] = M;
          part[G + g] = Ls;
        }
        part[PartialAccOffset(G) + idx] = A;
      }
    }
    if (o.num_splits == 1) {
      if (o.trace != nullptr) {  // uniform over the block; no barrier when not tracing
        __syncthreads();
        TraceStamp(o, 6);
        TraceStamp(o, 7);
      }
      return;
    }
  }

  // Last split of the task merges.
  if (o.legacy_merge) {  // threadFenceReduction pattern: every thread fences (fence.sc)
    __threadfence();
    __syncthreads();
    if (tid == 0) rt.is_last = atomicAdd(o.counter, 1u) == o.num_splits - 1;
    __syncthreads();
    if (!rt.is_last) return;
    __threadfence();
  } else {
    // The barrier orders the block's partial writes before thread 0's acq_rel atomic, which
    // releases them and, in the last block, acquires the others' (the barrier then orders the
    // merge's reads after it): one fenced atomic instead of a fence per thread + an atomic.
    __syncthreads();
    if (tid == 0) {
      uint32_t prev;
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n"
                   : "=r"(prev)
                   : "l"(o.counter)
                   : "memory");
      rt.is_last = prev == o.num_splits - 1;
    }
    __syncthreads();
    TraceStamp(o, 6);
    if (!rt.is_last) {
      TraceStamp(o, 7);
      return;
    }
  }
  const uint32_t ns = nparts;
  if (o.legacy_merge) {
    LegacyMerge<D, G, NG>(ca, o, ns);
    if (tid == 0) *o.counter = 0;
    return;
  }
  // Merge, online over batches of kB splits: each thread loads (m, l, 4 outputs) of kB splits at
  // once (independent loads: one L2 round trip per batch, no shared memory, no barrier), then
  // folds them into its running (max, sum, outputs).
  constexpr int kVec = G * D / 4;  // float4 outputs of the task
  constexpr int KO = (kVec + kThreads - 1) / kThreads;
  constexpr int kB = KO == 1 ? 16 : 8;
  float Mj[KO], Lj[KO];
  float4 A[KO];
#pragma unroll
  for (int j = 0; j < KO; ++j) {
    Mj[j] = kNegInf;
    Lj[j] = 0.f;
    A[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  for (uint32_t b0 = 0; b0 < ns; b0 += kB) {
    float mb[KO][kB], lb[KO][kB];
    float4 ab[KO][kB];
#pragma unroll
    for (int j = 0; j < KO; ++j) {
      const int v4 = tid + j * kThreads;
      const int g = (v4 * 4) / D;
#pragma unroll
      for (int u = 0; u < kB; ++u) {
        mb[j][u] = kNegInf;
        lb[j][u] = 0.f;
        ab[j][u] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (v4 < kVec && b0 + u < ns) {
          const float* part = o.partials + static_cast<size_t>(b0 + u) * PF;
          mb[j][u] = __ldcg(part + g);
          lb[j][u] = __ldcg(part + G + g);
          ab[j][u] = __ldcg(reinterpret_cast<const float4*>(part + PartialAccOffset(G)) + v4);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < KO; ++j) {
      float mn = Mj[j];
#pragma unroll
      for (int u = 0; u < kB; ++u) mn = fmaxf(mn, mb[j][u]);
      if (mn == kNegInf) continue;
      const float sc = Mj[j] == kNegInf ? 0.f : exp2f(Mj[j] - mn);
      Lj[j] *= sc;
      A[j].x *= sc;
      A[j].y *= sc;
      A[j].z *= sc;
      A[j].w *= sc;
#pragma unroll
      for (int u = 0; u < kB; ++u) {
        const float w = mb[j][u] == kNegInf ? 0.f : exp2f(mb[j][u] - mn);
        Lj[j] = fmaf(lb[j][u], w, Lj[j]);
        A[j].x = fmaf(ab[j][u].x, w, A[j].x);
        A[j].y = fmaf(ab[j][u].y, w, A[j].y);
        A[j].z = fmaf(ab[j][u].z, w, A[j].z);
        A[j].w = fmaf(ab[j][u].w, w, A[j].w);
      }
      Mj[j] = mn;
    }
  }
#pragma unroll
  for (int j = 0; j < KO; ++j) {
    const int v4 = tid + j * kThreads;
    if (v4 < kVec) {
      StoreMerged<D>(o, v4, A[j], Mj[j], Lj[j]);
    }
  }
  if (tid == 0) *o.counter = 0;  // ready for the next launch on this workspace
  if (o.trace != nullptr) {
    __syncthreads();
    TraceStamp(o, 7);
  }
}

// Runs one item: `nruns` runs in the table, `ntok` tokens in total. Each thread streams its own
// 16-byte slices of K/V rows through a kStages-deep cp.async pipeline in shared memory and reads
// back only what it copied itself, so the loop needs no block barrier.
template <int D, int G, typename KV>
__device__ __forceinline__ void RunItemSimt(RunTable& rt, uint4* dyn, const KV* __restrict__ kbase,
                                            const KV* __restrict__ vbase, int nruns, uint32_t ntok,
                                            const void* q, DType q_dtype, float scale,
                                            const ItemOutput& o) {
  using S = Shape<D, G>;
  constexpr int L = S::kLanes;
  constexpr int NG = S::kGroups;
  constexpr int U = S::kUnroll;
  constexpr int ST = S::kStages;
  constexpr float kNegInf = -INFINITY;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int grp = (tid >> 5) * S::kGroupsPerWarp + lane / L;
  const int sub = lane % L;
  const uint32_t step = NG * U;
  const uint32_t iters = (ntok + step - 1) / step;

  float qf[G][8];
  const float qs = scale * kLog2e;
  WithElemType(q_dtype, [&](auto e) {
    using E = decltype(e);
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[g][i] = LoadAs<E>(q, g * D + sub * 8 + i) * qs;
    }
  });
  __syncthreads();  // run table filled by the caller

  // Issue cursor: run e, row t, for position grp + k * NG.
  int e = 0;
  uint32_t t = grp;
  while (e < nruns && t >= rt.len[e]) t -= rt.len[e++];
  auto slot = [&](int st, int u, int kv) { return dyn + ((st * U + u) * 2 + kv) * kThreads + tid; };
  auto issue = [&](int st, uint32_t it) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool v = it * step + u * NG + grp < ntok;
      const KV* kp = v ? kbase + rt.k_off[e] + static_cast<uint64_t>(t) * D + sub * 8 : kbase;
      const KV* vp = v ? vbase + rt.v_off[e] + static_cast<uint64_t>(t) * D + sub * 8 : vbase;
      CpAsync16(slot(st, u, 0), kp, v ? 16u : 0u);  // 0: zero-fill, nothing read
      CpAsync16(slot(st, u, 1), vp, v ? 16u : 0u);
      if (v) {
        t += NG;
        while (e < nruns && t >= rt.len[e]) t -= rt.len[e++];
      }
    }
    CpAsyncCommit();
  };

  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = kNegInf;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }

#pragma unroll
  for (int st = 0; st < ST - 1; ++st) {
    if (static_cast<uint32_t>(st) < iters)
      issue(st, st);
    else
      CpAsyncCommit();
  }
  for (uint32_t it = 0; it < iters; ++it) {
    const uint32_t nx = it + ST - 1;
    if (nx < iters)
      issue(nx % ST, nx);
    else
      CpAsyncCommit();
    CpAsyncWait<ST - 1>();  // group `it` has landed
    const int st = it % ST;
    float s[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      Unpack8<KV>(*slot(st, u, 0), kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float a = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) a = fmaf(qf[g][i], kf[i], a);
        s[u][g] = a;
      }
    }
#pragma unroll
    for (int off = L / 2; off >= 1; off >>= 1) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int g = 0; g < G; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (it * step + u * NG + grp >= ntok) {
#pragma unroll
        for (int g = 0; g < G; ++g) s[u][g] = kNegInf;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = s[0][g];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][g]);
      const float mn = fmaxf(m[g], mx);
      if (mn == kNegInf) continue;  // no row yet for this group
      const float alpha = exp2f(m[g] - mn);
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= alpha;
      m[g] = mn;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      Unpack8<KV>(*slot(st, u, 1), vf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        // Masked rows have s = -inf: p = 0. m = -inf means no row yet (avoid -inf - -inf).
        const float p = m[g] == kNegInf ? 0.f : exp2f(s[u][g] - m[g]);
        l[g] += p;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
      }
    }
  }
  CpAsyncWait<0>();
  __syncthreads();  // the pipeline area becomes the combine area

  CombineArea<D, G, NG> ca(reinterpret_cast<float*>(dyn));
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      ca.m[grp * G + g] = m[g];
      ca.l[grp * G + g] = l[g];
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float4* dst = reinterpret_cast<float4*>(&ca.acc[(grp * G + g) * D + sub * 8]);
    dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
  }
  __syncthreads();
  CombineAndMerge<D, G, NG>(rt, ca, o);
}

// ---- Tensor-core path (head_dim 128) --------------------------------------------------------
// Each warp streams its own tiles of 16 token rows (K and V, ~8 KB a stage) through a 3-stage
// pipeline and runs, transposed so that the 16 MMA rows are tokens or output dims and the 8
// columns are the query heads of the group (G of them real):
//   S^T[16 tokens x 8] = K_tile[16 x 128] · Q^T[128 x 8]          (mma.m16n8k16, fp32 accumulate)
//   O^T[128 x 8] += V_tile^T[128 x 16] · P^T[16 x 8]              (P^T from S^T by movmatrix)
// 24 MMAs per tile (8 for S^T, 8 x 2 for O^T), against 48 with the heads as the rows (measured:
// 3-6% faster at every batch, budget and dense size on the H200, session 12).
// Products are exact to fp32 level: P is split into two 16-bit halves (hi + lo) and so is q when
// it is not already of the K/V type.
// Copy modes (the kTC template value; AttendPath picks one per plan, KVMEM_ATTN_PATH forces one):
//   1 cp.async: 16-byte copies into 256-byte rows with the 16-byte chunks XOR-swizzled;
//   2 bulk rows: one 256-byte cp.async.bulk per row (lane), rows padded to 272 bytes;
//   3 bulk row pairs: one 512-byte cp.async.bulk per two rows of a run, pairs in 528-byte slots
//     (half the bulk-copy instructions). The MMA rows / k of a tile are then its even tokens
//     (0-7) and its odd tokens (8-15), so the eight rows of each ldmatrix matrix lie in eight
//     different slots: conflict-free too.
// ldmatrix is conflict-free in every mode.
template <int G, int kCopy>
struct TCShape {
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kTile = 16;
  static constexpr int kStages = 3;
  static constexpr int kRowBytes = kCopy == 1 ? 256 : 272;  // modes 1 and 2
  static constexpr int kPairBytes = 528;                    // mode 3
  static constexpr int kHalfBytes = kCopy == 3 ? kTile / 2 * kPairBytes : kTile * kRowBytes;
  static constexpr size_t kStageBytes = 2 * kHalfBytes;  // K then V
  static constexpr size_t kPipeBytes = size_t{kWarps} * kStages * kStageBytes;
  static constexpr size_t kCombineBytes = CombineArea<128, G, kWarps>::kBytes;
  static constexpr size_t kDynBytes = kPipeBytes > kCombineBytes ? kPipeBytes : kCombineBytes;
};

// D[16 x 8] += A[16 x 16] · B[16 x 8] (A = K or V^T tiles from ldmatrix, B = Q^T or P^T).
template <typename KV>
__device__ __forceinline__ void Mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<KV, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void Ldsm4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Ldsm4T(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The 8 x 8 matrix of 16-bit values whose fragment (row lane / 4, columns 2 (lane % 4) + {0, 1})
// the warp holds in x, transposed: the same positions of its transpose.
__device__ __forceinline__ uint32_t MovTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Rounds (x, y) to the 16-bit type; hi + lo reproduces them to ~16 significant bits.
template <typename KV>
__device__ __forceinline__ void Split2(float x, float y, uint32_t* hi, uint32_t* lo) {
  if constexpr (std::is_same_v<KV, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    const float2 hf = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x - hf.x, y - hf.y);
    memcpy(hi, &h, 4);
    memcpy(lo, &l, 4);
  } else {
    const __half2 h = __floats2half2_rn(x, y);
    const float2 hf = __half22float2(h);
    const __half2 l = __floats2half2_rn(x - hf.x, y - hf.y);
    memcpy(hi, &h, 4);
    memcpy(lo, &l, 4);
  }
}
__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void MbarExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void BulkCopy(uint32_t dst, const void* src, uint32_t bytes,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}


template <int G, typename KV, int kCopy>
__device__ __forceinline__ void RunItemTC(RunTable& rt, uint4* dyn, const KV* __restrict__ kbase,
                                          const KV* __restrict__ vbase, int nruns, uint32_t ntok,
                                          const void* q, DType q_dtype, float scale,
                                          const ItemOutput& o) {
  constexpr int D = 128;
  using T = TCShape<G, kCopy>;
  constexpr bool kAsync = kCopy == 1;  // cp.async groups to commit and wait for
  constexpr bool kPairs = kCopy == 3;
  constexpr int RB = T::kRowBytes;
  constexpr int W = T::kWarps;
  constexpr int ST = T::kStages;
  constexpr float kNegInf = -INFINITY;
  static_assert(G <= 8, "the MMA's 8 columns are the group's query heads");
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int h = lane >> 2;  // fragment row group: Q's head, S^T's token, O^T's dim (mod 8)
  const int quad = lane & 3;
  const uint32_t iters = (ntok + W * 16 - 1) / (W * 16);

  __syncthreads();  // run table filled by the caller
  TraceStamp(o, 1);

  const uint32_t smem0 = static_cast<uint32_t>(__cvta_generic_to_shared(dyn));
  auto stage_k = [&](int st) {
    return smem0 + static_cast<uint32_t>((warp * ST + st) * T::kStageBytes);
  };
  // Run cursor (run e, row t, the run's offsets cached in registers) for row `crow` of the warp's
  // current tile; advance(n) moves it n rows on.
  // cp.async: for each j the warp reads rows 2j and 2j+1 whole (coalesced), crow = lane / 16.
  // bulk rows: lane copies one row, crow = lane % 16, K for lanes 0-15 and V for 16-31.
  // bulk pairs: lanes 0-7 copy K rows 2 (lane % 8) and the next, lanes 8-15 V's; crow the first.
  const int crow = kPairs ? 2 * (lane & 7) : kAsync ? (lane >> 4) : (lane & 15);
  int e = 0;
  uint32_t t = warp * 16 + crow;
  uint32_t len_e = nruns > 0 ? rt.len[0] : 0xffffffffu;
  uint64_t ko = nruns > 0 ? rt.k_off[0] : 0, vo = nruns > 0 ? rt.v_off[0] : 0;
  auto advance = [&](uint32_t n) {
    t += n;
    while (t >= len_e) {  // len_e is ~0 past the last run
      t -= len_e;
      ++e;
      if (e < nruns) {
        len_e = rt.len[e];
        ko = rt.k_off[e];
        vo = rt.v_off[e];
      } else {
        len_e = 0xffffffffu;
      }
    }
  };
  advance(0);
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(&rt.mbar[warp * ST]));
  if constexpr (!kAsync) {
    if (lane == 0) {
      for (int st = 0; st < ST; ++st) MbarInit(bar0 + st * 8, 1);
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncwarp();
  }
  // Zero-fills the 16-byte chunks [from, to) at dst: rows past the end are masked, but P^T V
  // must not meet stale NaNs.
  auto zero = [](uint32_t dst, uint32_t from, uint32_t to) {
    for (uint32_t i = from; i < to; ++i) {
      asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst + i * 16), "r"(0)
                   : "memory");
    }
  };
  auto issue = [&](int st, uint32_t it) {
    const uint32_t tile0 = (it * W + warp) * 16;
    if (o.issue & kIssueNoCopy) {  // timing only: the math over whatever the stage holds
      if constexpr (kAsync) CpAsyncCommit();
      return;
    }
    const uint32_t nv = tile0 < ntok ? min(16u, ntok - tile0) : 0u;  // valid rows in the tile
    if constexpr (kAsync) {
      const int c = lane & 15;
      const uint32_t ks = stage_k(st), vs = ks + T::kHalfBytes;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int r = 2 * j + crow;
        const bool rv = static_cast<uint32_t>(r) < nv;
        const uint32_t off = static_cast<uint32_t>(r * RB + ((c ^ (r & 7)) * 16));
        const KV* kp = rv ? kbase + ko + static_cast<uint64_t>(t) * D + c * 8 : kbase;
        const KV* vp = rv ? vbase + vo + static_cast<uint64_t>(t) * D + c * 8 : vbase;
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(ks + off),
                     "l"(kp), "r"(rv ? 16u : 0u));
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(vs + off),
                     "l"(vp), "r"(rv ? 16u : 0u));
        if (j < 7) advance(2);
      }
      advance(W * 16 - 14);  // row `crow` of this warp's next tile
      CpAsyncCommit();
      return;
    }
    const uint32_t bar = bar0 + st * 8;
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // earlier reads first
    if (lane == 0) MbarExpectTx(bar, nv * 512);
    __syncwarp();
    if constexpr (kPairs) {
      if (lane < 16) {
        const int kv = lane >> 3;
        const uint32_t dst = stage_k(st) + kv * T::kHalfBytes + (lane & 7) * T::kPairBytes;
        const uint32_t r0 = static_cast<uint32_t>(crow);
        const KV* src = (kv ? vbase + vo : kbase + ko) + static_cast<uint64_t>(t) * D;
        uint32_t filled = 0;  // rows of the slot copied
        if (r0 + 1 < nv && t + 1 < len_e) {
          BulkCopy(dst, src, 512, bar);
          filled = 2;
        } else if (r0 < nv) {
          BulkCopy(dst, src, 256, bar);
          filled = 1;
          if (r0 + 1 < nv) {  // the slot's second row opens the next run
            BulkCopy(dst + 256, kv ? vbase + rt.v_off[e + 1] : kbase + rt.k_off[e + 1], 256, bar);
            filled = 2;
          }
        }
        zero(dst, filled * 16, 32);
      }
    } else {
      const int kv = lane >> 4;
      const uint32_t dst = stage_k(st) + kv * T::kHalfBytes + crow * RB;
      if (static_cast<uint32_t>(crow) < nv) {
        BulkCopy(dst, (kv ? vbase + vo : kbase + ko) + static_cast<uint64_t>(t) * D, 256, bar);
      } else {
        zero(dst, 0, 16);
      }
    }
    advance(W * 16);
  };
  // The tile's token at MMA row (S^T) or k (O^T) 8 half + row (row < 8): with pairs its even
  // tokens, then its odd ones (so the eight rows of an ldmatrix matrix lie in eight slots).
  auto row_token = [](int half, int row) { return kPairs ? 2 * row + half : 8 * half + row; };
  // Address of 16-byte chunk c of row r in a K or V stage half.
  auto chunk_addr = [&](uint32_t base, int r, int c) {
    if constexpr (kPairs) return base + (r >> 1) * T::kPairBytes + (r & 1) * 256 + c * 16;
    if constexpr (kAsync) return base + r * RB + ((c ^ (r & 7)) * 16);
    return base + r * RB + c * 16;
  };

  // ot[n] = O^T for dims 16n + h (and + 8) and heads 2 quad + {0, 1}; mt / lt the running max
  // and sum of those two heads (over this thread's tokens; lt summed over the warp at the end).
  float ot[8][4];
#pragma unroll
  for (auto& r : ot) r[0] = r[1] = r[2] = r[3] = 0.f;
  float mt[2] = {kNegInf, kNegInf}, lt[2] = {0.f, 0.f};

#pragma unroll
  for (int st = 0; st < ST - 1; ++st) {
    if (static_cast<uint32_t>(st) < iters) {
      issue(st, st);
    } else if constexpr (kAsync) {
      CpAsyncCommit();
    }
  }
  TraceStamp(o, 2);
  // Q fragments after the first copies are in flight (column = head = lane / 4, zero past G; all
  // 16 pairs of loads in flight at once, the dtype branch outside them): the B operand of S^T.
  uint32_t qhi[8][2], qlo[8][2];
  const bool need_lo = q_dtype != (std::is_same_v<KV, __nv_bfloat16> ? DType::kBF16 : DType::kF16);
  {
    float2 qv[8][2];
    WithElemType(q_dtype, [&](auto e) {
      using E = decltype(e);
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int d = kk * 16 + half * 8 + quad * 2;
          qv[kk][half] = h < G ? LoadPairAs<E>(q, h * D + d) : make_float2(0.f, 0.f);
        }
      }
    });
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        Split2<KV>(qv[kk][half].x, qv[kk][half].y, &qhi[kk][half], &qlo[kk][half]);
      }
    }
  }
  TraceStamp(o, 3);
  const float qs = scale * kLog2e;
  // ldmatrix lane addressing: matrix mi = lane / 8, row mr = lane % 8.
  const int mi = lane >> 3, mr = lane & 7;
  for (uint32_t it = 0; it < iters; ++it) {
    const uint32_t nx = it + ST - 1;
    if (nx < iters) {
      issue(nx % ST, nx);
    } else if constexpr (kAsync) {
      CpAsyncCommit();
    }
    if constexpr (kAsync) {
      CpAsyncWait<ST - 1>();
    } else if (!(o.issue & kIssueNoCopy)) {
      MbarWait(bar0 + (it % ST) * 8, (it / ST) & 1);
    }
    if (it == 0) TraceStamp(o, 4);
    __syncwarp();
    if (o.issue & kIssueNoMath) continue;  // timing only: the copies without the math
    const uint32_t ks = stage_k(it % ST), vs = ks + T::kHalfBytes;
    // S^T = K Q^T: st[.][0..1] row h, heads 2 quad + {0, 1}; st[.][2..3] row h + 8 (rows =
    // tokens; with pairs the even tokens, then the odd). Two accumulators (even / odd dim
    // slices) halve the chain of dependent MMAs.
    float st[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    {
      const int tok = row_token(mi & 1, mr);
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        uint32_t a[4];
        Ldsm4(a, chunk_addr(ks, tok, 2 * kk + (mi >> 1)));
        Mma16816<KV>(st[kk & 1], a, qhi[kk][0], qhi[kk][1]);
        if (need_lo) Mma16816<KV>(st[kk & 1], a, qlo[kk][0], qlo[kk][1]);
      }
    }
    const uint32_t base_pos = (it * W + warp) * 16;
    const uint32_t t0 = row_token(0, h), t1 = row_token(1, h);
    const bool v0 = base_pos + t0 < ntok, v1 = base_pos + t1 < ntok;
    float p[4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {  // query head 2 quad + j
      const float x0 = v0 ? (st[0][j] + st[1][j]) * qs : kNegInf;
      const float x1 = v1 ? (st[0][2 + j] + st[1][2 + j]) * qs : kNegInf;
      float mx = fmaxf(x0, x1);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float mn = fmaxf(mt[j], mx);
      const float ms = mn == kNegInf ? 0.f : mn;  // no token yet: alpha and p are 0
      const float alpha = exp2f(mt[j] - ms);
      lt[j] *= alpha;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        ot[n][j] *= alpha;
        ot[n][2 + j] *= alpha;
      }
      p[j] = exp2f(x0 - ms);
      p[2 + j] = exp2f(x1 - ms);
      lt[j] += p[j] + p[2 + j];
      mt[j] = mn;
    }
    // P^T as the B operand: the (token, head) fragments transposed to (head, token) ones.
    uint32_t r0hi, r0lo, r1hi, r1lo;
    Split2<KV>(p[0], p[1], &r0hi, &r0lo);
    Split2<KV>(p[2], p[3], &r1hi, &r1lo);
    const uint32_t b0hi = MovTrans(r0hi), b1hi = MovTrans(r1hi);
    const uint32_t b0lo = MovTrans(r0lo), b1lo = MovTrans(r1lo);
    // O^T[dims 16n + ..][heads] += V^T[dims][tokens] P^T[tokens][heads].
    {
      const int tok = row_token(mi >> 1, mr);
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        uint32_t a[4];
        Ldsm4T(a, chunk_addr(vs, tok, 2 * n + (mi & 1)));
        Mma16816<KV>(ot[n], a, b0hi, b1hi);
        Mma16816<KV>(ot[n], a, b0lo, b1lo);
      }
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  if constexpr (kAsync) CpAsyncWait<0>();
  __syncthreads();  // the pipeline area becomes the combine area
  TraceStamp(o, 5);

  CombineArea<D, G, W> ca(reinterpret_cast<float*>(dyn));
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    lt[j] += __shfl_xor_sync(0xffffffffu, lt[j], 4);
    lt[j] += __shfl_xor_sync(0xffffffffu, lt[j], 8);
    lt[j] += __shfl_xor_sync(0xffffffffu, lt[j], 16);
    const int hh = 2 * quad + j;
    if (hh < G) {
      if (h == 0) {
        ca.m[warp * G + hh] = mt[j];
        ca.l[warp * G + hh] = lt[j];
      }
      float* acc = &ca.acc[(warp * G + hh) * D + h];
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        acc[16 * n] = ot[n][j];
        acc[16 * n + 8] = ot[n][2 + j];
      }
    }
  }
  __syncthreads();
  CombineAndMerge<D, G, W>(rt, ca, o);
}

// Kernel paths (kTC): 0 CUDA cores (any head_dim); tensor cores fed by 1 cp.async, 2 bulk copies
// of rows, 3 bulk copies of row pairs (TCShape).
template <int D, int G, typename KV, int kTC>
__device__ __forceinline__ void RunItem(RunTable& rt, uint4* dyn, const KV* __restrict__ kbase,
                                        const KV* __restrict__ vbase, int nruns, uint32_t ntok,
                                        const void* q, DType q_dtype, float scale,
                                        const ItemOutput& o) {
  if constexpr (kTC != 0) {
    static_assert(D == 128, "tensor-core path is for head_dim 128");
    RunItemTC<G, KV, kTC>(rt, dyn, kbase, vbase, nruns, ntok, q, q_dtype, scale, o);
  } else {
    RunItemSimt<D, G, KV>(rt, dyn, kbase, vbase, nruns, ntok, q, q_dtype, scale, o);
  }
}

template <int D, int G, int kTC>
constexpr size_t DynBytes() {
  if constexpr (kTC != 0) return TCShape<G, kTC>::kDynBytes;
  return Shape<D, G>::kDynBytes;
}

template <int D, int G, int kTC>
constexpr int MinBlocks() {
  if constexpr (kTC != 0) return 2;
  return G <= 4 ? 4 : 2;
}

// The attention of LaunchSearchAttend: this block's runs from what the search left (detail::
// SearchRunHeader): split s of S takes the task's entries s, s + S, ... (the selected chunks in
// selection order, then the fixed pieces), so no block needs another's runs or a prefix over
// them. Loads: the item, the header and the block's selected chunk ids at once (with uniform
// splits the task is known from the block index), then each entry's chunk size, start and block
// (or its fixed piece). Returns the runs and sets *ntok to their tokens.
template <int D>
__device__ __forceinline__ int RunsFromSearch(RunTable& rt, const AttendItemDesc& item,
                                              const SearchRunHeader* __restrict__ src,
                                              const uint32_t* __restrict__ selected,
                                              uint32_t max_selected, uint32_t uniform_splits,
                                              uint32_t* ntok) {
  constexpr int kPer = static_cast<int>(kMaxRunsPerItem) / kThreads;
  static_assert(kPer * kThreads == static_cast<int>(kMaxRunsPerItem));
  __shared__ uint32_t warp_tok[kThreads / 32], warp_runs[kPer][kThreads / 32];
  const uint32_t b = blockIdx.x, tid = threadIdx.x;
  const uint32_t S = uniform_splits ? uniform_splits : item.num_splits;
  const uint32_t task = uniform_splits ? b / S : item.task, s = uniform_splits ? b % S : item.split;
  uint32_t c_sel[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const uint32_t i = s + S * (tid + u * kThreads);
    c_sel[u] = i < max_selected ? selected[static_cast<size_t>(task) * max_selected + i] : 0;
  }
  const SearchRunHeader h = src[task];
  const uint32_t E = h.entries;
  const int n_entries = E > s ? static_cast<int>(min((E - s + S - 1) / S, kMaxRunsPerItem)) : 0;
  uint64_t k0[kPer], v0[kPer];
  uint32_t len[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int r = static_cast<int>(tid) + u * kThreads;
    len[u] = 0;
    k0[u] = v0[u] = 0;
    if (r >= n_entries) continue;
    const uint32_t i = s + S * r;
    if (i < h.nsel) {  // its tokens outside the sink and recent pieces
      const uint32_t c = c_sel[u];
      const uint32_t t = h.chunk_tokens[c];
      const uint64_t kb = h.chunk_block[c];
      const ChunkEdges x = EdgesOf(h.chunk_start[c], t, h.sink_tokens, h.recent_from);
      len[u] = x.selected();
      k0[u] = kb + (static_cast<uint64_t>(h.kv_head) * t + x.a) * D;
      v0[u] = kb + (static_cast<uint64_t>(h.kv_heads + h.kv_head) * t + x.a) * D;
    } else {
      const AttendRunDesc f = h.fixed[i - h.nsel];
      k0[u] = f.k_off;
      v0[u] = f.v_off;
      len[u] = f.len;
    }
  }
  // Empty entries (a selected chunk wholly inside the sink or recent pieces) are left out: the
  // token loops take a run's successor as non-empty (the row pairs' second row).
  const uint32_t lane = tid & 31, warp = tid >> 5;
  uint32_t keep[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    keep[u] = __ballot_sync(0xffffffffu, len[u] > 0);
    if (lane == 0) warp_runs[u][warp] = __popc(keep[u]);
  }
  uint32_t mine = 0;
#pragma unroll
  for (int u = 0; u < kPer; ++u) mine += len[u];
  const uint32_t sum = __reduce_add_sync(0xffffffffu, mine);
  if (lane == 0) warp_tok[warp] = sum;
  __syncthreads();
  uint32_t n = 0, at = 0;
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    uint32_t before = at;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      before += w < static_cast<int>(warp) ? warp_runs[u][w] : 0u;
      at += warp_runs[u][w];
    }
    if (len[u] > 0) {
      const uint32_t r = before + __popc(keep[u] & ((1u << lane) - 1u));
      rt.k_off[r] = k0[u];
      rt.v_off[r] = v0[u];
      rt.len[r] = len[u];
    }
  }
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) n += warp_tok[w];
  *ntok = n;
  return static_cast<int>(at);
}

// kFromSearch: the attention of LaunchSearchAttend (its runs from what the search left); else
// the runs the plan carries. Two instantiations, so that the plan's path keeps its own code (one
// kernel with a runtime branch made it 0.1-0.4 us slower, session 20).
template <int D, int G, typename KV, int kTC, bool kFromSearch>
__global__ void __launch_bounds__(kThreads, MinBlocks<D, G, kTC>())
    SpanAttendKernel(const AttendItemDesc* __restrict__ items,
                     const AttendRunDesc* __restrict__ runs, uint32_t run_stride,
                     uint32_t* counters, float* partials, DType q_dtype, DType out_dtype,
                     bool legacy_merge, uint32_t issue, unsigned long long* trace,
                     const SearchRunHeader* __restrict__ src, const uint32_t* __restrict__ selected,
                     uint32_t max_selected, uint32_t uniform_splits) {
  __shared__ RunTable rt;
  extern __shared__ uint4 dyn[];
  if (trace != nullptr) {
    trace += static_cast<size_t>(blockIdx.x) * kAttendTracePoints;
    if (threadIdx.x == 0) trace[0] = GlobalTimer();
  }
  // Launched as a programmatic dependent of the tree search (LaunchSearchAttend): wait for its
  // writes. A no-op in an ordinary launch.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  int nruns = 0;
  uint32_t ntok = 0;
  AttendItemDesc item;
  if constexpr (kFromSearch) {
    item = items[blockIdx.x];
    nruns = RunsFromSearch<D>(rt, item, src, selected, max_selected, uniform_splits, &ntok);
  } else {
    // With a fixed run stride (item i's runs start at i * run_stride) the first kThreads runs
    // are loaded together with the item, not after it: one dependent global round trip less.
    const bool pre = threadIdx.x < run_stride;
    AttendRunDesc first{};
    if (pre) first = runs[static_cast<size_t>(blockIdx.x) * run_stride + threadIdx.x];
    item = items[blockIdx.x];
    nruns = static_cast<int>(item.run_end - item.run_begin);
    ntok = item.tokens;
    for (int i = threadIdx.x; i < nruns; i += kThreads) {
      const AttendRunDesc r = i < kThreads && pre ? first : runs[item.run_begin + i];
      const uint64_t head = uint64_t{item.task} * r.head_stride;  // 0 but in head-shared runs
      rt.k_off[i] = r.k_off + head;
      rt.v_off[i] = r.v_off + head;
      rt.len[i] = r.len;
    }
  }
  ItemOutput o{item.out,
               out_dtype,
               item.lse,
               item.num_splits,
               item.split,
               partials + static_cast<size_t>(item.partial_base) * PartialFloats(G, D),
               counters + item.task,
               legacy_merge,
               issue,
               trace};
  const KV* pool = static_cast<const KV*>(item.pool);
  RunItem<D, G, KV, kTC>(rt, dyn, pool, pool, nruns, ntok, item.q, q_dtype, item.scale, o);
}

template <int D, int G, typename KV, int kTC>
__global__ void __launch_bounds__(kThreads, MinBlocks<D, G, kTC>())
    DenseAttendKernel(const KV* __restrict__ k, const KV* __restrict__ v, uint32_t kv_heads,
                      uint32_t capacity, const uint32_t* __restrict__ seq_lens,
                      uint32_t split_tokens, const void* q, DType q_dtype, float scale, void* out,
                      DType out_dtype, float* lse, uint32_t* counters, float* partials,
                      bool legacy_merge, uint32_t issue) {
  __shared__ RunTable rt;
  extern __shared__ uint4 dyn[];
  const uint32_t split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const uint32_t task = b * kv_heads + h;
  const uint32_t len = seq_lens[b];
  const uint32_t a = min(len, split * split_tokens);
  const uint32_t ntok = min(len - a, split_tokens);
  if (threadIdx.x == 0) {
    const uint64_t row = (static_cast<uint64_t>(task) * capacity + a) * D;
    rt.k_off[0] = row;
    rt.v_off[0] = row;
    rt.len[0] = ntok;
  }
  const size_t osz = DTypeSizeDevice(out_dtype);
  ItemOutput o{static_cast<uint8_t*>(out) + static_cast<size_t>(task) * G * D * osz,
               out_dtype,
               lse ? lse + static_cast<size_t>(task) * G : nullptr,
               gridDim.x,
               split,
               partials + static_cast<size_t>(task) * gridDim.x * PartialFloats(G, D),
               counters + task,
               legacy_merge,
               issue,
               nullptr};
  const void* qt =
      static_cast<const uint8_t*>(q) + static_cast<size_t>(task) * G * D * DTypeSizeDevice(q_dtype);
  RunItem<D, G, KV, kTC>(rt, dyn, k, v, ntok > 0 ? 1 : 0, ntok, qt, q_dtype, scale, o);
}

// KVMEM_ATTN_MERGE=legacy: the merge of run 15 (two passes) and no early run loads, for A/B runs
// against the batched merge in the same process.
bool LegacyMergeEnv() {
  static const bool legacy = [] {
    const char* e = std::getenv("KVMEM_ATTN_MERGE");
    return e != nullptr && std::string(e) == "legacy";
  }();
  return legacy;
}

// KVMEM_ATTN_ISSUE=nocopy|nomath (diagnostics; wrong results): the tensor-core token loop without
// its copies or without its math, to see which part a configuration's time is.
uint32_t IssueEnv() {
  static const uint32_t issue = [] {
    const char* e = std::getenv("KVMEM_ATTN_ISSUE");
    const std::string v = e ? e : "";
    return v == "nocopy" ? kIssueNoCopy : v == "nomath" ? kIssueNoMath : 0u;
  }();
  return issue;
}

// Span plans whose splits hold at most this many tokens use the bulk row-pair copies (path 3),
// longer ones the bulk row copies (path 2). H200, session 12 (128K, same call): pairs 9.2 / 17.8 /
// 27.3 us at batch 1 budget 1024 / batch 8 budget 1024 / batch 8 budget 2048 (splits 128, 320,
// 576) against 9.9 / 18.7 / 27.9, equal at 1088, slower from 1152 (batch 32: 46.2 / 80.2 / 184.3
// against 45.5 / 78.2 / 179.5) and for the dense kernel's long splits. Those pairs had 2-way
// ldmatrix conflicts; conflict-free since session 13, they are not yet timed on long splits.
constexpr uint32_t kPairsMaxSplit = 1024;

// Path for head_dim 128 (other head dims: 0, CUDA cores): KVMEM_ATTN_PATH = "simt" (0),
// "tc-cpasync" (1), "tc-bulk" (2) or "tc-pairs" (3) forces one (debugging / A-B timing); else
// pairs for splits of at most kPairsMaxSplit tokens, bulk rows above.
int AttendPath(uint32_t D, uint32_t split_tokens) {
  static const int forced = [] {
    const char* e = std::getenv("KVMEM_ATTN_PATH");
    const std::string v = e ? e : "";
    return v == "simt"         ? 0
           : v == "tc-cpasync" ? 1
           : v == "tc-bulk"    ? 2
           : v == "tc-pairs"   ? 3
                               : -1;
  }();
  if (D != 128) return 0;
  if (forced >= 0) return forced;
  return split_tokens <= kPairsMaxSplit ? 3 : 2;
}

// The path of occupancy queries and the dense kernel (long splits).
constexpr uint32_t kLongSplit = 0xffffffffu;

// Calls f.template operator()<D, G, KV, kTC>() for the runtime shape and `path` (AttendPath);
// false when unsupported.
template <typename F>
bool Dispatch(uint32_t D, uint32_t G, DType kv, int path, F&& f) {
  auto by_kv = [&]<int d, int g>() {
    auto go = [&]<typename KV>() {
      if constexpr (d == 128) {
        if (path == 2) {
          f.template operator()<d, g, KV, 2>();
          return;
        }
        if (path == 3) {
          f.template operator()<d, g, KV, 3>();
          return;
        }
        if (path == 1) {
          f.template operator()<d, g, KV, 1>();
          return;
        }
      }
      f.template operator()<d, g, KV, 0>();
    };
    if (kv == DType::kBF16) {
      go.template operator()<__nv_bfloat16>();
      return true;
    }
    if (kv == DType::kF16) {
      go.template operator()<__half>();
      return true;
    }
    return false;
  };
  auto by_g = [&]<int d>() {
    switch (G) {
      case 1:
        return by_kv.template operator()<d, 1>();
      case 2:
        return by_kv.template operator()<d, 2>();
      case 4:
        return by_kv.template operator()<d, 4>();
      case 8:
        return by_kv.template operator()<d, 8>();
      default:
        return false;
    }
  };
  if (D == 64) return by_g.template operator()<64>();
  if (D == 128) return by_g.template operator()<128>();
  return false;
}

// Sets the dynamic shared-memory limit once per kernel; returns blocks resident per SM.
template <auto Kernel>
int PrepareKernel(size_t dyn) {
  static const int per_sm = [dyn] {
    int n = 0;
    if (cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(dyn)) != cudaSuccess ||
        cudaFuncSetAttribute(Kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, dyn) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  }();
  return per_sm;
}

size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Blocks of the attention kernel resident on the whole device at once (0: no device).
template <bool kDense>
uint32_t ResidentBlocks(uint32_t D, uint32_t G, DType kv) {
  const int sms = MultiprocessorCount();
  if (sms <= 0) return 0;
  int per_sm = 0;
  Dispatch(D, G, kv, AttendPath(D, kLongSplit), [&]<int d, int g, typename KV, int kTC>() {
    constexpr size_t kDyn = DynBytes<d, g, kTC>();
    per_sm = kDense ? PrepareKernel<DenseAttendKernel<d, g, KV, kTC>>(kDyn)
                    : PrepareKernel<SpanAttendKernel<d, g, KV, kTC, false>>(kDyn);
  });
  return static_cast<uint32_t>(per_sm * sms);
}

// Clusters of `c` blocks of the attention kernel the device runs at once (0: none or no device;
// cudaOccupancyMaxActiveClusters, cached per kernel and size).
template <auto Kernel>
int MaxClusters(size_t dyn, uint32_t c) {
  static int cache[5] = {-1, -1, -1, -1, -1};  // sizes 1, 2, 4, 8, 16
  int i = 0;
  while ((1u << i) < c && i < 4) ++i;
  if (cache[i] < 0) cache[i] = MaxActiveClusters(Kernel, 1u << i, kThreads, dyn);
  return cache[i];
}

template <bool kDense>
uint32_t ActiveClusters(uint32_t D, uint32_t G, DType kv, uint32_t c) {
  if (MultiprocessorCount() <= 0) return 0;
  int n = 0;
  Dispatch(D, G, kv, AttendPath(D, kLongSplit), [&]<int d, int g, typename KV, int kTC>() {
    constexpr size_t kDyn = DynBytes<d, g, kTC>();
    if constexpr (kDense) {
      PrepareKernel<DenseAttendKernel<d, g, KV, kTC>>(kDyn);
      n = MaxClusters<DenseAttendKernel<d, g, KV, kTC>>(kDyn, c);
    } else {
      PrepareKernel<SpanAttendKernel<d, g, KV, kTC, false>>(kDyn);
      n = MaxClusters<SpanAttendKernel<d, g, KV, kTC, false>>(kDyn, c);
    }
  });
  return static_cast<uint32_t>(n);
}

struct DenseGeometry {
  uint32_t split_tokens;
  uint32_t num_splits;
  uint32_t cluster;
  size_t counters_bytes;
  size_t partials_bytes;
};

// One wave when the work is small (splits = resident blocks / tasks), else splits of up to
// max_split_tokens.
DenseGeometry Geometry(const DenseAttendView& v, const DenseAttendOptions& opt) {
  DenseGeometry g{};
  const uint32_t G = v.q_heads / v.kv_heads;
  const uint64_t tasks = static_cast<uint64_t>(v.batch) * v.kv_heads;
  uint64_t target = opt.target_blocks;
  if (target == 0) {
    target = ResidentBlocks<true>(v.head_dim, G, v.kv_dtype);
    if (target == 0) target = 528;
  }
  const uint64_t per_task = std::max<uint64_t>(1, target / tasks);
  uint64_t split = (v.max_seq_len + per_task - 1) / per_task;
  split = std::clamp<uint64_t>(split, opt.min_split_tokens,
                               std::max(opt.min_split_tokens, opt.max_split_tokens));
  g.split_tokens = static_cast<uint32_t>(AlignUp(split, 64));
  g.num_splits = std::max<uint32_t>(1, (v.max_seq_len + g.split_tokens - 1) / g.split_tokens);
  // Clusters of splits combine through distributed shared memory (see CombineAndMerge): the
  // largest power of two <= the split count, up to 8 (KVMEM_ATTN_CLUSTER: off or a size), the
  // split count rounded up to a multiple of it (splits past the end are empty).
  // Automatic sizes only where all clusters of the launch run at once.
  g.cluster = AttendClusterSize(opt.cluster, g.num_splits, 8);
  if ((opt.cluster == 0 ? AttendClusterEnv() : opt.cluster) == kAttendClusterAuto) {
    while (g.cluster > 1 &&
           ActiveClusters<true>(v.head_dim, G, v.kv_dtype, g.cluster) <
               tasks * AlignUp(g.num_splits, g.cluster) / g.cluster) {
      g.cluster /= 2;
    }
  }
  g.num_splits = static_cast<uint32_t>(AlignUp(g.num_splits, g.cluster));
  g.counters_bytes = AlignUp(tasks * sizeof(uint32_t), 256);
  g.partials_bytes =
      g.num_splits > 1 ? tasks * g.num_splits * PartialFloats(G, v.head_dim) * sizeof(float) : 0;
  return g;
}

}  // namespace

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

int MultiprocessorCount() {
  static const int sms = [] {
    int dev = 0, n = 0;
    if (DeviceCount() == 0 || cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  }();
  return sms;
}

uint32_t AttendActiveClusters(uint32_t head_dim, uint32_t group, DType kv_dtype,
                              uint32_t cluster) {
  return ActiveClusters<false>(head_dim, group, kv_dtype, cluster);
}

uint32_t AttendResidentBlocks(uint32_t head_dim, uint32_t group, DType kv_dtype) {
  return ResidentBlocks<false>(head_dim, group, kv_dtype);
}

Status UploadAttendPlan(const AttendPlan& plan, void* workspace, void* stream) {
  if (workspace == nullptr) return InvalidArgument("upload attend plan: null workspace");
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace, plan.image.data(), plan.image.size(),
                                             cudaMemcpyHostToDevice,
                                             static_cast<cudaStream_t>(stream)));
  return Status::OK();
}

Status LaunchAttendDependent(const AttendPlan& plan, void* workspace, void* stream,
                             bool dependent, uint64_t* trace = nullptr);

Status LaunchAttend(const AttendPlan& plan, void* workspace, void* stream) {
  return LaunchAttendDependent(plan, workspace, stream, false);
}

Status LaunchAttendTraced(const AttendPlan& plan, void* workspace, void* stream,
                          uint64_t* trace) {
  if (trace == nullptr) return InvalidArgument("launch attend traced: null trace buffer");
  return LaunchAttendDependent(plan, workspace, stream, false, trace);
}

// `dependent`: a programmatic dependent launch (the previous kernel on the stream may still
// run; the kernel waits for it before reading its plan). `trace`: LaunchAttendTraced's stamps.
Status LaunchAttendDependent(const AttendPlan& plan, void* workspace, void* stream,
                             bool dependent, uint64_t* trace) {
  if (plan.num_items == 0) return InvalidArgument("launch attend: empty plan");
  if (plan.cluster_size > 16 || plan.num_items % std::max(1u, plan.cluster_size) != 0) {
    return InvalidArgument("launch attend: cluster size " + std::to_string(plan.cluster_size) +
                           " for " + std::to_string(plan.num_items) + " items");
  }
  if (workspace == nullptr) return InvalidArgument("launch attend: null workspace");
  auto* ws = static_cast<uint8_t*>(workspace);
  const auto* items = reinterpret_cast<const AttendItemDesc*>(ws + plan.items_off);
  const auto* runs = reinterpret_cast<const AttendRunDesc*>(ws + plan.runs_off);
  auto* counters = reinterpret_cast<uint32_t*>(ws + plan.counters_off);
  auto* partials = reinterpret_cast<float*>(ws + plan.partials_off);
  const auto* src =
      plan.runs_from_search ? reinterpret_cast<const SearchRunHeader*>(ws + plan.run_source_off) : nullptr;
  const auto* selected =
      plan.runs_from_search ? reinterpret_cast<const uint32_t*>(ws + plan.selected_off) : nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t launch_err = cudaSuccess;
  const bool ok =
      Dispatch(plan.head_dim, plan.group, plan.kv_dtype,
               AttendPath(plan.head_dim, plan.split_tokens),
               [&]<int D, int G, typename KV, int kTC>() {
        auto go = [&]<bool kFromSearch>() {
          constexpr auto kKernel = SpanAttendKernel<D, G, KV, kTC, kFromSearch>;
          constexpr size_t kDyn = DynBytes<D, G, kTC>();
          PrepareKernel<kKernel>(kDyn);
          const uint32_t run_stride = LegacyMergeEnv() ? 0 : plan.run_stride;
          if (!dependent && plan.cluster_size <= 1) {
            kKernel<<<plan.num_items, kThreads, kDyn, s>>>(
                items, runs, run_stride, counters, partials, plan.q_dtype, plan.out_dtype,
                LegacyMergeEnv(), IssueEnv(), reinterpret_cast<unsigned long long*>(trace), src,
                selected, plan.max_selected, plan.uniform_splits);
            return;
          }
          cudaLaunchConfig_t cfg{};
          cudaLaunchAttribute attr[2]{};
          unsigned n = 0;
          if (dependent) {
            attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            attr[n++].val.programmaticStreamSerializationAllowed = 1;
          }
          if (plan.cluster_size > 1) {
            attr[n].id = cudaLaunchAttributeClusterDimension;
            attr[n].val.clusterDim.x = plan.cluster_size;
            attr[n].val.clusterDim.y = attr[n].val.clusterDim.z = 1;
            ++n;
          }
          cfg.gridDim = dim3(plan.num_items);
          cfg.blockDim = dim3(kThreads);
          cfg.dynamicSmemBytes = kDyn;
          cfg.stream = s;
          cfg.attrs = attr;
          cfg.numAttrs = n;
          launch_err = cudaLaunchKernelEx(&cfg, kKernel, items, runs, run_stride, counters, partials,
                                          plan.q_dtype, plan.out_dtype, LegacyMergeEnv(), IssueEnv(),
                                          reinterpret_cast<unsigned long long*>(trace), src,
                                          selected, plan.max_selected, plan.uniform_splits);
        };
        if (plan.runs_from_search) {
          go.template operator()<true>();
        } else {
          go.template operator()<false>();
        }
      });
  if (!ok) return Unimplemented("launch attend: unsupported shape");
  KVMEM_CUDA_RETURN_IF_ERROR(launch_err);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("SpanAttendKernel");
  return Status::OK();
}

size_t DenseAttendWorkspaceBytes(const DenseAttendView& v, const DenseAttendOptions& options) {
  const DenseGeometry g = Geometry(v, options);
  return g.counters_bytes + g.partials_bytes;
}

Status DenseAttend(const DenseAttendView& v, const DenseAttendOptions& options, void* workspace,
                   size_t workspace_bytes, void* stream) {
  if (Status st = ValidateDenseAttendView(v); !st.ok()) return st;
  const uint32_t G = v.q_heads / v.kv_heads;
  const DenseGeometry geo = Geometry(v, options);
  if (workspace == nullptr || workspace_bytes < geo.counters_bytes + geo.partials_bytes) {
    return InvalidArgument("dense attend: workspace too small");
  }
  if (reinterpret_cast<uintptr_t>(v.k) % 16 != 0 || reinterpret_cast<uintptr_t>(v.v) % 16 != 0) {
    return InvalidArgument("dense attend: k/v not 16-byte aligned");
  }
  if (v.batch > 65535 || v.kv_heads > 65535) return InvalidArgument("dense attend: grid too large");
  auto* counters = static_cast<uint32_t*>(workspace);
  auto* partials = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + geo.counters_bytes);
  auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(geo.num_splits, v.kv_heads, v.batch);
  cudaError_t launch_err = cudaSuccess;
  const bool ok = Dispatch(v.head_dim, G, v.kv_dtype, AttendPath(v.head_dim, kLongSplit),
                           [&]<int D, int GG, typename KV, int kTC>() {
    constexpr size_t kDyn = DynBytes<D, GG, kTC>();
    PrepareKernel<DenseAttendKernel<D, GG, KV, kTC>>(kDyn);
    if (geo.cluster <= 1) {
      DenseAttendKernel<D, GG, KV, kTC><<<grid, kThreads, kDyn, s>>>(
          static_cast<const KV*>(v.k), static_cast<const KV*>(v.v), v.kv_heads,
          v.capacity_tokens, v.seq_lens, geo.split_tokens, v.q, v.q_dtype, v.scale, v.out,
          v.out_dtype, v.lse, counters, partials, LegacyMergeEnv(), IssueEnv());
      return;
    }
    cudaLaunchConfig_t cfg{};
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = geo.cluster;
    attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = kDyn;
    cfg.stream = s;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    launch_err = cudaLaunchKernelEx(
        &cfg, DenseAttendKernel<D, GG, KV, kTC>, static_cast<const KV*>(v.k),
        static_cast<const KV*>(v.v), v.kv_heads, v.capacity_tokens, v.seq_lens,
        geo.split_tokens, v.q, v.q_dtype, v.scale, v.out, v.out_dtype, v.lse, counters, partials,
        LegacyMergeEnv(), IssueEnv());
  });
  if (!ok) return Unimplemented("dense attend on CUDA: unsupported head_dim, group or dtype");
  KVMEM_CUDA_RETURN_IF_ERROR(launch_err);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("DenseAttendKernel");
  return Status::OK();
}

}  // namespace kvmem::kernels::cuda
