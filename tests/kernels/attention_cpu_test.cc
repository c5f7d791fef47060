// AttendCpu against an independent two-pass double-precision reference written from the
// definition softmax(q·K^T * scale) · V, over random blocks, spans and dtypes.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "kernels/attention.h"
#include "testing/seed.h"

namespace kvmem::kernels {
namespace {

struct Case {
  DType kv;
  DType q;
  DType out;
  uint32_t hq, hkv, d;
  double tol;
};

class AttendCpuTest : public ::testing::TestWithParam<Case> {};

double Elem(const std::vector<uint8_t>& pool, DType t, uint64_t i) {
  return LoadAsFloat(pool.data(), t, i);
}

TEST_P(AttendCpuTest, MatchesTwoPassReference) {
  const Case c = GetParam();
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  std::normal_distribution<float> n01(0.f, 1.f);

  // Three blocks of different capacity, filled with random K/V.
  const uint32_t caps[3] = {24, 16, 40};
  uint64_t offsets[3];
  uint64_t total = 0;
  for (int b = 0; b < 3; ++b) {
    offsets[b] = total;
    total += 2ull * c.hkv * caps[b] * c.d;
  }
  std::vector<uint8_t> pool(total * DTypeSize(c.kv));
  for (uint64_t i = 0; i < total; ++i) StoreFromFloat(pool.data(), c.kv, i, n01(rng) * 1.5f);

  // Different spans per KV head, including an empty head.
  std::vector<KVSpan> spans;
  std::vector<uint32_t> head_begin;
  std::uniform_int_distribution<int> pick(0, 2);
  for (uint32_t h = 0; h < c.hkv; ++h) {
    head_begin.push_back(static_cast<uint32_t>(spans.size()));
    if (h == 1 && c.hkv > 2) continue;  // no tokens for this head
    const int nspans = 1 + static_cast<int>(rng() % 4);
    for (int s = 0; s < nspans; ++s) {
      const int b = pick(rng);
      const uint32_t a = static_cast<uint32_t>(rng() % caps[b]);
      const uint32_t e = a + 1 + static_cast<uint32_t>(rng() % (caps[b] - a));
      spans.push_back({offsets[b], caps[b], a, e});
    }
  }
  head_begin.push_back(static_cast<uint32_t>(spans.size()));

  std::vector<uint8_t> q(static_cast<size_t>(c.hq) * c.d * DTypeSize(c.q));
  for (size_t i = 0; i < static_cast<size_t>(c.hq) * c.d; ++i)
    StoreFromFloat(q.data(), c.q, i, n01(rng));

  // Guard bytes after the output catch overruns.
  const size_t out_bytes = static_cast<size_t>(c.hq) * c.d * DTypeSize(c.out);
  std::vector<uint8_t> out(out_bytes + 64, 0xAB);
  std::vector<float> lse(c.hq + 4, 12345.f);

  AttendProblem p{};
  p.pool = pool.data();
  p.kv_dtype = c.kv;
  p.q_heads = c.hq;
  p.kv_heads = c.hkv;
  p.head_dim = c.d;
  p.scale = 1.f / std::sqrt(static_cast<float>(c.d));
  p.q = q.data();
  p.q_dtype = c.q;
  p.spans = spans.data();
  p.head_span_begin = head_begin.data();
  p.num_spans = static_cast<uint32_t>(spans.size());
  p.out = out.data();
  p.out_dtype = c.out;
  p.lse = lse.data();
  ASSERT_TRUE(ValidateAttendProblem(p).ok());
  // The blocked kernel (the CPU backend's) computes the same function as the reference, in
  // both of its builds (AVX2 + FMA where this CPU has them, and the baseline).
  AttendCpu(&p, 1);
  for (CpuIsa isa : {CpuIsa::kAuto, CpuIsa::kBaseline}) {
    SCOPED_TRACE(isa == CpuIsa::kAuto ? (CpuHasAvx2Fma() ? "avx2+fma build" : "auto (baseline build)")
                                      : "baseline build");
    std::vector<uint8_t> out2(out_bytes);
    std::vector<float> lse2(c.hq);
    AttendProblem p2 = p;
    p2.out = out2.data();
    p2.lse = lse2.data();
    AttendCpuBlocked(&p2, 1, isa);
    double e = 0, n = 0;
    for (size_t i = 0; i < static_cast<size_t>(c.hq) * c.d; ++i) {
      const double a = LoadAsFloat(out.data(), c.out, i), b = LoadAsFloat(out2.data(), c.out, i);
      e += (a - b) * (a - b);
      n += a * a;
    }
    EXPECT_LE(std::sqrt(e / std::max(n, 1e-30)), c.tol) << "blocked kernel disagrees with the reference";
    for (uint32_t i = 0; i < c.hq; ++i) {
      if (std::isinf(lse[i])) EXPECT_TRUE(std::isinf(lse2[i]));
      else EXPECT_NEAR(lse2[i], lse[i], 1e-4 * (1 + std::fabs(lse[i])));
    }
  }

  for (size_t i = out_bytes; i < out.size(); ++i) ASSERT_EQ(out[i], 0xAB) << "guard overwritten";
  for (uint32_t i = c.hq; i < c.hq + 4; ++i) ASSERT_EQ(lse[i], 12345.f);

  const uint32_t G = c.hq / c.hkv;
  double err2 = 0, ref2 = 0;
  for (uint32_t qh = 0; qh < c.hq; ++qh) {
    const uint32_t h = qh / G;
    std::vector<double> logits;
    std::vector<std::vector<double>> vals;
    for (uint32_t si = head_begin[h]; si < head_begin[h + 1]; ++si) {
      const KVSpan& s = spans[si];
      for (uint32_t t = s.begin; t < s.end; ++t) {
        const uint64_t k0 = s.offset + (static_cast<uint64_t>(h) * s.stride_tokens + t) * c.d;
        const uint64_t v0 = k0 + static_cast<uint64_t>(c.hkv) * s.stride_tokens * c.d;
        double dot = 0;
        std::vector<double> v(c.d);
        for (uint32_t d = 0; d < c.d; ++d) {
          dot += static_cast<double>(LoadAsFloat(q.data(), c.q, qh * c.d + d)) *
                 Elem(pool, c.kv, k0 + d);
          v[d] = Elem(pool, c.kv, v0 + d);
        }
        logits.push_back(dot * p.scale);
        vals.push_back(std::move(v));
      }
    }
    if (logits.empty()) {
      for (uint32_t d = 0; d < c.d; ++d)
        EXPECT_EQ(LoadAsFloat(out.data(), c.out, qh * c.d + d), 0.f);
      EXPECT_TRUE(std::isinf(lse[qh]) && lse[qh] < 0);
      continue;
    }
    double mx = -1e300;
    for (double x : logits) mx = std::max(mx, x);
    double sum = 0;
    for (double x : logits) sum += std::exp(x - mx);
    EXPECT_NEAR(lse[qh], mx + std::log(sum), 1e-3 * (1 + std::fabs(mx)));
    for (uint32_t d = 0; d < c.d; ++d) {
      double r = 0;
      for (size_t i = 0; i < logits.size(); ++i) r += std::exp(logits[i] - mx) / sum * vals[i][d];
      const double got = LoadAsFloat(out.data(), c.out, qh * c.d + d);
      err2 += (got - r) * (got - r);
      ref2 += r * r;
    }
  }
  ASSERT_GT(ref2, 0.0);
  EXPECT_LT(std::sqrt(err2 / ref2), c.tol);
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, AttendCpuTest,
    ::testing::Values(Case{DType::kF32, DType::kF32, DType::kF32, 8, 2, 64, 1e-5},
                      Case{DType::kBF16, DType::kBF16, DType::kF32, 8, 4, 128, 1e-5},
                      Case{DType::kBF16, DType::kF32, DType::kBF16, 32, 8, 128, 1e-2},
                      Case{DType::kF16, DType::kF16, DType::kF16, 4, 4, 32, 2e-3},
                      Case{DType::kF16, DType::kF32, DType::kF32, 6, 3, 16, 1e-5},
                      // Head dims off the blocked kernel's 64-column and 8-lane steps.
                      Case{DType::kBF16, DType::kBF16, DType::kF32, 8, 2, 100, 1e-5},
                      Case{DType::kF32, DType::kF32, DType::kF32, 4, 1, 96, 1e-5}));

TEST(AttendCpu, ValidateRejectsBadShapes) {
  AttendProblem p{};
  float q[4], out[4];
  p.q = q;
  p.out = out;
  p.q_heads = 3;
  p.kv_heads = 2;
  p.head_dim = 2;
  EXPECT_FALSE(ValidateAttendProblem(p).ok());  // 3 % 2 != 0
  p.q_heads = 2;
  KVSpan s{0, 8, 5, 9};  // end past capacity
  float pool[64];
  p.pool = pool;
  p.spans = &s;
  p.num_spans = 1;
  EXPECT_FALSE(ValidateAttendProblem(p).ok());
  s.end = 8;
  EXPECT_TRUE(ValidateAttendProblem(p).ok());
}

}  // namespace
}  // namespace kvmem::kernels
