#include "daemon/service.h"

#include <chrono>
#include <string>

#include "daemon/metrics.h"
#include "common/log.h"
#include "common/units.h"
#include "daemon/memory_scorer.h"
#include "daemon/tiers.h"

namespace kvmem {

namespace w = ::kvmem::wire;

void Reply::SetError(uint64_t request_id, const Status& status) {
  fbb.Clear();
  packer = wire::TensorPacker();
  buffers.clear();
  wire::BuildErrorEnvelope(fbb, request_id, status);
}

Service::Service(DaemonConfig config, KVPool* pool, std::string backend_name)
    : config_(std::move(config)), pool_(pool), backend_name_(std::move(backend_name)) {
  settings_.store(std::make_shared<const Reloadable>(
      Reloadable{config_.tenants, config_.max_sessions_per_tenant, config_.max_tokens_per_session,
                 config_.tenant_memory_quota_bytes, config_.tenant_memory_quotas}));
  TierOptions to;
  to.host_memory_bytes = config_.host_memory_bytes;
  to.high_watermark = config_.high_watermark;
  to.low_watermark = config_.low_watermark;
  to.restore_resident = config_.restore != "lazy";
  tiers_ = std::make_unique<TierContext>(pool_, to);
  tiers_->make_room = [this](Session* self, uint64_t bytes) { return MakeRoom(self, bytes); };
}

std::vector<std::shared_ptr<Session>> Service::SnapshotSessions() const {
  std::vector<std::shared_ptr<Session>> out;
  std::shared_lock lock(mu_);
  out.reserve(sessions_.size());
  for (const auto& [key, s] : sessions_) out.push_back(s);
  return out;
}

size_t Service::configured_tenant_count() const { return settings()->tenants.size(); }

Status Service::Reload(const DaemonConfig& fresh) {
  if (fresh.tenants.empty() != config_.tenants.empty()) {
    return InvalidArgument(
        "reload cannot switch between open mode (no tenants) and tenant tokens; restart kvmemd");
  }
  settings_.store(std::make_shared<const Reloadable>(
                      Reloadable{fresh.tenants, fresh.max_sessions_per_tenant,
                                 fresh.max_tokens_per_session, fresh.tenant_memory_quota_bytes,
                                 fresh.tenant_memory_quotas}),
                  std::memory_order_release);
  return Status::OK();
}

Service::~Service() { DropAll(); }

void Service::DropAll() {
  std::unique_lock lock(mu_);
  sessions_.clear();
}

size_t Service::session_count() const {
  std::shared_lock lock(mu_);
  return sessions_.size();
}

Result<std::string> Service::Authenticate(const w::Hello* hello) const {
  if (hello->protocol_version() != w::kProtocolVersion) {
    return FailedPrecondition("protocol version " + std::to_string(hello->protocol_version()) +
                              " not supported (daemon speaks " +
                              std::to_string(w::kProtocolVersion) + ")");
  }
  const auto settings = this->settings();
  if (settings->tenants.empty()) return std::string("default");
  const std::string token = hello->token() ? hello->token()->str() : "";
  auto it = settings->tenants.find(token);
  if (token.empty() || it == settings->tenants.end()) {
    return Unauthenticated(token.empty() ? "a token is required" : "unknown token");
  }
  return it->second;
}

void Service::HelloReply(uint64_t request_id, const std::string& tenant, Reply* r) const {
  auto& fbb = r->fbb;
  // Operations fields (kvmemctl status): session stats are atomics, read after the snapshot.
  uint64_t used = 0, chunks = 0, host = 0, disk = 0;
  const auto sessions = SnapshotSessions();
  for (const auto& s : sessions) {
    const SessionStats st = s->Stats();
    used += st.bytes;
    chunks += st.chunks;
    host += st.host_bytes;
    disk += st.disk_bytes;
  }
  // Chunk counts per tier are not tracked (a chunk's layers may sit in different tiers):
  // the device row counts sealed chunks, the others 0.
  std::vector<flatbuffers::Offset<w::TierUsage>> tiers = {
      w::CreateTierUsageDirect(fbb, "device", pool_ ? pool_->allocator().capacity_bytes() : 0, used, chunks),
      w::CreateTierUsageDirect(fbb, "host", tiers_->host_capacity(), host, 0),
      w::CreateTierUsageDirect(fbb, "disk", 0, disk, 0)};
  const auto uptime = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - started_);
  auto body = w::CreateHelloReplyDirect(fbb, w::kProtocolVersion, tenant.c_str(), "kvmem 0.1.0",
                                        backend_name_.c_str(), config_.max_message_bytes,
                                        static_cast<uint64_t>(uptime.count()),
                                        backend_name_ == "cpu" ? "none" : backend_name_.c_str(),
                                        &tiers, sessions.size());
  fbb.Finish(w::MakeEnvelope(fbb, request_id, body, 0));
}

uint64_t Service::ShardKey(const w::Envelope* env) {
  switch (env->body_type()) {
    case w::Body::CreateSession: return env->body_as_CreateSession()->session_id();
    case w::Body::DropSession: return env->body_as_DropSession()->session_id();
    case w::Body::SessionInfo: return env->body_as_SessionInfo()->session_id();
    case w::Body::AppendKV: return env->body_as_AppendKV()->session_id();
    case w::Body::Attend: return env->body_as_Attend()->session_id();
    case w::Body::Retrieve: return env->body_as_Retrieve()->session_id();
    case w::Body::VerifySession: return env->body_as_VerifySession()->session_id();
    case w::Body::EvictSession: return env->body_as_EvictSession()->session_id();
    case w::Body::Snapshot: return env->body_as_Snapshot()->session_id();
    case w::Body::Restore: return env->body_as_Restore()->session_id();
    case w::Body::PutMemoryBlocks: return env->body_as_PutMemoryBlocks()->session_id();
    case w::Body::SelectMemory: return env->body_as_SelectMemory()->session_id();
    case w::Body::GetMemoryBlocks: return env->body_as_GetMemoryBlocks()->session_id();
    case w::Body::DropMemoryBlocks: return env->body_as_DropMemoryBlocks()->session_id();
    case w::Body::ListMemoryBlocks: return env->body_as_ListMemoryBlocks()->session_id();
    case w::Body::AttendBatch: {
      auto items = env->body_as_AttendBatch()->items();
      return items && items->size() > 0 ? items->Get(0)->session_id() : 0;
    }
    default: return 0;
  }
}

void Service::Handle(const RequestContext& ctx, const w::Parsed& msg, Reply* reply, AppendLanding* landing) {
  counters_.requests.fetch_add(1, std::memory_order_relaxed);
  const uint64_t rid = msg.envelope->request_id();
  Status s;
  const auto body = msg.envelope->body_type();
  if (ctx.tenant.empty() && body != w::Body::Ping && body != w::Body::Hello) {
    s = Unauthenticated("send Hello with a valid token first");
  } else {
    s = HandleBody(ctx, msg, reply, landing);
  }
  if (!s.ok()) {
    counters_.errors.fetch_add(1, std::memory_order_relaxed);
    reply->SetError(rid, s);
  }
}

