#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "bench/gpu/bench_kernels.h"

namespace kvmem::bench {
namespace {

__device__ __forceinline__ uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

__global__ void FillKernel(__nv_bfloat16* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = Mix(i * 0x9e3779b97f4a7c15ull + seed);
    // Sum of four uniforms: mean 0, variance 1/3 each → scaled to unit variance.
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) s += static_cast<float>((h >> (16 * j)) & 0xffff) / 65535.f - 0.5f;
    p[i] = __float2bfloat16_rn(s * 1.7320508f * scale);
  }
}

// Approximately standard normal from a 64-bit hash (sum of four uniforms).
__device__ __forceinline__ float HashNormal(uint64_t key) {
  const uint64_t h = Mix(key * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) s += static_cast<float>((h >> (16 * j)) & 0xffff) / 65535.f - 0.5f;
  return s * 1.7320508f;
}

// One block per chunk: K[h][i][d] = 1.5 * topic(session, h, pos / 512)[d] + 0.4 * noise,
// V random; the block of chunk c holds K then V with stride = its tokens.
__global__ void TopicKernel(__nv_bfloat16* pool, const uint64_t* block, const uint32_t* tokens,
                            const uint64_t* start, uint32_t kv_heads, uint32_t head_dim,
                            uint64_t session, uint64_t seed) {
  const uint32_t c = blockIdx.x;
  const uint32_t t = tokens[c];
  const uint64_t n = uint64_t{kv_heads} * t * head_dim;
  __nv_bfloat16* k = pool + block[c];
  for (uint64_t e = threadIdx.x; e < 2 * n; e += blockDim.x) {
    if (e >= n) {
      k[e] = __float2bfloat16_rn(HashNormal(seed ^ (block[c] * 2654435761ull + e)));
      continue;
    }
    const uint32_t d = e % head_dim;
    const uint32_t i = (e / head_dim) % t;
    const uint32_t h = static_cast<uint32_t>(e / (uint64_t{head_dim} * t));
    const uint64_t seg = (start[c] + i) / 512;
    const float topic = HashNormal(((seed * 131 + session) * 1024 + h) * 0x100000001b3ull +
                                   seg * 4096 + d);
    const float noise = HashNormal(seed + 7 + (block[c] + e) * 0x9e37ull);
    k[e] = __float2bfloat16_rn(1.5f * topic + 0.4f * noise);
  }
}

constexpr int D = 128;
constexpr int kRefThreads = 128;
constexpr int kTile = 32;

__device__ double WarpSumD(double x) {
  for (int off = 16; off >= 1; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// grid (q_heads, problems). Pass 1: max logit. Pass 2: tiles of 32 rows: weights in shared
// memory, then each thread (one per dim) accumulates its output element.
__global__ void RefKernel(const RefSegment* segs, const uint32_t* seg_begin, uint32_t q_heads,
                          uint32_t kv_heads, const __nv_bfloat16* q, float scale, double* out) {
  const uint32_t qh = blockIdx.x, p = blockIdx.y;
  const uint32_t G = q_heads / kv_heads;
  const uint32_t task = p * kv_heads + qh / G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  __shared__ double qd[D];
  __shared__ double red[kRefThreads / 32];
  __shared__ double w[kTile];
  qd[tid] =
      static_cast<double>(__bfloat162float(q[(static_cast<size_t>(p) * q_heads + qh) * D + tid]));
  __syncthreads();
  const uint32_t s0 = seg_begin[task], s1 = seg_begin[task + 1];
  auto dot = [&](const __nv_bfloat16* k) {
    double a = 0;
    for (int j = 0; j < D / 32; ++j) {
      const int d = lane + 32 * j;
      a += qd[d] * static_cast<double>(__bfloat162float(k[d]));
    }
    return WarpSumD(a) * scale;
  };
  double m = -INFINITY;
  for (uint32_t s = s0; s < s1; ++s) {
    const RefSegment g = segs[s];
    for (uint32_t t = warp; t < g.len; t += kRefThreads / 32) {
      m = fmax(m, dot(static_cast<const __nv_bfloat16*>(g.k) + static_cast<size_t>(t) * D));
    }
  }
  if (lane == 0) red[warp] = m;
  __syncthreads();
  m = red[0];
  for (int i = 1; i < kRefThreads / 32; ++i) m = fmax(m, red[i]);
  __syncthreads();
  double acc = 0, l = 0;
  for (uint32_t s = s0; s < s1; ++s) {
    const RefSegment g = segs[s];
    for (uint32_t base = 0; base < g.len; base += kTile) {
      for (int i = warp; i < kTile; i += kRefThreads / 32) {
        const uint32_t t = base + i;
        double x = 0;
        if (t < g.len)
          x = exp(dot(static_cast<const __nv_bfloat16*>(g.k) + static_cast<size_t>(t) * D) - m);
        if (lane == 0) w[i] = x;
      }
      __syncthreads();
      for (int i = 0; i < kTile && base + i < g.len; ++i) {
        const double wi = w[i];
        l += wi;
        acc += wi * static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(
                        g.v)[static_cast<size_t>(base + i) * D + tid]));
      }
      __syncthreads();
    }
  }
  out[(static_cast<size_t>(p) * q_heads + qh) * D + tid] = l > 0 ? acc / l : 0.0;
}

