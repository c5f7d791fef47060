// Budgeted cluster-tree search on the GPU (kernels/tree_search.h for what it computes), one
// thread-block cluster of N blocks (512 threads each) per (problem, KV head), then the
// span-attention kernel over the runs the search wrote, as a programmatic dependent launch. No
// host step between the two launches. docs/architecture.md ("Device tree and GPU search").
//
// Rank 0 of the cluster holds the search state in shared memory; the others work for it:
//   1. the group's mean query (the CPU's float operations, in its order), on every rank;
//   2. every node's soft score, ranks sharing the nodes (a dot product is 8 lanes with one
//      partial sum each, combined like index::detail::Dot, so scores are bit-identical to the
//      CPU); rank 0 extends the chains (right-to-left minima of the path scores, 4 floats padded
//      with -inf, global scratch) level by level and lists the leaves;
//   3. rounds: rank 0 takes the best unexpanded leaves by a token-weighted key histogram until
//      they hold 8x (16x) the budget (1.6x more each later round) and reserves their pool
//      entries; the ranks score slices of the new chunks into rank 0's pool (DSMEM); chunks whose
//      bottleneck beats the next leaf's are final in order: rank 0 bucket-sorts by histogram bin
//      the slice of them a histogram cut says the remaining budget can reach, accepts at once
//      its leading entries that all fit, and scans the rest like the CPU's offer()
//      (warp 0: 32 at a time while they fit, one by one near the end); stop when the scan stops
//      or leaves run out;
//   4. runs (rank 0): sink and recent-window pieces (merged with the selection), selected
//      chunks, tail; cut into the head's planned splits by token prefix and written as the
//      attention's items.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <string>

#include "common/dtype.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda_ops.h"
#include "kernels/cuda/search_attend_to.h"
#include "kernels/detail/attention_plan_layout.h"
#include "kernels/detail/tree_search_layout.h"

namespace kvmem::kernels::cuda {

// attention.cu: LaunchAttend as a programmatic dependent launch when `dependent`.
Status LaunchAttendDependent(const AttendPlan& plan, void* workspace, void* stream,
                             bool dependent, uint64_t* trace = nullptr);

namespace {

namespace cg = cooperative_groups;

using ::kvmem::kernels::detail::AttendItemDesc;
using ::kvmem::kernels::detail::AttendRunDesc;
using ::kvmem::kernels::detail::ChunkEdges;
using ::kvmem::kernels::detail::EdgesOf;
using ::kvmem::kernels::detail::kMaxRunsPerItem;
using ::kvmem::kernels::detail::kTailPieceTokens;
using ::kvmem::kernels::detail::SearchRunHeader;
using ::kvmem::kernels::detail::SearchTaskDesc;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPerWarp = 4;  // dot products per warp at a time (8 lanes each)
constexpr uint32_t kMaxLeaves = kSearchMaxLeaves;
constexpr uint32_t kConsumed = 0x80000000u;
constexpr uint32_t kDone = 0x80000000u;  // leaf expanded
constexpr uint32_t kHistBins = 1024;

// Floats as unsigned integers in the same order (for atomicMin / atomicMax).
__device__ __forceinline__ uint32_t OrderedBits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float FromOrderedBits(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
constexpr uint32_t kMaxCand = kSearchMaxCandidates;
constexpr uint32_t kBitmapWords = kSearchMaxChunks / 32;
// Chunks whose selected piece differs from their counted tokens (the sink, skip and recent
// edges; WriteFixedPieces), at most.
constexpr uint32_t kMaxFixedDiffs = 256;
constexpr float kNegInf = -INFINITY;

constexpr uint32_t kSortCap = 4096;  // NextPow2(kMaxCand): bitonic padding
// The flat search (TreeSearchBody<..., kFlat = true>): every rank scores a slice of at most
// kFlatPerRank chunks (in leaf order) and the nodes above them (a tree of at most
// kFlatMaxNodes nodes); rank 0 gathers the best entries by a histogram over all of them.
constexpr uint32_t kFlatPerRank = 2048;
constexpr uint32_t kFlatMaxNodes = 1024;
// Commit slices: a round with more than kSliceMin commits accepts those in the top bins (of
// kHistBins over the bottleneck range) that hold less than the remaining budget without sorting,
// and sorts next those in the bins that hold the remaining budget + slack, at most kSliceMax
// of them (their bitonic padding stays clear of the rest at the end of commit[]).
constexpr uint32_t kSliceMin = 32, kSliceMax = 1024;
constexpr uint32_t kSliceOff = 0xffffffffu;  // slice_slack: sort every commit at once
// KVMEM_SEARCH_PREFETCH (default 1, 0 = off): after 2a, the ranks that wait for rank 0's control
// ask L2 for the chunk arrays that the lookups of 4d and the attention's runs read (leaf order,
// starts, sizes, radii, K/V blocks). H200, session 22 (bench/results/h200_session22_calls.txt):
// search + sparse -0.4 to -0.5 us at 128K batch 1 and -0.9 to -1.1 at batch 8 (the attention's
// runs find the chunks' sizes and blocks in L2), the search alone +0.5 to +1.1 us at batch 8
// (call 2). Issued at the start instead it slowed the ranks' node rows (+2 us at 128K batch 8,
// where one rank issued it all); every chunk row too (~2 MB per head at 128K) slowed rank 0's
// chains and leaf pick by more than the rows it sped up (call 1).

// TopBinsCut's shared-memory scratch.
struct CutScratch {
  unsigned long long warp_tok[kWarps];  // per-warp token sums
  uint32_t warp_chk[kWarps];            // per-warp chunk sums
  uint32_t first_fail[2];               // per cut: the first bin (from the top) not taken
};

struct Smem {
  float mean[128];
  float mean_norm;
  uint32_t leaf_count, cand_count, nsel, sel_tokens, status, done, rounds, nodes_scored;
  uint32_t remaining, misfits;
  float e_next;
  uint32_t n_commit;
  uint32_t ctl;  // rank 0: 1 = this round's new pool entries are reserved, 0 = the search ended
  uint32_t n_sort, n_rest, more, slice_back;  // rank 0: the commit slices
  uint32_t sure_count, sure_tokens;  // rank 0: the slice's leading commits that all fit
  uint32_t front_sorted;             // rank 0: the slice is in scan order already
  union {
    struct {  // rank 0: the leaf clusters
      float leaf_key[kMaxLeaves];
      uint32_t leaf_idx[kMaxLeaves];
      uint32_t leaf_tokens[kMaxLeaves];  // tokens below; once expanded: its first pool entry
      uint32_t leaf_chunks[kMaxLeaves];  // chunks, | kDone once expanded
      uint32_t leaf_child_begin[kMaxLeaves];
    };
    struct {  // the flat search (every rank): its entries (a slice of leaf_chunks positions)
      float4 fl_chain[kFlatPerRank];
      uint32_t fl_id[kFlatPerRank];
      uint32_t fl_tok[kFlatPerRank];  // counted tokens
      float fl_score[kFlatPerRank];
      uint32_t fl_owner[kFlatPerRank];  // the leaf at each position (start markers, then filled)
      uint32_t g_hist_tok[kHistBins];   // rank 0: every rank's entries by bottleneck bin
      uint32_t g_hist_chk[kHistBins];
    };
  };
  uint32_t hist_tok[kHistBins];
  uint32_t hist_chk[kHistBins];
  uint32_t key_lo, key_hi, e_next_bits, new_count, left;
  // The flat search: needed nodes, and rank 0's gather state (the bins [flat_front, flat_prev)
  // of g_hist this gather takes; entries gathered so far; the next gather's tokens).
  uint32_t n_need, flat_front, flat_prev, flat_gathered;
  unsigned long long flat_need;
  unsigned long long expanded_tokens;
  CutScratch cut;  // TopBinsCut's scratch
  // The search rounds: the pool of scored chunks, and this round's commits.
  float4 cand_chain[kMaxCand];
  uint32_t cand_id[kMaxCand];
  uint32_t cand_tok[kMaxCand];  // | kConsumed once committed
  float cand_score[kMaxCand];
  uint32_t commit[kSortCap];
  union {
    uint32_t node_tokens[kMaxCand];  // rank 0: the nodes' token counts while their chains are formed
    struct {  // rank 0, the rounds: the keys SortCommits ranks by counting, contiguous
      float4 sort_chain[kThreads];
      uint32_t sort_id[kThreads];
    };
  };
  uint32_t bitmap[kBitmapWords];
  uint32_t scan_tmp[32];
  // The task's fixed pieces (WriteFixedPieces; the last rank writes them into rank 0's state):
  // their count and tokens, a status, and the chunks whose selected piece is not their counted
  // tokens with the difference; the writer's own per-warp sums.
  uint32_t fx_n, fx_tokens, fx_status, fx_ndiff;
  // Chunks from here on lie wholly inside the recent window and above the sinks and skipped
  // tokens: a selected one attends none of its counted tokens (not listed as a difference).
  uint32_t fx_whole_from;
  uint32_t fx_diff_c[kMaxFixedDiffs];
  int32_t fx_diff_v[kMaxFixedDiffs];
  uint32_t fx_warp[kWarps], fx_warp_tok[kWarps];
};

// The least tokens of leaves the automatic first round takes in a large tree searched by >= 2
// blocks (TreeSearchBody, 4).
constexpr uint32_t kFirstRoundMinTokens = 24 * 1024;

// KVMEM_SEARCH_TRACE points (SM cycles on rank 0, first round): 1 mean query, 2 node rows, 3
// cluster barrier, 4 chains set up (links staged in 2a), 5 chains + leaves, 6 round set-up, 7 leaf
// histogram, 8 leaf cut, 9 leaf reservation, 10 cluster barrier, 11 chunk lookups, 12 chunk rows,
// 13 pool gathered, 14 commits, 15-16 slice histogram, 17 slice cuts, 18 slice sorted (28
// partition, 29 keys staged, 30 ranked), 19 slice set, 20 sure + scan, 21 round loop left, 22 the
// fixed pieces (a one-block search writes them here), 23 the attention's header and the results;
// within 1: 24 state set up, 25 radii loads issued, 26 mean query stored, 27 its barrier;
// within 9 (thread 0's own): 31 its first leaves' pool slots, 32 their owners written.
// (Until session 20 rank 0 also built the attention's run tables here, steps 22-27: ~7K cycles
// at 128K batch 1; the attention's blocks build their own runs now.)
constexpr int kTracePoints = 33;
__device__ int g_trace_prints = 0;

// A slot from *counter for each lane where `pred` holds, in lane order, with one atomic per
// warp: for a counter in another block's shared memory (remote atomics serialise at the
// receiving block) or where lane order matters. A local counter whose order is free takes a
// plain atomicAdd(+1) per lane, which the hardware combines per warp (session 19: 98 cycles for
// 512 threads with a barrier, against 229 this way). Every lane of the warp must call it.
__device__ __forceinline__ uint32_t WarpSlot(uint32_t* counter, bool pred) {
  const uint32_t mask = __ballot_sync(0xffffffffu, pred), lane = threadIdx.x & 31;
  if (mask == 0) return 0;
  const uint32_t leader = __ffs(mask) - 1;
  uint32_t base = 0;
  if (lane == leader) base = atomicAdd(counter, __popc(mask));
  base = __shfl_sync(0xffffffffu, base, leader);
  return base + __popc(mask & ((1u << lane) - 1));
}

// Folds each lane's [lo, hi] (OrderedBits; lo > hi: none) into *key_lo / *key_hi (rank 0's
// range, local or remote): a warp reduction, then one atomic pair per warp. Every lane of the
// warp must call it.
__device__ __forceinline__ void WarpRangeTo(uint32_t* key_lo, uint32_t* key_hi, uint32_t lo,
                                            uint32_t hi) {
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  if ((threadIdx.x & 31) == 0 && lo <= hi) {
    atomicMin(key_lo, lo);
    atomicMax(key_hi, hi);
  }
}

// Lexicographic "a before b": chains descending, then lower id.
// Branch-free: the lanes of a warp compare different pairs and would otherwise diverge.
__device__ __forceinline__ bool Before(const float4& a, uint32_t ia, const float4& b,
                                       uint32_t ib) {
  const bool w = a.w > b.w || (a.w == b.w && ia < ib);
  const bool z = a.z > b.z || (a.z == b.z && w);
  const bool y = a.y > b.y || (a.y == b.y && z);
  return a.x > b.x || (a.x == b.x && y);
}

// chain(path + s), -inf padded.
__device__ __forceinline__ float4 Extend(const float4& p, float s) {
  float in[4] = {p.x, p.y, p.z, p.w};
  float out[4] = {kNegInf, kNegInf, kNegInf, kNegInf};
  int n = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (in[i] != kNegInf && in[i] < s && n < 3) out[n++] = in[i];
  }
  out[n] = s;
  return make_float4(out[0], out[1], out[2], out[3]);
}

// Dot product of the mean query with row `b` (global, D floats) by the 8 lanes of a group:
// lane j (0..7) sums products j, j+8, ... in order; lane 0 of the group gets the CPU's
// ((s0+s4)+(s1+s5))+((s2+s6)+(s3+s7)). Every lane of the warp must call it.
template <int D>
__device__ __forceinline__ float GroupDot(const float* mean, const float* b, int j) {
  float v[D / 8];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) v[i] = b[8 * i + j];
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc = __fadd_rn(acc, __fmul_rn(mean[8 * i + j], v[i]));
  const float t = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, 4));
  const float u = __fadd_rn(t, __shfl_down_sync(0xffffffffu, t, 1));
  return __fadd_rn(u, __shfl_down_sync(0xffffffffu, u, 2));
}

// Lane j's share of a row for ScoreRows: its D / 8 elements 8m + j, m ascending. Rows are
// bfloat16 bits (centroids are bfloat16 values on the CPU too) in the device tree's interleaved
// layout (detail::InterleaveRowBF16; flat_tree_search_test reads it this way on the CPU): the
// q-th uint4 of lane j holds m = 8q .. 8q + 7, so the 8 lanes of a group read 128 contiguous
// bytes per load. Held as loaded until the sums (half the registers of floats).
template <int D>
struct RowShare {
  uint4 x[D / 64];
  __device__ __forceinline__ void Load(const uint16_t* row, int j) {
    const uint4* b = reinterpret_cast<const uint4*>(row);
#pragma unroll
    for (int q = 0; q < D / 64; ++q) x[q] = b[8 * q + j];
  }
  __device__ __forceinline__ float At(int m) const {
    const uint4& v = x[m / 8];
    const int k = m % 8;
    const uint32_t w = k / 2 == 0 ? v.x : k / 2 == 1 ? v.y : k / 2 == 2 ? v.z : v.w;
    return __uint_as_float(k % 2 == 0 ? w << 16 : w & 0xffff0000u);  // bf16 -> f32 exactly
  }
};