Status Service::HandleBody(const RequestContext& ctx, const w::Parsed& msg, Reply* r, AppendLanding* landing) {
  const w::Envelope* env = msg.envelope;
  switch (env->body_type()) {
    case w::Body::Ping: {
      auto body = w::CreatePingReply(r->fbb, env->body_as_Ping()->payload());
      r->fbb.Finish(w::MakeEnvelope(r->fbb, env->request_id(), body, 0));
      return Status::OK();
    }
    case w::Body::Hello: {
      KVMEM_ASSIGN_OR_RETURN(std::string tenant, Authenticate(env->body_as_Hello()));
      HelloReply(env->request_id(), tenant, r);
      return Status::OK();
    }
    case w::Body::CreateSession: return CreateSession(ctx, env->request_id(), env->body_as_CreateSession(), r);
    case w::Body::DropSession: return DropSession(ctx, env->request_id(), env->body_as_DropSession(), r);
    case w::Body::ListSessions: return ListSessions(ctx, env->request_id(), r);
    case w::Body::SessionInfo: return SessionInfo(ctx, env->request_id(), env->body_as_SessionInfo(), r);
    case w::Body::AppendKV: return AppendKV(ctx, msg, env->body_as_AppendKV(), r, landing);
    case w::Body::Attend: return Attend(ctx, msg, env->body_as_Attend(), r);
    case w::Body::AttendBatch: return AttendBatch(ctx, msg, env->body_as_AttendBatch(), r);
    case w::Body::Retrieve: return Retrieve(ctx, msg, env->body_as_Retrieve(), r);
    case w::Body::VerifySession: return VerifySession(ctx, env->request_id(), env->body_as_VerifySession(), r);
    case w::Body::EvictSession: return EvictSession(ctx, env->request_id(), env->body_as_EvictSession(), r);
    case w::Body::Snapshot: return Snapshot(ctx, env->request_id(), env->body_as_Snapshot(), r);
    case w::Body::Restore: return Restore(ctx, env->request_id(), env->body_as_Restore(), r);
    case w::Body::DropSnapshot: return DropSnapshot(ctx, env->request_id(), env->body_as_DropSnapshot(), r);
    case w::Body::PutMemoryBlocks: return PutMemoryBlocks(ctx, msg, env->body_as_PutMemoryBlocks(), r);
    case w::Body::SelectMemory: return SelectMemory(ctx, msg, env->body_as_SelectMemory(), r);
    case w::Body::GetMemoryBlocks: return GetMemoryBlocks(ctx, env->request_id(), env->body_as_GetMemoryBlocks(), r);
    case w::Body::DropMemoryBlocks: return DropMemoryBlocks(ctx, env->request_id(), env->body_as_DropMemoryBlocks(), r);
    case w::Body::ListMemoryBlocks: return ListMemoryBlocks(ctx, env->request_id(), env->body_as_ListMemoryBlocks(), r);
    case w::Body::NONE: return InvalidArgument("message has no body");
    default:
      return InvalidArgument(std::string("op ") + w::EnumNameBody(env->body_type()) +
                             " is a reply type or unknown");
  }
}

Result<ModelProfile> ProfileFromWire(const w::ModelProfile* p) {
  if (p == nullptr) return InvalidArgument("CreateSession: profile missing");
  ModelProfile m;
  m.layers = p->layers();
  m.q_heads = p->q_heads();
  m.kv_heads = p->kv_heads();
  m.head_dim = p->head_dim();
  KVMEM_ASSIGN_OR_RETURN(m.dtype, w::FloatDTypeFromWire(p->dtype()));
  if (p->dense_layers()) m.dense_layers.assign(p->dense_layers()->begin(), p->dense_layers()->end());
  if (p->retrieval_head_mask()) {
    m.retrieval_head_mask.assign(p->retrieval_head_mask()->begin(), p->retrieval_head_mask()->end());
  }
  if (p->name()) m.name = p->name()->str();
  return m;
}

namespace {

flatbuffers::Offset<w::HeadSelection> SelectionToWire(flatbuffers::FlatBufferBuilder& fbb,
                                                     const HeadSelection& h) {
  return w::CreateHeadSelectionDirect(fbb, h.kv_head, &h.chunks, &h.starts, &h.ends, &h.scores,
                                      static_cast<w::HeadRole>(h.role), h.source_layer);
}

// Wire SelectionRule / BlockPooling (0 = DEFAULT) to the session's types; INVALID_ARGUMENT for
// values this build does not know.
Status RuleFromWire(w::SelectionRule r, std::optional<index::BlockRule>* out) {
  if (r == w::SelectionRule::DEFAULT) return Status::OK();
  if (r > w::SelectionRule::TOP_P) {
    return InvalidArgument("retrieval_rule " + std::to_string(static_cast<int>(r)) + " unknown");
  }
  *out = static_cast<index::BlockRule>(static_cast<uint8_t>(r) - 1);
  return Status::OK();
}

Status PoolingFromWire(w::BlockPooling p, std::optional<kernels::BlockPool>* out) {
  if (p == w::BlockPooling::DEFAULT) return Status::OK();
  if (p > w::BlockPooling::POOL_MEAN) {
    return InvalidArgument("retrieval_block_pooling " + std::to_string(static_cast<int>(p)) +
                           " unknown");
  }
  *out = p == w::BlockPooling::POOL_MAX ? kernels::BlockPool::kMax : kernels::BlockPool::kMean;
  return Status::OK();
}

template <typename Req>
Result<RetrievalOverrides> OverridesFromWire(const Req* req) {
  RetrievalOverrides ov;
  KVMEM_RETURN_IF_ERROR(RuleFromWire(req->retrieval_rule(), &ov.rule));
  KVMEM_RETURN_IF_ERROR(PoolingFromWire(req->retrieval_block_pooling(), &ov.pooling));
  ov.rule_value = req->retrieval_rule_value();
  ov.block_tokens = req->retrieval_block_tokens();
  return ov;
}

}  // namespace

Status RetrievalFromWire(const w::SessionOptions* o, RetrievalOptions* r) {
  KVMEM_ASSIGN_OR_RETURN(RetrievalOverrides ov, OverridesFromWire(o));
  if (ov.rule) r->rule = *ov.rule;
  if (ov.rule_value != 0) r->rule_value = ov.rule_value;
  if (ov.block_tokens != 0) r->block_tokens = ov.block_tokens;
  if (ov.pooling) r->pooling = *ov.pooling;
  return Status::OK();
}

namespace {

Result<SessionOptions> OptionsFromWire(const w::SessionOptions* o, const SessionOptions& defaults) {
  SessionOptions s = defaults;
  if (o == nullptr) return s;
  KVMEM_RETURN_IF_ERROR(RetrievalFromWire(o, &s.retrieval));
  if (o->chunk_min_tokens()) s.chunker.min_tokens = o->chunk_min_tokens();
  if (o->chunk_max_tokens()) s.chunker.max_tokens = o->chunk_max_tokens();
  s.sink_tokens = o->sink_tokens();
  s.recent_window = o->recent_window();
  if (o->default_budget_tokens()) s.default_budget_tokens = o->default_budget_tokens();
  if (o->mode() != w::SelectionMode::DEFAULT) s.mode = static_cast<SelectionMode>(o->mode());
  s.durability = static_cast<Durability>(o->durability());
  s.ttl_seconds = o->ttl_seconds();
  if (o->label()) s.label = o->label()->str();
  s.values_optional = o->values_optional();
  return s;
}

}  // namespace

flatbuffers::Offset<w::ModelProfile> ProfileToWire(flatbuffers::FlatBufferBuilder& fbb,
                                                   const ModelProfile& p) {
  return w::CreateModelProfileDirect(fbb, p.layers, p.q_heads, p.kv_heads, p.head_dim,
                                     w::ToWire(p.dtype), &p.dense_layers,
                                     p.retrieval_head_mask.empty() ? nullptr : &p.retrieval_head_mask,
                                     p.name.c_str());
}

flatbuffers::Offset<w::SessionOptions> OptionsToWire(flatbuffers::FlatBufferBuilder& fbb,
                                                     const SessionOptions& o) {
  return w::CreateSessionOptionsDirect(
      fbb, o.chunker.min_tokens, o.chunker.max_tokens, o.sink_tokens, o.recent_window,
      o.default_budget_tokens, static_cast<w::SelectionMode>(o.mode),
      static_cast<w::Durability>(o.durability), o.ttl_seconds, o.label.c_str(),
      o.values_optional, static_cast<w::SelectionRule>(static_cast<uint8_t>(o.retrieval.rule) + 1),
      o.retrieval.rule_value, o.retrieval.block_tokens,
      o.retrieval.pooling == kernels::BlockPool::kMax ? w::BlockPooling::POOL_MAX
                                                      : w::BlockPooling::POOL_MEAN,
      o.memory.enabled() ? MemoryOptionsToWire(fbb, o.memory) : 0);
}

Result<MemoryOptions> MemoryOptionsFromWire(const w::MemoryOptions* m) {
  MemoryOptions o;
  if (m == nullptr) return o;
  o.gate_dim = m->gate_dim();
  o.payload_rows = m->payload_rows();
  o.payload_dim = m->payload_dim();
  KVMEM_ASSIGN_OR_RETURN(o.payload_dtype, w::FloatDTypeFromWire(m->payload_dtype()));
  if (m->default_gate() > w::MemoryGate::MAX) {
    return InvalidArgument("memory options: unknown default_gate " +
                           std::to_string(static_cast<int>(m->default_gate())));
  }
  o.default_gate = static_cast<MemoryGate>(m->default_gate());
  o.budget_leaves = m->budget_leaves();
  if (m->scorer_file()) o.scorer_file = m->scorer_file()->str();
  o.max_blocks = m->max_blocks();
  return o;
}

