// Small dense-vector helpers shared by the index and its tests. Internal: not part of the API.
//
// Dot() is the one inner product used for every score the index reports (exact chunk scores,
// bounds), so a brute-force reference written with it agrees with the search bit for bit.
#pragma once

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <cmath>
#include <cstdint>

#include "common/dtype.h"

namespace kvmem::index::detail {

// Dot() and SquaredDistanceF() sum n terms in eight lanes: lane j adds term(i + j) for each
// block of 8, then ((lane 0 + 4) + (1 + 5)) + ((2 + 6) + (3 + 7)), then the tail (n mod 8 terms)
// in order. The order is fixed, so results are reproducible, and the device search's dot
// products follow it (kernels/cuda/tree_search.cu: unfused multiply and add, the same lanes)
// so device and host scores agree bit for bit. The *Portable versions are that definition in
// scalar code; with SSE2 the lanes are two 4-float vectors, the same operations in the same
// order without the shuffles the compiler's own vectorisation of the scalar loop adds.

// The eight lanes' fold of the definition above, then the tail.
inline float FoldPortable(const float acc[8], float tail) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

inline float DotPortable(const float* a, const float* b, uint32_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (uint32_t j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return FoldPortable(acc, tail);
}

inline float SquaredDistancePortable(const float* a, const float* b, uint32_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (uint32_t j = 0; j < 8; ++j) {
      const float d = a[i + j] - b[i + j];
      acc[j] += d * d;
    }
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += (a[i] - b[i]) * (a[i] - b[i]);
  return FoldPortable(acc, tail);
}

#if defined(__SSE2__)
namespace sse {
// Lanes 0-3 in lo, 4-7 in hi, folded as the scalar definition does.
inline float Fold(__m128 lo, __m128 hi, float tail) {
  alignas(16) float t[4];
  _mm_store_ps(t, _mm_add_ps(lo, hi));  // t[j] = lane j + lane j + 4
  return ((t[0] + t[1]) + (t[2] + t[3])) + tail;
}
}  // namespace sse
#endif

inline float Dot(const float* a, const float* b, uint32_t n) {
#if defined(__SSE2__)
  __m128 lo = _mm_setzero_ps(), hi = _mm_setzero_ps();
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    lo = _mm_add_ps(lo, _mm_mul_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i)));
    hi = _mm_add_ps(hi, _mm_mul_ps(_mm_loadu_ps(a + i + 4), _mm_loadu_ps(b + i + 4)));
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return sse::Fold(lo, hi, tail);
#else
  return DotPortable(a, b, n);
#endif
}

// Dot(a, float(b), n) for a row b of bfloat16 bits: the same products, lanes and folds, so the
// same float as Dot over the row's float values (the cluster tree stores chunk centroids so).
inline float DotBF16(const float* a, const uint16_t* b, uint32_t n) {
#if defined(__SSE2__)
  __m128 lo = _mm_setzero_ps(), hi = _mm_setzero_ps();
  const __m128i zero = _mm_setzero_si128();
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i));
    const __m128 bl = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, h));  // bits << 16
    const __m128 bh = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, h));
    lo = _mm_add_ps(lo, _mm_mul_ps(_mm_loadu_ps(a + i), bl));
    hi = _mm_add_ps(hi, _mm_mul_ps(_mm_loadu_ps(a + i + 4), bh));
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * BF16ToFloat(b[i]);
  return sse::Fold(lo, hi, tail);
#else
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (uint32_t j = 0; j < 8; ++j) acc[j] += a[i + j] * BF16ToFloat(b[i + j]);
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * BF16ToFloat(b[i]);
  return FoldPortable(acc, tail);
#endif
}

// Dot(x[p], c, n) for four rows x[p] at once, c read once (k-means' assignment pass).
inline void Dot4(const float* const x[4], const float* c, uint32_t n, float out[4]) {
#if defined(__SSE2__)
  __m128 lo[4], hi[4];
  for (int p = 0; p < 4; ++p) lo[p] = hi[p] = _mm_setzero_ps();
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128 cl = _mm_loadu_ps(c + i), ch = _mm_loadu_ps(c + i + 4);
    for (int p = 0; p < 4; ++p) {
      lo[p] = _mm_add_ps(lo[p], _mm_mul_ps(_mm_loadu_ps(x[p] + i), cl));
      hi[p] = _mm_add_ps(hi[p], _mm_mul_ps(_mm_loadu_ps(x[p] + i + 4), ch));
    }
  }
  for (int p = 0; p < 4; ++p) {
    float tail = 0.f;
    for (uint32_t t = i; t < n; ++t) tail += x[p][t] * c[t];
    out[p] = sse::Fold(lo[p], hi[p], tail);
  }
#else
  for (int p = 0; p < 4; ++p) out[p] = DotPortable(x[p], c, n);
#endif
}

inline float Norm(const float* a, uint32_t n) { return std::sqrt(Dot(a, a, n)); }

// ‖a − b‖ in double: radii are derived from it, and they must not be rounded down.
inline double DistanceD(const float* a, const float* b, uint32_t n) {
  double s = 0.0;
  for (uint32_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    s += d * d;
  }
  return std::sqrt(s);
}

inline double SquaredDistanceF(const float* a, const float* b, uint32_t n) {
#if defined(__SSE2__)
  __m128 lo = _mm_setzero_ps(), hi = _mm_setzero_ps();
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128 dl = _mm_sub_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i));
    const __m128 dh = _mm_sub_ps(_mm_loadu_ps(a + i + 4), _mm_loadu_ps(b + i + 4));
    lo = _mm_add_ps(lo, _mm_mul_ps(dl, dl));
    hi = _mm_add_ps(hi, _mm_mul_ps(dh, dh));
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += (a[i] - b[i]) * (a[i] - b[i]);
  return sse::Fold(lo, hi, tail);
#else
  return SquaredDistancePortable(a, b, n);
#endif
}

// Smallest float >= x (x >= 0): a radius computed in double, stored as float, never shrinks.
inline float RoundUpToFloat(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, INFINITY);
  return f;
}

// Rounds a[0..n) to the nearest bfloat16 values (kept as float) and returns how far the vector
// moved, ‖a − round(a)‖ in double (0 when it already held bfloat16 values). A value beyond the
// bfloat16 range becomes infinite: callers check for that (SummarizeKeys after rounding,
// ClusterTree before storing).
inline double RoundToBF16(float* a, uint32_t n) {
  double s = 0.0;
  for (uint32_t i = 0; i < n; ++i) {
    const float r = BF16ToFloat(FloatToBF16(a[i]));
    const double d = static_cast<double>(a[i]) - static_cast<double>(r);
    s += d * d;
    a[i] = r;
  }
  return std::sqrt(s);
}

}  // namespace kvmem::index::detail