// Scores `count` rows: 64 groups of 8 lanes, 4 rows per group in flight (all loads issued
// before the sums; row i of a pass to group i % 64, so a short pass spreads over every group).
// The four rows' sums are interleaved (four independent chains, each in the CPU's order), then
// their group reductions, then done(i, dot) on the group's lane 0 for each: a branch between the
// rows would keep the scheduler from overlapping their chains. row(i) gives row i's address
// (RowShare's layout). Every thread of the block must call it; it ends with a barrier.
template <int D, typename RowF, typename DoneF>
__device__ __forceinline__ void ScoreRows(const float* mean, uint32_t count, int j, int slot,
                                          int warp, RowF row, DoneF done) {
  static_assert(D % 64 == 0, "row layout: 8 lanes x 16-byte loads");
  constexpr int kIlp = 4;
  constexpr uint32_t kGroups = kWarps * kPerWarp;
  constexpr uint32_t kPerPass = kGroups * kIlp;
  const uint32_t group = warp * kPerWarp + slot;
  for (uint32_t base = 0; base < count; base += kPerPass) {
    RowShare<D> v[kIlp];
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const uint32_t i = base + u * kGroups + group;
      v[u].Load(row(i < count ? i : 0), j);
    }
    float acc[kIlp];
#pragma unroll
    for (int u = 0; u < kIlp; ++u) acc[u] = 0.f;
#pragma unroll
    for (int q = 0; q < D / 8; ++q) {
      const float m = mean[8 * q + j];
#pragma unroll
      for (int u = 0; u < kIlp; ++u) acc[u] = __fadd_rn(acc[u], __fmul_rn(m, v[u].At(q)));
    }
#pragma unroll
    for (int u = 0; u < kIlp; ++u) acc[u] = __fadd_rn(acc[u], __shfl_down_sync(0xffffffffu, acc[u], 4));
#pragma unroll
    for (int u = 0; u < kIlp; ++u) acc[u] = __fadd_rn(acc[u], __shfl_down_sync(0xffffffffu, acc[u], 1));
#pragma unroll
    for (int u = 0; u < kIlp; ++u) acc[u] = __fadd_rn(acc[u], __shfl_down_sync(0xffffffffu, acc[u], 2));
    if (j == 0) {
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const uint32_t i = base + u * kGroups + group;
        if (i < count) done(i, acc[u]);
      }
    }
  }
  __syncthreads();
}

// Bitonic sort of n (power of two) entries, descending by (key, then lower idx); the whole block.
// Thread t handles elements t, t + kThreads, ...; a stage with j < 32 pairs elements of the same
// warp, so between two such stages a warp barrier is enough.
template <typename Less>
__device__ void BlockBitonic(uint32_t n, Less before_swap) {
  for (uint32_t k = 2; k <= n; k <<= 1) {
    for (uint32_t j = k >> 1; j > 0; j >>= 1) {
      for (uint32_t i = threadIdx.x; i < n; i += kThreads) {
        const uint32_t l = i ^ j;
        if (l > i) before_swap(i, l, (i & k) == 0);
      }
      const uint32_t next_j = j > 1 ? j >> 1 : k;  // the next stage's distance
      if (j >= 32 || next_j >= 32) {
        __syncthreads();
      } else {
        __syncwarp();
      }
    }
  }
  __syncthreads();
}

// Nanoseconds since `from` (0 when the timer reads earlier: %globaltimer is not monotonic
// across reads on every part).
__device__ __forceinline__ uint64_t Elapsed(uint64_t from) {
  const uint64_t now = GlobalTimer();
  return now > from ? now - from : 0;
}

// Bin of key k among kHistBins equal bins over [lo, hi] (a range of zero or non-finite width:
// the top bin for hi, bin 0 for the rest). The leaf and the commit histograms both use it.
__device__ __forceinline__ uint32_t KeyBin(float k, float lo, float hi) {
  const float width = hi - lo;
  if (!(width > 0.f) || !isfinite(width)) return k == hi ? kHistBins - 1 : 0;
  // (k - lo) times a per-range factor (the compiler hoists it out of a pass over many keys):
  // monotone in k, as the bins must be, without a division per key (a width so small that the
  // factor overflows divides).
  const float scale = static_cast<float>(kHistBins) / width;
  const float f = isfinite(scale) ? (k - lo) * scale : (k - lo) / width * static_cast<float>(kHistBins);
  return f >= static_cast<float>(kHistBins - 1) ? kHistBins - 1 : (f <= 0.f ? 0u : static_cast<uint32_t>(f));
}

__device__ __forceinline__ uint32_t NextPow2(uint32_t x) {
  uint32_t n = 1;
  while (n < x) n <<= 1;
  return n;
}

// Histogram cuts, the whole block: for cut c, bins are taken from the top (bin NB - 1) down while
// the tokens of the bins above a bin are below need[c] and the chunks of the bins down to it fit
// room[c]; cut[c] is the lowest bin taken (NB: none). Both sums only grow downwards, so the taken
// bins are a prefix from the top: each thread checks its bins against block-wide prefix sums and
// the first bin that fails marks the cut (what a warp walking 32 bins at a time from the top
// found, in three barriers instead of up to NB / 32 dependent shuffle rounds; two cuts share the
// sums and the barriers). chunks_above (optional, may be hist_tok) gets each bin's chunks in the
// bins above it. `x` is its shared-memory scratch; every thread of the block must call it.
template <uint32_t NB, int NC>
__device__ void TopBinsCuts(const uint32_t* hist_tok, const uint32_t* hist_chk,
                            const uint64_t (&need)[NC], const uint32_t (&room)[NC], CutScratch& x,
                            uint32_t (&cut)[NC], uint32_t* chunks_above = nullptr) {
  static_assert(NC >= 1 && NC <= 2, "cuts per call");
  constexpr uint32_t K = NB >= kThreads ? NB / kThreads : 1;  // bins per thread
  static_assert(NB % K == 0 && NB / K <= kThreads, "bins per thread");
  const uint32_t t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const bool active = t < NB / K;
  uint32_t bt[K], bc[K];
  unsigned long long st = 0;
  uint32_t sc = 0;
#pragma unroll
  for (uint32_t k = 0; k < K; ++k) {
    const uint32_t b = NB - 1 - (t * K + k);  // descending
    bt[k] = active ? hist_tok[b] : 0;
    bc[k] = active ? hist_chk[b] : 0;
    st += bt[k];
    sc += bc[k];
  }
  unsigned long long it = st;
  uint32_t ic = sc;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned long long xt = __shfl_up_sync(0xffffffffu, it, off);
    const uint32_t xc = __shfl_up_sync(0xffffffffu, ic, off);
    if (static_cast<int>(lane) >= off) {
      it += xt;
      ic += xc;
    }
  }
  if (lane == 31) {
    x.warp_tok[warp] = it;
    x.warp_chk[warp] = ic;
  }
  if (t < NC) x.first_fail[t] = NB;
  __syncthreads();
  unsigned long long before_t0 = it - st;
  uint32_t before_c0 = ic - sc;
  for (uint32_t w = 0; w < warp; ++w) {
    before_t0 += x.warp_tok[w];
    before_c0 += x.warp_chk[w];
  }
  if (active && chunks_above != nullptr) {  // may overwrite hist_tok: every thread has read it
    uint32_t a = before_c0;
#pragma unroll
    for (uint32_t k = 0; k < K; ++k) {
      chunks_above[NB - 1 - (t * K + k)] = a;
      a += bc[k];
    }
  }
  if (active) {
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      unsigned long long before_t = before_t0;
      uint32_t before_c = before_c0;
#pragma unroll
      for (uint32_t k = 0; k < K; ++k) {
        if (!(before_t < need[c] && before_c + bc[k] <= room[c])) {
          atomicMin(&x.first_fail[c], t * K + k);
          break;
        }
        before_t += bt[k];
        before_c += bc[k];
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < NC; ++c) cut[c] = NB - x.first_fail[c];  // bins >= cut are taken
  __syncthreads();  // x may be reused
}

template <uint32_t NB>
__device__ uint32_t TopBinsCut(const uint32_t* hist_tok, const uint32_t* hist_chk, uint64_t need,
                               uint32_t room, CutScratch& x) {
  uint32_t cut[1];
  TopBinsCuts<NB, 1>(hist_tok, hist_chk, {need}, {room}, x, cut);
  return cut[0];
}

// Sorts the permutation sm.commit[0, n) of candidates best first (chain descending, then lower
// id; Before). Up to kRankSortMax entries by counting: each thread ranks its entry against all
// others (broadcast reads, one barrier) — a few hundred entries cost under a tenth of a bitonic
// sort's barrier-separated stages; more by a bitonic sort padded to a power of two with
// kTreeNone, which sorts last. The whole block.
constexpr uint32_t kRankSortMax = kThreads;  // Smem::sort_chain holds one key per thread
__device__ void SortCommits(Smem& sm, uint32_t n) {
  if (n <= kRankSortMax) {
    const uint32_t t = threadIdx.x;
    uint32_t e = 0, rank = 0, id = 0;
    float4 c{};
    if (t < n) {  // keys staged contiguously: the ranking loop reads them without an index hop
      e = sm.commit[t];
      c = sm.cand_chain[e];
      id = sm.cand_id[e];
      sm.sort_chain[t] = c;
      sm.sort_id[t] = id;
    }
    __syncthreads();
    if (t < n) {
#pragma unroll 4
      for (uint32_t k = 0; k < n; ++k) rank += Before(sm.sort_chain[k], sm.sort_id[k], c, id) ? 1u : 0u;
    }
    __syncthreads();
    if (t < n) sm.commit[rank] = e;
    __syncthreads();
    return;
  }
  const uint32_t np = NextPow2(n);
  for (uint32_t i = n + threadIdx.x; i < np; i += kThreads) sm.commit[i] = kTreeNone;
  __syncthreads();
  BlockBitonic(np, [&](uint32_t a, uint32_t b, bool desc) {
    const uint32_t ia = sm.commit[a], ib = sm.commit[b];
    bool b_first;
    if (ib == kTreeNone) {
      b_first = false;
    } else if (ia == kTreeNone) {
      b_first = true;
    } else {
      b_first = Before(sm.cand_chain[ib], sm.cand_id[ib], sm.cand_chain[ia], sm.cand_id[ia]);
    }
    if (b_first == desc) {
      sm.commit[a] = ib;
      sm.commit[b] = ia;
    }
  });
}

__device__ __forceinline__ uint32_t CountedTokens(uint64_t start, uint32_t tokens, uint32_t skip) {
  const uint64_t end = start + tokens;
  if (end <= skip) return 0;
  if (start >= skip) return tokens;
  return static_cast<uint32_t>(end - skip);
}

// An inline launch (LaunchSearchAttendInline) carries q and the plan image in the kernel's
// parameters: the search reads them there, copies each task's q to where the plan's q pointers
// point (the attention reads it there), writes the attention's items whole and zeroes its merge
// counters. Null fields: a regular launch (the plan image was uploaded to the workspace).
struct InlineSource {
  const uint8_t* q = nullptr;      // q in the parameters
  const uint8_t* q_dev = nullptr;  // where the plan's q pointers point
  const AttendItemDesc* items = nullptr;  // the plan's items, in the parameters
  uint32_t* counters = nullptr;    // the attention's per-task merge counters
};

// One thread-block cluster of N blocks per (problem, KV head); rank 0 runs the search's control
// (leaf selection, commit, sort, scan), and every rank shares the parallel parts: node
// scores and the chunk summaries of each round. N = 1 is the one-block search. Every branch on
// `rank` is uniform within a block, and every cluster barrier is reached by all ranks of the
// cluster. kFlat: the flat search (F1-F7 below; every chunk scored at once, then gathers from a
// histogram of every bottleneck instead of rounds of leaves; docs/architecture.md).

// Split cluster barrier: arrive (release) now, wait (acquire) later, so that what lies between
// overlaps the other blocks' arrival. `.aligned` requires every thread of the warp to execute
// the same barrier instruction; several call sites follow an `if (tid == 0)` block, so each
// reconverges its warp first rather than relying on the compiler to have done so.
__device__ __forceinline__ void ClusterArrive() {
  __syncwarp();
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void ClusterWait() {
  __syncwarp();
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// A sealed chunk's start, size and K/V block offset.
struct EdgeChunk {
  uint64_t st = 0, kb = 0;
  uint32_t tok = 0;
};

// A chunk's fixed pieces: [0, a) in the sinks and [b, t) in the recent window
// (detail::EdgesOf, which the attention uses for a selected chunk's piece [a, b)), or the whole
// chunk when they meet (its selected piece is then empty).
struct ChunkPieces : ChunkEdges {
  bool whole;
  __device__ uint32_t count(uint32_t t) const { return whole ? 1u : (a > 0 ? 1u : 0u) + (b < t ? 1u : 0u); }
};
__device__ __forceinline__ ChunkPieces PiecesOf(const EdgeChunk& c, uint64_t S, uint64_t R) {
  const ChunkEdges x = EdgesOf(c.st, c.tok, S, R);
  return {x, x.a > 0 && x.b <= x.a};
}

// The task's fixed pieces for the attention (detail::SearchRunHeader): the sink and
// recent-window pieces of its sealed chunks (they do not depend on the selection), then the
// tail in pieces of kTailPieceTokens, resolved into `fixed`. Into `s0` (rank 0's state, this
// block's own in a one-block search): their count and tokens, a status, and every edge chunk
// whose selected piece differs from its counted tokens, with the difference (rank 0 adds those
// of the selected ones to the selection's counted tokens for the attended tokens), except the
// chunks wholly inside the recent window (from fx_whole_from on: rank 0 subtracts a selected
// one's tokens itself, so a long window lists none of them). The whole
// block; thread t holds chunk t (hd) and chunk num_chunks - 1 - t (bk) for t < lim. Sink
// chunks are a prefix of the chunks and recent ones a suffix (ids follow token order); such a
// region of lim chunks or more (with more chunks beyond it) is refused with
// kSearchStatusTooManyRuns (the daemon then searches on the host), as are more pieces than the
// task's splits have run slots (num_splits x kMaxRunsPerItem, from `fixed` on) or more than
// kMaxFixedDiffs differing chunks.
template <int D>
__device__ void WriteFixedPieces(Smem& sm, Smem& s0, const SearchTaskDesc& task, uint32_t skip,
                                 uint32_t num_chunks, uint32_t lim, const EdgeChunk& hd,
                                 const EdgeChunk& bk, AttendRunDesc* fixed) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint64_t S = task.sink_tokens, R = task.recent_from, edge = max(S, uint64_t{skip});
  const bool in = static_cast<uint32_t>(tid) < lim;
  const uint32_t n_s = __syncthreads_count(in && hd.st < S);
  const uint32_t n_r = __syncthreads_count(in && bk.st + bk.tok > R);
  const uint32_t n_e = __syncthreads_count(in && hd.st < edge);  // counted may differ below it
  const bool too_long = lim < num_chunks && (n_s == lim || n_r == lim || n_e == lim);
  const uint32_t H = task.kv_heads, h = task.kv_head, cb = num_chunks - 1 - tid;
  // Pieces: chunk tid when a sink chunk; chunk cb when recent and not a sink chunk.
  // Differences: chunk tid below the edge; chunk cb when recent and not below it.
  const bool hp = static_cast<uint32_t>(tid) < n_s, hdf = static_cast<uint32_t>(tid) < n_e;
  const bool bp = static_cast<uint32_t>(tid) < n_r && cb >= n_s;
  // Of the recent chunks only the first may start before R: the others (wholly recent) are not
  // listed (rank 0 subtracts a selected one's tokens from whole_from on).
  const bool bdf = static_cast<uint32_t>(tid) < n_r && cb >= n_e && bk.st < R;
  const ChunkPieces ph = PiecesOf(hd, S, R), pb = PiecesOf(bk, S, R);
  const int32_t dh = hdf ? static_cast<int32_t>(ph.selected()) -
                               static_cast<int32_t>(CountedTokens(hd.st, hd.tok, skip))
                         : 0;
  const int32_t db = bdf ? static_cast<int32_t>(pb.selected()) -
                               static_cast<int32_t>(CountedTokens(bk.st, bk.tok, skip))
                         : 0;
  const uint32_t np = (hp ? ph.count(hd.tok) : 0u) + (bp ? pb.count(bk.tok) : 0u);
  const uint32_t nd = (dh != 0 ? 1u : 0u) + (db != 0 ? 1u : 0u);
  auto piece_tokens = [](const ChunkPieces& p, uint32_t t) { return p.whole ? t : p.a + (t - p.b); };
  const uint32_t tok = (hp ? piece_tokens(ph, hd.tok) : 0u) + (bp ? piece_tokens(pb, bk.tok) : 0u);
  // One block prefix of (pieces | differences << 16): each thread's slots.
  const uint32_t x = np | nd << 16;
  uint32_t inc = x;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, inc, off);
    if (lane >= off) inc += y;
  }
  const uint32_t wtok = __reduce_add_sync(0xffffffffu, tok);
  if (lane == 31) sm.fx_warp[warp] = inc;
  if (lane == 0) sm.fx_warp_tok[warp] = wtok;
  __syncthreads();
  uint32_t before = inc - x, total = 0, tokens = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? sm.fx_warp[w] : 0u;
    total += sm.fx_warp[w];
    tokens += sm.fx_warp_tok[w];
  }
  const uint32_t n_pieces = total & 0xffffu, n_diffs = total >> 16;
  const uint32_t tail = task.tail_len, n_tail = (tail + kTailPieceTokens - 1) / kTailPieceTokens;
  const uint32_t n_fixed = n_pieces + n_tail;
  const bool failed = too_long || n_fixed > max(task.num_splits, 1u) * kMaxRunsPerItem ||
                      n_diffs > kMaxFixedDiffs;
  if (!failed) {
    uint32_t at = before & 0xffffu;
    auto put = [&](const EdgeChunk& c, uint32_t from, uint32_t to) {
      if (to <= from) return;
      fixed[at++] = AttendRunDesc{c.kb + (uint64_t{h} * c.tok + from) * D,
                                  c.kb + (uint64_t{H + h} * c.tok + from) * D, to - from, 0};
    };
    auto pieces = [&](const EdgeChunk& c, const ChunkPieces& p) {
      if (p.whole) {
        put(c, 0, c.tok);
      } else {
        put(c, 0, p.a);
        put(c, p.b, c.tok);
      }
    };
    if (hp) pieces(hd, ph);
    if (bp) pieces(bk, pb);
    uint32_t d = before >> 16;
    if (dh != 0) {
      s0.fx_diff_c[d] = tid;
      s0.fx_diff_v[d++] = dh;
    }
    if (db != 0) {
      s0.fx_diff_c[d] = cb;
      s0.fx_diff_v[d] = db;
    }
    for (uint32_t j = tid; j < n_tail; j += kThreads) {
      const uint64_t o = uint64_t{j} * kTailPieceTokens * D;
      fixed[n_pieces + j] = AttendRunDesc{task.tail_k_off + o, task.tail_v_off + o,
                                          min(kTailPieceTokens, tail - j * kTailPieceTokens), 0};
    }
  }
  if (tid == 0) {
    s0.fx_n = failed ? 0 : n_fixed;
    s0.fx_tokens = failed ? 0 : tokens + tail;
    s0.fx_ndiff = failed ? 0 : n_diffs;
    s0.fx_status = failed ? kSearchStatusTooManyRuns : 0;
  }
  // Written by the thread holding the first recent chunk (which knows whether it starts before R).
  if (static_cast<uint32_t>(tid) == (n_r > 0 ? n_r - 1 : 0u)) {
    const uint32_t first_whole = n_r == 0 ? num_chunks : num_chunks - n_r + (bk.st < R ? 1u : 0u);
    s0.fx_whole_from = failed ? num_chunks : max(first_whole, n_e);
  }
}

