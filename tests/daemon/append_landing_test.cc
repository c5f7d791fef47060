// AppendKV payloads received in place (AppendLanding): the transport's receive is simulated by
// scattering a packed kv message the way the plan's iovec list would, and the session must end
// up exactly as one that appended the same data the ordinary way — one plan at a time, several
// plans ahead of their handlers, and when a plan no longer holds (an earlier append failed, a
// plan was dropped, a decode step intervened), which the handler must notice and undo by
// gathering the rows back.
#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <memory>
#include <random>

#include "daemon/metrics.h"
#include "daemon/session.h"
#include "testing/reference.h"

namespace kvmem {
namespace {

using testing::RandomTensor;

constexpr uint64_t kPad = 64;  // the kv tensor's offset in the message (a spilled-free header)

struct Msg {
  uint32_t n = 0;
  std::vector<uint8_t> kv;      // packed [2][L][H][n][D]
  std::vector<uint8_t> bounds;  // n classes
  std::vector<uint8_t> buf;     // the receive buffer: kPad bytes, then the tensor
  std::unique_ptr<AppendLanding> landing;
};

class Landing : public ::testing::Test {
 protected:
  ModelProfile prof_{2, 4, 2, 64, DType::kBF16, {}, {}, "test"};
  SessionOptions opts_;
  std::mt19937_64 rng_{7};

  void SetUp() override {
    opts_.chunker = {8, 24};
    opts_.mode = SelectionMode::kDense;
    pool_ = std::move(*CreateHostPool({256ull << 20, 1ull << 20}));
    ref_pool_ = std::move(*CreateHostPool({256ull << 20, 1ull << 20}));
    s_ = std::shared_ptr<Session>(std::move(*Session::Create(1, "t", prof_, opts_, pool_.get())));
    ref_ = std::move(*Session::Create(1, "t", prof_, opts_, ref_pool_.get()));
  }

  size_t Row() const { return prof_.head_dim * DTypeSize(prof_.dtype); }
  size_t Half(uint32_t n) const { return size_t{prof_.layers} * prof_.kv_heads * n * Row(); }

  Msg Make(uint32_t n) {
    Msg m;
    m.n = n;
    m.kv = RandomTensor(rng_, prof_.dtype, 2 * Half(n) / DTypeSize(prof_.dtype));
    m.bounds.resize(n);
    std::discrete_distribution<int> cls({30, 50, 8, 6, 4, 2});
    for (auto& b : m.bounds) b = static_cast<uint8_t>(cls(rng_));
    return m;
  }

  // The transport's part: plan, then receive (pieces into the pool, the rest into the buffer,
  // whose landed ranges keep garbage).
  // `place` false: an eager message (recorded in flight, received whole).
  void Receive(Msg* m, bool place = true) {
    m->buf.assign(kPad + m->kv.size(), 0xAB);
    m->landing = Session::PlanLanding(s_, m->n, m->bounds.data(), kPad, place);
    ASSERT_NE(m->landing, nullptr);  // host pool: always at least tracked
    std::vector<bool> landed(m->buf.size(), false);
    if (m->landing->placed) {
      m->landing->data = m->buf.data();
      for (const auto& p : m->landing->pieces) {
        ASSERT_GE(p.msg_offset, kPad);
        ASSERT_LE(p.msg_offset + p.bytes, m->buf.size());
        std::memcpy(m->landing->pool_base + p.pool_offset, m->kv.data() + (p.msg_offset - kPad), p.bytes);
        for (uint64_t i = 0; i < p.bytes; ++i) landed[p.msg_offset + i] = true;
      }
    }
    for (size_t i = kPad; i < m->buf.size(); ++i)
      if (!landed[i]) m->buf[i] = m->kv[i - kPad];
  }