flatbuffers::Offset<w::MemoryOptions> MemoryOptionsToWire(flatbuffers::FlatBufferBuilder& fbb,
                                                          const MemoryOptions& m) {
  return w::CreateMemoryOptionsDirect(
      fbb, m.gate_dim, m.payload_rows, m.payload_dim, w::ToWire(m.payload_dtype),
      static_cast<w::MemoryGate>(m.default_gate), m.budget_leaves,
      m.scorer_file.empty() ? nullptr : m.scorer_file.c_str(), m.max_blocks);
}

Result<std::shared_ptr<Session>> Service::Find(const std::string& tenant, uint64_t id) const {
  std::shared_lock lock(mu_);
  auto it = sessions_.find({tenant, id});
  // Another tenant's session is indistinguishable from a missing one.
  if (it == sessions_.end()) return NotFound("session " + std::to_string(id) + " not found");
  return it->second;
}

Status Service::CreateSession(const RequestContext& ctx, uint64_t rid, const w::CreateSession* req, Reply* r) {
  if (req->session_id() == 0) return InvalidArgument("CreateSession: session_id must be nonzero");
  KVMEM_ASSIGN_OR_RETURN(ModelProfile profile, ProfileFromWire(req->profile()));
  if (auto m = config_.retrieval_head_masks.find(profile.name);
      profile.retrieval_head_mask.empty() && m != config_.retrieval_head_masks.end()) {
    // The daemon's mask for this model (config retrieval_head_masks).
    KVMEM_RETURN_IF_ERROR(CheckHeadMaskShape(m->second, profile.layers, profile.kv_heads,
                                             "retrieval_head_masks." + profile.name));
    profile.retrieval_head_mask = m->second.mask;
    if (profile.dense_layers.empty() && m->second.dense_layers) profile.dense_layers = *m->second.dense_layers;
  }
  KVMEM_RETURN_IF_ERROR(ValidateProfile(profile, config_.profile_limits));
  KVMEM_ASSIGN_OR_RETURN(SessionOptions options, OptionsFromWire(req->options(), config_.session_defaults));
  KVMEM_ASSIGN_OR_RETURN(options.memory,
                         MemoryOptionsFromWire(req->options() ? req->options()->memory() : nullptr));
  KVMEM_RETURN_IF_ERROR(ValidateOptions(options));
  if (options.durability == Durability::kDurable && store_ == nullptr) {
    return FailedPrecondition("CreateSession: durable sessions need the store (data_dir)");
  }
  {
    std::shared_lock lock(mu_);
    if (auto it = sessions_.find({ctx.tenant, req->session_id()}); it != sessions_.end()) {
      KVMEM_RETURN_IF_ERROR(CheckSameProfile(*it->second, profile, options));
      return AlreadyExists("session " + std::to_string(req->session_id()) + " already exists");
    }
    if (auto it = unrestorable_.find({ctx.tenant, req->session_id()}); it != unrestorable_.end()) {
      return FailedPrecondition("session " + std::to_string(req->session_id()) +
                                " is stored but could not be restored (" + it->second.ToString() +
                                "); drop it to reuse the id");
    }
    size_t mine = 0;
    for (auto it = sessions_.lower_bound({ctx.tenant, 0});
         it != sessions_.end() && it->first.first == ctx.tenant; ++it) {
      ++mine;
    }
    if (mine >= settings()->max_sessions_per_tenant) {
      return ResourceExhausted("tenant " + ctx.tenant + " already holds " + std::to_string(mine) +
                               " sessions (max_sessions_per_tenant)");
    }
  }
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Session> s,
                         Session::Create(req->session_id(), ctx.tenant, std::move(profile),
                                         std::move(options), pool_, tiers_.get()));
  KVMEM_RETURN_IF_ERROR(AttachSessionScorer(s.get()).WithContext("CreateSession"));
  {
    std::unique_lock lock(mu_);
    auto [it, inserted] = sessions_.emplace(Key{ctx.tenant, req->session_id()}, std::move(s));
    if (!inserted) return AlreadyExists("session " + std::to_string(req->session_id()) + " already exists");
    if (it->second->options().durability == Durability::kDurable) {
      // Header written under the registry lock so a concurrent create cannot overwrite it.
      if (Status st = MakeDurable(store_, it->second.get()); !st.ok()) {
        sessions_.erase(it);
        store_->DeleteSession(ctx.tenant, req->session_id()).IgnoreError();
        return st;
      }
    }
  }
  auto body = w::CreateCreateSessionReply(r->fbb, req->session_id());
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

Status Service::Remove(const std::string& tenant, uint64_t id, const char* why) {
  std::shared_ptr<Session> victim;
  bool stored = false;
  {
    std::unique_lock lock(mu_);
    auto it = sessions_.find({tenant, id});
    if (it == sessions_.end()) {
      auto bad = unrestorable_.find({tenant, id});
      if (bad == unrestorable_.end()) return NotFound("session " + std::to_string(id) + " not found");
      unrestorable_.erase(bad);
      stored = true;
    } else {
      victim = std::move(it->second);
      sessions_.erase(it);
      stored = victim->options().durability == Durability::kDurable;
    }
  }
  // Frees its blocks in every tier (pool, host buffers, spilled records) outside the registry
  // lock; an op still running on it finishes first (it holds a reference).
  victim.reset();
  if (stored && store_ != nullptr) {
    KVMEM_RETURN_IF_ERROR(store_->DeleteSession(tenant, id).WithContext(
        std::string(why) + ": dropped from memory, but its stored records remain (it returns "
        "after a restart)"));
  }
  return Status::OK();
}

size_t Service::ExpireIdleSessions(uint64_t now_unix_ms) {
  std::vector<Key> expired;
  {
    std::shared_lock lock(mu_);
    for (const auto& [key, s] : sessions_) {
      const uint64_t ttl = s->options().ttl_seconds;
      if (ttl > 0 && s->Stats().last_used_unix_ms + ttl * 1000 <= now_unix_ms) expired.push_back(key);
    }
  }
  size_t n = 0;
  for (const Key& k : expired) {
    Status st = Remove(k.first, k.second, "TTL expiry");
    if (st.ok()) {
      ++n;
      KVMEM_LOG_INFO("tenant {} session {}: TTL expired, dropped", k.first, k.second);
    } else if (st.code() != StatusCode::kNotFound) {
      KVMEM_LOG_WARN("tenant {} session {}: {}", k.first, k.second, st.ToString());
    }
  }
  return n;
}

Status Service::MakeRoom(Session* self, uint64_t bytes) {
  return MakeDeviceRoom(SnapshotSessions(), *tiers_, self, bytes);
}

Status Service::AdmitWrite(Session* s, uint64_t raw_bytes) {
  const uint64_t quota = settings()->QuotaFor(s->tenant());
  if (quota == 0) return Status::OK();
  // Blocks are reserved in size classes up to 12.5% larger than asked: count that in.
  const uint64_t need = raw_bytes + raw_bytes / 8;
  const auto sessions = SnapshotSessions();
  auto held = [&] {
    uint64_t h = 0;
    for (const auto& x : sessions)
      if (x->tenant() == s->tenant()) h += x->Stats().bytes;
    return h;
  };
  uint64_t h = held();
  if (h + need <= quota) return Status::OK();
  EvictResult r = EvictLeastRecentlySelected(sessions, Tier::kDevice, h + need - quota, s,
                                             s->tenant(), /*self_in_op=*/false);
  h = held();
  if (h + need <= quota) return Status::OK();
  return ResourceExhausted("tenant " + s->tenant() + " is over its memory quota: quota " +
                           FormatBytes(quota) + ", holds " + FormatBytes(h) +
                           " in the device tier, this write needs " + FormatBytes(need) +
                           "; eviction freed " + FormatBytes(r.bytes) +
                           " (the rest is sinks, recent windows, tails or in use)" +
                           (r.last_error.ok() ? std::string() : "; last error: " + r.last_error.ToString()));
}

void Service::EnforceWatermarks() {
  const SlabAllocator& a = pool_->allocator();
  const double cap = static_cast<double>(a.capacity_bytes());
  const double host_cap = static_cast<double>(tiers_->host_capacity());
  const bool device_over = static_cast<double>(a.allocated_bytes()) > config_.high_watermark * cap;
  const bool host_over = host_cap > 0 && static_cast<double>(tiers_->host_used()) > config_.high_watermark * host_cap;
  if (!device_over && !host_over) return;
  const auto sessions = SnapshotSessions();
  if (device_over) {
    const double excess = static_cast<double>(a.allocated_bytes()) - config_.low_watermark * cap;
    EvictLeastRecentlySelected(sessions, Tier::kDevice, static_cast<uint64_t>(std::max(0.0, excess)), nullptr, "");
  }
  if (host_cap > 0 && static_cast<double>(tiers_->host_used()) > config_.high_watermark * host_cap) {
    const double excess = static_cast<double>(tiers_->host_used()) - config_.low_watermark * host_cap;
    EvictLeastRecentlySelected(sessions, Tier::kHost, static_cast<uint64_t>(std::max(0.0, excess)), nullptr, "");
  }
}