template <int D, bool kTrace, bool kInline, bool kFlat>
__device__ __forceinline__ void TreeSearchBody(
    const SearchTaskDesc* __restrict__ tasks, AttendItemDesc* items, AttendRunDesc* runs,
    SearchRunHeader* headers, SearchTaskResult* results, uint32_t* selected, float* sel_scores,
    uint32_t max_selected, float* scratch, DType q_dtype, uint32_t first_round,
    uint32_t slice_slack, uint32_t prefetch, const InlineSource& inl) {
  extern __shared__ uint4 smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  cg::cluster_group cluster = cg::this_cluster();
  const uint32_t N = cluster.num_blocks(), rank = cluster.block_rank();
  Smem& s0 = *cluster.map_shared_rank(&sm, 0);  // rank 0's state (DSMEM)
  const uint32_t task_index = blockIdx.x / N;
  const SearchTaskDesc& task = tasks[task_index];
  const FlatTreeView& tree = task.tree;
  const TreeSearchParams& prm = task.params;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slot = lane >> 3, j = lane & 7;
  float4* chains = reinterpret_cast<float4*>(scratch + task.node_chain);
  uint32_t* my_sel = selected + size_t{task_index} * max_selected;
  float* my_scores = sel_scores + size_t{task_index} * max_selected;
  const uint32_t num_chunks = tree.num_chunks;
  // Step 1's global loads first and together (the group's q rows, at most 8: the planner's
  // limit; this rank's first node radii for 2a): their round trips overlap each other and the
  // set-up below instead of following it and one another.
  const uint32_t nn = tree.num_nodes > 0 ? tree.num_nodes - 1 : 0, nper = (nn + N - 1) / N;
  const uint32_t my_lo = 1 + min(nn, rank * nper), my_hi = 1 + min(nn, (rank + 1) * nper);
  const uint32_t n_radii = min(kMaxCand, my_hi - my_lo), group = task.group;
  // Inline: this task's q from the parameters (rank 0 also puts it where the attention reads it).
  const void* const q_src =
      kInline ? static_cast<const void*>(inl.q + (static_cast<const uint8_t*>(task.q) - inl.q_dev)) : task.q;
  static_assert(D <= kThreads, "one mean-query element per thread");
  float qv[8] = {};
  if (tid < D) {
    WithElemType(q_dtype, [&](auto e) {
      using E = decltype(e);
#pragma unroll
      for (uint32_t g = 0; g < 8; ++g) {
        if (g < group) qv[g] = LoadAs<E>(q_src, size_t{g} * D + tid);
      }
    });
  }
  // This rank's first node records whole (their radii for 2a; their links go to rank 0 with
  // the scores), and the root's (rank 0).
  FlatTreeNode rec0{}, root{};
  if (!kFlat && static_cast<uint32_t>(tid) < n_radii) rec0 = tree.nodes[my_lo + tid];
  if (!kFlat && rank == 0 && tid == 0 && tree.num_nodes > 0) root = tree.nodes[0];
  const float radius0 = rec0.radius;
  // The flat search: this rank's positions [f_lo, f_lo + f_n) of leaf_chunks.
  constexpr int kFP = static_cast<int>(kFlatPerRank / kThreads);
  constexpr int kFN = static_cast<int>(kFlatMaxNodes / kThreads);
  const uint32_t f_per = (num_chunks + N - 1) / N;
  const uint32_t f_lo = kFlat ? min(num_chunks, rank * f_per) : 0;
  const uint32_t f_n = kFlat ? min(num_chunks, f_lo + f_per) - f_lo : 0;
  const bool flat_fits = !kFlat || (f_per <= kFlatPerRank && tree.num_nodes <= kFlatMaxNodes);
  // The last rank (which writes the fixed pieces: WriteFixedPieces): the first and last kThreads
  // chunks' starts, sizes and K/V blocks (the sinks and the recent window), loaded now so their
  // latency hides behind the search.
  const uint32_t lim = min(num_chunks, static_cast<uint32_t>(kThreads));
  EdgeChunk e_head, e_back;
  if (rank == N - 1 && static_cast<uint32_t>(tid) < lim) {
    const uint32_t cb = num_chunks - 1 - tid;
    e_head = EdgeChunk{tree.chunk_start[tid], task.chunk_block[tid], tree.chunk_tokens[tid]};
    e_back = EdgeChunk{tree.chunk_start[cb], task.chunk_block[cb], tree.chunk_tokens[cb]};
  }
  // The fixed pieces: by the last rank while rank 0 runs the first round's control (rank 0 reads
  // them after a later cluster barrier), by rank 0 after its scan in a one-block search.
  AttendRunDesc* const fixed = runs + size_t{task.first_item} * kMaxRunsPerItem;
  auto write_fixed = [&] {
    WriteFixedPieces<D>(sm, s0, task, prm.skip_tokens_below, num_chunks, lim, e_head, e_back, fixed);
    if constexpr (kInline) {  // the plan's items whole, from the parameters
      for (uint32_t i = tid; i < task.num_splits; i += kThreads) {
        items[task.first_item + i] = inl.items[task.first_item + i];
      }
    }
  };
  // A decode step's new K / V rows into the tail (the last rank, whose share of the work is the
  // smallest): the attention reads them after this grid has finished.
  if (task.new_k != nullptr && rank == N - 1) {
    const uint32_t vecs = task.new_row_bytes / 16;
    for (uint32_t i = tid; i < 2 * vecs; i += kThreads) {
      const bool v = i >= vecs;
      const uint32_t k = v ? i - vecs : i;
      reinterpret_cast<uint4*>(v ? task.new_v_dst : task.new_k_dst)[k] =
          reinterpret_cast<const uint4*>(v ? task.new_v : task.new_k)[k];
    }
  }
  // Let a dependent launch (the attention of LaunchSearchAttend) be scheduled now: its blocks
  // take free SMs and wait (griddepcontrol.wait) until this grid has finished and flushed.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  // The phase times of SearchTaskResult: %globaltimer, read in the traced build only (~17 reads
  // on rank 0's path; without them the search took 0.2-0.6 us less, session 19).
  auto now = [&]() -> uint64_t {
    if constexpr (kTrace) return GlobalTimer();
    return 0;
  };
  auto since = [&](uint64_t from) -> uint64_t {
    if constexpr (kTrace) return Elapsed(from);
    return 0;
  };
  uint64_t stamp[5] = {now(), 0, 0, 0, 0};
  // KVMEM_SEARCH_TRACE=1: rank 0's thread 0 of task 0 stamps SM cycles at each step of the
  // first round and prints them (a few launches), for finding where the time goes.
  const bool trace_on = kTrace && rank == 0 && tid == 0 && task_index == 0;
  long long tr[kTracePoints] = {};
  bool first_round_trace = true;
  uint32_t dbg[3] = {};  // the first slice: commits, its entries, sure
#define KVMEM_TRACE(k)                                   \
  do {                                                   \
    if (kTrace && trace_on && first_round_trace) tr[k] = clock64(); \
  } while (0)
  KVMEM_TRACE(0);
  uint64_t t_sort_leaves = 0, t_score = 0, t_sort = 0, t_scan = 0, tq = 0, t_lookup = 0, t_rows = 0;

  if (tid == 0) {
    sm.leaf_count = sm.cand_count = sm.nsel = sm.sel_tokens = 0;
    sm.status = sm.done = sm.rounds = sm.nodes_scored = 0;
    sm.remaining = prm.budget_tokens;
    sm.misfits = 0;
    sm.ctl = 0;
    if constexpr (kFlat) {
      sm.n_need = 0;
      sm.key_lo = 0xffffffffu;  // every rank's entries' bottleneck range (remote atomics)
      sm.key_hi = 0;
      sm.e_next_bits = 0;
      sm.new_count = 0;
      sm.flat_front = sm.flat_prev = kHistBins;
      sm.flat_gathered = 0;
      const uint32_t b = prm.budget_tokens;
      sm.flat_need = uint64_t{b} + (slice_slack == kSliceOff ? b + 512u
                                    : slice_slack            ? slice_slack
                                                             : b / 16 + 512u);
    }
  }
  if (rank == 0) {
    for (uint32_t i = tid; i < kBitmapWords; i += kThreads) sm.bitmap[i] = 0;
  }
  KVMEM_TRACE(24);
  // The flat search: every rank's histogram zeroed, and rank 0's global one. The other ranks
  // touch rank 0's state (2a's scores and node links, the flat search's ranges) only after the
  // wait that pairs with this arrive.
  uint32_t f_id[kFlat ? kFP : 1] = {};
  FlatTreeNode f_rec[kFlat ? kFN : 1] = {};
  if constexpr (kFlat) {
    for (uint32_t i = tid; i < kHistBins; i += kThreads) {
      sm.hist_tok[i] = sm.hist_chk[i] = 0;
      if (rank == 0) sm.g_hist_tok[i] = sm.g_hist_chk[i] = 0;
    }
    __syncthreads();
  }
  ClusterArrive();
  if constexpr (kFlat) {
    // This rank's chunk ids and every node record, loading while the mean query forms.
    if (flat_fits) {
#pragma unroll
      for (int u = 0; u < kFP; ++u) {
        const uint32_t k = tid + u * kThreads;
        if (k < f_n) f_id[u] = tree.leaf_chunks[f_lo + k];
      }
#pragma unroll
      for (int u = 0; u < kFN; ++u) {
        const uint32_t n = tid + u * kThreads;
        if (n < tree.num_nodes) f_rec[u] = tree.nodes[n];
      }
    }
  }
  // This rank's slice of the nodes [1, num_nodes) for 2a: the radii of its first kMaxCand into
  // the pool's scores (the first kThreads loaded at the start).
  if constexpr (!kFlat) {
    if (static_cast<uint32_t>(tid) < n_radii) sm.cand_score[tid] = radius0;
    for (uint32_t t = tid + kThreads; t < n_radii; t += kThreads) {
      sm.cand_score[t] = tree.nodes[my_lo + t].radius;
    }
  }
  KVMEM_TRACE(25);
  // Inline: this task's q from the parameters (rank 0 also puts it where the attention reads it,
  // and zeroes the task's merge counter: both are read only after this grid has finished).
  if constexpr (kInline) {
    const void* const task_q = q_src;
    if (rank == 0) {
      const size_t n16 = size_t{task.group} * D * DTypeSizeDevice(q_dtype) / 16;
      for (size_t k = tid; k < n16; k += kThreads) {
        reinterpret_cast<uint4*>(const_cast<void*>(task.q))[k] = reinterpret_cast<const uint4*>(task_q)[k];
      }
      if (tid == 0) inl.counters[task_index] = 0;
    }
  }
  // 1. Mean query: sum over the group in order, then divide (index::QueryGroup). Every rank.
  // (The group's rows were loaded at the start.)
  if (tid < D) {
    float m = 0.f;
#pragma unroll
    for (uint32_t g = 0; g < 8; ++g) {
      if (g < group) m = __fadd_rn(m, qv[g]);
    }
    sm.mean[tid] = __fdiv_rn(m, static_cast<float>(group));
  }
  KVMEM_TRACE(26);
  __syncthreads();
  KVMEM_TRACE(27);
  if (warp == 0) {
    const float dd = GroupDot<D>(sm.mean, sm.mean, j);  // smem row: same operations
    if (lane == 0) sm.mean_norm = __fsqrt_rn(dd);
  }
  if (num_chunks > kSearchMaxChunks && tid == 0) sm.status |= kSearchStatusTooManyChunks;
  // A tree the flat search cannot hold: the head reports it (the daemon searches on the host).
  if (kFlat && !flat_fits && tid == 0) sm.status |= kSearchStatusTooManyCandidates;
  __syncthreads();
  KVMEM_TRACE(1);
  // The same on every rank (same inputs, same operations).
  const bool search = sm.status == 0 && prm.budget_tokens > 0 && num_chunks > 0 && tree.num_nodes > 0;
  const float wn = __fmul_rn(prm.node_radius_weight, sm.mean_norm);
  const float wc = __fmul_rn(prm.chunk_radius_weight, sm.mean_norm);
  ClusterWait();  // pairs with the arrive after the set-up (all ranks)
  float g_lo = 0.f, g_hi = 0.f;  // the flat search: every entry's bottleneck range

  if constexpr (kFlat) {
    if (search) {
      // F1. The node records and this rank's chunk ids to shared memory (the pool's arrays are
      // free until the first gather): parents in commit[], children in cand_id / cand_tok, radii
      // (then scores) in cand_score, "needed" flags in node_tokens.
      const uint32_t NN = tree.num_nodes;
#pragma unroll
      for (int u = 0; u < kFN; ++u) {
        const uint32_t n = tid + u * kThreads;
        if (n < NN) {
          sm.commit[n] = f_rec[u].parent;
          sm.cand_id[n] = f_rec[u].child_begin;
          sm.cand_tok[n] = f_rec[u].child_count;
          sm.cand_score[n] = f_rec[u].radius;
          sm.node_tokens[n] = 0;
        }
      }
      float f_rad[kFP] = {};
      uint32_t f_tok[kFP] = {};
      uint64_t f_st[kFP] = {};
#pragma unroll
      for (int u = 0; u < kFP; ++u) {
        const uint32_t k = tid + u * kThreads;
        if (k < f_n) {
          sm.fl_id[k] = f_id[u];
          sm.fl_owner[k] = kTreeNone;
          f_rad[u] = tree.chunk_radius[f_id[u]];
          f_tok[u] = tree.chunk_tokens[f_id[u]];
          f_st[u] = tree.chunk_start[f_id[u]];
        }
      }
      __syncthreads();
      // F2. The leaves over this rank's positions mark where their chunks start, and they and
      // their ancestors (not the root, never scored) are needed.
      for (uint32_t n = tid; n < NN; n += kThreads) {
        const uint32_t cc = sm.cand_tok[n];
        if (!(cc & kTreeLeafBit)) continue;
        const uint32_t cb = sm.cand_id[n], cnt = cc & ~kTreeLeafBit;
        const uint32_t a = max(cb, f_lo), b = min(cb + cnt, f_lo + f_n);
        if (a >= b) continue;
        sm.fl_owner[a - f_lo] = n;
        // (atomic: leaves share ancestors; a plain store of the same value is a race to racecheck)
        for (uint32_t x = n; x != 0 && x != kTreeNone; x = sm.commit[x])
          atomicOr(&sm.node_tokens[x], 1u);
      }
      __syncthreads();
      for (uint32_t n0 = 0; n0 < NN; n0 += kThreads) {
        const uint32_t n = n0 + tid;
        const bool need = n < NN && sm.node_tokens[n] != 0;
        const uint32_t at = WarpSlot(&sm.n_need, need);
        if (need) sm.commit[kFlatMaxNodes + at] = n;
      }
      // Each position's leaf: the marker at the last start at or before it (a max-scan over
      // positions, kFP contiguous ones per thread; position 0 is always a start).
      {
        uint32_t run = 0, last[kFP];
#pragma unroll
        for (int u = 0; u < kFP; ++u) {
          const uint32_t k = kFP * tid + u;
          if (k < f_n && sm.fl_owner[k] != kTreeNone) run = k;
          last[u] = run;
        }
        uint32_t inc = run;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const uint32_t y = __shfl_up_sync(0xffffffffu, inc, off);
          if (lane >= off) inc = max(inc, y);
        }
        const uint32_t prev_lane = __shfl_up_sync(0xffffffffu, inc, 1);
        if (lane == 31) sm.scan_tmp[warp] = inc;
        __syncthreads();
        uint32_t before = lane > 0 ? prev_lane : 0;
        for (int w = 0; w < warp; ++w) before = max(before, sm.scan_tmp[w]);
        uint32_t o[kFP];
#pragma unroll
        for (int u = 0; u < kFP; ++u) {
          const uint32_t k = kFP * tid + u;
          o[u] = k < f_n ? sm.fl_owner[max(before, last[u])] : kTreeNone;
        }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < kFP; ++u) {
          const uint32_t k = kFP * tid + u;
          if (k < f_n) sm.fl_owner[k] = o[u];
        }
      }
      __syncthreads();
      // F3. One pass of rows: the needed nodes' (soft score into cand_score) and this rank's
      // chunks' (the dot into fl_score).
      const uint32_t nneed = sm.n_need;
      ScoreRows<D>(
          sm.mean, nneed + f_n, j, slot, warp,
          [&](uint32_t i) {
            return i < nneed ? tree.node_rows_bf16 + size_t{sm.commit[kFlatMaxNodes + i]} * D
                             : tree.chunk_rows_bf16 + size_t{sm.fl_id[i - nneed]} * D;
          },
          [&](uint32_t i, float dot) {
            if (i < nneed) {
              const uint32_t n = sm.commit[kFlatMaxNodes + i];
              sm.cand_score[n] = __fadd_rn(dot, __fmul_rn(wn, sm.cand_score[n]));
            } else {
              sm.fl_score[i - nneed] = dot;
            }
          });
      // F4. Each entry's chain: its leaf's path from level 1 down (the root's chain is empty),
      // extended by its own soft score; the bottleneck range to rank 0.
      uint32_t klo = 0xffffffffu, khi = 0;
#pragma unroll
      for (int u = 0; u < kFP; ++u) {
        const uint32_t k = tid + u * kThreads;
        if (k >= f_n) continue;
        const float sc = __fadd_rn(sm.fl_score[k], __fmul_rn(wc, f_rad[u]));
        float sv[kTreeSearchMaxLevels] = {};
        int depth = 0;
        uint32_t x = sm.fl_owner[k];
#pragma unroll
        for (int d = 0; d < static_cast<int>(kTreeSearchMaxLevels); ++d) {
          if (x != 0 && x != kTreeNone) {
            sv[d] = sm.cand_score[x];
            depth = d + 1;
            x = sm.commit[x];
          }
        }
        float4 c = make_float4(kNegInf, kNegInf, kNegInf, kNegInf);
#pragma unroll
        for (int d = static_cast<int>(kTreeSearchMaxLevels) - 1; d >= 0; --d) {
          if (d < depth) c = Extend(c, sv[d]);
        }
        c = Extend(c, sc);
        sm.fl_chain[k] = c;
        sm.fl_score[k] = sc;
        sm.fl_tok[k] = CountedTokens(f_st[u], f_tok[u], prm.skip_tokens_below);
        klo = min(klo, OrderedBits(c.x));
        khi = max(khi, OrderedBits(c.x));
      }
      WarpRangeTo(&s0.key_lo, &s0.key_hi, klo, khi);
      KVMEM_TRACE(2);
      stamp[1] = now();
      cluster.sync();  // the range is complete
      KVMEM_TRACE(3);
      g_lo = FromOrderedBits(s0.key_lo);
      g_hi = FromOrderedBits(s0.key_hi);
      // F5. The token-weighted histogram of every entry's bottleneck, in rank 0.
      for (uint32_t k = tid; k < f_n; k += kThreads) {
        const uint32_t b = KeyBin(sm.fl_chain[k].x, g_lo, g_hi);
        atomicAdd(&sm.hist_tok[b], sm.fl_tok[k]);
        atomicAdd(&sm.hist_chk[b], 1u);
      }
      __syncthreads();
      for (uint32_t b = tid; b < kHistBins; b += kThreads) {
        const uint32_t c = sm.hist_chk[b];
        if (c != 0) {
          atomicAdd(&s0.g_hist_tok[b], sm.hist_tok[b]);
          atomicAdd(&s0.g_hist_chk[b], c);
        }
      }
      cluster.sync();  // the histogram is complete
      KVMEM_TRACE(5);
      stamp[2] = now();
    }
  }

  bool rank0_arrived = false;  // rank 0 left the rounds at the loop's barrier without waiting
  if (search) {
    if constexpr (!kFlat) {
      // 2a. Every node's soft score (it does not depend on the parents): nodes [1, num_nodes)
      // sliced over the ranks. A tree of up to kMaxCand nodes: each rank puts its nodes' links
      // and scores straight into rank 0's shared memory (the pool's arrays, free until the
      // rounds; the score in cand_chain[n].x), where 2b extends the chains; a larger one: the
      // score parked in chains[n].x.
      const bool staged = tree.num_nodes <= kMaxCand;
      if (staged) {
        auto put = [&](uint32_t n, const FlatTreeNode& r) {
          s0.commit[n] = r.parent;
          s0.cand_id[n] = r.child_begin;
          s0.cand_tok[n] = r.child_count;
          s0.node_tokens[n] = r.tokens;
        };
        if (static_cast<uint32_t>(tid) < n_radii) put(my_lo + tid, rec0);
        for (uint32_t t = tid + kThreads; t < my_hi - my_lo; t += kThreads) put(my_lo + t, tree.nodes[my_lo + t]);
      }
      {
        for (uint32_t s0i = my_lo; s0i < my_hi; s0i += kMaxCand) {
          const uint32_t cnt = min(kMaxCand, my_hi - s0i);
          if (s0i != my_lo) {  // the first slice's radii are loaded
            for (uint32_t t = tid; t < cnt; t += kThreads) sm.cand_score[t] = tree.nodes[s0i + t].radius;
            __syncthreads();
          }
          ScoreRows<D>(sm.mean, cnt, j, slot, warp,
                       [&](uint32_t i) { return tree.node_rows_bf16 + size_t{s0i + i} * D; },
                       [&](uint32_t i, float dot) {
                         const float sc = __fadd_rn(dot, __fmul_rn(wn, sm.cand_score[i]));
                         if (staged) {
                           s0.cand_chain[s0i + i].x = sc;
                         } else {
                           chains[s0i + i] = make_float4(sc, 0.f, 0.f, 0.f);
                         }
                       });
        }
      }
      KVMEM_TRACE(2);
      cluster.sync();  // every score is in rank 0 (or the scratch)
      KVMEM_TRACE(3);
      // The chunk arrays into L2 (KVMEM_SEARCH_PREFETCH) by the ranks other than 0 (rank 0
      // when alone), consecutive pieces on different ranks: each SM's bulk-copy unit issues its
      // pieces one after another.
      if (prefetch != 0 && (N == 1 || rank != 0)) {
        const uint32_t me = N > 1 ? tid * (N - 1) + rank - 1 : tid;
        const uint32_t workers = N > 1 ? (N - 1) * kThreads : kThreads;
        PrefetchL2(tree.leaf_chunks, size_t{num_chunks} * 4, me, workers);
        PrefetchL2(tree.chunk_start, size_t{num_chunks} * 8, me, workers);
        PrefetchL2(tree.chunk_tokens, size_t{num_chunks} * 4, me, workers);
        PrefetchL2(tree.chunk_radius, size_t{num_chunks} * 4, me, workers);
        PrefetchL2(task.chunk_block, size_t{num_chunks} * 8, me, workers);  // the attention's
      }
      stamp[1] = now();
      // 2b. Rank 0: chains level by level (parents first; global writes of this block are visible
      // to it after a barrier), and the leaves, unsorted: key = bottleneck (the root leaf of a
      // flat tree: +inf), sizes.
      if (rank == 0) {
        // The leaves' key range as they are listed: the first round's histogram needs no pass of
        // its own (later rounds take the range of the leaves still unexpanded).
        uint32_t leaf_lo = 0xffffffffu, leaf_hi = 0;
        auto add_leaf_at = [&](uint32_t at, uint32_t n, const FlatTreeNode& node, float key) {
          leaf_lo = min(leaf_lo, OrderedBits(key));
          leaf_hi = max(leaf_hi, OrderedBits(key));
          if (at < kMaxLeaves) {
            sm.leaf_key[at] = key;
            sm.leaf_idx[at] = n;
            sm.leaf_tokens[at] = node.tokens;
            sm.leaf_chunks[at] = node.child_count & ~kTreeLeafBit;
            sm.leaf_child_begin[at] = node.child_begin;
          }
        };
        if (tid == 0) {
          sm.key_lo = 0xffffffffu;
          sm.key_hi = 0;
          chains[0] = make_float4(kNegInf, kNegInf, kNegInf, kNegInf);
          if (staged) sm.cand_chain[0] = make_float4(kNegInf, kNegInf, kNegInf, kNegInf);
          if (root.child_count & kTreeLeafBit) add_leaf_at(atomicAdd(&sm.leaf_count, 1u), 0, root, INFINITY);
        }
        // Staged (2a): each level costs shared-memory reads instead of dependent global round
        // trips. (Until session 22 rank 0 loaded the links and the scores here: ~2K cycles at
        // 128K batch 1.)
        __syncthreads();
        KVMEM_TRACE(4);
        for (uint32_t l = 1; l < tree.num_levels; ++l) {
          const uint32_t lb = tree.level_begin[l], le = tree.level_begin[l + 1];
          for (uint32_t n0 = lb; n0 < le; n0 += kThreads) {
            const uint32_t n = n0 + tid;
            FlatTreeNode node{};
            float4 c{};
            if (n < le && staged) {
              node = FlatTreeNode{0.f, sm.commit[n], sm.cand_id[n], sm.cand_tok[n], sm.node_tokens[n]};
              c = Extend(sm.cand_chain[node.parent], sm.cand_chain[n].x);
              sm.cand_chain[n] = c;
              chains[n] = c;
            } else if (n < le) {
              node = tree.nodes[n];
              c = Extend(chains[node.parent], chains[n].x);
              chains[n] = c;
            }
            const bool leaf = n < le && (node.child_count & kTreeLeafBit);
            if (leaf) add_leaf_at(atomicAdd(&sm.leaf_count, 1u), n, node, c.x);  // any order
          }
          __syncthreads();
        }
        WarpRangeTo(&sm.key_lo, &sm.key_hi, leaf_lo, leaf_hi);
        // The first round's set-up (4a) here, before the barrier that ends the chains: that
        // round then starts on the leaf histogram without two barriers of its own.
        for (uint32_t i = tid; i < kHistBins; i += kThreads) {
          sm.hist_tok[i] = 0;
          sm.hist_chk[i] = 0;
        }
        if (tid == 0) {
          sm.expanded_tokens = 0;
          sm.e_next_bits = 0;
          sm.n_commit = 0;
          sm.new_count = 0;
          if (sm.leaf_count > kMaxLeaves) sm.status |= kSearchStatusTooManyLeaves;
        }
        __syncthreads();
      }
      KVMEM_TRACE(5);
      stamp[2] = now();
    }
    if (N > 1 && rank == N - 1) write_fixed();
    // 4. Rounds: rank 0 picks the best unexpanded leaves by a token-weighted histogram of their
    // keys (no sort: only the set and the best key left out matter) and reserves their pool
    // entries; every rank scores a slice of the new entries into rank 0's pool; rank 0 commits
    // the pool entries whose bottleneck beats every unexpanded leaf; they are sorted (by the
    // other ranks when N >= 3) and rank 0 scans them.
    const uint32_t L = rank == 0 ? min(sm.leaf_count, kMaxLeaves) : 0;
    // First round: the best leaves holding first_round x the budget (more rounds cost more than
    // a larger pool when many ranks score it).
    // Auto (0): 16 when >= 2 blocks share the search, the tree holds >= 4096 chunks and the
    // budget is <= 2048 tokens, else 8. H200, 128K (run 18, bench/results/h200_run18_search.txt):
    // batch 1 (8 blocks) budget 1024 / 2048: 51 / 51 us at 16 (one round) against 68 / 64 at 8
    // (three rounds); budget 4096: 53 at 8 against 59 at 16; batch 8 (2 blocks) budget 1024 /
    // 2048: 80 / 84 against 91 / 89 (two rounds); 32K (2K chunks): 8 (run 12: 53 against 70).
    // Such trees' first round also holds at least kFirstRoundMinTokens (session 13, 128K: at
    // budget 1024, 16x took a second round: batch 1 38.8 us against 29.4 with the floor (24x;
    // 32x was slower than 24x), batch 8 48.9 against 39.4; budgets 2048 and 4096, at 32K tokens
    // already, were slower at 12x or 20x). Budgets below 1024 get more than 24x: not measured.
    // The leaves taken never exceed the pool (TopBinsCut's chunk limit), only fewer are taken.
    const bool big = N >= 2 && num_chunks >= 4096;
    const uint32_t fr = first_round ? first_round : (big && prm.budget_tokens <= 2048 ? 16u : 8u);
    uint64_t target = uint64_t{fr} * prm.budget_tokens;
    if (first_round == 0 && big) target = max(target, uint64_t{kFirstRoundMinTokens});
    target += 1024;
    while (true) {
      uint32_t P = 0;
      if (rank == 0 && (sm.status != 0 || sm.done)) {
        // The scan stopped: only the others need telling. Rank 0 arrives at the barrier below
        // (releasing ctl) without waiting for it, and goes on to the runs; it waits at its end.
        if (tid == 0) sm.ctl = 0;
        ClusterArrive();
        rank0_arrived = true;
        break;
      }
      if (kFlat && rank == 0) {
        // F6. The next gather: the top bins of what no gather took yet that hold flat_need
        // tokens and fit the pool; their counts leave the histogram (a later cut starts below).
        P = sm.cand_count;
        tq = now();
        if (tid == 0) {
          sm.e_next_bits = 0;
          sm.n_commit = 0;
          sm.new_count = 0;
        }
        const bool any_left = sm.flat_gathered < num_chunks;
        const uint32_t prev = sm.flat_front;
        const unsigned long long need = sm.flat_need;
        const uint32_t cut = any_left ? TopBinsCut<kHistBins>(sm.g_hist_tok, sm.g_hist_chk, need,
                                                              kMaxCand - P, sm.cut)
                                      : kHistBins;
        bool took = false;
        for (uint32_t b = tid; b < kHistBins; b += kThreads) {
          if (b >= cut && b < prev) {
            took = took || sm.g_hist_chk[b] != 0;
            sm.g_hist_tok[b] = 0;
            sm.g_hist_chk[b] = 0;
          }
        }
        const bool round = __syncthreads_or(took) != 0;
        // Entries are left but not even the best bin fits the pool.
        if (tid == 0 && any_left && !round) sm.status |= kSearchStatusTooManyCandidates;
        if (tid == 0) {
          sm.flat_prev = prev;
          sm.flat_front = round ? cut : prev;
          sm.flat_need = need * 8 / 5;
          sm.key_lo = 0xffffffffu;  // now the commits' range
          sm.key_hi = 0;
          sm.ctl = round ? 1u : 0u;
          if (round) sm.rounds++;
        }
        t_sort_leaves += since(tq);
        tq = now();
      } else if (rank == 0) {
        P = sm.cand_count;
        tq = now();
        // 4a. Key range of the unexpanded leaves (the first round's was taken with the leaves).
        // The first round's set-up was done with the chains (2b).
        const bool later = sm.rounds > 0;
        const bool go_on = sm.status == 0 && !sm.done;
        if (later) {
          if (tid == 0) {
            sm.key_lo = 0xffffffffu;
            sm.key_hi = 0;
            sm.e_next_bits = 0;
            sm.n_commit = 0;
            sm.new_count = 0;
          }
          for (uint32_t i = tid; i < kHistBins; i += kThreads) {
            sm.hist_tok[i] = 0;
            sm.hist_chk[i] = 0;
          }
          __syncthreads();
          if (go_on) {
            uint32_t klo = 0xffffffffu, khi = 0;
            for (uint32_t i = tid; i < L; i += kThreads) {
              if (sm.leaf_chunks[i] & kDone) continue;
              const uint32_t o = OrderedBits(sm.leaf_key[i]);
              klo = min(klo, o);
              khi = max(khi, o);
            }
            WarpRangeTo(&sm.key_lo, &sm.key_hi, klo, khi);
          }
          __syncthreads();
        }
        KVMEM_TRACE(6);
        const float lo = FromOrderedBits(sm.key_lo), hi = FromOrderedBits(sm.key_hi);
        const bool any_left = go_on && sm.key_lo <= sm.key_hi;
        auto bin = [&](float k) { return KeyBin(k, lo, hi); };
        // 4b. Token and chunk histogram; warp 0 takes bins from the top while they are needed
        // and fit the pool.
        if (any_left) {
          for (uint32_t i = tid; i < L; i += kThreads) {
            if (sm.leaf_chunks[i] & kDone) continue;
            const uint32_t b = bin(sm.leaf_key[i]);
            atomicAdd(&sm.hist_tok[b], sm.leaf_tokens[i]);
            atomicAdd(&sm.hist_chk[b], sm.leaf_chunks[i]);
          }
        }
        __syncthreads();
        KVMEM_TRACE(7);
        const uint32_t cut =
            any_left ? TopBinsCut<kHistBins>(sm.hist_tok, sm.hist_chk,
                                             target > sm.expanded_tokens ? target - sm.expanded_tokens : 1,
                                             kMaxCand - P, sm.cut)
                     : kHistBins;
        KVMEM_TRACE(8);
        const bool round = any_left && cut < kHistBins;
        // Nothing left, or not even the best bin fits the pool.
        if (tid == 0 && any_left && !round) sm.status |= kSearchStatusTooManyCandidates;
        if (round) {
          // 4c. Take the leaves at or above the cut: reserve their pool ranges; the best key left.
          // Pool ranges by a warp prefix sum (one shared atomic per warp, not per leaf: a
          // per-leaf atomicAdd of its size on the one counter serialises; session 19 measured
          // this step at ~10K cycles that way against ~3.7K).
          uint32_t emax = 0;
          unsigned long long tok_sum = 0;
          for (uint32_t i0 = 0; i0 < L; i0 += kThreads) {
            const uint32_t i = i0 + tid;
            const bool open = i < L && !(sm.leaf_chunks[i] & kDone);
            const bool take = open && bin(sm.leaf_key[i]) >= cut;
            const uint32_t cnt = take ? sm.leaf_chunks[i] : 0;
            if (open && !take) emax = max(emax, OrderedBits(sm.leaf_key[i]) + 1);  // +1: 0 = none
            uint32_t pre = cnt;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
              const uint32_t x = __shfl_up_sync(0xffffffffu, pre, off);
              if (lane >= off) pre += x;
            }
            const uint32_t warp_total = __shfl_sync(0xffffffffu, pre, 31);
            uint32_t warp_base = 0;
            if (lane == 0 && warp_total) warp_base = atomicAdd(&sm.new_count, warp_total);
            warp_base = __shfl_sync(0xffffffffu, warp_base, 0);
            if (i0 == 0) KVMEM_TRACE(31);
            if (take) {
              const uint32_t first = P + warp_base + pre - cnt;
              tok_sum += sm.leaf_tokens[i];
              sm.leaf_chunks[i] = cnt | kDone;
              sm.leaf_tokens[i] = first;  // now: its pool base
              for (uint32_t q = 0; q < cnt; ++q) sm.cand_tok[first + q] = i;  // owner
            }
            if (i0 == 0) KVMEM_TRACE(32);
          }
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) tok_sum += __shfl_xor_sync(0xffffffffu, tok_sum, off);
          if (lane == 0 && tok_sum) atomicAdd(&sm.expanded_tokens, tok_sum);
          emax = __reduce_max_sync(0xffffffffu, emax);
          if (lane == 0 && emax) atomicMax(&sm.e_next_bits, emax);
        }
        __syncthreads();
        KVMEM_TRACE(9);
        if (tid == 0) {
          sm.key_lo = 0xffffffffu;  // the leaves' range is read: now the commits' range
          sm.key_hi = 0;
          sm.e_next = sm.e_next_bits ? FromOrderedBits(sm.e_next_bits - 1) : kNegInf;
          sm.ctl = round ? 1u : 0u;
          if (round) sm.rounds++;
        }
        t_sort_leaves += since(tq);
        tq = now();
      }
      cluster.sync();  // rank 0's reservation (ctl, new_count, owners) is visible
      KVMEM_TRACE(10);
      if (s0.ctl == 0) break;
      P = s0.cand_count;
      uint32_t M = kFlat ? 0 : s0.new_count;
      if constexpr (kFlat) {
        // F7. Every rank's entries in the gather's bins into rank 0's pool (slots by remote
        // atomics, one per warp); the best bottleneck left behind bounds what comes later.
        const uint32_t front = s0.flat_front, prev = s0.flat_prev;
        uint32_t emax = 0;
        for (uint32_t k0 = 0; k0 < f_n; k0 += kThreads) {
          const uint32_t k = k0 + tid;
          const float x = k < f_n ? sm.fl_chain[k].x : 0.f;
          const uint32_t b = k < f_n ? KeyBin(x, g_lo, g_hi) : 0;
          const bool take = k < f_n && b >= front && b < prev;
          if (k < f_n && b < front) emax = max(emax, OrderedBits(x) + 1);  // +1: 0 = none
          const uint32_t at = WarpSlot(&s0.new_count, take);
          if (take) {
            const uint32_t t = P + at;
            s0.cand_id[t] = sm.fl_id[k];
            s0.cand_chain[t] = sm.fl_chain[k];
            s0.cand_score[t] = sm.fl_score[k];
            s0.cand_tok[t] = sm.fl_tok[k];
          }
        }
        emax = __reduce_max_sync(0xffffffffu, emax);
        if (lane == 0 && emax) atomicMax(&s0.e_next_bits, emax);
        cluster.sync();  // the gather is in rank 0
        M = s0.new_count;
      } else {
        // 4d. This rank's slice of the new entries: chunk ids, radii, counted tokens and the
        // leaf's chain, then the scores.
        const uint32_t per = (M + N - 1) / N;
        const uint32_t lo = min(M, rank * per), cnt = min(M, lo + per) - lo, base = P + lo;
        const uint64_t t_look = now();
        // Up to kLook entries per thread in flight: each step's loads for all of them before
        // the next step's (owner, then its leaf, then the chunk), not one entry's chain at a time.
        constexpr int kLook = 4;
        const uint32_t skip_below = prm.skip_tokens_below;
        for (uint32_t t0 = base; t0 < base + cnt; t0 += kLook * kThreads) {
          uint32_t owner[kLook], at[kLook], lidx[kLook], c[kLook];
#pragma unroll
          for (int u = 0; u < kLook; ++u) {
            const uint32_t t = t0 + tid + u * kThreads;
            owner[u] = t < base + cnt ? s0.cand_tok[t] : kTreeNone;
          }
#pragma unroll
          for (int u = 0; u < kLook; ++u) {
            if (owner[u] == kTreeNone) continue;
            const uint32_t t = t0 + tid + u * kThreads;
            at[u] = s0.leaf_child_begin[owner[u]] + (t - s0.leaf_tokens[owner[u]]);
            lidx[u] = s0.leaf_idx[owner[u]];
          }
#pragma unroll
          for (int u = 0; u < kLook; ++u) {
            if (owner[u] != kTreeNone) c[u] = tree.leaf_chunks[at[u]];
          }
#pragma unroll
          for (int u = 0; u < kLook; ++u) {
            if (owner[u] == kTreeNone) continue;
            const uint32_t t = t0 + tid + u * kThreads;
            const uint32_t tok = CountedTokens(tree.chunk_start[c[u]], tree.chunk_tokens[c[u]], skip_below);
            sm.cand_id[t] = c[u];
            sm.cand_chain[t] = chains[lidx[u]];  // extended by the score below
            sm.cand_score[t] = tree.chunk_radius[c[u]];  // replaced by the score below
            if (rank != 0) {  // rank 0's pool: id and tokens now, chain and score when scored
              s0.cand_id[t] = c[u];
              s0.cand_tok[t] = tok;
            } else {
              sm.cand_tok[t] = tok;
            }
          }
        }
        __syncthreads();
        KVMEM_TRACE(11);
        const uint64_t t_row = now();
        t_lookup += t_row - t_look;
        ScoreRows<D>(sm.mean, cnt, j, slot, warp,
                     [&](uint32_t i) { return tree.chunk_rows_bf16 + size_t{sm.cand_id[base + i]} * D; },
                     [&](uint32_t i, float dot) {
                       const float sc = __fadd_rn(dot, __fmul_rn(wc, sm.cand_score[base + i]));
                       const float4 ch = Extend(sm.cand_chain[base + i], sc);
                       if (rank != 0) {  // straight into rank 0's pool (DSMEM)
                         s0.cand_chain[base + i] = ch;
                         s0.cand_score[base + i] = sc;
                       } else {
                         sm.cand_chain[base + i] = ch;
                         sm.cand_score[base + i] = sc;
                       }
                     });
        t_rows += since(t_row);
        KVMEM_TRACE(12);
        cluster.sync();  // the whole pool is scored, in rank 0
      }
      KVMEM_TRACE(13);
      uint32_t C = 0;
      if (rank == 0) {
        if (tid == 0) {
          sm.nodes_scored += M;
          sm.cand_count = P + M;
          sm.left = sm.e_next_bits != 0;
          if (kFlat) sm.flat_gathered += M;
        }
        t_score += since(tq);
        tq = now();
        // Commit: unconsumed entries above the next leaf's bottleneck (the flat search: above
        // every entry no gather took yet, so all of this gather).
        // Their bottleneck range (for the slice's histogram) on the way.
        const float thr = !kFlat ? sm.e_next
                          : sm.e_next_bits ? FromOrderedBits(sm.e_next_bits - 1) : kNegInf;
        uint32_t klo = 0xffffffffu, khi = 0;
        for (uint32_t i0 = 0; i0 < P + M; i0 += kThreads) {
          const uint32_t i = i0 + tid;
          const float x = i < P + M ? sm.cand_chain[i].x : kNegInf;
          const bool take = i < P + M && !(sm.cand_tok[i] & kConsumed) && x > thr;
          if (take) {  // any order: the slice's ranking and the sorts order by key
            sm.commit[atomicAdd(&sm.n_commit, 1u)] = i;
            sm.cand_tok[i] |= kConsumed;
            klo = min(klo, OrderedBits(x));
            khi = max(khi, OrderedBits(x));
          }
        }
        WarpRangeTo(&sm.key_lo, &sm.key_hi, klo, khi);
        if (tid == 0) {
          sm.n_rest = 0;
          sm.slice_back = 0;
          sm.more = 0;
          sm.sure_count = sm.sure_tokens = 0;
          sm.front_sorted = 0;
        }
        for (uint32_t i = tid; i < kHistBins; i += kThreads) {
          sm.hist_tok[i] = 0;
          sm.hist_chk[i] = 0;
        }
        __syncthreads();
        KVMEM_TRACE(14);
        C = sm.n_commit;
        // Slice: a token-weighted histogram of the commits' bottlenecks (a bin holds a range of
        // bottlenecks, so the bins from the top are a prefix of the scan order). The commits in
        // the bins that hold the remaining budget + slack are sorted (commit[0, n_sort)); the
        // rest wait at the end of commit[] and are sorted only when the scan goes through the
        // slice without stopping. The bins above the one where the remaining budget runs out
        // hold fewer tokens than remain, so every chunk in them fits when offered: the slice's
        // first sure_count entries are accepted at once rather than one by one.
        if (tid == 0) sm.n_sort = C;  // read after the barrier that ends the slicing
        if (C > kSliceMin && slice_slack != kSliceOff) {
          KVMEM_TRACE(15);
          const float lo = FromOrderedBits(sm.key_lo), hi = FromOrderedBits(sm.key_hi);
          auto sbin = [&](float k) { return KeyBin(k, lo, hi); };
          for (uint32_t i = tid; i < C; i += kThreads) {
            const uint32_t e = sm.commit[i];
            const uint32_t b = sbin(sm.cand_chain[e].x);
            atomicAdd(&sm.hist_tok[b], sm.cand_tok[e] & ~kConsumed);
            atomicAdd(&sm.hist_chk[b], 1u);
          }
          __syncthreads();
          KVMEM_TRACE(16);
          const uint32_t rem = sm.remaining;
          const uint32_t need = rem + (slice_slack ? slice_slack : rem / 16 + 512);
          // Bins from `sure` up all fit (none when the selection could reach max_selected).
          uint32_t cuts[2];
          uint32_t* above = sm.hist_tok;  // each bin's commits in the bins above it
          TopBinsCuts<kHistBins, 2>(sm.hist_tok, sm.hist_chk, {need, rem}, {kSliceMax, kMaxCand},
                                    sm.cut, cuts, above);
          const uint32_t cut = cuts[0];
          const uint32_t sure = sm.nsel + rem <= max_selected ? cuts[1] + 1 : kHistBins;
          const uint32_t front = min(cut, sure);  // the slice: bins >= front
          KVMEM_TRACE(17);
          if (front < kHistBins) {
            // Bucket sort of the slice: each commit goes to its bin's range of commit[] (bins
            // from the top), then takes its place in the range by counting the bin's entries
            // before it (a few dozen at most per bin): in scan order below `sure`, by chunk id
            // within the sure bins (accepted whole); the rest go to the end of commit[].
            constexpr int kPer = static_cast<int>(kSortCap / kThreads);
            uint32_t v[kPer];
#pragma unroll
            for (int u = 0; u < kPer; ++u) {
              const uint32_t k = tid + u * kThreads;
              v[u] = k < C ? sm.commit[k] : kTreeNone;
            }
            __syncthreads();
            const uint32_t n_front = front > 0 ? above[front - 1] : C;
#pragma unroll
            for (int u = 0; u < kPer; ++u) {
              if (u * kThreads >= C) break;  // uniform
              // A slot in its bin's range (or at the back) by a plain shared atomic each (the
              // hardware combines a warp's atomics on one address): the order inside a bin does
              // not matter, the ranking below places every entry by its key, and the rest is
              // sorted before it is scanned.
              const uint32_t e = v[u];
              const uint32_t b = e != kTreeNone ? sbin(sm.cand_chain[e].x) : 0;
              const bool in_front = e != kTreeNone && b >= front;
              const bool in_rest = e != kTreeNone && b < front;
              const uint32_t sure_mask = __ballot_sync(0xffffffffu, in_front && b >= sure);
              if (lane == 0 && sure_mask) atomicAdd(&sm.sure_count, __popc(sure_mask));
              if (in_rest) sm.commit[kSortCap - 1 - atomicAdd(&sm.slice_back, 1u)] = e;
              if (in_front) sm.commit[above[b] + atomicSub(&sm.hist_chk[b], 1u) - 1] = e;
            }
            __syncthreads();
            KVMEM_TRACE(28);
            // The slice's keys contiguous (when they fit the staging): a bin can hold many
            // entries of one bottleneck (chunks under the same weakest node), and the ranking
            // loop then reads them without an index hop.
            const bool staged = n_front <= kThreads;
            if (staged && static_cast<uint32_t>(tid) < n_front) {
              const uint32_t e = sm.commit[tid];
              sm.sort_chain[tid] = sm.cand_chain[e];
              sm.sort_id[tid] = sm.cand_id[e];
            }
            __syncthreads();
            KVMEM_TRACE(29);
            // A slice of at most kThreads / 2 entries ranks each with g = 2..16 lanes of a warp,
            // every lane counting every g-th entry of the bin, summed by shuffles; the group's
            // first lane places it. Larger slices: a thread per entry.
            const uint32_t g = n_front <= kThreads / 16  ? 16u
                               : n_front <= kThreads / 8 ? 8u
                               : n_front <= kThreads / 4 ? 4u
                               : n_front <= kThreads / 2 ? 2u
                                                         : 1u;
            if (g > 1) {
              const uint32_t i = tid / g, sub = tid % g;
              const uint32_t e = i < n_front ? sm.commit[i] : kTreeNone;
              uint32_t r = 0, first = 0;
              if (e != kTreeNone) {
                const float4 c = sm.cand_chain[e];
                const uint32_t id = sm.cand_id[e];
                const uint32_t b = sbin(c.x);
                first = above[b];
                const uint32_t last = b > 0 ? above[b - 1] : C;
                if (b >= sure) {  // a sure bin (accepted whole): chunk ids
                  for (uint32_t k = first + sub; k < last; k += g) r += sm.sort_id[k] < id ? 1u : 0u;
                } else {
                  for (uint32_t k = first + sub; k < last; k += g) {
                    r += Before(sm.sort_chain[k], sm.sort_id[k], c, id) ? 1u : 0u;
                  }
                }
              }
              for (uint32_t off = 1; off < g; off <<= 1) r += __shfl_xor_sync(0xffffffffu, r, off);
              __syncthreads();
              KVMEM_TRACE(30);
              if (sub == 0 && e != kTreeNone) sm.commit[first + r] = e;
            } else {
              uint32_t rank[kPer];
#pragma unroll
              for (int u = 0; u < kPer; ++u) {
                const uint32_t i = tid + u * kThreads;
                v[u] = i < n_front ? sm.commit[i] : kTreeNone;
                rank[u] = i;
                if (u * kThreads >= n_front) continue;
                if (v[u] == kTreeNone) continue;
                const float4 c = sm.cand_chain[v[u]];
                const uint32_t id = sm.cand_id[v[u]];
                const uint32_t b = sbin(c.x);
                const uint32_t lo = above[b], hi = b > 0 ? above[b - 1] : C;
                uint32_t r = lo;
                if (staged && b >= sure) {
                  // All of a sure bin is accepted: any fixed order will do (chunk ids).
                  for (uint32_t k = lo; k < hi; ++k) r += sm.sort_id[k] < id ? 1u : 0u;
                } else if (staged) {
#pragma unroll 4
                  for (uint32_t k = lo; k < hi; ++k) r += Before(sm.sort_chain[k], sm.sort_id[k], c, id) ? 1u : 0u;
                } else {
                  for (uint32_t k = lo; k < hi; ++k) {
                    const uint32_t o = sm.commit[k];
                    r += Before(sm.cand_chain[o], sm.cand_id[o], c, id) ? 1u : 0u;
                  }
                }
                rank[u] = r;
              }
              __syncthreads();
              KVMEM_TRACE(30);
#pragma unroll
              for (int u = 0; u < kPer; ++u) {
                if (v[u] != kTreeNone) sm.commit[rank[u]] = v[u];
              }
            }
            if (tid == 0) {
              sm.n_sort = n_front;
              sm.n_rest = sm.slice_back;
              sm.front_sorted = 1;
            }
            if (kTrace && trace_on && first_round_trace) {
              dbg[0] = C;
              dbg[1] = n_front;
              dbg[2] = sm.sure_count;
            }
          }
        }
        __syncthreads();
        KVMEM_TRACE(18);
      }
      for (uint32_t slice = 0;; ++slice) {
        uint32_t n = 0;  // entries of this slice: commit[0, n)
        if (rank == 0) {
          n = sm.n_sort;
          if (slice > 0 || !sm.front_sorted) SortCommits(sm, n);
        }
        if (rank == 0) {
          const uint32_t* order = sm.commit;
          C = n;
          KVMEM_TRACE(19);
          t_sort += since(tq);
          tq = now();
          // The slice's first sure_count entries (sorted first: their bins are the top ones)
          // all fit: accepted at once.
          const uint32_t ns = slice == 0 ? min(sm.sure_count, C) : 0;
          if (ns > 0) {
            const uint32_t nsel0 = sm.nsel;
            uint32_t at = nsel0, tok_sum = 0;
            for (uint32_t b0 = 0; b0 < ns; b0 += kThreads) {
              const uint32_t i = b0 + tid;
              const uint32_t e = i < ns ? order[i] : 0;
              const uint32_t t = i < ns ? sm.cand_tok[e] & ~kConsumed : 0;
              // Usually every entry has tokens (only chunks wholly inside the sinks have none):
              // then each goes to its own index, without a block count.
              const bool dense = __syncthreads_and(i >= ns || t > 0) != 0;
              uint32_t before = 0, all = min(ns - b0, static_cast<uint32_t>(kThreads)), mask = 0;
              if (!dense) {
                mask = __ballot_sync(0xffffffffu, t > 0);
                if (lane == 0) sm.scan_tmp[warp] = __popc(mask);
                __syncthreads();
                all = 0;
                for (int w = 0; w < kWarps; ++w) {
                  before += w < warp ? sm.scan_tmp[w] : 0;
                  all += sm.scan_tmp[w];
                }
              }
              if (t > 0) {
                const uint32_t pos = dense ? at + tid : at + before + __popc(mask & ((1u << lane) - 1));
                const uint32_t c = sm.cand_id[e];
                my_sel[pos] = c;
                my_scores[pos] = sm.cand_score[e];
                atomicOr(&sm.bitmap[c >> 5], 1u << (c & 31));
                tok_sum += t;
              }
              at += all;
              __syncthreads();
            }
            tok_sum = __reduce_add_sync(0xffffffffu, tok_sum);
            if (lane == 0 && tok_sum) atomicAdd(&sm.sure_tokens, tok_sum);
            __syncthreads();
            if (tid == 0 && at > nsel0) {
              sm.nsel = at;
              sm.remaining -= sm.sure_tokens;  // less than remained: the sure bins hold less
              sm.sel_tokens += sm.sure_tokens;
              sm.misfits = 0;
            }
            __syncthreads();
          }
          // The scan: CPU offer() in order, from the first entry not accepted above. Warp 0.
          if (warp == 0) {
            uint32_t remaining = sm.remaining, misfits = sm.misfits, nsel = sm.nsel;
            uint32_t sel_tokens = sm.sel_tokens;
            const uint32_t max_misfits = prm.max_consecutive_misfits;
            bool done = false;
            for (uint32_t b0 = ns; b0 < C && !done; b0 += 32) {
              const uint32_t i = b0 + lane;
              const uint32_t e = i < C ? order[i] : 0;
              const uint32_t tok = i < C ? (sm.cand_tok[e] & ~kConsumed) : 0;
              uint32_t pre = tok;
  #pragma unroll
              for (int off = 1; off < 32; off <<= 1) {
                const uint32_t x = __shfl_up_sync(0xffffffffu, pre, off);
                if (lane >= off) pre += x;
              }
              const uint32_t total = __shfl_sync(0xffffffffu, pre, 31);
              const uint32_t mask = __ballot_sync(0xffffffffu, tok > 0);
              if (total <= remaining && nsel + 32 <= max_selected) {
                // Everything fits: accept every non-empty chunk of the batch.
                if (tok > 0) {
                  const uint32_t at = nsel + __popc(mask & ((1u << lane) - 1));
                  const uint32_t c = sm.cand_id[e];
                  my_sel[at] = c;
                  my_scores[at] = sm.cand_score[e];
                  atomicOr(&sm.bitmap[c >> 5], 1u << (c & 31));
                }
                nsel += __popc(mask);
                remaining -= total;
                sel_tokens += total;
                if (mask) misfits = 0;
                done = mask != 0 && remaining == 0;
              } else {
                // One by one near the end of the budget: every lane follows the same decisions
                // (each entry's size by shuffle, no shared-memory round trip per entry), then
                // the accepted lanes write their chunks at once.
                const uint32_t n = min(32u, C - b0), nsel0 = nsel;
                uint32_t acc = 0;
                // The lanes before the first whose running total passes `remaining` fit one
                // after another (the loop below would accept each): accepted at once, when
                // max_selected allows all of them; the loop goes on from there.
                const uint32_t over = __ballot_sync(0xffffffffu, pre > remaining);
                const uint32_t q0 = over ? min(n, static_cast<uint32_t>(__ffs(over) - 1)) : n;
                const uint32_t head = q0 > 0 ? __shfl_sync(0xffffffffu, pre, q0 - 1) : 0;
                const uint32_t fit = mask & (q0 >= 32 ? 0xffffffffu : (1u << q0) - 1u);
                uint32_t q_start = 0;
                if (fit != 0 && nsel + __popc(fit) <= max_selected) {
                  acc = fit;
                  nsel += __popc(fit);
                  remaining -= head;
                  sel_tokens += head;
                  misfits = 0;
                  done = remaining == 0;
                  q_start = q0;
                }
                // Then from acceptance to acceptance: while `remaining` stays, the non-empty
                // entries before the next one that fits are misfits, one after another (the
                // decisions of offer(), a step per accepted entry rather than per entry).
                const uint32_t in_batch = n >= 32 ? 0xffffffffu : (1u << n) - 1u;
                for (uint32_t q = q_start; q < n && !done;) {
                  const uint32_t from = in_batch & ~((1u << q) - 1u);  // q < 32
                  const uint32_t fits = __ballot_sync(0xffffffffu, tok > 0 && tok <= remaining) & from;
                  const uint32_t f = fits ? static_cast<uint32_t>(__ffs(fits) - 1) : n;
                  const uint32_t before_f = f >= 32 ? 0xffffffffu : (1u << f) - 1u;
                  misfits += __popc(mask & from & before_f);
                  if (misfits >= max_misfits) {
                    done = true;
                  } else if (f >= n) {
                    q = n;
                  } else if (nsel >= max_selected) {
                    done = true;
                  } else {
                    const uint32_t t = __shfl_sync(0xffffffffu, tok, f);
                    misfits = 0;
                    remaining -= t;
                    sel_tokens += t;
                    acc |= 1u << f;
                    ++nsel;
                    done = remaining == 0;
                    q = f + 1;
                  }
                }
                if ((acc >> lane) & 1u) {
                  const uint32_t at = nsel0 + __popc(acc & ((1u << lane) - 1));
                  const uint32_t c = sm.cand_id[e];
                  my_sel[at] = c;
                  my_scores[at] = sm.cand_score[e];
                  atomicOr(&sm.bitmap[c >> 5], 1u << (c & 31));
                }
              }
            }
            __syncwarp();  // every lane read the state above before lane 0 writes it
            if (lane == 0) {
              sm.remaining = remaining;
              sm.misfits = misfits;
              sm.nsel = nsel;
              sm.sel_tokens = sel_tokens;
              // A second slice when the scan went through the first without stopping.
              sm.more = !done && slice == 0 && sm.n_rest > 0;
              if (sm.more) sm.n_sort = sm.n_rest;
              sm.done = done || (!sm.more && !sm.left);
            }
          }
          __syncthreads();
          KVMEM_TRACE(20);
          first_round_trace = false;
          t_scan += since(tq);
          if (sm.more) {
            // The rest (at the end of commit[]) to the front, staged through registers.
            const uint32_t nr = sm.n_rest;
            uint32_t v[kSortCap / kThreads];
  #pragma unroll
            for (int u = 0; u < static_cast<int>(kSortCap / kThreads); ++u) {
              const uint32_t k = tid + u * kThreads;
              v[u] = k < nr ? sm.commit[kSortCap - nr + k] : 0;
            }
            __syncthreads();
  #pragma unroll
            for (int u = 0; u < static_cast<int>(kSortCap / kThreads); ++u) {
              const uint32_t k = tid + u * kThreads;
              if (k < nr) sm.commit[k] = v[u];
            }
            __syncthreads();
          }
        }
        // The other ranks take no part in the slices.
        if (rank != 0 || sm.more == 0) break;
      }
      if (rank == 0) target = target * 8 / 5;
    }
    // The others leave after reading ctl, and rank 0 never writes ctl again.
  } else if (N > 1) {  // nothing to search: the fixed pieces still, for rank 0 after the barrier
    if (rank == N - 1) write_fixed();
    cluster.sync();
  }
  // But rank 0's shared memory must outlive every remote access to it (a block's shared memory
  // is gone once it exits): each rank's last one (the read of ctl above) comes before this
  // arrive, and rank 0 waits for them all before it exits. compute-sanitizer racecheck flagged
  // the others' read of ctl without this (session 16).
  if (!rank0_arrived) ClusterArrive();
  if (rank != 0) return;
  __syncthreads();

  first_round_trace = true;
  KVMEM_TRACE(21);
  stamp[3] = now();
  if (N == 1) {  // the fixed pieces: this block's own (the others' last rank writes them early)
    write_fixed();
    __syncthreads();
  }
  KVMEM_TRACE(22);
  // The attention's entries (SearchRunHeader) and the results. The selection's attended tokens
  // are its counted tokens, corrected for the edge chunks whose selected piece differs.
  if (warp == 0) {
    // The fixed pieces' state is complete here only when rank 0 went through a round (or had
    // nothing to search: the barrier after the writer): a head that failed before its first
    // round (it left at the loop's first barrier without waiting) reads none of it.
    const bool ok = sm.status == 0;
    const uint32_t n_diffs = ok ? min(sm.fx_ndiff, kMaxFixedDiffs) : 0u;
    int32_t extra = 0;
    for (uint32_t k = lane; k < n_diffs; k += 32) {
      const uint32_t c = sm.fx_diff_c[k];
      if (c < kSearchMaxChunks && ((sm.bitmap[c >> 5] >> (c & 31)) & 1u)) extra += sm.fx_diff_v[k];
    }
    // The selected chunks wholly inside the recent window attend none of their (whole) counted
    // tokens: the window's pieces hold them.
    const uint32_t whole_from = ok ? min(sm.fx_whole_from, num_chunks) : num_chunks;
    for (uint32_t w = whole_from / 32 + lane; w * 32 < num_chunks; w += 32) {
      uint32_t bits = sm.bitmap[w];
      if (w == whole_from / 32) bits &= ~0u << (whole_from & 31);
      while (bits != 0) {
        extra -= static_cast<int32_t>(tree.chunk_tokens[w * 32 + __ffs(bits) - 1]);
        bits &= bits - 1;
      }
    }
    extra = __reduce_add_sync(0xffffffffu, extra);
    if (lane == 0) {
      uint32_t status = ok ? sm.fx_status : sm.status;
      const uint32_t entries = ok ? sm.nsel + sm.fx_n : 0u, ns = max(task.num_splits, 1u);
      if (status == 0 && (entries + ns - 1) / ns > kMaxRunsPerItem) status |= kSearchStatusTooManyRuns;
      SearchRunHeader hdr;
      hdr.chunk_block = task.chunk_block;
      hdr.chunk_tokens = tree.chunk_tokens;
      hdr.chunk_start = tree.chunk_start;
      hdr.fixed = fixed;
      hdr.recent_from = task.recent_from;
      hdr.sink_tokens = task.sink_tokens;
      hdr.kv_head = task.kv_head;
      hdr.kv_heads = task.kv_heads;
      hdr.nsel = sm.nsel;
      hdr.entries = status == 0 ? entries : 0;
      hdr.pad = 0;
      headers[task_index] = hdr;
      KVMEM_TRACE(23);
      const int trace_seq = kTrace && trace_on ? atomicAdd(&g_trace_prints, 1) : -1;
      if (kTrace && trace_on && trace_seq >= 8 && trace_seq < 11) {
        printf("search trace (cycles since the previous point; first round), N=%u:", N);
        for (int k = 1; k < 24; ++k) printf(" %d:%lld", k, tr[k] && tr[k - 1] ? tr[k] - tr[k - 1] : -1ll);
        printf(" total %lld cycles, %llu ns; slice: commits %u entries %u sure %u; 17-18: %lld %lld %lld %lld;"
               " 1: %lld %lld %lld %lld %lld; 9: %lld %lld %lld\n",
               tr[23] - tr[0], (unsigned long long)since(stamp[0]), dbg[0], dbg[1], dbg[2],
               tr[28] - tr[17], tr[29] - tr[28], tr[30] - tr[29], tr[18] - tr[30], tr[24] - tr[0],
               tr[25] - tr[24], tr[26] - tr[25], tr[27] - tr[26], tr[1] - tr[27], tr[31] - tr[8],
               tr[32] - tr[31], tr[9] - tr[32]);
      }
      SearchTaskResult res{};
      res.status = status;
      res.num_selected = sm.nsel;
      res.selected_tokens = sm.sel_tokens;
      res.attended_tokens = status == 0 ? sm.fx_tokens + sm.sel_tokens + extra : 0;
      // The flat search scores every chunk (and every node but the root).
      res.nodes_scored = (kFlat && search ? num_chunks : sm.nodes_scored) + nn;
      res.rounds = sm.rounds;
      stamp[4] = now();
      for (int i = 1; i <= 3; ++i) stamp[i] = stamp[i] ? stamp[i] : stamp[i - 1];
      for (int i = 0; i < 4; ++i) {
        res.phase_ns[i] = stamp[i + 1] > stamp[i] ? static_cast<uint32_t>(stamp[i + 1] - stamp[i]) : 0;
      }
      res.phase_ns[4] = static_cast<uint32_t>(t_sort_leaves);
      res.phase_ns[5] = static_cast<uint32_t>(t_score);
      res.phase_ns[6] = static_cast<uint32_t>(t_sort);
      res.phase_ns[7] = static_cast<uint32_t>(t_scan);
      res.score_ns[0] = static_cast<uint32_t>(t_lookup);
      res.score_ns[1] = static_cast<uint32_t>(t_rows);
      results[task_index] = res;
    }
  }
