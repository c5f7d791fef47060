// kvmem-bench-step-cost: what the primitives of the cluster search cost on this GPU, in the
// search's own launch shape at batch 1 (8 clusters of 9 blocks, 512 threads, ~200 KB of shared
// memory per block). The search at 128K batch 1 is ~60K cycles of rank 0's steps
// (KVMEM_SEARCH_TRACE=1); these numbers say what a step of each kind costs at the least, so a
// design can be costed before it is written (docs/architecture.md, "The search's floor").
//
// Each case runs its primitive R times in a loop on every block; rank 0's thread 0 of every
// cluster stamps clock64 around the loop (after a warm-up pass), and the case reports the median
// over clusters and launches of cycles per repetition. The launch cases time back-to-back
// launches of an empty kernel in a CUDA graph (µs per launch).
//
//   kvmem-bench-step-cost --json FILE [--launches N]
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kCluster = 9;
constexpr int kClusters = 8;
constexpr int kBins = 1024;
constexpr size_t kSmemBytes = 200 * 1024;

#define CHECK(x)                                                                      \
  do {                                                                                \
    cudaError_t e_ = (x);                                                             \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

enum Op : int {
  kSync,          // __syncthreads
  kSmemPhase,     // a dependent shared-memory read, a write, __syncthreads
  kClusterSync,   // cluster.sync (barrier.cluster.arrive + wait)
  kDsmemChase,    // thread 0: a dependent load from rank 1's shared memory
  kL2Chase,       // thread 0: a dependent global load that hits L2
  kDramChase,     // thread 0: a dependent global load that misses L2
  kAtomicSame,    // every thread: atomicAdd on one shared word, then __syncthreads
  kAtomicWarp,    // lane 0 of each warp: atomicAdd on one shared word + broadcast, __syncthreads
  kBlockScan,     // a block-wide exclusive prefix sum of 512 values (two barriers)
  kHistCut,       // 552 keys into a token-weighted 1024-bin histogram, then the top-bins cut
  kRemoteAtomic,  // every thread: atomicAdd into rank 0's shared memory, then cluster.sync
  kSmemChase,     // thread 0: a dependent load from its own shared memory
  kWarpScan,      // a 32-lane inclusive scan by shuffles (5 dependent steps)
  kRows64,        // the search's row pass (ScoreRows: 64 groups of 8 lanes, 4 rows each in
  kRows230,       // flight) over n random bfloat16 rows of 128 (mostly DRAM misses), against
  kRows577,       // a mean query in shared memory, then __syncthreads; n = 64, 230, 577
  kGlobalTimer,   // every thread: a read of %globaltimer (the search's phase timers)
  kClock64,       // every thread: a read of clock64
  kOps
};
const char* const kOpNames[kOps] = {"syncthreads",  "smem_phase",    "cluster_sync", "dsmem_load",
                                    "l2_load",      "dram_load",     "smem_atomic_same_word",
                                    "smem_atomic_per_warp",          "block_scan",   "hist_cut_552",
                                    "remote_atomic_cluster_sync",    "smem_load",
                                    "warp_scan",     "row_pass_64",  "row_pass_230",
                                    "row_pass_577",  "globaltimer_read", "clock64_read"};
const int kReps[kOps] = {1000, 400, 200, 1000, 1000, 200, 100, 200, 200, 50, 50, 1000, 1000, 20, 20, 20, 200, 1000};
constexpr size_t kRowCount = 1024 * 1024;  // bfloat16 rows of 128: 256 MB, far beyond L2

struct Args {
  const uint32_t* l2_chain;    // a pointer chase within 256 KB
  const uint32_t* dram_chain;  // a pointer chase over 1 GiB
  size_t dram_n;               // words of dram_chain
  const uint4* rows;           // kRowCount rows of 128 bfloat16 (16 uint4 each)
  long long* out;              // [launch][cluster]: cycles for the loop
  uint32_t* sink;
  int launch;
};

__device__ __forceinline__ uint32_t WarpScanIncl(uint32_t x, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  return x;
}

template <int kOp>
__device__ __noinline__ uint32_t Body(uint32_t* sm, uint32_t* s0, const Args& a, int reps,
                                      uint32_t seed) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  cg::cluster_group cluster = cg::this_cluster();
  uint32_t acc = seed;
  if constexpr (kOp == kSync) {
    for (int r = 0; r < reps; ++r) __syncthreads();
  } else if constexpr (kOp == kSmemPhase) {
    for (int r = 0; r < reps; ++r) {
      const uint32_t v = sm[(tid * 7 + acc) & (kThreads - 1)];
      __syncthreads();
      sm[tid] = v + 1;
      acc += v;
      __syncthreads();
    }
  } else if constexpr (kOp == kClusterSync) {
    for (int r = 0; r < reps; ++r) cluster.sync();
  } else if constexpr (kOp == kDsmemChase) {
    // rank 1's first 4096 words are a chain (written before the cluster barrier in the caller).
    if (cluster.block_rank() == 0 && tid == 0) {
      uint32_t* s1 = cluster.map_shared_rank(sm, 1);
      uint32_t p = acc & 4095;
      for (int r = 0; r < reps; ++r) p = s1[p];
      acc = p;
    }
  } else if constexpr (kOp == kL2Chase || kOp == kDramChase) {
    if (tid == 0) {
      // A start of its own per launch and cluster, so no load finds a line another brought in.
      const uint32_t* c = kOp == kL2Chase ? a.l2_chain : a.dram_chain;
      const uint32_t start = (static_cast<uint32_t>(a.launch) * kClusters + blockIdx.x / kCluster) * 2654435761u + acc;
      uint32_t p = kOp == kL2Chase ? start & 1023 : static_cast<uint32_t>(start % a.dram_n);
      for (int r = 0; r < reps; ++r) p = __ldcg(c + p);
      acc = p;
    }
  } else if constexpr (kOp == kAtomicSame) {
    for (int r = 0; r < reps; ++r) {
      acc += atomicAdd(&sm[8], 1u);
      __syncthreads();
    }
  } else if constexpr (kOp == kAtomicWarp) {
    for (int r = 0; r < reps; ++r) {
      uint32_t base = 0;
      if (lane == 0) base = atomicAdd(&sm[8], 32u);
      acc += __shfl_sync(0xffffffffu, base, 0) + lane;
      __syncthreads();
    }
  } else if constexpr (kOp == kBlockScan) {
    for (int r = 0; r < reps; ++r) {
      const uint32_t x = (tid ^ acc) & 15;
      const uint32_t incl = WarpScanIncl(x, lane);
      if (lane == 31) sm[64 + warp] = incl;
      __syncthreads();
      uint32_t before = 0;
      for (int w = 0; w < kWarps; ++w) before += w < warp ? sm[64 + w] : 0;
      __syncthreads();
      acc += before + incl - x;
    }
  } else if constexpr (kOp == kHistCut) {
    uint32_t* hist = sm + 1024;  // kBins words
    uint32_t* wsum = sm + 2048;  // kWarps words
    for (int r = 0; r < reps; ++r) {
      for (int b = tid; b < kBins; b += kThreads) hist[b] = 0;
      if (tid == 0) sm[9] = kBins;
      __syncthreads();
      for (int i = tid; i < 552; i += kThreads) {
        const uint32_t h = (static_cast<uint32_t>(i) * 2654435761u + acc) >> 22;  // 0..1023
        atomicAdd(&hist[h], 16u + (i & 15));
      }
      __syncthreads();
      // Bins from the top: thread t holds bins 1023 - 2t and 1022 - 2t; the first bin where the
      // running sum from the top passes the target.
      const uint32_t b0 = kBins - 1 - 2 * tid, v0 = hist[b0], v1 = hist[b0 - 1];
      const uint32_t mine = v0 + v1, incl = WarpScanIncl(mine, lane);
      if (lane == 31) wsum[warp] = incl;
      __syncthreads();
      uint32_t before = 0;
      for (int w = 0; w < kWarps; ++w) before += w < warp ? wsum[w] : 0;
      const uint32_t pre = before + incl - mine, target = 2048 * 16;
      if (pre < target && pre + mine >= target) atomicMin(&sm[9], pre + v0 >= target ? b0 : b0 - 1);
      __syncthreads();
      acc += sm[9];
    }
  } else if constexpr (kOp == kRemoteAtomic) {
    for (int r = 0; r < reps; ++r) {
      atomicAdd(&s0[1024 + ((tid * 37 + acc) & 1023)], 1u);
      cluster.sync();
      acc += s0[1024 + (tid & 1023)];
    }
  } else if constexpr (kOp == kSmemChase) {
    if (tid == 0) {
      volatile uint32_t* v = sm;
      uint32_t p = acc & 4095;
      for (int r = 0; r < reps; ++r) p = v[p];
      acc = p;
    }
  } else if constexpr (kOp == kGlobalTimer) {
    for (int r = 0; r < reps; ++r) {
      uint64_t t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      acc += static_cast<uint32_t>(t);
    }
  } else if constexpr (kOp == kClock64) {
    for (int r = 0; r < reps; ++r) acc += static_cast<uint32_t>(clock64());
  } else if constexpr (kOp == kWarpScan) {
    for (int r = 0; r < reps; ++r) acc = WarpScanIncl(acc, lane) & 0xffffu;
  } else if constexpr (kOp == kRows64 || kOp == kRows230 || kOp == kRows577) {
    constexpr uint32_t n = kOp == kRows64 ? 64 : kOp == kRows230 ? 230 : 577;
    const float* mean = reinterpret_cast<const float*>(sm) + 3072;  // 128 floats
    float* out = reinterpret_cast<float*>(sm) + 3328;
    const int j = lane & 7, group = warp * 4 + (lane >> 3);
    const uint32_t salt = (static_cast<uint32_t>(a.launch) * 977u + blockIdx.x) * 2654435761u;
    for (int r = 0; r < reps; ++r) {
      for (uint32_t base = 0; base < n; base += 256) {
        uint4 v[4][2];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const uint32_t i = base + u * 64 + group;
          const size_t row = ((i < n ? i : 0) * 40503u + salt + r * 7919u + acc * 0u) % kRowCount;
          v[u][0] = a.rows[row * 16 + j];
          v[u][1] = a.rows[row * 16 + 8 + j];
        }
        float s4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float m = mean[64 * h + 8 * e + j];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const uint32_t w = reinterpret_cast<const uint32_t*>(&v[u][h])[e / 2];
              const float x = __uint_as_float(e % 2 ? (w & 0xffff0000u) : (w << 16));
              s4[u] = __fadd_rn(s4[u], __fmul_rn(m, x));
            }
          }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          s4[u] = __fadd_rn(s4[u], __shfl_down_sync(0xffffffffu, s4[u], 4));
          s4[u] = __fadd_rn(s4[u], __shfl_down_sync(0xffffffffu, s4[u], 1));
          s4[u] = __fadd_rn(s4[u], __shfl_down_sync(0xffffffffu, s4[u], 2));
          const uint32_t i = base + u * 64 + group;
          if (j == 0 && i < n) out[i] = s4[u];
        }
      }
      __syncthreads();
      acc += __float_as_uint(out[tid & 255]) & 1u;
    }
  }
  return acc;
}

