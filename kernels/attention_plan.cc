// Host-side planner for the CUDA attention launch: packs tasks, token-balanced splits and run
// tables into one image (layout in kernels/detail/attention_plan_layout.h). No device calls.
#include <algorithm>
#include <cstdlib>
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

uint32_t AttendClusterEnv() {
  if (const char* e = std::getenv("KVMEM_ATTN_CLUSTER")) {
    const std::string v = e;
    if (v == "off" || v == "1") return 1;
    if (v == "auto") return kAttendClusterAuto;
    const int n = std::atoi(e);
    if (n == 2 || n == 4 || n == 8 || n == 16) return static_cast<uint32_t>(n);
  }
  return 0;
}

uint32_t AttendClusterSize(uint32_t option, uint64_t splits, uint32_t cap) {
  if (option == 0) option = AttendClusterEnv();
  if (option != kAttendClusterAuto) return option == 0 ? 1 : option;
  uint32_t c = 1;
  while (c * 2 <= cap && c * 2 <= splits) c *= 2;
  return c;
}

uint32_t AttendTaskClusterSize(uint32_t option, uint64_t resident, uint64_t tasks, uint32_t head_dim,
                               uint32_t group, DType kv_dtype) {
  if (option == 0) option = AttendClusterEnv();
  if (option != kAttendClusterAuto) return option == 0 ? 1 : option;
  if (resident == 0 || tasks == 0) return 1;
  uint32_t c = AttendClusterSize(kAttendClusterAuto, resident / tasks, 16);
  while (c > 1 && AttendActiveClusters(head_dim, group, kv_dtype, c) < tasks) c /= 2;
  return c;
}

uint32_t AttendMinSplit(uint32_t option) {
  if (option != 128) return option;  // not the default: the caller's
  if (const char* e = std::getenv("KVMEM_ATTN_MIN_SPLIT")) {
    const int n = std::atoi(e);
    if (n >= 16 && n <= 4096) return static_cast<uint32_t>(n);
  }
  return option;
}

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
  uint64_t total = 0, max_task = 0, min_task = ~uint64_t{0};
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
      min_task = std::min(min_task, task_tokens);
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
  const uint32_t min_split = AttendMinSplit(options.min_split_tokens);
  balanced_split = std::clamp<uint64_t>(balanced_split, min_split,
                                        std::max(min_split, options.max_split_tokens));
  balanced_split = AlignUp(balanced_split, min_split < 64 ? 16 : 64);
  // Clusters: every task gets exactly C splits of equal tokens (AttendPlanOptions::cluster).
  uint32_t C = 1;
  if (options.cluster > 1 && options.cluster != kAttendClusterAuto) {
    C = options.cluster;
  } else if (options.cluster != 1 && options.target_blocks == 0 && options.splits_per_task == 0 &&
             resident > 0 && num_tasks <= resident && 2 * min_task >= max_task) {
    // Tasks of similar length only (a long task, e.g. a retrieval head attending the whole
    // context beside sparse heads, needs more splits than the others: token-balanced splits).
    C = AttendTaskClusterSize(options.cluster, resident, num_tasks, D, G, p0.kv_dtype);
  }
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
      if (C > 1) {
        uint64_t task_tokens = 0;
        for (uint32_t s = first; s < last; ++s) task_tokens += p.spans[s].end - p.spans[s].begin;
        split = std::max<uint64_t>(16, AlignUp((task_tokens + C - 1) / C, 16));
      } else if (options.splits_per_task > 0) {
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
      if (C > 1) {
        // Empty splits up to C, or up to a multiple of C when a run table overflowed into more
        // splits (then the task's clusters merge one partial each through global memory).
        while ((items.size() - first_item) % C != 0) close_item();
      }
      max_split = std::max(max_split, split);
      td.num_splits = static_cast<uint32_t>(items.size()) - first_item;
      td.partial_base = partial_slots;
      // One partial per cluster of splits (none when the task is one cluster).
      if (td.num_splits / C > 1) partial_slots += td.num_splits / C;
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
  // Runs at a fixed stride per item when that costs at most about twice the run bytes: the
  // kernel then loads an item's first runs together with the item (AttendPlan::run_stride).
  uint32_t max_runs = 1;
  for (const AttendItemDesc& it : items) max_runs = std::max(max_runs, it.run_end - it.run_begin);
  if (uint64_t{max_runs} * items.size() <= 2 * runs.size() + 256) {
    std::vector<AttendRunDesc> fixed(size_t{max_runs} * items.size(), AttendRunDesc{0, 0, 0, 0});
    for (size_t i = 0; i < items.size(); ++i) {
      AttendItemDesc& it = items[i];
      const uint32_t n = it.run_end - it.run_begin;
      std::copy(runs.begin() + it.run_begin, runs.begin() + it.run_end,
                fixed.begin() + i * max_runs);
      it.run_begin = static_cast<uint32_t>(i * max_runs);
      it.run_end = it.run_begin + n;
    }
    runs.swap(fixed);
    plan->run_stride = max_runs;
  }
  plan->split_tokens =
      static_cast<uint32_t>(options.splits_per_task > 0 || C > 1 ? max_split : balanced_split);
  plan->cluster_size = C;
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