#undef KVMEM_TRACE
  ClusterWait();  // every rank's last read of this block's shared memory is done
  if (rank0_arrived) {  // that was the loop's last barrier: the others' arrive after ctl is next
    ClusterArrive();
    ClusterWait();
  }
}

template <int D, bool kTrace, bool kFlat>
__global__ void __launch_bounds__(kThreads, 1)
    TreeSearchKernel(const SearchTaskDesc* __restrict__ tasks, AttendItemDesc* items,
                     AttendRunDesc* runs, SearchRunHeader* headers, SearchTaskResult* results,
                     uint32_t* selected, float* sel_scores, uint32_t max_selected, float* scratch,
                     DType q_dtype, uint32_t first_round, uint32_t slice_slack,
                     uint32_t prefetch) {
  TreeSearchBody<D, kTrace, false, kFlat>(tasks, items, runs, headers, results, selected,
                                          sel_scores, max_selected, scratch, q_dtype, first_round,
                                          slice_slack, prefetch, InlineSource{});
}

// The parameters of an inline launch: data = [q | plan image at image_off].
struct InlineImage {
  const uint8_t* q_dev;
  uint32_t image_off, tasks_off, items_off, pad;
  alignas(16) uint8_t data[kSearchInlineBytes];
};

template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    TreeSearchInlineKernel(AttendItemDesc* items, AttendRunDesc* runs, SearchRunHeader* headers,
                           SearchTaskResult* results, uint32_t* selected, float* sel_scores, uint32_t max_selected,
                           float* scratch, DType q_dtype, uint32_t first_round,
                           uint32_t slice_slack, uint32_t prefetch, uint32_t* counters,
                           const __grid_constant__ InlineImage img) {
  const uint8_t* image = img.data + img.image_off;
  InlineSource inl;
  inl.q = img.data;
  inl.q_dev = img.q_dev;
  inl.items = reinterpret_cast<const AttendItemDesc*>(image + img.items_off);
  inl.counters = counters;
  TreeSearchBody<D, false, true, false>(
      reinterpret_cast<const SearchTaskDesc*>(image + img.tasks_off), items, runs, headers, results,
      selected, sel_scores, max_selected, scratch, q_dtype, first_round, slice_slack, prefetch, inl);
}

