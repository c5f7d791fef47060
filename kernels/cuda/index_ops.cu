// CUDA versions of kernels/index_ops.h. These run on summaries and short chunks, so they favour
// simple, exact code: one warp per output item with lanes across head_dim (head_dim <= 256), and
// one block per row for top-k.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda_ops.h"

namespace kvmem::kernels::cuda {
namespace {

constexpr int kMaxDimPerLane = 8;  // head_dim <= 256
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float LoadKeyElem(const void* pool, DType t, uint64_t e) {
  return LoadElem(pool, t, e);
}

__device__ __forceinline__ uint64_t KeyRow(const KVSpan& s, uint32_t head, uint32_t tok,
                                           uint32_t D) {
  return s.offset + (static_cast<uint64_t>(head) * s.stride_tokens + tok) * D;
}

__device__ __forceinline__ int GlobalWarp() {
  return static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
}

__global__ void ChunkSummaryKernel(ChunkSummaryView v) {
  const int w = GlobalWarp();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int>(v.num_chunks * v.kv_heads)) return;
  const uint32_t ci = w / v.kv_heads, h = w % v.kv_heads;
  const KVSpan s = v.chunks[ci];
  const uint32_t D = v.head_dim;
  float c[kMaxDimPerLane];
#pragma unroll
  for (int j = 0; j < kMaxDimPerLane; ++j) c[j] = 0.f;
  float norm2 = 0.f;
  for (uint32_t t = s.begin; t < s.end; ++t) {
    const uint64_t row = KeyRow(s, h, t, D);
    float nn = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxDimPerLane; ++j) {
      const uint32_t d = lane + 32 * j;
      if (d < D) {
        const float x = LoadKeyElem(v.pool, v.kv_dtype, row + d);
        c[j] += x;
        nn = fmaf(x, x, nn);
      }
    }
    norm2 = fmaxf(norm2, WarpSum(nn));
  }
  const uint32_t n = s.end - s.begin;
  const float inv = n ? 1.f / static_cast<float>(n) : 0.f;
  float* cen = v.centroids + static_cast<size_t>(w) * D;
#pragma unroll
  for (int j = 0; j < kMaxDimPerLane; ++j) {
    const uint32_t d = lane + 32 * j;
    c[j] *= inv;
    if (d < D) cen[d] = c[j];
  }
  float r2 = 0.f;
  for (uint32_t t = s.begin; t < s.end; ++t) {
    const uint64_t row = KeyRow(s, h, t, D);
    float dd = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxDimPerLane; ++j) {
      const uint32_t d = lane + 32 * j;
      if (d < D) {
        const float x = LoadKeyElem(v.pool, v.kv_dtype, row + d) - c[j];
        dd = fmaf(x, x, dd);
      }
    }
    r2 = fmaxf(r2, WarpSum(dd));
  }
  if (lane == 0) {
    v.radii[w] = sqrtf(r2) * (1.f + kSummaryRoundUp);
    if (v.max_key_norms) v.max_key_norms[w] = sqrtf(norm2) * (1.f + kSummaryRoundUp);
  }
}

__global__ void NodeBoundsKernel(NodeBoundsView v) {
  const int w = GlobalWarp();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int>(v.num_pairs)) return;
  const uint32_t D = v.head_dim;
  const uint32_t node = v.pair_node[w];
  const float* c = v.centroids + static_cast<size_t>(node) * D;
  const float r = v.radii[node];
  float cl[kMaxDimPerLane];
#pragma unroll
  for (int j = 0; j < kMaxDimPerLane; ++j) {
    const uint32_t d = lane + 32 * j;
    cl[j] = d < D ? c[d] : 0.f;
  }
  float best = -INFINITY;
  for (uint32_t g = 0; g < v.group_size; ++g) {
    const float* q = v.queries + (static_cast<size_t>(v.pair_group[w]) * v.group_size + g) * D;
    float dot = 0.f, qq = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxDimPerLane; ++j) {
      const uint32_t d = lane + 32 * j;
      if (d < D) {
        const float x = q[d];
        dot = fmaf(x, cl[j], dot);
        qq = fmaf(x, x, qq);
      }
    }
    dot = WarpSum(dot);
    qq = WarpSum(qq);
    best = fmaxf(best, dot + sqrtf(qq) * r);
  }
  if (lane == 0) v.bounds[w] = best;
}

