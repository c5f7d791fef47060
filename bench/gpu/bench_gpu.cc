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
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/gpu/bench_args.h"
#include "bench/gpu/bench_kernels.h"
#include "index/cluster_tree.h"
#include "kernels/attention.h"
#include "kernels/cuda_ops.h"
#include "kernels/cuda/search_attend_to.h"

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

bool g_sweep = false;

struct Args {
  std::string json;
  std::vector<uint32_t> contexts{8192, 32768, 131072};
  std::vector<uint32_t> batches{1, 8, 32};
  std::vector<uint32_t> budgets{1024, 2048, 4096};
  int replays = 15;
  bool search = true;  // kvmem_search / kvmem_search_sparse rows (builds real cluster trees)
  // Sparse rows (and dense rows with KVMEM_BENCH_DENSE_SWEEP, B <= 8) also time other splits.
  bool sweep = false;
  std::string machine;
  std::string commit = "unknown";
};

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
    else if (k == "--no-search")
      a.search = false;
    else if (k == "--sweep")
      a.sweep = true;
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

// max over (sequence, query head) of the relative error of `out` (bf16) against a float64
// reference over the given K/V segments (seg_begin: [batch * kv_heads + 1]).
double ErrorAgainstReference(const std::vector<RefSegment>& segs,
                             const std::vector<uint32_t>& seg_begin, uint32_t batch,
                             const void* q, float scale, const void* out) {
  const size_t q_elems = static_cast<size_t>(batch) * kHq * kD;
  DeviceBuffer segs_d(segs.size() * sizeof(RefSegment)), begin_d(seg_begin.size() * 4),
      ref(q_elems * sizeof(double));
  CK(cudaMemcpy(segs_d.p, segs.data(), segs.size() * sizeof(RefSegment), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(begin_d.p, seg_begin.data(), seg_begin.size() * 4, cudaMemcpyHostToDevice));
  ReferenceAttend(segs_d.as<RefSegment>(), begin_d.as<uint32_t>(), batch, kHq, kHkv, q, scale,
                  ref.as<double>());
  CK(cudaGetLastError());
  return MaxRelErrBF16(out, ref.as<double>(), batch * kHq);
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
  CK(cudaMemsetAsync(ws.p, 0, std::max<size_t>(wsb, 256), s));
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
  const double err = ErrorAgainstReference(segs, begin, batch, q[0]->p, view.scale, out.p);
  auto row = Row(ctx, batch, 0, "kvmem_dense", us, bytes, err, copy_gbps);
  row["rotation"] = R;
  if (g_sweep && batch <= 8 && std::getenv("KVMEM_BENCH_DENSE_SWEEP")) {
    // Other split targets (blocks in total), timed the same way: what the default should be.
    row["sweep"] = nlohmann::json::array();
    for (uint32_t tb : {132u, 264u, 396u, 528u, 792u, 1056u, 1584u, 2112u}) {
      kc::DenseAttendOptions o;
      o.target_blocks = tb;
      const size_t wb = kc::DenseAttendWorkspaceBytes(view, o);
      DeviceBuffer w(wb);
      CK(cudaMemsetAsync(w.p, 0, std::max<size_t>(wb, 256), s));
      const double t = TimeGraph(s, Launches(R), replays, [&](int i) {
        DenseAttendView vi = view;
        vi.k = k[i % R]->p;
        vi.v = v[i % R]->p;
        vi.q = q[i % R]->p;
        SK(kc::DenseAttend(vi, o, w.p, wb, s));
      });
      row["sweep"].push_back({{"target_blocks", tb}, {"us", t}});
    }
  }
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

// KVMEM_ATTN_TRACE=1: one traced launch (kc::LaunchAttendTraced) of a rotation plan whose data
// the last launches did not touch; per trace point, the blocks' stamps relative to the earliest
// block's entry (µs: min, median, max over the blocks that passed the point), printed too.
nlohmann::json TraceAttend(cudaStream_t s, const std::vector<kc::AttendPlan>& plans,
                           const std::vector<std::unique_ptr<DeviceBuffer>>& wss) {
  // Traced launches back to back over the rotation (as the timed replays run), so the stamps
  // kept (the last launch's) are of a warm launch, not of a single shot after a sync.
  const size_t R = plans.size();
  const int launches = static_cast<int>(std::max<size_t>(16, 2 * R));
  std::vector<std::unique_ptr<DeviceBuffer>> bufs;
  for (size_t i = 0; i < R; ++i) {
    const size_t n = size_t{plans[i].num_items} * kc::kAttendTracePoints;
    bufs.emplace_back(new DeviceBuffer(n * sizeof(uint64_t)));
    CK(cudaMemsetAsync(bufs[i]->p, 0, n * sizeof(uint64_t), s));
  }
  for (int i = 0; i < launches; ++i) {
    SK(kc::LaunchAttendTraced(plans[i % R], wss[i % R]->p, s, bufs[i % R]->as<uint64_t>()));
  }
  const size_t r = (launches - 1) % R;
  const kc::AttendPlan& plan = plans[r];
  const size_t n = size_t{plan.num_items} * kc::kAttendTracePoints;
  std::vector<uint64_t> h(n);
  CK(cudaMemcpyAsync(h.data(), bufs[r]->p, n * sizeof(uint64_t), cudaMemcpyDeviceToHost, s));
  CK(cudaStreamSynchronize(s));
  uint64_t t0 = UINT64_MAX;
  for (uint32_t b = 0; b < plan.num_items; ++b) t0 = std::min(t0, h[size_t{b} * kc::kAttendTracePoints]);
  nlohmann::json out = nlohmann::json::object();
  std::printf("  attn trace (%u blocks, us from the first block's entry, min/median/max):", plan.num_items);
  for (uint32_t k = 0; k < kc::kAttendTracePoints; ++k) {
    std::vector<double> v;
    for (uint32_t b = 0; b < plan.num_items; ++b) {
      const uint64_t t = h[size_t{b} * kc::kAttendTracePoints + k];
      if (t != 0 && t >= t0) v.push_back((t - t0) / 1e3);
    }
    if (v.empty()) continue;
    std::sort(v.begin(), v.end());
    const double lo = v.front(), med = v[v.size() / 2], hi = v.back();
    out[std::to_string(k)] = {lo, med, hi, v.size()};
    std::printf(" %u: %.2f/%.2f/%.2f", k, lo, med, hi);
  }
  std::printf("\n");
  return out;
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
    std::vector<std::vector<AttendProblem>> all_probs(R);
    double plan_us = 0;
    for (int r = 0; r < R; ++r) {
      qs.emplace_back(new DeviceBuffer(q_elems * 2));
      FillRandomBF16(qs[r]->p, q_elems, 1000 + r, 1.f);
      std::vector<AttendProblem>& probs = all_probs[r];
      probs.resize(batch);
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
    CK(cudaDeviceSynchronize());  // the queries' fill runs on the legacy stream, the graphs on `s`
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
    const double err = ErrorAgainstReference(segs, begin, batch, qs[0]->p, scale, out.p);
    auto row = Row(ctx, batch, budget, "kvmem_sparse_attn", us, bytes, err, copy_gbps);
    row["rotation"] = R;
    row["plan_us"] = plan_us;
    row["blocks"] = plans[0].num_items;
    row["split_tokens"] = plans[0].split_tokens;
    row["attn_cluster"] = plans[0].cluster_size;
    row["tokens_per_head"] = static_cast<double>(sels[0].tokens) / (batch * kHkv);
    if (std::getenv("KVMEM_ATTN_TRACE") != nullptr) row["attn_trace_us"] = TraceAttend(s, plans, wss);
    if (g_sweep) {
      row["sweep"] = nlohmann::json::array();
      for (uint32_t tb : {132u, 264u, 396u, 528u, 792u, 1056u, 1584u}) {
        kc::AttendPlanOptions o;
        o.target_blocks = tb;
        std::vector<kc::AttendPlan> ps(R);
        std::vector<std::unique_ptr<DeviceBuffer>> ws2;
        for (int r = 0; r < R; ++r) {
          SK(kc::PlanAttend(all_probs[r].data(), batch, o, &ps[r]));
          ws2.emplace_back(new DeviceBuffer(ps[r].workspace_bytes));
          SK(kc::UploadAttendPlan(ps[r], ws2[r]->p, s));
        }
        CK(cudaStreamSynchronize(s));
        const double t = TimeGraph(s, Launches(R), replays,
                                   [&](int i) { SK(kc::LaunchAttend(ps[i % R], ws2[i % R]->p, s)); });
        row["sweep"].push_back({{"target_blocks", tb}, {"us", t}, {"split_tokens", ps[0].split_tokens}});
      }
      // Fixed split sizes (whole waves of even splits rather than a block count; at batch 1
      // below the planner's 128-token minimum too).
      const std::vector<uint32_t> sizes =
          batch == 1 ? std::vector<uint32_t>{64, 128, 192, 256}
                     : std::vector<uint32_t>{384, 448, 512, 576, 640, 768, 1024};
      for (uint32_t sp : sizes) {
        kc::AttendPlanOptions o;
        o.min_split_tokens = o.max_split_tokens = sp;
        std::vector<kc::AttendPlan> ps(R);
        std::vector<std::unique_ptr<DeviceBuffer>> ws2;
        for (int r = 0; r < R; ++r) {
          SK(kc::PlanAttend(all_probs[r].data(), batch, o, &ps[r]));
          ws2.emplace_back(new DeviceBuffer(ps[r].workspace_bytes));
          SK(kc::UploadAttendPlan(ps[r], ws2[r]->p, s));
        }
        CK(cudaStreamSynchronize(s));
        const double t = TimeGraph(s, Launches(R), replays,
                                   [&](int i) { SK(kc::LaunchAttend(ps[i % R], ws2[i % R]->p, s)); });
        row["sweep"].push_back({{"target_blocks", 0}, {"us", t}, {"split_tokens", ps[0].split_tokens},
                                {"blocks", ps[0].num_items}});
      }
    }
    rows.push_back(row);
  }
  return rows;
}

// ---- Search and search + sparse attention on real cluster trees -----------------------------
// Sessions laid out like the daemon's (a K/V block per chunk with stride = its tokens, chunks of
// 8..24 tokens, a 64-token tail block holding 40 tokens), topic-structured keys, one
// ClusterTree per (session, KV head) built from the GPU chunk summaries, mirrored with
// kc::DeviceTree. Rotation: R copies of the device trees and R query sets, so the summaries the
// search reads are not L2-resident from the previous replay (a layer's trees are not either).
struct SearchSession {
  std::vector<uint32_t> tokens;
  std::vector<uint64_t> start, block;
  uint64_t tail_off = 0;
  std::vector<index::ClusterTree> trees;
  std::vector<std::vector<float>> centroids;  // [head][chunk * D] host copy (query generation)
  std::unique_ptr<DeviceBuffer> block_d;
};

// The search + attention as kvmemd submits one Attend (daemon/device_pool.cc, SearchAttend):
// q and the plan image up from pinned memory in one copy, the two launches, [out | lse | per-head
// results] back in one copy, a stream synchronisation; host-timed from the first enqueue to the
// return of the synchronisation, with ~20 us of idle host time between shots (a worker's round
// trip around each). The median over 300 shots is the device's single-shot time that the e2e
// Attend pays on top of the daemon and the transport; `enqueue_us` is the median host time of the
// three enqueueing calls. Rotation 0's problems, planned again in the daemon's buffer layout.
nlohmann::json SingleShot(cudaStream_t s, std::vector<kc::SearchAttendProblem> probs,
                          const std::vector<uint8_t>& out_graph, uint32_t ctx, uint32_t budget,
                          double bytes, double copy_gbps) {
  const uint32_t batch = static_cast<uint32_t>(probs.size());
  auto room = [](size_t n) { return (n + 255) / 256 * 256; };
  const size_t q_bytes = size_t{batch} * kHq * kD * 2, out_bytes = q_bytes;
  const size_t lse_bytes = size_t{batch} * kHq * 4, res_bytes = size_t{batch} * kHkv * sizeof(kc::SearchTaskResult);
  const size_t res_at = room(out_bytes) + room(lse_bytes), down = res_at + res_bytes;
  const size_t q_at = room(down), ws_at = q_at + room(q_bytes);
  std::vector<uint8_t> q_h(q_bytes);  // rotation 0's queries (batch-contiguous in qs[0])
  CK(cudaMemcpy(q_h.data(), probs[0].attend.q, q_bytes, cudaMemcpyDeviceToHost));
  // The daemon's buffer [out | lse | results | q | workspace]: q and the plan image go up in one
  // copy, out, lse and the results come back in one. Planned twice: the workspace size first.
  kc::SearchAttendPlan plan;
  SK(kc::PlanSearchAttend(probs.data(), batch, kc::AttendPlanOptions{}, &plan));
  DeviceBuffer buf(ws_at + plan.workspace_bytes);
  auto* b8 = buf.as<uint8_t>();
  for (uint32_t b = 0; b < batch; ++b) {
    probs[b].attend.q = b8 + q_at + size_t{b} * kHq * kD * 2;
    probs[b].attend.out = b8 + size_t{b} * kHq * kD * 2;
    probs[b].attend.lse = reinterpret_cast<float*>(b8 + room(out_bytes)) + b * kHq;
  }
  SK(kc::PlanSearchAttend(probs.data(), batch, kc::AttendPlanOptions{}, &plan));
  CK(cudaMemsetAsync(buf.p, 0, ws_at + plan.workspace_bytes, s));
  auto* d_res = reinterpret_cast<kc::SearchTaskResult*>(b8 + res_at);
  const size_t up = room(q_bytes) + plan.image.size();
  uint8_t* h = nullptr;
  CK(cudaMallocHost(reinterpret_cast<void**>(&h), up + down));
  std::memcpy(h, q_h.data(), q_bytes);
  std::memcpy(h + room(q_bytes), plan.image.data(), plan.image.size());
  // kvmemd's default submission (three calls per shot), then the same three captured once as a
  // CUDA graph and replayed per shot (KVMEM_DEVICE_SUBMIT=graph: one call per shot).
  auto enqueue = [&] {
    CK(cudaMemcpyAsync(b8 + q_at, h, up, cudaMemcpyHostToDevice, s));
    SK(kc::LaunchSearchAttendTo(plan, b8 + ws_at, d_res, s));
    CK(cudaMemcpyAsync(h + up, b8, down, cudaMemcpyDeviceToHost, s));
  };
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  enqueue();
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  std::vector<double> total[2], enq[2];
  bool same[2] = {false, false};
  for (int mode = 0; mode < 2; ++mode) {
    std::memset(h + up, 0, out_graph.size());
    CK(cudaDeviceSynchronize());
    for (int i = 0; i < 305; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      if (mode == 0) {
        enqueue();
      } else {
        CK(cudaGraphLaunch(ge, s));
      }
      const auto t1 = std::chrono::steady_clock::now();
      CK(cudaStreamSynchronize(s));
      const auto t2 = std::chrono::steady_clock::now();
      if (i >= 5) {
        total[mode].push_back(std::chrono::duration<double, std::micro>(t2 - t0).count());
        enq[mode].push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      }
      while (std::chrono::steady_clock::now() - t2 < std::chrono::microseconds(20)) {
      }
    }
    // The last shot's output is the graph-timed kernels' for the same queries (the kernels are
    // deterministic): a shot that computed nothing cannot pass for a fast one.
    same[mode] = std::memcmp(h + up, out_graph.data(), out_graph.size()) == 0;
    std::sort(total[mode].begin(), total[mode].end());
    std::sort(enq[mode].begin(), enq[mode].end());
  }
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaFreeHost(h));
  auto r = Row(ctx, batch, budget, "kvmem_search_sparse_single_shot", total[0][total[0].size() / 2],
               bytes, 0.0, copy_gbps);
  r["enqueue_us"] = enq[0][enq[0].size() / 2];
  r["p90_us"] = total[0][total[0].size() * 9 / 10];
  r["output_matches_graph_run"] = same[0];
  r["graph_submit_us"] = total[1][total[1].size() / 2];
  r["graph_submit_enqueue_us"] = enq[1][enq[1].size() / 2];
  r["graph_submit_p90_us"] = total[1][total[1].size() * 9 / 10];
  r["graph_submit_output_matches"] = same[1];
  r["meaning"] =
      "host time of one Attend's device work as kvmemd submits it (copies up, search, attention, "
      "one copy back, stream synchronisation), median of 300 shots 20 us apart; graph_submit_*: "
      "the same work captured once as a CUDA graph, one cudaGraphLaunch per shot; max_rel_err "
      "not measured: *_matches compare the last shot's output with kvmem_search_sparse's";
  return r;
}

std::vector<nlohmann::json> BenchSearch(cudaStream_t s, uint32_t ctx, uint32_t batch,
                                        const std::vector<uint32_t>& budgets, int replays,
                                        double copy_gbps, std::mt19937_64& rng) {
  std::vector<nlohmann::json> rows;
  std::vector<SearchSession> ss(batch);
  uint64_t elems = 0;
  for (auto& se : ss) {
    uint64_t tok = 0;
    while (tok + kTail < ctx) {
      const uint32_t len = std::min<uint32_t>(8 + static_cast<uint32_t>(rng() % 17),
                                              static_cast<uint32_t>(ctx - kTail - tok));
      se.start.push_back(tok);
      se.tokens.push_back(len);
      se.block.push_back(elems);
      elems += 2ull * kHkv * len * kD;
      tok += len;
    }
    se.tail_off = elems;
    elems += kTailElems;
  }
  DeviceBuffer pool(elems * 2);
  FillRandomBF16(pool.p, elems, 99, 1.f);  // tails; chunk blocks are overwritten below
  const auto t_build0 = std::chrono::steady_clock::now();
  for (uint32_t b = 0; b < batch; ++b) {
    SearchSession& se = ss[b];
    const uint32_t n = static_cast<uint32_t>(se.tokens.size());
    se.block_d.reset(new DeviceBuffer(n * 8));
    DeviceBuffer tok_d(n * 4), start_d(n * 8), spans_d(n * sizeof(KVSpan));
    CK(cudaMemcpy(se.block_d->p, se.block.data(), n * 8, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(tok_d.p, se.tokens.data(), n * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(start_d.p, se.start.data(), n * 8, cudaMemcpyHostToDevice));
    FillTopicKV(pool.p, se.block_d->as<uint64_t>(), tok_d.as<uint32_t>(), start_d.as<uint64_t>(),
                n, kHkv, kD, b, 4242);
    CK(cudaGetLastError());
    std::vector<KVSpan> spans(n);
    for (uint32_t c = 0; c < n; ++c) spans[c] = {se.block[c], se.tokens[c], 0, se.tokens[c]};
    CK(cudaMemcpy(spans_d.p, spans.data(), n * sizeof(KVSpan), cudaMemcpyHostToDevice));
    DeviceBuffer cen(size_t{n} * kHkv * kD * 4), rad(size_t{n} * kHkv * 4), nrm(size_t{n} * kHkv * 4);
    kernels::ChunkSummaryView v{pool.p, DType::kBF16, kHkv, kD, spans_d.as<KVSpan>(), n,
                                cen.as<float>(), rad.as<float>(), nrm.as<float>()};
    SK(kc::ChunkSummary(v, nullptr));
    std::vector<float> c_h(size_t{n} * kHkv * kD), r_h(size_t{n} * kHkv), m_h(r_h.size());
    CK(cudaMemcpy(c_h.data(), cen.p, c_h.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(r_h.data(), rad.p, r_h.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(m_h.data(), nrm.p, m_h.size() * 4, cudaMemcpyDeviceToHost));
    se.centroids.assign(kHkv, {});
    for (uint32_t h = 0; h < kHkv; ++h) se.trees.emplace_back(kD);
    std::vector<std::thread> th;
    for (uint32_t h = 0; h < kHkv; ++h) {
      th.emplace_back([&, h] {
        std::vector<index::ChunkSummary> sums(n);
        se.centroids[h].resize(size_t{n} * kD);
        for (uint32_t c = 0; c < n; ++c) {
          const float* cc = &c_h[(size_t{c} * kHkv + h) * kD];
          sums[c].centroid.assign(cc, cc + kD);
          std::copy(cc, cc + kD, &se.centroids[h][size_t{c} * kD]);
          sums[c].radius = r_h[size_t{c} * kHkv + h];
          sums[c].max_key_norm = m_h[size_t{c} * kHkv + h];
        }
        (void)se.trees[h].Build(sums, se.tokens);
      });
    }
    for (auto& t : th) t.join();
  }
  const double build_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_build0).count();
  // Device trees: R copies.
  std::vector<kernels::FlatTree> flats(size_t{batch} * kHkv);
  uint64_t tree_bytes = 0;
  for (uint32_t b = 0; b < batch; ++b) {
    for (uint32_t h = 0; h < kHkv; ++h) {
      ss[b].trees[h].ExportFlat(&flats[b * kHkv + h]);
      const auto& f = flats[b * kHkv + h];
      tree_bytes += (f.nodes.size() + f.num_chunks) * (kD * 4 + 8);
    }
  }
  const int R = Rotation(tree_bytes);
  std::vector<std::unique_ptr<kc::DeviceTree>> dtrees;
  for (int r = 0; r < R; ++r) {
    for (auto& f : flats) {
      dtrees.emplace_back(new kc::DeviceTree());
      SK(dtrees.back()->Sync(f, s));
    }
  }
  CK(cudaStreamSynchronize(s));
  const size_t q_elems = static_cast<size_t>(batch) * kHq * kD;
  DeviceBuffer out(q_elems * 2), lse(batch * kHq * 4);
  const float scale = 1.f / std::sqrt(static_cast<float>(kD));
  // Queries: per KV-head group, the centroid of a random chunk plus noise (a decode query
  // attends to something in the context); R sets.
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<std::vector<uint16_t>> q_h(R, std::vector<uint16_t>(q_elems));
  std::vector<std::unique_ptr<DeviceBuffer>> qs;
  for (int r = 0; r < R; ++r) {
    for (uint32_t b = 0; b < batch; ++b) {
      for (uint32_t h = 0; h < kHkv; ++h) {
        const uint32_t c = static_cast<uint32_t>(rng() % ss[b].tokens.size());
        for (uint32_t g = 0; g < kHq / kHkv; ++g) {
          for (uint32_t d = 0; d < kD; ++d) {
            q_h[r][((size_t{b} * kHq) + h * (kHq / kHkv) + g) * kD + d] =
                FloatToBF16(ss[b].centroids[h][size_t{c} * kD + d] + 0.5f * nd(rng));
          }
        }
      }
    }
    qs.emplace_back(new DeviceBuffer(q_elems * 2));
    CK(cudaMemcpy(qs[r]->p, q_h[r].data(), q_elems * 2, cudaMemcpyHostToDevice));
  }
  for (uint32_t budget : budgets) {
    std::vector<kc::SearchAttendPlan> plans(R);
    std::vector<std::unique_ptr<DeviceBuffer>> wss;
    std::vector<std::vector<kernels::FlatTreeView>> views(static_cast<size_t>(R) * batch);
    std::vector<kc::SearchAttendProblem> probs0;  // rotation 0's, for the single shot
    double plan_us = 0;
    for (int r = 0; r < R; ++r) {
      std::vector<kc::SearchAttendProblem> probs(batch);
      for (uint32_t b = 0; b < batch; ++b) {
        for (uint32_t h = 0; h < kHkv; ++h) {
          views[r * batch + b].push_back(dtrees[(static_cast<size_t>(r) * batch + b) * kHkv + h]->view());
        }
        kc::SearchAttendProblem& p = probs[b];
        p.attend.pool = pool.p;
        p.attend.kv_dtype = DType::kBF16;
        p.attend.q_heads = kHq;
        p.attend.kv_heads = kHkv;
        p.attend.head_dim = kD;
        p.attend.scale = scale;
        p.attend.q = qs[r]->as<uint8_t>() + size_t{b} * kHq * kD * 2;
        p.attend.q_dtype = DType::kBF16;
        p.attend.out = out.as<uint8_t>() + size_t{b} * kHq * kD * 2;
        p.attend.out_dtype = DType::kBF16;
        p.attend.lse = lse.as<float>() + b * kHq;
        p.trees = views[r * batch + b].data();
        p.chunk_block = ss[b].block_d->as<uint64_t>();
        p.params.budget_tokens = budget;
        p.params.skip_tokens_below = kSink;
        p.sink_tokens = kSink;
        p.recent_from = ss[b].start.back() + ss[b].tokens.back();
        p.tail = {ss[b].tail_off, kTailCap, 0, kTail};
      }
      if (r == 0) probs0 = probs;
      const auto t0 = std::chrono::steady_clock::now();
      SK(kc::PlanSearchAttend(probs.data(), batch, kc::AttendPlanOptions{}, &plans[r]));
      const auto t1 = std::chrono::steady_clock::now();
      if (r == 0) plan_us = std::chrono::duration<double, std::micro>(t1 - t0).count();
      wss.emplace_back(new DeviceBuffer(plans[r].workspace_bytes));
      // On `s`, in order with the upload: a plain cudaMemset runs on the legacy stream, which
      // the non-blocking `s` does not wait for, and could zero a plan image already uploaded.
      CK(cudaMemsetAsync(wss[r]->p, 0, plans[r].workspace_bytes, s));
      SK(kc::UploadSearchAttendPlan(plans[r], wss[r]->p, s));
    }
    // Every stream: the queries' cudaMemcpy from pageable memory may return before its copy
    // lands, and the graphs below run on `s`.
    CK(cudaDeviceSynchronize());
    const double us_search = TimeGraph(s, Launches(R), replays, [&](int i) {
      SK(kc::LaunchTreeSearch(plans[i % R], wss[i % R]->p, s));
    });
    const double us_both = TimeGraph(s, Launches(R), replays, [&](int i) {
      SK(kc::LaunchSearchAttend(plans[i % R], wss[i % R]->p, s));
    });
    // A/B in the same run: the one-block search (cluster size 1), as before clusters.
    const uint32_t cluster = kc::TreeSearchClusterSize(plans[0]);
    for (auto& p : plans) p.cluster_size = 1;
    const double us_search_1block = TimeGraph(s, Launches(R), replays, [&](int i) {
      SK(kc::LaunchTreeSearch(plans[i % R], wss[i % R]->p, s));
    });
    for (auto& p : plans) p.cluster_size = 0;
    SK(kc::LaunchSearchAttend(plans[0], wss[0]->p, s));
    CK(cudaStreamSynchronize(s));
    // Read back the search of rotation 0 and check it against the CPU's SearchBudget.
    const kc::SearchAttendPlan& pl = plans[0];
    const uint32_t T = pl.num_tasks;
    std::vector<kc::SearchTaskResult> res(T);
    std::vector<uint32_t> sel(size_t{T} * pl.max_selected);
    auto* w8 = wss[0]->as<uint8_t>();
    CK(cudaMemcpy(res.data(), w8 + pl.results_off, T * sizeof(res[0]), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(sel.data(), w8 + pl.selected_off, sel.size() * 4, cudaMemcpyDeviceToHost));
    uint32_t agree = 0, failed = 0, rounds_max = 0;
    double phase[10] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    double nodes = 0, attended = 0, overlap = 0, cpu_us = 0;
    std::vector<RefSegment> segs;
    std::vector<uint32_t> seg_begin;
    auto* base = pool.as<uint8_t>();
    for (uint32_t b = 0; b < batch; ++b) {
      for (uint32_t h = 0; h < kHkv; ++h) {
        const uint32_t t = b * kHkv + h;
        failed += res[t].status != 0;
        rounds_max = std::max(rounds_max, res[t].rounds);
        for (int i = 0; i < 8; ++i) phase[i] += res[t].phase_ns[i] * 1e-3;
        for (int i = 0; i < 2; ++i) phase[8 + i] += res[t].score_ns[i] * 1e-3;
        nodes += res[t].nodes_scored;
        attended += res[t].attended_tokens;
        std::vector<float> qf(size_t{kHq / kHkv} * kD);
        for (size_t i = 0; i < qf.size(); ++i) {
          qf[i] = BF16ToFloat(q_h[0][(size_t{b} * kHq + h * (kHq / kHkv)) * kD + i]);
        }
        index::BudgetSearchOptions o;
        o.skip_tokens_below = kSink;
        const auto c0 = std::chrono::steady_clock::now();
        auto cpu = ss[b].trees[h].SearchBudget(qf, budget, o);
        cpu_us += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - c0).count();
        SK(cpu.status());
        std::vector<uint32_t> a = cpu->chunks;
        std::vector<uint32_t> g(sel.begin() + size_t{t} * pl.max_selected,
                                sel.begin() + size_t{t} * pl.max_selected + res[t].num_selected);
        std::sort(a.begin(), a.end());
        std::sort(g.begin(), g.end());
        agree += a == g;
        std::vector<uint32_t> both;
        std::set_intersection(a.begin(), a.end(), g.begin(), g.end(), std::back_inserter(both));
        overlap += a.empty() ? 1.0 : static_cast<double>(both.size()) / a.size();
        // Reference segments: sinks (chunk 0 is 8..24 tokens; its first 16 or fewer), the
        // GPU's selection, the tail (recent window 0).
        seg_begin.push_back(static_cast<uint32_t>(segs.size()));
        const SearchSession& se = ss[b];
        std::set<uint32_t> gs(g.begin(), g.end());
        for (uint32_t c = 0; c < se.tokens.size() && se.start[c] < kSink; ++c) {
          const uint32_t len = gs.count(c) ? se.tokens[c]
                                           : static_cast<uint32_t>(std::min<uint64_t>(se.tokens[c], kSink - se.start[c]));
          const uint64_t k = se.block[c] + uint64_t{h} * se.tokens[c] * kD;
          segs.push_back({base + k * 2, base + (k + uint64_t{kHkv} * se.tokens[c] * kD) * 2, len, 0});
          gs.erase(c);
        }
        for (uint32_t c : gs) {
          const uint64_t k = se.block[c] + uint64_t{h} * se.tokens[c] * kD;
          segs.push_back({base + k * 2, base + (k + uint64_t{kHkv} * se.tokens[c] * kD) * 2, se.tokens[c], 0});
        }
        const uint64_t k = se.tail_off + uint64_t{h} * kTailCap * kD;
        segs.push_back({base + k * 2, base + (k + uint64_t{kHkv} * kTailCap * kD) * 2, kTail, 0});
      }
    }
    seg_begin.push_back(static_cast<uint32_t>(segs.size()));
    const double err = ErrorAgainstReference(segs, seg_begin, batch, qs[0]->p, scale, out.p);
    const double tasks = static_cast<double>(T);
    const double search_bytes = nodes * (kD * 4 + 8);
    const double attn_bytes = attended * kD * 2 * 2 + 2.0 * q_elems * 2 + batch * kHq * 4.0;
    auto r1 = Row(ctx, batch, budget, "kvmem_search", us_search, search_bytes,
                  1.0 - agree / tasks, copy_gbps);
    auto r2 = Row(ctx, batch, budget, "kvmem_search_sparse", us_both, search_bytes + attn_bytes,
                  err, copy_gbps);
    for (auto* r : {&r1, &r2}) {
      (*r)["rotation"] = R;
      (*r)["cluster_size"] = cluster;
      (*r)["attn_cluster"] = pl.attend_cluster;
      (*r)["blocks"] = pl.num_items;
      (*r)["search_us_cluster1"] = us_search_1block;
      (*r)["cpu_agreement"] = agree / tasks;
      (*r)["cpu_overlap"] = overlap / tasks;
      (*r)["failed_heads"] = failed;
      (*r)["rounds_max"] = rounds_max;
      (*r)["nodes_scored_per_head"] = nodes / tasks;
      (*r)["tokens_per_head"] = attended / tasks;
      (*r)["plan_us"] = plan_us;
      (*r)["cpu_search_us_per_layer_1thread"] = cpu_us;
      (*r)["tree_build_s"] = build_s;
      // The kernel times its phases only in the traced build (KVMEM_SEARCH_TRACE=1).
      if (std::any_of(std::begin(phase), std::end(phase), [](double x) { return x > 0; })) {
        (*r)["search_phase_us_mean"] = {{"nodes", phase[0] / tasks},      {"leaves", phase[1] / tasks},
                                        {"rounds", phase[2] / tasks},     {"runs", phase[3] / tasks},
                                        {"leaf_select", phase[4] / tasks},  {"round_score", phase[5] / tasks},
                                        {"round_sort", phase[6] / tasks}, {"round_scan", phase[7] / tasks},
                                        {"score_lookup", phase[8] / tasks}, {"score_rows", phase[9] / tasks}};
      }
    }
    r1["max_rel_err_meaning"] = "fraction of KV heads whose selection differs from CPU SearchBudget";
    rows.push_back(r1);
    rows.push_back(r2);
    std::vector<uint8_t> out_graph(size_t{batch} * kHq * kD * 2);  // rotation 0's, from the graph-timed kernels
    CK(cudaMemcpy(out_graph.data(), out.p, out_graph.size(), cudaMemcpyDeviceToHost));
    rows.push_back(SingleShot(s, probs0, out_graph, ctx, budget, search_bytes + attn_bytes, copy_gbps));
  }
  return rows;
}

int Main(int argc, char** argv) {
  const Args args = ParseArgs(argc, argv);
  g_sweep = args.sweep;
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
      if (!args.search) continue;
      for (auto& r : BenchSearch(s, ctx, batch, args.budgets, args.replays, copy_gbps, rng)) {
        std::printf("%-19s ctx %6u batch %2u budget %4u  %9.2f us  agree %.3f  rounds %u  "
                    "nodes/head %.0f  err %.2e  phases %s\n",
                    r["method"].get<std::string>().c_str(), ctx, batch,
                    r["budget"].get<uint32_t>(), r["us_per_layer"].get<double>(),
                    r.value("cpu_agreement", -1.0), r.value("rounds_max", 0u),
                    r.value("nodes_scored_per_head", 0.0), r["max_rel_err"].get<double>(),
                    r.contains("search_phase_us_mean") ? r["search_phase_us_mean"].dump().c_str() : "-");
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
