// A session: one sequence's KV cache for every layer, cut into boundary-aware chunks.
//
// Storage per layer (docs/architecture.md, "Device store"): every sealed chunk owns one pool
// block per layer holding K[kv_heads][tokens][head_dim] then V[...] (stride = its length); the
// open tail owns one block per layer with stride = tail capacity. Tokens enter the tail and
// move into a chunk block when the chunker seals them.
//
// Thread-safety: callers hold op_mu() around every operation (the daemon also runs a session's
// operations on the one executor its id maps to). Stats() reads only atomics and may be called
// from anywhere.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "daemon/eviction.h"
#include "daemon/kv_pool.h"
#include "daemon/memory_store.h"
#include "daemon/session_journal.h"
#include "index/block_select.h"
#include "index/chunker.h"
#include "index/cluster_tree.h"
#include "kernels/attention.h"
#include "kernels/index_ops.h"

namespace kvmem {

enum class SelectionMode : uint8_t { kDefault = 0, kDense = 1, kIndex = 2, kRetrievalHeads = 3, kHybrid = 4 };
enum class Durability : uint8_t { kEphemeral = 0, kDurable = 1 };

struct ModelProfile {
  uint32_t layers = 0;
  uint32_t q_heads = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kBF16;
  std::vector<uint32_t> dense_layers;
  std::vector<uint8_t> retrieval_head_mask;  // [layers * kv_heads] or empty
  std::string name;

