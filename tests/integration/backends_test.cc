// Index mode under the fidelity profile (deploy/kvmemd-fidelity.json: small chunks, rescoring of
// 4x the budget, token granularity) on kvmemd --backend cuda and --backend cpu: the same
// selections and outputs within bf16 tolerance. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "client/client.h"
#include "common/dtype.h"
#include "kernels/cuda_ops.h"
#include "testing/cross_backend.h"
#include "testing/seed.h"

namespace kvmem {
namespace {

using client::AttendRequest;
using client::Profile;

// Token ranges of one head's selection, in position order (entries come in score order).
std::vector<std::pair<uint64_t, uint64_t>> Ranges(const client::HeadSelection& s) {
  std::vector<std::pair<uint64_t, uint64_t>> r;
  for (size_t i = 0; i < s.starts.size(); ++i) r.emplace_back(s.starts[i], s.ends[i]);
  std::sort(r.begin(), r.end());
  return r;
}

TEST(IndexMode, FidelityProfileCudaBackendMatchesCpuBackend) {
  if (kernels::cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible: cuda backend test skipped";
  constexpr uint32_t kL = 2, kHq = 16, kHkv = 4, kD = 128, kBudget = 512, kSinks = 16;
  constexpr uint64_t kT = 6000;
  // KVMEM_SOURCE_DIR in the environment: a bundle run elsewhere (e.g. on the GPU machine).
  const char* src = std::getenv("KVMEM_SOURCE_DIR");
  const std::string profile = std::string(src != nullptr ? src : KVMEM_SOURCE_DIR) + "/deploy/kvmemd-fidelity.json";
  testing::BackendPair daemons({"--config", profile});
  ASSERT_TRUE(daemons.ok());
  const uint64_t seed = ::kvmem::testing::TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const DType dt = DType::kBF16;
  const testing::TopicKV kv(kL * kHkv, kT, kD, 150, rng);
  std::vector<uint8_t> bounds(kT);
  for (uint64_t t = 0; t < kT; ++t) bounds[t] = t % 7 == 6 ? 3 : 1;
  Profile p{kL, kHq, kHkv, kD, dt, {}, {}, "fidelity-cross-backend"};
  client::SessionOptions so;
  so.mode = client::Mode::kIndex;
  so.sink_tokens = kSinks;
  so.default_budget_tokens = kBudget;
  const auto [ig, ic] = daemons.Open(p, so, kv, bounds);
  ASSERT_FALSE(HasFailure());
  uint32_t same = 0, heads = 0;
  for (int pass = 0; pass < 10; ++pass) {
    for (uint32_t l = 0; l < kL; ++l) {
      SCOPED_TRACE("pass " + std::to_string(pass) + " layer " + std::to_string(l));
      const testing::DecodeStep step(kv, l, kHq, kHkv, rng);
      AttendRequest req = step.req;
      req.boundary = pass % 3 == 2 ? 3 : 1;
      auto both = daemons.Attend(ig, ic, req, kHkv);
      ASSERT_TRUE(both.has_value());
      const client::AttendResult& rg = both->first;
      const client::AttendResult& rc = both->second;
      std::vector<bool> equal(kHkv);
      for (uint32_t h = 0; h < kHkv; ++h) {
        // Token granularity fills the budget exactly (chunks of 2-4 tokens would rarely).
        for (const client::HeadSelection* s : {&rg.selection[h], &rc.selection[h]}) {
          uint64_t tokens = 0;
          for (size_t i = 0; i < s->starts.size(); ++i) tokens += s->ends[i] - s->starts[i];
          EXPECT_EQ(tokens, kBudget) << "head " << h;
        }
        // Both rescore the same bf16 keys (the GPU's logits summed in float on the device, the
        // CPU's in double); the summaries the candidates come from are built by each backend,
        // so a token at the budget's cut may differ.
        equal[h] = Ranges(rg.selection[h]) == Ranges(rc.selection[h]);
        same += equal[h];
        ++heads;
        if (equal[h]) {
          EXPECT_EQ(rg.tokens_attended[h], rc.tokens_attended[h]) << "head " << h;
        }
      }
      testing::ExpectOutputsAgree(rg, rc, kHq, kD, equal);
    }
  }
  std::printf("selections equal on both backends for %u of %u head-steps\n", same, heads);
  EXPECT_GT(same, heads * 9 / 10) << "selections should differ only at near ties";
  EXPECT_TRUE(daemons.g->DropSession(ig).ok());
  EXPECT_TRUE(daemons.c->DropSession(ic).ok());
  EXPECT_EQ(daemons.gpu.Stop(), 0);
  EXPECT_EQ(daemons.cpu.Stop(), 0);
}

}  // namespace
}  // namespace kvmem
