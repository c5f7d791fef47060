// kvmem client library: talk to kvmemd over UCX.
//
//   auto c = kvmem::Client::Connect("127.0.0.1:7420");
//   if (!c.ok()) { ... c.status() says why ... }
//   auto id = (*c)->CreateSession(profile);
//   (*c)->AppendKV(*id, keys, values, boundaries);
//   auto out = (*c)->Attend(*id, req);
//
// Every call returns Status / Result<T>; on failure the Status code is the daemon's (or
// UNAVAILABLE / DEADLINE_EXCEEDED for transport problems) and the message says what was wrong.
// A Client is safe to use from several threads; calls from different threads proceed
// concurrently over one endpoint. Asynchronous forms return a Future; tensors passed to them
// must stay valid until the Future is complete.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace kvmem::client {

struct ClientOptions {
  // Tenant token sent in Hello. Default: "" (daemons without tenants accept it).
  std::string token;
  // Shown in the daemon's logs. Default: "kvmem-client".
  std::string client_name = "kvmem-client";
  // UCX transports: "auto" (UCX picks; shared memory to a same-host daemon), "shm"
  // (shared memory + CMA, TCP only for the connection handshake), "tcp". Default: "auto".
  std::string transport = "auto";
  // UCX peer error handling: detects a dead daemon but limits Debian's UCX 1.13 to TCP.
  // Default: false.
  bool peer_error_handling = false;
  // Connect + Hello deadline. Default: 5000.
  int connect_timeout_ms = 5000;
  // Per-request deadline; DEADLINE_EXCEEDED after it. Default: 120000.
  int request_timeout_ms = 120000;
  // A waiting caller spins on the worker this long before sleeping on its event fd.
  // Default: 100 (microseconds).
  int spin_us = 100;
};

// A host tensor passed to a call (not owned).
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::kBF16;
  std::vector<uint64_t> shape;
};

enum class Mode : uint8_t { kDefault = 0, kDense = 1, kIndex = 2, kRetrievalHeads = 3, kHybrid = 4 };

// Modes retrieval_heads / hybrid (values as the wire's): how retrieval heads keep scored blocks.
enum class SelectionRule : uint8_t { kDefault = 0, kTopK = 1, kRatio = 2, kThreshold = 3, kTopP = 4 };
enum class BlockPooling : uint8_t { kDefault = 0, kMax = 1, kMean = 2 };
// What a KV head did in one layer (modes retrieval_heads / hybrid; kNone in index mode).
enum class HeadRole : uint8_t { kNone = 0, kRetrieval = 1, kReused = 2, kDense = 3 };

// Retrieval-head scoring (docs/architecture.md, "Hybrid heads"); default / 0 fields take the
// session's (or, at creation, the daemon's) value.
struct RetrievalParams {
  SelectionRule rule = SelectionRule::kDefault;
  float rule_value = 0;       // ratio / threshold / top_p parameter
  uint32_t block_tokens = 0;  // 1 = token level
  BlockPooling pooling = BlockPooling::kDefault;
};

struct Profile {
  uint32_t layers = 0;
  uint32_t q_heads = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kBF16;
  std::vector<uint32_t> dense_layers;
  std::vector<uint8_t> retrieval_head_mask;  // [layers * kv_heads] or empty
  std::string name;
};

// Memory blocks (LycheeMemory): gate, per request or as the session default.
enum class MemoryGate : uint8_t {
  kDefault = 0,     // the session's default gate
  kTreeExact = 1,   // exact top-k by q·k through the daemon's gate tree
  kTreeBudget = 2,  // best-first through the tree, at most budget_leaves leaves (approximate)
  kLinearScan = 3,  // exact top-k by q·k, every key scored
  kScorer = 4,      // the loaded linear / bilinear scorer
};

// Geometry and gate of a session's memory blocks; gate_dim 0 = none.
struct MemoryOptions {
  uint32_t gate_dim = 0;
  uint32_t payload_rows = 0;
  uint32_t payload_dim = 0;
  DType payload_dtype = DType::kBF16;
  MemoryGate default_gate = MemoryGate::kTreeExact;
  uint32_t budget_leaves = 0;    // 0: daemon default (64)
  std::string scorer_file;       // under the daemon's memory_scorer_dir; "" = daemon's file
  uint64_t max_blocks = 0;       // 0: daemon limit
};

