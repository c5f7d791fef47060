// Session storage and dense attention against the double-precision reference, through both
// the prefill path (AppendKV in random batches) and the decode path (Attend with new k/v,
// layer by layer), for every K/V dtype.
#include "daemon/session.h"

#include <gtest/gtest.h>

#include <limits>
#include <random>

#include "index/chunker.h"
#include "testing/reference.h"
#include "testing/seed.h"

namespace kvmem {
namespace {

using testing::RandomTensor;
using testing::ReferenceAttention;
using testing::RelativeError;

// Host mirror of everything appended, as [layers][kv_heads][tokens][head_dim].
struct Mirror {
  ModelProfile p;
  std::vector<std::vector<uint8_t>> rows_k, rows_v;  // per (layer, head): tokens*D elements
  uint64_t tokens = 0;

  explicit Mirror(const ModelProfile& prof) : p(prof), rows_k(prof.layers * prof.kv_heads), rows_v(prof.layers * prof.kv_heads) {}
  void Append(const std::vector<uint8_t>& k, const std::vector<uint8_t>& v, uint64_t n) {
    const size_t row = p.head_dim * DTypeSize(p.dtype);
    for (uint32_t l = 0; l < p.layers; ++l)
      for (uint32_t h = 0; h < p.kv_heads; ++h) {
        const size_t src = ((static_cast<size_t>(l) * p.kv_heads + h) * n) * row;
        auto& dk = rows_k[l * p.kv_heads + h];
        auto& dv = rows_v[l * p.kv_heads + h];
        dk.insert(dk.end(), k.begin() + src, k.begin() + src + n * row);
        dv.insert(dv.end(), v.begin() + src, v.begin() + src + n * row);
      }
    tokens += n;
  }
  // Flattened for ReferenceAttention, one layer only (tokens_in_layer may exceed `tokens`).
  void Flatten(uint32_t layer, uint64_t t, std::vector<uint8_t>* k, std::vector<uint8_t>* v) const {
    k->clear();
    v->clear();
    const size_t row = p.head_dim * DTypeSize(p.dtype);
    for (uint32_t h = 0; h < p.kv_heads; ++h) {
      const auto& sk = rows_k[layer * p.kv_heads + h];
      const auto& sv = rows_v[layer * p.kv_heads + h];
      k->insert(k->end(), sk.begin(), sk.begin() + t * row);
      v->insert(v->end(), sv.begin(), sv.begin() + t * row);
    }
  }
};

class SessionTest : public ::testing::TestWithParam<DType> {};

TEST_P(SessionTest, PrefillAndDecodeMatchReference) {
  const DType dt = GetParam();
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  ModelProfile prof{3, 8, 2, 64, dt, {}, {}, "test"};
  SessionOptions opts;
  opts.chunker = {8, 24};
  auto pool = CreateHostPool({256ull << 20, 1ull << 20});
  ASSERT_TRUE(pool.ok());
  {
    auto s = Session::Create(42, "t", prof, opts, pool->get());
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    Session& session = **s;
    Mirror mirror(prof);
    index::Chunker chunker(opts.chunker);
    std::vector<uint32_t> sealed;
    std::discrete_distribution<int> cls({30, 50, 8, 6, 4, 2});

    // Prefill in random batches.
    for (int batch = 0; batch < 12; ++batch) {
      const uint32_t n = 1 + static_cast<uint32_t>(rng() % 90);
      const size_t elems = static_cast<size_t>(prof.layers) * prof.kv_heads * n * prof.head_dim;
      auto k = RandomTensor(rng, dt, elems);
      auto v = RandomTensor(rng, dt, elems);
      std::vector<uint8_t> b(n);
      for (auto& x : b) x = static_cast<uint8_t>(cls(rng));
      auto r = session.AppendKV(n, k.data(), v.data(), b.data());
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      mirror.Append(k, v, n);
      chunker.Push(b, &sealed);
      EXPECT_EQ(r->tokens, mirror.tokens);
      EXPECT_EQ(r->chunks, sealed.size());
    }
    EXPECT_EQ(session.Stats().tail_tokens, chunker.tail_tokens());

    // Decode: each step appends one token to every layer, attending as it goes.
    for (int step = 0; step < 30; ++step) {
      const size_t one = static_cast<size_t>(prof.layers) * prof.kv_heads * prof.head_dim;
      auto k = RandomTensor(rng, dt, one);
      auto v = RandomTensor(rng, dt, one);
      const uint8_t boundary = static_cast<uint8_t>(cls(rng));
      for (uint32_t l = 0; l < prof.layers; ++l) {
        std::vector<float> q(prof.q_heads * prof.head_dim);
        std::normal_distribution<float> n01;
        for (auto& x : q) x = n01(rng);
        const size_t off = static_cast<size_t>(l) * prof.kv_heads * prof.head_dim * DTypeSize(dt);
        std::vector<float> out(q.size());
        std::vector<float> lse(prof.q_heads);
        AttendArgs a;
        a.layer = l;
        a.q = q.data();
        a.q_dtype = DType::kF32;
        a.new_k = k.data() + off;
        a.new_v = v.data() + off;
        a.boundary = boundary;
        a.out = out.data();
        a.out_dtype = DType::kF32;
        a.lse = lse.data();
        AttendInfo info;
        ASSERT_TRUE(session.Attend(a, &info).ok());
        // The reference sees every token so far plus this one in this layer.
        std::vector<uint8_t> fk, fv;
        Mirror m2 = mirror;
        std::vector<uint8_t> kk(k), vv(v);
        m2.Append(kk, vv, 1);
        m2.Flatten(l, m2.tokens, &fk, &fv);
        auto ref = ReferenceAttention(fk, fv, dt, 1, prof.kv_heads, m2.tokens, prof.head_dim, 0, q, prof.q_heads);
        EXPECT_LT(RelativeError(out, ref), 1e-4) << "layer " << l << " step " << step;
        EXPECT_EQ(info.tokens_attended[0], m2.tokens);
        if (l + 1 < prof.layers) {
          // Mid-step: AppendKV must refuse.
          auto r = session.AppendKV(1, k.data(), v.data(), nullptr);
          EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
        }
      }
      mirror.Append(k, v, 1);
      chunker.Push(std::span<const uint8_t>(&boundary, 1), &sealed);
      EXPECT_EQ(session.Stats().tokens, mirror.tokens);
      EXPECT_EQ(session.Stats().chunks, sealed.size());
    }
  }
  EXPECT_EQ((*pool)->allocator().allocated_bytes(), 0u) << "blocks leaked after the session died";
}

// A NaN or Inf anywhere in an append — in rows that fill chunks (checked during the streamed
// copy) or rows bound for the tail — refuses the whole append and leaves the session as it was.
TEST_P(SessionTest, NonFiniteInputAnywhereIsRefusedAtomically) {
  const DType dt = GetParam();
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  ModelProfile prof{2, 4, 2, 64, dt, {}, {}, "test"};
  SessionOptions opts;
  opts.chunker = {8, 24};
  auto pool = CreateHostPool({64ull << 20, 1ull << 20});
  ASSERT_TRUE(pool.ok());
  auto s = Session::Create(7, "t", prof, opts, pool->get());
  ASSERT_TRUE(s.ok());
  Session& session = **s;
  const uint32_t n = 700;  // seals many chunks and leaves a tail
  const size_t elems = size_t{prof.layers} * prof.kv_heads * n * prof.head_dim;
  auto k = RandomTensor(rng, dt, elems);
  auto v = RandomTensor(rng, dt, elems);
  ASSERT_TRUE(session.AppendKV(n, k.data(), v.data(), nullptr).ok());
  const auto before = session.Stats();
  const uint64_t bytes_before = (*pool)->allocator().allocated_bytes();
  const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()};
  for (size_t at : {size_t{0}, size_t{5} * prof.head_dim + 3, elems / 2 + 17, elems - 1}) {
    for (bool in_values : {false, true}) {
      auto kk = k;
      auto vv = v;
      StoreFromFloat((in_values ? vv : kk).data(), dt, at, bad_values[at % 2]);
      auto r = session.AppendKV(n, kk.data(), vv.data(), nullptr);
      EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << "element " << at << (in_values ? " of V" : " of K");
      EXPECT_NE(r.status().message().find("NaN"), std::string::npos);
      EXPECT_EQ(session.Stats().tokens, before.tokens);
      EXPECT_EQ(session.Stats().chunks, before.chunks);
      EXPECT_EQ(session.Stats().tail_tokens, before.tail_tokens);
      EXPECT_EQ((*pool)->allocator().allocated_bytes(), bytes_before) << "blocks leaked by a refused append";
    }
  }
  // The session still takes good data afterwards.
  auto r = session.AppendKV(n, k.data(), v.data(), nullptr);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->tokens, 2u * n);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, SessionTest, ::testing::Values(DType::kBF16, DType::kF16, DType::kF32),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

TEST(Session, RejectsBadProfilesAndSkew) {
  auto pool = CreateHostPool({64ull << 20, 1ull << 20});
  ASSERT_TRUE(pool.ok());
  SessionOptions o;
  EXPECT_EQ(Session::Create(1, "t", {0, 8, 2, 64}, o, pool->get()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Session::Create(1, "t", {2, 6, 4, 64}, o, pool->get()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Session::Create(1, "t", {2, 8, 2, 60}, o, pool->get()).status().code(), StatusCode::kInvalidArgument);
  ModelProfile bad_dense{2, 8, 2, 64};
  bad_dense.dense_layers = {2};
  EXPECT_EQ(Session::Create(1, "t", bad_dense, o, pool->get()).status().code(), StatusCode::kInvalidArgument);

  auto s = Session::Create(1, "t", {2, 4, 2, 16, DType::kF32}, o, pool->get());
  ASSERT_TRUE(s.ok());
  std::vector<float> q(4 * 16, 0.5f), kv(2 * 16, 0.25f), out(4 * 16);
  AttendArgs a;
  a.layer = 0;
  a.q = q.data();
  a.q_dtype = DType::kF32;
  a.new_k = kv.data();
  a.new_v = kv.data();
  a.out = out.data();
  a.out_dtype = DType::kF32;
  for (uint32_t i = 0; i < kMaxLayerSkew; ++i) ASSERT_TRUE((*s)->Attend(a, nullptr).ok());
  EXPECT_EQ((*s)->Attend(a, nullptr).code(), StatusCode::kFailedPrecondition);
  a.layer = 7;
  EXPECT_EQ((*s)->Attend(a, nullptr).code(), StatusCode::kInvalidArgument);
}

TEST(Session, FullPoolLeavesSessionIntact) {
  auto pool = CreateHostPool({2ull << 20, 1ull << 20});
  ASSERT_TRUE(pool.ok());
  SessionOptions o;
  o.chunker = {8, 8};
  auto s = Session::Create(1, "t", {2, 4, 2, 128, DType::kF32}, o, pool->get());
  ASSERT_TRUE(s.ok());
  std::mt19937_64 rng(1);
  uint64_t stored = 0;
  Status last;
  for (int i = 0; i < 1000 && last.ok(); ++i) {
    auto k = RandomTensor(rng, DType::kF32, 2 * 2 * 64 * 128);
    auto r = (*s)->AppendKV(64, k.data(), k.data(), nullptr);
    last = r.status();
    if (r.ok()) stored = r->tokens;
  }
  EXPECT_EQ(last.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ((*s)->Stats().tokens, stored);  // the failed append stored nothing
}

}  // namespace
}  // namespace kvmem
