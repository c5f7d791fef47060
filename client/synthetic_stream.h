// Reproducible synthetic K/V token streams for kvmem-load, fault tests and storage benchmarks.
// Every value is a pure function of (seed, layer, head, token, dim), so any token range can be
// generated on its own and compared later: what a client appended in many batches before a
// crash is regenerated exactly after it.
#pragma once

#include <cstdint>
#include <vector>

#include "common/dtype.h"

namespace kvmem::client {

class SyntheticStream {
 public:
  SyntheticStream(uint64_t seed, uint32_t layers, uint32_t kv_heads, uint32_t head_dim, DType dtype)
      : seed_(seed), layers_(layers), heads_(kv_heads), dim_(head_dim), dtype_(dtype) {}

  // keys / values: [layers][kv_heads][n][head_dim] for tokens [start, start + n).
  void Fill(uint64_t start, uint32_t n, std::vector<uint8_t>* keys, std::vector<uint8_t>* values) const {
    const size_t elems = size_t{layers_} * heads_ * n * dim_;
    keys->resize(elems * DTypeSize(dtype_));
    values->resize(keys->size());
    size_t i = 0;
    for (uint32_t l = 0; l < layers_; ++l)
      for (uint32_t h = 0; h < heads_; ++h)
        for (uint32_t t = 0; t < n; ++t)
          for (uint32_t d = 0; d < dim_; ++d, ++i) {
            const uint64_t x = Mix(seed_ ^ (uint64_t{l} << 48) ^ (uint64_t{h} << 40) ^
                                   ((start + t) << 12) ^ d);
            StoreFromFloat(keys->data(), dtype_, i, Unit(x));
            StoreFromFloat(values->data(), dtype_, i, Unit(Mix(x ^ 0x5bd1e995)));
          }
  }
  // Boundary classes for tokens [start, start + n): mostly words, some clauses and sentences.
  std::vector<uint8_t> Boundaries(uint64_t start, uint32_t n) const {
    std::vector<uint8_t> b(n);
    for (uint32_t t = 0; t < n; ++t) {
      const uint64_t x = Mix(seed_ * 31 + start + t) % 100;
      b[t] = x < 50 ? 1 : x < 75 ? 0 : x < 90 ? 2 : x < 98 ? 3 : 4;
    }
    return b;
  }

 private:
  static uint64_t Mix(uint64_t z) {  // splitmix64 finaliser
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  static float Unit(uint64_t x) {  // roughly N(0, 1): sum of 4 uniforms, centred and scaled
    float s = 0;
    for (int i = 0; i < 4; ++i) s += static_cast<float>((x >> (16 * i)) & 0xFFFF) / 65535.f;
    return (s - 2.f) * 1.7f;
  }

  uint64_t seed_;
  uint32_t layers_, heads_, dim_;
  DType dtype_;
};

}  // namespace kvmem::client