struct SessionOptions {
  uint32_t chunk_min_tokens = 0;       // 0: daemon default
  uint32_t chunk_max_tokens = 0;       // 0: daemon default
  uint32_t sink_tokens = 16;
  uint32_t recent_window = 0;
  uint32_t default_budget_tokens = 0;  // 0: daemon default
  Mode mode = Mode::kDense;
  bool durable = false;
  uint64_t ttl_seconds = 0;
  std::string label;
  RetrievalParams retrieval;
  MemoryOptions memory;
};

struct LayerInfo {
  uint32_t layer = 0;
  uint64_t tokens = 0;
  uint32_t tree_depth = 0;
  std::vector<uint32_t> tree_nodes;
};

struct SessionSummary {
  uint64_t id = 0;
  std::string tenant;
  Profile profile;
  SessionOptions options;
  uint64_t tokens = 0;
  uint64_t chunks = 0;
  uint32_t tail_tokens = 0;
  uint64_t bytes = 0;
  uint64_t created_unix_ms = 0;
  uint64_t last_used_unix_ms = 0;
  float mean_chunk_tokens = 0;
  std::vector<LayerInfo> layers;  // SessionInfo only
  // Tiers: `bytes` above is the device tier (KV pool).
  uint64_t host_bytes = 0;
  uint64_t disk_bytes = 0;           // only copy in RocksDB
  uint64_t fetched_blocks = 0;       // (chunk, layer) blocks fetched back when selected
  uint64_t prefetched_blocks = 0;    // fetched ahead for the next layer
  uint64_t evicted_blocks = 0;
  uint64_t memory_blocks = 0;     // memory blocks held
  uint64_t memory_bytes = 0;      // their payload bytes (included in bytes)
};

struct SnapshotResult {
  uint64_t tokens = 0, chunks = 0, bytes = 0;
};
struct RestoreResult {
  uint64_t id = 0, tokens = 0, chunks = 0;
};

// Result of EvictSession.
struct EvictResult {
  uint64_t blocks = 0;  // (chunk, layer) blocks moved
  uint64_t bytes = 0;   // bytes freed in the tiers they left
  uint64_t device_bytes = 0, host_bytes = 0, disk_bytes = 0;  // the session afterwards
};

struct AppendResult {
  uint64_t tokens = 0;
  uint64_t chunks = 0;
  uint32_t sealed = 0;
};

// Chunks chosen for one KV head: ids, token ranges [start, end) and scores (with token-granular
// rescoring a range may be a sub-range of its chunk, and a chunk may appear more than once).
struct HeadSelection {
  uint32_t kv_head = 0;
  std::vector<uint32_t> chunks;
  std::vector<uint64_t> starts;
  std::vector<uint64_t> ends;
  std::vector<float> scores;
  HeadRole role = HeadRole::kNone;
  uint32_t source_layer = 0;  // kRetrieval / kReused: the layer whose retrieval head selected
};

struct RetrieveRequest {
  uint32_t layer = 0;
  TensorView q;               // [q_heads, head_dim]
  uint32_t budget_tokens = 0; // 0: session default
  uint32_t top_chunks = 0;    // index mode: exact top chunks
  Mode mode = Mode::kDefault;
  RetrievalParams retrieval;
};

struct RetrieveResult {
  std::vector<HeadSelection> heads;  // one per KV head
  uint64_t nodes_visited = 0;
  uint64_t bytes_read = 0;
};

struct AttendRequest {
  uint32_t layer = 0;
  TensorView q;                      // [q_heads, head_dim]
  std::optional<TensorView> new_k;   // [kv_heads, head_dim], appended first
  std::optional<TensorView> new_v;
  uint8_t boundary = 0;              // boundary class of the new token
  uint32_t budget_tokens = 0;        // 0: session default
  Mode mode = Mode::kDefault;
  bool return_lse = false;
  bool return_selection = false;     // sparse modes: what each KV head attended, and its role
  DType out_dtype = DType::kBF16;
  RetrievalParams retrieval;         // modes retrieval_heads / hybrid
};

struct AttendResult {
  std::vector<uint8_t> out;          // [q_heads, head_dim] in out_dtype
  DType out_dtype = DType::kBF16;
  std::vector<float> lse;            // [q_heads] if requested
  std::vector<uint32_t> tokens_attended;
  std::vector<HeadSelection> selection;  // if requested and the layer was sparse
};