Status Service::EvictSession(const RequestContext& ctx, uint64_t rid, const w::EvictSession* req,
                             Reply* r) {
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  const Tier to = req->target() == w::EvictTarget::HOST ? Tier::kHost : Tier::kDisk;
  if (to == Tier::kDisk && store_ == nullptr) {
    return FailedPrecondition("EvictSession: no store to evict to (data_dir)");
  }
  EvictResult res = s->EvictAll(to);
  if (res.blocks == 0 && !res.last_error.ok()) return res.last_error.WithContext("EvictSession");
  const SessionStats st = s->Stats();
  auto body = w::CreateEvictSessionReply(r->fbb, res.blocks, res.bytes, st.bytes, st.host_bytes,
                                         st.disk_bytes);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

Status Service::CheckNewSession(const std::string& tenant, uint64_t id) const {
  std::shared_lock lock(mu_);
  if (sessions_.count({tenant, id})) return AlreadyExists("session " + std::to_string(id) + " already exists");
  if (auto it = unrestorable_.find({tenant, id}); it != unrestorable_.end()) {
    return FailedPrecondition("session " + std::to_string(id) + " is stored but could not be restored (" +
                              it->second.ToString() + "); drop it to reuse the id");
  }
  size_t mine = 0;
  for (auto it = sessions_.lower_bound({tenant, 0}); it != sessions_.end() && it->first.first == tenant; ++it) ++mine;
  if (mine >= settings()->max_sessions_per_tenant) {
    return ResourceExhausted("tenant " + tenant + " already holds " + std::to_string(mine) +
                             " sessions (max_sessions_per_tenant)");
  }
  return Status::OK();
}

Status Service::Snapshot(const RequestContext& ctx, uint64_t rid, const w::Snapshot* req, Reply* r) {
  if (store_ == nullptr) return FailedPrecondition("Snapshot: no store (data_dir)");
  if (req->name() == nullptr) return InvalidArgument("Snapshot: name missing");
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  KVMEM_ASSIGN_OR_RETURN(SnapshotInfo info, WriteSnapshot(store_, *s, req->name()->str()));
  auto body = w::CreateSnapshotReply(r->fbb, info.tokens, info.chunks, info.bytes);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

Status Service::Restore(const RequestContext& ctx, uint64_t rid, const w::Restore* req, Reply* r) {
  if (store_ == nullptr) return FailedPrecondition("Restore: no store (data_dir)");
  if (req->name() == nullptr) return InvalidArgument("Restore: name missing");
  if (req->session_id() == 0) return InvalidArgument("Restore: session_id must be nonzero");
  KVMEM_RETURN_IF_ERROR(CheckNewSession(ctx.tenant, req->session_id()));
  const Durability d = static_cast<Durability>(req->durability());
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Session> s,
                         RestoreSnapshot(store_, pool_, tiers_.get(), ctx.tenant, req->name()->str(),
                                         req->session_id(), d, config_.session_defaults));
  const uint64_t tokens = s->tokens(), chunks = s->chunk_count();
  {
    std::unique_lock lock(mu_);
    auto [it, inserted] = sessions_.emplace(Key{ctx.tenant, req->session_id()}, std::move(s));
    // Restore and CreateSession of one id run on the same executor (ShardKey), so the id
    // checked free above is still free.
    if (!inserted) return Internal("Restore: session " + std::to_string(req->session_id()) + " appeared meanwhile");
  }
  auto body = w::CreateRestoreReply(r->fbb, req->session_id(), tokens, chunks);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

Status Service::DropSnapshot(const RequestContext& ctx, uint64_t rid, const w::DropSnapshot* req,
                             Reply* r) {
  if (store_ == nullptr) return FailedPrecondition("DropSnapshot: no store (data_dir)");
  if (req->name() == nullptr) return InvalidArgument("DropSnapshot: name missing");
  KVMEM_RETURN_IF_ERROR(DeleteSnapshot(store_, ctx.tenant, req->name()->str()));
  auto body = w::CreateDropSnapshotReply(r->fbb);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

Status Service::DropSession(const RequestContext& ctx, uint64_t rid, const w::DropSession* req, Reply* r) {
  KVMEM_RETURN_IF_ERROR(Remove(ctx.tenant, req->session_id(), "DropSession"));
  auto body = w::CreateDropSessionReply(r->fbb);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

flatbuffers::Offset<w::SessionSummary> Service::Summarize(flatbuffers::FlatBufferBuilder& fbb,
                                                          const Session& s, bool detail) const {
  const SessionStats st = s.Stats();
  auto tenant = fbb.CreateString(s.tenant());
  auto profile = ProfileToWire(fbb, s.profile());
  auto options = OptionsToWire(fbb, s.options());
  flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<w::LayerInfo>>> layers;
  if (detail) {
    std::vector<flatbuffers::Offset<w::LayerInfo>> infos;
    for (uint32_t l = 0; l < s.profile().layers; ++l) {
      const LayerIndexInfo li = s.IndexInfo(l);
      infos.push_back(w::CreateLayerInfoDirect(fbb, l, s.layer_tokens(l), li.depth, &li.nodes_per_level));
    }
    layers = fbb.CreateVector(infos);
  }
  w::SessionSummaryBuilder b(fbb);
  b.add_session_id(s.id());
  b.add_tenant(tenant);
  b.add_profile(profile);
  b.add_options(options);
  b.add_tokens(st.tokens);
  b.add_chunks(st.chunks);
  b.add_tail_tokens(st.tail_tokens);
  b.add_bytes(st.bytes);
  b.add_created_unix_ms(st.created_unix_ms);
  b.add_last_used_unix_ms(st.last_used_unix_ms);
  b.add_mean_chunk_tokens(static_cast<float>(s.mean_chunk_tokens()));
  b.add_host_bytes(st.host_bytes);
  b.add_disk_bytes(st.disk_bytes);
  b.add_fetched_blocks(st.fetched_blocks);
  b.add_prefetched_blocks(st.prefetched_blocks);
  b.add_evicted_blocks(st.evicted_blocks);
  b.add_memory_blocks(st.memory_blocks);
  b.add_memory_bytes(st.memory_bytes);
  if (detail) b.add_layers(layers);
  return b.Finish();
}

Status Service::ListSessions(const RequestContext& ctx, uint64_t rid, Reply* r) {
  std::vector<std::shared_ptr<Session>> mine;
  {
    std::shared_lock lock(mu_);
    for (auto it = sessions_.lower_bound({ctx.tenant, 0});
         it != sessions_.end() && it->first.first == ctx.tenant; ++it) {
      mine.push_back(it->second);
    }
  }
  std::vector<flatbuffers::Offset<w::SessionSummary>> items;
  for (const auto& s : mine) items.push_back(Summarize(r->fbb, *s, /*detail=*/false));
  auto body = w::CreateListSessionsReplyDirect(r->fbb, &items);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

Status Service::SessionInfo(const RequestContext& ctx, uint64_t rid, const w::SessionInfo* req, Reply* r) {
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  auto summary = Summarize(r->fbb, *s, /*detail=*/true);
  auto body = w::CreateSessionInfoReply(r->fbb, summary);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

std::unique_ptr<AppendLanding> Service::PlanLanding(const std::string& tenant, std::span<const uint8_t> header,
                                                    uint8_t* data, size_t data_bytes, bool place) {
  if (tenant.empty() || header.size() < 8 || data == nullptr) return nullptr;
  flatbuffers::Verifier v(header.data(), header.size(), w::kMaxVerifierDepth, w::kMaxVerifierTables);
  if (!w::VerifyEnvelopeBuffer(v)) return nullptr;
  const w::Envelope* env = w::GetEnvelope(header.data());
  if (env->spilled_bytes() != 0 || env->body_type() != w::Body::AppendKV || env->data_bytes() != data_bytes) {
    return nullptr;
  }
  const w::AppendKV* req = env->body_as_AppendKV();
  if (req == nullptr || req->kv() == nullptr || req->keys() != nullptr || req->values() != nullptr ||
      req->boundaries() != nullptr || req->tokens() == 0) {
    return nullptr;
  }
  const uint32_t n = req->tokens();
  const uint8_t* bounds = nullptr;
  if (const auto* bc = req->boundary_classes()) {
    if (bc->size() != n) return nullptr;
    bounds = bc->data();
  }
  auto s = Find(tenant, req->session_id());
  if (!s.ok()) return nullptr;
  const ModelProfile& p = (*s)->profile();
  // The handler's own tensor checks (dtype, shape, size, bounds, alignment), so the plan covers
  // exactly the bytes the handler will read as kv; the handler repeats them.
  w::Parsed msg;
  msg.envelope = env;
  msg.tensors = data;
  msg.tensor_bytes = data_bytes;
  const uint64_t shape5[5] = {2, p.layers, p.kv_heads, n, p.head_dim};
  const w::DType dt[1] = {w::ToWire(p.dtype)};
  auto k = w::ResolveTensor(msg, req->kv(), "kv", shape5, dt);
  if (!k.ok() || *k == nullptr) return nullptr;
  return Session::PlanLanding(*s, n, bounds, static_cast<uint64_t>(*k - data), place);
}

Status Service::AppendKV(const RequestContext& ctx, const w::Parsed& msg, const w::AppendKV* req,
                         Reply* r, AppendLanding* landing) {
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  const ModelProfile& p = s->profile();
  const uint64_t n = req->tokens();
  if (n == 0) return InvalidArgument("AppendKV: tokens must be > 0");
  const uint64_t max_tokens = settings()->max_tokens_per_session;
  if (s->Stats().tokens + n > max_tokens) {
    return ResourceExhausted("AppendKV: session would exceed max_tokens_per_session (" +
                             std::to_string(max_tokens) + ")");
  }
  const w::DType dt[1] = {w::ToWire(p.dtype)};
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  if (req->kv() != nullptr) {
    if (req->keys() != nullptr || req->values() != nullptr) {
      return InvalidArgument("AppendKV: give either kv or keys + values, not both");
    }
    const uint64_t shape5[5] = {2, p.layers, p.kv_heads, n, p.head_dim};
    KVMEM_ASSIGN_OR_RETURN(k, w::ResolveTensor(msg, req->kv(), "kv", shape5, dt));
    v = k + static_cast<size_t>(p.layers) * p.kv_heads * n * p.head_dim * DTypeSize(p.dtype);
  } else {
    const uint64_t shape[4] = {p.layers, p.kv_heads, n, p.head_dim};
    KVMEM_ASSIGN_OR_RETURN(k, w::ResolveTensor(msg, req->keys(), "keys", shape, dt));
    KVMEM_ASSIGN_OR_RETURN(v, w::ResolveTensor(msg, req->values(), "values", shape, dt));
  }
  const uint8_t* bounds = nullptr;
  if (req->boundaries() != nullptr && req->boundary_classes() != nullptr) {
    return InvalidArgument("AppendKV: give either boundaries or boundary_classes, not both");
  }
  if (req->boundary_classes() != nullptr) {
    if (req->boundary_classes()->size() != n) {
      return InvalidArgument("AppendKV: boundary_classes has " +
                             std::to_string(req->boundary_classes()->size()) + " entries for " +
                             std::to_string(n) + " tokens");
    }
    bounds = req->boundary_classes()->data();
  }
  if (req->boundaries() != nullptr) {
    const uint64_t bshape[1] = {n};
    const w::DType u8[1] = {w::DType::U8};
    KVMEM_ASSIGN_OR_RETURN(bounds, w::ResolveTensor(msg, req->boundaries(), "boundaries", bshape, u8));
  }
  if (bounds != nullptr) {
    for (uint64_t i = 0; i < n; ++i) {
      if (bounds[i] > index::kMaxBoundaryClass) {
        return InvalidArgument("AppendKV: boundary class " + std::to_string(bounds[i]) +
                               " at token " + std::to_string(i) + " (valid: 0..5)");
      }
    }
  }
  // NaN / Inf are refused by the session, during the copy into its blocks.
  const size_t elems = static_cast<size_t>(p.layers) * p.kv_heads * n * p.head_dim;
  KVMEM_RETURN_IF_ERROR(AdmitWrite(s.get(), 2 * elems * DTypeSize(p.dtype)).WithContext("AppendKV"));
  if (landing != nullptr &&
      (landing->session != s || landing->n != n || req->kv() == nullptr || k != msg.tensors + landing->kv_offset)) {
    landing->Gather();  // not this request's plan (cannot happen: the plan was made from this header)
    landing = nullptr;
  }
  KVMEM_ASSIGN_OR_RETURN(AppendResult res, s->AppendKV(static_cast<uint32_t>(n), k, v, bounds, landing));
  auto body = w::CreateAppendKVReply(r->fbb, res.tokens, res.chunks, res.sealed);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, msg.envelope->request_id(), body, 0));
  return Status::OK();
}

Result<flatbuffers::Offset<w::AttendReply>> Service::AttendOne(const RequestContext& ctx,
                                                               const w::Parsed& msg,
                                                               const w::Attend* req, Reply* r) {
  AttendPhaseClock phases;
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  const ModelProfile& p = s->profile();
  if (req->layer() >= p.layers) {
    return InvalidArgument("Attend: layer " + std::to_string(req->layer()) +
                           " out of range (session has " + std::to_string(p.layers) + ")");
  }
  const uint64_t qshape[2] = {p.q_heads, p.head_dim};
  const w::DType floats[3] = {w::DType::BF16, w::DType::F16, w::DType::F32};
  KVMEM_ASSIGN_OR_RETURN(const uint8_t* q, w::ResolveTensor(msg, req->q(), "q", qshape, floats));
  AttendArgs a;
  a.layer = req->layer();
  a.q = q;
  KVMEM_ASSIGN_OR_RETURN(a.q_dtype, w::FloatDTypeFromWire(req->q()->dtype()));
  if (HasNonFinite(q, a.q_dtype, static_cast<size_t>(p.q_heads) * p.head_dim)) {
    return InvalidArgument("Attend: q contains NaN or Inf");
  }
  if ((req->new_k() == nullptr) != (req->new_v() == nullptr)) {
    return InvalidArgument("Attend: new_k and new_v must be given together");
  }
  if (req->new_k() != nullptr) {
    const uint64_t kshape[2] = {p.kv_heads, p.head_dim};
    const w::DType dt[1] = {w::ToWire(p.dtype)};
    KVMEM_ASSIGN_OR_RETURN(a.new_k, w::ResolveTensor(msg, req->new_k(), "new_k", kshape, dt));
    KVMEM_ASSIGN_OR_RETURN(a.new_v, w::ResolveTensor(msg, req->new_v(), "new_v", kshape, dt));
    const size_t elems = static_cast<size_t>(p.kv_heads) * p.head_dim;
    if (HasNonFinite(a.new_k, p.dtype, elems) || HasNonFinite(a.new_v, p.dtype, elems)) {
      return InvalidArgument("Attend: new_k or new_v contains NaN or Inf");
    }
    if (s->Stats().tokens + 1 > settings()->max_tokens_per_session) {
      return ResourceExhausted("Attend: session is at max_tokens_per_session");
    }
    KVMEM_RETURN_IF_ERROR(AdmitWrite(s.get(), 2 * elems * DTypeSize(p.dtype)).WithContext("Attend"));
  }
  if (req->boundary() > index::kMaxBoundaryClass) {
    return InvalidArgument("Attend: boundary class " + std::to_string(req->boundary()) + " (valid: 0..5)");
  }
  a.boundary = req->boundary();
  a.budget_tokens = req->budget_tokens();
  if (req->mode() > w::SelectionMode::HYBRID) return InvalidArgument("Attend: unknown mode");
  a.want_selection = req->return_selection();
  a.mode = static_cast<SelectionMode>(req->mode());
  KVMEM_ASSIGN_OR_RETURN(a.retrieval, OverridesFromWire(req));
  KVMEM_ASSIGN_OR_RETURN(a.out_dtype, w::FloatDTypeFromWire(req->out_dtype()));
  const size_t out_elems = static_cast<size_t>(p.q_heads) * p.head_dim;
  a.out = r->NewBuffer(out_elems * DTypeSize(a.out_dtype));
  if (req->return_lse()) a.lse = reinterpret_cast<float*>(r->NewBuffer(p.q_heads * sizeof(float)));
  AttendInfo info;
  phases.Mark(AttendPhase::kRequestChecks);
  KVMEM_RETURN_IF_ERROR(s->Attend(a, &info));
  phases.Mark(AttendPhase::kSessionAttend);
  GlobalMetrics().search_nodes_visited.fetch_add(info.nodes_visited, std::memory_order_relaxed);

  const uint64_t oshape[2] = {p.q_heads, p.head_dim};
  auto out = r->packer.Add(r->fbb, w::ToWire(a.out_dtype), oshape, a.out);
  flatbuffers::Offset<w::Tensor> lse;
  if (a.lse) {
    const uint64_t lshape[1] = {p.q_heads};
    lse = r->packer.Add(r->fbb, w::DType::F32, lshape, a.lse);
  }
  auto attended = r->fbb.CreateVector(info.tokens_attended);
  flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<w::HeadSelection>>> sel;
  if (req->return_selection() && !info.selection.empty()) {
    std::vector<flatbuffers::Offset<w::HeadSelection>> heads;
    for (const HeadSelection& h : info.selection) heads.push_back(SelectionToWire(r->fbb, h));
    sel = r->fbb.CreateVector(heads);
  }
  w::AttendReplyBuilder b(r->fbb);
  b.add_out(out);
  if (a.lse) b.add_lse(lse);
  b.add_tokens_attended(attended);
  if (!sel.IsNull()) b.add_selection(sel);
  const auto body = b.Finish();
  phases.Mark(AttendPhase::kRequestPack);
  return body;
}

Status Service::Attend(const RequestContext& ctx, const w::Parsed& msg, const w::Attend* req,
                       Reply* r) {
  KVMEM_ASSIGN_OR_RETURN(auto body, AttendOne(ctx, msg, req, r));
  r->fbb.Finish(w::MakeEnvelope(r->fbb, msg.envelope->request_id(), body, r->packer.bytes()));
  return Status::OK();
}

Status Service::Retrieve(const RequestContext& ctx, const w::Parsed& msg, const w::Retrieve* req,
                         Reply* r) {
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  const ModelProfile& p = s->profile();
  if (req->layer() >= p.layers) {
    return InvalidArgument("Retrieve: layer " + std::to_string(req->layer()) +
                           " out of range (session has " + std::to_string(p.layers) + ")");
  }
  const uint64_t qshape[2] = {p.q_heads, p.head_dim};
  const w::DType floats[3] = {w::DType::BF16, w::DType::F16, w::DType::F32};
  KVMEM_ASSIGN_OR_RETURN(const uint8_t* q, w::ResolveTensor(msg, req->q(), "q", qshape, floats));
  KVMEM_ASSIGN_OR_RETURN(DType qdt, w::FloatDTypeFromWire(req->q()->dtype()));
  if (HasNonFinite(q, qdt, static_cast<size_t>(p.q_heads) * p.head_dim)) {
    return InvalidArgument("Retrieve: q contains NaN or Inf");
  }
  if (req->top_chunks() > 1u << 20) return InvalidArgument("Retrieve: top_chunks too large");
  RetrieveArgs ra;
  ra.layer = req->layer();
  ra.q = q;
  ra.q_dtype = qdt;
  ra.budget_tokens = req->budget_tokens();
  ra.top_chunks = req->top_chunks();
  if (req->mode() > w::SelectionMode::HYBRID) return InvalidArgument("Retrieve: unknown mode");
  ra.mode = static_cast<SelectionMode>(req->mode());
  KVMEM_ASSIGN_OR_RETURN(ra.retrieval, OverridesFromWire(req));
  KVMEM_ASSIGN_OR_RETURN(RetrieveResult res, s->Retrieve(ra));
  GlobalMetrics().search_nodes_visited.fetch_add(res.nodes_visited, std::memory_order_relaxed);
  std::vector<flatbuffers::Offset<w::HeadSelection>> heads;
  for (const HeadSelection& h : res.heads) heads.push_back(SelectionToWire(r->fbb, h));
  auto body = w::CreateRetrieveReplyDirect(r->fbb, &heads, res.nodes_visited, res.bytes_read);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, msg.envelope->request_id(), body, 0));
  return Status::OK();
}

void Service::AfterReply(const RequestContext& ctx, uint64_t session_id) {
  if (session_id == 0 || ctx.tenant.empty()) return;
  auto s = Find(ctx.tenant, session_id);
  if (!s.ok()) return;
  {
    std::lock_guard<std::mutex> lock((*s)->op_mu());
    (*s)->Maintain();
    (*s)->Prefetch();
  }
  EnforceWatermarks();
}

Status Service::AttendBatch(const RequestContext& ctx, const w::Parsed& msg,
                            const w::AttendBatch* req, Reply* r) {
  if (req->items() == nullptr || req->items()->size() == 0) {
    return InvalidArgument("AttendBatch: no items");
  }
  // Items may name sessions of other shards: each session's op mutex serialises them with
  // that shard's executor. Each item's status is reported separately.
  std::vector<flatbuffers::Offset<w::AttendReply>> replies;
  std::vector<flatbuffers::Offset<w::Status>> statuses;
  for (const w::Attend* item : *req->items()) {
    auto res = AttendOne(ctx, msg, item, r);
    if (res.ok()) {
      replies.push_back(*res);
      statuses.push_back(w::CreateStatus(r->fbb, w::Code::OK));
    } else {
      replies.push_back(w::AttendReplyBuilder(r->fbb).Finish());
      statuses.push_back(w::CreateStatusDirect(r->fbb, w::ToWire(res.status().code()),
                                               res.status().message().c_str()));
    }
  }
  auto body = w::CreateAttendBatchReplyDirect(r->fbb, &replies, &statuses);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, msg.envelope->request_id(), body, r->packer.bytes()));
  return Status::OK();
}

