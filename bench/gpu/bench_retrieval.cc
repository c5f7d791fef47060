// kvmem-bench-retrieval: one decode layer of mode retrieval_heads on the GPU (LycheeDecode
// hybrid heads), Llama-3-8B-like shapes (32 query heads, 8 KV heads, D = 128, bf16 K/V in
// daemon-like chunk blocks of 8..24 tokens), balanced against unbalanced splits in the same run.
//
//   kvmem-bench-retrieval --json FILE [--contexts 32768,131072] [--batches 1,8]
//                         [--retrieval 1,2] [--budget 4096] [--block 64] [--replays 15]
//                         [--machine NAME] [--commit SHA]
//
// Per layer and session: `retrieval` of the 8 KV heads are retrieval heads. They score every
// block of `block` tokens past the 16 sinks with their group's mean query
// (kernels::cuda::PooledBlockScores, one launch per session, as Session::
// ScanRetrievalHeadsOnDevice) and attend the whole context; the sparse heads attend sinks + the
// budget / block best blocks of a retrieval head (top-k of the real scores) + a 40-token tail.
// All sessions and heads attend in ONE launch. Rows (method):
//   score             the block-score launches of the layer
//   attend_balanced   the span-attention launch as the daemon plans it: splits by tokens, so a
//                     retrieval head gets proportionally more splits than a sparse head
//   attend_fixed      the baseline: the same launch with every (session, head) cut into the same
//                     number of splits (AttendPlanOptions::splits_per_task = the planner's block
//                     target / tasks: the same thread blocks as balanced, but a retrieval head's
//                     splits are context / budget times longer)
//   attend_all_dense  every head attends the whole context (what full attention costs here)
// Timing: CUDA graph of the launches over R copies of the data (the working set exceeds the L2
// several times), median over replays, per layer. max_rel_err: worst (session, query head)
// ‖out − ref‖/‖ref‖ against a float64 GPU reference over the same spans.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/gpu/bench_args.h"
#include "bench/gpu/bench_kernels.h"
#include "kernels/attention.h"
#include "kernels/cuda_ops.h"
#include "kernels/detail/attention_plan_layout.h"
#include "kernels/index_ops.h"