__global__ void ChunkMaxScoresKernel(ChunkMaxScoresView v) {
  const int w = GlobalWarp();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int>(v.num_items)) return;
  const uint32_t D = v.head_dim;
  const KVSpan s = v.chunks[w];
  const uint32_t h = v.item_head[w];
  const float* qg = v.queries + static_cast<size_t>(v.item_group[w]) * v.group_size * D;
  float best = -INFINITY;
  for (uint32_t t = s.begin; t < s.end; ++t) {
    const uint64_t row = KeyRow(s, h, t, D);
    float k[kMaxDimPerLane];
#pragma unroll
    for (int j = 0; j < kMaxDimPerLane; ++j) {
      const uint32_t d = lane + 32 * j;
      k[j] = d < D ? LoadKeyElem(v.pool, v.kv_dtype, row + d) : 0.f;
    }
    for (uint32_t g = 0; g < v.group_size; ++g) {
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < kMaxDimPerLane; ++j) {
        const uint32_t d = lane + 32 * j;
        if (d < D) dot = fmaf(qg[g * D + d], k[j], dot);
      }
      best = fmaxf(best, WarpSum(dot));
    }
  }
  if (lane == 0) v.scores[w] = best;
}

// One warp per token of the items: the item found by binary search over token_prefix, the key
// row held across the lanes, one dot product per query head of the group.
__global__ void TokenLogitsKernel(TokenLogitsView v) {
  const int w = GlobalWarp();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int>(v.total_tokens)) return;
  const uint32_t tok = static_cast<uint32_t>(w);
  uint32_t lo = 0, hi = v.num_items;  // the item i with token_prefix[i] <= tok < token_prefix[i + 1]
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (v.token_prefix[mid] <= tok) lo = mid; else hi = mid;
  }
  const KVSpan s = v.spans[lo];
  const uint32_t D = v.head_dim, G = v.q_heads / v.kv_heads, h = v.item_head[lo];
  const uint64_t row = KeyRow(s, h, s.begin + (tok - v.token_prefix[lo]), D);
  float k[kMaxDimPerLane];
#pragma unroll
  for (int j = 0; j < kMaxDimPerLane; ++j) {
    const uint32_t d = lane + 32 * j;
    k[j] = d < D ? LoadKeyElem(v.pool, v.kv_dtype, row + d) : 0.f;
  }
  const float* qg = v.q + static_cast<size_t>(h) * G * D;
  float* out = v.logits + static_cast<size_t>(tok) * G;
  for (uint32_t g = 0; g < G; ++g) {
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxDimPerLane; ++j) {
      const uint32_t d = lane + 32 * j;
      if (d < D) dot = fmaf(qg[g * D + d], k[j], dot);
    }
    dot = WarpSum(dot);
    if (lane == 0) out[g] = dot * v.scale;
  }
}

// ---- Top-k: exact radix select on a 64-bit rank key, then a bitonic sort of the k winners.
// rank = (~ordered(score) << 32) | index: smaller rank = better (higher score, then lower
// index; NaN ordered below every number). Ranks are unique, so exactly k are <= the k-th.
constexpr int kTopKThreads = 256;

__device__ __forceinline__ uint64_t RankKey(float s, uint32_t i) {
  uint32_t u = s == 0.f ? 0u : __float_as_uint(s);  // -0 ties with +0, as on the CPU
  uint32_t ord;
  if (isnan(s)) {
    ord = 0u;
  } else {
    ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(~ord) << 32) | i;
}

