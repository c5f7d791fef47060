// Inputs and checks shared by the tests that send the same requests to kvmemd --backend cuda and
// --backend cpu (hybrid_test, backends_test).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "client/client.h"
#include "common/dtype.h"
#include "testing/daemon_process.h"

namespace kvmem::testing {

// bf16 K/V [lh][T][D] for `lh` (layer, KV head) pairs: keys in runs of `run` tokens that share a
// direction (scale 1.5, noise 0.4), so selection matters; values N(0, 1).
struct TopicKV {
  std::vector<uint16_t> keys, values;
  uint64_t T = 0;
  uint32_t D = 0;

  TopicKV(uint32_t lh, uint64_t tokens, uint32_t dim, uint64_t run, std::mt19937_64& rng)
      : keys(size_t{lh} * tokens * dim), values(keys.size()), T(tokens), D(dim) {
    std::normal_distribution<float> n01;
    for (size_t p = 0; p < lh; ++p) {
      std::vector<float> topic(D);
      for (uint64_t t = 0; t < T; ++t) {
        if (t % run == 0) {
          for (auto& x : topic) x = 1.5f * n01(rng);
        }
        for (uint32_t d = 0; d < D; ++d) {
          keys[(p * T + t) * D + d] = FloatToBF16(topic[d] + 0.4f * n01(rng));
          values[(p * T + t) * D + d] = FloatToBF16(n01(rng));
        }
      }
    }
  }

  // fp32 queries [hq][D] of `layer`: each query head looks for a random earlier key of its KV
  // head (that key + N(0, 0.3²) noise), as a real attention head would.
  std::vector<float> QueryNearKeys(uint32_t layer, uint32_t hq, uint32_t hkv, std::mt19937_64& rng) const {
    std::normal_distribution<float> n01;
    std::vector<float> q(size_t{hq} * D);
    for (uint32_t qh = 0; qh < hq; ++qh) {
      const uint64_t t = rng() % T;
      const uint32_t h = qh / (hq / hkv);
      for (uint32_t d = 0; d < D; ++d) {
        q[size_t{qh} * D + d] = BF16ToFloat(keys[((uint64_t{layer} * hkv + h) * T + t) * D + d]) + 0.3f * n01(rng);
      }
    }
    return q;
  }
};

// n random bf16 values N(0, 1): a decode step's new keys or values.
inline std::vector<uint16_t> RandomBF16(size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> n01;
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = FloatToBF16(n01(rng));
  return v;
}

// One decode step of `layer` for both daemons: a query near earlier keys (QueryNearKeys), new bf16
// K/V, the selection asked back and an fp32 output. `req` points into this step's vectors, so
// the step must outlive its use (not copyable).
struct DecodeStep {
  std::vector<float> q;
  std::vector<uint16_t> k, v;
  client::AttendRequest req;

  DecodeStep(const TopicKV& kv, uint32_t layer, uint32_t hq, uint32_t hkv, std::mt19937_64& rng)
      : q(kv.QueryNearKeys(layer, hq, hkv, rng)), k(RandomBF16(size_t{hkv} * kv.D, rng)),
        v(RandomBF16(size_t{hkv} * kv.D, rng)) {
    req.layer = layer;
    req.q = client::TensorView{q.data(), DType::kF32, {hq, kv.D}};
    req.new_k = client::TensorView{k.data(), DType::kBF16, {hkv, kv.D}};
    req.new_v = client::TensorView{v.data(), DType::kBF16, {hkv, kv.D}};
    req.return_selection = true;
    req.out_dtype = DType::kF32;
  }
  DecodeStep(const DecodeStep&) = delete;
  DecodeStep& operator=(const DecodeStep&) = delete;
};

// ‖a − b‖ / ‖b‖ over n values.
inline double RelativeError(const float* a, const float* b, size_t n) {
  double e2 = 0, r2 = 0;
  for (size_t i = 0; i < n; ++i) {
    e2 += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    r2 += double{b[i]} * b[i];
  }
  return std::sqrt(e2 / r2);
}

// kvmemd --backend cuda and --backend cpu with the same extra flags, and a client to each.
struct BackendPair {
  DaemonProcess gpu, cpu;
  std::unique_ptr<client::Client> g, c;

