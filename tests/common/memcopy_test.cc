#include "common/memcopy.h"

#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "testing/seed.h"

namespace kvmem {
namespace {

// Every length and misalignment around the vector widths copies exactly, and the check finds a
// single non-finite element wherever it sits (head, body, remainder).
TEST(MemCopy, StreamingCopyIsExactAtEveryAlignmentAndLength) {
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  std::vector<uint8_t> src(9000), dst(9100);
  for (auto& x : src) x = static_cast<uint8_t>(rng());
  for (size_t len : {0ul, 1ul, 31ul, 1023ul, 1024ul, 1025ul, 4096ul, 4097ul, 8191ul}) {
    for (size_t shift : {0ul, 1ul, 2ul, 30ul, 32ul}) {
      std::fill(dst.begin(), dst.end(), 0xAB);
      StreamingCopy(dst.data() + shift, src.data() + 3, len);
      ASSERT_EQ(0, std::memcmp(dst.data() + shift, src.data() + 3, len)) << len << "/" << shift;
      ASSERT_EQ(dst[shift + len], 0xAB) << "wrote past the end";
      if (shift > 0) {
        ASSERT_EQ(dst[shift - 1], 0xAB) << "wrote before the start";
      }
    }
  }
}

TEST(MemCopy, CheckedCopyFindsEveryNonFiniteElement) {
  std::mt19937_64 rng = ::kvmem::testing::SeededRng();
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    const size_t es = DTypeSize(t);
    const size_t n = 1507;  // elements: several vector blocks plus a remainder
    std::vector<uint8_t> src(n * es), dst(n * es + 64);
    std::normal_distribution<float> g;
    for (size_t i = 0; i < n; ++i) StoreFromFloat(src.data(), t, i, g(rng));
    for (size_t shift : {0ul, 2ul, 4ul, 36ul}) {
      if (shift % es) continue;
      EXPECT_FALSE(StreamingCopyChecked(dst.data() + shift, src.data(), n * es, t));
      EXPECT_EQ(0, std::memcmp(dst.data() + shift, src.data(), n * es));
      for (size_t at : {0ul, 1ul, n / 2, n - 2, n - 1}) {
        for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
          auto s2 = src;
          StoreFromFloat(s2.data(), t, at, bad);
          EXPECT_TRUE(StreamingCopyChecked(dst.data() + shift, s2.data(), n * es, t))
              << DTypeName(t) << " element " << at << " shift " << shift;
          EXPECT_EQ(0, std::memcmp(dst.data() + shift, s2.data(), n * es));
        }
      }
    }
  }
}