// Sets the kernel's shared-memory limit and allows clusters of 16, once.
template <typename Kernel>
cudaError_t PrepareKernel(Kernel kernel) {
  cudaError_t r = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(sizeof(Smem)));
  if (r == cudaSuccess) r = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (r != cudaSuccess) (void)cudaGetLastError();
  return r;
}

template <int D, bool kTrace = false, bool kFlat = false>
cudaError_t PrepareSearchKernel() {
  static const cudaError_t e = PrepareKernel(TreeSearchKernel<D, kTrace, kFlat>);
  return e;
}

// The search kernel variant, with *e its one-time preparation's result (so a launch prepares
// exactly the variant it launches).
template <int D, bool kTrace, bool kFlat>
auto Prepared(cudaError_t* e) {
  *e = PrepareSearchKernel<D, kTrace, kFlat>();
  return TreeSearchKernel<D, kTrace, kFlat>;
}

template <int D>
cudaError_t PrepareInlineKernel() {
  static const cudaError_t e = PrepareKernel(TreeSearchInlineKernel<D>);
  return e;
}

// Blocks per cluster: the most (up to 16) whose clusters all run at once for `tasks` tasks.
template <int D>
uint32_t ClusterSize(uint32_t tasks, uint32_t forced) {
  if (forced != 0) return forced;
  if (const char* e = std::getenv("KVMEM_SEARCH_CLUSTER")) {
    const int v = std::atoi(e);
    if (v >= 1 && v <= 16) return static_cast<uint32_t>(v);
  }
  // Any size (not only powers of two): one batch-1 layer (8 tasks) gets the most SMs whose
  // clusters all run at once (9 blocks each on the H200, where 8 clusters of 16 do not fit).
  static const auto max_clusters = [] {
    std::array<int, 17> n{};  // by size
    if (PrepareSearchKernel<D>() != cudaSuccess) return n;
    for (uint32_t c = 1; c <= 16; ++c) {
      n[c] = MaxActiveClusters(TreeSearchKernel<D, false, false>, c, kThreads, sizeof(Smem));
    }
    return n;
  }();
  for (uint32_t c = 16; c >= 2; --c) {
    if (max_clusters[c] >= static_cast<int>(tasks)) return c;
  }
  return 1;
}