  uint32_t group() const { return q_heads / kv_heads; }
  bool operator==(const ModelProfile&) const = default;
  // Whether KV head h of layer l is a retrieval head (mask entry nonzero).
  bool IsRetrievalHead(uint32_t l, uint32_t h) const {
    return !retrieval_head_mask.empty() && retrieval_head_mask[static_cast<size_t>(l) * kv_heads + h] != 0;
  }
};

// How retrieval heads score and keep context in modes retrieval_heads and hybrid
// (docs/architecture.md, "Hybrid heads").
struct RetrievalOptions {
  // Rule that keeps scored blocks (index/block_select.h); top_k keeps
  // max(1, budget_tokens / block_tokens) blocks. Default: top_k.
  index::BlockRule rule = index::BlockRule::kTopK;
  // Parameter of ratio / threshold / top_p. Default: 0.9.
  float rule_value = 0.9f;
  // Tokens per scored block; 1 scores single tokens. In [1, 4096]. Default: 64 (LycheeDecode).
  uint32_t block_tokens = 64;
  // Block score = max (default) or mean of the tokens' q̄·k.
  kernels::BlockPool pooling = kernels::BlockPool::kMax;
  bool operator==(const RetrievalOptions&) const = default;
};

// Per-request overrides of RetrievalOptions; unset / 0 = the session's.
struct RetrievalOverrides {
  std::optional<index::BlockRule> rule;
  float rule_value = 0;
  uint32_t block_tokens = 0;
  std::optional<kernels::BlockPool> pooling;
};

struct SessionOptions {
  index::ChunkerOptions chunker;
  index::ClusterTreeOptions tree;
  index::BudgetSearchOptions search;
  uint32_t sink_tokens = 16;
  uint32_t recent_window = 0;
  uint32_t default_budget_tokens = 2048;
  // Index mode: when > 1, the summary search picks candidates for rescore_overfetch × the budget
  // and the budget is then filled from them by exact attention mass per token: for each
  // candidate chunk, log Σ_{heads g of the group, tokens t} exp(q_g·k_t / √D) − log(tokens),
  // reading the candidates' keys (≈ rescore_overfetch × budget keys per KV head and step, on top
  // of the attention itself). Summaries alone rank by centroid and radius, which misjudges
  // chunks whose mass sits in a few tokens. Not with the device search (host search is used).
  // Must be in [1, 64]. Default: 1 (off).
  float rescore_overfetch = 1.0f;
  // With rescoring, fill the budget token by token instead of chunk by chunk: each candidate
  // token's attention share (softmax over the candidates per query head, summed over the group),
  // the `budget` largest kept; a selection entry is then a run of adjacent kept tokens of one
  // chunk (HeadSelection starts/ends a sub-range of the chunk). Same keys read as chunk
  // rescoring; sparse attention gets more, shorter spans. Default: false (whole chunks).
  bool rescore_tokens = false;
  SelectionMode mode = SelectionMode::kDense;
  Durability durability = Durability::kEphemeral;
  uint64_t ttl_seconds = 0;
  std::string label;
  bool values_optional = false;
  RetrievalOptions retrieval;
  // Compressed memory blocks (daemon/memory_store.h); disabled unless gate_dim > 0.
  MemoryOptions memory;
};

// Bounds on what a profile may ask for (config-driven).
struct ProfileLimits {
  uint32_t max_layers = 512;
  uint32_t max_heads = 1024;
  uint32_t max_head_dim = 1024;
};

Status ValidateProfile(const ModelProfile& p, const ProfileLimits& limits);
Status ValidateOptions(const SessionOptions& o);
Status ValidateRetrieval(const RetrievalOptions& r);
// FAILED_PRECONDITION when `mode` is retrieval_heads or hybrid and the profile marks no
// retrieval head.
Status CheckHybridProfile(const ModelProfile& p, SelectionMode mode);
inline constexpr uint32_t kMaxRetrievalBlockTokens = 4096;

struct SessionStats {
  uint64_t tokens = 0;
  uint64_t chunks = 0;
  uint32_t tail_tokens = 0;
  uint64_t bytes = 0;          // device tier (KV pool) bytes reserved, tails included
  uint64_t host_bytes = 0;     // host tier
  uint64_t disk_bytes = 0;     // blocks whose only copy is in RocksDB
  uint64_t fetched_blocks = 0;     // fetched back in the request path
  uint64_t prefetched_blocks = 0;  // fetched ahead for the next layer
  uint64_t evicted_blocks = 0;     // moved out of the device or host tier
  uint64_t memory_blocks = 0;
  uint64_t memory_bytes = 0;     // payload bytes of memory blocks (included in bytes)
  uint64_t created_unix_ms = 0;
  uint64_t last_used_unix_ms = 0;
};

// One layer's attention request for a decode step.
struct AttendArgs {
  uint32_t layer = 0;
  const void* q = nullptr;  // [q_heads][head_dim]
  DType q_dtype = DType::kBF16;
  const void* new_k = nullptr;  // [kv_heads][head_dim] in the profile dtype, or null
  const void* new_v = nullptr;
  uint8_t boundary = 0;
  uint32_t budget_tokens = 0;
  SelectionMode mode = SelectionMode::kDefault;
  void* out = nullptr;  // [q_heads][head_dim] in out_dtype
  DType out_dtype = DType::kBF16;
  float* lse = nullptr;  // [q_heads] or null
  RetrievalOverrides retrieval;
  bool want_selection = false;  // fill AttendInfo::selection (index mode); else it may stay empty
};

// What a KV head did in one layer in modes retrieval_heads / hybrid (values as the wire's
// HeadRole).
enum class HeadRole : uint8_t { kNone = 0, kRetrieval = 1, kReused = 2, kDense = 3 };

// The chunks chosen for one KV head, with their token ranges [start, end) and scores. In mode
// retrieval_heads the ranges are scored blocks and `chunks` is empty; a kDense head has none.
struct HeadSelection {
  uint32_t kv_head = 0;
  std::vector<uint32_t> chunks;
  std::vector<uint64_t> starts;
  std::vector<uint64_t> ends;
  std::vector<float> scores;
  HeadRole role = HeadRole::kNone;
  uint32_t source_layer = 0;  // kRetrieval / kReused: the layer whose retrieval head selected
};

// One layer's selection request (Retrieve).
struct RetrieveArgs {
  uint32_t layer = 0;
  const void* q = nullptr;  // [q_heads][head_dim]
  DType q_dtype = DType::kBF16;
  uint32_t budget_tokens = 0;  // 0: session default
  uint32_t top_chunks = 0;     // index mode only: exact top chunks
  SelectionMode mode = SelectionMode::kDefault;
  RetrievalOverrides retrieval;
};

struct AttendInfo {
  std::vector<uint32_t> tokens_attended;  // per KV head
  std::vector<HeadSelection> selection;   // per KV head (sparse modes); empty when dense
  uint64_t nodes_visited = 0;
  uint64_t bytes_read = 0;
  bool device_search = false;  // the search ran on the device (CUDA backend)
  // Modes retrieval_heads: the retrieval heads' block scores came from one device launch
  // (KVPool::PooledBlockScores) instead of keys staged to the host.
  bool device_scan = false;
};

struct RetrieveResult {
  std::vector<HeadSelection> heads;
  uint64_t nodes_visited = 0;
  uint64_t bytes_read = 0;
};

// Per-layer index shape for SessionInfo: depth and nodes per level summed over KV heads.
struct LayerIndexInfo {
  uint32_t depth = 0;
  std::vector<uint32_t> nodes_per_level;
};

struct AppendResult {
  uint64_t tokens = 0;
  uint64_t chunks = 0;
  uint32_t sealed = 0;
};

// One block that may leave its tier, with its recency: a chunk block (chunk, layer) or, with
// `memory`, the payload of memory block `memory_id`.
struct EvictionCandidate {
  Session* session = nullptr;
  uint32_t chunk = 0;
  uint32_t layer = 0;
  uint64_t tick = 0;  // when it was last selected (or sealed, or fetched)
  bool memory = false;
  uint64_t memory_id = 0;
};

class ParallelPool;
class Session;

// An AppendKV payload received in place (docs/architecture.md, "Append path"). Before the
// payload of a packed AppendKV is received, the transport asks the session where its rows will
// go (Session::PlanLanding): the session predicts which chunks the append will seal, allocates
// their blocks, and lists the message ranges (`pieces`) that are rows of those chunks; UCX
// receives them straight into the blocks and the rest of the message into the receive buffer
// at its own offsets. The handler stores the append without copying those rows when the
// prediction still holds (the session's state is then exactly what the plan assumed), else it
// copies the pieces back into the receive buffer (Gather) and stores it as usual.
// Destroying an unconsumed landing frees its blocks. Every AppendKV the transport can parse gets
// one (`placed` or only tracked), so the session knows which appends are in flight.
struct AppendLanding {
  struct Piece {
    uint64_t msg_offset = 0;   // in the message's data part
    uint64_t pool_offset = 0;  // in the KV pool
    uint64_t bytes = 0;
  };
  std::shared_ptr<Session> session;
  uint32_t n = 0;                  // tokens
  uint64_t kv_offset = 0;          // of the packed kv tensor in the data part
  uint64_t tokens_before = 0;      // the session state the plan assumes
  uint64_t sealed_before = 0;
  uint32_t tail_before = 0;
  std::vector<uint32_t> sealed;    // predicted chunk lengths
  std::vector<uint64_t> blocks;    // [chunk * layers + layer]: pool offsets; emptied on adoption
  std::vector<Piece> pieces;       // in message order
  uint8_t* pool_base = nullptr;
  uint8_t* data = nullptr;         // the receive buffer (the whole data part's size)
  uint64_t seq = 0;                // the session's record of this append in flight
  bool placed = false;             // blocks and pieces are set (else: tracked only)
  bool consumed = false;           // seen by the handler (Session::AppendKV)

