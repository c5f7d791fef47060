// The request layer: tenants, the session registry and one handler per op. Transport-agnostic
// (it sees verified messages and fills replies), so tests and the fuzzer drive it without UCX.
#pragma once

#include <flatbuffers/flatbuffers.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "common/status.h"
#include "daemon/chunk_store.h"
#include "daemon/config.h"
#include "daemon/eviction.h"
#include "daemon/kv_pool.h"
#include "daemon/session.h"
#include "wire/framing.h"

namespace kvmem {

// A reply under construction: a FlatBuffer plus tensors whose bytes the reply owns.
struct Reply {
  flatbuffers::FlatBufferBuilder fbb{512};
  wire::TensorPacker packer;
  std::vector<std::unique_ptr<uint8_t[]>> buffers;

  uint8_t* NewBuffer(size_t bytes) {
    buffers.emplace_back(new uint8_t[bytes == 0 ? 1 : bytes]);
    return buffers.back().get();
  }
  // Replaces the contents with an error envelope.
  void SetError(uint64_t request_id, const Status& status);
};

struct RequestContext {
  uint64_t connection_id = 0;
  std::string tenant;   // empty until Hello succeeded
};

struct ServiceCounters {
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> errors{0};
};

// The wire profile as a ModelProfile (dtype checked; shape limits are ValidateProfile's job).
Result<ModelProfile> ProfileFromWire(const wire::ModelProfile* p);
// Profile and options as the wire (and the durable session header) carries them.
flatbuffers::Offset<wire::ModelProfile> ProfileToWire(flatbuffers::FlatBufferBuilder& fbb,
                                                      const ModelProfile& p);
flatbuffers::Offset<wire::SessionOptions> OptionsToWire(flatbuffers::FlatBufferBuilder& fbb,
                                                        const SessionOptions& o);
// The retrieval-head fields of wire options over *r (DEFAULT / 0 fields leave it as is).
Status RetrievalFromWire(const wire::SessionOptions* o, RetrievalOptions* r);
// Memory-block options from / to the wire (null = disabled). Dtype and gate checked;
// ValidateMemoryOptions does the rest.
Result<MemoryOptions> MemoryOptionsFromWire(const wire::MemoryOptions* m);
flatbuffers::Offset<wire::MemoryOptions> MemoryOptionsToWire(flatbuffers::FlatBufferBuilder& fbb,
                                                             const MemoryOptions& m);

class Service {
 public:
  Service(DaemonConfig config, KVPool* pool, std::string backend_name);
  ~Service();

  // Hello: checks protocol version and token; on success returns the tenant.
  Result<std::string> Authenticate(const wire::Hello* hello) const;

  // Sessions are sharded over executors by this key (0 for ops without a session).
  static uint64_t ShardKey(const wire::Envelope* env);

  // Handles one verified message for an authenticated tenant and fills *reply (an error
  // envelope on failure). Thread-safe across different sessions; operations on one session
  // must be serialised by the caller (the executor sharding does that).
  // `landing`: the payload of this AppendKV was received in place (PlanLanding).
  void Handle(const RequestContext& ctx, const wire::Parsed& msg, Reply* reply,
              AppendLanding* landing = nullptr);

  // Transport thread, in arrival order, for every request with data: for a packed AppendKV
  // (header not spilled, boundaries inline or absent) on a host-pool session of this tenant,
  // its landing (Session::PlanLanding): with `place` (a rendezvous payload is still to be
  // received into `data`, data_bytes long), the plan that receives the rows of the chunks it
  // will seal straight into their blocks; otherwise (an eager payload already in `data`) a
  // record of the append in flight. Null for anything else. Only the header is read.
  std::unique_ptr<AppendLanding> PlanLanding(const std::string& tenant, std::span<const uint8_t> header,
                                             uint8_t* data, size_t data_bytes, bool place);

  // Background upkeep after a request on `session_id` was answered: index maintenance (subtree
  // rebuilds) runs here, off the request path. Cheap when nothing is stale.
  void AfterReply(const RequestContext& ctx, uint64_t session_id);

  // Builds the Hello reply.
  void HelloReply(uint64_t request_id, const std::string& tenant, Reply* reply) const;