// Budget multiple the first round expands (0: the kernel's choice per tree).
// KVMEM_SEARCH_FIRST_ROUND (2..64) fixes it, for A/B timing.
// Tokens beyond the remaining budget the first commit slice holds (0: a 16th of the remaining
// + 512). KVMEM_SEARCH_SLICE_SLACK fixes it (>= 1), or turns slicing off ("off"), for A/B timing
// and for tests that force the second slice.
uint32_t SliceSlack() {
  if (const char* e = std::getenv("KVMEM_SEARCH_SLICE_SLACK")) {
    if (std::string(e) == "off") return kSliceOff;
    const int v = std::atoi(e);
    if (v >= 1) return static_cast<uint32_t>(v);
  }
  return 0;
}

// The flat search (every chunk scored at once, no rounds of leaves) or the rounds. Auto: flat
// when every task's tree fits it (at most kFlatPerRank chunks per block, kFlatMaxNodes nodes)
// and no block scores more than kFlatAutoPerRank chunks: the flat search reads every row, 256
// rows per dependent pass of ScoreRows, where the rounds read the best leaves' only. H200,
// session 16 (bench/results/h200_session16_calls.txt, call 3): flat faster at 8K (57, 258 and
// ~515 chunks per block at batch 1, 8 and 32) and 32K batch 1 (228), mixed at 32K batch 8
// (1024), slower at 128K batch 1 (906: its rows took 14.7 us). KVMEM_SEARCH_FLAT=on (whenever
// the trees fit) | off, for A/B timing and tests.
constexpr uint32_t kFlatAutoPerRank = 768;

