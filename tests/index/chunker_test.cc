// Property tests for the boundary-aware chunker on random boundary streams.
#include "index/chunker.h"
#include "testing/seed.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>

namespace kvmem::index {
namespace {

std::vector<uint8_t> RandomClasses(std::mt19937_64& rng, size_t n) {
  // Mostly word boundaries, some punctuation, rare lines and sections, like real text.
  std::discrete_distribution<int> d({30, 50, 8, 6, 4, 2});
  std::vector<uint8_t> c(n);
  for (auto& x : c) x = static_cast<uint8_t>(d(rng));
  return c;
}

// The spec, written directly: strongest class among allowed ends, earliest among equals.
std::vector<uint32_t> ReferenceChunks(const std::vector<uint8_t>& c, ChunkerOptions o) {
  std::vector<uint32_t> out;
  size_t s = 0;
  while (c.size() - s >= o.max_tokens ||
         [&] {  // an early class-5 cut past the minimum is decidable before max tokens
           for (size_t len = o.min_tokens; len <= c.size() - s && len <= o.max_tokens; ++len)
             if (c[s + len - 1] >= 5) return true;
           return false;
         }()) {
    int best = 0;
    size_t best_len = o.max_tokens;
    for (size_t len = o.min_tokens; len <= o.max_tokens && s + len <= c.size(); ++len) {
      if (std::min<int>(c[s + len - 1], 5) > best) {
        best = std::min<int>(c[s + len - 1], 5);
        best_len = len;
      }
    }
    out.push_back(static_cast<uint32_t>(best_len));
    s += best_len;
  }
  return out;
}

class ChunkerProperty : public ::testing::TestWithParam<ChunkerOptions> {};

TEST_P(ChunkerProperty, MatchesSpecAndBatchingDoesNotMatter) {
  const ChunkerOptions o = GetParam();
  ASSERT_TRUE(Chunker::Validate(o).ok());
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  for (int trial = 0; trial < 50; ++trial) {
    const auto classes = RandomClasses(rng, 500 + rng() % 3000);

    Chunker all(o);
    std::vector<uint32_t> a;
    all.Push(classes, &a);

    Chunker one(o);
    std::vector<uint32_t> b;
    for (uint8_t c : classes) one.Push(std::span<const uint8_t>(&c, 1), &b);

    Chunker random_batches(o);
    std::vector<uint32_t> r;
    for (size_t i = 0; i < classes.size();) {
      const size_t n = std::min<size_t>(classes.size() - i, 1 + rng() % 50);
      random_batches.Push(std::span<const uint8_t>(classes.data() + i, n), &r);
      i += n;
    }

    EXPECT_EQ(a, b);
    EXPECT_EQ(a, r);
    EXPECT_EQ(a, ReferenceChunks(classes, o));

    // Every token is in exactly one chunk or the tail; lengths within bounds.
    uint64_t sum = 0;
    for (uint32_t len : a) {
      EXPECT_GE(len, o.min_tokens);
      EXPECT_LE(len, o.max_tokens);
      sum += len;
    }
    EXPECT_EQ(sum, all.sealed_tokens());
    EXPECT_EQ(sum + all.tail_tokens(), classes.size());
    EXPECT_LT(all.tail_tokens(), o.max_tokens);

    // Each cut is at the strongest available boundary (no stronger one in the window).
    size_t s = 0;
    for (uint32_t len : a) {
      const int cut = std::min<int>(classes[s + len - 1], 5);
      for (size_t l = o.min_tokens; l <= o.max_tokens && s + l <= classes.size(); ++l) {
        const int other = std::min<int>(classes[s + l - 1], 5);
        if (l < len) {
          EXPECT_LT(other, std::max(cut, 1)) << "an earlier boundary was as strong";
        }
        if (l > len && cut > 0) {
          EXPECT_LE(other, cut);
        }
      }
      s += len;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Options, ChunkerProperty,
                         ::testing::Values(ChunkerOptions{8, 24}, ChunkerOptions{8, 16},
                                           ChunkerOptions{1, 1}, ChunkerOptions{4, 64},
                                           ChunkerOptions{16, 16}));

TEST(Chunker, ForcedCutWithoutBoundaries) {
  Chunker c({8, 24});
  std::vector<uint8_t> zeros(100, 0);
  std::vector<uint32_t> sealed;
  c.Push(zeros, &sealed);
  EXPECT_EQ(sealed, (std::vector<uint32_t>{24, 24, 24, 24}));
  EXPECT_EQ(c.tail_tokens(), 4u);
  EXPECT_EQ(c.SealTail(), 4u);
  EXPECT_EQ(c.tail_tokens(), 0u);
}

TEST(Chunker, SectionBoundaryCutsEarly) {
  Chunker c({4, 32});
  std::vector<uint8_t> cl(6, 1);
  cl[5] = 5;  // section end at token 6
  std::vector<uint32_t> sealed;
  c.Push(cl, &sealed);
  EXPECT_EQ(sealed, (std::vector<uint32_t>{6}));
}

TEST(Chunker, Validate) {
  EXPECT_FALSE(Chunker::Validate({0, 8}).ok());
  EXPECT_FALSE(Chunker::Validate({9, 8}).ok());
  EXPECT_FALSE(Chunker::Validate({8, 100000}).ok());
}

}  // namespace
}  // namespace kvmem::index
