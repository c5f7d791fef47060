#include "daemon/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <set>
#include <type_traits>

#include "daemon/chunk_store.h"
#include "daemon/service.h"
#include "daemon/transport.h"
#include "wire/framing.h"

namespace kvmem {

namespace w = ::kvmem::wire;

const char* TierName(Tier t) {
  switch (t) {
    case Tier::kDevice:
      return "device";
    case Tier::kHost:
      return "host";
    case Tier::kDisk:
      return "disk";
  }
  return "unknown";
}

void LatencyHistogram::Observe(std::chrono::nanoseconds d) {
  const double s = std::chrono::duration<double>(d).count();
  size_t i = 0;
  while (i < kLatencyBucketsSeconds.size() && s > kLatencyBucketsSeconds[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(static_cast<uint64_t>(d.count() < 0 ? 0 : d.count()),
                    std::memory_order_relaxed);
}

LatencyHistogram::Snapshot LatencyHistogram::Read() const {
  Snapshot s;
  for (size_t i = 0; i < buckets_.size(); ++i)
    s.buckets[i] = buckets_[i].load(std::memory_order_relaxed);
  s.count = count_.load(std::memory_order_relaxed);
  s.sum_ns = sum_ns_.load(std::memory_order_relaxed);
  return s;
}

void DaemonMetrics::RecordRequest(int op, std::chrono::nanoseconds latency_ns, int code) {
  op = std::clamp(op, 0, kMaxOps - 1);
  requests[op].fetch_add(1, std::memory_order_relaxed);
  latency[op].Observe(latency_ns);
  if (code != 0) errors[std::clamp(code, 0, kMaxCodes - 1)].fetch_add(1, std::memory_order_relaxed);
}

DaemonMetrics& GlobalMetrics() {
  static DaemonMetrics m;
  return m;
}

namespace {

// Request ops: the Body members a client sends (replies are every other value).
std::vector<int> RequestOps() {
  std::vector<int> ops;
  for (int v = 1; v <= static_cast<int>(w::Body::MAX) && v < kMaxOps; ++v) {
    const std::string name = w::EnumNameBody(static_cast<w::Body>(v));
    if (name.empty() || (name.size() > 5 && name.compare(name.size() - 5, 5, "Reply") == 0))
      continue;
    ops.push_back(v);
  }
  return ops;
}

std::string OpName(int op) {
  const char* n = w::EnumNameBody(static_cast<w::Body>(op));
  return n && *n ? n : "unknown";
}

class Writer {
 public:
  void Family(const char* name, const char* type, const char* help) {
    out_ += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
  }
  void Sample(const std::string& name, const std::string& labels, uint64_t v) {
    if (labels.empty())
      out_ += fmt::format("{} {}\n", name, v);
    else
      out_ += fmt::format("{}{{{}}} {}\n", name, labels, v);
  }
  void SampleD(const std::string& name, const std::string& labels, double v) {
    if (labels.empty())
      out_ += fmt::format("{} {}\n", name, v);
    else
      out_ += fmt::format("{}{{{}}} {}\n", name, labels, v);
  }
  // A family of one unlabeled sample.
  template <typename T>
  void Single(const char* name, const char* type, const char* help, T v) {
    Family(name, type, help);
    if constexpr (std::is_floating_point_v<T>) {
      SampleD(name, "", v);
    } else {
      Sample(name, "", static_cast<uint64_t>(v));
    }
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

std::string EscapeLabel(const std::string& v) {
  std::string o;
  for (char c : v) {
    if (c == '\\' || c == '"') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o += c;
  }
  return o;
}

// One labelled series of a latency histogram: cumulative buckets, +Inf, sum and count.
void WriteHistogram(Writer* wr, const char* family, const char* label, const std::string& value,
                    const LatencyHistogram::Snapshot& snap) {
  const std::string b = std::string(family) + "_bucket";
  uint64_t cum = 0;
  for (size_t i = 0; i < kLatencyBucketsSeconds.size(); ++i) {
    cum += snap.buckets[i];
    wr->Sample(b, fmt::format("{}=\"{}\",le=\"{}\"", label, value, kLatencyBucketsSeconds[i]), cum);
  }
  cum += snap.buckets.back();
  wr->Sample(b, fmt::format("{}=\"{}\",le=\"+Inf\"", label, value), cum);
  wr->SampleD(std::string(family) + "_sum", fmt::format("{}=\"{}\"", label, value),
              static_cast<double>(snap.sum_ns) * 1e-9);
  wr->Sample(std::string(family) + "_count", fmt::format("{}=\"{}\"", label, value), snap.count);
}

}  // namespace

const char* AttendPhaseName(AttendPhase p) {
  switch (p) {
    case AttendPhase::kCatchUp: return "catch_up";
    case AttendPhase::kHostSearch: return "host_search";
    case AttendPhase::kSpans: return "spans";
    case AttendPhase::kHostAttend: return "host_attend";
    case AttendPhase::kDeviceSync: return "device_sync";
    case AttendPhase::kDeviceSearchAttend: return "device_search_attend";
    case AttendPhase::kSeal: return "seal";
    case AttendPhase::kDevicePlan: return "device_plan";
    case AttendPhase::kDeviceLaunch: return "device_launch";
    case AttendPhase::kDeviceWait: return "device_wait";
    case AttendPhase::kRescoreSearch: return "rescore_search";
    case AttendPhase::kRescoreLogits: return "rescore_logits";
    case AttendPhase::kRescoreSelect: return "rescore_select";
    case AttendPhase::kGpuCopyUp: return "gpu_copy_up";
    case AttendPhase::kGpuKernels: return "gpu_kernels";
    case AttendPhase::kGpuCopyDown: return "gpu_copy_down";
    case AttendPhase::kGpuUnaccounted: return "gpu_unaccounted";
    case AttendPhase::kMaintainTrees: return "maintain_trees";
    case AttendPhase::kMaintainDevice: return "maintain_device";
    case AttendPhase::kMirrorExport: return "mirror_export";
    case AttendPhase::kMirrorUpload: return "mirror_upload";
    case AttendPhase::kSealCopies: return "seal_copies";
    case AttendPhase::kSealIndex: return "seal_index";
    case AttendPhase::kRequestReceive: return "request_receive";
    case AttendPhase::kRequestQueue: return "request_queue";
    case AttendPhase::kRequestChecks: return "request_checks";
    case AttendPhase::kSessionAttend: return "session_attend";
    case AttendPhase::kRequestPack: return "request_pack";
    case AttendPhase::kRequestReply: return "request_reply";
    case AttendPhase::kCount: break;
  }
  return "unknown";
}

const char* AppendPhaseName(AppendPhase p) {
  switch (p) {
    case AppendPhase::kReceive: return "receive";
    case AppendPhase::kQueue: return "queue";
    case AppendPhase::kHandle: return "handle";
    case AppendPhase::kStore: return "store";
    case AppendPhase::kReply: return "reply";
    case AppendPhase::kCount: break;
  }
  return "unknown";
}

std::vector<std::string> MetricFamilyNames() {
  return {"kvmem_build_info",
          "kvmem_up",
          "kvmem_ready",
          "kvmem_uptime_seconds",
          "kvmem_requests_total",
          "kvmem_request_duration_seconds",
          "kvmem_errors_total",
          "kvmem_tier_capacity_bytes",
          "kvmem_tier_bytes",
          "kvmem_tier_chunks",
          "kvmem_evictions_total",
          "kvmem_fetch_backs_total",
          "kvmem_spill_bytes_total",
          "kvmem_restore_bytes_total",
          "kvmem_sessions",
          "kvmem_session_tokens",
          "kvmem_memory_blocks",
          "kvmem_memory_block_bytes",
          "kvmem_tenants",
          "kvmem_tenants_configured",
          "kvmem_search_nodes_visited_total",
          "kvmem_attend_phase_seconds",
          "kvmem_append_phase_seconds",
          "kvmem_append_landings_total",
          "kvmem_ucx_endpoints_open",
          "kvmem_ucx_endpoints_accepted_total",
          "kvmem_ucx_endpoints",
          "kvmem_ucx_endpoints_closed_total",
          "kvmem_ucx_endpoints_idle_closed_total",
          "kvmem_ucx_endpoints_left_open_total",
          "kvmem_requests_inflight",
          "kvmem_receive_buffers_retained_bytes",
          "kvmem_messages_rejected_total",
          "kvmem_bytes_in_total",
          "kvmem_bytes_out_total",
          "kvmem_config_reloads_total",
          "kvmem_idle_trims_total",
          "kvmem_executor_stalls_total",
          "kvmem_executors_stalled",
          "kvmem_executor_longest_task_seconds",
          "kvmem_event_loop_lag_seconds",
          "kvmem_device_failures_total",
          "kvmem_device_submits_total",
          "kvmem_dense_plans_total",
          "kvmem_store_memory_bytes"};
}

std::string RenderPrometheus(const MetricsSources& src) {
  const DaemonMetrics& m = GlobalMetrics();
  // Snapshot the sessions first (brief shared lock inside), then format without any lock.
  std::vector<std::shared_ptr<Session>> sessions;
  size_t tenants_configured = 0;
  if (src.service) {
    sessions = src.service->SnapshotSessions();
    tenants_configured = src.service->configured_tenant_count();
  }
  uint64_t dev_bytes = 0, dev_chunks = 0, tokens = 0, host_bytes = 0, disk_bytes = 0;
  uint64_t memory_blocks = 0, memory_bytes = 0;
  std::map<std::string, uint64_t> per_tenant;
  for (const auto& s : sessions) {
    const SessionStats st = s->Stats();
    dev_bytes += st.bytes;
    dev_chunks += st.chunks;
    host_bytes += st.host_bytes;
    disk_bytes += st.disk_bytes;
    tokens += st.tokens;
    memory_blocks += st.memory_blocks;
    memory_bytes += st.memory_bytes;
    ++per_tenant[s->tenant()];
  }

  Writer wr;
  wr.Family("kvmem_build_info", "gauge", "Build and runtime identity; always 1.");
  wr.Sample("kvmem_build_info",
            fmt::format("version=\"{}\",backend=\"{}\"", EscapeLabel(src.version),
                        EscapeLabel(src.backend)),
            1);
  wr.Family("kvmem_up", "gauge", "1 while the daemon serves.");
  wr.Sample("kvmem_up", "", 1);
  wr.Family("kvmem_ready", "gauge", "1 once startup (restore) finished and the listener is up.");
  wr.Sample("kvmem_ready", "", src.ready ? 1 : 0);
  wr.Family("kvmem_uptime_seconds", "gauge", "Seconds since the daemon started.");
  wr.SampleD("kvmem_uptime_seconds", "",
             std::chrono::duration<double>(std::chrono::steady_clock::now() - src.started).count());

  const std::vector<int> ops = RequestOps();
  wr.Family("kvmem_requests_total", "counter", "Requests answered, by wire op.");
  for (int op : ops) {
    wr.Sample("kvmem_requests_total", fmt::format("op=\"{}\"", OpName(op)),
              m.requests[op].load(std::memory_order_relaxed));
  }
  wr.Family("kvmem_request_duration_seconds", "histogram",
            "Time from message arrival to reply send in the transport, by wire op.");
  for (int op : ops) {
    WriteHistogram(&wr, "kvmem_request_duration_seconds", "op", OpName(op), m.latency[op].Read());
  }
  wr.Family("kvmem_errors_total", "counter", "Replies with a non-OK status, by wire status code.");
  for (int c = 1; c <= static_cast<int>(w::Code::MAX) && c < kMaxCodes; ++c) {
    const char* n = w::EnumNameCode(static_cast<w::Code>(c));
    if (n == nullptr || *n == '\0') continue;
    wr.Sample("kvmem_errors_total", fmt::format("code=\"{}\"", n),
              m.errors[c].load(std::memory_order_relaxed));
  }

  auto per_tier = [&](const char* name, const char* type, const char* help, auto value) {
    wr.Family(name, type, help);
    for (int t = 0; t < kNumTiers; ++t) {
      wr.Sample(name, fmt::format("tier=\"{}\"", TierName(static_cast<Tier>(t))), value(t));
    }
  };
  per_tier("kvmem_tier_capacity_bytes", "gauge", "Configured capacity per storage tier.",
           [&](int t) -> uint64_t {
             if (t == 0) return src.device_capacity_bytes;
             return t == 1 && src.service ? src.service->host_capacity_bytes() : 0;
           });
  per_tier("kvmem_tier_bytes", "gauge", "KV bytes held by sessions per storage tier.",
           [&](int t) { return t == 0 ? dev_bytes : t == 1 ? host_bytes : disk_bytes; });
  per_tier("kvmem_tier_chunks", "gauge",
           "Sealed chunks (device row; a chunk's layers may sit in different tiers, so the others are 0).",
           [&](int t) { return t == 0 ? dev_chunks : 0; });
  per_tier("kvmem_evictions_total", "counter", "(chunk, layer) blocks evicted from a tier.",
           [&](int t) { return m.evictions[t].load(std::memory_order_relaxed); });
  per_tier("kvmem_fetch_backs_total", "counter",
           "(chunk, layer) blocks fetched back from a tier into the device tier.",
           [&](int t) { return m.fetch_backs[t].load(std::memory_order_relaxed); });
  per_tier("kvmem_spill_bytes_total", "counter", "Bytes spilled to a tier.",
           [&](int t) { return m.spill_bytes[t].load(std::memory_order_relaxed); });
  per_tier("kvmem_restore_bytes_total", "counter", "Bytes restored from a tier.",
           [&](int t) { return m.restore_bytes[t].load(std::memory_order_relaxed); });

  wr.Family("kvmem_sessions", "gauge", "Live sessions, by tenant.");
  if (per_tenant.empty()) wr.Sample("kvmem_sessions", "tenant=\"\"", 0);
  for (const auto& [t, n] : per_tenant)
    wr.Sample("kvmem_sessions", fmt::format("tenant=\"{}\"", EscapeLabel(t)), n);
  wr.Family("kvmem_session_tokens", "gauge", "Tokens held by all sessions.");
  wr.Sample("kvmem_session_tokens", "", tokens);
  wr.Family("kvmem_memory_blocks", "gauge", "Memory blocks held by all sessions.");
  wr.Sample("kvmem_memory_blocks", "", memory_blocks);
  wr.Family("kvmem_memory_block_bytes", "gauge",
            "Payload bytes of memory blocks (included in kvmem_tier_bytes).");
  wr.Sample("kvmem_memory_block_bytes", "", memory_bytes);
  wr.Family("kvmem_tenants", "gauge", "Tenants with at least one session.");
  wr.Sample("kvmem_tenants", "", per_tenant.size());
  wr.Family("kvmem_tenants_configured", "gauge",
            "Tenant tokens in the configuration (0: open mode).");
  wr.Sample("kvmem_tenants_configured", "", tenants_configured);
  wr.Family("kvmem_search_nodes_visited_total", "counter",
            "Cluster-index nodes visited by searches.");
  wr.Sample("kvmem_search_nodes_visited_total", "",
            m.search_nodes_visited.load(std::memory_order_relaxed));
  wr.Family("kvmem_attend_phase_seconds", "histogram",
            "Attend time on the daemon by phase (index catch-up, host or device search, "
            "attention, sealing), and the session upkeep after each reply (maintain_*).");
  for (int ph = 0; ph < kNumAttendPhases; ++ph) {
    WriteHistogram(&wr, "kvmem_attend_phase_seconds", "phase",
                   AttendPhaseName(static_cast<AttendPhase>(ph)), m.attend_phase[ph].Read());
  }
  wr.Family("kvmem_append_phase_seconds", "histogram",
            "AppendKV time on the daemon by phase (payload receive, queue, handler, the store "
            "into the KV pool within it, reply).");
  for (int ph = 0; ph < kNumAppendPhases; ++ph) {
    WriteHistogram(&wr, "kvmem_append_phase_seconds", "phase",
                   AppendPhaseName(static_cast<AppendPhase>(ph)), m.append_phase[ph].Read());
  }
  wr.Family("kvmem_append_landings_total", "counter",
            "AppendKV payloads received in place into their chunk blocks: stored without a copy "
            "(landed), or copied back because the plan no longer held (gathered).");
  wr.Sample("kvmem_append_landings_total", "outcome=\"landed\"", m.append_landed.load(std::memory_order_relaxed));
  wr.Sample("kvmem_append_landings_total", "outcome=\"gathered\"", m.append_gathered.load(std::memory_order_relaxed));

  const TransportCounters* tc = src.transport;
  auto ld = [](const std::atomic<uint64_t>* a) {
    return a ? a->load(std::memory_order_relaxed) : 0;
  };
  wr.Family("kvmem_ucx_endpoints_open", "gauge", "UCX endpoints (client connections) open.");
  wr.Sample("kvmem_ucx_endpoints_open", "", ld(tc ? &tc->connections_open : nullptr));
  wr.Family("kvmem_ucx_endpoints_accepted_total", "counter", "UCX endpoints accepted.");
  wr.Sample("kvmem_ucx_endpoints_accepted_total", "", ld(tc ? &tc->connections_accepted : nullptr));
  wr.Family("kvmem_ucx_endpoints", "gauge",
            "UCX endpoints allocated: open connections plus departed ones still closing.");
  wr.Sample("kvmem_ucx_endpoints", "", ld(tc ? &tc->endpoints : nullptr));
  wr.Family("kvmem_ucx_endpoints_closed_total", "counter",
            "UCX endpoints closed and destroyed (client left, or closed by kvmemd).");
  wr.Sample("kvmem_ucx_endpoints_closed_total", "", ld(tc ? &tc->endpoints_closed : nullptr));
  wr.Family("kvmem_ucx_endpoints_idle_closed_total", "counter",
            "Connections kvmemd closed because they were silent for client_idle_timeout_seconds.");
  wr.Sample("kvmem_ucx_endpoints_idle_closed_total", "",
            ld(tc ? &tc->endpoints_idle_closed : nullptr));
  wr.Family("kvmem_ucx_endpoints_left_open_total", "counter",
            "Departed client endpoints whose close did not complete within its deadline; "
            "each stays allocated until kvmemd exits.");
  wr.Sample("kvmem_ucx_endpoints_left_open_total", "",
            ld(tc ? &tc->endpoints_left_open : nullptr));
  wr.Family("kvmem_requests_inflight", "gauge",
            "Requests received and not yet answered (data still arriving, queued or executing).");
  wr.Sample("kvmem_requests_inflight", "", ld(tc ? &tc->requests_inflight : nullptr));
  wr.Family("kvmem_receive_buffers_retained_bytes", "gauge",
            "Large receive buffers kept for reuse (freed by idle trim).");
  wr.Sample("kvmem_receive_buffers_retained_bytes", "", RetainedReceiveBufferBytes());
  wr.Family(
      "kvmem_messages_rejected_total", "counter",
      "Messages refused before reaching a handler (malformed, too large, overload, shutdown).");
  wr.Sample("kvmem_messages_rejected_total", "", ld(tc ? &tc->messages_rejected : nullptr));
  wr.Family("kvmem_ucx_messages_received_total", "counter",
            "Client messages received, by UCX protocol: eager (the data came with the message) or "
            "rendezvous (kvmemd fetched it). Requests of <= 32 KiB are sent eager.");
  wr.Sample("kvmem_ucx_messages_received_total", "protocol=\"eager\"",
            ld(tc ? &tc->received_eager : nullptr));
  wr.Sample("kvmem_ucx_messages_received_total", "protocol=\"rendezvous\"",
            ld(tc ? &tc->received_rendezvous : nullptr));
  wr.Family("kvmem_bytes_in_total", "counter", "Bytes received from clients (headers + data).");
  wr.Sample("kvmem_bytes_in_total", "", ld(tc ? &tc->bytes_in : nullptr));
  wr.Family("kvmem_bytes_out_total", "counter", "Bytes sent to clients (headers + data).");
  wr.Sample("kvmem_bytes_out_total", "", ld(tc ? &tc->bytes_out : nullptr));
  wr.Family("kvmem_config_reloads_total", "counter", "Configuration reloads (SIGHUP), by result.");
  wr.Sample("kvmem_config_reloads_total", "result=\"ok\"",
            m.reloads_ok.load(std::memory_order_relaxed));
  wr.Sample("kvmem_config_reloads_total", "result=\"failed\"",
            m.reloads_failed.load(std::memory_order_relaxed));
  wr.Family("kvmem_idle_trims_total", "counter",
            "Idle trims completed (retained memory released after idle_trim_seconds idle).");
  wr.Sample("kvmem_idle_trims_total", "", m.idle_trims.load(std::memory_order_relaxed));
  wr.Single("kvmem_executor_stalls_total", "counter",
            "Stalls begun: an executor thread ran one task past executor_stall_seconds (a wedged "
            "GPU kernel, a store call that never returns).",
            m.executor_stalls.load(std::memory_order_relaxed));
  wr.Single("kvmem_executors_stalled", "gauge",
            "Executor threads running one task past executor_stall_seconds at the last check "
            "(once a second); /readyz answers 503 while it is above 0.",
            m.executors_stalled.load(std::memory_order_relaxed));
  wr.Single("kvmem_executor_longest_task_seconds", "gauge",
            "The longest-running executor task's time so far at the last check (0: all idle).",
            m.executor_longest_task_us.load(std::memory_order_relaxed) * 1e-6);
  wr.Single("kvmem_event_loop_lag_seconds", "gauge",
            "Seconds since the event loop (UCX progress, timers) last ticked; it ticks once a "
            "second, so above ~1 it is late, and /healthz answers 503 past loop_stall_seconds.",
            src.loop_lag_seconds);
  wr.Single("kvmem_device_failures_total", "counter",
            "CUDA errors that left the GPU context unusable (illegal address, launch failure, "
            "uncorrectable ECC, ...): every later device operation fails until kvmemd restarts.",
            m.device_failures.load(std::memory_order_relaxed));
  wr.Family("kvmem_device_submits_total", "counter",
            "Device searches (index-mode Attend on the GPU) by submission: replayed from a cached "
            "CUDA graph, captured into a new graph, or enqueued directly.");
  wr.Sample("kvmem_device_submits_total", "how=\"replayed\"",
            m.device_graph_replays.load(std::memory_order_relaxed));
  wr.Sample("kvmem_device_submits_total", "how=\"captured\"",
            m.device_graph_captures.load(std::memory_order_relaxed));
  wr.Sample("kvmem_device_submits_total", "how=\"direct\"",
            m.device_direct_submits.load(std::memory_order_relaxed));
  wr.Family("kvmem_dense_plans_total", "counter",
            "Dense attention plans on the GPU (dense mode, dense layers): planned afresh, or a "
            "kept plan patched for the tokens appended to the tail since.");
  wr.Sample("kvmem_dense_plans_total", "how=\"planned\"",
            m.dense_plans[0].load(std::memory_order_relaxed));
  wr.Sample("kvmem_dense_plans_total", "how=\"patched\"",
            m.dense_plans[1].load(std::memory_order_relaxed));
  wr.Family("kvmem_store_memory_bytes", "gauge",
            "Memory RocksDB holds: block cache in use, table readers (index/filter blocks), "
            "memtables.");
  const ChunkStore* store = src.service ? src.service->store() : nullptr;
  const ChunkStore::MemoryUse mu = store ? store->Memory() : ChunkStore::MemoryUse{};
  wr.Sample("kvmem_store_memory_bytes", "kind=\"block_cache\"", mu.block_cache);
  wr.Sample("kvmem_store_memory_bytes", "kind=\"table_readers\"", mu.table_readers);
  wr.Sample("kvmem_store_memory_bytes", "kind=\"memtables\"", mu.memtables);
  return wr.Take();
}

}  // namespace kvmem