bool UseFlat(const SearchAttendPlan& plan, uint32_t cluster) {
  int mode = 0;  // read at every launch, as the tests switch it
  if (const char* e = std::getenv("KVMEM_SEARCH_FLAT"))
    mode = std::string(e) == "on" ? 1 : std::string(e) == "off" ? -1 : 0;
  if (mode < 0 ||
      plan.image.size() < plan.tasks_off + size_t{plan.num_tasks} * sizeof(SearchTaskDesc)) {
    return false;
  }
  const auto* descs = reinterpret_cast<const SearchTaskDesc*>(plan.image.data() + plan.tasks_off);
  uint32_t most = 0;  // chunks per block, the largest tree
  for (uint32_t t = 0; t < plan.num_tasks; ++t) {
    const FlatTreeView& tree = descs[t].tree;
    most = std::max(most, (tree.num_chunks + cluster - 1) / cluster);
    if (most > kFlatPerRank || tree.num_nodes > kFlatMaxNodes) return false;
  }
  return mode > 0 || most <= kFlatAutoPerRank;
}

// KVMEM_SEARCH_PREFETCH=0 turns the chunk arrays' prefetch off, for A/B timing.
uint32_t Prefetch() {
  const char* e = std::getenv("KVMEM_SEARCH_PREFETCH");
  return e != nullptr && std::string(e) == "0" ? 0u : 1u;
}

uint32_t FirstRound() {
  if (const char* e = std::getenv("KVMEM_SEARCH_FIRST_ROUND")) {
    const int v = std::atoi(e);
    if (v >= 2 && v <= 64) return static_cast<uint32_t>(v);
  }
  return 0;
}

// The search's launch: plan.num_tasks thread-block clusters of ClusterSize blocks (the cluster
// dimension in *attr, which must outlive the launch call).
template <int D>
Status SearchLaunchConfig(const SearchAttendPlan& plan, cudaStream_t s, cudaLaunchConfig_t* cfg,
                          cudaLaunchAttribute* attr) {
  const uint32_t n = ClusterSize<D>(plan.num_tasks, plan.cluster_size);
  if (n == 0 || n > 16) return InvalidArgument("tree search: cluster size " + std::to_string(n));
  *attr = cudaLaunchAttribute{};
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = n;
  attr->val.clusterDim.y = attr->val.clusterDim.z = 1;
  *cfg = cudaLaunchConfig_t{};
  cfg->gridDim = dim3(plan.num_tasks * n);
  cfg->blockDim = dim3(kThreads);
  cfg->dynamicSmemBytes = sizeof(Smem);
  cfg->stream = s;
  cfg->attrs = attr;
  cfg->numAttrs = 1;
  return Status::OK();
}

template <int D>
Status Launch(const SearchAttendPlan& plan, uint8_t* ws, SearchTaskResult* results,
              cudaStream_t s) {
  constexpr size_t kSmem = sizeof(Smem);
  static_assert(kSmem <= 227 * 1024, "search state must fit one SM's shared memory");
  KVMEM_CUDA_RETURN_IF_ERROR(PrepareSearchKernel<D>());
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute cl{};
  KVMEM_RETURN_IF_ERROR(SearchLaunchConfig<D>(plan, s, &cfg, &cl));
  static const bool trace = [] {
    const char* e = std::getenv("KVMEM_SEARCH_TRACE");
    return e != nullptr && std::string(e) == "1";
  }();
  const bool flat = UseFlat(plan, cl.val.clusterDim.x);
  cudaError_t prepared;
  const auto kernel =
      flat ? (trace ? Prepared<D, true, true>(&prepared) : Prepared<D, false, true>(&prepared))
           : (trace ? Prepared<D, true, false>(&prepared) : Prepared<D, false, false>(&prepared));
  KVMEM_CUDA_RETURN_IF_ERROR(prepared);
  KVMEM_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(
      &cfg, kernel,
      reinterpret_cast<const SearchTaskDesc*>(ws + plan.tasks_off),
      reinterpret_cast<AttendItemDesc*>(ws + plan.items_off),
      reinterpret_cast<AttendRunDesc*>(ws + plan.runs_off),
      reinterpret_cast<SearchRunHeader*>(ws + plan.run_source_off),
      results ? results : reinterpret_cast<SearchTaskResult*>(ws + plan.results_off),
      reinterpret_cast<uint32_t*>(ws + plan.selected_off),
      reinterpret_cast<float*>(ws + plan.scores_off), plan.max_selected,
      reinterpret_cast<float*>(ws + plan.scratch_off), plan.q_dtype, FirstRound(), SliceSlack(),
      Prefetch()));
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("TreeSearchKernel");
  return Status::OK();
}

template <int D>
Status LaunchInline(const SearchAttendPlan& plan, uint8_t* ws, const void* q_host, size_t q_bytes,
                    const void* q_dev, SearchTaskResult* results, cudaStream_t s) {
  KVMEM_CUDA_RETURN_IF_ERROR(PrepareInlineKernel<D>());
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute cl{};
  KVMEM_RETURN_IF_ERROR(SearchLaunchConfig<D>(plan, s, &cfg, &cl));
  static thread_local InlineImage img;  // 28 KB: not on the stack
  img.q_dev = static_cast<const uint8_t*>(q_dev);
  img.image_off = static_cast<uint32_t>((q_bytes + 15) / 16 * 16);
  img.tasks_off = static_cast<uint32_t>(plan.tasks_off);
  img.items_off = static_cast<uint32_t>(plan.items_off);
  std::memcpy(img.data, q_host, q_bytes);
  std::memcpy(img.data + img.image_off, plan.image.data(), plan.image.size());
  KVMEM_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(
      &cfg, TreeSearchInlineKernel<D>, reinterpret_cast<AttendItemDesc*>(ws + plan.items_off),
      reinterpret_cast<AttendRunDesc*>(ws + plan.runs_off),
      reinterpret_cast<SearchRunHeader*>(ws + plan.run_source_off),
      results ? results : reinterpret_cast<SearchTaskResult*>(ws + plan.results_off),
      reinterpret_cast<uint32_t*>(ws + plan.selected_off),
      reinterpret_cast<float*>(ws + plan.scores_off), plan.max_selected,
      reinterpret_cast<float*>(ws + plan.scratch_off), plan.q_dtype, FirstRound(), SliceSlack(),
      Prefetch(), reinterpret_cast<uint32_t*>(ws + plan.counters_off), img));
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("TreeSearchInlineKernel");
  return Status::OK();
}

}  // namespace