  // Copies the landed pieces into `data` at their message offsets: the message is then whole
  // in the receive buffer.
  void Gather() const;
  ~AppendLanding();
};

class Session {
 public:
  // `tiers` (may be null: the session never leaves the pool) lets blocks move to the host
  // tier and RocksDB and back (daemon/eviction.h).
  static Result<std::unique_ptr<Session>> Create(uint64_t id, std::string tenant,
                                                 ModelProfile profile, SessionOptions options,
                                                 KVPool* pool, TierContext* tiers = nullptr);
  ~Session();  // returns every block to the pool

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  uint64_t id() const { return id_; }
  const std::string& tenant() const { return tenant_; }
  const ModelProfile& profile() const { return profile_; }
  const SessionOptions& options() const { return options_; }

  // Appends n tokens for every layer. keys/values: [layers][kv_heads][n][head_dim] in the
  // profile dtype; boundaries: [n] classes or null (all 0). All-or-nothing: on error nothing
  // is stored. FAILED_PRECONDITION while a decode step has appended to only some layers.
  // `landing`: the payload was received in place (AppendLanding): keys/values point into the
  // receive buffer, whose ranges listed in landing->pieces are not filled (the rows are in the
  // planned blocks) unless the plan no longer holds, in which case this gathers them first.
  Result<AppendResult> AppendKV(uint32_t n, const void* keys, const void* values,
                                const uint8_t* boundaries, AppendLanding* landing = nullptr);

  // The receive plan of an AppendKV of n tokens whose packed kv tensor starts at `kv_offset`
  // of the data part (null only when the pool is not host memory). Called on the transport
  // thread, in arrival order, for every AppendKV it can parse, without op_mu: it reads and
  // advances only the prediction (plan_mu_): the chunker and token count after every append
  // in flight. The landing is `placed` (blocks allocated, pieces listed) when `place` (a
  // rendezvous receive is to come), the prediction is valid, the append seals a chunk and the
  // pool has room; else it only records the append in flight, so that AppendKV can rebuild
  // the prediction from the real state plus the appends still in flight after a
  // misprediction. `self` is this session's owner.
  static std::unique_ptr<AppendLanding> PlanLanding(const std::shared_ptr<Session>& self, uint32_t n,
                                                    const uint8_t* boundaries, uint64_t kv_offset,
                                                    bool place = true);

