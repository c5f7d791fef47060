#include "common/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvmem {

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "fp32";
    case DType::kF16: return "fp16";
    case DType::kBF16: return "bf16";
  }
  return "?";
}

std::optional<DType> ParseDType(std::string_view n) {
  if (n == "fp32" || n == "f32" || n == "float32" || n == "float") return DType::kF32;
  if (n == "fp16" || n == "f16" || n == "float16" || n == "half") return DType::kF16;
  if (n == "bf16" || n == "bfloat16") return DType::kBF16;
  return std::nullopt;
}

float F16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return BitsFloat(sign);
    // Subnormal: normalise.
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3ffu;
    return BitsFloat(sign | static_cast<uint32_t>(127 - 15 - e) << 23 | mant << 13);
  }
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | mant << 13);
  return BitsFloat(sign | (exp + (127 - 15)) << 23 | mant << 13);
}

uint16_t FloatToF16(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or NaN
    return sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u);
  }
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
  if (abs < 0x38800000u) {                         // below the smallest normal half: subnormal
    if (abs < 0x33000000u) return sign;           // rounds to zero
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14 + (113 - exp)
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t v = abs - (112u << 23);  // rebias exponent 127 -> 15
  v += 0xfffu + ((v >> 13) & 1u);   // round to nearest even on the 13 dropped bits
  return sign | static_cast<uint16_t>(v >> 13);
}

void ConvertToFloat(const void* src, DType t, size_t n, float* dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F16ToFloat(s[i]);
      return;
    }
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = BF16ToFloat(s[i]);
      return;
    }
  }
}

void ConvertFromFloat(const float* src, size_t n, DType t, void* dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToF16(src[i]);
      return;
    }
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToBF16(src[i]);
      return;
    }
  }
}

namespace {

// Branch-free over blocks so the compiler vectorises it; stops at the first bad block.
template <typename T>
bool AnyExponentAllOnes(const T* s, size_t n, T mask) {
  constexpr size_t kBlock = 256;
  size_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    T bad = 0;
    for (size_t j = 0; j < kBlock; ++j) bad |= static_cast<T>((s[i + j] & mask) == mask);
    if (bad) return true;
  }
  for (; i < n; ++i)
    if ((s[i] & mask) == mask) return true;
  return false;
}

// The same for a source not aligned to T (a piece of a message may start anywhere): loads through
// memcpy, which is well defined at any address and compiles to the same unaligned loads.
template <typename T>
bool AnyExponentAllOnesUnaligned(const uint8_t* s, size_t n, T mask) {
  constexpr size_t kBlock = 256;
  auto at = [s](size_t i) {
    T v;
    std::memcpy(&v, s + i * sizeof(T), sizeof(T));
    return v;
  };
  size_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    T bad = 0;
    for (size_t j = 0; j < kBlock; ++j) bad |= static_cast<T>((at(i + j) & mask) == mask);
    if (bad) return true;
  }
  for (; i < n; ++i)
    if ((at(i) & mask) == mask) return true;
  return false;
}

}  // namespace

bool HasNonFinite(const void* src, DType t, size_t n) {
  if (reinterpret_cast<uintptr_t>(src) % DTypeSize(t) != 0) {
    const auto* s = static_cast<const uint8_t*>(src);
    switch (t) {
      case DType::kF32: return AnyExponentAllOnesUnaligned<uint32_t>(s, n, 0x7f800000u);
      case DType::kF16: return AnyExponentAllOnesUnaligned<uint16_t>(s, n, 0x7c00u);
      case DType::kBF16: return AnyExponentAllOnesUnaligned<uint16_t>(s, n, 0x7f80u);
    }
    return false;
  }
  switch (t) {
    case DType::kF32: return AnyExponentAllOnes<uint32_t>(static_cast<const uint32_t*>(src), n, 0x7f800000u);
    case DType::kF16: return AnyExponentAllOnes<uint16_t>(static_cast<const uint16_t*>(src), n, 0x7c00u);
    case DType::kBF16: return AnyExponentAllOnes<uint16_t>(static_cast<const uint16_t*>(src), n, 0x7f80u);
  }
  return false;
}

}  // namespace kvmem