  size_t session_count() const;
  const DaemonConfig& config() const { return config_; }
  KVPool* pool() const { return pool_; }
  ServiceCounters& counters() { return counters_; }

  // Drops every session (shutdown).
  void DropAll();

  // --- Operations (daemon/admin.cc, daemon/metrics.cc, SIGHUP) ---
  // Copies the session pointers under a brief shared lock; read them with Session::Stats()
  // (atomics) after it is released.
  std::vector<std::shared_ptr<Session>> SnapshotSessions() const;
  // Tenant tokens in the current configuration (0: open mode, one "default" tenant).
  size_t configured_tenant_count() const;
  // Replaces the reloadable settings (tenant tokens, per-tenant and per-session quotas) with
  // fresh's. Sessions stay; connections keep the tenant they authenticated as; new Hellos use
  // the new tokens. INVALID_ARGUMENT (nothing changes) when fresh would turn an open daemon
  // into an authenticated one or back (that changes who owns the existing sessions).
  Status Reload(const DaemonConfig& fresh);
  // Durable sessions (daemon/tiers.h): the store they live in, and their restore at start,
  // before the transport accepts requests. Sessions that fail to restore stay on disk; their
  // ids answer CreateSession with the restore error until dropped.
  void AttachStore(ChunkStore* store) {
    store_ = store;
    tiers_->set_store(store);
  }
  const ChunkStore* store() const { return store_; }
  Status RestoreDurableSessions();

  // --- Tiers and lifetimes (daemon/eviction.h) ---
  // Drops every session whose TTL (SessionOptions.ttl_seconds > 0) has passed since its last
  // use at `now_unix_ms`, in every tier (durable ones lose their stored records too, as by
  // DropSession). Returns how many were dropped. kvmemd calls it once a second.
  size_t ExpireIdleSessions(uint64_t now_unix_ms);
  // Watermark upkeep: when the device (or host) tier is past its high watermark, evicts least
  // recently selected blocks until it is below the low one. Runs after replies.
  void EnforceWatermarks();
  TierContext& tiers() { return *tiers_; }
  uint64_t host_capacity_bytes() const { return tiers_->host_capacity(); }

 private:
  using Key = std::pair<std::string, uint64_t>;  // (tenant, session id)

