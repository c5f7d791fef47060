// kvmemd configuration: embedded defaults, then the config file (JSON), then flags.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "common/head_mask.h"
#include "common/status.h"
#include "daemon/session.h"

namespace kvmem {

uint32_t DefaultSearchThreads();

struct DaemonConfig {
  // Address the UCX listener binds, HOST:PORT. Default: "127.0.0.1:7420".
  std::string listen = "127.0.0.1:7420";
  // Directory for persistent state; created if missing. Default: "./var/kvmem".
  std::string data_dir = "./var/kvmem";
  // "auto" (CUDA when a GPU is present and the build has CUDA), "cpu" or "cuda".
  // Default: "auto".
  std::string backend = "auto";
  // trace, debug, info, warn, error, critical, off. Default: "info".
  std::string log_level = "info";
  // "event": the io_context sleeps on the UCX worker's event fd (low CPU use).
  // "poll": a thread spins on the worker (lowest latency, one core busy). Default: "event".
  std::string progress = "event";
  // Executor threads that run session operations, sessions sharded by id. 0 runs them on the
  // transport thread (lowest latency for small requests; no parallelism). Default: 2.
  uint32_t executors = 2;
  // Threads a single index search fans out over (one tree per KV head), besides the calling
  // executor. 0 searches heads sequentially. Default: min(7, cores / 2 - 1), 0 on small hosts.
  uint32_t search_threads = DefaultSearchThreads();
  // KV pool (arena) size: device memory on CUDA, host memory on the CPU backend.
  // Default: 4 GiB.
  uint64_t device_memory_bytes = 4ull << 30;
  // Host tier: heap memory that holds blocks evicted from the device tier before they go to
  // RocksDB. 0: no host tier (device evicts straight to RocksDB). Default: 0.
  uint64_t host_memory_bytes = 0;
  // Eviction watermarks, fractions of a tier's capacity: past `high_watermark` the least
  // recently selected blocks move down a tier (after the reply is sent) until use is below
  // `low_watermark`. A full pool evicts synchronously. 0 < low < high <= 1.
  // Defaults: 0.90 / 0.75.
  double high_watermark = 0.90;
  double low_watermark = 0.75;
  // Restart: "eager" loads every durable session's K/V into the pool before ready; "lazy"
  // checks every stored block's CRC before ready but leaves the K/V in RocksDB, fetched when
  // first selected (ready sooner, first requests slower). Default: "eager".
  std::string restore = "eager";
  // Device-tier bytes one tenant's sessions may hold (K/V blocks and tails). A write that
  // would pass it first evicts that tenant's least recently selected blocks; if that cannot
  // make room it fails with RESOURCE_EXHAUSTED. 0: no quota. Reloaded on SIGHUP. Default: 0.
  uint64_t tenant_memory_quota_bytes = 0;
  // Per-tenant overrides of tenant_memory_quota_bytes (tenant name -> bytes; 0: no quota).
  std::map<std::string, uint64_t> tenant_memory_quotas;
  // Largest message (header + data) accepted; larger ones get INVALID_ARGUMENT unread.
  // Default: 1 GiB.
  uint64_t max_message_bytes = 1ull << 30;
  // Requests one endpoint may have in flight; more get RESOURCE_EXHAUSTED. Default: 256.
  uint32_t max_inflight_per_endpoint = 256;
  // Client connections (UCX endpoints) open at once; connection requests beyond it are
  // rejected before an endpoint is made, so the client's Connect fails with
  // RESOURCE_EXHAUSTED. Bounds what in-flight requests can hold together with
  // max_inflight_per_endpoint and max_message_bytes. Default: 1024.
  uint32_t max_connections = 1024;
  // A connection with no request in flight that sent nothing for this many seconds is closed
  // by kvmemd (its endpoint and everything it held are freed; the client's next call fails
  // with UNAVAILABLE). For clients that stay connected but silent (hung, or a host gone
  // without a disconnect reaching kvmemd); clients that close, exit or are killed are closed
  // when UCX reports the disconnect, whatever this is. 0 disables it. Default: 0.
  uint32_t client_idle_timeout_seconds = 0;
  // After this many seconds without a KV allocation or a store write, kvmemd gives memory
  // back: retained free KV slabs are released, RocksDB memtables are flushed (their data is
  // in the WAL already; a flush frees them and shortens the next restart's replay) and the
  // allocator returns free heap to the system. 0 disables it. Default: 10.
  uint32_t idle_trim_seconds = 10;
  // Stall watchdog: an executor thread running one task (a session operation) for longer than
  // this many seconds is stuck: a wedged GPU kernel, a store call that never returns. kvmemd
  // logs it once, counts it (kvmem_executor_stalls_total), and /readyz answers 503 until the
  // task ends; with on_executor_stall "exit" it exits with status 70 instead, so systemd or
  // Kubernetes restarts it (acknowledged writes are in the WAL; restart restores durable
  // sessions). Checked once a second. 0 disables it. Default: 60.
  uint32_t executor_stall_seconds = 60;
  std::string on_executor_stall = "report";  // report | exit
  // A CUDA error that leaves the GPU context unusable (kvmem_device_failures_total; every later
  // device operation fails the same way until the process restarts): "report" logs it and makes
  // /readyz answer 503 for good; "exit" also exits with status 70 for the service manager to
  // restart kvmemd. Default: "report".
  std::string on_device_failure = "report";  // report | exit
  // Liveness of the event loop (UCX progress, timers; it ticks once a second): /healthz answers
  // 503 once it has not ticked for this many seconds, so a Kubernetes liveness probe restarts a
  // kvmemd whose loop is wedged (systemd's watchdog, fed from the same loop, does so under
  // systemd). 0 disables it. Default: 30.
  uint32_t loop_stall_seconds = 30;
  // glibc malloc arenas (mallopt M_ARENA_MAX), set once at startup before any thread starts.
  // glibc's default is 8 per core, one per thread until then; each non-main arena keeps the
  // top of its heap resident after load (malloc_trim, which idle trim calls, does not shrink
  // the top of non-main arenas in glibc 2.36), so idle RSS grows with the arenas the threads
  // touched. 0 keeps glibc's default. Default: 2.
  uint32_t malloc_arena_max = 2;
  // RocksDB block cache (LRU, one cache shared by every column family). Bounded: it fills
  // under load up to this size and stays filled. Default: 8 MiB (RocksDB 7's implicit size).
  uint64_t store_block_cache_bytes = 8ull << 20;
  // Sessions one tenant may hold. Default: 4096.
  uint32_t max_sessions_per_tenant = 4096;
  // Tokens one session may hold. Default: 4194304 (4 Mi).
  uint64_t max_tokens_per_session = 4ull << 20;
  // UCX endpoint error handling for accepted connections: "none" lets same-host clients use
  // shared memory (Debian's UCX 1.13 limits "peer" to TCP); "peer" detects dead peers.
  // Default: "none".
  std::string ucx_error_mode = "none";
  // Rendezvous scheme for large messages: "put_zcopy" (each client writes its payload into
  // the daemon's receive buffer: over shared memory the copy runs in the client's process, not
  // on the daemon's one transport thread), "get_zcopy" (the daemon reads it) or "auto" (UCX's
  // choice, get). UCX_RNDV_SCHEME in the environment overrides it. put_zcopy is for daemons whose
  // clients all use shared memory (Debian's UCX 1.13 hangs TCP appends with it) and may ptrace
  // the daemon. Default: "auto".
  std::string ucx_rndv_scheme = "auto";
  // Authentication: token -> tenant name. Empty: one tenant "default" that needs no token,
  // and only loopback listen addresses are allowed.
  std::map<std::string, std::string> tenants;
  // Admin HTTP endpoint (/healthz /readyz /metrics /v1/sessions /v1/status), HOST:PORT, or
  // "off". Default: "127.0.0.1:7421".
  std::string admin = "127.0.0.1:7421";
  // Bearer token the admin endpoint requires for /metrics and /v1/* (health probes stay open).
  // Required when `admin` is not a loopback address: kvmemd refuses to start without it.
  // Not reloaded by SIGHUP (restart to change it). Default: "" (none).
  std::string admin_token;
  // Memory blocks (daemon/memory_store.h): most blocks one session may hold (a session's
  // memory.max_blocks may only lower it). Default: 4194304 (4 Mi).
  uint64_t memory_max_blocks_per_session = 4ull << 20;
  // Directory that sessions' memory.scorer_file names are resolved in (relative names without
  // ".." only). "" = sessions may not name scorer files. Default: "".
  std::string memory_scorer_dir;
  // Scorer weights (safetensors, daemon/memory_scorer.h) for sessions that name none; loaded
  // on the first SelectMemory with gate scorer for each gate_dim (its shape depends on it), and
  // a bad file fails that request with the reason. "" = none. Default: "".
  std::string memory_scorer_file;
  // Defaults for sessions that leave options at 0 (keys chunk_min_tokens, chunk_max_tokens,
  // sink_tokens, budget_tokens, retrieval_rule, retrieval_rule_value, retrieval_block_tokens,
  // retrieval_block_pooling).
  SessionOptions session_defaults;
  // Retrieval-head masks by profile name, read at startup from the files the config names
  // ({"retrieval_head_masks": {"llama-3-8b": "heads/llama-3-8b.json"}}, paths relative to the
  // config file; format in common/head_mask.h). A CreateSession whose profile has this name
  // and no mask of its own gets this one (and its dense layers when the profile lists none).
  // Not reloaded by SIGHUP. Default: none.
  std::map<std::string, HeadMaskFile> retrieval_head_masks;
  ProfileLimits profile_limits;

  // Lists the problems with this configuration (empty when OK).
  Status Validate() const;
};

// Merges a JSON config file into *config. Unknown keys are an error (typos fail loudly).
// "include": a path or list of paths (relative to this file) merged after it, e.g. tenant
// tokens kept in a separate, more restricted file or a Kubernetes Secret.
Status LoadConfigFile(const std::string& path, DaemonConfig* config);

bool IsLoopbackHost(const std::string& host);

}  // namespace kvmem