  // One layer's decode step: appends new_k/new_v to this layer if given (the token is sealed
  // into chunks once every layer has it), then attends: densely (mode dense, dense layers) or,
  // in mode index, over sinks ∪ the chunks a budgeted cluster-index search selects per KV
  // head ∪ the recent window ∪ the tail. Modes retrieval_heads / hybrid: see RetrievalState
  // below; FAILED_PRECONDITION when the profile has no retrieval head.
  Status Attend(const AttendArgs& args, AttendInfo* info);

  // Selection only, per KV head. Index (and dense) sessions: with top_chunks > 0 the exact top
  // chunks by max_k q·k (max over the GQA group), else a budgeted search filling budget_tokens
  // (0: session default). Modes retrieval_heads / hybrid: what Attend would attend, per head
  // with its role; retrieval heads update the kept selections exactly as Attend does.
  // q: [q_heads][head_dim] of q_dtype.
  Result<RetrieveResult> Retrieve(const RetrieveArgs& args);
  Result<RetrieveResult> Retrieve(uint32_t layer, const void* q, DType q_dtype,
                                  uint32_t budget_tokens, uint32_t top_chunks) {
    return Retrieve(RetrieveArgs{layer, q, q_dtype, budget_tokens, top_chunks});
  }

  // Rebuilds loosened index subtrees (bounded work); run after replying, off the request path.
  void Maintain();
  LayerIndexInfo IndexInfo(uint32_t layer) const;

  SessionStats Stats() const;
  // The session's memory blocks; nullptr when options().memory is disabled.
  MemoryStore* memory() const { return memory_.get(); }
  // Held by the request layer around every operation on this session. Uncontended in the
  // common case (one executor per session); it makes cross-shard batches safe.
  std::mutex& op_mu() { return op_mu_; }
  // Tokens stored in `layer` (differs from Stats().tokens mid decode step).
  uint64_t layer_tokens(uint32_t layer) const { return tokens_ + layers_[layer].pending; }
  double mean_chunk_tokens() const;

  // Durability (daemon/tiers.h): with a journal every complete token is logged before it is
  // stored and sealed chunks are handed to it. Attach after any replay.
  void AttachJournal(std::unique_ptr<SessionJournal> journal) { journal_ = std::move(journal); }
  SessionJournal* journal() const { return journal_.get(); }
  // Sealed chunks: count, token range, and one layer's block bytes (K rows then V rows,
  // BlockBytes(tokens) bytes) copied into *out.
  uint32_t chunk_count() const { return static_cast<uint32_t>(chunks_.size()); }
  uint64_t chunk_start(uint32_t c) const { return chunks_[c].start; }
  uint32_t chunk_tokens(uint32_t c) const { return chunks_[c].tokens; }
  Status ReadChunkBlock(uint32_t chunk, uint32_t layer, std::string* out) const;
  uint64_t tokens() const { return tokens_; }
  // Restore path (daemon/tiers.cc): appends stored chunks as if their tokens had been
  // appended and sealed: chunk i has tokens[i] tokens with classes boundaries[i]. read(l, i,
  // &block) must yield layer l's block of chunk i (K rows then V rows, as ReadChunkBlock gives
  // it), checked, valid until the next call for that layer; it is called once for every
  // (layer, chunk), in chunk order within a layer, layers in parallel on `workers` (may be
  // null). Only while no tail tokens are held, i.e. before any tail replay; then call
  // FinishChunkRestore once. All or nothing: on error nothing is added.
  // from_own_store: the blocks come from this session's own durable records (then they count
  // as stored, and a block the device budget cannot hold stays there until selected); false
  // for a snapshot image (every block must fit). load false (own store only): every block is
  // read and checked but stays in RocksDB until selected.
  using RestoreReader = std::function<Status(uint32_t layer, uint32_t chunk, std::string_view* block)>;
  Status RestoreChunks(std::span<const uint32_t> tokens, std::span<const std::string_view> boundaries,
                       bool from_own_store, bool load, const RestoreReader& read,
                       ParallelPool* workers);
  Status FinishChunkRestore();
  // Boundary classes of tokens [start, start + n) (complete tokens only).
  std::string_view boundaries(uint64_t start, uint64_t n) const {
    return std::string_view(boundary_log_).substr(start, n);
  }
  // The tail as a token batch: K and V [layers][kv_heads][n][head_dim] and the classes of
  // tokens [tokens() - n, tokens()). FAILED_PRECONDITION mid decode step (some layers ahead).
  Status ReadTail(uint32_t* n, std::string* keys, std::string* values) const;

