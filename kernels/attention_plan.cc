// Host-side planner for the CUDA attention launch: packs tasks, token-balanced splits and run
// tables into one image (layout in kernels/detail/attention_plan_layout.h). No device calls.
#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/cuda_ops.h"
#include "kernels/detail/attention_plan_layout.h"

namespace kvmem::kernels::cuda {
namespace {

using ::kvmem::kernels::detail::AttendItemDesc;
using ::kvmem::kernels::detail::AttendRunDesc;
using ::kvmem::kernels::detail::AttendTaskDesc;
using ::kvmem::kernels::detail::kMaxRunsPerItem;

size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

bool SupportedShape(uint32_t head_dim, uint32_t group) {
  return (head_dim == 64 || head_dim == 128) &&
         (group == 1 || group == 2 || group == 4 || group == 8);
}

}  // namespace

Status PlanAttend(const AttendProblem* problems, uint32_t count, const AttendPlanOptions& options,
                  AttendPlan* plan) {
  if (count == 0) return InvalidArgument("plan attend: no problems");
  *plan = AttendPlan{};
  const AttendProblem& p0 = problems[0];
  for (uint32_t i = 0; i < count; ++i) {
    const AttendProblem& p = problems[i];
    if (Status st = ValidateAttendProblem(p); !st.ok()) {
      return st.WithContext("problem " + std::to_string(i));
    }
    if (p.kv_dtype != p0.kv_dtype || p.q_dtype != p0.q_dtype || p.out_dtype != p0.out_dtype ||
        p.head_dim != p0.head_dim || p.q_heads / p.kv_heads != p0.q_heads / p0.kv_heads) {
      return InvalidArgument("plan attend: problems differ in dtype, head_dim or GQA group");
    }
    if (p.num_spans > 0 && reinterpret_cast<uintptr_t>(p.pool) % 16 != 0) {
      return InvalidArgument("plan attend: pool not 16-byte aligned");
    }
    for (uint32_t s = 0; s < p.num_spans; ++s) {
      if (p.spans[s].offset % 8 != 0) {
        return InvalidArgument("plan attend: span offset not a multiple of 8 elements");
      }
    }
  }
  const uint32_t D = p0.head_dim;
  const uint32_t G = p0.q_heads / p0.kv_heads;
  if (p0.kv_dtype == DType::kF32) return Unimplemented("attend on CUDA: fp32 K/V");
  if (!SupportedShape(D, G)) {
    return Unimplemented("attend on CUDA: head_dim " + std::to_string(D) + " group " +
                         std::to_string(G));
  }

  // Total tokens decide the split size: about target_blocks items overall.
  uint64_t total = 0, max_task = 0;
  uint32_t num_tasks = 0;
  for (uint32_t i = 0; i < count; ++i) {
    const AttendProblem& p = problems[i];
    num_tasks += p.kv_heads;
    for (uint32_t h = 0; h < p.kv_heads; ++h) {
      uint32_t first, last;
      HeadSpans(p, h, &first, &last);
      uint64_t task_tokens = 0;
      for (uint32_t s = first; s < last; ++s) task_tokens += p.spans[s].end - p.spans[s].begin;
      total += task_tokens;
      max_task = std::max(max_task, task_tokens);
    }
  }
  uint64_t target = options.target_blocks;
  const uint64_t resident = target == 0 ? AttendResidentBlocks(D, G, p0.kv_dtype) : 0;
  if (target == 0) {
    // One wave: the last split of each task may be short, so leave a block per task spare.
    target = resident == 0 ? 528
                           : std::max<uint64_t>(resident / 2,
                                                resident - std::min<uint64_t>(resident, num_tasks));
  }
  uint64_t balanced_split = (total + target - 1) / target;
  if (resident > 0 && num_tasks <= resident) {
    // One wave of even splits: each task gets at most resident / tasks splits, sized by the
    // longest task (H200, 64 tasks of ~2100 tokens: 4 x 576 = 256 blocks, 31.1 us, against
    // 221 blocks of 704 tokens by the token total, 33.3 us; bench/results/h200_run12.json).
    const uint64_t k = resident / num_tasks;
    balanced_split = (max_task + k - 1) / k;
  }
  balanced_split = std::clamp<uint64_t>(balanced_split, options.min_split_tokens,
                               std::max(options.min_split_tokens, options.max_split_tokens));
  balanced_split = AlignUp(balanced_split, 64);
  uint64_t max_split = 0;  // with splits_per_task: the longest task split (reported)

  std::vector<AttendTaskDesc> tasks;
  std::vector<AttendItemDesc> items;
  std::vector<AttendRunDesc> runs;
  tasks.reserve(num_tasks);
  uint32_t partial_slots = 0;
  for (uint32_t i = 0; i < count; ++i) {
    const AttendProblem& p = problems[i];
    const size_t qsz = DTypeSize(p.q_dtype), osz = DTypeSize(p.out_dtype);
    for (uint32_t h = 0; h < p.kv_heads; ++h) {
      const uint32_t task = static_cast<uint32_t>(tasks.size());
      AttendTaskDesc td{};
      td.pool = p.pool;
      td.q = static_cast<const uint8_t*>(p.q) + static_cast<size_t>(h) * G * D * qsz;
      td.out = static_cast<uint8_t*>(p.out) + static_cast<size_t>(h) * G * D * osz;
      td.lse = p.lse ? p.lse + static_cast<size_t>(h) * G : nullptr;
      td.scale = p.scale;
      const uint32_t first_item = static_cast<uint32_t>(items.size());
      AttendItemDesc cur{};
      cur.task = task;
      cur.run_begin = static_cast<uint32_t>(runs.size());
      uint64_t cur_tokens = 0;
      uint32_t first, last;
      HeadSpans(p, h, &first, &last);
      uint64_t split = balanced_split;
      if (options.splits_per_task > 0) {
        uint64_t task_tokens = 0;
        for (uint32_t s = first; s < last; ++s) task_tokens += p.spans[s].end - p.spans[s].begin;
        split = std::max<uint64_t>(
            64, AlignUp((task_tokens + options.splits_per_task - 1) / options.splits_per_task, 64));
      }
      auto close_item = [&] {
        cur.run_end = static_cast<uint32_t>(runs.size());
        cur.tokens = static_cast<uint32_t>(cur_tokens);
        items.push_back(cur);
        cur.split++;
        cur.run_begin = cur.run_end;
        cur_tokens = 0;
      };
      for (uint32_t s = first; s < last; ++s) {
        const KVSpan& sp = p.spans[s];
        const uint64_t head_k = sp.offset + static_cast<uint64_t>(h) * sp.stride_tokens * D;
        const uint64_t v_shift = static_cast<uint64_t>(p.kv_heads) * sp.stride_tokens * D;
        uint32_t t = sp.begin;
        while (t < sp.end) {
          if (cur_tokens == split || runs.size() - cur.run_begin == kMaxRunsPerItem) close_item();
          const uint32_t take =
              static_cast<uint32_t>(std::min<uint64_t>(sp.end - t, split - cur_tokens));
          const uint64_t k = head_k + static_cast<uint64_t>(t) * D;
          runs.push_back({k, k + v_shift, take, 0});
          cur_tokens += take;
          t += take;
        }
      }
      close_item();  // the last (or only, possibly empty) split
      max_split = std::max(max_split, split);
      td.num_splits = static_cast<uint32_t>(items.size()) - first_item;
      td.partial_base = partial_slots;
      if (td.num_splits > 1) partial_slots += td.num_splits;
      for (size_t it = first_item; it < items.size(); ++it) {
        AttendItemDesc& d = items[it];
        d.pool = td.pool;
        d.q = td.q;
        d.out = td.out;
        d.lse = td.lse;
        d.scale = td.scale;
        d.num_splits = td.num_splits;
        d.partial_base = td.partial_base;
      }
      tasks.push_back(td);
    }
  }

  plan->num_tasks = num_tasks;
  plan->num_items = static_cast<uint32_t>(items.size());
  plan->num_runs = static_cast<uint32_t>(runs.size());
  plan->split_tokens = static_cast<uint32_t>(options.splits_per_task > 0 ? max_split : balanced_split);
  plan->total_tokens = total;
  plan->kv_dtype = p0.kv_dtype;
  plan->q_dtype = p0.q_dtype;
  plan->out_dtype = p0.out_dtype;
  plan->head_dim = D;
  plan->group = G;
  size_t off = 0;
  plan->tasks_off = off;
  off = AlignUp(off + tasks.size() * sizeof(AttendTaskDesc), 256);
  plan->items_off = off;
  off = AlignUp(off + items.size() * sizeof(AttendItemDesc), 256);
  plan->runs_off = off;
  off = AlignUp(off + runs.size() * sizeof(AttendRunDesc), 256);
  plan->counters_off = off;
  off = AlignUp(off + tasks.size() * sizeof(uint32_t), 256);
  const size_t image_bytes = off;
  plan->partials_off = off;
  plan->workspace_bytes = off + static_cast<size_t>(partial_slots) *
                                    ::kvmem::kernels::detail::PartialFloats(G, D) * sizeof(float);
  plan->image.assign(image_bytes, 0);
  std::memcpy(plan->image.data() + plan->tasks_off, tasks.data(),
              tasks.size() * sizeof(AttendTaskDesc));
  std::memcpy(plan->image.data() + plan->items_off, items.data(),
              items.size() * sizeof(AttendItemDesc));
  if (!runs.empty()) {
    std::memcpy(plan->image.data() + plan->runs_off, runs.data(),
                runs.size() * sizeof(AttendRunDesc));
  }
  return Status::OK();
}

}  // namespace kvmem::kernels::cuda