Status UploadSearchAttendPlan(const SearchAttendPlan& plan, void* workspace, void* stream) {
  if (workspace == nullptr) return InvalidArgument("upload search plan: null workspace");
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(workspace, plan.image.data(), plan.image.size(),
                                             cudaMemcpyHostToDevice,
                                             static_cast<cudaStream_t>(stream)));
  return Status::OK();
}

namespace {
// The span attention over what the search wrote (the planner's run slots: item i from
// i * kMaxRunsPerItem).
AttendPlan AttendPlanOf(const SearchAttendPlan& plan) {
  AttendPlan ap;
  ap.num_tasks = plan.num_tasks;
  ap.num_items = plan.num_items;
  ap.kv_dtype = plan.kv_dtype;
  ap.q_dtype = plan.q_dtype;
  ap.out_dtype = plan.out_dtype;
  ap.head_dim = plan.head_dim;
  ap.group = plan.group;
  ap.cluster_size = plan.attend_cluster;
  ap.split_tokens = plan.split_tokens;
  ap.run_stride = kMaxRunsPerItem;
  ap.runs_from_search = true;
  ap.run_source_off = plan.run_source_off;
  ap.selected_off = plan.selected_off;
  ap.max_selected = plan.max_selected;
  ap.uniform_splits = plan.uniform_splits;
  ap.items_off = plan.items_off;
  ap.runs_off = plan.runs_off;
  ap.counters_off = plan.counters_off;
  ap.partials_off = plan.partials_off;
  ap.workspace_bytes = plan.workspace_bytes;
  return ap;
}

Status LaunchTreeSearchTo(const SearchAttendPlan& plan, void* workspace, SearchTaskResult* results,
                          void* stream) {
  if (plan.num_tasks == 0) return InvalidArgument("tree search: empty plan");
  if (workspace == nullptr) return InvalidArgument("tree search: null workspace");
  auto* ws = static_cast<uint8_t*>(workspace);
  auto s = static_cast<cudaStream_t>(stream);
  if (plan.head_dim == 128) return Launch<128>(plan, ws, results, s);
  if (plan.head_dim == 64) return Launch<64>(plan, ws, results, s);
  return Unimplemented("tree search: head_dim " + std::to_string(plan.head_dim));
}
}  // namespace

Status LaunchTreeSearch(const SearchAttendPlan& plan, void* workspace, void* stream) {
  return LaunchTreeSearchTo(plan, workspace, nullptr, stream);
}

uint32_t TreeSearchClusterSize(const SearchAttendPlan& plan) {
  if (DeviceCount() == 0 || plan.num_tasks == 0) return 0;
  if (plan.head_dim == 64) return ClusterSize<64>(plan.num_tasks, plan.cluster_size);
  return ClusterSize<128>(plan.num_tasks, plan.cluster_size);
}

bool TreeSearchUsesFlat(const SearchAttendPlan& plan) {
  const uint32_t n = TreeSearchClusterSize(plan);
  return n != 0 && UseFlat(plan, n);
}

Status LaunchSearchAttend(const SearchAttendPlan& plan, void* workspace, void* stream) {
  return LaunchSearchAttendTo(plan, workspace, nullptr, stream);
}

Status LaunchSearchAttendTo(const SearchAttendPlan& plan, void* workspace,
                            SearchTaskResult* results, void* stream) {
  KVMEM_RETURN_IF_ERROR(LaunchTreeSearchTo(plan, workspace, results, stream));
  return LaunchAttendDependent(AttendPlanOf(plan), workspace, stream, true);
}

Status LaunchSearchAttendInline(const SearchAttendPlan& plan, void* workspace, const void* q_host,
                                size_t q_bytes, void* q_dev, SearchTaskResult* results,
                                void* stream, bool* launched) {
  *launched = false;
  if (plan.num_tasks == 0) return InvalidArgument("tree search: empty plan");
  if (workspace == nullptr || q_host == nullptr || q_dev == nullptr) {
    return InvalidArgument("tree search inline: null workspace or q");
  }
  if ((q_bytes + 15) / 16 * 16 + plan.image.size() > kSearchInlineBytes) return Status::OK();
  // Every task's q must lie in [q_dev, q_dev + q_bytes) (one problem's q, as the daemon plans).
  const auto* descs = reinterpret_cast<const SearchTaskDesc*>(plan.image.data() + plan.tasks_off);
  const size_t q_task = size_t{plan.group} * plan.head_dim * DTypeSize(plan.q_dtype);
  for (uint32_t t = 0; t < plan.num_tasks; ++t) {
    const auto* q = static_cast<const uint8_t*>(descs[t].q);
    if (q < static_cast<const uint8_t*>(q_dev) || q + q_task > static_cast<const uint8_t*>(q_dev) + q_bytes ||
        (q - static_cast<const uint8_t*>(q_dev)) % 16 != 0 || q_task % 16 != 0) {
      return Status::OK();
    }
  }
  auto* ws = static_cast<uint8_t*>(workspace);
  auto s = static_cast<cudaStream_t>(stream);
  Status st = plan.head_dim == 128 ? LaunchInline<128>(plan, ws, q_host, q_bytes, q_dev, results, s)
              : plan.head_dim == 64 ? LaunchInline<64>(plan, ws, q_host, q_bytes, q_dev, results, s)
                                    : Unimplemented("tree search: head_dim " + std::to_string(plan.head_dim));
  KVMEM_RETURN_IF_ERROR(st);
  *launched = true;
  return LaunchAttendDependent(AttendPlanOf(plan), workspace, stream, true);
}

// ---- DeviceTree ---------------------------------------------------------------------------

DeviceTree::~DeviceTree() {
  for (Buffer* b : {&node_centroids_, &nodes_, &leaf_chunks_, &chunk_centroids_, &chunk_radius_,
                    &chunk_tokens_, &chunk_start_}) {
    if (b->p) cudaFree(b->p);
  }
}

uint64_t DeviceTree::device_bytes() const {
  uint64_t n = 0;
  for (const Buffer* b : {&node_centroids_, &nodes_, &leaf_chunks_, &chunk_centroids_,
                          &chunk_radius_, &chunk_tokens_, &chunk_start_}) {
    n += b->cap;
  }
  return n;
}

Status DeviceTree::Reserve(Buffer* b, size_t bytes, size_t keep, void* stream) {
  if (bytes <= b->cap) return Status::OK();
  const size_t cap = std::max<size_t>(bytes, b->cap * 3 / 2 + 256);
  void* p = nullptr;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, cap));
  if (keep > 0) {
    KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(p, b->p, keep, cudaMemcpyDeviceToDevice,
                                               static_cast<cudaStream_t>(stream)));
    KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
  }
  if (b->p) KVMEM_CUDA_RETURN_IF_ERROR(cudaFree(b->p));
  b->p = p;
  b->cap = cap;
  return Status::OK();
}

Status DeviceTree::Sync(const FlatTree& host, void* stream, CopyStager* stager) {
  auto s = static_cast<cudaStream_t>(stream);
  const uint32_t D = host.head_dim;
  if (host.num_levels > kTreeSearchMaxLevels + 1) {
    return Unimplemented("device tree: " + std::to_string(host.num_levels) + " node levels");
  }
  if (D % 64 != 0) {  // the interleaved layouts; the search itself takes 64 and 128
    return Unimplemented("device tree: head_dim " + std::to_string(D));
  }
  if (host.chunks_epoch != epoch_) chunks_ = 0;
  if (host.chunks_from != chunks_ && host.chunk_radius.size() + host.chunks_from != chunks_) {
    return InvalidArgument("device tree: export starts at chunk " +
                           std::to_string(host.chunks_from) + " but the mirror holds " +
                           std::to_string(chunks_));
  }
  auto upload = [&](Buffer* b, const void* src, size_t elem, size_t from, size_t count,
                    size_t total) -> Status {
    KVMEM_RETURN_IF_ERROR(Reserve(b, total * elem, from * elem, stream));
    if (count == 0) return Status::OK();
    if (stager != nullptr) {
      KVMEM_RETURN_IF_ERROR(stager->Add(static_cast<uint8_t*>(b->p) + from * elem, src, count * elem));
    } else {
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<uint8_t*>(b->p) + from * elem, src,
                                                 count * elem, cudaMemcpyHostToDevice, s));
    }
    uploaded_ += count * elem;
    return Status::OK();
  };
  // New chunks: [chunks_, num_chunks) from the export's delta.
  const size_t have = chunks_, total = host.num_chunks;
  const size_t skip = have - host.chunks_from;  // delta entries the mirror already holds
  const size_t add = total > have ? total - have : 0;
  // Centroid rows as bfloat16 bits in the search's row layout (detail::InterleaveRowBF16),
  // converted and checked before anything is uploaded (the mirror keeps its state on failure).
  // The staging copies are pageable (each upload has read them when it returns) and live only
  // for this call: a session holds a mirror per (layer, KV head).
  std::string inexact;
  auto interleave = [&](const float* src, size_t rows, const char* what, size_t first) {
    std::vector<uint16_t> out(rows * D);
    for (size_t r = 0; r < rows && inexact.empty(); ++r) {
      if (!::kvmem::kernels::detail::InterleaveRowBF16(src + r * D, D, out.data() + r * D)) {
        inexact = std::string(what) + " " + std::to_string(first + r);
      }
    }
    return out;
  };
  const size_t nodes = host.nodes.size();
  // Node rows as runs {first flat position, end, first row in host.node_centroids}: a partial
  // export's rows (it completes the rows this mirror holds); with a stager and stamps of the
  // same lineage, the flat positions whose stamps moved (an insert rewrites its leaf's path; a
  // leaf split adds a node, which shifts the positions after it in its level); otherwise all.
  struct RowRun {
    uint32_t first, end, src;
  };
  std::vector<RowRun> runs;
  auto add_row = [&runs](uint32_t pos, uint32_t src) {
    if (!runs.empty() && runs.back().end == pos && runs.back().src + (pos - runs.back().first) == src) {
      ++runs.back().end;
    } else {
      runs.push_back({pos, pos + 1, src});
    }
  };
  if (host.node_rows_partial) {
    const std::vector<uint32_t>& at = host.node_rows_at;
    bool fits = host.lineage == lineage_ && host.node_row_stamps.size() == nodes &&
                host.node_centroids.size() == at.size() * D;
    for (size_t k = 0, i = 0; fits && i < nodes; ++i) {
      if (k < at.size() && at[k] == i) {
        add_row(static_cast<uint32_t>(i), static_cast<uint32_t>(k++));
      } else {
        fits = i < row_stamps_.size() && row_stamps_[i] == host.node_row_stamps[i];
      }
    }
    if (!fits) {
      return InvalidArgument("device tree: a partial export made against other node rows than "
                             "the mirror holds (export against rows_held() just before Sync)");
    }
  } else if (stager != nullptr && host.node_row_stamps.size() == nodes &&
             host.lineage == lineage_ && !row_stamps_.empty()) {
    for (uint32_t i = 0; i < nodes; ++i) {
      if (i < row_stamps_.size() && row_stamps_[i] == host.node_row_stamps[i]) continue;
      add_row(i, i);
    }
  } else if (nodes > 0) {
    runs.push_back({0, static_cast<uint32_t>(nodes), 0});
  }
  // The buffer is reserved keeping the rows: a reallocation loses none.
  KVMEM_RETURN_IF_ERROR(Reserve(&node_centroids_, nodes * D * sizeof(uint16_t),
                                std::min(nodes, row_stamps_.size()) * D * sizeof(uint16_t), stream));
  std::vector<std::vector<uint16_t>> node_rows;
  for (const RowRun& r : runs) {
    node_rows.push_back(interleave(host.node_centroids.data() + size_t{r.src} * D, r.end - r.first,
                                   "node", r.first));
  }
  const std::vector<uint16_t> chunk_rows =
      interleave(host.chunk_centroids.data() + skip * D, add, "chunk", have);
  if (!inexact.empty()) {
    return InvalidArgument("device tree: " + inexact +
                           " centroid is not bfloat16 values (index::ClusterTree stores them so)");
  }
  KVMEM_RETURN_IF_ERROR(upload(&chunk_centroids_, chunk_rows.data(), sizeof(uint16_t) * D, have,
                               add, total));
  KVMEM_RETURN_IF_ERROR(upload(&chunk_radius_, host.chunk_radius.data() + skip, sizeof(float),
                               have, add, total));
  KVMEM_RETURN_IF_ERROR(upload(&chunk_tokens_, host.chunk_tokens.data() + skip, sizeof(uint32_t),
                               have, add, total));
  KVMEM_RETURN_IF_ERROR(upload(&chunk_start_, host.chunk_start.data() + skip, sizeof(uint64_t),
                               have, add, total));
  row_stamps_.clear();  // until every row below is up
  for (size_t r = 0; r < runs.size(); ++r) {
    KVMEM_RETURN_IF_ERROR(upload(&node_centroids_, node_rows[r].data(), sizeof(uint16_t) * D,
                                 runs[r].first, runs[r].end - runs[r].first, nodes));
  }
  // Node records and the leaf order: when the export was made from the one this mirror holds
  // (FlatTree::delta_from), only what changed since; otherwise all of them.
  const bool delta = host.delta_from != ~0ull && host.delta_from == version_held_ &&
                     host.lineage == lineage_ && nodes == view_.num_nodes &&
                     host.leaf_chunks_changed_from <= view_.num_chunks;
  version_held_ = ~0ull;  // until everything below is up
  if (delta) {
    for (const auto& [a, b] : host.nodes_changed) {
      KVMEM_RETURN_IF_ERROR(upload(&nodes_, host.nodes.data() + a, sizeof(FlatTreeNode), a, b - a, nodes));
    }
    const size_t from = host.leaf_chunks_changed_from;
    KVMEM_RETURN_IF_ERROR(upload(&leaf_chunks_, host.leaf_chunks.data() + from, sizeof(uint32_t),
                                 from, host.leaf_chunks.size() - from, host.leaf_chunks.size()));
  } else {
    KVMEM_RETURN_IF_ERROR(upload(&nodes_, host.nodes.data(), sizeof(FlatTreeNode), 0, nodes, nodes));
    KVMEM_RETURN_IF_ERROR(upload(&leaf_chunks_, host.leaf_chunks.data(), sizeof(uint32_t), 0,
                                 host.leaf_chunks.size(), host.leaf_chunks.size()));
  }
  chunks_ = static_cast<uint32_t>(total);
  epoch_ = host.chunks_epoch;
  row_stamps_ = host.node_row_stamps;
  lineage_ = host.lineage;
  version_held_ = host.version;
  view_ = FlatTreeView{};
  view_.num_nodes = static_cast<uint32_t>(nodes);
  view_.num_chunks = chunks_;
  view_.num_levels = host.num_levels;
  for (uint32_t l = 0; l <= host.num_levels; ++l) view_.level_begin[l] = host.level_begin[l];
  view_.node_rows_bf16 = static_cast<const uint16_t*>(node_centroids_.p);
  view_.nodes = static_cast<const FlatTreeNode*>(nodes_.p);
  view_.leaf_chunks = static_cast<const uint32_t*>(leaf_chunks_.p);
  view_.chunk_rows_bf16 = static_cast<const uint16_t*>(chunk_centroids_.p);
  view_.chunk_radius = static_cast<const float*>(chunk_radius_.p);
  view_.chunk_tokens = static_cast<const uint32_t*>(chunk_tokens_.p);
  view_.chunk_start = static_cast<const uint64_t*>(chunk_start_.p);
  return Status::OK();
}

}  // namespace kvmem::kernels::cuda