template <int kOp>
__global__ void __launch_bounds__(kThreads, 1) StepKernel(Args a, int reps) {
  extern __shared__ uint32_t sm[];
  cg::cluster_group cluster = cg::this_cluster();
  const int tid = threadIdx.x;
  for (int i = tid; i < 4096; i += kThreads) sm[i] = (i * 2654435761u >> 7) & 4095;
  uint32_t* s0 = cluster.map_shared_rank(sm, 0);
  cluster.sync();
  uint32_t acc = Body<kOp>(sm, s0, a, reps / 4 + 1, tid);  // warm-up
  cluster.sync();
  const long long t0 = clock64();
  acc += Body<kOp>(sm, s0, a, reps, acc);
  const long long t1 = clock64();
  cluster.sync();  // no rank leaves while another may still read its shared memory
  if (cluster.block_rank() == 0 && tid == 0) {
    a.out[static_cast<size_t>(a.launch) * kClusters + blockIdx.x / kCluster] = t1 - t0;
  }
  if (acc == 0xdeadbeefu) a.sink[0] = acc;  // keeps the loops
}

__global__ void EmptyKernel(uint32_t* sink) {
  if (sink != nullptr && threadIdx.x == 1023) sink[0] = 1;
}

// Cycles of a long loop against %globaltimer: the SM clock during the run.
__global__ void ClockKernel(long long* out) {
  uint64_t g0, g1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));
  const long long c0 = clock64();
  while (clock64() - c0 < 20000000) {
  }
  const long long c1 = clock64();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));
  out[0] = c1 - c0;
  out[1] = static_cast<long long>(g1 - g0);
}