Status Service::RestoreDurableSessions() {
  if (store_ == nullptr) return Status::OK();
  RestoreStats stats;
  KVMEM_ASSIGN_OR_RETURN(std::vector<RestoredSession> restored,
                         RestoreSessions(store_, pool_, config_.session_defaults, &stats,
                                         tiers_.get()));
  std::unique_lock lock(mu_);
  for (RestoredSession& r : restored) {
    if (r.session) {
      if (Status st = AttachSessionScorer(r.session.get()); !st.ok()) {
        KVMEM_LOG_ERROR("restore: tenant {} session {}: memory scorer not loaded ({}); gate "
                        "scorer answers FAILED_PRECONDITION until it is fixed",
                        r.tenant, r.id, st.ToString());
      }
      sessions_.emplace(Key{r.tenant, r.id}, std::move(r.session));
    } else {
      KVMEM_LOG_ERROR("restore: tenant {} session {} not restored: {}", r.tenant, r.id,
                      r.status.ToString());
      unrestorable_.emplace(Key{r.tenant, r.id}, r.status);
    }
  }
  KVMEM_LOG_INFO("restore: {} durable sessions ({} tokens, {} chunks, {} bytes read) in {:.3f} s; "
                 "{} failed",
                 stats.sessions, stats.tokens, stats.chunks, stats.bytes, stats.seconds,
                 stats.failed);
  return Status::OK();
}