// The checked copies (fenced and unfenced) against memcpy + the scalar HasNonFinite: every
// length from 0 to past the streaming threshold in odd steps, source and destination at every
// offset within a line (element-aligned or not: the fallback), NaN / +Inf / -Inf at the first,
// last and a middle element, the bytes around the destination untouched.
TEST(MemCopy, CheckedCopiesMatchMemcpyAndScalarCheck) {
  std::mt19937_64 rng(7);
  const float bads[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity()};
  std::vector<size_t> lengths;  // elements
  for (size_t n = 0; n < 40; ++n) lengths.push_back(n);
  for (size_t n : {255ul, 511ul, 512ul, 513ul, 1023ul, 1025ul, 2049ul, 4099ul}) lengths.push_back(n);
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    const size_t es = DTypeSize(t);
    for (size_t n : lengths) {
      const size_t bytes = n * es;
      std::vector<uint8_t> src(bytes + 128), dst(bytes + 256), ref(bytes + 256);
      // Bytes below 0x40: finite however they pair into elements (the exponent's top bits clear),
      // at any source offset.
      for (auto& x : src) x = static_cast<uint8_t>(rng() & 0x3f);
      for (size_t so : {0ul, 1ul, 2ul, 4ul, 17ul, 32ul, 63ul}) {
        for (size_t dof : {0ul, 1ul, 2ul, 4ul, 16ul, 33ul, 62ul, 64ul}) {
          for (int at = -1; at < 3; ++at) {  // -1: all finite; else first / middle / last
            if (at >= 0 && n == 0) continue;
            std::vector<uint8_t> s2(src);
            const size_t elem = at == 0 ? 0 : at == 1 ? n / 2 : n - 1;
            // Write the bad value at byte offset so + elem * es (unaligned stores via memcpy).
            if (at >= 0) {
              std::vector<uint8_t> one(es);
              StoreFromFloat(one.data(), t, 0, bads[(so + dof + static_cast<size_t>(at)) % 3]);
              std::memcpy(s2.data() + so + elem * es, one.data(), es);
            }
            const uint8_t* sp = s2.data() + so;
            const bool want = HasNonFinite(sp, t, n);
            ASSERT_EQ(want, at >= 0);
            for (int fenced = 0; fenced < 2; ++fenced) {
              std::fill(dst.begin(), dst.end(), 0x5A);
              ref = dst;
              std::memcpy(ref.data() + 64 + dof, sp, bytes);
              const bool got = fenced ? StreamingCopyChecked(dst.data() + 64 + dof, sp, bytes, t)
                                      : StreamingCopyCheckedUnfenced(dst.data() + 64 + dof, sp, bytes, t);
              if (!fenced) StreamingFence();
              ASSERT_EQ(got, want) << DTypeName(t) << " n " << n << " src+" << so << " dst+" << dof << " at " << at;
              ASSERT_EQ(dst, ref) << DTypeName(t) << " n " << n << " src+" << so << " dst+" << dof;
            }
          }
        }
      }
    }
  }
}

// The unchecked copies (fenced and unfenced): odd byte lengths, every misalignment.
TEST(MemCopy, UnfencedCopyIsExact) {
  std::mt19937_64 rng(3);
  std::vector<uint8_t> src(9000), dst(9300);
  for (auto& x : src) x = static_cast<uint8_t>(rng());
  for (size_t len : {0ul, 1ul, 63ul, 64ul, 65ul, 1023ul, 1024ul, 1025ul, 1087ul, 4096ul, 8191ul}) {
    for (size_t so : {0ul, 3ul, 64ul}) {
      for (size_t dof : {0ul, 1ul, 31ul, 32ul, 48ul, 64ul}) {
        std::vector<uint8_t> ref(dst.size(), 0xCD);
        std::fill(dst.begin(), dst.end(), 0xCD);
        std::memcpy(ref.data() + 100 + dof, src.data() + so, len);
        StreamingCopyUnfenced(dst.data() + 100 + dof, src.data() + so, len);
        StreamingFence();
        ASSERT_EQ(dst, ref) << len << " src+" << so << " dst+" << dof;
      }
    }
  }
}

// HasNonFinite reads a source at any address (a piece of a message), finding the bad element.
TEST(MemCopy, NonFiniteCheckAtUnalignedSource) {
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
    const size_t es = DTypeSize(t);
    const size_t n = 700;
    std::vector<uint8_t> buf(n * es + 8, 0);
    for (size_t off = 1; off < es + 2; ++off) {
      std::fill(buf.begin(), buf.end(), 0);
      EXPECT_FALSE(HasNonFinite(buf.data() + off, t, n));
      std::vector<uint8_t> one(es);
      StoreFromFloat(one.data(), t, 0, std::numeric_limits<float>::infinity());
      std::memcpy(buf.data() + off + (n - 1) * es, one.data(), es);
      EXPECT_TRUE(HasNonFinite(buf.data() + off, t, n)) << DTypeName(t) << " +" << off;
      EXPECT_FALSE(HasNonFinite(buf.data() + off, t, n - 1)) << DTypeName(t) << " +" << off;
    }
  }
}

}  // namespace
}  // namespace kvmem