__global__ void __launch_bounds__(kTopKThreads) TopKKernel(TopKView v) {
  __shared__ uint32_t hist[256];
  __shared__ uint64_t sel[kTopKMax];
  __shared__ uint64_t s_prefix;
  __shared__ uint32_t s_need;
  __shared__ uint32_t s_count;
  const float* scores = v.scores + static_cast<size_t>(blockIdx.x) * v.n;
  const int tid = threadIdx.x;
  uint64_t prefix = 0, mask = 0;
  uint32_t need = v.k;  // rank of the threshold among the still-matching candidates (1-based)
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kTopKThreads) hist[b] = 0;
    __syncthreads();
    for (uint32_t i = tid; i < v.n; i += kTopKThreads) {
      const uint64_t r = RankKey(scores[i], i);
      if ((r & mask) == prefix) atomicAdd(&hist[(r >> shift) & 0xff], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      uint32_t local[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        local[j] = hist[tid * 8 + j];
        sum += local[j];
      }
      uint32_t incl = sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t o = __shfl_up_sync(0xffffffffu, incl, off);
        if (tid >= off) incl += o;
      }
      const uint32_t excl = incl - sum;
      if (excl < need && need <= incl) {  // exactly one lane
        uint32_t c = excl;
        int digit = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (c + local[j] >= need) {
            digit = tid * 8 + j;
            break;
          }
          c += local[j];
        }
        s_need = need - c;
        s_prefix = prefix | (static_cast<uint64_t>(digit) << shift);
      }
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= 0xffull << shift;
    __syncthreads();
  }
  const uint64_t threshold = prefix;  // the k-th smallest rank
  if (tid == 0) s_count = 0;
  __syncthreads();
  for (uint32_t i = tid; i < v.n; i += kTopKThreads) {
    const uint64_t r = RankKey(scores[i], i);
    if (r <= threshold) sel[atomicAdd(&s_count, 1u)] = r;
  }
  uint32_t pow2 = 1;
  while (pow2 < v.k) pow2 <<= 1;
  __syncthreads();
  for (uint32_t i = v.k + tid; i < pow2; i += kTopKThreads) sel[i] = ~0ull;
  __syncthreads();
  for (uint32_t size = 2; size <= pow2; size <<= 1) {
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (uint32_t i = tid; i < pow2; i += kTopKThreads) {
        const uint32_t j = i ^ stride;
        if (j > i) {
          const bool up = (i & size) == 0;
          const uint64_t a = sel[i], b = sel[j];
          if ((a > b) == up) {
            sel[i] = b;
            sel[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (uint32_t i = tid; i < v.k; i += kTopKThreads) {
    const uint32_t idx = static_cast<uint32_t>(sel[i] & 0xffffffffu);
    v.indices[static_cast<size_t>(blockIdx.x) * v.k + i] = idx;
    if (v.values) v.values[static_cast<size_t>(blockIdx.x) * v.k + i] = scores[idx];
  }
}

__global__ void PooledBlockScoresKernel(PooledBlockScoresView v, uint32_t num_blocks) {
  const int w = GlobalWarp();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int>(v.num_heads * num_blocks)) return;
  const uint32_t hi = w / num_blocks, blk = w % num_blocks;
  const uint32_t h = v.heads[hi];
  const uint32_t D = v.head_dim;
  const uint32_t G = v.q_heads / v.kv_heads;
  float qbar[kMaxDimPerLane];
#pragma unroll
  for (int j = 0; j < kMaxDimPerLane; ++j) {
    const uint32_t d = lane + 32 * j;
    float a = 0.f;
    if (d < D) {
      for (uint32_t g = 0; g < G; ++g) a += v.q[static_cast<size_t>(h * G + g) * D + d];
    }
    qbar[j] = a / static_cast<float>(G);
  }
  const uint32_t total = v.total_tokens;
  const uint32_t a = blk * v.block_tokens;
  const uint32_t b = min(total, a + v.block_tokens);
  // First span holding token a: last si with span_prefix[si] <= a.
  uint32_t lo = 0, hi2 = v.num_spans;
  while (hi2 - lo > 1) {
    const uint32_t mid = (lo + hi2) / 2;
    if (v.span_prefix[mid] <= a)
      lo = mid;
    else
      hi2 = mid;
  }
  float acc = v.mode == BlockPool::kMax ? -INFINITY : 0.f;
  uint32_t si = lo;
  for (uint32_t pos = a; pos < b; ++pos) {
    while (pos >= v.span_prefix[si + 1]) ++si;
    const KVSpan s = v.spans[si];
    const uint32_t t = s.begin + (pos - v.span_prefix[si]);
    const uint64_t row = KeyRow(s, h, t, D);
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxDimPerLane; ++j) {
      const uint32_t d = lane + 32 * j;
      if (d < D) dot = fmaf(qbar[j], LoadKeyElem(v.pool, v.kv_dtype, row + d), dot);
    }
    dot = WarpSum(dot);
    acc = v.mode == BlockPool::kMax ? fmaxf(acc, dot) : acc + dot;
  }
  if (v.mode == BlockPool::kMean) acc /= static_cast<float>(b - a);
  if (lane == 0) v.scores[static_cast<size_t>(hi) * num_blocks + blk] = acc;
}

// The same scores for 16-bit keys with head_dim = 16 * LPT: LPT lanes share a token (16
// elements each, two 16-byte loads), a warp covers 32 / LPT tokens per step and keeps kSteps
// steps of loads in flight before it reduces, so a block's 64 keys take a few round trips to
// memory instead of 64 dependent ones. Rows must be 16-byte aligned (span offsets multiples
// of 8 elements, as the attention kernel requires).
template <typename KV, int LPT>
__global__ void PooledBlockScoresVecKernel(PooledBlockScoresView v, uint32_t num_blocks) {
  constexpr int kTokensPerStep = 32 / LPT;
  constexpr int kSteps = 4;
  constexpr uint32_t D = 16 * LPT;
  const int w = GlobalWarp();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int>(v.num_heads * num_blocks)) return;
  const uint32_t hi = w / num_blocks, blk = w % num_blocks;
  const uint32_t h = v.heads[hi];
  const uint32_t G = v.q_heads / v.kv_heads;
  const int slot = lane / LPT, part = lane % LPT;
  float qbar[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const uint32_t d = part * 16 + j;
    float a = 0.f;
    for (uint32_t g = 0; g < G; ++g) a += v.q[static_cast<size_t>(h * G + g) * D + d];
    qbar[j] = a / static_cast<float>(G);
  }
  const uint32_t a = blk * v.block_tokens;
  const uint32_t b = min(v.total_tokens, a + v.block_tokens);
  uint32_t lo = 0, hi2 = v.num_spans;
  while (hi2 - lo > 1) {
    const uint32_t mid = (lo + hi2) / 2;
    if (v.span_prefix[mid] <= a)
      lo = mid;
    else
      hi2 = mid;
  }
  uint32_t si = lo;
  const bool is_max = v.mode == BlockPool::kMax;
  float acc = is_max ? -INFINITY : 0.f;
  const KV* pool = static_cast<const KV*>(v.pool);
  for (uint32_t base = a; base < b; base += kTokensPerStep * kSteps) {
    uint4 r[kSteps][2];
    bool valid[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const uint32_t pos = base + u * kTokensPerStep + slot;
      valid[u] = pos < b;
      r[u][0] = r[u][1] = make_uint4(0, 0, 0, 0);
      if (valid[u]) {
        while (pos >= v.span_prefix[si + 1]) ++si;
        const KVSpan s = v.spans[si];
        const uint64_t row = KeyRow(s, h, s.begin + (pos - v.span_prefix[si]), D) + part * 16;
        const uint4* p = reinterpret_cast<const uint4*>(pool + row);
        r[u][0] = p[0];
        r[u][1] = p[1];
      }
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      float f[16];
      Unpack8<KV>(r[u][0], f);
      Unpack8<KV>(r[u][1], f + 8);
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j) dot = fmaf(qbar[j], f[j], dot);
#pragma unroll
      for (int off = LPT / 2; off >= 1; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (valid[u]) acc = is_max ? fmaxf(acc, dot) : acc + dot;
    }
  }
  // Tokens were spread over the warp's slots: combine them.
#pragma unroll
  for (int off = LPT; off < 32; off <<= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, acc, off);
    acc = is_max ? fmaxf(acc, o) : acc + o;
  }
  if (!is_max) acc /= static_cast<float>(b - a);
  if (lane == 0) v.scores[static_cast<size_t>(hi) * num_blocks + blk] = acc;
}