Status Service::CheckSameProfile(const Session& s, const ModelProfile& profile,
                                 const SessionOptions& options) {
  if (s.options().durability != Durability::kDurable) return Status::OK();
  const ModelProfile& have = s.profile();
  std::string diff;
  auto field = [&](const char* name, uint64_t a, uint64_t b) {
    if (a != b) diff += std::string(diff.empty() ? "" : ", ") + name + " " + std::to_string(a) +
                        " (stored) vs " + std::to_string(b) + " (requested)";
  };
  field("layers", have.layers, profile.layers);
  field("q_heads", have.q_heads, profile.q_heads);
  field("kv_heads", have.kv_heads, profile.kv_heads);
  field("head_dim", have.head_dim, profile.head_dim);
  field("dtype", static_cast<uint64_t>(have.dtype), static_cast<uint64_t>(profile.dtype));
  field("chunk_min_tokens", s.options().chunker.min_tokens, options.chunker.min_tokens);
  field("chunk_max_tokens", s.options().chunker.max_tokens, options.chunker.max_tokens);
  field("durability", 1, static_cast<uint64_t>(options.durability));
  if (have.dense_layers != profile.dense_layers) diff += std::string(diff.empty() ? "" : ", ") + "dense_layers differ";
  if (have.retrieval_head_mask != profile.retrieval_head_mask) {
    diff += std::string(diff.empty() ? "" : ", ") + "retrieval_head_mask differs";
  }
  const MemoryOptions& hm = s.options().memory;
  const MemoryOptions& rm = options.memory;
  field("memory.gate_dim", hm.gate_dim, rm.gate_dim);
  field("memory.payload_rows", hm.payload_rows, rm.payload_rows);
  field("memory.payload_dim", hm.payload_dim, rm.payload_dim);
  field("memory.payload_dtype", static_cast<uint64_t>(hm.payload_dtype),
        static_cast<uint64_t>(rm.payload_dtype));
  if (diff.empty()) return Status::OK();
  return FailedPrecondition("session " + std::to_string(s.id()) +
                            " exists (durable, restored) with a conflicting profile: " + diff +
                            "; drop it first to recreate it");
}