  explicit BackendPair(const std::vector<std::string>& extra)
      : gpu(Flags("cuda", extra)), cpu(Flags("cpu", extra)) {
    if (!gpu.ready() || !cpu.ready()) return;
    auto a = client::Client::Connect(gpu.address());
    auto b = client::Client::Connect(cpu.address());
    if (a.ok() && b.ok()) {
      g = std::move(*a);
      c = std::move(*b);
    }
  }
  bool ok() const { return g != nullptr && c != nullptr; }

  // A session with the same profile and options on each daemon, both given kv's bf16 K/V
  // [layers][kv heads][T][D] with `bounds`: {gpu id, cpu id}; a failure is reported, ids 0.
  std::pair<uint64_t, uint64_t> Open(const client::Profile& p, const client::SessionOptions& so,
                                     const TopicKV& kv, const std::vector<uint8_t>& bounds) {
    auto ig = g->CreateSession(p, so);
    auto ic = c->CreateSession(p, so);
    if (!ig.ok() || !ic.ok()) {
      ADD_FAILURE() << "CreateSession: " << ig.status().ToString() << " / " << ic.status().ToString();
      return {0, 0};
    }
    const std::vector<uint64_t> shape = {p.layers, p.kv_heads, kv.T, kv.D};
    const client::TensorView tk{kv.keys.data(), DType::kBF16, shape}, tv{kv.values.data(), DType::kBF16, shape};
    EXPECT_TRUE(g->AppendKV(*ig, tk, tv, bounds).ok());
    EXPECT_TRUE(c->AppendKV(*ic, tk, tv, bounds).ok());
    return {*ig, *ic};
  }

  // The same Attend on both sessions; both must succeed with a selection per KV head (the
  // request asks for it). nullopt, with the failure reported, otherwise.
  std::optional<std::pair<client::AttendResult, client::AttendResult>> Attend(
      uint64_t ig, uint64_t ic, const client::AttendRequest& req, uint32_t kv_heads) {
    auto rg = g->Attend(ig, req);
    auto rc = c->Attend(ic, req);
    if (!rg.ok() || !rc.ok()) {
      ADD_FAILURE() << "Attend: " << rg.status().ToString() << " / " << rc.status().ToString();
      return std::nullopt;
    }
    if (rg->selection.size() != kv_heads || rc->selection.size() != kv_heads) {
      ADD_FAILURE() << "selections for " << rg->selection.size() << " / " << rc->selection.size()
                    << " KV heads, want " << kv_heads;
      return std::nullopt;
    }
    return std::make_pair(std::move(*rg), std::move(*rc));
  }

  static std::vector<std::string> Flags(const std::string& backend, std::vector<std::string> extra) {
    extra.insert(extra.begin(), {"--backend", backend});
    return extra;
  }
};

// The fp32 outputs [hq][D] of both backends within bf16 tolerance (relative error < 1e-2) for
// every query head whose KV head is comparable[kv head]; returns how many were compared.
inline uint32_t ExpectOutputsAgree(const client::AttendResult& g, const client::AttendResult& c,
                                   uint32_t hq, uint32_t D, const std::vector<bool>& comparable) {
  std::vector<float> og(size_t{hq} * D), oc(og.size());
  ConvertToFloat(g.out.data(), g.out_dtype, og.size(), og.data());
  ConvertToFloat(c.out.data(), c.out_dtype, oc.size(), oc.data());
  const uint32_t group = hq / static_cast<uint32_t>(comparable.size());
  uint32_t compared = 0;
  for (uint32_t qh = 0; qh < hq; ++qh) {
    if (!comparable[qh / group]) continue;
    ++compared;
    EXPECT_LT(RelativeError(&og[size_t{qh} * D], &oc[size_t{qh} * D], D), 1e-2) << "query head " << qh;
  }
  return compared;
}

}  // namespace kvmem::testing