__global__ void RelErrKernel(const __nv_bfloat16* got, const double* ref, uint32_t rows,
                             double* err) {
  const uint32_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  double e2 = 0, r2 = 0;
  for (int d = lane; d < D; d += 32) {
    const double x = __bfloat162float(got[static_cast<size_t>(r) * D + d]);
    const double y = ref[static_cast<size_t>(r) * D + d];
    e2 += (x - y) * (x - y) + (isnan(x) ? 1e30 : 0.0);
    r2 += y * y;
  }
  e2 = WarpSumD(e2);
  r2 = WarpSumD(r2);
  if (lane == 0) err[r] = r2 > 0 ? sqrt(e2 / r2) : sqrt(e2);
}

}  // namespace

void FillTopicKV(void* pool, const uint64_t* block, const uint32_t* tokens, const uint64_t* start,
                 uint32_t num_chunks, uint32_t kv_heads, uint32_t head_dim, uint64_t session,
                 uint64_t seed) {
  if (num_chunks == 0) return;
  TopicKernel<<<num_chunks, 256>>>(static_cast<__nv_bfloat16*>(pool), block, tokens, start,
                                   kv_heads, head_dim, session, seed);
}

void FillRandomBF16(void* dst, size_t n, uint64_t seed, float scale) {
  FillKernel<<<4096, 256>>>(static_cast<__nv_bfloat16*>(dst), n, seed, scale);
}

void ReferenceAttend(const RefSegment* segs, const uint32_t* seg_begin, uint32_t problems,
                     uint32_t q_heads, uint32_t kv_heads, const void* q, float scale, double* out) {
  RefKernel<<<dim3(q_heads, problems), kRefThreads>>>(
      segs, seg_begin, q_heads, kv_heads, static_cast<const __nv_bfloat16*>(q), scale, out);
  cudaDeviceSynchronize();
}

double MaxRelErrBF16(const void* got, const double* ref, uint32_t rows) {
  double* err = nullptr;
  cudaMalloc(&err, rows * sizeof(double));
  RelErrKernel<<<(rows + 7) / 8, 256>>>(static_cast<const __nv_bfloat16*>(got), ref, rows, err);
  std::vector<double> h(rows);
  cudaMemcpy(h.data(), err, rows * sizeof(double), cudaMemcpyDeviceToHost);
  cudaFree(err);
  double m = 0;
  for (double x : h) m = std::isnan(x) ? 1e30 : std::max(m, x);
  return m;
}

}  // namespace kvmem::bench