Status Service::VerifySession(const RequestContext& ctx, uint64_t rid, const w::VerifySession* req,
                              Reply* r) {
  VerifyReport rep;
  {
    std::shared_lock lock(mu_);
    auto bad = unrestorable_.find({ctx.tenant, req->session_id()});
    if (bad != unrestorable_.end()) rep.bad.push_back(bad->second.ToString());
  }
  if (rep.bad.empty()) {
    KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
    if (s->options().durability != Durability::kDurable || store_ == nullptr) {
      return FailedPrecondition("VerifySession: session " + std::to_string(req->session_id()) +
                                " is ephemeral (nothing stored to verify)");
    }
    std::lock_guard<std::mutex> lock(s->op_mu());
    KVMEM_ASSIGN_OR_RETURN(rep, kvmem::VerifySession(*store_, ctx.tenant, s->id(), s->profile(),
                                                      &s->options().memory));
  }
  std::vector<flatbuffers::Offset<flatbuffers::String>> bad;
  for (const std::string& b : rep.bad) bad.push_back(r->fbb.CreateString(b));
  auto body = w::CreateVerifySessionReply(r->fbb, rep.bad.empty(), rep.tokens, rep.chunks,
                                          r->fbb.CreateVector(bad));
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}


// ---- Memory blocks ----

namespace {

Result<MemoryStore*> MemoryOf(const Session& s, const char* op) {
  if (s.memory() == nullptr) {
    return FailedPrecondition(std::string(op) + ": session " + std::to_string(s.id()) +
                              " keeps no memory blocks (create it with memory.gate_dim > 0)");
  }
  return s.memory();
}

flatbuffers::Offset<w::MemoryBlockInfo> BlockInfoToWire(flatbuffers::FlatBufferBuilder& fbb,
                                                        const MemoryBlockInfo& b) {
  return w::CreateMemoryBlockInfoDirect(fbb, b.id, b.span_start, b.span_end,
                                        b.label.empty() ? nullptr : b.label.c_str());
}

// Most blocks one request may name or add.
constexpr uint64_t kMaxBlocksPerRequest = 1u << 20;

// The ids of a Get/Drop request: present, nonempty, at most kMaxBlocksPerRequest.
// The verifier checks a vector's 4-byte length field, not the alignment of its 8-byte elements:
// a crafted buffer can place a [ulong] at an address that is not 8-byte aligned, and reading it
// is a misaligned load (found by fuzz_dispatch: DropMemoryBlocks ids, UBSan). Builders align it.
bool Aligned8(const flatbuffers::Vector<uint64_t>* v) {
  return v == nullptr || reinterpret_cast<uintptr_t>(v->data()) % alignof(uint64_t) == 0;
}

Result<std::span<const uint64_t>> BlockIds(const flatbuffers::Vector<uint64_t>* ids, const char* op) {
  if (ids == nullptr || ids->size() == 0) return InvalidArgument(std::string(op) + ": no ids");
  if (!Aligned8(ids)) return InvalidArgument(std::string(op) + ": misaligned ids vector");
  if (ids->size() > kMaxBlocksPerRequest) {
    return InvalidArgument(std::string(op) + ": too many ids (max " +
                           std::to_string(kMaxBlocksPerRequest) + ")");
  }
  return std::span<const uint64_t>(ids->data(), ids->size());
}

// Payloads of `ids` gathered into one reply tensor [n, rows, dim].
Result<flatbuffers::Offset<w::Tensor>> PackPayloads(const MemoryStore& m,
                                                    std::span<const uint64_t> ids, Reply* r) {
  const MemoryOptions& o = m.options();
  const uint64_t pb = o.payload_bytes();
  uint8_t* buf = r->NewBuffer(pb * ids.size());
  for (size_t i = 0; i < ids.size(); ++i) KVMEM_RETURN_IF_ERROR(m.ReadPayload(ids[i], buf + i * pb));
  const uint64_t shape[3] = {ids.size(), o.payload_rows, o.payload_dim};
  return r->packer.Add(r->fbb, w::ToWire(o.payload_dtype), shape, buf);
}

}  // namespace

Status Service::AttachSessionScorer(Session* s) const {
  MemoryStore* m = s->memory();
  if (m == nullptr || m->options().scorer_file.empty()) return Status::OK();
  KVMEM_ASSIGN_OR_RETURN(std::string path,
                         ResolveScorerPath(config_.memory_scorer_dir, m->options().scorer_file));
  KVMEM_ASSIGN_OR_RETURN(auto scorer, LoadMemoryScorer(path, m->options().gate_dim));
  m->SetScorer(std::move(scorer));
  return Status::OK();
}

Result<std::shared_ptr<const MemoryScorer>> Service::DaemonScorer(uint32_t gate_dim) const {
  if (config_.memory_scorer_file.empty()) {
    return FailedPrecondition(
        "SelectMemory: gate scorer needs weights: set the session's memory.scorer_file or the "
        "daemon's memory_scorer_file");
  }
  std::lock_guard<std::mutex> lock(scorer_mu_);
  auto it = daemon_scorers_.find(gate_dim);
  if (it != daemon_scorers_.end()) return it->second;
  auto loaded = LoadMemoryScorer(config_.memory_scorer_file, gate_dim);
  if (!loaded.ok()) return loaded.status().WithContext("daemon memory_scorer_file");
  daemon_scorers_.emplace(gate_dim, *loaded);
  return *loaded;
}

Status Service::PutMemoryBlocks(const RequestContext& ctx, const w::Parsed& msg,
                                const w::PutMemoryBlocks* req, Reply* r) {
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  KVMEM_ASSIGN_OR_RETURN(MemoryStore * m, MemoryOf(*s, "PutMemoryBlocks"));
  const MemoryOptions& o = m->options();
  if (req->span_starts() == nullptr || req->span_ends() == nullptr) {
    return InvalidArgument("PutMemoryBlocks: span_starts and span_ends are required");
  }
  if (!Aligned8(req->span_starts()) || !Aligned8(req->span_ends())) {
    return InvalidArgument("PutMemoryBlocks: misaligned span_starts / span_ends vector");
  }
  const uint64_t n = req->span_starts()->size();
  if (n == 0) return InvalidArgument("PutMemoryBlocks: no blocks");
  if (n > kMaxBlocksPerRequest) {
    return InvalidArgument("PutMemoryBlocks: " + std::to_string(n) + " blocks in one request (max " +
                           std::to_string(kMaxBlocksPerRequest) + ")");
  }
  const w::DType floats[3] = {w::DType::BF16, w::DType::F16, w::DType::F32};
  const uint64_t kshape[2] = {n, o.gate_dim};
  KVMEM_ASSIGN_OR_RETURN(const uint8_t* keys,
                         w::ResolveTensor(msg, req->gate_keys(), "gate_keys", kshape, floats));
  KVMEM_ASSIGN_OR_RETURN(DType kdt, w::FloatDTypeFromWire(req->gate_keys()->dtype()));
  const uint64_t pshape[3] = {n, o.payload_rows, o.payload_dim};
  const w::DType pdt[1] = {w::ToWire(o.payload_dtype)};
  KVMEM_ASSIGN_OR_RETURN(const uint8_t* payloads,
                         w::ResolveTensor(msg, req->payloads(), "payloads", pshape, pdt));
  if (HasNonFinite(keys, kdt, n * o.gate_dim)) {
    return InvalidArgument("PutMemoryBlocks: gate_keys contain NaN or Inf");
  }
  if (HasNonFinite(payloads, o.payload_dtype, n * o.payload_rows * o.payload_dim)) {
    return InvalidArgument("PutMemoryBlocks: payloads contain NaN or Inf");
  }
  std::vector<float> fkeys(n * o.gate_dim);
  ConvertToFloat(keys, kdt, fkeys.size(), fkeys.data());
  NewMemoryBlocks b;
  b.n = static_cast<uint32_t>(n);
  b.gate_keys = fkeys.data();
  b.payloads = payloads;
  b.span_starts = std::span(req->span_starts()->data(), req->span_starts()->size());
  b.span_ends = std::span(req->span_ends()->data(), req->span_ends()->size());
  if (req->labels() != nullptr) {
    for (const auto* l : *req->labels()) b.labels.push_back(l ? l->str() : std::string());
  }
  uint64_t limit = config_.memory_max_blocks_per_session;
  if (o.max_blocks != 0) limit = std::min(limit, o.max_blocks);
  // Payloads are device-tier bytes like K/V: admitted against the tenant quota the same way
  // (evicting the tenant's least recently selected blocks first), allocated through the
  // session (the pool makes room by eviction when full).
  KVMEM_RETURN_IF_ERROR(AdmitWrite(s.get(), n * o.payload_bytes()).WithContext("PutMemoryBlocks"));
  s->BeginMemoryOp();
  KVMEM_ASSIGN_OR_RETURN(std::vector<uint64_t> ids, m->Put(b, limit));
  auto body = w::CreatePutMemoryBlocksReplyDirect(r->fbb, &ids, m->blocks(), m->bytes());
  r->fbb.Finish(w::MakeEnvelope(r->fbb, msg.envelope->request_id(), body, 0));
  return Status::OK();
}

