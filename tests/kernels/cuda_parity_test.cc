// CUDA kernels against their CPU references on the same views: fresh random inputs each run,
// poisoned outputs with guard bytes on both sides, tolerance by output dtype. Skips (with a
// message) when no GPU is visible, so the suite builds and passes on CI machines without one.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "kernels/attention.h"
#include "kernels/cuda_ops.h"
#include "kernels/cuda_test_util.h"
#include "kernels/detail/attention_plan_layout.h"
#include "kernels/index_ops.h"
#include "testing/seed.h"

namespace kvmem::kernels {
namespace {

namespace kc = kvmem::kernels::cuda;


constexpr size_t kGuard = 256;
constexpr uint8_t kGuardByte = 0xA5;
constexpr uint8_t kPoisonByte = 0xFF;  // NaN in fp32/fp16/bf16

// Device buffer with guard bytes on both sides; outputs are poisoned before each launch.
class GuardedBuffer {
 public:
  explicit GuardedBuffer(size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&base_, bytes + 2 * kGuard) != cudaSuccess) base_ = nullptr;
    if (base_) {
      cudaMemset(base_, kGuardByte, bytes + 2 * kGuard);
      cudaMemset(data(), kPoisonByte, bytes);
    }
  }
  ~GuardedBuffer() { cudaFree(base_); }
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;

  bool ok() const { return base_ != nullptr; }
  void* data() const { return static_cast<uint8_t*>(base_) + kGuard; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data());
  }
  size_t bytes() const { return bytes_; }

  void Upload(const void* src) { cudaMemcpy(data(), src, bytes_, cudaMemcpyHostToDevice); }
  void Poison() { cudaMemset(data(), kPoisonByte, bytes_); }
  // Copies the payload out and checks both guards.
  ::testing::AssertionResult Download(void* dst) const {
    std::vector<uint8_t> all(bytes_ + 2 * kGuard);
    if (cudaMemcpy(all.data(), base_, all.size(), cudaMemcpyDeviceToHost) != cudaSuccess) {
      return ::testing::AssertionFailure() << "download failed";
    }
    for (size_t i = 0; i < kGuard; ++i) {
      if (all[i] != kGuardByte || all[kGuard + bytes_ + i] != kGuardByte) {
        return ::testing::AssertionFailure() << "guard byte overwritten at " << i;
      }
    }
    std::memcpy(dst, all.data() + kGuard, bytes_);
    return ::testing::AssertionSuccess();
  }

 private:
  void* base_ = nullptr;
  size_t bytes_;
};

std::mt19937_64 FreshRng() { return ::kvmem::testing::SeededRng(); }

double Tolerance(DType out) {
  switch (out) {
    case DType::kF32:
      return 2e-5;
    case DType::kF16:
      return 2e-3;
    case DType::kBF16:
      return 1e-2;
  }
  return 0;
}

std::vector<uint8_t> RandomTensor(std::mt19937_64& rng, DType t, size_t n, float scale) {
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<uint8_t> v(n * DTypeSize(t));
  for (size_t i = 0; i < n; ++i) StoreFromFloat(v.data(), t, i, nd(rng));
  return v;
}

// ‖a − b‖ / ‖b‖ over n elements of dtype t; NaN in a fails.
double RelErr(const void* a, const void* b, DType t, size_t n, bool* nan) {
  double e2 = 0, r2 = 0;
  *nan = false;
  for (size_t i = 0; i < n; ++i) {
    const double x = LoadAsFloat(a, t, i), y = LoadAsFloat(b, t, i);
    if (std::isnan(x)) *nan = true;
    e2 += (x - y) * (x - y);
    r2 += y * y;
  }
  return r2 > 0 ? std::sqrt(e2 / r2) : std::sqrt(e2);
}

// ---- Span attention --------------------------------------------------------------------------

struct AttnCase {
  DType kv, q, out;
  uint32_t hq, hkv, d;
  uint32_t problems;
  uint32_t min_split, max_split;  // small values force many splits and the merge path
  // Every head attends the same spans (head_span_begin nullptr, a dense layer): one problem's
  // heads then share one run table (PlanAttend's head-shared runs).
  bool all_heads = false;
};

class SpanAttendParity : public ::testing::TestWithParam<AttnCase> {};

std::string AttnName(const ::testing::TestParamInfo<AttnCase>& i) {
  const AttnCase& c = i.param;
  return std::string(DTypeName(c.kv)) + "_q" + std::string(DTypeName(c.q)) + "_o" +
         std::string(DTypeName(c.out)) + "_H" + std::to_string(c.hq) + "x" + std::to_string(c.hkv) +
         "_D" + std::to_string(c.d) + "_split" + std::to_string(c.min_split) +
         (c.all_heads ? "_allheads_" : "_") + std::to_string(i.index);
}