  // --- Tiers (daemon/eviction.h). Callers hold op_mu(). ---
  // Blocks held in tier `from` that may move: not sinks, not the recent window, with somewhere
  // to go, and, with `running_op` (the caller is inside an op of this session), not in use by
  // that op (tick >= its tick).
  void CollectEvictable(Tier from, bool running_op, std::vector<EvictionCandidate>* out) const;
  // Moves one block out of its current tier (device -> host when `to` is kHost, else ->
  // RocksDB; host -> RocksDB). Returns the bytes freed in the tier it left.
  Result<uint64_t> EvictBlock(uint32_t chunk, uint32_t layer, Tier to);
  // The same for any candidate CollectEvictable gave (chunk block or memory block).
  Result<uint64_t> Evict(const EvictionCandidate& c, Tier to);
  // Memory blocks (caller holds op_mu): BeginMemoryOp takes a recency tick for a memory op
  // (a put's new blocks get it); FetchMemoryBlocks marks `ids` as used by this op and brings
  // the cold ones back into the device tier (SelectMemory / GetMemoryBlocks before reading
  // payloads).
  void BeginMemoryOp() { BeginOp(); }
  Status FetchMemoryBlocks(std::span<const uint64_t> ids);
  // Every evictable block of the session to tier `to` (kHost or kDisk): the evict op.
  EvictResult EvictAll(Tier to);
  // Fetches into the device tier the blocks the last index-mode Attend selected on layer l,
  // for layer l + 1, when they are cold and the pool has room below its high watermark (no
  // eviction for a guess). Run after the reply (Service::AfterReply).
  void Prefetch();
  // Durable: marks the chunks the journal has stored as having a disk copy (call after
  // journal()->ChunksSealed()).
  void MarkStoredChunks();
  // Fetches every block of `layer` into the device tier (what dense attention does first).
  Status MakeResident(uint32_t layer);
  // Where block (chunk, layer) lives now.
  Tier BlockTier(uint32_t chunk, uint32_t layer) const;

 private:
  static constexpr uint64_t kNotResident = ~0ull;
  // One layer's block of a chunk: its live copy is in the pool (dev), else in the host tier
  // (host), else only in RocksDB (disk). disk also marks a valid RocksDB copy of a resident
  // block (blocks are immutable), so evicting it again writes nothing.
  struct Block {
    uint64_t dev = kNotResident;  // pool byte offset
    std::unique_ptr<uint8_t[]> host;
    bool disk = false;
    uint64_t tick = 0;
  };
  struct Chunk {
    uint64_t start = 0;
    uint32_t tokens = 0;
    std::vector<Block> blocks;  // per layer
  };
  struct Layer {
    uint64_t tail_block = 0;  // byte offset
    uint32_t tail_tokens = 0;
    uint32_t pending = 0;     // tokens appended to this layer beyond tokens_
    std::vector<kernels::KVSpan> chunk_spans;  // one per sealed chunk, in order
    // MakeResident's op tick: every block of the layer was used then (a block's tick for
    // eviction is the later of its own and this), so a dense Attend stamps the layer, not
    // each of its blocks.
    uint64_t used_tick = 0;
    // A block of the layer may be out of the pool (set when one is evicted or restored on
    // disk only; cleared when MakeResident finds or makes every block resident).
    bool maybe_cold = false;
    // Changes whenever chunk_spans does (a seal, a restore, a block fetched back to another
    // place): the key of dense_plan, the plan a device pool keeps for this layer's dense
    // Attends and patches while only the tail grows (KVPool::AttendDense).
    uint64_t spans_key = 0;
    std::unique_ptr<kernels::cuda::DenseAttendPlanCache> dense_plan;
  };

  Session(uint64_t id, std::string tenant, ModelProfile profile, SessionOptions options,
          KVPool* pool, TierContext* tiers);
  Status Init();

  // Pool block of `bytes`; when the pool is full, asks the tiers to make room first.
  Result<uint64_t> AllocateBlock(uint64_t bytes);
  // Brings block (chunk, layer) into the pool (no-op when resident) and updates its span.
  Status FetchBlock(uint32_t chunk, uint32_t layer, bool prefetch);
  // The same for many blocks of one layer (those already resident are skipped): destinations
  // allocated first, then RocksDB reads with the CRC check fused into the copy, spread over
  // the search pool. On error the blocks fetched so far stay fetched.
  Status FetchBlocks(uint32_t layer, std::span<const uint32_t> chunks);
  // Copies `bytes` from offset `at` of block (chunk, layer) wherever it lives.
  Status ReadBlock(uint32_t chunk, uint32_t layer, uint64_t at, uint64_t bytes, uint8_t* dst) const;
  // Makes sure RocksDB holds block (chunk, layer): spills it (ephemeral) or checks it is
  // stored (durable: FAILED_PRECONDITION while the journal has not stored it yet).
  Status EnsureOnDisk(uint32_t chunk, uint32_t layer);
  bool Pinned(uint32_t chunk) const;  // sinks and the recent window
  // Memory-block payloads that may leave tier `from` (CollectEvictable's share of them).
  void CollectMemoryEvictable(Tier from, bool running_op, std::vector<EvictionCandidate>* out) const;
  void BeginOp();                     // takes a recency tick for this operation
  void FreeBlock(uint32_t tokens, Block& b);  // frees its device and host copies