struct TierUsage {
  std::string tier;  // "device", "host", "disk"
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t chunks = 0;
};

// Result of VerifySession: every stored record of a durable session re-read and checked.
struct VerifyResult {
  bool ok = false;
  uint64_t tokens = 0;
  uint64_t chunks = 0;
  std::vector<std::string> bad;  // one line per bad record, naming it
};

struct MemoryBlockInfo {
  uint64_t id = 0;
  uint64_t span_start = 0;  // source span [start, end) in tokens
  uint64_t span_end = 0;
  std::string label;
};

// Blocks to add: gate_keys [n, gate_dim] (F32/F16/BF16), payloads [n, payload_rows,
// payload_dim] in the session's payload dtype, spans [n], labels empty or [n].
struct MemoryBlocksToPut {
  TensorView gate_keys;
  TensorView payloads;
  std::vector<uint64_t> span_starts;
  std::vector<uint64_t> span_ends;
  std::vector<std::string> labels;
};

struct PutMemoryResult {
  std::vector<uint64_t> ids;  // assigned, in input order
  uint64_t blocks = 0;        // held now
  uint64_t bytes = 0;         // payload bytes held now
};

struct MemorySelection {
  std::vector<uint64_t> ids;      // best first (ties: lower id)
  std::vector<float> scores;
  std::vector<MemoryBlockInfo> blocks;
  std::vector<uint8_t> payloads;  // [n, payload_rows, payload_dim] in payload_dtype, if asked
  DType payload_dtype = DType::kBF16;
  bool exact = true;              // provably the exact top-k for the gate
  uint64_t keys_scored = 0;
  uint64_t leaves_visited = 0;
};

struct MemoryBlocks {
  std::vector<MemoryBlockInfo> blocks;
  std::vector<uint8_t> payloads;  // [n, payload_rows, payload_dim]
  DType payload_dtype = DType::kBF16;
  std::vector<float> gate_keys;   // [n, gate_dim] if asked
};

struct MemoryListing {
  std::vector<MemoryBlockInfo> blocks;
  uint64_t total_blocks = 0;
  uint64_t bytes = 0;
  MemoryOptions options;
};

struct ServerInfo {
  std::string tenant;
  std::string server_version;
  std::string backend;
  uint64_t max_message_bytes = 0;
  // As of the Hello (connect time); empty / 0 from daemons that predate them.
  uint64_t uptime_ms = 0;
  std::string gpu;
  std::vector<TierUsage> tiers;
  uint64_t sessions_total = 0;
};

namespace detail {
struct CallState;
}

// The result of an asynchronous call. Get() waits (progressing the connection) and returns
// the result once; Ready() checks without blocking.
template <typename T>
class Future {
 public:
  Future() = default;
  Future(std::shared_ptr<detail::CallState> call, std::function<Result<T>(detail::CallState&)> parse,
         std::function<Status(detail::CallState&)> wait)
      : call_(std::move(call)), parse_(std::move(parse)), wait_(std::move(wait)) {}
  explicit Future(Status error) : error_(std::move(error)) {}

  Result<T> Get() {
    if (!call_) return error_.ok() ? Status(StatusCode::kFailedPrecondition, "empty future") : error_;
    KVMEM_RETURN_IF_ERROR(wait_(*call_));
    return parse_(*call_);
  }
  bool valid() const { return call_ != nullptr || !error_.ok(); }

 private:
  std::shared_ptr<detail::CallState> call_;
  std::function<Result<T>(detail::CallState&)> parse_;
  std::function<Status(detail::CallState&)> wait_;
  Status error_;
};

class Client {
 public:
  // Connects and authenticates (Hello). UNAVAILABLE when no daemon answers at `address`,
  // UNAUTHENTICATED for a bad token.
  static Result<std::unique_ptr<Client>> Connect(const std::string& address,
                                                 const ClientOptions& options = {});
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const ServerInfo& server() const;
  const std::string& address() const;
  // UCX's description of the endpoint's lanes (which transports carry the traffic).
  std::string TransportInfo() const;

  Status Ping(uint64_t payload = 0);

