// Element types of K, V, Q and payload tensors, and portable scalar conversions.
//
// The numeric values match kvmem.wire.DType in schemas/kvmem.fbs. Conversions are exact
// IEEE-754 round-to-nearest-even in software so the CPU reference gives the same bits on
// every machine; CUDA code uses the native __nv_bfloat16 / __half types instead.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace kvmem {

enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }
std::string_view DTypeName(DType t);                        // "fp32", "fp16", "bf16"
std::optional<DType> ParseDType(std::string_view name);      // accepts fp32/f32/float32, ...

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float BF16ToFloat(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

inline uint16_t FloatToBF16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
    return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float F16ToFloat(uint16_t h);
uint16_t FloatToF16(float f);

// Reads element i of a tensor of type t as float.
inline float LoadAsFloat(const void* base, DType t, size_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(base)[i];
    case DType::kF16: return F16ToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kBF16: return BF16ToFloat(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.f;
}

inline void StoreFromFloat(void* base, DType t, size_t i, float v) {
  switch (t) {
    case DType::kF32: static_cast<float*>(base)[i] = v; break;
    case DType::kF16: static_cast<uint16_t*>(base)[i] = FloatToF16(v); break;
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = FloatToBF16(v); break;
  }
}

// Converts n elements to float (dst) / from float (src).
void ConvertToFloat(const void* src, DType t, size_t n, float* dst);
void ConvertFromFloat(const float* src, size_t n, DType t, void* dst);

// True when any of the n elements is NaN or infinite.
bool HasNonFinite(const void* src, DType t, size_t n);

}  // namespace kvmem