  // Brings the needed (layer, head) trees up to date with chunks_ (summaries of chunks sealed
  // since the last call). Sessions index lazily: nothing is summarised until the first
  // index-mode request (or from the start in mode index), so dense sessions never pay for the
  // index; hybrid sessions index only their retrieval heads' trees until an index-mode request
  // (all_heads) asks for every tree.
  Status CatchUpIndex(bool all_heads);
  bool TreeNeeded(uint32_t layer, uint32_t head) const;
  // KV head h's query group [G][head_dim] within one layer's float queries qf [q_heads][head_dim].
  std::span<const float> GroupQueries(const std::vector<float>& qf, uint32_t h) const;
  // Per-head chunk selections for one layer by budgeted search (and their cost).
  // only: heads to search (nullptr: all); the others are left empty.
  Status SelectChunks(uint32_t layer, const std::vector<float>& qf, uint32_t budget,
                      std::vector<HeadSelection>* out, uint64_t* nodes, uint64_t* bytes,
                      const std::vector<bool>* only = nullptr) const;
  // Exact rescoring (SessionOptions::rescore_overfetch / rescore_tokens) of the candidates the
  // summary search picked for one KV head: their tokens at or above the sinks, and the logits
  // of those tokens against the head's query group.
  struct TokenRange {
    uint32_t begin, end;
  };
  struct RescoreCandidates {
    std::vector<uint32_t> chunks;  // candidate chunks, in search order
    std::vector<uint32_t> first;   // first token rescored, within its chunk
    std::vector<uint32_t> prefix;  // [chunks + 1] exclusive prefix of the tokens rescored
    std::vector<float> logits;     // [prefix.back()][G], scaled q·k
    // The layer's pool slot of each candidate's block (kNotResident: elsewhere) and the
    // chunk's token count (the block's row stride), read once in the parallel search tasks.
    std::vector<uint64_t> dev;
    std::vector<uint32_t> stride;
  };
  RescoreCandidates CollectCandidates(const index::Selection& sel, uint32_t layer) const;
  // The logits of candidate i of head h, computed on the host: keys read in place on the host
  // pool, copied out of wherever the block lives otherwise.
  Status HostCandidateLogits(uint32_t layer, uint32_t h, std::span<const float> group,
                             RescoreCandidates* cand, size_t i) const;
  // All of head h's candidate logits on the host pool: one kernels::TokenLogitsBlocked call
  // over the pool when every candidate block is resident, HostCandidateLogits one by one
  // otherwise. qf: every query head, fp32.
  Status HostHeadLogits(uint32_t layer, uint32_t h, const std::vector<float>& qf,
                        RescoreCandidates* cand) const;
  // Every head's candidate logits (cands[h], heads outside `only` skipped) in one pool launch
  // for the blocks resident in the pool; the host computes the rest, and all of them when the
  // pool has no TokenLogits.
  Status DeviceCandidateLogits(uint32_t layer, const std::vector<float>& qf,
                               const std::vector<bool>* only,
                               std::vector<RescoreCandidates>* cands) const;
  // Refills `sel` to `budget` tokens from its rescored candidates by exact attention mass per
  // token; scores become that log mass. With SessionOptions::rescore_tokens, fills `ranges` (one
  // per entry of sel->chunks, offsets within the chunk) with the tokens taken; otherwise leaves
  // it empty (whole chunks).
  void FinishRescore(uint32_t G, uint32_t budget, const RescoreCandidates& cand,
                     index::Selection* sel, std::vector<TokenRange>* ranges) const;
  // Token-granular rescoring: the `budget` candidate tokens (chunk, offset) of largest attention
  // mass, given their logits [token][G], as runs of adjacent tokens in descending score.
  static void SelectTokens(uint32_t G, uint32_t budget,
                           const std::vector<std::pair<uint32_t, uint32_t>>& tokens,
                           const std::vector<float>& logits, index::Selection* sel,
                           std::vector<TokenRange>* ranges);
  // Spans grouped per KV head: every chunk and the tail where dense[h], else sinks ∪ the
  // token ranges of sel[h] ∪ recent window ∪ tail (overlaps merged).
  void BuildSparseSpans(uint32_t layer, const std::vector<HeadSelection>& sel,
                        const std::vector<bool>& dense, std::vector<kernels::KVSpan>* spans,
                        std::vector<uint32_t>* head_begin) const;
  // Modes retrieval_heads / hybrid for one layer: each head's role and selection; retrieval
  // heads replace the kept selection of their KV-head index. dense[h]: attend every token.
  Status SelectHybrid(uint32_t layer, SelectionMode mode, const std::vector<float>& qf,
                      uint32_t budget, const RetrievalOverrides& ov, std::vector<HeadSelection>* sel,
                      std::vector<bool>* dense, uint64_t* nodes, uint64_t* bytes,
                      bool* device_scan = nullptr);
  // Every retrieval head of `layer` scored in one device launch (pools that are not host
  // memory), then each head's rule applied on the host as ScanRetrievalHead does. UNIMPLEMENTED
  // when the pool has no device scan or a block of the layer is not resident (the caller then
  // scans head by head from staged keys).
  Status ScanRetrievalHeadsOnDevice(uint32_t layer, const std::vector<bool>& retrieval,
                                    const std::vector<float>& qf, uint32_t budget,
                                    const RetrievalOptions& ro, std::vector<HeadSelection>* sel,
                                    uint64_t* bytes) const;
  // Block scores of retrieval head h over the sealed tokens past the sinks, best blocks kept.
  Status ScanRetrievalHead(uint32_t layer, uint32_t h, const std::vector<float>& qf,
                           uint32_t budget, const RetrievalOptions& ro, HeadSelection* out,
                           uint64_t* bytes) const;
  Result<RetrievalOptions> EffectiveRetrieval(const RetrievalOverrides& ov) const;
  Status KeysAsFloat(uint32_t layer, uint32_t head, uint32_t chunk, float* out) const;
  // Index mode on a pool with device search: brings this layer's device mirrors (trees and
  // chunk-block table) up to date, then searches and attends on the device. UNAVAILABLE when
  // the device search could not serve the request (a head over its limits): the caller falls
  // back to the host search.
  // new_rows: a.new_k / a.new_v go up with q and the search writes them into the tail's last
  // row (Attend did not copy them).
  Status AttendOnDevice(const AttendArgs& a, uint32_t budget, AttendInfo* info, bool new_rows);
  Status SyncDeviceIndex(uint32_t layer);
  Status AttendOnHost(const AttendArgs& a, SelectionMode mode, bool hybrid, bool sparse, AttendInfo* info);
  bool UseDeviceSearch() const;
  bool IsDenseLayer(uint32_t layer) const;

