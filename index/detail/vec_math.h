// Small dense-vector helpers shared by the index and its tests. Internal: not part of the API.
//
// Dot() is the one inner product used for every score the index reports (exact chunk scores,
// bounds), so a brute-force reference written with it agrees with the search bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"

namespace kvmem::index::detail {

// Eight independent accumulators: lets the compiler vectorise without -ffast-math, and fixes
// the summation order so the result is reproducible.
inline float Dot(const float* a, const float* b, uint32_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (uint32_t j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
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
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
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
