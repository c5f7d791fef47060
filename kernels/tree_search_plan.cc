// Host-side planner of the fused search + sparse attention launch (kernels/cuda_ops.h). No
// device calls: it sizes every head's splits from the most tokens the head can attend (the
// attention's blocks build their runs from the search's selection and fixed pieces).
#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/cuda_ops.h"
#include "kernels/detail/attention_plan_layout.h"
#include "kernels/detail/tree_search_layout.h"

namespace kvmem::kernels::cuda {
namespace {

using ::kvmem::kernels::detail::AttendItemDesc;
using ::kvmem::kernels::detail::AttendRunDesc;
using ::kvmem::kernels::detail::kMaxRunsPerItem;
using ::kvmem::kernels::detail::PartialFloats;
using ::kvmem::kernels::detail::SearchRunHeader;
using ::kvmem::kernels::detail::SearchTaskDesc;

size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Longest chunk the split sizing allows for (the chunker's default maximum is 24).
constexpr uint64_t kChunkSlack = 64;

}  // namespace

Status PlanSearchAttend(const SearchAttendProblem* problems, uint32_t count,
                        const AttendPlanOptions& options, SearchAttendPlan* plan) {
  if (count == 0) return InvalidArgument("plan search attend: no problems");
  *plan = SearchAttendPlan{};
  const AttendProblem& a0 = problems[0].attend;
  const uint32_t D = a0.head_dim;
  if (a0.kv_heads == 0 || a0.q_heads % a0.kv_heads != 0) {
    return InvalidArgument("plan search attend: q_heads must be a multiple of kv_heads");
  }
  const uint32_t G = a0.q_heads / a0.kv_heads;
  if (a0.kv_dtype == DType::kF32) return Unimplemented("search attend on CUDA: fp32 K/V");
  if ((D != 64 && D != 128) || (G != 1 && G != 2 && G != 4 && G != 8)) {
    return Unimplemented("search attend on CUDA: head_dim " + std::to_string(D) + " group " +
                         std::to_string(G));
  }
  uint64_t total = 0, tasks = 0, nodes = 0, max_task = 0, min_task = ~uint64_t{0};
  uint32_t max_budget = 0;
  for (uint32_t i = 0; i < count; ++i) {
    const SearchAttendProblem& p = problems[i];
    const AttendProblem& a = p.attend;
    if (a.kv_dtype != a0.kv_dtype || a.q_dtype != a0.q_dtype || a.out_dtype != a0.out_dtype ||
        a.head_dim != D || a.kv_heads == 0 || a.q_heads != a.kv_heads * G) {
      return InvalidArgument("plan search attend: problems differ in dtype, head_dim or group");
    }
    if (a.pool == nullptr || a.q == nullptr || a.out == nullptr || p.trees == nullptr) {
      return InvalidArgument("plan search attend: problem " + std::to_string(i) +
                             " lacks pool, q, out or trees");
    }
    if (reinterpret_cast<uintptr_t>(a.pool) % 16 != 0 || p.tail.offset % 8 != 0) {
      return InvalidArgument("plan search attend: pool or tail not 16-byte aligned");
    }
    for (uint32_t h = 0; h < a.kv_heads; ++h) {
      const FlatTreeView& t = p.trees[h];
      if (t.num_levels > kTreeSearchMaxLevels + 1) {
        return Unimplemented("search attend on CUDA: tree of " + std::to_string(t.num_levels) +
                             " node levels (at most " +
                             std::to_string(kTreeSearchMaxLevels + 1) + ")");
      }
      if (t.num_chunks > 0 && p.chunk_block == nullptr) {
        return InvalidArgument("plan search attend: chunks without a block table");
      }
      nodes += t.num_nodes;
    }
    const uint64_t most = uint64_t{p.sink_tokens} + p.params.budget_tokens + p.recent_window +
                          kChunkSlack + (p.tail.end - p.tail.begin);
    total += most * a.kv_heads;
    max_task = std::max(max_task, most);
    min_task = std::min(min_task, most);
    tasks += a.kv_heads;
    max_budget = std::max(max_budget, p.params.budget_tokens);
  }
  uint64_t target = options.target_blocks;
  const uint64_t resident = target == 0 ? AttendResidentBlocks(D, G, a0.kv_dtype) : 0;
  if (target == 0) {
    target = resident == 0 ? 528 : std::max<uint64_t>(resident / 2, resident - std::min(resident, tasks));
  }
  // Every run holds >= 1 token, so splits of <= kMaxRunsPerItem tokens can never overflow a
  // run table; larger splits rely on chunks of >= split / kMaxRunsPerItem tokens.
  uint64_t split = (total + target - 1) / target;
  if (resident > 0 && tasks <= resident) {
    // One wave of even splits: every task gets at most resident / tasks splits (see PlanAttend).
    const uint64_t k = resident / tasks;
    split = (max_task + k - 1) / k;
  }
  split = std::clamp<uint64_t>(split, AttendMinSplit(options.min_split_tokens),
                               std::min<uint64_t>(options.max_split_tokens, 1024));
  split = AlignUp(std::max<uint64_t>(split, 64), 64);
  // Clusters of splits for the attention (AttendPlanOptions::cluster): every task gets C splits
  // of its most tokens / C, while those stay within the split bound above.
  uint32_t C = 1;
  if (options.cluster > 1 && options.cluster != kAttendClusterAuto) {
    C = options.cluster;
  } else if (options.cluster != 1 && options.target_blocks == 0 && resident > 0 &&
             tasks <= resident && 2 * min_task >= max_task) {
    C = AttendTaskClusterSize(options.cluster, resident, tasks, D, G, a0.kv_dtype);
  }
  const uint64_t split_cap = std::min<uint64_t>(options.max_split_tokens, 1024);
  if (C > 1 && AlignUp((max_task + C - 1) / C, 16) > split_cap) C = 1;

  // Splits per problem, then the layout, then the descriptors written straight into the image
  // (no per-item copies through temporary vectors: this runs on every device-search request).
  auto most_of = [](const SearchAttendProblem& p) {
    return uint64_t{p.sink_tokens} + p.params.budget_tokens + p.recent_window + kChunkSlack +
           (p.tail.end - p.tail.begin);
  };
  uint64_t num_items = 0;
  for (uint32_t i = 0; i < count; ++i) {
    const uint64_t most = most_of(problems[i]);
    const uint32_t splits =
        C > 1 ? C : static_cast<uint32_t>(std::max<uint64_t>(1, (most + split - 1) / split));
    num_items += uint64_t{splits} * problems[i].attend.kv_heads;
  }
  plan->num_tasks = static_cast<uint32_t>(tasks);
  plan->num_items = static_cast<uint32_t>(num_items);
  plan->attend_cluster = C;
  plan->max_selected = std::min<uint32_t>(std::max<uint32_t>(max_budget, 1), kSearchMaxCandidates * 4);
  plan->head_dim = D;
  plan->group = G;
  plan->kv_dtype = a0.kv_dtype;
  plan->q_dtype = a0.q_dtype;
  plan->out_dtype = a0.out_dtype;
  size_t off = 0;
  plan->tasks_off = off;
  off = AlignUp(off + tasks * sizeof(SearchTaskDesc), 256);
  plan->items_off = off;
  off = AlignUp(off + num_items * sizeof(AttendItemDesc), 256);
  plan->counters_off = off;
  off = AlignUp(off + tasks * sizeof(uint32_t), 256);
  const size_t image_bytes = off;
  plan->image.assign(image_bytes, 0);
  auto* descs = reinterpret_cast<SearchTaskDesc*>(plan->image.data() + plan->tasks_off);
  auto* items = reinterpret_cast<AttendItemDesc*>(plan->image.data() + plan->items_off);
  uint32_t task = 0, item = 0;
  uint32_t partial_slots = 0;
  uint32_t uniform = ~0u;  // splits of every task so far (~0: none yet, 0: they differ)
  plan->split_tokens = 0;
  size_t scratch_floats = 0;
  for (uint32_t i = 0; i < count; ++i) {
    const SearchAttendProblem& p = problems[i];
    const AttendProblem& a = p.attend;
    const size_t qsz = DTypeSize(a.q_dtype), osz = DTypeSize(a.out_dtype);
    const uint64_t most = most_of(p);
    const uint64_t task_split =
        C > 1 ? std::max<uint64_t>(16, AlignUp((most + C - 1) / C, 16)) : split;
    const uint32_t splits =
        C > 1 ? C : static_cast<uint32_t>(std::max<uint64_t>(1, (most + split - 1) / split));
    uniform = uniform == ~0u || uniform == splits ? splits : 0;
    for (uint32_t h = 0; h < a.kv_heads; ++h, ++task) {
      SearchTaskDesc& d = descs[task];  // zero-filled by assign
      d.tree = p.trees[h];
      d.chunk_block = p.chunk_block;
      d.q = static_cast<const uint8_t*>(a.q) + size_t{h} * G * D * qsz;
      d.node_chain = scratch_floats;
      scratch_floats += size_t{d.tree.num_nodes} * 4;
      d.params = p.params;
      d.recent_from = p.recent_from;
      d.tail_k_off = p.tail.offset + (uint64_t{h} * p.tail.stride_tokens + p.tail.begin) * D;
      d.tail_v_off = d.tail_k_off + uint64_t{a.kv_heads} * p.tail.stride_tokens * D;
      d.tail_len = p.tail.end - p.tail.begin;
      d.sink_tokens = p.sink_tokens;
      d.kv_heads = a.kv_heads;
      d.kv_head = h;
      d.first_item = item;
      d.num_splits = splits;
      d.split_tokens = static_cast<uint32_t>(task_split);
      plan->split_tokens = std::max(plan->split_tokens, d.split_tokens);
      d.group = G;
      if (p.new_k != nullptr && p.new_v != nullptr && d.tail_len > 0) {
        const size_t esz = DTypeSize(a.kv_dtype);
        d.new_row_bytes = static_cast<uint32_t>(size_t{D} * esz);
        d.new_k = static_cast<const uint8_t*>(p.new_k) + size_t{h} * d.new_row_bytes;
        d.new_v = static_cast<const uint8_t*>(p.new_v) + size_t{h} * d.new_row_bytes;
        // The attention only reads the pool; the search writes the step's rows into it.
        uint8_t* pool = static_cast<uint8_t*>(const_cast<void*>(a.pool));
        d.new_k_dst = pool + (d.tail_k_off + uint64_t{d.tail_len - 1} * D) * esz;
        d.new_v_dst = pool + (d.tail_v_off + uint64_t{d.tail_len - 1} * D) * esz;
      }
      void* out = static_cast<uint8_t*>(a.out) + size_t{h} * G * D * osz;
      float* lse = a.lse ? a.lse + size_t{h} * G : nullptr;
      for (uint32_t s = 0; s < splits; ++s, ++item) {
        AttendItemDesc& it = items[item];  // zero-filled by assign
        it.pool = a.pool;
        it.q = d.q;
        it.out = out;
        it.lse = lse;
        it.scale = a.scale;
        it.num_splits = splits;
        it.partial_base = partial_slots;
        it.task = task;
        it.split = s;
        // Its runs: built by its block from what the search leaves (SearchRunHeader). The
        // first item's run slots of a task hold the task's fixed pieces.
        it.run_begin = item * kMaxRunsPerItem;
        it.run_end = it.run_begin;
      }
      if (splits / C > 1) partial_slots += splits / C;
    }
  }
  // What a caller reads back (results, then the selection) right after the image, so one copy
  // can bring back [whatever sits before the image (e.g. out, lse) | image | results].
  plan->results_off = off;
  off = AlignUp(off + tasks * sizeof(SearchTaskResult), 256);
  plan->selected_off = off;
  off = AlignUp(off + tasks * plan->max_selected * sizeof(uint32_t), 256);
  plan->scores_off = off;
  off = AlignUp(off + tasks * plan->max_selected * sizeof(float), 256);
  plan->runs_off = off;
  off = AlignUp(off + num_items * kMaxRunsPerItem * sizeof(AttendRunDesc), 256);
  plan->run_source_off = off;
  off = AlignUp(off + tasks * sizeof(SearchRunHeader), 256);
  plan->uniform_splits = uniform == ~0u ? 0 : uniform;
  plan->scratch_off = off;
  off = AlignUp(off + scratch_floats * sizeof(float), 256);
  plan->partials_off = off;
  plan->workspace_bytes =
      off + size_t{partial_slots} * PartialFloats(G, D) * sizeof(float);
  return Status::OK();
}

}  // namespace kvmem::kernels::cuda