  uint64_t BlockBytes(uint32_t stride_tokens) const;
  uint64_t ElemOffset(uint64_t byte_offset) const;
  // Moves the first sum(sealed) tokens of the stream "tail of each layer, then `n` new rows
  // from keys/values" into new chunk blocks and leaves the rest in the tail.
  // `landed`: the chunks' blocks ([chunk * layers + layer]; owned from here on) already hold
  // the input rows (AppendLanding); only the old tail's rows are copied into them.
  Status SealAndStore(std::span<const uint32_t> sealed, uint32_t n, const uint8_t* keys,
                      const uint8_t* values, bool check_input = false,
                      std::vector<uint64_t>* landed = nullptr);
  // Whether `l` still describes where this append's rows go (caller holds op_mu).
  bool LandingHolds(const AppendLanding& l, std::span<const uint32_t> sealed) const;
  void ReleaseLanding(AppendLanding* l);
  Result<AppendResult> AppendKVImpl(uint32_t n, const void* keys, const void* values,
                                    const uint8_t* boundaries, AppendLanding* landing);
  // After an append (op_mu held): an invalid prediction is rebuilt from the session's real
  // state and the appends still in flight.
  void ResyncPlan();
  void ForgetTracked(uint64_t seq);  // plan_mu_ held
  void TouchNow();
  // Logs the token an Attend call is about to complete in every layer (journal attached).
  Status LogCompletingToken(const AttendArgs& a);

  const uint64_t id_;
  const std::string tenant_;
  const ModelProfile profile_;
  const SessionOptions options_;
  KVPool* const pool_;
  const uint32_t tail_capacity_;

