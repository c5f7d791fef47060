#include "daemon/kv_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "common/dtype.h"
#include "daemon/parallel.h"
#include "testing/seed.h"

namespace kvmem {
namespace {

TEST(SlabAllocator, RandomAllocFreeKeepsBlocksDisjointAndReturnsToZero) {
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  auto a = SlabAllocator::Create({64ull << 20, 1ull << 20});
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  SlabAllocator& alloc = **a;
  std::map<uint64_t, uint64_t> live;  // offset -> reserved bytes
  std::uniform_int_distribution<uint64_t> size(1, 600 << 10);
  for (int step = 0; step < 20000; ++step) {
    if (live.empty() || rng() % 3 != 0) {
      const uint64_t n = rng() % 10 == 0 ? size(rng) * 4 : size(rng) / 16 + 1;
      auto off = alloc.Allocate(n);
      if (!off.ok()) {
        EXPECT_EQ(off.status().code(), StatusCode::kResourceExhausted);
        continue;
      }
      EXPECT_EQ(*off % 64, 0u);
      const uint64_t r = alloc.ReservedBytes(n);
      EXPECT_GE(r, n);
      EXPECT_LE(*off + r, alloc.capacity_bytes());
      // Disjoint from neighbours.
      auto next = live.lower_bound(*off);
      if (next != live.end()) {
        EXPECT_LE(*off + r, next->first);
      }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        EXPECT_LE(prev->first + prev->second, *off);
      }
      live[*off] = r;
    } else {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      alloc.Free(it->first);
      live.erase(it);
    }
  }
  uint64_t sum = 0;
  for (auto& [o, r] : live) sum += r;
  EXPECT_EQ(alloc.allocated_bytes(), sum);
  for (auto& [o, r] : live) alloc.Free(o);
  EXPECT_EQ(alloc.allocated_bytes(), 0u);
  EXPECT_EQ(alloc.slabs_in_use(), 0u);
  EXPECT_EQ(alloc.live_blocks(), 0u);
}

TEST(SlabAllocator, ClassWasteIsBounded) {
  auto a = SlabAllocator::Create({64ull << 20, 4ull << 20});
  ASSERT_TRUE(a.ok());
  for (uint64_t n = 513; n < (1u << 20); n = n * 9 / 8 + 7) {
    EXPECT_LE((*a)->ReservedBytes(n), n + n / 8 + 64) << n;
  }
}

TEST(SlabAllocator, ExhaustionIsAClearError) {
  auto a = SlabAllocator::Create({2ull << 20, 1ull << 20});
  ASSERT_TRUE(a.ok());
  auto big = (*a)->Allocate(3ull << 20);
  EXPECT_EQ(big.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(big.status().message().find("exceeds"), std::string::npos);
  auto x = (*a)->Allocate(1ull << 20);
  auto y = (*a)->Allocate(1ull << 20);
  ASSERT_TRUE(x.ok() && y.ok());
  EXPECT_EQ((*a)->Allocate(100).status().code(), StatusCode::kResourceExhausted);
  (*a)->Free(*x);
  EXPECT_TRUE((*a)->Allocate(100).ok());
}

// Idle trim (kvmemd idle_trim_seconds): retained free slabs go back on request, once each.
TEST(SlabAllocator, ReleaseRetainedGivesBackWarmSlabsOnce) {
  std::vector<std::pair<uint64_t, uint64_t>> released;
  auto a = SlabAllocator::Create({16ull << 20, 1ull << 20, 4ull << 20},
                                 [&](uint64_t off, uint64_t bytes) { released.push_back({off, bytes}); });
  ASSERT_TRUE(a.ok());
  std::vector<uint64_t> blocks;
  for (int i = 0; i < 6; ++i) blocks.push_back(*(*a)->Allocate(1ull << 20));  // one slab each
  EXPECT_EQ((*a)->allocation_count(), 6u);
  for (uint64_t b : blocks) (*a)->Free(b);
  // 4 slabs stay resident (retain_bytes), 2 were released at once.
  EXPECT_EQ(released.size(), 2u);
  EXPECT_EQ((*a)->ReleaseRetained(), 4ull << 20);
  EXPECT_EQ(released.size(), 6u);
  std::set<uint64_t> offsets;
  for (auto& [off, bytes] : released) {
    EXPECT_EQ(bytes, 1ull << 20);
    offsets.insert(off);
  }
  EXPECT_EQ(offsets.size(), 6u);  // every slab released exactly once
  EXPECT_EQ((*a)->ReleaseRetained(), 0u);
  // The released slabs are allocatable again.
  for (int i = 0; i < 16; ++i) EXPECT_TRUE((*a)->Allocate(1ull << 20).ok()) << i;
  EXPECT_EQ((*a)->allocation_count(), 22u);
}

TEST(SlabAllocator, RejectsBadOptions) {
  EXPECT_FALSE(SlabAllocator::Create({1ull << 20, 3ull << 20}).ok());
  EXPECT_FALSE(SlabAllocator::Create({1ull << 10, 1ull << 20}).ok());
}

TEST(HostPool, CopiesRoundTrip) {
  auto p = CreateHostPool({8ull << 20, 1ull << 20});
  ASSERT_TRUE(p.ok());
  auto off = (*p)->Allocate(4096);
  ASSERT_TRUE(off.ok());
  std::vector<uint8_t> in(4096), out(4096);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>(i * 7);
  ASSERT_TRUE((*p)->CopyIn(*off, in.data(), in.size()).ok());
  ASSERT_TRUE((*p)->CopyWithin(*off + 1024, *off, 1024).ok());
  ASSERT_TRUE((*p)->CopyOut(out.data(), *off, out.size()).ok());
  for (size_t i = 0; i < 1024; ++i) EXPECT_EQ(out[1024 + i], in[i]);
  (*p)->Free(*off);
}

// MoveWithin: moves whose destination overlaps their own source, both directions, in one batch
// (a seal's tail shift); a copy from host memory in it is refused.
TEST(HostPool, MoveWithinIsMemmovePerOp) {
  auto p = CreateHostPool({8ull << 20, 1ull << 20});
  ASSERT_TRUE(p.ok());
  auto off = (*p)->Allocate(8192);
  ASSERT_TRUE(off.ok());
  std::vector<uint8_t> in(8192), out(8192);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>(i * 7 + 3);
  ASSERT_TRUE((*p)->CopyIn(*off, in.data(), in.size()).ok());
  const PoolCopy moves[2] = {{*off, nullptr, *off + 300, 2000},           // left, overlapping
                             {*off + 4096 + 500, nullptr, *off + 4096, 3000}};  // right, overlapping
  ASSERT_TRUE((*p)->MoveWithin(moves).ok());
  std::vector<uint8_t> want = in;
  std::memmove(want.data(), want.data() + 300, 2000);
  std::memmove(want.data() + 4096 + 500, want.data() + 4096, 3000);
  ASSERT_TRUE((*p)->CopyOut(out.data(), *off, out.size()).ok());
  EXPECT_EQ(out, want);
  const PoolCopy from_host{*off, in.data(), 0, 16};
  EXPECT_EQ((*p)->MoveWithin(std::span<const PoolCopy>(&from_host, 1)).code(), StatusCode::kInvalidArgument);
  (*p)->Free(*off);
}

// CopyOutBatch: many reads (odd lengths, unaligned offsets, one empty) in one call equal the
// bytes CopyIn put there, on the host pool and (when a GPU is visible) the device pool, whose
// batch goes through pinned staging with one wait; reads enqueued after copies in see them.
void ExpectBatchedReadsMatch(KVPool& p, std::mt19937_64& rng) {
  auto off = p.Allocate(64 << 10);
  ASSERT_TRUE(off.ok());
  std::vector<uint8_t> in(64 << 10);
  for (auto& b : in) b = static_cast<uint8_t>(rng());
  ASSERT_TRUE(p.CopyIn(*off, in.data(), in.size()).ok());
  std::vector<std::vector<uint8_t>> outs;
  std::vector<uint64_t> at;
  for (int i = 0; i < 9; ++i) {
    const uint64_t len = i == 4 ? 0 : 1 + rng() % 5000;
    at.push_back(rng() % (in.size() - len));
    outs.emplace_back(len + 1, 0xab);  // a guard byte past each read
  }
  std::vector<PoolRead> reads;
  for (size_t i = 0; i < outs.size(); ++i) reads.push_back({outs[i].data(), *off + at[i], outs[i].size() - 1});
  ASSERT_TRUE(p.CopyOutBatch(reads).ok());
  for (size_t i = 0; i < outs.size(); ++i) {
    const size_t len = outs[i].size() - 1;
    EXPECT_TRUE(std::equal(outs[i].begin(), outs[i].begin() + len, in.begin() + at[i])) << "read " << i;
    EXPECT_EQ(outs[i][len], 0xab) << "read " << i << " wrote past its end";
  }
  p.Free(*off);
}

TEST(PoolReads, HostPoolCopyOutBatchMatchesWhatWasCopiedIn) {
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  auto host = CreateHostPool({8ull << 20, 1ull << 20});
  ASSERT_TRUE(host.ok());
  ExpectBatchedReadsMatch(**host, rng);
}

TEST(PoolReads, DevicePoolCopyOutBatchMatchesWhatWasCopiedIn) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible: device pool test skipped";
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  auto dev = CreateDevicePool({8ull << 20, 1ull << 20}, 0);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  ExpectBatchedReadsMatch(**dev, rng);
}

// The host pool's attention spreads (problem, KV head) pairs over the workers it is given: the
// same bytes as on one thread (each head is computed whole by one thread), for two problems of
// 8 KV heads with per-head spans, and every head's output written.
TEST(HostPool, AttendOnWorkersMatchesOneThread) {
  auto p = CreateHostPool({64ull << 20, 1ull << 20});
  ASSERT_TRUE(p.ok());
  constexpr uint32_t kHq = 16, kHkv = 8, kD = 64, kChunks = 12;
  std::mt19937 rng(3);
  std::normal_distribution<float> n01;
  std::vector<kernels::KVSpan> spans;
  std::vector<uint32_t> head_begin;
  std::vector<uint64_t> blocks;
  for (uint32_t c = 0; c < kChunks; ++c) {
    const uint32_t len = 8 + rng() % 17;
    auto off = (*p)->Allocate(uint64_t{2} * kHkv * len * kD * 2);
    ASSERT_TRUE(off.ok());
    blocks.push_back(*off);
    std::vector<uint16_t> kv(size_t{2} * kHkv * len * kD);
    for (auto& x : kv) x = FloatToBF16(n01(rng));
    ASSERT_TRUE((*p)->CopyIn(*off, kv.data(), kv.size() * 2).ok());
    spans.push_back({*off / 2, len, 0, len});  // element offsets
  }
  std::vector<kernels::KVSpan> per_head;  // head h attends every chunk but the h-th
  for (uint32_t h = 0; h < kHkv; ++h) {
    head_begin.push_back(static_cast<uint32_t>(per_head.size()));
    for (uint32_t c = 0; c < kChunks; ++c) {
      if (c != h) per_head.push_back(spans[c]);
    }
  }
  head_begin.push_back(static_cast<uint32_t>(per_head.size()));
  std::vector<uint16_t> q(size_t{2} * kHq * kD);
  for (auto& x : q) x = FloatToBF16(n01(rng));
  auto run = [&](ParallelPool* workers, std::vector<uint16_t>* out, std::vector<float>* lse) {
    out->assign(size_t{2} * kHq * kD, 0xffff);
    lse->assign(size_t{2} * kHq, 7.f);
    kernels::AttendProblem pr[2];
    for (int i = 0; i < 2; ++i) {
      pr[i] = kernels::AttendProblem{nullptr, DType::kBF16, kHq, kHkv, kD, 0.125f, q.data() + i * kHq * kD,
                                     DType::kBF16, i == 0 ? spans.data() : per_head.data(),
                                     i == 0 ? nullptr : head_begin.data(),
                                     static_cast<uint32_t>(i == 0 ? spans.size() : per_head.size()),
                                     out->data() + i * kHq * kD, DType::kBF16, lse->data() + i * kHq};
    }
    ASSERT_TRUE((*p)->Attend(pr, 2, workers).ok());
  };
  std::vector<uint16_t> out1, out3;
  std::vector<float> lse1, lse3;
  run(nullptr, &out1, &lse1);
  ParallelPool workers(3);
  run(&workers, &out3, &lse3);
  EXPECT_EQ(out1, out3);
  EXPECT_EQ(lse1, lse3);
  for (uint16_t x : out1) EXPECT_NE(x, 0xffff);  // every head's rows written
  for (float x : lse1) EXPECT_NE(x, 7.f);
  for (uint64_t b : blocks) (*p)->Free(b);
}

}  // namespace
}  // namespace kvmem
