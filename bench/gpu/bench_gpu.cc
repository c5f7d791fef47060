// kvmem-bench-gpu: per-layer decode attention latency on the GPU, Llama-3-8B-like shapes
// (32 query heads, 8 KV heads, D = 128, bf16), against the bytes each config must move.
//
//   kvmem-bench-gpu --json FILE [--contexts 8192,32768,131072] [--batches 1,8,32]
//                   [--budgets 1024,2048,4096] [--replays 15] [--machine NAME] [--commit SHA]
//
// Methods (one row each per config):
//   kvmem_dense        DenseAttend over a contiguous [B][8][T][128] cache (budget 0)
//   kvmem_sparse_attn  span attention over sinks (16) + `budget` tokens of ~16-token chunks
//                      (8..24, different chunks per KV head) + a 40-token tail, every session
//                      and head in one launch
// Timing: CUDA graph of L launches (inputs rotated over R copies so the working set is several
// times the L2 when one copy would fit), warm-up replays, median over replays, divided by L.
// bytes = K/V rows read once per KV head + q + out (the floor a decode step must move);
// max_rel_err = max over (sequence, head) of ‖out − ref‖/‖ref‖ against a float64 GPU reference.
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/gpu/bench_kernels.h"
#include "kernels/attention.h"
#include "kernels/cuda_ops.h"

namespace kvmem::bench {
namespace {

namespace kc = kvmem::kernels::cuda;
using kernels::AttendProblem;
using kernels::DenseAttendView;
using kernels::KVSpan;

#define CK(expr)                                                                                 \
  do {                                                                                           \
    const cudaError_t _e = (expr);                                                               \
    if (_e != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(_e)); \
      std::exit(2);                                                                              \
    }                                                                                            \
  } while (0)
#define SK(expr)                                                                                \
  do {                                                                                          \
    const Status _s = (expr);                                                                   \
    if (!_s.ok()) {                                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, _s.ToString().c_str()); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

constexpr uint32_t kHq = 32, kHkv = 8, kD = 128;
constexpr size_t kRotateBytes = 256ull << 20;  // working set target when rotating (> 4 x L2)

struct Args {
  std::string json;
  std::vector<uint32_t> contexts{8192, 32768, 131072};
  std::vector<uint32_t> batches{1, 8, 32};
  std::vector<uint32_t> budgets{1024, 2048, 4096};
  int replays = 15;
  std::string machine;
  std::string commit = "unknown";
};

std::vector<uint32_t> ParseList(const char* s) {
  std::vector<uint32_t> v;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) v.push_back(static_cast<uint32_t>(std::stoul(tok)));
  return v;
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value for %s\n", k.c_str());
        std::exit(1);
      }
      return argv[++i];
    };
    if (k == "--json")
      a.json = next();
    else if (k == "--contexts")
      a.contexts = ParseList(next());
    else if (k == "--batches")
      a.batches = ParseList(next());
    else if (k == "--budgets")
      a.budgets = ParseList(next());
    else if (k == "--replays")
      a.replays = std::atoi(next());
    else if (k == "--machine")
      a.machine = next();
    else if (k == "--commit")
      a.commit = next();
    else {
      std::fprintf(stderr, "unknown argument %s\n", k.c_str());
      std::exit(1);
    }
  }
  return a;
}

struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) { CK(cudaMalloc(&p, std::max<size_t>(bytes, 256))); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// Median µs per launch: a graph of `launches` calls of fn(i), replayed.
double TimeGraph(cudaStream_t s, int launches, int replays, const std::function<void(int)>& fn) {
  fn(0);  // outside the graph: one-time set-up (function attributes) and a first check
  CK(cudaStreamSynchronize(s));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < launches; ++i) fn(i);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int w = 0; w < 2; ++w) CK(cudaGraphLaunch(ge, s));
  CK(cudaStreamSynchronize(s));
  std::vector<float> ms;
  for (int r = 0; r < replays; ++r) {
    CK(cudaEventRecord(e0, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float t = 0;
    CK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  return ms[ms.size() / 2] * 1000.0 / launches;
}

// Large device-to-device cudaMemcpy, bytes read + written, events around each copy (no graph:
// a graph memcpy node runs on a copy engine, slower than the SM copy a plain memcpy uses).
double CopyGBps(cudaStream_t s) {
  const size_t bytes = 2ull << 30;
  DeviceBuffer a(bytes), b(bytes);
  FillRandomBF16(a.p, bytes / 2, 1, 1.f);
  CK(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int r = 0; r < 12; ++r) {
    CK(cudaEventRecord(e0, s));
    CK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float t = 0;
    CK(cudaEventElapsedTime(&t, e0, e1));
    if (r >= 2) ms.push_back(t);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return 2.0 * bytes / (ms[ms.size() / 2] * 1e-3) / 1e9;
}

int Rotation(size_t bytes_per_launch) {
  if (bytes_per_launch >= kRotateBytes) return 1;
  return static_cast<int>(
      std::min<size_t>(16, (kRotateBytes + bytes_per_launch - 1) / bytes_per_launch));
}

int Launches(int rotation) {
  const int want = 16;
  return ((want + rotation - 1) / rotation) * rotation;
}

nlohmann::json Row(uint32_t ctx, uint32_t batch, uint32_t budget, const char* method, double us,
                   double bytes, double err, double copy_gbps) {
  nlohmann::json r;
  r["context"] = ctx;
  r["batch"] = batch;
  r["budget"] = budget;
  r["method"] = method;
  r["us_per_layer"] = us;
  r["bytes"] = bytes;
  r["max_rel_err"] = err;
  r["gbps"] = bytes / (us * 1e-6) / 1e9;
  r["frac_of_copy"] = bytes / (us * 1e-6) / 1e9 / copy_gbps;
  r["floor_us"] = bytes / (copy_gbps * 1e9) * 1e6;
  return r;
}

// ---- Dense ----------------------------------------------------------------------------------
nlohmann::json BenchDense(cudaStream_t s, uint32_t ctx, uint32_t batch, int replays,
                          double copy_gbps) {
  const size_t kv_elems = static_cast<size_t>(batch) * kHkv * ctx * kD;
  const size_t kv_bytes = 2 * kv_elems * 2;
  const size_t q_elems = static_cast<size_t>(batch) * kHq * kD;
  const double bytes = static_cast<double>(kv_bytes) + 2.0 * q_elems * 2 + batch * kHq * 4.0;
  const int R = Rotation(kv_bytes);
  std::vector<std::unique_ptr<DeviceBuffer>> k, v, q;
  for (int r = 0; r < R; ++r) {
    k.emplace_back(new DeviceBuffer(kv_elems * 2));
    v.emplace_back(new DeviceBuffer(kv_elems * 2));
    q.emplace_back(new DeviceBuffer(q_elems * 2));
    FillRandomBF16(k[r]->p, kv_elems, 100 + 3 * r, 1.f);
    FillRandomBF16(v[r]->p, kv_elems, 101 + 3 * r, 1.f);
    FillRandomBF16(q[r]->p, q_elems, 102 + 3 * r, 1.f);
  }
  DeviceBuffer out(q_elems * 2), lse(batch * kHq * 4), lens(batch * 4);
  std::vector<uint32_t> lens_h(batch, ctx);
  CK(cudaMemcpy(lens.p, lens_h.data(), batch * 4, cudaMemcpyHostToDevice));
  DenseAttendView view{};
  view.kv_dtype = DType::kBF16;
  view.batch = batch;
  view.q_heads = kHq;
  view.kv_heads = kHkv;
  view.head_dim = kD;
  view.capacity_tokens = ctx;
  view.seq_lens = lens.as<uint32_t>();
  view.max_seq_len = ctx;
  view.scale = 1.f / std::sqrt(static_cast<float>(kD));
  view.q_dtype = DType::kBF16;
  view.out = out.p;
  view.out_dtype = DType::kBF16;
  view.lse = lse.as<float>();
  const kc::DenseAttendOptions opt;
  const size_t wsb = kc::DenseAttendWorkspaceBytes(view, opt);
  DeviceBuffer ws(wsb);
  CK(cudaMemset(ws.p, 0, std::max<size_t>(wsb, 256)));
  auto run = [&](int i) {
    DenseAttendView vi = view;
    vi.k = k[i % R]->p;
    vi.v = v[i % R]->p;
    vi.q = q[i % R]->p;
    SK(kc::DenseAttend(vi, opt, ws.p, wsb, s));
  };
  CK(cudaDeviceSynchronize());
  const double us = TimeGraph(s, Launches(R), replays, run);
  // Error of copy 0 against float64.
  run(0);
  CK(cudaStreamSynchronize(s));
  std::vector<RefSegment> segs;
  std::vector<uint32_t> begin;
  for (uint32_t b = 0; b < batch; ++b) {
    for (uint32_t h = 0; h < kHkv; ++h) {
      begin.push_back(static_cast<uint32_t>(segs.size()));
      const size_t off = (static_cast<size_t>(b) * kHkv + h) * ctx * kD * 2;
      segs.push_back({k[0]->as<uint8_t>() + off, v[0]->as<uint8_t>() + off, ctx, 0});
    }
  }
  begin.push_back(static_cast<uint32_t>(segs.size()));
  DeviceBuffer segs_d(segs.size() * sizeof(RefSegment)), begin_d(begin.size() * 4),
      ref(q_elems * sizeof(double));
  CK(cudaMemcpy(segs_d.p, segs.data(), segs.size() * sizeof(RefSegment), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(begin_d.p, begin.data(), begin.size() * 4, cudaMemcpyHostToDevice));
  ReferenceAttend(segs_d.as<RefSegment>(), begin_d.as<uint32_t>(), batch, kHq, kHkv, q[0]->p,
                  view.scale, ref.as<double>());
  CK(cudaGetLastError());
  const double err = MaxRelErrBF16(out.p, ref.as<double>(), batch * kHq);
  auto row = Row(ctx, batch, 0, "kvmem_dense", us, bytes, err, copy_gbps);
  row["rotation"] = R;
  return row;
}

// ---- Sparse ---------------------------------------------------------------------------------
constexpr uint32_t kChunkCap = 24, kSink = 16, kTailCap = 64, kTail = 40;
constexpr uint64_t kChunkElems = 2ull * kHkv * kChunkCap * kD;
constexpr uint64_t kTailElems = 2ull * kHkv * kTailCap * kD;

struct SessionLayout {
  std::vector<uint64_t> chunk_off;
  std::vector<uint32_t> chunk_len;
  uint64_t tail_off;
};

struct SparsePool {
  std::vector<SessionLayout> sessions;
  uint64_t elems = 0;
  std::unique_ptr<DeviceBuffer> buf;
};

SparsePool BuildPool(uint32_t ctx, uint32_t batch, std::mt19937_64& rng) {
  SparsePool p;
  for (uint32_t b = 0; b < batch; ++b) {
    SessionLayout s;
    uint32_t tokens = 0;
    while (tokens + kTail < ctx) {
      const uint32_t len = s.chunk_len.empty() ? kSink : 8 + static_cast<uint32_t>(rng() % 17);
      s.chunk_off.push_back(p.elems);
      s.chunk_len.push_back(std::min(len, ctx - kTail - tokens));
      tokens += s.chunk_len.back();
      p.elems += kChunkElems;
    }
    s.tail_off = p.elems;
    p.elems += kTailElems;
    p.sessions.push_back(std::move(s));
  }
  p.buf.reset(new DeviceBuffer(p.elems * 2));
  FillRandomBF16(p.buf->p, p.elems, 7, 1.f);
  return p;
}

struct Selection {
  std::vector<std::vector<KVSpan>> spans;  // per session
  std::vector<std::vector<uint32_t>> head_begin;
  uint64_t tokens = 0;  // summed over sessions and KV heads
};

Selection Select(const SparsePool& pool, uint32_t budget, std::mt19937_64& rng) {
  Selection sel;
  for (const SessionLayout& s : pool.sessions) {
    std::vector<KVSpan> spans;
    std::vector<uint32_t> hb;
    const uint32_t n = static_cast<uint32_t>(s.chunk_off.size());
    std::vector<uint32_t> idx(n - 1);
    std::iota(idx.begin(), idx.end(), 1u);
    for (uint32_t h = 0; h < kHkv; ++h) {
      hb.push_back(static_cast<uint32_t>(spans.size()));
      spans.push_back({s.chunk_off[0], kChunkCap, 0, s.chunk_len[0]});
      sel.tokens += s.chunk_len[0];
      std::vector<uint32_t> chosen;
      uint32_t got = 0;
      for (uint32_t i = 0; i < idx.size() && got < budget; ++i) {  // partial Fisher-Yates
        const uint32_t j = i + static_cast<uint32_t>(rng() % (idx.size() - i));
        std::swap(idx[i], idx[j]);
        chosen.push_back(idx[i]);
        got += s.chunk_len[idx[i]];
      }
      std::sort(chosen.begin(), chosen.end());
      for (uint32_t c : chosen) {
        spans.push_back({s.chunk_off[c], kChunkCap, 0, s.chunk_len[c]});
        sel.tokens += s.chunk_len[c];
      }
      spans.push_back({s.tail_off, kTailCap, 0, kTail});
      sel.tokens += kTail;
    }
    hb.push_back(static_cast<uint32_t>(spans.size()));
    sel.spans.push_back(std::move(spans));
    sel.head_begin.push_back(std::move(hb));
  }
  return sel;
}

std::vector<nlohmann::json> BenchSparse(cudaStream_t s, uint32_t ctx, uint32_t batch,
                                        const std::vector<uint32_t>& budgets, int replays,
                                        double copy_gbps, std::mt19937_64& rng) {
  std::vector<nlohmann::json> rows;
  SparsePool pool = BuildPool(ctx, batch, rng);
  const size_t q_elems = static_cast<size_t>(batch) * kHq * kD;
  DeviceBuffer out(q_elems * 2), lse(batch * kHq * 4);
  const float scale = 1.f / std::sqrt(static_cast<float>(kD));
  for (uint32_t budget : budgets) {
    Selection first = Select(pool, budget, rng);
    const double kv_bytes = static_cast<double>(first.tokens) * kD * 2 * 2;
    const double bytes = kv_bytes + 2.0 * q_elems * 2 + batch * kHq * 4.0;
    const int R = Rotation(static_cast<size_t>(kv_bytes));
    std::vector<Selection> sels;
    sels.push_back(std::move(first));
    for (int r = 1; r < R; ++r) sels.push_back(Select(pool, budget, rng));
    std::vector<std::unique_ptr<DeviceBuffer>> qs, wss;
    std::vector<kc::AttendPlan> plans(R);
    double plan_us = 0;
    for (int r = 0; r < R; ++r) {
      qs.emplace_back(new DeviceBuffer(q_elems * 2));
      FillRandomBF16(qs[r]->p, q_elems, 1000 + r, 1.f);
      std::vector<AttendProblem> probs(batch);
      for (uint32_t b = 0; b < batch; ++b) {
        AttendProblem p{};
        p.pool = pool.buf->p;
        p.kv_dtype = DType::kBF16;
        p.q_heads = kHq;
        p.kv_heads = kHkv;
        p.head_dim = kD;
        p.scale = scale;
        p.q = qs[r]->as<uint8_t>() + static_cast<size_t>(b) * kHq * kD * 2;
        p.q_dtype = DType::kBF16;
        p.spans = sels[r].spans[b].data();
        p.head_span_begin = sels[r].head_begin[b].data();
        p.num_spans = static_cast<uint32_t>(sels[r].spans[b].size());
        p.out = out.as<uint8_t>() + static_cast<size_t>(b) * kHq * kD * 2;
        p.out_dtype = DType::kBF16;
        p.lse = lse.as<float>() + b * kHq;
        probs[b] = p;
      }
      const auto t0 = std::chrono::steady_clock::now();
      SK(kc::PlanAttend(probs.data(), batch, kc::AttendPlanOptions{}, &plans[r]));
      const auto t1 = std::chrono::steady_clock::now();
      if (r == 0) plan_us = std::chrono::duration<double, std::micro>(t1 - t0).count();
      wss.emplace_back(new DeviceBuffer(plans[r].workspace_bytes));
      SK(kc::UploadAttendPlan(plans[r], wss[r]->p, s));
    }
    CK(cudaStreamSynchronize(s));
    auto run = [&](int i) { SK(kc::LaunchAttend(plans[i % R], wss[i % R]->p, s)); };
    const double us = TimeGraph(s, Launches(R), replays, run);
    run(0);
    CK(cudaStreamSynchronize(s));
    std::vector<RefSegment> segs;
    std::vector<uint32_t> begin;
    auto* base = pool.buf->as<uint8_t>();
    for (uint32_t b = 0; b < batch; ++b) {
      for (uint32_t h = 0; h < kHkv; ++h) {
        begin.push_back(static_cast<uint32_t>(segs.size()));
        for (uint32_t si = sels[0].head_begin[b][h]; si < sels[0].head_begin[b][h + 1]; ++si) {
          const KVSpan& sp = sels[0].spans[b][si];
          const uint64_t k =
              sp.offset + (static_cast<uint64_t>(h) * sp.stride_tokens + sp.begin) * kD;
          const uint64_t v = k + static_cast<uint64_t>(kHkv) * sp.stride_tokens * kD;
          segs.push_back({base + k * 2, base + v * 2, sp.end - sp.begin, 0});
        }
      }
    }
    begin.push_back(static_cast<uint32_t>(segs.size()));
    DeviceBuffer segs_d(segs.size() * sizeof(RefSegment)), begin_d(begin.size() * 4),
        ref(q_elems * sizeof(double));
    CK(cudaMemcpy(segs_d.p, segs.data(), segs.size() * sizeof(RefSegment), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(begin_d.p, begin.data(), begin.size() * 4, cudaMemcpyHostToDevice));
    ReferenceAttend(segs_d.as<RefSegment>(), begin_d.as<uint32_t>(), batch, kHq, kHkv, qs[0]->p,
                    scale, ref.as<double>());
    CK(cudaGetLastError());
    const double err = MaxRelErrBF16(out.p, ref.as<double>(), batch * kHq);
    auto row = Row(ctx, batch, budget, "kvmem_sparse_attn", us, bytes, err, copy_gbps);
    row["rotation"] = R;
    row["plan_us"] = plan_us;
    row["blocks"] = plans[0].num_items;
    row["split_tokens"] = plans[0].split_tokens;
    row["tokens_per_head"] = static_cast<double>(sels[0].tokens) / (batch * kHkv);
    rows.push_back(row);
  }
  return rows;
}

int Main(int argc, char** argv) {
  const Args args = ParseArgs(argc, argv);
  if (kc::DeviceCount() == 0) {
    std::fprintf(stderr, "kvmem-bench-gpu: no CUDA device\n");
    return 3;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const double copy_gbps = CopyGBps(s);
  std::printf("device %s, %d SMs, L2 %d MB, copy %.0f GB/s (read+write)\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_gbps);
  std::fflush(stdout);
  nlohmann::json out;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  out["machine"] = args.machine.empty() ? std::string(prop.name) + " (" + host + ")" : args.machine;
  out["gpu"] = prop.name;
  out["sms"] = prop.multiProcessorCount;
  out["commit"] = args.commit;
  out["copy_gbps"] = copy_gbps;
  out["shapes"] = {{"q_heads", kHq},
                   {"kv_heads", kHkv},
                   {"head_dim", kD},
                   {"dtype", "bf16"},
                   {"sink_tokens", kSink},
                   {"tail_tokens", kTail},
                   {"chunk_tokens", "uniform 8..24 (mean 16)"}};
  out["timing"] =
      "CUDA graph of >=16 launches, inputs rotated to >=256 MiB when smaller, "
      "median of replays / launches";
  out["results"] = nlohmann::json::array();
  auto flush_json = [&] {
    if (args.json.empty()) return;
    std::ofstream f(args.json);
    f << out.dump(2) << "\n";
  };
  std::mt19937_64 rng(12345);
  for (uint32_t ctx : args.contexts) {
    for (uint32_t batch : args.batches) {
      auto d = BenchDense(s, ctx, batch, args.replays, copy_gbps);
      std::printf("%-18s ctx %6u batch %2u budget %4u  %9.2f us  %6.0f GB/s  err %.2e\n",
                  "kvmem_dense", ctx, batch, 0u, d["us_per_layer"].get<double>(),
                  d["gbps"].get<double>(), d["max_rel_err"].get<double>());
      std::fflush(stdout);
      out["results"].push_back(d);
      flush_json();
      for (auto& r : BenchSparse(s, ctx, batch, args.budgets, args.replays, copy_gbps, rng)) {
        std::printf("%-18s ctx %6u batch %2u budget %4u  %9.2f us  %6.0f GB/s  err %.2e\n",
                    "kvmem_sparse_attn", ctx, batch, r["budget"].get<uint32_t>(),
                    r["us_per_layer"].get<double>(), r["gbps"].get<double>(),
                    r["max_rel_err"].get<double>());
        std::fflush(stdout);
        out["results"].push_back(r);
        flush_json();
      }
    }
  }
  flush_json();
  CK(cudaStreamDestroy(s));
  return 0;
}

}  // namespace
}  // namespace kvmem::bench

int main(int argc, char** argv) { return kvmem::bench::Main(argc, argv); }
