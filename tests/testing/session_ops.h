// Helpers for in-process Session tests: random appends and f32 attention calls.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "daemon/session.h"
#include "testing/reference.h"

namespace kvmem::testing {

// Appends n random tokens (profile dtype) with random boundary classes.
inline Status AppendRandom(Session* s, std::mt19937_64& rng, uint32_t n) {
  const ModelProfile& p = s->profile();
  const size_t elems = size_t{p.layers} * p.kv_heads * n * p.head_dim;
  auto k = RandomTensor(rng, p.dtype, elems), v = RandomTensor(rng, p.dtype, elems);
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng() % 6);
  return s->AppendKV(n, k.data(), v.data(), b.data()).status();
}

// An Attend call with an f32 q [q_heads][head_dim] and f32 out; new_k / new_v (profile dtype,
// [kv_heads][head_dim]) when given.
inline AttendArgs F32Attend(uint32_t layer, const float* q, float* out,
                            SelectionMode mode = SelectionMode::kDefault,
                            const void* new_k = nullptr, const void* new_v = nullptr) {
  AttendArgs a;
  a.layer = layer;
  a.q = q;
  a.q_dtype = DType::kF32;
  a.mode = mode;
  a.new_k = new_k;
  a.new_v = new_v;
  a.out = out;
  a.out_dtype = DType::kF32;
  return a;
}

}  // namespace kvmem::testing