  // The handler's part, on both sessions; both must agree.
  void Handle(Msg* m) {
    const uint8_t* k = m->buf.data() + kPad;
    auto r = s_->AppendKV(m->n, k, k + Half(m->n), m->bounds.data(), m->landing.get());
    m->landing.reset();
    auto rr = ref_->AppendKV(m->n, m->kv.data(), m->kv.data() + Half(m->n), m->bounds.data());
    ASSERT_EQ(r.ok(), rr.ok()) << r.status().ToString() << " vs " << rr.status().ToString();
    if (r.ok()) {
      EXPECT_EQ(r->tokens, rr->tokens);
      EXPECT_EQ(r->chunks, rr->chunks);
      EXPECT_EQ(r->sealed, rr->sealed);
    } else {
      EXPECT_EQ(r.status().ToString(), rr.status().ToString());
    }
    ExpectSame();
  }

  // Same tokens, chunks, tail, bytes, and bit-identical dense attention in every layer.
  void ExpectSame() {
    const auto a = s_->Stats(), b = ref_->Stats();
    EXPECT_EQ(a.tokens, b.tokens);
    EXPECT_EQ(a.chunks, b.chunks);
    EXPECT_EQ(a.tail_tokens, b.tail_tokens);
    EXPECT_EQ(a.bytes, b.bytes);
    if (a.tokens == 0) return;
    std::vector<float> q(prof_.q_heads * prof_.head_dim);
    std::normal_distribution<float> n01;
    for (auto& x : q) x = n01(rng_);
    for (uint32_t l = 0; l < prof_.layers; ++l) {
      std::vector<float> out1(q.size()), out2(q.size());
      Session* sessions[2] = {s_.get(), ref_.get()};
      std::vector<float>* outs[2] = {&out1, &out2};
      for (int i = 0; i < 2; ++i) {
        AttendArgs x;
        x.layer = l;
        x.q = q.data();
        x.q_dtype = DType::kF32;
        x.out = outs[i]->data();
        x.out_dtype = DType::kF32;
        ASSERT_TRUE(sessions[i]->Attend(x, nullptr).ok());
      }
      EXPECT_EQ(std::memcmp(out1.data(), out2.data(), out1.size() * sizeof(float)), 0) << "layer " << l;
    }
  }