// A launch of the search's shape: kClusters x `cluster` blocks of kThreads with `smem` bytes of
// dynamic shared memory (cfg points into attr: not copyable).
struct ShapeLaunch {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[1]{};
  ShapeLaunch(cudaStream_t s, size_t smem, unsigned cluster) {
    cfg.gridDim = dim3(kClusters * kCluster);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  ShapeLaunch(const ShapeLaunch&) = delete;
  ShapeLaunch& operator=(const ShapeLaunch&) = delete;
};

template <int kOp>
void LaunchOp(const Args& a, cudaStream_t s) {
  auto* k = StepKernel<kOp>;
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  ShapeLaunch l(s, kSmemBytes, kCluster);
  CHECK(cudaLaunchKernelEx(&l.cfg, k, a, kReps[kOp]));
}

using LaunchFn = void (*)(const Args&, cudaStream_t);
template <int... I>
constexpr std::array<LaunchFn, sizeof...(I)> MakeTable(std::integer_sequence<int, I...>) {
  return {&LaunchOp<I>...};
}

// µs per launch of `shape` back to back in a graph of `n` launches (median of 5 replays).
double GraphLaunchUs(cudaStream_t s, int n, bool cluster, size_t smem, uint32_t* sink) {
  auto* k = EmptyKernel;
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaGraph_t g;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < n; ++i) {
    ShapeLaunch l(s, smem, cluster ? kCluster : 1);
    CHECK(cudaLaunchKernelEx(&l.cfg, k, sink));
  }
  CHECK(cudaStreamEndCapture(s, &g));
  cudaGraphExec_t ge;
  CHECK(cudaGraphInstantiate(&ge, g, 0));
  CHECK(cudaGraphLaunch(ge, s));
  CHECK(cudaStreamSynchronize(s));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<double> us;
  for (int r = 0; r < 5; ++r) {
    CHECK(cudaEventRecord(e0, s));
    CHECK(cudaGraphLaunch(ge, s));
    CHECK(cudaEventRecord(e1, s));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    us.push_back(ms * 1000.0 / n);
  }
  std::sort(us.begin(), us.end());
  CHECK(cudaGraphExecDestroy(ge));
  CHECK(cudaGraphDestroy(g));
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  return us[2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string json;
  int launches = 20;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    else if (!std::strcmp(argv[i], "--launches") && i + 1 < argc) launches = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s --json FILE [--launches N]\n", argv[0]);
      return 2;
    }
  }
  if (launches < 2) {  // launch 0 is the cold one and is not counted
    std::fprintf(stderr, "--launches must be at least 2 (got %d)\n", launches);
    return 2;
  }
  int dev_count = 0;
  if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  // Pointer chases: a random cycle over 256 KB (L2) and one over 1 GiB whose every step jumps
  // ~393 KB ahead (each load a new line and page, far beyond L2).
  const size_t l2_n = 64 * 1024, dram_n = size_t{256} * 1024 * 1024;
  std::vector<uint32_t> h(l2_n);
  for (size_t i = 0; i < l2_n; ++i) h[i] = static_cast<uint32_t>((i * 40503u + 977u) % l2_n);
  uint32_t *l2 = nullptr, *dram = nullptr, *sink = nullptr;
  uint4* row_data = nullptr;
  CHECK(cudaMalloc(&row_data, kRowCount * 256));
  CHECK(cudaMemset(row_data, 0x3f, kRowCount * 256));
  long long* out = nullptr;
  CHECK(cudaMalloc(&l2, l2_n * 4));
  CHECK(cudaMemcpy(l2, h.data(), l2_n * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMalloc(&dram, dram_n * 4));
  {
    std::vector<uint32_t> d(dram_n);
    const size_t jump = (1024 + 13) * 97;  // words
    for (size_t i = 0; i < dram_n; ++i) d[i] = static_cast<uint32_t>((i + jump) % dram_n);
    CHECK(cudaMemcpy(dram, d.data(), dram_n * 4, cudaMemcpyHostToDevice));
  }
  CHECK(cudaMalloc(&sink, 64));
  CHECK(cudaMalloc(&out, sizeof(long long) * launches * kClusters));
  long long* clk = nullptr;
  CHECK(cudaMalloc(&clk, 16));
  // The set-up above ran on the legacy stream (a pageable cudaMemcpy may return before its copy
  // lands), the kernels below run on the non-blocking `s`.
  CHECK(cudaDeviceSynchronize());
  ClockKernel<<<1, 1, 0, s>>>(clk);
  long long clk_h[2];
  CHECK(cudaMemcpyAsync(clk_h, clk, 16, cudaMemcpyDeviceToHost, s));
  CHECK(cudaStreamSynchronize(s));
  const double ghz = static_cast<double>(clk_h[0]) / static_cast<double>(clk_h[1]);

  const auto table = MakeTable(std::make_integer_sequence<int, kOps>{});
  struct Row {
    std::string name;
    double cycles, ns;
    int reps;
  };
  std::vector<Row> rows;
  std::vector<long long> host(static_cast<size_t>(launches) * kClusters);
  for (int op = 0; op < kOps; ++op) {
    for (int l = 0; l < launches; ++l) {
      Args a{l2, dram, dram_n, row_data, out, sink, l};
      table[op](a, s);
    }
    CHECK(cudaStreamSynchronize(s));
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(host.data(), out, host.size() * sizeof(long long), cudaMemcpyDeviceToHost));
    std::vector<long long> v(host.begin() + kClusters, host.end());  // launch 0: cold
    std::sort(v.begin(), v.end());
    const double per = static_cast<double>(v[v.size() / 2]) / kReps[op];
    rows.push_back({kOpNames[op], per, per / ghz, kReps[op]});
  }
  const double launch_cluster = GraphLaunchUs(s, 200, true, kSmemBytes, sink);
  const double launch_plain = GraphLaunchUs(s, 200, false, kSmemBytes, sink);
  const double launch_small = GraphLaunchUs(s, 200, false, 0, sink);

  std::printf("%s, %d SMs, SM clock %.3f GHz during the run\n", prop.name, prop.multiProcessorCount, ghz);
  std::printf("%-28s %10s %10s\n", "primitive", "cycles", "ns");
  for (const Row& r : rows) std::printf("%-28s %10.1f %10.1f\n", r.name.c_str(), r.cycles, r.ns);
  std::printf("%-28s %21.2f us\n", "launch 8x9 cluster, 200 KB", launch_cluster);
  std::printf("%-28s %21.2f us\n", "launch 72 blocks, 200 KB", launch_plain);
  std::printf("%-28s %21.2f us\n", "launch 72 blocks, no smem", launch_small);
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (f == nullptr) {
      std::perror(json.c_str());
      return 1;
    }
    std::fprintf(f, "{\n  \"device\": \"%s\",\n  \"sms\": %d,\n  \"sm_ghz\": %.4f,\n", prop.name,
                 prop.multiProcessorCount, ghz);
    std::fprintf(f, "  \"shape\": {\"clusters\": %d, \"cluster_size\": %d, \"threads\": %d, \"smem_bytes\": %zu},\n",
                 kClusters, kCluster, kThreads, kSmemBytes);
    std::fprintf(f, "  \"launch_us\": {\"cluster_200k\": %.3f, \"plain_200k\": %.3f, \"plain_nosmem\": %.3f},\n",
                 launch_cluster, launch_plain, launch_small);
    std::fprintf(f, "  \"primitives\": [\n");
    for (size_t i = 0; i < rows.size(); ++i) {
      std::fprintf(f, "    {\"name\": \"%s\", \"reps\": %d, \"cycles\": %.1f, \"ns\": %.1f}%s\n",
                   rows[i].name.c_str(), rows[i].reps, rows[i].cycles, rows[i].ns,
                   i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  return 0;
}