  Status HandleBody(const RequestContext& ctx, const wire::Parsed& msg, Reply* reply,
                    AppendLanding* landing);
  Status CreateSession(const RequestContext& ctx, uint64_t rid, const wire::CreateSession* req,
                       Reply* reply);
  Status DropSession(const RequestContext& ctx, uint64_t rid, const wire::DropSession* req,
                     Reply* reply);
  Status ListSessions(const RequestContext& ctx, uint64_t rid, Reply* reply);
  Status SessionInfo(const RequestContext& ctx, uint64_t rid, const wire::SessionInfo* req,
                     Reply* reply);
  Status VerifySession(const RequestContext& ctx, uint64_t rid, const wire::VerifySession* req,
                       Reply* reply);
  Status EvictSession(const RequestContext& ctx, uint64_t rid, const wire::EvictSession* req,
                      Reply* reply);
  Status Snapshot(const RequestContext& ctx, uint64_t rid, const wire::Snapshot* req, Reply* reply);
  Status Restore(const RequestContext& ctx, uint64_t rid, const wire::Restore* req, Reply* reply);
  Status DropSnapshot(const RequestContext& ctx, uint64_t rid, const wire::DropSnapshot* req,
                      Reply* reply);
  // The checks CreateSession makes before a new id is taken: not in use (ALREADY_EXISTS), not
  // an unrestorable stored session, the tenant's session limit.
  Status CheckNewSession(const std::string& tenant, uint64_t id) const;
  // Quota check for a write that adds `need_bytes` to the device tier for `s` (its op_mu
  // held): over the tenant's quota, that tenant's least recently selected blocks are evicted
  // first; RESOURCE_EXHAUSTED naming tenant, quota and need when that cannot make room.
  Status AdmitWrite(Session* s, uint64_t need_bytes);
  // Device-tier room for `self`'s allocation of `bytes` (TierContext::make_room).
  Status MakeRoom(Session* self, uint64_t bytes);
  // Removes a session from memory and (durable) from the store.
  Status Remove(const std::string& tenant, uint64_t id, const char* why);
  Status AppendKV(const RequestContext& ctx, const wire::Parsed& msg, const wire::AppendKV* req,
                  Reply* reply, AppendLanding* landing = nullptr);
  Status Attend(const RequestContext& ctx, const wire::Parsed& msg, const wire::Attend* req,
                Reply* reply);
  Status Retrieve(const RequestContext& ctx, const wire::Parsed& msg, const wire::Retrieve* req,
                  Reply* reply);
  Status AttendBatch(const RequestContext& ctx, const wire::Parsed& msg,
                     const wire::AttendBatch* req, Reply* reply);
  // Memory blocks (daemon/memory_store.h).
  Status PutMemoryBlocks(const RequestContext& ctx, const wire::Parsed& msg,
                         const wire::PutMemoryBlocks* req, Reply* reply);
  Status SelectMemory(const RequestContext& ctx, const wire::Parsed& msg,
                      const wire::SelectMemory* req, Reply* reply);
  Status GetMemoryBlocks(const RequestContext& ctx, uint64_t rid, const wire::GetMemoryBlocks* req,
                         Reply* reply);
  Status DropMemoryBlocks(const RequestContext& ctx, uint64_t rid,
                          const wire::DropMemoryBlocks* req, Reply* reply);
  Status ListMemoryBlocks(const RequestContext& ctx, uint64_t rid,
                          const wire::ListMemoryBlocks* req, Reply* reply);
  // Loads the scorer a session's memory options name (scorer_file under memory_scorer_dir);
  // OK with nothing attached when they name none.
  Status AttachSessionScorer(Session* s) const;
  // The daemon's memory_scorer_file for gate_dim, loaded once per dimension.
  Result<std::shared_ptr<const MemoryScorer>> DaemonScorer(uint32_t gate_dim) const;
  // Runs one Attend and returns its reply body (used by Attend and AttendBatch).
  Result<flatbuffers::Offset<wire::AttendReply>> AttendOne(const RequestContext& ctx,
                                                           const wire::Parsed& msg,
                                                           const wire::Attend* req, Reply* reply);

  // OK when a create request for an existing durable session matches its stored profile.
  static Status CheckSameProfile(const Session& s, const ModelProfile& profile,
                                 const SessionOptions& options);
  Result<std::shared_ptr<Session>> Find(const std::string& tenant, uint64_t id) const;
  flatbuffers::Offset<wire::SessionSummary> Summarize(flatbuffers::FlatBufferBuilder& fbb,
                                                      const Session& s, bool detail) const;

  // What SIGHUP can change; swapped whole, read by a copy of the shared_ptr per request.
  struct Reloadable {
    std::map<std::string, std::string> tenants;  // token -> tenant
    uint32_t max_sessions_per_tenant = 0;
    uint64_t max_tokens_per_session = 0;
    uint64_t tenant_memory_quota_bytes = 0;
    std::map<std::string, uint64_t> tenant_memory_quotas;
    uint64_t QuotaFor(const std::string& tenant) const {
      auto it = tenant_memory_quotas.find(tenant);
      return it != tenant_memory_quotas.end() ? it->second : tenant_memory_quota_bytes;
    }
  };
  std::shared_ptr<const Reloadable> settings() const {
    return settings_.load(std::memory_order_acquire);
  }

  const DaemonConfig config_;  // startup values; tenants and quotas: see settings()
  std::atomic<std::shared_ptr<const Reloadable>> settings_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  KVPool* const pool_;
  const std::string backend_name_;
  mutable std::shared_mutex mu_;
  std::map<Key, std::shared_ptr<Session>> sessions_;  // guarded by mu_
  ChunkStore* store_ = nullptr;
  std::unique_ptr<TierContext> tiers_;
  std::map<Key, Status> unrestorable_;  // guarded by mu_
  mutable std::mutex scorer_mu_;
  mutable std::map<uint32_t, std::shared_ptr<const MemoryScorer>> daemon_scorers_;  // scorer_mu_
  ServiceCounters counters_;
};

}  // namespace kvmem
