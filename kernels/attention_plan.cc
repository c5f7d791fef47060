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

// KVMEM_ATTN_SHARED_RUNS=off: every head its own runs, as before (A/B runs).
bool SharedRunsEnv() {
  static const bool on = [] {
    const char* e = std::getenv("KVMEM_ATTN_SHARED_RUNS");
    return e == nullptr || std::string(e) != "off";
  }();
  return on;
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

uint32_t AttendTaskClusterSize(uint32_t option, uint64_t resident, uint64_t tasks,
                               uint32_t head_dim, uint32_t group, DType kv_dtype) {
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

namespace {

// The split size (tokens per split, before clusters) and the cluster size PlanAttend picks for
// num_tasks tasks of `total` tokens, the longest max_task and the shortest min_task tokens.
struct SplitChoice {
  uint64_t split;
  uint32_t cluster;
};
SplitChoice ChooseSplit(const AttendPlanOptions& options, uint64_t total, uint64_t max_task,
                        uint64_t min_task, uint32_t num_tasks, uint32_t D, uint32_t G,
                        DType kv_dtype) {
  uint64_t target = options.target_blocks;
  const uint64_t resident = target == 0 ? AttendResidentBlocks(D, G, kv_dtype) : 0;
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
    C = AttendTaskClusterSize(options.cluster, resident, num_tasks, D, G, kv_dtype);
  }
  return {balanced_split, C};
}

}  // namespace

Status PlanAttend(const AttendProblem* problems, uint32_t count, const AttendPlanOptions& options,
                  AttendPlan* plan) {
  if (count == 0) return InvalidArgument("plan attend: no problems");
  std::vector<uint8_t> image = std::move(plan->image);  // its capacity is reused
  *plan = AttendPlan{};
  plan->image = std::move(image);
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

  // Total tokens decide the split size: about target_blocks items overall. Each task's tokens
  // (a dense problem's heads attend the same spans: counted once).
  uint64_t total = 0, max_task = 0, min_task = ~uint64_t{0};
  uint32_t num_tasks = 0;
  std::vector<uint64_t> tokens_of;  // per task, in task order
  for (uint32_t i = 0; i < count; ++i) {
    const AttendProblem& p = problems[i];
    num_tasks += p.kv_heads;
    for (uint32_t h = 0; h < p.kv_heads; ++h) {
      uint64_t task_tokens = 0;
      if (h > 0 && p.head_span_begin == nullptr) {
        task_tokens = tokens_of.back();
      } else {
        uint32_t first, last;
        HeadSpans(p, h, &first, &last);
        for (uint32_t s = first; s < last; ++s) task_tokens += p.spans[s].end - p.spans[s].begin;
      }
      tokens_of.push_back(task_tokens);
      total += task_tokens;
      max_task = std::max(max_task, task_tokens);
      min_task = std::min(min_task, task_tokens);
    }
  }
  const SplitChoice choice =
      ChooseSplit(options, total, max_task, min_task, num_tasks, D, G, p0.kv_dtype);
  const uint64_t balanced_split = choice.split;
  const uint32_t C = choice.cluster;
  uint64_t max_split = 0;  // with splits_per_task: the longest task split (reported)
  // Head-shared runs: one problem whose heads all attend every span (a dense layer) cuts every
  // head alike (the same tokens, so the same splits, in clusters or not): the same items and
  // runs but for the head's offset (head x stride x D, per span). The plan then holds head 0's
  // runs with that offset in AttendRunDesc::head_stride, the kernel adds task x head_stride,
  // and the other heads' items point at head 0's runs: 1/H of the runs to plan, store and
  // upload (a 128K-token dense layer, 8 KV heads: ~8K runs instead of ~65K, a ~0.2 MB image
  // instead of 1.7 MB; planning was 60-80% of kvmemd's dense Attend on the H200, session 26).
  const bool shared = count == 1 && p0.head_span_begin == nullptr && p0.kv_heads > 1 &&
                      options.splits_per_task == 0 && SharedRunsEnv();

  // Two passes over the same walk of every task's spans: the first counts each item's runs (so
  // the layout, and with it every run's place, is known), the second writes the runs straight
  // into the image. No run list is built and copied (a 128K-token dense layer has ~66K runs).
  struct TaskWalk {
    uint32_t problem, head;
    uint64_t split;
  };
  std::vector<TaskWalk> walks;
  walks.reserve(num_tasks);
  for (uint32_t i = 0; i < count; ++i) {
    const AttendProblem& p = problems[i];
    for (uint32_t h = 0; h < p.kv_heads; ++h) {
      uint64_t split = balanced_split;
      if (C > 1 || options.splits_per_task > 0) {
        const uint64_t task_tokens = tokens_of[walks.size()];
        split = C > 1 ? std::max<uint64_t>(16, AlignUp((task_tokens + C - 1) / C, 16))
                      : std::max<uint64_t>(64, AlignUp((task_tokens + options.splits_per_task - 1) /
                                                           options.splits_per_task,
                                                       64));
      }
      walks.push_back({i, h, split});
      max_split = std::max(max_split, split);
    }
  }
  // Walks task w's spans: run(k_off, v_off, len) for each run, close(tokens) after each split's
  // last run (a split closes when full or at kMaxRunsPerItem runs), then empty splits up to a
  // multiple of C. Returns the task's split count.
  auto walk = [&](const TaskWalk& w, auto&& run, auto&& close) {
    const AttendProblem& p = problems[w.problem];
    uint32_t first, last;
    HeadSpans(p, w.head, &first, &last);
    uint32_t splits = 0, item_runs = 0;
    uint64_t cur_tokens = 0;
    auto close_item = [&] {
      close(static_cast<uint32_t>(cur_tokens));
      ++splits;
      item_runs = 0;
      cur_tokens = 0;
    };
    for (uint32_t s = first; s < last; ++s) {
      const KVSpan& sp = p.spans[s];
      const uint64_t head_k = sp.offset + static_cast<uint64_t>(w.head) * sp.stride_tokens * D;
      const uint64_t v_shift = static_cast<uint64_t>(p.kv_heads) * sp.stride_tokens * D;
      const uint32_t head_stride = sp.stride_tokens * D;
      for (uint32_t t = sp.begin; t < sp.end;) {
        if (cur_tokens == w.split || item_runs == kMaxRunsPerItem) close_item();
        const uint32_t take =
            static_cast<uint32_t>(std::min<uint64_t>(sp.end - t, w.split - cur_tokens));
        const uint64_t k = head_k + static_cast<uint64_t>(t) * D;
        run(k, k + v_shift, take, head_stride);
        ++item_runs;
        cur_tokens += take;
        t += take;
      }
    }
    close_item();  // the last (or only, possibly empty) split
    // Empty splits up to C, or up to a multiple of C when a run table overflowed into more
    // splits (then the task's clusters merge one partial each through global memory).
    if (C > 1) {
      while (splits % C != 0) close_item();
    }
    return splits;
  };

  // Pass 1: tasks and items (runs counted, not stored).
  std::vector<AttendTaskDesc> tasks;
  std::vector<AttendItemDesc> items;
  tasks.reserve(num_tasks);
  uint32_t partial_slots = 0;
  uint64_t num_runs = 0;
  for (const TaskWalk& w : walks) {
    const AttendProblem& p = problems[w.problem];
    const size_t qsz = DTypeSize(p.q_dtype), osz = DTypeSize(p.out_dtype);
    AttendTaskDesc td{};
    td.pool = p.pool;
    td.q = static_cast<const uint8_t*>(p.q) + static_cast<size_t>(w.head) * G * D * qsz;
    td.out = static_cast<uint8_t*>(p.out) + static_cast<size_t>(w.head) * G * D * osz;
    td.lse = p.lse ? p.lse + static_cast<size_t>(w.head) * G : nullptr;
    td.scale = p.scale;
    const auto task = static_cast<uint32_t>(tasks.size());
    const auto first_item = static_cast<uint32_t>(items.size());
    uint32_t item_runs = 0;
    if (shared && task > 0) {  // head 0's items (the first ones), for this head
      td.num_splits = tasks[0].num_splits;
      for (uint32_t sp = 0; sp < td.num_splits; ++sp) {
        AttendItemDesc d = items[sp];
        d.task = task;
        items.push_back(d);
      }
    } else {
      td.num_splits = walk(
          w, [&](uint64_t, uint64_t, uint32_t, uint32_t) { ++item_runs; },
          [&](uint32_t tokens) {
            AttendItemDesc d{};
            d.task = task;
            d.split = static_cast<uint32_t>(items.size()) - first_item;
            d.run_begin = static_cast<uint32_t>(num_runs);
            d.run_end = static_cast<uint32_t>(num_runs + item_runs);
            d.tokens = tokens;
            items.push_back(d);
            num_runs += item_runs;
            item_runs = 0;
          });
    }
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

  // Runs at a fixed stride per item when that costs at most about twice the run bytes: the
  // kernel then loads an item's first runs together with the item (AttendPlan::run_stride).
  uint32_t max_runs = 1;
  for (const AttendItemDesc& it : items) max_runs = std::max(max_runs, it.run_end - it.run_begin);
  const bool strided = !shared && uint64_t{max_runs} * items.size() <= 2 * num_runs + 256;
  if (strided) {
    for (size_t i = 0; i < items.size(); ++i) {
      AttendItemDesc& it = items[i];
      const uint32_t n = it.run_end - it.run_begin;
      it.run_begin = static_cast<uint32_t>(i * max_runs);
      it.run_end = it.run_begin + n;
    }
  }
  const size_t run_slots = strided ? size_t{max_runs} * items.size() : num_runs;

  plan->num_tasks = num_tasks;
  plan->num_items = static_cast<uint32_t>(items.size());
  plan->num_runs = static_cast<uint32_t>(num_runs);
  plan->run_stride = strided ? max_runs : 0;
  plan->head_shared_runs = shared;
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
  off = AlignUp(off + run_slots * sizeof(AttendRunDesc), 256);
  plan->counters_off = off;
  off = AlignUp(off + tasks.size() * sizeof(uint32_t), 256);
  const size_t image_bytes = off;
  plan->partials_off = off;
  plan->workspace_bytes = off + static_cast<size_t>(partial_slots) *
                                    ::kvmem::kernels::detail::PartialFloats(G, D) * sizeof(float);

  // The image: capacity kept from an earlier plan, so every byte not written below is zeroed
  // (section padding, the unused slots of strided run tables, the merge counters).
  plan->image.resize(image_bytes);
  uint8_t* img = plan->image.data();
  auto put = [&](size_t at, const void* src, size_t bytes, size_t end) {
    if (bytes > 0) std::memcpy(img + at, src, bytes);
    std::memset(img + at + bytes, 0, end - at - bytes);
  };
  put(plan->tasks_off, tasks.data(), tasks.size() * sizeof(AttendTaskDesc), plan->items_off);
  put(plan->items_off, items.data(), items.size() * sizeof(AttendItemDesc), plan->runs_off);
  // Pass 2: every run into its slot, then each item's unused slots and the section's padding.
  auto* runs = reinterpret_cast<AttendRunDesc*>(img + plan->runs_off);
  size_t item = 0;
  for (const TaskWalk& w : walks) {
    if (shared && &w != &walks[0]) break;  // the other heads' items read head 0's runs
    uint32_t r = items[item].run_begin;
    walk(
        w,
        [&](uint64_t k, uint64_t v, uint32_t len, uint32_t head_stride) {
          runs[r++] = AttendRunDesc{k, v, len, shared ? head_stride : 0u};
        },
        [&](uint32_t) {
          const uint32_t slot_end =
              strided ? items[item].run_begin + max_runs : items[item].run_end;
          std::fill(runs + r, runs + slot_end, AttendRunDesc{0, 0, 0, 0});
          if (++item < items.size()) r = items[item].run_begin;
        });
  }
  const size_t runs_end = plan->runs_off + run_slots * sizeof(AttendRunDesc);
  std::memset(img + runs_end, 0, plan->counters_off - runs_end);
  std::memset(img + plan->counters_off, 0, image_bytes - plan->counters_off);
  return Status::OK();
}

namespace {

bool SameScalars(const AttendProblem& a, const AttendProblem& b) {
  return a.pool == b.pool && a.kv_dtype == b.kv_dtype && a.q_heads == b.q_heads &&
         a.kv_heads == b.kv_heads && a.head_dim == b.head_dim &&
         std::memcmp(&a.scale, &b.scale, sizeof(float)) == 0 && a.q == b.q &&
         a.q_dtype == b.q_dtype && a.num_spans == b.num_spans && a.out == b.out &&
         a.out_dtype == b.out_dtype && a.lse == b.lse && a.head_span_begin == nullptr &&
         b.head_span_begin == nullptr;
}

// Patches cache->plan for `p`, whose last span has d > 0 more tokens than the planned one;
// false (nothing changed) when the grown problem's plan would differ by more than that.
bool GrowLastSpan(const AttendProblem& p, uint32_t d, DenseAttendPlanCache* cache) {
  AttendPlan& plan = cache->plan;
  const uint32_t H = p.kv_heads, D = p.head_dim;
  if (!plan.head_shared_runs || plan.cluster_size != 1 || plan.run_stride != 0 ||
      plan.num_items % H != 0 || plan.total_tokens % H != 0) {
    return false;
  }
  // The same split size and no clusters for the grown token count.
  const uint64_t task = plan.total_tokens / H + d;
  const SplitChoice choice =
      ChooseSplit(AttendPlanOptions{}, task * H, task, task, H, D, p.q_heads / H, p.kv_dtype);
  if (choice.cluster != 1 || choice.split != plan.split_tokens) return false;
  // Head 0's last split ends with the last span's run and has room for d more tokens (the
  // walk would put them there; the other heads' items are copies of head 0's).
  auto* items = reinterpret_cast<detail::AttendItemDesc*>(plan.image.data() + plan.items_off);
  auto* runs = reinterpret_cast<detail::AttendRunDesc*>(plan.image.data() + plan.runs_off);
  const uint32_t per_head = plan.num_items / H;
  detail::AttendItemDesc& last_item = items[per_head - 1];
  if (last_item.run_end == last_item.run_begin ||
      uint64_t{last_item.tokens} + d > plan.split_tokens) {
    return false;
  }
  detail::AttendRunDesc& run = runs[last_item.run_end - 1];
  const KVSpan& sp = cache->last;
  if (run.k_off + uint64_t{run.len} * D != sp.offset + uint64_t{sp.end} * D ||
      run.head_stride != sp.stride_tokens * D) {
    return false;
  }
  run.len += d;
  for (uint32_t h = 0; h < H; ++h) items[h * per_head + per_head - 1].tokens += d;
  plan.total_tokens += uint64_t{H} * d;
  return true;
}

}  // namespace

Status PlanAttendDenseStep(const AttendProblem& p, uint64_t key, DenseAttendPlanCache* cache,
                           bool* patched) {
  *patched = false;
  if (cache->valid && key == cache->key && SameScalars(p, cache->planned) && p.num_spans > 0) {
    const KVSpan& now = p.spans[p.num_spans - 1];
    const KVSpan& was = cache->last;
    if (now.offset == was.offset && now.stride_tokens == was.stride_tokens &&
        now.begin == was.begin && now.end >= was.end && was.end > was.begin) {
      const uint32_t d = now.end - was.end;
      if (d == 0 || GrowLastSpan(p, d, cache)) {
        cache->last = now;
        *patched = true;
        return Status::OK();
      }
    }
  }
  cache->valid = false;
  KVMEM_RETURN_IF_ERROR(PlanAttend(&p, 1, AttendPlanOptions{}, &cache->plan));
  cache->valid = true;
  cache->key = key;
  cache->planned = p;
  cache->planned.spans = nullptr;
  cache->last = p.num_spans > 0 ? p.spans[p.num_spans - 1] : KVSpan{};
  return Status::OK();
}

}  // namespace kvmem::kernels::cuda