Status Service::SelectMemory(const RequestContext& ctx, const w::Parsed& msg,
                             const w::SelectMemory* req, Reply* r) {
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  KVMEM_ASSIGN_OR_RETURN(MemoryStore * m, MemoryOf(*s, "SelectMemory"));
  const MemoryOptions& o = m->options();
  if (req->k() == 0 || req->k() > kMaxBlocksPerRequest) {
    return InvalidArgument("SelectMemory: k must be in 1.." + std::to_string(kMaxBlocksPerRequest));
  }
  if (req->gate() > w::MemoryGate::MAX) {
    return InvalidArgument("SelectMemory: unknown gate " +
                           std::to_string(static_cast<int>(req->gate())));
  }
  const w::DType floats[3] = {w::DType::BF16, w::DType::F16, w::DType::F32};
  const uint64_t qshape[1] = {o.gate_dim};
  KVMEM_ASSIGN_OR_RETURN(const uint8_t* q, w::ResolveTensor(msg, req->query(), "query", qshape, floats));
  KVMEM_ASSIGN_OR_RETURN(DType qdt, w::FloatDTypeFromWire(req->query()->dtype()));
  if (HasNonFinite(q, qdt, o.gate_dim)) return InvalidArgument("SelectMemory: query contains NaN or Inf");
  std::vector<float> fq(o.gate_dim);
  ConvertToFloat(q, qdt, fq.size(), fq.data());
  MemoryGate gate = static_cast<MemoryGate>(req->gate());
  if (gate == MemoryGate::kDefault) gate = o.default_gate;
  if (gate == MemoryGate::kScorer && m->scorer() == nullptr) {
    KVMEM_ASSIGN_OR_RETURN(auto scorer, DaemonScorer(o.gate_dim));
    m->SetScorer(std::move(scorer));
  }
  KVMEM_ASSIGN_OR_RETURN(MemorySelection sel, m->Select(fq, req->k(), gate, req->budget_leaves()));
  std::vector<flatbuffers::Offset<w::MemoryBlockInfo>> infos;
  for (uint64_t id : sel.ids) {
    KVMEM_ASSIGN_OR_RETURN(const MemoryBlockInfo* info, m->Info(id));
    infos.push_back(BlockInfoToWire(r->fbb, *info));
  }
  flatbuffers::Offset<w::Tensor> payloads;
  if (req->return_payloads() && !sel.ids.empty()) {
    // Selected payloads come back to the device tier (and become the most recent).
    KVMEM_RETURN_IF_ERROR(s->FetchMemoryBlocks(sel.ids).WithContext("SelectMemory"));
    KVMEM_ASSIGN_OR_RETURN(payloads, PackPayloads(*m, sel.ids, r));
  }
  auto ids = r->fbb.CreateVector(sel.ids);
  auto scores = r->fbb.CreateVector(sel.scores);
  auto blocks = r->fbb.CreateVector(infos);
  w::SelectMemoryReplyBuilder b(r->fbb);
  b.add_ids(ids);
  b.add_scores(scores);
  if (!payloads.IsNull()) b.add_payloads(payloads);
  b.add_blocks(blocks);
  b.add_exact(sel.exact);
  b.add_keys_scored(sel.keys_scored);
  b.add_leaves_visited(sel.leaves_visited);
  auto body = b.Finish();
  r->fbb.Finish(w::MakeEnvelope(r->fbb, msg.envelope->request_id(), body, r->packer.bytes()));
  return Status::OK();
}

Status Service::GetMemoryBlocks(const RequestContext& ctx, uint64_t rid,
                                const w::GetMemoryBlocks* req, Reply* r) {
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  KVMEM_ASSIGN_OR_RETURN(MemoryStore * m, MemoryOf(*s, "GetMemoryBlocks"));
  KVMEM_ASSIGN_OR_RETURN(std::span<const uint64_t> ids, BlockIds(req->ids(), "GetMemoryBlocks"));
  std::vector<flatbuffers::Offset<w::MemoryBlockInfo>> infos;
  for (uint64_t id : ids) {
    KVMEM_ASSIGN_OR_RETURN(const MemoryBlockInfo* info, m->Info(id));
    infos.push_back(BlockInfoToWire(r->fbb, *info));
  }
  KVMEM_RETURN_IF_ERROR(s->FetchMemoryBlocks(ids).WithContext("GetMemoryBlocks"));
  KVMEM_ASSIGN_OR_RETURN(auto payloads, PackPayloads(*m, ids, r));
  flatbuffers::Offset<w::Tensor> keys;
  if (req->return_gate_keys()) {
    const uint32_t d = m->options().gate_dim;
    auto* buf = reinterpret_cast<float*>(r->NewBuffer(ids.size() * d * sizeof(float)));
    for (size_t i = 0; i < ids.size(); ++i) {
      KVMEM_ASSIGN_OR_RETURN(const float* k, m->GateKey(ids[i]));
      std::copy_n(k, d, buf + i * d);
    }
    const uint64_t shape[2] = {ids.size(), d};
    keys = r->packer.Add(r->fbb, w::DType::F32, shape, buf);
  }
  auto blocks = r->fbb.CreateVector(infos);
  w::GetMemoryBlocksReplyBuilder b(r->fbb);
  b.add_blocks(blocks);
  b.add_payloads(payloads);
  if (!keys.IsNull()) b.add_gate_keys(keys);
  auto body = b.Finish();
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, r->packer.bytes()));
  return Status::OK();
}

Status Service::DropMemoryBlocks(const RequestContext& ctx, uint64_t rid,
                                 const w::DropMemoryBlocks* req, Reply* r) {
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  KVMEM_ASSIGN_OR_RETURN(MemoryStore * m, MemoryOf(*s, "DropMemoryBlocks"));
  KVMEM_ASSIGN_OR_RETURN(std::span<const uint64_t> ids, BlockIds(req->ids(), "DropMemoryBlocks"));
  KVMEM_RETURN_IF_ERROR(m->Drop(ids).WithContext("DropMemoryBlocks"));
  auto body = w::CreateDropMemoryBlocksReply(r->fbb, ids.size(), m->blocks(), m->bytes());
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

Status Service::ListMemoryBlocks(const RequestContext& ctx, uint64_t rid,
                                 const w::ListMemoryBlocks* req, Reply* r) {
  KVMEM_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(ctx.tenant, req->session_id()));
  std::lock_guard<std::mutex> lock(s->op_mu());
  KVMEM_ASSIGN_OR_RETURN(MemoryStore * m, MemoryOf(*s, "ListMemoryBlocks"));
  const uint32_t limit = req->limit() == 0 ? 1000 : std::min<uint32_t>(req->limit(), 100000);
  std::vector<flatbuffers::Offset<w::MemoryBlockInfo>> infos;
  for (const MemoryBlockInfo* b : m->List(req->after_id(), limit)) {
    infos.push_back(BlockInfoToWire(r->fbb, *b));
  }
  auto blocks = r->fbb.CreateVector(infos);
  auto options = MemoryOptionsToWire(r->fbb, m->options());
  auto body = w::CreateListMemoryBlocksReply(r->fbb, blocks, m->blocks(), m->bytes(), options);
  r->fbb.Finish(w::MakeEnvelope(r->fbb, rid, body, 0));
  return Status::OK();
}

}  // namespace kvmem