namespace kvmem::bench {
namespace {

namespace kc = kvmem::kernels::cuda;
using kernels::AttendProblem;
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

constexpr uint32_t kHq = 32, kHkv = 8, kD = 128, kG = kHq / kHkv;
constexpr uint32_t kChunkCap = 24, kSink = 16, kTailCap = 64, kTail = 40;
constexpr uint64_t kChunkElems = 2ull * kHkv * kChunkCap * kD;
constexpr uint64_t kTailElems = 2ull * kHkv * kTailCap * kD;
constexpr size_t kRotateBytes = 256ull << 20;

struct Args {
  std::string json;
  std::vector<uint32_t> contexts{32768, 131072};
  std::vector<uint32_t> batches{1, 8};
  std::vector<uint32_t> retrieval{1, 2};
  uint32_t budget = 4096;
  uint32_t block = 64;
  int replays = 15;
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
    else if (k == "--retrieval")
      a.retrieval = ParseList(next());
    else if (k == "--budget")
      a.budget = static_cast<uint32_t>(std::stoul(next()));
    else if (k == "--block")
      a.block = static_cast<uint32_t>(std::stoul(next()));
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

// Median µs per replay of a graph capturing fn() (which enqueues a whole layer's work).
double TimeGraph(cudaStream_t s, int replays, const std::function<void()>& fn) {
  fn();
  CK(cudaStreamSynchronize(s));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  fn();
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
  return ms[ms.size() / 2] * 1000.0;
}

// One session's layer: chunk blocks (the first holds exactly the sinks) and a tail block.
struct Layout {
  std::vector<uint64_t> chunk_off;
  std::vector<uint32_t> chunk_len;
  std::vector<uint32_t> chunk_start;  // context position of the chunk's first token
  uint64_t tail_off = 0;
  uint32_t sealed = 0;
};

struct Copy {  // one rotation copy: `batch` sessions' layers, q and outputs
  std::vector<Layout> sessions;
  std::unique_ptr<DeviceBuffer> pool, q, qf, out, lse;
  // Block scan inputs per session (device): spans past the sinks, prefix, heads, scores.
  std::vector<std::unique_ptr<DeviceBuffer>> scan_spans, scan_prefix, scan_scores;
  std::vector<uint32_t> num_spans, total;
  // Attention spans per session and per mode.
  std::vector<std::vector<KVSpan>> spans, dense_spans;
  std::vector<std::vector<uint32_t>> head_begin, dense_begin;
};

Copy BuildCopy(uint32_t ctx, uint32_t batch, uint64_t seed, std::mt19937_64& rng) {
  Copy c;
  uint64_t elems = 0;
  for (uint32_t b = 0; b < batch; ++b) {
    Layout s;
    uint32_t tokens = 0;
    while (tokens + kTail < ctx) {
      const uint32_t len = s.chunk_len.empty() ? kSink : 8 + static_cast<uint32_t>(rng() % 17);
      s.chunk_off.push_back(elems);
      s.chunk_start.push_back(tokens);
      s.chunk_len.push_back(std::min(len, ctx - kTail - tokens));
      tokens += s.chunk_len.back();
      elems += kChunkElems;
    }
    s.sealed = tokens;
    s.tail_off = elems;
    elems += kTailElems;
    c.sessions.push_back(std::move(s));
  }
  c.pool.reset(new DeviceBuffer(elems * 2));
  FillRandomBF16(c.pool->p, elems, seed, 1.f);
  const size_t q_elems = size_t{batch} * kHq * kD;
  c.q.reset(new DeviceBuffer(q_elems * 2));
  FillRandomBF16(c.q->p, q_elems, seed + 1, 1.f);
  // The fp32 copy the block scan reads (the daemon converts q to fp32 on the host).
  std::vector<uint16_t> qh(q_elems);
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpy(qh.data(), c.q->p, q_elems * 2, cudaMemcpyDeviceToHost));
  std::vector<float> qf(q_elems);
  for (size_t i = 0; i < q_elems; ++i) {
    const uint32_t u = uint32_t{qh[i]} << 16;
    std::memcpy(&qf[i], &u, 4);
  }
  c.qf.reset(new DeviceBuffer(q_elems * 4));
  CK(cudaMemcpy(c.qf->p, qf.data(), q_elems * 4, cudaMemcpyHostToDevice));
  c.out.reset(new DeviceBuffer(q_elems * 2));
  c.lse.reset(new DeviceBuffer(size_t{batch} * kHq * 4));
  return c;
}

std::vector<uint32_t> RetrievalHeads(uint32_t n) {
  std::vector<uint32_t> h;
  for (uint32_t i = 0; i < n; ++i) h.push_back(i * kHkv / n);
  return h;
}

nlohmann::json Row(uint32_t ctx, uint32_t batch, uint32_t nret, const std::string& method,
                   double us) {
  nlohmann::json r;
  r["context"] = ctx;
  r["batch"] = batch;
  r["retrieval_heads"] = nret;
  r["method"] = method;
  r["us_per_layer"] = us;
  return r;
}

// The plan's shape: thread blocks, longest split of a retrieval head / of a sparse head.
void PlanShape(const kc::AttendPlan& plan, const std::vector<uint32_t>& ret, nlohmann::json* row) {
  const auto* items = reinterpret_cast<const kernels::detail::AttendItemDesc*>(
      plan.image.data() + plan.items_off);
  uint32_t ret_longest = 0, sparse_longest = 0, ret_splits = 0, sparse_splits = 0;
  for (uint32_t i = 0; i < plan.num_items; ++i) {
    const uint32_t head = items[i].task % kHkv;
    const bool is_ret = std::find(ret.begin(), ret.end(), head) != ret.end();
    uint32_t& longest = is_ret ? ret_longest : sparse_longest;
    longest = std::max(longest, items[i].tokens);
    ++(is_ret ? ret_splits : sparse_splits);
  }
  (*row)["thread_blocks"] = plan.num_items;
  (*row)["retrieval_head_longest_split"] = ret_longest;
  (*row)["sparse_head_longest_split"] = sparse_longest;
  (*row)["retrieval_head_splits"] = ret_splits;
  (*row)["sparse_head_splits"] = sparse_splits;
  (*row)["tokens"] = plan.total_tokens;
}

std::vector<nlohmann::json> BenchConfig(cudaStream_t st, const Args& args, uint32_t ctx,
                                        uint32_t batch, uint32_t nret, std::mt19937_64& rng) {
  const std::vector<uint32_t> ret = RetrievalHeads(nret);
  const size_t copy_bytes = size_t{batch} * ctx * kHkv * kD * 2 * 2;
  const int R = static_cast<int>(std::min<size_t>(8, (kRotateBytes + copy_bytes - 1) / copy_bytes));
  std::vector<Copy> copies;
  for (int r = 0; r < R; ++r) copies.push_back(BuildCopy(ctx, batch, 1000 + 17 * r + ctx + batch, rng));
  DeviceBuffer heads_d(ret.size() * 4);
  CK(cudaMemcpy(heads_d.p, ret.data(), ret.size() * 4, cudaMemcpyHostToDevice));
  const uint32_t B = args.block, k = std::max<uint32_t>(1, args.budget / B);

  // Block-scan views, one per (copy, session).
  std::vector<std::vector<kernels::PooledBlockScoresView>> views(R);
  for (int r = 0; r < R; ++r) {
    Copy& c = copies[r];
    for (uint32_t b = 0; b < batch; ++b) {
      const Layout& s = c.sessions[b];
      std::vector<KVSpan> spans;
      std::vector<uint32_t> prefix{0};
      for (size_t i = 1; i < s.chunk_off.size(); ++i) {  // chunk 0 = the sinks
        spans.push_back({s.chunk_off[i], kChunkCap, 0, s.chunk_len[i]});
        prefix.push_back(prefix.back() + s.chunk_len[i]);
      }
      const uint32_t total = prefix.back();
      const uint32_t nb = kernels::PooledNumBlocks(total, B);
      c.scan_spans.emplace_back(new DeviceBuffer(spans.size() * sizeof(KVSpan)));
      c.scan_prefix.emplace_back(new DeviceBuffer(prefix.size() * 4));
      c.scan_scores.emplace_back(new DeviceBuffer(size_t{nb} * ret.size() * 4));
      CK(cudaMemcpy(c.scan_spans.back()->p, spans.data(), spans.size() * sizeof(KVSpan), cudaMemcpyHostToDevice));
      CK(cudaMemcpy(c.scan_prefix.back()->p, prefix.data(), prefix.size() * 4, cudaMemcpyHostToDevice));
      kernels::PooledBlockScoresView v{};
      v.pool = c.pool->p;
      v.kv_dtype = DType::kBF16;
      v.kv_heads = kHkv;
      v.q_heads = kHq;
      v.head_dim = kD;
      v.q = c.qf->as<float>() + size_t{b} * kHq * kD;
      v.spans = c.scan_spans.back()->as<KVSpan>();
      v.span_prefix = c.scan_prefix.back()->as<uint32_t>();
      v.num_spans = static_cast<uint32_t>(spans.size());
      v.total_tokens = total;
      v.block_tokens = B;
      v.mode = kernels::BlockPool::kMax;
      v.heads = heads_d.as<uint32_t>();
      v.num_heads = static_cast<uint32_t>(ret.size());
      v.scores = c.scan_scores.back()->as<float>();
      views[r].push_back(v);
      c.total.push_back(total);
    }
  }
  auto score_layer = [&](int r) {
    for (const auto& v : views[r]) SK(kc::PooledBlockScores(v, st));
  };
  // Real scores -> top-k blocks (host, as the daemon's rule) -> per-head spans.
  for (int r = 0; r < R; ++r) {
    score_layer(r);
    CK(cudaStreamSynchronize(st));
    Copy& c = copies[r];
    for (uint32_t b = 0; b < batch; ++b) {
      const Layout& s = c.sessions[b];
      const uint32_t nb = kernels::PooledNumBlocks(c.total[b], B);
      std::vector<float> scores(size_t{nb} * ret.size());
      CK(cudaMemcpy(scores.data(), c.scan_scores[b]->p, scores.size() * 4, cudaMemcpyDeviceToHost));
      const uint32_t kk = std::min(k, nb);
      std::vector<uint32_t> top(ret.size() * kk);
      kernels::TopKCpu({scores.data(), static_cast<uint32_t>(ret.size()), nb, kk, top.data(), nullptr});
      auto add_range = [&](uint32_t a, uint32_t e, std::vector<KVSpan>* out) {
        e = std::min(e, s.sealed);
        auto it = std::upper_bound(s.chunk_start.begin(), s.chunk_start.end(), a);
        for (size_t ci = static_cast<size_t>(it - s.chunk_start.begin()) - 1; ci < s.chunk_off.size() && a < e; ++ci) {
          const uint32_t end = std::min(e, s.chunk_start[ci] + s.chunk_len[ci]);
          out->push_back({s.chunk_off[ci], kChunkCap, a - s.chunk_start[ci], end - s.chunk_start[ci]});
          a = end;
        }
      };
      std::vector<KVSpan> spans, dense;
      std::vector<uint32_t> hb, db;
      for (uint32_t h = 0; h < kHkv; ++h) {
        hb.push_back(static_cast<uint32_t>(spans.size()));
        db.push_back(static_cast<uint32_t>(dense.size()));
        for (size_t ci = 0; ci < s.chunk_off.size(); ++ci) dense.push_back({s.chunk_off[ci], kChunkCap, 0, s.chunk_len[ci]});
        dense.push_back({s.tail_off, kTailCap, 0, kTail});
        const auto pos = std::find(ret.begin(), ret.end(), h);
        if (pos != ret.end()) {
          spans.insert(spans.end(), dense.end() - (s.chunk_off.size() + 1), dense.end());
          continue;
        }
        add_range(0, kSink, &spans);
        const size_t src = h % ret.size();  // reuse a retrieval head's blocks
        std::vector<uint32_t> blocks(top.begin() + src * kk, top.begin() + (src + 1) * kk);
        std::sort(blocks.begin(), blocks.end());
        for (uint32_t j : blocks) add_range(kSink + j * B, kSink + (j + 1) * B, &spans);
        spans.push_back({s.tail_off, kTailCap, 0, kTail});
      }
      hb.push_back(static_cast<uint32_t>(spans.size()));
      db.push_back(static_cast<uint32_t>(dense.size()));
      c.spans.push_back(std::move(spans));
      c.head_begin.push_back(std::move(hb));
      c.dense_spans.push_back(std::move(dense));
      c.dense_begin.push_back(std::move(db));
    }
  }

  std::vector<nlohmann::json> rows;
  const double score_us = TimeGraph(st, args.replays, [&] {
                            for (int r = 0; r < R; ++r) score_layer(r);
                          }) / R;
  {
    auto row = Row(ctx, batch, nret, "score", score_us);
    row["launches_per_layer"] = batch;
    row["key_bytes"] = static_cast<double>(batch) * nret * copies[0].total[0] * kD * 2;
    rows.push_back(row);
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(kD));
  const uint32_t tasks = batch * kHkv;
  const uint32_t resident = kc::AttendResidentBlocks(kD, kG, DType::kBF16);
  const uint32_t target = resident == 0 ? 528 : std::max(resident / 2, resident - std::min(resident, tasks));
  struct Mode {
    const char* name;
    bool dense;
    uint32_t splits_per_task;
  };
  const Mode modes[] = {{"attend_balanced", false, 0},
                        {"attend_fixed", false, std::max<uint32_t>(1, target / tasks)},
                        {"attend_all_dense", true, 0}};
  double balanced_us = 0, fixed_us = 0;
  for (const Mode& m : modes) {
    std::vector<kc::AttendPlan> plans(R);
    std::vector<std::unique_ptr<DeviceBuffer>> ws;
    for (int r = 0; r < R; ++r) {
      Copy& c = copies[r];
      std::vector<AttendProblem> probs(batch);
      for (uint32_t b = 0; b < batch; ++b) {
        AttendProblem p{};
        p.pool = c.pool->p;
        p.kv_dtype = DType::kBF16;
        p.q_heads = kHq;
        p.kv_heads = kHkv;
        p.head_dim = kD;
        p.scale = scale;
        p.q = c.q->as<uint8_t>() + size_t{b} * kHq * kD * 2;
        p.q_dtype = DType::kBF16;
        const auto& sp = m.dense ? c.dense_spans[b] : c.spans[b];
        p.spans = sp.data();
        p.head_span_begin = (m.dense ? c.dense_begin[b] : c.head_begin[b]).data();
        p.num_spans = static_cast<uint32_t>(sp.size());
        p.out = c.out->as<uint8_t>() + size_t{b} * kHq * kD * 2;
        p.out_dtype = DType::kBF16;
        p.lse = c.lse->as<float>() + b * kHq;
        probs[b] = p;
      }
      kc::AttendPlanOptions opt;
      opt.splits_per_task = m.splits_per_task;
      SK(kc::PlanAttend(probs.data(), batch, opt, &plans[r]));
      ws.emplace_back(new DeviceBuffer(plans[r].workspace_bytes));
      // On `st`, in order with the upload (a plain cudaMemset runs on the legacy stream, which
      // the non-blocking `st` does not wait for).
      CK(cudaMemsetAsync(ws.back()->p, 0, plans[r].workspace_bytes, st));
      SK(kc::UploadAttendPlan(plans[r], ws.back()->p, st));
    }
    CK(cudaDeviceSynchronize());  // and the legacy stream's copies before the timed launches
    const double us = TimeGraph(st, args.replays, [&] {
                        for (int r = 0; r < R; ++r) SK(kc::LaunchAttend(plans[r], ws[r]->p, st));
                      }) / R;
    auto row = Row(ctx, batch, nret, m.name, us);
    PlanShape(plans[0], ret, &row);
    if (m.splits_per_task) row["splits_per_task"] = m.splits_per_task;
    // Error of copy 0 against float64 over the same spans.
    SK(kc::LaunchAttend(plans[0], ws[0]->p, st));
    CK(cudaStreamSynchronize(st));
    const Copy& c = copies[0];
    std::vector<RefSegment> segs;
    std::vector<uint32_t> begin;
    const auto* base = c.pool->as<uint8_t>();
    for (uint32_t b = 0; b < batch; ++b) {
      const auto& sp = m.dense ? c.dense_spans[b] : c.spans[b];
      const auto& hb = m.dense ? c.dense_begin[b] : c.head_begin[b];
      for (uint32_t h = 0; h < kHkv; ++h) {
        begin.push_back(static_cast<uint32_t>(segs.size()));
        for (uint32_t i = hb[h]; i < hb[h + 1]; ++i) {
          const KVSpan& s = sp[i];
          const uint64_t k_el = s.offset + (uint64_t{h} * s.stride_tokens + s.begin) * kD;
          const uint64_t v_el = k_el + uint64_t{kHkv} * s.stride_tokens * kD;
          segs.push_back({base + k_el * 2, base + v_el * 2, s.end - s.begin, 0});
        }
      }
    }
    begin.push_back(static_cast<uint32_t>(segs.size()));
    DeviceBuffer segs_d(segs.size() * sizeof(RefSegment)), begin_d(begin.size() * 4),
        ref(size_t{batch} * kHq * kD * sizeof(double));
    CK(cudaMemcpy(segs_d.p, segs.data(), segs.size() * sizeof(RefSegment), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(begin_d.p, begin.data(), begin.size() * 4, cudaMemcpyHostToDevice));
    ReferenceAttend(segs_d.as<RefSegment>(), begin_d.as<uint32_t>(), batch, kHq, kHkv, c.q->p, scale,
                    ref.as<double>());
    CK(cudaGetLastError());
    row["max_rel_err"] = MaxRelErrBF16(c.out->p, ref.as<double>(), batch * kHq);
    row["rotation"] = R;
    rows.push_back(row);
    if (std::string(m.name) == "attend_balanced") balanced_us = us;
    if (std::string(m.name) == "attend_fixed") fixed_us = us;
  }
  auto lb = Row(ctx, batch, nret, "layer_balanced", score_us + balanced_us);
  lb["note"] = "score + attend_balanced (device time; the daemon adds the scores' copy back and the host rule)";
  rows.push_back(lb);
  auto lf = Row(ctx, batch, nret, "layer_fixed", score_us + fixed_us);
  lf["note"] = "score + attend_fixed";
  rows.push_back(lf);
  return rows;
}

int Main(int argc, char** argv) {
  const Args args = ParseArgs(argc, argv);
  int dev = 0;
  if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  std::mt19937_64 rng(42);
  nlohmann::json out;
  out["benchmark"] = "kvmem-bench-retrieval";
  out["machine"] = args.machine.empty() ? std::string(prop.name) : args.machine;
  out["device"] = prop.name;
  out["sms"] = prop.multiProcessorCount;
  out["commit"] = args.commit;
  out["params"] = {{"q_heads", kHq}, {"kv_heads", kHkv}, {"head_dim", kD}, {"dtype", "bf16"},
                   {"budget_tokens", args.budget}, {"block_tokens", args.block},
                   {"sinks", kSink}, {"tail", kTail}, {"chunk_tokens", "8..24"},
                   {"replays", args.replays}};
  nlohmann::json rows = nlohmann::json::array();
  for (uint32_t ctx : args.contexts)
    for (uint32_t batch : args.batches)
      for (uint32_t nret : args.retrieval) {
        for (auto& r : BenchConfig(st, args, ctx, batch, nret, rng)) rows.push_back(r);
        CK(cudaDeviceSynchronize());
      }
  out["rows"] = rows;
  if (!args.json.empty()) {
    std::ofstream f(args.json);
    f << out.dump(2) << "\n";
  }
  std::printf("%-8s %-5s %-3s %-18s %10s %8s %10s %10s %9s\n", "context", "batch", "ret", "method",
              "us/layer", "blocks", "ret_split", "sp_split", "rel_err");
  for (const auto& r : rows) {
    std::printf("%-8u %-5u %-3u %-18s %10.2f %8s %10s %10s %9s\n", r["context"].get<uint32_t>(),
                r["batch"].get<uint32_t>(), r["retrieval_heads"].get<uint32_t>(),
                r["method"].get<std::string>().c_str(), r["us_per_layer"].get<double>(),
                r.contains("thread_blocks") ? std::to_string(r["thread_blocks"].get<uint32_t>()).c_str() : "-",
                r.contains("retrieval_head_longest_split")
                    ? std::to_string(r["retrieval_head_longest_split"].get<uint32_t>()).c_str()
                    : "-",
                r.contains("sparse_head_longest_split")
                    ? std::to_string(r["sparse_head_longest_split"].get<uint32_t>()).c_str()
                    : "-",
                r.contains("max_rel_err") ? std::to_string(r["max_rel_err"].get<double>()).substr(0, 8).c_str()
                                          : "-");
  }
  CK(cudaStreamDestroy(st));
  return 0;
}

}  // namespace
}  // namespace kvmem::bench

int main(int argc, char** argv) { return kvmem::bench::Main(argc, argv); }
