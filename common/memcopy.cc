#include "common/memcopy.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvmem {
namespace {

#if defined(__x86_64__)
// Lanes of v whose exponent bits (mask m) are all ones: 32-bit lanes when wide, else 16-bit.
__attribute__((target("avx2"))) inline __m256i Hits(__m256i v, __m256i m, bool wide) {
  return wide ? _mm256_cmpeq_epi32(_mm256_and_si256(v, m), m) : _mm256_cmpeq_epi16(_mm256_and_si256(v, m), m);
}

// Streams n bytes (>= kStreamingMinBytes) from s to d: an ordinary copy up to d's 64-byte (line)
// alignment, non-temporal stores for the body (whole lines), an ordinary copy of the rest. With
// kCheck it also reports whether any element of type t is NaN or Inf (exponent bits all ones),
// testing the loaded vectors. kFence: end with a store fence.
template <bool kCheck, bool kFence>
__attribute__((target("avx2"))) bool StreamAvx2(uint8_t* d, const uint8_t* s, size_t n, DType t) {
  // Up to a line boundary (64 bytes, not just the vector's 32): a line written partly with
  // ordinary stores and partly with streaming ones is flushed from the write-combining buffer as a
  // partial write, which costs more than the line (pieces 16 bytes past a line: 3 GB/s at 4 KiB).
  const size_t head = (64 - (reinterpret_cast<uintptr_t>(d) & 63)) & 63;
  bool bad = kCheck && HasNonFinite(s, t, head / DTypeSize(t));
  std::memcpy(d, s, head);
  d += head;
  s += head;
  n -= head;
  const bool wide = t == DType::kF32;
  const __m256i m = wide ? _mm256_set1_epi32(0x7f800000) : _mm256_set1_epi16(t == DType::kF16 ? 0x7c00 : 0x7f80);
  __m256i acc = _mm256_setzero_si256();
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 64));
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 96), e);
    if constexpr (kCheck) {
      acc = _mm256_or_si256(acc, _mm256_or_si256(_mm256_or_si256(Hits(a, m, wide), Hits(b, m, wide)),
                                                 _mm256_or_si256(Hits(c, m, wide), Hits(e, m, wide))));
    }
  }
  if constexpr (kCheck) {
    bad = bad || !_mm256_testz_si256(acc, acc);
    bad = bad || HasNonFinite(s + i, t, (n - i) / DTypeSize(t));
  }
  std::memcpy(d + i, s + i, n - i);
  if constexpr (kFence) _mm_sfence();
  return bad;
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#endif

template <bool kFence>
void Copy(void* dst, const void* src, size_t bytes) {
#if defined(__x86_64__)
  if (kHasAvx2 && bytes >= kStreamingMinBytes) {
    (void)StreamAvx2<false, kFence>(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), bytes,
                                    DType::kBF16);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

template <bool kFence>
bool CopyChecked(void* dst, const void* src, size_t bytes, DType dtype) {
#if defined(__x86_64__)
  // Element-aligned pieces only: the vector loop relies on lanes lining up with elements.
  if (kHasAvx2 && bytes >= kStreamingMinBytes && bytes % DTypeSize(dtype) == 0 &&
      reinterpret_cast<uintptr_t>(dst) % DTypeSize(dtype) == 0) {
    return StreamAvx2<true, kFence>(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), bytes, dtype);
  }
#endif
  const bool bad = HasNonFinite(src, dtype, bytes / DTypeSize(dtype));
  std::memcpy(dst, src, bytes);
  return bad;
}

}  // namespace

void StreamingCopy(void* dst, const void* src, size_t bytes) { Copy<true>(dst, src, bytes); }
bool StreamingCopyChecked(void* dst, const void* src, size_t bytes, DType dtype) {
  return CopyChecked<true>(dst, src, bytes, dtype);
}
void StreamingCopyUnfenced(void* dst, const void* src, size_t bytes) { Copy<false>(dst, src, bytes); }
bool StreamingCopyCheckedUnfenced(void* dst, const void* src, size_t bytes, DType dtype) {
  return CopyChecked<false>(dst, src, bytes, dtype);
}

void StreamingFence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace kvmem
