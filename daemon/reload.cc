#include "daemon/reload.h"

#include "common/log.h"
#include "daemon/service.h"

namespace kvmem {

Status ApplyReload(const DaemonConfig& fresh, DaemonConfig* current, Service* service,
                   std::vector<std::string>* ignored) {
  KVMEM_RETURN_IF_ERROR(fresh.Validate());
  ignored->clear();
  auto check = [&](bool changed, const char* name) {
    if (changed) ignored->push_back(name);
  };
  check(fresh.listen != current->listen, "listen");
  check(fresh.admin != current->admin, "admin");
  check(fresh.admin_token != current->admin_token, "admin_token");
  check(fresh.data_dir != current->data_dir, "data_dir");
  check(fresh.backend != current->backend, "backend");
  check(fresh.progress != current->progress, "progress");
  check(fresh.executors != current->executors, "executors");
  check(fresh.search_threads != current->search_threads, "search_threads");
  check(fresh.device_memory_bytes != current->device_memory_bytes, "device_memory");
  check(fresh.host_memory_bytes != current->host_memory_bytes, "host_memory");
  check(fresh.restore != current->restore, "restore");
  check(fresh.high_watermark != current->high_watermark ||
            fresh.low_watermark != current->low_watermark,
        "high_watermark/low_watermark");
  check(fresh.max_message_bytes != current->max_message_bytes, "max_message_bytes");
  check(fresh.max_connections != current->max_connections, "max_connections");
  check(fresh.client_idle_timeout_seconds != current->client_idle_timeout_seconds,
        "client_idle_timeout_seconds");
  check(fresh.idle_trim_seconds != current->idle_trim_seconds, "idle_trim_seconds");
  check(fresh.executor_stall_seconds != current->executor_stall_seconds, "executor_stall_seconds");
  check(fresh.on_executor_stall != current->on_executor_stall, "on_executor_stall");
  check(fresh.on_device_failure != current->on_device_failure, "on_device_failure");
  check(fresh.loop_stall_seconds != current->loop_stall_seconds, "loop_stall_seconds");
  check(fresh.malloc_arena_max != current->malloc_arena_max, "malloc_arena_max");
  check(fresh.store_block_cache_bytes != current->store_block_cache_bytes, "store_block_cache");
  check(fresh.max_inflight_per_endpoint != current->max_inflight_per_endpoint,
        "max_inflight_per_endpoint");
  check(fresh.ucx_error_mode != current->ucx_error_mode, "ucx_error_mode");
  const SessionOptions& a = fresh.session_defaults;
  const SessionOptions& b = current->session_defaults;
  check(a.chunker.min_tokens != b.chunker.min_tokens ||
            a.chunker.max_tokens != b.chunker.max_tokens || a.sink_tokens != b.sink_tokens ||
            a.default_budget_tokens != b.default_budget_tokens,
        "session_defaults");
  // Validate everything before changing anything.
  KVMEM_RETURN_IF_ERROR(SetLogLevel(fresh.log_level).WithContext("log_level"));
  Status s = service->Reload(fresh);
  if (!s.ok()) {
    (void)SetLogLevel(current->log_level);
    return s;
  }
  current->log_level = fresh.log_level;
  current->tenants = fresh.tenants;
  current->max_sessions_per_tenant = fresh.max_sessions_per_tenant;
  current->max_tokens_per_session = fresh.max_tokens_per_session;
  current->tenant_memory_quota_bytes = fresh.tenant_memory_quota_bytes;
  current->tenant_memory_quotas = fresh.tenant_memory_quotas;
  return Status::OK();
}

}  // namespace kvmem