  index::Chunker chunker_;
  std::vector<Chunk> chunks_;
  std::vector<index::ClusterTree> trees_;  // [layer * kv_heads + head]
  bool index_enabled_ = false;
  bool index_all_heads_ = false;           // false: only retrieval heads' trees (hybrid)
  std::vector<Layer> layers_;
  // Modes retrieval_heads / hybrid: per KV-head index, the selection its last retrieval head
  // made (at layer `layer`). A sparse head of layer l reuses it only when layer < l, i.e. it was
  // made earlier in the same decode pass; otherwise (none yet, or made at or after l in an
  // earlier pass) the sparse head attends densely. Ranges are token positions, which sealing
  // never moves.
  struct KeptSelection {
    bool valid = false;
    uint32_t layer = 0;
    HeadSelection sel;
  };
  std::vector<KeptSelection> kept_;  // [kv_heads]
  uint64_t tokens_ = 0;         // tokens present in every layer
  uint32_t layers_ahead_ = 0;   // layers with pending > 0
  std::deque<uint8_t> pending_boundaries_;   // boundary of token tokens_ + k, first layer's
  std::vector<uint8_t> unsealed_boundaries_; // complete tokens not yet fed (seal failed)
  std::string boundary_log_;                  // class of every complete token (snapshots)

  // Device mirrors for the device search (CUDA pool, index mode), made on first use.
  struct DeviceIndex {
    std::vector<std::unique_ptr<kernels::cuda::DeviceTree>> trees;  // [layer * kv_heads + head]
    // Each tree's export buffers, kept from sync to sync (no allocations once warm; the large
    // row buffers of a whole export are released after it).
    std::vector<kernels::FlatTree> exports;                         // [layer * kv_heads + head]
    std::vector<uint64_t> tree_version;                             // version mirrored
    std::vector<uint64_t> table_block, table_capacity, table_len;   // per layer: pool block of
                                                                    // chunk element offsets
  };
  std::unique_ptr<DeviceIndex> device_index_;

  std::unique_ptr<SessionJournal> journal_;
  TierContext* const tiers_;
  uint64_t op_tick_ = 0;         // tick of the running op; blocks with tick >= it are in use
  uint32_t stored_marked_ = 0;   // durable: chunks [0, stored_marked_) have disk = true
  bool spilled_ = false;         // ephemeral: records in the spill family to delete at the end
  int64_t prefetch_layer_ = -1;  // layer to prefetch `prefetch_chunks_` into, or -1
  std::vector<uint32_t> prefetch_chunks_;
  std::unique_ptr<MemoryStore> memory_;
  std::mutex op_mu_;
  // Receive-plan prediction (PlanLanding): the chunker and token count after every planned
  // append, plans not yet consumed, and whether planning is allowed (host pool, not durable, no
  // misprediction since the last resync). plan_mu_ only; never held with pool locks inverted.
  std::mutex plan_mu_;
  struct Tracked {
    uint64_t seq = 0;
    uint32_t n = 0;
    std::vector<uint8_t> bounds;  // empty: all class 0
  };
  index::Chunker plan_chunker_;
  uint64_t plan_tokens_ = 0;
  uint64_t plan_seq_ = 0;
  std::deque<Tracked> plan_inflight_;  // appends planned and not yet handled, in arrival order
  bool plan_ok_ = false;
  friend struct AppendLanding;
  std::atomic<uint64_t> stat_tokens_{0};
  std::atomic<uint64_t> stat_chunks_{0};
  std::atomic<uint32_t> stat_tail_{0};
  std::atomic<uint64_t> stat_bytes_{0};
  std::atomic<uint64_t> stat_host_bytes_{0};
  std::atomic<uint64_t> stat_disk_bytes_{0};
  std::atomic<uint64_t> stat_fetched_{0};
  std::atomic<uint64_t> stat_prefetched_{0};
  std::atomic<uint64_t> stat_evicted_{0};
  std::atomic<uint64_t> created_ms_{0};
  std::atomic<uint64_t> last_used_ms_{0};
};

class ParallelPool;
// The pool that per-KV-head index searches and large appends (copies, validation) fan out over
// (nullptr: sequential). Set once at startup, before sessions exist.
void SetSearchPool(ParallelPool* pool);
// The pool an append's copy into its chunk blocks and its NaN/Inf check fan out over (nullptr:
// the search pool). A few threads: waking all of the search pool for every megabyte appended
// contended with the transport thread for cores and was slower on the 16-core GPU host
// (bench/results/transport-h200host-ab.json, "probes"). Set once at startup.
void SetAppendPool(ParallelPool* pool);
inline constexpr uint32_t kAppendCopyThreads = 2;

// Largest number of decode tokens one layer may run ahead of the slowest layer.
inline constexpr uint32_t kMaxLayerSkew = 4;

}  // namespace kvmem