template <typename KV>
void LaunchPooledVec(const PooledBlockScoresView& v, uint32_t nb, unsigned grid, cudaStream_t st) {
  const unsigned threads = 32 * kWarpsPerBlock;
  switch (v.head_dim) {
    case 64:
      PooledBlockScoresVecKernel<KV, 4><<<grid, threads, 0, st>>>(v, nb);
      break;
    case 128:
      PooledBlockScoresVecKernel<KV, 8><<<grid, threads, 0, st>>>(v, nb);
      break;
    default:
      PooledBlockScoresVecKernel<KV, 16><<<grid, threads, 0, st>>>(v, nb);
      break;
  }
}

Status CheckDim(uint32_t D) {
  if (D == 0 || D > 32 * kMaxDimPerLane) return Unimplemented("index op on CUDA: head_dim > 256");
  return Status::OK();
}

unsigned WarpBlocks(uint64_t warps) {
  return static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

Status ChunkSummary(const ChunkSummaryView& v, void* stream) {
  if (Status st = CheckDim(v.head_dim); !st.ok()) return st;
  const uint64_t warps = static_cast<uint64_t>(v.num_chunks) * v.kv_heads;
  if (warps == 0) return Status::OK();
  ChunkSummaryKernel<<<WarpBlocks(warps), 32 * kWarpsPerBlock, 0,
                       static_cast<cudaStream_t>(stream)>>>(v);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkSummaryKernel");
  return Status::OK();
}

Status NodeBounds(const NodeBoundsView& v, void* stream) {
  if (Status st = CheckDim(v.head_dim); !st.ok()) return st;
  if (v.num_pairs == 0) return Status::OK();
  NodeBoundsKernel<<<WarpBlocks(v.num_pairs), 32 * kWarpsPerBlock, 0,
                     static_cast<cudaStream_t>(stream)>>>(v);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("NodeBoundsKernel");
  return Status::OK();
}

Status ChunkMaxScores(const ChunkMaxScoresView& v, void* stream) {
  if (Status st = CheckDim(v.head_dim); !st.ok()) return st;
  if (v.num_items == 0) return Status::OK();
  ChunkMaxScoresKernel<<<WarpBlocks(v.num_items), 32 * kWarpsPerBlock, 0,
                         static_cast<cudaStream_t>(stream)>>>(v);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("ChunkMaxScoresKernel");
  return Status::OK();
}

Status TokenLogits(const TokenLogitsView& v, void* stream) {
  if (Status st = CheckDim(v.head_dim); !st.ok()) return st;
  if (v.kv_heads == 0 || v.q_heads % v.kv_heads != 0) return InvalidArgument("token logits: bad heads");
  if (v.total_tokens == 0 || v.num_items == 0) return Status::OK();
  TokenLogitsKernel<<<WarpBlocks(v.total_tokens), 32 * kWarpsPerBlock, 0,
                      static_cast<cudaStream_t>(stream)>>>(v);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("TokenLogitsKernel");
  return Status::OK();
}

Status TopK(const TopKView& v, void* stream) {
  if (Status st = ValidateTopKView(v); !st.ok()) return st;
  if (v.num_rows == 0) return Status::OK();
  TopKKernel<<<v.num_rows, kTopKThreads, 0, static_cast<cudaStream_t>(stream)>>>(v);
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("TopKKernel");
  return Status::OK();
}

Status PooledBlockScores(const PooledBlockScoresView& v, void* stream) {
  if (Status st = CheckDim(v.head_dim); !st.ok()) return st;
  if (v.block_tokens == 0 || v.kv_heads == 0 || v.q_heads % v.kv_heads != 0) {
    return InvalidArgument("pooled block scores: bad block_tokens or heads");
  }
  const uint32_t nb = PooledNumBlocks(v.total_tokens, v.block_tokens);
  const uint64_t warps = static_cast<uint64_t>(v.num_heads) * nb;
  if (warps == 0) return Status::OK();
  const bool vec = (v.head_dim == 64 || v.head_dim == 128 || v.head_dim == 256) &&
                   v.kv_dtype != DType::kF32 && reinterpret_cast<uintptr_t>(v.pool) % 16 == 0;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (vec && v.kv_dtype == DType::kBF16) {
    LaunchPooledVec<__nv_bfloat16>(v, nb, WarpBlocks(warps), st);
  } else if (vec) {
    LaunchPooledVec<__half>(v, nb, WarpBlocks(warps), st);
  } else {
    PooledBlockScoresKernel<<<WarpBlocks(warps), 32 * kWarpsPerBlock, 0, st>>>(v, nb);
  }
  KVMEM_CUDA_RETURN_IF_LAUNCH_FAILED("PooledBlockScoresKernel");
  return Status::OK();
}

}  // namespace kvmem::kernels::cuda