TEST_P(SpanAttendParity, MatchesAttendCpu) {
  SKIP_WITHOUT_GPU();
  const AttnCase c = GetParam();
  auto rng = FreshRng();
  const uint32_t D = c.d;

  // One pool: blocks of varied capacity, shared by all problems.
  std::vector<uint32_t> caps;
  std::vector<uint64_t> offs;
  uint64_t total = 0;
  for (int b = 0; b < 40; ++b) {
    const uint32_t cap = 8 + static_cast<uint32_t>(rng() % 57);  // 8..64
    caps.push_back(cap);
    offs.push_back(total);
    total += 2ull * c.hkv * cap * D;
  }
  const uint32_t tail_cap = 3000;  // one long block for spans that cross many splits
  caps.push_back(tail_cap);
  offs.push_back(total);
  total += 2ull * c.hkv * tail_cap * D;
  const auto pool_h = RandomTensor(rng, c.kv, total, 1.f);

  struct Host {
    std::vector<KVSpan> spans;
    std::vector<uint32_t> head_begin;
    std::vector<uint8_t> q;
  };
  std::vector<Host> hosts(c.problems);
  for (uint32_t pi = 0; pi < c.problems; ++pi) {
    Host& h = hosts[pi];
    for (uint32_t kh = 0; kh < c.hkv; ++kh) {
      h.head_begin.push_back(static_cast<uint32_t>(h.spans.size()));
      const uint32_t kind = static_cast<uint32_t>((rng() + kh) % 5);
      if (kind == 0 && kh == 1) continue;  // an empty head
      if (kind == 1) {                     // one long run
        const uint32_t a = static_cast<uint32_t>(rng() % 500);
        const uint32_t e = a + 1 + static_cast<uint32_t>(rng() % (tail_cap - a));
        h.spans.push_back({offs.back(), tail_cap, a, e});
        continue;
      }
      if (kind == 2) {  // many 1-token spans: exercises the runs-per-item cap
        for (int s = 0; s < 300; ++s) {
          const uint32_t b = static_cast<uint32_t>(rng() % 40);
          const uint32_t t = static_cast<uint32_t>(rng() % caps[b]);
          h.spans.push_back({offs[b], caps[b], t, t + 1});
        }
        continue;
      }
      const int n = 1 + static_cast<int>(rng() % 60);
      for (int s = 0; s < n; ++s) {  // chunk-like spans, some empty
        const uint32_t b = static_cast<uint32_t>(rng() % 40);
        const uint32_t a = static_cast<uint32_t>(rng() % caps[b]);
        const uint32_t e = a + static_cast<uint32_t>(rng() % (caps[b] - a + 1));
        h.spans.push_back({offs[b], caps[b], a, e});
      }
    }
    h.head_begin.push_back(static_cast<uint32_t>(h.spans.size()));
    if (c.all_heads) {  // every head all of the spans above: chunk-like, 1-token and long runs
      h.head_begin.clear();
      if (h.spans.empty()) h.spans.push_back({offs.back(), tail_cap, 0, tail_cap});
    }
    h.q = RandomTensor(rng, c.q, static_cast<size_t>(c.hq) * D, 1.f);
  }

  GuardedBuffer pool_d(pool_h.size());
  ASSERT_TRUE(pool_d.ok());
  pool_d.Upload(pool_h.data());
  const size_t qbytes = static_cast<size_t>(c.hq) * D * DTypeSize(c.q);
  const size_t obytes = static_cast<size_t>(c.hq) * D * DTypeSize(c.out);
  GuardedBuffer q_d(qbytes * c.problems), out_d(obytes * c.problems),
      lse_d(sizeof(float) * c.hq * c.problems);
  for (uint32_t pi = 0; pi < c.problems; ++pi) {
    CUDA_OK(cudaMemcpy(q_d.as<uint8_t>() + pi * qbytes, hosts[pi].q.data(), qbytes,
                       cudaMemcpyHostToDevice));
  }

  std::vector<AttendProblem> dev(c.problems), cpu(c.problems);
  std::vector<std::vector<uint8_t>> out_ref(c.problems, std::vector<uint8_t>(obytes));
  std::vector<std::vector<float>> lse_ref(c.problems, std::vector<float>(c.hq));
  for (uint32_t pi = 0; pi < c.problems; ++pi) {
    AttendProblem p{};
    p.kv_dtype = c.kv;
    p.q_heads = c.hq;
    p.kv_heads = c.hkv;
    p.head_dim = D;
    p.scale = 1.f / std::sqrt(static_cast<float>(D));
    p.q_dtype = c.q;
    p.spans = hosts[pi].spans.data();
    p.head_span_begin = c.all_heads ? nullptr : hosts[pi].head_begin.data();
    p.num_spans = static_cast<uint32_t>(hosts[pi].spans.size());
    p.out_dtype = c.out;
    AttendProblem d = p;
    d.pool = pool_d.data();
    d.q = q_d.as<uint8_t>() + pi * qbytes;
    d.out = out_d.as<uint8_t>() + pi * obytes;
    d.lse = lse_d.as<float>() + pi * c.hq;
    dev[pi] = d;
    p.pool = pool_h.data();
    p.q = hosts[pi].q.data();
    p.out = out_ref[pi].data();
    p.lse = lse_ref[pi].data();
    cpu[pi] = p;
  }
  AttendCpu(cpu.data(), c.problems);

  // Clusters of splits: the default (none), automatic, and forced (2: several clusters per task
  // where run tables overflow; 16: mostly empty splits).
  for (uint32_t cluster : {0u, kc::kAttendClusterAuto, 2u, 16u}) {
  SCOPED_TRACE("cluster option " + std::to_string(cluster));
  kc::AttendPlanOptions opt;
  opt.min_split_tokens = c.min_split;
  opt.max_split_tokens = c.max_split;
  opt.cluster = cluster;
  kc::AttendPlan plan;
  ST_OK(kc::PlanAttend(dev.data(), c.problems, opt, &plan));
  if (cluster > 1 && cluster != kc::kAttendClusterAuto) {
    EXPECT_EQ(plan.cluster_size, cluster);
  }
  GuardedBuffer ws(plan.workspace_bytes);
  ASSERT_TRUE(ws.ok());
  ST_OK(kc::UploadAttendPlan(plan, ws.data(), nullptr));

  std::vector<uint8_t> first;
  for (int rep = 0; rep < 2; ++rep) {  // the second launch checks the counters were reset
    out_d.Poison();
    lse_d.Poison();
    ST_OK(kc::LaunchAttend(plan, ws.data(), nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint8_t> out_h(obytes * c.problems);
    std::vector<float> lse_h(c.hq * c.problems);
    ASSERT_TRUE(out_d.Download(out_h.data()));
    ASSERT_TRUE(lse_d.Download(lse_h.data()));
    for (uint32_t pi = 0; pi < c.problems; ++pi) {
      bool nan = false;
      const double err =
          RelErr(out_h.data() + pi * obytes, out_ref[pi].data(), c.out, c.hq * D, &nan);
      EXPECT_FALSE(nan) << "problem " << pi << ": unwritten or NaN output";
      EXPECT_LT(err, Tolerance(c.out)) << "problem " << pi;
      for (uint32_t h = 0; h < c.hq; ++h) {
        const float got = lse_h[pi * c.hq + h], want = lse_ref[pi][h];
        if (std::isinf(want)) {
          EXPECT_TRUE(std::isinf(got) && got < 0) << "problem " << pi << " head " << h;
          for (uint32_t dd = 0; dd < D; ++dd) {
            EXPECT_EQ(LoadAsFloat(out_h.data() + pi * obytes, c.out, h * D + dd), 0.f);
          }
        } else {
          EXPECT_NEAR(got, want, 1e-4 * (1 + std::fabs(want))) << "problem " << pi << " head " << h;
        }
      }
    }
    if (rep == 0) {
      first = out_h;
    } else {
      EXPECT_EQ(first, out_h) << "second launch differs: counters not reset or a race";
    }
  }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SpanAttendParity,
    ::testing::Values(AttnCase{DType::kBF16, DType::kBF16, DType::kBF16, 32, 8, 128, 3, 128, 4096},
                      AttnCase{DType::kBF16, DType::kF32, DType::kF32, 32, 8, 128, 4, 32, 64},
                      AttnCase{DType::kF16, DType::kF16, DType::kF16, 16, 2, 128, 2, 32, 96},
                      AttnCase{DType::kBF16, DType::kF32, DType::kF32, 8, 8, 64, 3, 32, 128},
                      AttnCase{DType::kF16, DType::kF32, DType::kF32, 8, 4, 64, 2, 128, 4096},
                      AttnCase{DType::kBF16, DType::kBF16, DType::kF32, 16, 2, 128, 5, 64, 256},
                      AttnCase{DType::kBF16, DType::kBF16, DType::kBF16, 32, 8, 128, 1, 128, 4096,
                               true},
                      AttnCase{DType::kF16, DType::kF32, DType::kF32, 16, 2, 128, 1, 32, 96, true},
                      AttnCase{DType::kBF16, DType::kF32, DType::kF32, 8, 8, 64, 1, 32, 128, true},
                      AttnCase{DType::kF16, DType::kF16, DType::kF16, 32, 8, 128, 2, 64, 256,
                               true}),
    AttnName);

// ---- Dense attention --------------------------------------------------------------------------

struct DenseCase {
  DType kv, q, out;
  uint32_t batch, hq, hkv, d, cap;
  uint32_t min_split, max_split;
};

class DenseAttendParity : public ::testing::TestWithParam<DenseCase> {};

std::string DenseName(const ::testing::TestParamInfo<DenseCase>& i) {
  const DenseCase& c = i.param;
  return std::string(DTypeName(c.kv)) + "_q" + std::string(DTypeName(c.q)) + "_o" +
         std::string(DTypeName(c.out)) + "_B" + std::to_string(c.batch) + "_H" +
         std::to_string(c.hq) + "x" + std::to_string(c.hkv) + "_D" + std::to_string(c.d) + "_" +
         std::to_string(i.index);
}

TEST_P(DenseAttendParity, MatchesDenseAttendCpu) {
  SKIP_WITHOUT_GPU();
  const DenseCase c = GetParam();
  auto rng = FreshRng();
  const size_t kv_elems = static_cast<size_t>(c.batch) * c.hkv * c.cap * c.d;
  const auto k_h = RandomTensor(rng, c.kv, kv_elems, 1.f);
  const auto v_h = RandomTensor(rng, c.kv, kv_elems, 1.f);
  const auto q_h = RandomTensor(rng, c.q, static_cast<size_t>(c.batch) * c.hq * c.d, 1.f);
  std::vector<uint32_t> lens(c.batch);
  for (uint32_t b = 0; b < c.batch; ++b) {
    lens[b] = b == 1 ? 0 : static_cast<uint32_t>(rng() % (c.cap + 1));
  }
  lens[0] = c.cap;
  const size_t obytes = static_cast<size_t>(c.batch) * c.hq * c.d * DTypeSize(c.out);
  std::vector<uint8_t> out_ref(obytes);
  std::vector<float> lse_ref(c.batch * c.hq);
  DenseAttendView v{};
  v.kv_dtype = c.kv;
  v.batch = c.batch;
  v.q_heads = c.hq;
  v.kv_heads = c.hkv;
  v.head_dim = c.d;
  v.capacity_tokens = c.cap;
  v.max_seq_len = c.cap;
  v.scale = 1.f / std::sqrt(static_cast<float>(c.d));
  v.q_dtype = c.q;
  v.out_dtype = c.out;
  DenseAttendView vc = v;
  vc.k = k_h.data();
  vc.v = v_h.data();
  vc.seq_lens = lens.data();
  vc.q = q_h.data();
  vc.out = out_ref.data();
  vc.lse = lse_ref.data();
  ASSERT_TRUE(ValidateDenseAttendView(vc).ok());
  DenseAttendCpu(vc);

  GuardedBuffer k_d(k_h.size()), v_d(v_h.size()), q_d(q_h.size()), len_d(4 * c.batch),
      out_d(obytes), lse_d(4 * lse_ref.size());
  k_d.Upload(k_h.data());
  v_d.Upload(v_h.data());
  q_d.Upload(q_h.data());
  len_d.Upload(lens.data());
  v.k = k_d.data();
  v.v = v_d.data();
  v.seq_lens = len_d.as<uint32_t>();
  v.q = q_d.data();
  v.out = out_d.data();
  v.lse = lse_d.as<float>();
  for (uint32_t cluster : {0u, kc::kAttendClusterAuto, 2u, 16u}) {  // see SpanAttendParity
  SCOPED_TRACE("cluster option " + std::to_string(cluster));
  kc::DenseAttendOptions opt;
  opt.min_split_tokens = c.min_split;
  opt.max_split_tokens = c.max_split;
  opt.cluster = cluster;
  const size_t wsb = std::max<size_t>(kc::DenseAttendWorkspaceBytes(v, opt), 16);
  GuardedBuffer ws(wsb);
  CUDA_OK(cudaMemset(ws.data(), 0, wsb));
  for (int rep = 0; rep < 2; ++rep) {
    out_d.Poison();
    lse_d.Poison();
    ST_OK(kc::DenseAttend(v, opt, ws.data(), wsb, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint8_t> out_h(obytes);
    std::vector<float> lse_h(lse_ref.size());
    ASSERT_TRUE(out_d.Download(out_h.data()));
    ASSERT_TRUE(lse_d.Download(lse_h.data()));
    bool nan = false;
    EXPECT_LT(RelErr(out_h.data(), out_ref.data(), c.out, obytes / DTypeSize(c.out), &nan),
              Tolerance(c.out));
    EXPECT_FALSE(nan);
    for (size_t i = 0; i < lse_h.size(); ++i) {
      if (std::isinf(lse_ref[i])) {
        EXPECT_TRUE(std::isinf(lse_h[i]) && lse_h[i] < 0) << i;
      } else {
        EXPECT_NEAR(lse_h[i], lse_ref[i], 1e-4 * (1 + std::fabs(lse_ref[i]))) << i;
      }
    }
  }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DenseAttendParity,
    ::testing::Values(
        DenseCase{DType::kBF16, DType::kBF16, DType::kBF16, 3, 32, 8, 128, 2000, 128, 4096},
        DenseCase{DType::kBF16, DType::kF32, DType::kF32, 4, 32, 8, 128, 1500, 32, 64},
        DenseCase{DType::kF16, DType::kF16, DType::kF32, 2, 8, 1, 128, 700, 32, 4096},
        DenseCase{DType::kBF16, DType::kF32, DType::kF32, 3, 16, 8, 64, 900, 64, 128},
        // > 256 splits: the merge runs in several chunks.
        DenseCase{DType::kBF16, DType::kF32, DType::kF32, 1, 8, 2, 128, 10000, 32, 32}),
    DenseName);

// ---- Index ops -------------------------------------------------------------------------------

struct PoolFixture {
  uint32_t hkv = 8, d = 128;
  DType kv = DType::kBF16;
  std::vector<KVSpan> chunks;
  std::vector<uint8_t> pool;

  void Build(std::mt19937_64& rng, uint32_t n) {
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t cap = 8 + static_cast<uint32_t>(rng() % 25);
      const uint32_t a = static_cast<uint32_t>(rng() % 4);
      const uint32_t e =
          i % 17 == 5 ? a : std::min(cap, a + 1 + static_cast<uint32_t>(rng() % cap));
      chunks.push_back({total, cap, a, e});
      total += 2ull * hkv * cap * d;
    }
    pool = RandomTensor(rng, kv, total, 1.f);
    // A topic offset per chunk so centroids differ.
    for (const KVSpan& s : chunks) {
      const float shift = static_cast<float>(static_cast<int>(rng() % 7) - 3) * 0.3f;
      for (uint64_t i = s.offset; i < s.offset + 1ull * hkv * s.stride_tokens * d; ++i) {
        StoreFromFloat(pool.data(), kv, i, LoadAsFloat(pool.data(), kv, i) + shift);
      }
    }
  }
};

TEST(IndexOpsParity, ChunkSummary) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  PoolFixture f;
  f.Build(rng, 300);
  const uint32_t n = static_cast<uint32_t>(f.chunks.size());
  std::vector<float> cen(n * f.hkv * f.d), rad(n * f.hkv), nrm(n * f.hkv);
  ChunkSummaryView v{f.pool.data(), f.kv,       f.hkv,     f.d, f.chunks.data(), n,
                     cen.data(),    rad.data(), nrm.data()};
  ChunkSummaryCpu(v);
  GuardedBuffer pool_d(f.pool.size()), ch_d(n * sizeof(KVSpan)), cen_d(cen.size() * 4),
      rad_d(rad.size() * 4), nrm_d(nrm.size() * 4);
  pool_d.Upload(f.pool.data());
  ch_d.Upload(f.chunks.data());
  ChunkSummaryView vd{pool_d.data(),
                      f.kv,
                      f.hkv,
                      f.d,
                      ch_d.as<KVSpan>(),
                      n,
                      cen_d.as<float>(),
                      rad_d.as<float>(),
                      nrm_d.as<float>()};
  ST_OK(kc::ChunkSummary(vd, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> cen_g(cen.size()), rad_g(rad.size()), nrm_g(nrm.size());
  ASSERT_TRUE(cen_d.Download(cen_g.data()));
  ASSERT_TRUE(rad_d.Download(rad_g.data()));
  ASSERT_TRUE(nrm_d.Download(nrm_g.data()));
  for (size_t i = 0; i < cen.size(); ++i)
    ASSERT_NEAR(cen_g[i], cen[i], 3e-5 * (1 + std::fabs(cen[i]))) << i;
  for (size_t i = 0; i < rad.size(); ++i) {
    ASSERT_NEAR(rad_g[i], rad[i], 1e-4 * (1 + rad[i])) << i;
    ASSERT_NEAR(nrm_g[i], nrm[i], 1e-4 * (1 + nrm[i])) << i;
  }
  // The invariant the index relies on, checked on the GPU's own numbers (double precision).
  std::vector<float> k(f.d);
  for (uint32_t ci = 0; ci < n; ++ci) {
    const KVSpan& s = f.chunks[ci];
    for (uint32_t h = 0; h < f.hkv; ++h) {
      const float* c = &cen_g[(static_cast<size_t>(ci) * f.hkv + h) * f.d];
      for (uint32_t t = s.begin; t < s.end; ++t) {
        const uint64_t e = s.offset + (static_cast<uint64_t>(h) * s.stride_tokens + t) * f.d;
        double dd = 0, nn = 0;
        for (uint32_t d = 0; d < f.d; ++d) {
          const double x = LoadAsFloat(f.pool.data(), f.kv, e + d);
          dd += (x - c[d]) * (x - c[d]);
          nn += x * x;
        }
        ASSERT_LE(std::sqrt(dd), rad_g[ci * f.hkv + h]) << "radius invariant, chunk " << ci;
        ASSERT_LE(std::sqrt(nn), nrm_g[ci * f.hkv + h]) << "norm bound, chunk " << ci;
      }
    }
  }
}

TEST(IndexOpsParity, NodeBoundsAndChunkMaxScores) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  PoolFixture f;
  f.Build(rng, 200);
  const uint32_t n = static_cast<uint32_t>(f.chunks.size());
  const uint32_t G = 4, groups = 3;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> queries(groups * G * f.d);
  for (float& x : queries) x = nd(rng);
  // Summaries on the CPU feed the bounds.
  std::vector<float> cen(n * f.hkv * f.d), rad(n * f.hkv);
  ChunkSummaryCpu(
      {f.pool.data(), f.kv, f.hkv, f.d, f.chunks.data(), n, cen.data(), rad.data(), nullptr});
  const uint32_t pairs = 1500;
  std::vector<uint32_t> pn(pairs), pg(pairs), ih(pairs), ig(pairs);
  std::vector<KVSpan> ich(pairs);
  for (uint32_t i = 0; i < pairs; ++i) {
    const uint32_t ci = static_cast<uint32_t>(rng() % n), h = static_cast<uint32_t>(rng() % f.hkv);
    pn[i] = ci * f.hkv + h;  // node = (chunk, head) summary row
    pg[i] = ig[i] = static_cast<uint32_t>(rng() % groups);
    ih[i] = h;
    ich[i] = f.chunks[ci];
  }
  std::vector<float> bounds(pairs), scores(pairs);
  NodeBoundsCpu(
      {cen.data(), rad.data(), queries.data(), G, f.d, pn.data(), pg.data(), pairs, bounds.data()});
  ChunkMaxScoresCpu({f.pool.data(), f.kv, f.hkv, f.d, queries.data(), G, ich.data(), ih.data(),
                     ig.data(), pairs, scores.data()});
  for (uint32_t i = 0; i < pairs; ++i) {
    if (!std::isinf(scores[i])) {
      EXPECT_GE(bounds[i] + 1e-3f, scores[i]) << "bound below score";
    }
  }

  GuardedBuffer cen_d(cen.size() * 4), rad_d(rad.size() * 4), q_d(queries.size() * 4),
      pn_d(pairs * 4), pg_d(pairs * 4), b_d(pairs * 4), pool_d(f.pool.size()),
      ich_d(pairs * sizeof(KVSpan)), ih_d(pairs * 4), s_d(pairs * 4);
  cen_d.Upload(cen.data());
  rad_d.Upload(rad.data());
  q_d.Upload(queries.data());
  pn_d.Upload(pn.data());
  pg_d.Upload(pg.data());
  pool_d.Upload(f.pool.data());
  ich_d.Upload(ich.data());
  ih_d.Upload(ih.data());
  ST_OK(kc::NodeBounds({cen_d.as<float>(), rad_d.as<float>(), q_d.as<float>(), G, f.d,
                        pn_d.as<uint32_t>(), pg_d.as<uint32_t>(), pairs, b_d.as<float>()},
                       nullptr));
  ST_OK(kc::ChunkMaxScores({pool_d.data(), f.kv, f.hkv, f.d, q_d.as<float>(), G, ich_d.as<KVSpan>(),
                            ih_d.as<uint32_t>(), pg_d.as<uint32_t>(), pairs, s_d.as<float>()},
                           nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> bg(pairs), sg(pairs);
  ASSERT_TRUE(b_d.Download(bg.data()));
  ASSERT_TRUE(s_d.Download(sg.data()));
  for (uint32_t i = 0; i < pairs; ++i) {
    ASSERT_NEAR(bg[i], bounds[i], 1e-4 * (1 + std::fabs(bounds[i]))) << i;
    if (std::isinf(scores[i])) {
      ASSERT_TRUE(std::isinf(sg[i]) && sg[i] < 0) << i;
    } else {
      ASSERT_NEAR(sg[i], scores[i], 1e-4 * (1 + std::fabs(scores[i]))) << i;
    }
  }
}

TEST(IndexOpsParity, TopKExactWithTies) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  for (uint32_t n : {1u, 37u, 1000u, 8192u, 20000u}) {
    const uint32_t rows = 5;
    for (uint32_t k : {1u, 16u, 128u, 2048u}) {
      if (k > n) continue;
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<float> s(rows * n);
      for (size_t i = 0; i < s.size(); ++i) {
        float x = nd(rng);
        if (i % 3 == 0) x = std::round(x * 4.f) / 4.f;  // many ties
        if (i % 101 == 7) x = -0.f;
        if (i % 211 == 3) x = std::numeric_limits<float>::quiet_NaN();
        s[i] = x;
      }
      std::vector<uint32_t> idx(rows * k);
      std::vector<float> val(rows * k);
      const TopKView v{s.data(), rows, n, k, idx.data(), val.data()};
      ASSERT_TRUE(ValidateTopKView(v).ok());
      TopKCpu(v);
      GuardedBuffer s_d(s.size() * 4), i_d(idx.size() * 4), v_d(val.size() * 4);
      s_d.Upload(s.data());
      ST_OK(kc::TopK({s_d.as<float>(), rows, n, k, i_d.as<uint32_t>(), v_d.as<float>()}, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<uint32_t> ig(idx.size());
      ASSERT_TRUE(i_d.Download(ig.data()));
      ASSERT_EQ(ig, idx) << "n=" << n << " k=" << k;
    }
  }
}

// The first index where a and b (same size) differ; their size when none.
size_t FirstDifference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  return static_cast<size_t>(std::mismatch(a.begin(), a.end(), b.begin()).first - a.begin());
}

// CopySegments against memmove on a host copy: random segments, disjoint from each other,
// 16-byte aligned and not, large (many steps of a block) and small, some moving within their
// own range (destination below and above the source).
TEST(PoolCopyParity, CopySegmentsMatchesMemmove) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  const size_t bytes = size_t{8} << 20;
  std::vector<uint8_t> host(bytes);
  for (auto& b : host) b = static_cast<uint8_t>(rng());
  GuardedBuffer buf(bytes);
  ASSERT_TRUE(buf.ok());
  buf.Upload(host.data());
  const auto base = reinterpret_cast<uint64_t>(buf.data());
  // Disjoint regions of 64 KiB apart: each segment lives inside its own region.
  std::vector<kc::CopySegment> segs;
  const size_t region = 64 << 10;
  for (size_t r = 0; r + 1 < bytes / region / 2; ++r) {
    const size_t at = 2 * r * region;  // even regions: a copy to the next (odd) region, or a move
    const int kind = static_cast<int>(rng() % 4);
    const bool aligned = rng() % 3 != 0;
    size_t len = 1 + rng() % (aligned ? region / 2 : 5000);
    if (aligned) len = (len + 15) / 16 * 16;
    size_t a = rng() % (region / 4), b = rng() % (region / 4);
    if (aligned) {
      a &= ~size_t{15};
      b &= ~size_t{15};
    }
    uint64_t src = base + at + a, dst;
    if (kind == 0) {
      dst = base + at + region + b;  // disjoint
    } else if (kind == 1) {
      dst = src + 1 + rng() % len;  // overlapping, destination above (memmove backward)
      if (aligned) dst = src + ((dst - src + 15) & ~uint64_t{15});
    } else if (kind == 2) {
      src = base + at + region / 4 + a;  // overlapping, destination below
      dst = src - (1 + rng() % std::min<size_t>(len, region / 4 - 1));
      if (aligned) dst = src - ((src - dst + 15) & ~uint64_t{15});
    } else {
      dst = src;  // onto itself
    }
    segs.push_back({dst, src, len});
  }
  std::vector<uint8_t> want = host;
  for (const auto& g : segs) {
    std::memmove(want.data() + (g.dst - base), want.data() + (g.src - base), g.bytes);
  }
  GuardedBuffer seg_d(segs.size() * sizeof(kc::CopySegment));
  seg_d.Upload(segs.data());
  ST_OK(kc::CopySegments(seg_d.as<kc::CopySegment>(), static_cast<uint32_t>(segs.size()), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint8_t> got(bytes);
  ASSERT_TRUE(buf.Download(got.data()));
  EXPECT_EQ(FirstDifference(got, want), bytes) << "first differing byte of " << segs.size() << " segments";
  ST_OK(kc::CopySegments(nullptr, 0, nullptr));  // nothing to do
}

// CopyStager: host rows (some over the 64 KiB segment size), device copies and moves within
// their own range, in two flushes (the second refills the staging after the first's upload),
// against the same operations on a host copy.
TEST(PoolCopyParity, CopyStagerMatchesHostOps) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  const size_t bytes = size_t{4} << 20, region = 128 << 10;
  std::vector<uint8_t> host(bytes);
  for (auto& b : host) b = static_cast<uint8_t>(rng());
  GuardedBuffer buf(bytes);
  ASSERT_TRUE(buf.ok());
  buf.Upload(host.data());
  auto* dev = static_cast<uint8_t*>(buf.data());
  std::vector<uint8_t> want = host;
  kc::CopyStager stager;
  size_t r = 0;
  for (int flush = 0; flush < 2; ++flush) {
    for (int k = 0; k < 12 && (r + 1) * region <= bytes; ++k, ++r) {
      const size_t at = r * region;
      const int kind = static_cast<int>(rng() % 3);
      if (kind == 0) {  // host rows, 1 B .. 100 KB
        std::vector<uint8_t> rows(1 + rng() % (100 << 10));
        for (auto& b : rows) b = static_cast<uint8_t>(rng());
        const size_t off = rng() % (region - rows.size());
        ST_OK(stager.Add(dev + at + off, rows.data(), rows.size()));
        std::memcpy(want.data() + at + off, rows.data(), rows.size());
        rows.assign(rows.size(), 0);  // reused at once: the stager holds its own copy
      } else if (kind == 1) {  // device copy, first half of the region to the second
        const size_t len = 1 + rng() % (region / 2 - 1);
        stager.AddDevice(dev + at + region / 2, dev + at, len, false);
        std::memcpy(want.data() + at + region / 2, want.data() + at, len);
      } else {  // move within its own range
        const size_t len = 1 + rng() % (region / 2), shift = 1 + rng() % (region / 4);
        const bool left = rng() % 2;
        const size_t src = left ? at + shift : at, dst = left ? at : at + shift;
        stager.AddDevice(dev + dst, dev + src, len, true);
        std::memmove(want.data() + dst, want.data() + src, len);
      }
    }
    ST_OK(stager.Flush(nullptr));
  }
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint8_t> got(bytes);
  ASSERT_TRUE(buf.Download(got.data()));
  EXPECT_EQ(FirstDifference(got, want), bytes) << "first differing byte";
  ST_OK(stager.Flush(nullptr));  // nothing staged: nothing to do
}

TEST(IndexOpsParity, PooledBlockScores) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  PoolFixture f;
  f.Build(rng, 120);
  std::vector<KVSpan> spans = f.chunks;
  std::vector<uint32_t> prefix{0};
  for (const KVSpan& s : spans) prefix.push_back(prefix.back() + s.end - s.begin);
  const uint32_t total = prefix.back();
  const uint32_t hq = 32;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> q(hq * f.d);
  for (float& x : q) x = nd(rng);
  const std::vector<uint32_t> heads{0, 3, 7};
  for (BlockPool mode : {BlockPool::kMax, BlockPool::kMean}) {
    for (uint32_t B : {64u, 17u}) {
      const uint32_t nb = PooledNumBlocks(total, B);
      std::vector<float> ref(heads.size() * nb);
      PooledBlockScoresView v{f.pool.data(),
                              f.kv,
                              f.hkv,
                              hq,
                              f.d,
                              q.data(),
                              spans.data(),
                              prefix.data(),
                              static_cast<uint32_t>(spans.size()),
                              total,
                              B,
                              mode,
                              heads.data(),
                              static_cast<uint32_t>(heads.size()),
                              ref.data()};
      PooledBlockScoresCpu(v);
      GuardedBuffer pool_d(f.pool.size()), q_d(q.size() * 4), sp_d(spans.size() * sizeof(KVSpan)),
          pre_d(prefix.size() * 4), h_d(heads.size() * 4), o_d(ref.size() * 4);
      pool_d.Upload(f.pool.data());
      q_d.Upload(q.data());
      sp_d.Upload(spans.data());
      pre_d.Upload(prefix.data());
      h_d.Upload(heads.data());
      PooledBlockScoresView vd = v;
      vd.pool = pool_d.data();
      vd.q = q_d.as<float>();
      vd.spans = sp_d.as<KVSpan>();
      vd.span_prefix = pre_d.as<uint32_t>();
      vd.heads = h_d.as<uint32_t>();
      vd.scores = o_d.as<float>();
      ST_OK(kc::PooledBlockScores(vd, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<float> got(ref.size());
      ASSERT_TRUE(o_d.Download(got.data()));
      for (size_t i = 0; i < ref.size(); ++i) {
        ASSERT_NEAR(got[i], ref[i], 1e-4 * (1 + std::fabs(ref[i]))) << "block " << i;
      }
    }
  }
}


// Rescoring logits: items over random chunks and KV heads (some empty), G = 4 and G = 1.
TEST(IndexOpsParity, TokenLogits) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  PoolFixture f;
  f.Build(rng, 150);
  for (uint32_t hq : {32u, 8u}) {
    std::vector<KVSpan> spans;
    std::vector<uint32_t> heads, prefix{0};
    for (int i = 0; i < 400; ++i) {
      const KVSpan& c = f.chunks[rng() % f.chunks.size()];
      spans.push_back(c);
      heads.push_back(static_cast<uint32_t>(rng() % f.hkv));
      prefix.push_back(prefix.back() + c.end - c.begin);
    }
    const uint32_t total = prefix.back(), G = hq / f.hkv;
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> q(hq * f.d);
    for (float& x : q) x = nd(rng);
    std::vector<float> ref(size_t{total} * G, NAN);
    TokenLogitsView v{f.pool.data(),  f.kv,          f.hkv,         hq,
                      f.d,            1.f / std::sqrt(static_cast<float>(f.d)),
                      q.data(),       spans.data(),  heads.data(),  prefix.data(),
                      static_cast<uint32_t>(spans.size()),            total,
                      ref.data()};
    TokenLogitsCpu(v);
    GuardedBuffer pool_d(f.pool.size()), q_d(q.size() * 4), sp_d(spans.size() * sizeof(KVSpan)),
        h_d(heads.size() * 4), pre_d(prefix.size() * 4), o_d(ref.size() * 4);
    pool_d.Upload(f.pool.data());
    q_d.Upload(q.data());
    sp_d.Upload(spans.data());
    h_d.Upload(heads.data());
    pre_d.Upload(prefix.data());
    TokenLogitsView vd = v;
    vd.pool = pool_d.data();
    vd.q = q_d.as<float>();
    vd.spans = sp_d.as<KVSpan>();
    vd.item_head = h_d.as<uint32_t>();
    vd.token_prefix = pre_d.as<uint32_t>();
    vd.logits = o_d.as<float>();
    o_d.Poison();
    ST_OK(kc::TokenLogits(vd, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> got(ref.size());
    ASSERT_TRUE(o_d.Download(got.data()));  // also checks the guard bytes
    for (size_t i = 0; i < ref.size(); ++i) {
      ASSERT_FALSE(std::isnan(ref[i])) << "logit " << i << " not written by the CPU reference";
      ASSERT_NEAR(got[i], ref[i], 1e-4 * (1 + std::fabs(ref[i]))) << "G " << G << " logit " << i;
    }
  }
}

// ---- Retrieval heads (LycheeDecode) ------------------------------------------------------------
// One layer of mode retrieval_heads as the CUDA backend runs it: the retrieval heads' block
// scores in one launch, their top blocks, then ONE attention launch in which retrieval heads
// attend the whole context (every chunk) and sparse heads attend sinks + the blocks a retrieval
// head kept. Balanced plan (splits by tokens: the retrieval heads get proportionally more
// splits) and the fixed-split baseline (splits_per_task) must both match the CPU reference.
TEST(RetrievalHeadsParity, ScoresThenMixedSpanAttention) {
  SKIP_WITHOUT_GPU();
  auto rng = FreshRng();
  PoolFixture f;
  f.hkv = 4;
  f.Build(rng, 900);
  const uint32_t hq = 16, G = hq / f.hkv, D = f.d, B = 64, kSinks = 16, k = 6;
  // The context: every chunk's [begin, end) in order (chunk-local ranges as the daemon keeps them).
  std::vector<uint32_t> prefix{0};
  for (const KVSpan& s : f.chunks) prefix.push_back(prefix.back() + s.end - s.begin);
  const uint32_t total = prefix.back();
  ASSERT_GT(total, kSinks + k * B);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> qf(hq * D);
  for (float& x : qf) x = nd(rng);
  const std::vector<uint32_t> retrieval{0, 2};  // sparse heads 1 and 3 reuse 0's and 2's blocks

  // 1. Block scores: device vs CPU.
  const uint32_t nb = PooledNumBlocks(total, B);
  std::vector<float> ref(retrieval.size() * nb);
  PooledBlockScoresView v{f.pool.data(), f.kv, f.hkv, hq, D, qf.data(), f.chunks.data(), prefix.data(),
                          static_cast<uint32_t>(f.chunks.size()), total, B, BlockPool::kMax,
                          retrieval.data(), static_cast<uint32_t>(retrieval.size()), ref.data()};
  PooledBlockScoresCpu(v);
  GuardedBuffer pool_d(f.pool.size()), qf_d(qf.size() * 4), sp_d(f.chunks.size() * sizeof(KVSpan)),
      pre_d(prefix.size() * 4), h_d(retrieval.size() * 4), sc_d(ref.size() * 4);
  ASSERT_TRUE(pool_d.ok());
  pool_d.Upload(f.pool.data());
  qf_d.Upload(qf.data());
  sp_d.Upload(f.chunks.data());
  pre_d.Upload(prefix.data());
  h_d.Upload(retrieval.data());
  PooledBlockScoresView vd = v;
  vd.pool = pool_d.data();
  vd.q = qf_d.as<float>();
  vd.spans = sp_d.as<KVSpan>();
  vd.span_prefix = pre_d.as<uint32_t>();
  vd.heads = h_d.as<uint32_t>();
  vd.scores = sc_d.as<float>();
  ST_OK(kc::PooledBlockScores(vd, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> got(ref.size());
  ASSERT_TRUE(sc_d.Download(got.data()));
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_NEAR(got[i], ref[i], 1e-4 * (1 + std::fabs(ref[i]))) << "block " << i;
  }

  // 2. Top-k blocks per retrieval head (host rule, as the daemon does), to context positions.
  std::vector<uint32_t> top(retrieval.size() * k);
  TopKCpu(TopKView{got.data(), static_cast<uint32_t>(retrieval.size()), nb, k, top.data(), nullptr});
  // Context position -> (chunk, offset) pieces for a range [a, b).
  auto add_range = [&](uint32_t a, uint32_t b, std::vector<KVSpan>* out) {
    b = std::min(b, total);
    for (size_t c = 0; c < f.chunks.size() && a < b; ++c) {
      if (prefix[c + 1] <= a) continue;
      const uint32_t e = std::min(b, prefix[c + 1]);
      const KVSpan& s = f.chunks[c];
      out->push_back({s.offset, s.stride_tokens, s.begin + (a - prefix[c]), s.begin + (e - prefix[c])});
      a = e;
    }
  };
  std::vector<KVSpan> spans;
  std::vector<uint32_t> head_begin;
  std::vector<uint64_t> head_tokens(f.hkv, 0);
  for (uint32_t h = 0; h < f.hkv; ++h) {
    head_begin.push_back(static_cast<uint32_t>(spans.size()));
    if (h % 2 == 0) {
      spans.insert(spans.end(), f.chunks.begin(), f.chunks.end());  // retrieval head: everything
    } else {
      add_range(0, kSinks, &spans);
      std::vector<uint32_t> blocks(top.begin() + (h / 2) * k, top.begin() + (h / 2 + 1) * k);
      std::sort(blocks.begin(), blocks.end());
      for (uint32_t j : blocks) add_range(std::max(kSinks, j * B), (j + 1) * B, &spans);
    }
    for (size_t i = head_begin.back(); i < spans.size(); ++i) head_tokens[h] += spans[i].end - spans[i].begin;
  }
  head_begin.push_back(static_cast<uint32_t>(spans.size()));
  ASSERT_GT(head_tokens[0], 10 * head_tokens[1]);

  // 3. One attention launch, balanced and fixed-split plans, against the CPU reference.
  const DType qt = DType::kBF16, ot = DType::kBF16;
  const auto q = RandomTensor(rng, qt, size_t{hq} * D, 1.f);
  std::vector<uint8_t> out_ref(size_t{hq} * D * DTypeSize(ot));
  std::vector<float> lse_ref(hq);
  AttendProblem p{f.pool.data(), f.kv, hq, f.hkv, D, 1.f / std::sqrt(static_cast<float>(D)), q.data(), qt,
                  spans.data(), head_begin.data(), static_cast<uint32_t>(spans.size()), out_ref.data(), ot,
                  lse_ref.data()};
  AttendCpu(&p, 1);
  GuardedBuffer q_d(q.size()), out_d(out_ref.size()), lse_d(hq * 4);
  q_d.Upload(q.data());
  AttendProblem pd = p;
  pd.pool = pool_d.data();
  pd.q = q_d.data();
  pd.out = out_d.data();
  pd.lse = lse_d.as<float>();
  for (uint32_t fixed : {0u, 4u}) {
    SCOPED_TRACE(fixed ? "fixed splits per task" : "balanced splits");
    kc::AttendPlanOptions opt;
    opt.splits_per_task = fixed;
    kc::AttendPlan plan;
    ST_OK(kc::PlanAttend(&pd, 1, opt, &plan));
    const auto* tasks =
        reinterpret_cast<const detail::AttendTaskDesc*>(plan.image.data() + plan.tasks_off);
    const auto* items =
        reinterpret_cast<const detail::AttendItemDesc*>(plan.image.data() + plan.items_off);
    std::vector<uint32_t> longest(f.hkv, 0);
    for (uint32_t i = 0; i < plan.num_items; ++i) {
      longest[items[i].task] = std::max(longest[items[i].task], items[i].tokens);
    }
    if (fixed == 0) {
      // Work balanced by tokens: the retrieval heads get many more splits, no split is longer
      // than split_tokens.
      EXPECT_GE(tasks[0].num_splits, 8 * tasks[1].num_splits);
      for (uint32_t h = 0; h < f.hkv; ++h) EXPECT_LE(longest[h], plan.split_tokens) << "head " << h;
    } else {
      // The baseline: the same split count, so the retrieval heads' splits are far longer.
      EXPECT_GE(longest[0], 8 * longest[1]);
    }
    GuardedBuffer ws(plan.workspace_bytes);
    ASSERT_TRUE(ws.ok());
    ST_OK(kc::UploadAttendPlan(plan, ws.data(), nullptr));
    out_d.Poison();
    lse_d.Poison();
    ST_OK(kc::LaunchAttend(plan, ws.data(), nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint8_t> out_h(out_ref.size());
    std::vector<float> lse_h(hq);
    ASSERT_TRUE(out_d.Download(out_h.data()));
    ASSERT_TRUE(lse_d.Download(lse_h.data()));
    for (uint32_t qh = 0; qh < hq; ++qh) {
      bool nan = false;
      const size_t row = size_t{qh} * D * DTypeSize(ot);
      const double err = RelErr(out_h.data() + row, out_ref.data() + row, ot, D, &nan);
      EXPECT_FALSE(nan) << "query head " << qh;
      EXPECT_LT(err, Tolerance(ot)) << "query head " << qh << " (KV head " << qh / G << ")";
      EXPECT_NEAR(lse_h[qh], lse_ref[qh], 1e-4 * (1 + std::fabs(lse_ref[qh]))) << "query head " << qh;
    }
  }
}

}  // namespace
}  // namespace kvmem::kernels