  std::unique_ptr<KVPool> pool_, ref_pool_;
  std::shared_ptr<Session> s_;
  std::unique_ptr<Session> ref_;
};

TEST_F(Landing, OneAtATime) {
  int planned = 0;
  for (int i = 0; i < 20; ++i) {
    Msg m = Make(1 + static_cast<uint32_t>(rng_() % 90));
    Receive(&m);
    planned += m.landing->placed;
    Handle(&m);
  }
  EXPECT_GT(planned, 10);  // the first append of a session never lands; most later ones seal
}

TEST_F(Landing, SeveralPlansAhead) {
  Msg first = Make(40);
  Receive(&first);
  Handle(&first);
  const uint64_t gathered = GlobalMetrics().append_gathered.load();
  const uint64_t landed = GlobalMetrics().append_landed.load();
  for (int round = 0; round < 6; ++round) {
    std::vector<Msg> ms;
    for (int i = 0; i < 5; ++i) ms.push_back(Make(1 + static_cast<uint32_t>(rng_() % 70)));
    for (auto& m : ms) Receive(&m);
    int planned = 0;
    for (auto& m : ms) planned += m.landing->placed;
    EXPECT_GE(planned, 3);
    for (auto& m : ms) Handle(&m);
  }
  EXPECT_EQ(GlobalMetrics().append_gathered.load(), gathered) << "a plan made ahead did not hold";
  EXPECT_GE(GlobalMetrics().append_landed.load(), landed + 18);
  s_.reset();
  EXPECT_EQ(pool_->allocator().allocated_bytes(), 0u) << "blocks leaked";
}

TEST_F(Landing, FailedAppendInvalidatesLaterPlans) {
  Msg first = Make(50);
  Receive(&first);
  Handle(&first);
  Msg a = Make(60), b = Make(60), c = Make(60);
  // A NaN in a row of a's that lands in a chunk: a is refused, so b's and c's plans (made
  // assuming a) no longer hold.
  StoreFromFloat(a.kv.data(), prof_.dtype, 3, std::numeric_limits<float>::quiet_NaN());
  Receive(&a);
  Receive(&b);
  Receive(&c);
  ASSERT_TRUE(a.landing->placed);
  ASSERT_TRUE(b.landing->placed);
  Handle(&a);
  Handle(&b);
  Handle(&c);
  // Planning resumes once the session is quiet again.
  Msg d = Make(60);
  Receive(&d);
  EXPECT_TRUE(d.landing->placed);
  Handle(&d);
}

// Eager messages are only recorded, yet the plans after them account for their tokens; an
// append the transport never saw (keys + values form) makes the next plan miss, once.
TEST_F(Landing, EagerAndUnseenAppends) {
  Msg first = Make(30);
  Receive(&first);
  Handle(&first);
  const uint64_t gathered = GlobalMetrics().append_gathered.load();
  for (int round = 0; round < 4; ++round) {
    std::vector<Msg> ms;
    for (int i = 0; i < 6; ++i) ms.push_back(Make(1 + static_cast<uint32_t>(rng_() % 50)));
    for (size_t i = 0; i < ms.size(); ++i) Receive(&ms[i], /*place=*/i % 2 == 0);
    for (auto& m : ms) Handle(&m);
  }
  EXPECT_EQ(GlobalMetrics().append_gathered.load(), gathered) << "eager appends broke the prediction";
  Msg a = Make(60);
  Receive(&a);
  EXPECT_TRUE(a.landing->placed);
  Msg unseen = Make(17);  // straight to both sessions, no landing
  unseen.buf.assign(kPad, 0);
  unseen.buf.insert(unseen.buf.end(), unseen.kv.begin(), unseen.kv.end());
  Handle(&unseen);
  Handle(&a);  // mispredicted: gathered, same result
  EXPECT_EQ(GlobalMetrics().append_gathered.load(), gathered + 1);
  Msg b = Make(60);
  Receive(&b);
  EXPECT_TRUE(b.landing->placed);
  Handle(&b);
  s_.reset();
  EXPECT_EQ(pool_->allocator().allocated_bytes(), 0u) << "blocks leaked";
}

TEST_F(Landing, DroppedPlanAndDecodeStep) {
  Msg first = Make(50);
  Receive(&first);
  Handle(&first);
  // A plan whose message never reaches the handler (a refused or failed receive).
  Msg lost = Make(60);
  Receive(&lost);
  ASSERT_TRUE(lost.landing->placed);
  Msg b = Make(60);
  Receive(&b);
  lost.landing.reset();
  Handle(&b);  // b's plan assumed `lost`
  // A plan made before a decode step (Attend with new k/v in every layer) changes the tail.
  Msg c = Make(60);
  Receive(&c);
  const size_t one = size_t{prof_.kv_heads} * prof_.head_dim;
  auto nk = RandomTensor(rng_, prof_.dtype, one * prof_.layers);
  auto nv = RandomTensor(rng_, prof_.dtype, one * prof_.layers);
  std::vector<float> q(prof_.q_heads * prof_.head_dim, 0.5f), out(q.size());
  for (Session* s : {static_cast<Session*>(s_.get()), ref_.get()}) {
    for (uint32_t l = 0; l < prof_.layers; ++l) {
      AttendArgs x;
      x.layer = l;
      x.q = q.data();
      x.q_dtype = DType::kF32;
      x.new_k = nk.data() + l * one * DTypeSize(prof_.dtype);
      x.new_v = nv.data() + l * one * DTypeSize(prof_.dtype);
      x.out = out.data();
      x.out_dtype = DType::kF32;
      ASSERT_TRUE(s->Attend(x, nullptr).ok());
    }
  }
  Handle(&c);
  Msg d = Make(60);
  Receive(&d);
  Handle(&d);
  s_.reset();
  EXPECT_EQ(pool_->allocator().allocated_bytes(), 0u) << "blocks leaked";
}

}  // namespace
}  // namespace kvmem
