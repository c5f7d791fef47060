// A KV pool for session tests that stands in for the CUDA backend's on the host.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "daemon/kv_pool.h"
#include "kernels/attention.h"
#include "kernels/index_ops.h"

namespace kvmem::testing {

// A pool that is not host-addressable to the session (is_host() false): every key read goes
// through CopyOut as on the CUDA backend, so the device-side code paths of the session
// (staged retrieval-head scans, staged index catch-up, rescoring) run here. Memory is host memory, and
// Attend runs the CPU reference, so results must equal the host pool's.
class StagedPool final : public KVPool {
 public:
  explicit StagedPool(uint64_t bytes) : mem_(static_cast<uint8_t*>(std::aligned_alloc(4096, bytes))) {
    base_ = mem_.get();
    allocator_ = std::move(*SlabAllocator::Create({bytes, 1ull << 20, 0}));
  }
  bool is_host() const override { return false; }
  Status CopyIn(uint64_t dst, const void* src, uint64_t bytes) override {
    std::memcpy(mem_.get() + dst, src, bytes);
    return Status::OK();
  }
  Status CopyOut(void* dst, uint64_t src, uint64_t bytes) override {
    ++copies_out;
    std::memcpy(dst, mem_.get() + src, bytes);
    return Status::OK();
  }
  Status CopyWithin(uint64_t dst, uint64_t src, uint64_t bytes) override {
    std::memmove(mem_.get() + dst, mem_.get() + src, bytes);
    return Status::OK();
  }
  Status Attend(kernels::AttendProblem* problems, uint32_t count, ParallelPool* /*workers*/) override {
    for (uint32_t i = 0; i < count; ++i) problems[i].pool = base_;
    kernels::AttendCpu(problems, count);
    return Status::OK();
  }
  // With device_scan, block scores and rescoring logits come from these calls (the CPU kernels
  // over the pool, standing in for the CUDA launches) as on the CUDA backend; otherwise
  // UNIMPLEMENTED (staged keys).
  Status PooledBlockScores(const kernels::PooledBlockScoresView& v) override {
    if (!device_scan) return KVPool::PooledBlockScores(v);
    ++scans;
    kernels::PooledBlockScoresView pv = v;
    pv.pool = base_;
    kernels::PooledBlockScoresCpu(pv);
    return Status::OK();
  }
  Status TokenLogits(const kernels::TokenLogitsView& v) override {
    if (!device_scan) return KVPool::TokenLogits(v);
    ++logit_launches;
    kernels::TokenLogitsView tv = v;
    tv.pool = base_;
    kernels::TokenLogitsBlocked(tv);  // the host pool's function: selections compare bit for bit
    return Status::OK();
  }
  // Dense Attends with a kept plan (the session's per-layer DenseAttendPlanCache): with
  // check_dense_plans, the plan is kept as the CUDA pool keeps it (PlanAttendDenseStep, host
  // code) and compared with a fresh PlanAttend of the same problem (a stale kept plan, e.g. a
  // key the session failed to change, counts in stale_dense_plans); then the CPU reference.
  Status AttendDense(kernels::AttendProblem* p, ParallelPool* workers,
                     kernels::cuda::DenseAttendPlanCache* kept, uint64_t key) override {
    if (check_dense_plans) {
      kernels::AttendProblem d = *p;
      d.pool = base_;
      bool patched = false;
      Status st = kernels::cuda::PlanAttendDenseStep(d, key, kept, &patched);
      if (!st.ok()) return st;
      kernels::cuda::AttendPlan fresh;
      KVMEM_RETURN_IF_ERROR(kernels::cuda::PlanAttend(&d, 1, {}, &fresh));
      if (fresh.image != kept->plan.image || fresh.total_tokens != kept->plan.total_tokens) {
        ++stale_dense_plans;
      }
      ++(patched ? dense_patched : dense_planned);
    }
    return Attend(p, 1, workers);
  }
  std::string Describe() const override { return "staged (test)"; }
  bool check_dense_plans = false;
  uint64_t dense_patched = 0, dense_planned = 0, stale_dense_plans = 0;
  uint64_t copies_out = 0;
  bool device_scan = false;
  uint64_t scans = 0;
  uint64_t logit_launches = 0;

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> mem_;
};

}  // namespace kvmem::testing
