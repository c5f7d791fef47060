#include "common/memcopy.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvmem {
namespace {

#if defined(__x86_64__)
__attribute__((target("avx2"))) void StreamAvx2(uint8_t* d, const uint8_t* s, size_t n) {
  // Align the destination to 32 bytes with an ordinary copy, stream the body, copy the rest.
  const size_t head = (32 - (reinterpret_cast<uintptr_t>(d) & 31)) & 31;
  std::memcpy(d, s, head);
  d += head;
  s += head;
  n -= head;
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
  }
  std::memcpy(d + i, s + i, n - i);
  _mm_sfence();
}

// The same with a non-finite check: an element is NaN or Inf when its exponent bits are all ones.
__attribute__((target("avx2"))) bool StreamCheckAvx2(uint8_t* d, const uint8_t* s, size_t n, DType t) {
  const size_t head = (32 - (reinterpret_cast<uintptr_t>(d) & 31)) & 31;
  bool bad = HasNonFinite(s, t, head / DTypeSize(t));
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
    if (wide) {
      acc = _mm256_or_si256(acc, _mm256_or_si256(_mm256_cmpeq_epi32(_mm256_and_si256(a, m), m),
                                                 _mm256_cmpeq_epi32(_mm256_and_si256(b, m), m)));
      acc = _mm256_or_si256(acc, _mm256_or_si256(_mm256_cmpeq_epi32(_mm256_and_si256(c, m), m),
                                                 _mm256_cmpeq_epi32(_mm256_and_si256(e, m), m)));
    } else {
      acc = _mm256_or_si256(acc, _mm256_or_si256(_mm256_cmpeq_epi16(_mm256_and_si256(a, m), m),
                                                 _mm256_cmpeq_epi16(_mm256_and_si256(b, m), m)));
      acc = _mm256_or_si256(acc, _mm256_or_si256(_mm256_cmpeq_epi16(_mm256_and_si256(c, m), m),
                                                 _mm256_cmpeq_epi16(_mm256_and_si256(e, m), m)));
    }
  }
  bad = bad || !_mm256_testz_si256(acc, acc);
  bad = bad || HasNonFinite(s + i, t, (n - i) / DTypeSize(t));
  std::memcpy(d + i, s + i, n - i);
  _mm_sfence();
  return bad;
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#endif

}  // namespace

void StreamingCopy(void* dst, const void* src, size_t bytes) {
#if defined(__x86_64__)
  if (kHasAvx2 && bytes >= kStreamingMinBytes) {
    StreamAvx2(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), bytes);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

bool StreamingCopyChecked(void* dst, const void* src, size_t bytes, DType dtype) {
#if defined(__x86_64__)
  // Element-aligned pieces only: the vector loop relies on lanes lining up with elements.
  if (kHasAvx2 && bytes >= kStreamingMinBytes && bytes % DTypeSize(dtype) == 0 &&
      reinterpret_cast<uintptr_t>(dst) % DTypeSize(dtype) == 0) {
    return StreamCheckAvx2(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), bytes, dtype);
  }
#endif
  const bool bad = HasNonFinite(src, dtype, bytes / DTypeSize(dtype));
  std::memcpy(dst, src, bytes);
  return bad;
}

}  // namespace kvmem