  // Creates a session; id 0 picks a random one. Returns the id.
  Result<uint64_t> CreateSession(const Profile& profile, const SessionOptions& options = {},
                                 uint64_t id = 0);
  Status DropSession(uint64_t id);
  Result<std::vector<SessionSummary>> ListSessions();
  Result<SessionSummary> SessionInfo(uint64_t id);
  // Durable sessions: re-reads every stored chunk and checks its checksum.
  Result<VerifyResult> VerifySession(uint64_t id);
  // Moves every evictable block (not sinks, recent window or tail) out of the device tier:
  // to the host tier while it has room (to_disk false) or to RocksDB (to_disk true).
  Result<EvictResult> EvictSession(uint64_t id, bool to_disk);
  // Snapshots: a durable, consistent point-in-time copy of session `id` under `name` (unique
  // per tenant, survives restarts); Restore makes a new session `new_id` from one.
  Result<SnapshotResult> Snapshot(uint64_t id, const std::string& name);
  Result<RestoreResult> Restore(const std::string& name, uint64_t new_id, bool durable = false);
  Status DropSnapshot(const std::string& name);

  // keys / values: [layers, kv_heads, tokens, head_dim] in the profile dtype;
  // boundaries: [tokens] classes 0..5, or empty.
  Result<AppendResult> AppendKV(uint64_t id, const TensorView& keys, const TensorView& values,
                                std::span<const uint8_t> boundaries = {});
  Future<AppendResult> AppendKVAsync(uint64_t id, const TensorView& keys,
                                     const TensorView& values,
                                     std::span<const uint8_t> boundaries = {});

  // kv: [2, layers, kv_heads, tokens, head_dim], K then V in one buffer: the payload goes out
  // as one contiguous zero-copy send (the fastest way to append).
  Result<AppendResult> AppendKVPacked(uint64_t id, const TensorView& kv,
                                      std::span<const uint8_t> boundaries = {});
  Future<AppendResult> AppendKVPackedAsync(uint64_t id, const TensorView& kv,
                                           std::span<const uint8_t> boundaries = {});

  Result<AttendResult> Attend(uint64_t id, const AttendRequest& request);
  Future<AttendResult> AttendAsync(uint64_t id, const AttendRequest& request);

  // Selection only. top_chunks > 0: the exact top chunks per KV head by max over the chunk of
  // q·k (max over the GQA group); 0: budgeted index search filling budget_tokens (0: session
  // default). q: [q_heads, head_dim].
  Result<RetrieveResult> Retrieve(uint64_t id, uint32_t layer, const TensorView& q,
                                  uint32_t budget_tokens = 0, uint32_t top_chunks = 0);
  // With a mode and retrieval-head options. Modes retrieval_heads / hybrid answer what Attend
  // would attend per KV head (role, ranges) and update the session's kept selections likewise.
  Result<RetrieveResult> Retrieve(uint64_t id, const RetrieveRequest& request);

  // --- Memory blocks (the session needs SessionOptions::memory.gate_dim > 0) ---
  // Adds blocks, all or nothing; ids are assigned by the daemon.
  Result<PutMemoryResult> PutMemoryBlocks(uint64_t id, const MemoryBlocksToPut& blocks);
  // Top-k blocks for query [gate_dim] under `gate`; budget_leaves for kTreeBudget (0: session's).
  Result<MemorySelection> SelectMemory(uint64_t id, const TensorView& query, uint32_t k,
                                       MemoryGate gate = MemoryGate::kDefault,
                                       uint32_t budget_leaves = 0, bool return_payloads = true);
  // Payloads (and gate keys if asked) of `ids` in request order; NOT_FOUND names a missing id.
  Result<MemoryBlocks> GetMemoryBlocks(uint64_t id, std::span<const uint64_t> ids,
                                       bool return_gate_keys = false);
  // All or nothing; returns the blocks left.
  Result<uint64_t> DropMemoryBlocks(uint64_t id, std::span<const uint64_t> ids);
  // Block metadata with ids > after_id in id order (limit 0: 1000).
  Result<MemoryListing> ListMemoryBlocks(uint64_t id, uint64_t after_id = 0, uint32_t limit = 0);

  Future<uint64_t> PingAsync(uint64_t payload = 0);

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Boundary classes from token strings (DESIGN §2): 5 section (blank line or heading marker),
// 4 line / structural ("\n", "{", "}"), 3 sentence end (. ! ?), 2 clause (, ; :),
// 1 word (token ends before a space or starts a word), 0 none.
std::vector<uint8_t> BoundaryClassesFromTokens(const std::vector<std::string>& tokens);

}  // namespace kvmem::client

namespace kvmem {
using client::Client;
}
