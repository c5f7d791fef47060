// kvmemctl: the operator's command line for kvmemd.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <chrono>
#include <ctime>
#include <map>
#include <sstream>
#include <thread>

#include <unistd.h>
#include <string>
#include <vector>

#include "client/client.h"
#include "client/cluster.h"
#include "common/dtype.h"
#include "common/tensor_file.h"
#include "common/head_mask.h"
#include "common/units.h"

namespace {

using kvmem::Status;
using kvmem::client::Client;
using nlohmann::json;

constexpr char kUsage[] = R"(kvmemctl - operate kvmemd

Usage: kvmemctl [--addr HOST:PORT[,HOST:PORT...]] [--token T] [--json] [--transport auto|shm|tcp] <command>

Commands:
  status                                 version, uptime, backend, GPU, memory per tier, sessions
  top [--interval S] [--iterations N] [--limit N]
                                         busiest sessions (token rate, last use), refreshed
                                         every S seconds (default 2); N = 0 runs until ^C
  ping [--count N]                       round trips, with latency
  session create --layers L --q-heads HQ --kv-heads HKV --head-dim D
                 [--dtype bf16|fp16|fp32] [--id ID] [--chunk-min N] [--chunk-max N]
                 [--sink N] [--budget N] [--label TEXT]
                 [--mode dense|index|retrieval_heads|hybrid]
                 [--retrieval-heads FILE] [--dense-layers L,L,...]
                 [--rule top_k|ratio|threshold|top_p] [--rule-value X]
                 [--block-tokens N] [--block-pooling max|mean]
                 [--durability ephemeral|durable]
                                         prints the new session id. --retrieval-heads reads
                                         the retrieval-head mask [layers x KV heads] (and
                                         optional dense layers) from a .json,
                                         .safetensors or .npy file
                                         (docs/operations.md, "Hybrid heads")
  session list                           sessions of this tenant
  session show ID                        one session with per-layer detail
  session drop ID                        drop a session and free its memory (and its
                                         stored records when durable)
  session verify ID                      re-read every stored chunk of a durable session and
                                         check checksums; exit 1 when a record is bad
  session evict ID [--to host|disk]      move every evictable block (not sinks, the recent
                                         window or the tail) out of the device tier: to the
                                         host tier while it has room, or to RocksDB (default)
  session snapshot ID NAME               durable point-in-time copy of a session under NAME
  session restore NAME --id ID [--durability ephemeral|durable]
                                         a new session ID from snapshot NAME
  session snapshot-drop NAME             delete a snapshot
  session create ... [--memory-gate-dim DG --memory-rows M --memory-dim DM
                 [--memory-dtype bf16|fp16|fp32] [--memory-gate GATE] [--memory-scorer FILE]]
                                         a session that keeps memory blocks (GATE: tree_exact,
                                         tree_budget, linear, scorer)
  memory list ID [--after BLOCK] [--limit N]
                                         memory blocks of a session (id, span, label)
  memory put ID --keys FILE --payloads FILE [--spans FILE] [--labels A,B,...]
                                         add blocks: gate keys [n, DG], payloads [n, M, DM],
                                         spans [n, 2] integers (default [0, 0)); FILE is .npy or
                                         safetensors (tensor gate_keys / payloads / spans, or its
                                         only tensor); prints the new block ids
  memory select ID (--query FILE | --query-values V,V,...) [--k N] [--gate GATE]
                 [--budget-leaves N]     top-k blocks for a gate query [DG]
  memory drop ID BLOCK [BLOCK...]        drop blocks (all or nothing)

Options:
  --addr ADDRS       daemon address(es) (default 127.0.0.1:7420, or $KVMEM_ADDR): a comma
                     list and/or DNS names with many records (a headless Service); sessions
                     are placed by rendezvous hashing of their id, `session list` merges all
  --token T          tenant token (or $KVMEM_TOKEN)
  --json             machine-readable output
Exit status: 0 on success, 1 when the daemon returned an error, 2 on usage errors.
)";

int Usage(const std::string& msg) {
  std::fprintf(stderr, "kvmemctl: %s\n(see kvmemctl --help)\n", msg.c_str());
  return 2;
}

int Report(const Status& s, bool as_json) {
  if (as_json) {
    json j = {{"error", {{"code", std::string(kvmem::StatusCodeName(s.code()))}, {"message", s.message()}}}};
    std::printf("%s\n", j.dump().c_str());
  }
  std::fprintf(stderr, "kvmemctl: %s\n", s.ToString().c_str());
  return 1;
}

std::string ModeName(kvmem::client::Mode m) {
  switch (m) {
    case kvmem::client::Mode::kDense: return "dense";
    case kvmem::client::Mode::kIndex: return "index";
    case kvmem::client::Mode::kRetrievalHeads: return "retrieval_heads";
    case kvmem::client::Mode::kHybrid: return "hybrid";
    default: return "default";
  }
}

const char* RuleName(kvmem::client::SelectionRule r) {
  switch (r) {
    case kvmem::client::SelectionRule::kTopK: return "top_k";
    case kvmem::client::SelectionRule::kRatio: return "ratio";
    case kvmem::client::SelectionRule::kThreshold: return "threshold";
    case kvmem::client::SelectionRule::kTopP: return "top_p";
    default: return "default";
  }
}

// Retrieval heads marked in the profile's mask.
size_t RetrievalHeads(const kvmem::client::Profile& p) {
  return static_cast<size_t>(std::count_if(p.retrieval_head_mask.begin(), p.retrieval_head_mask.end(),
                                           [](uint8_t m) { return m != 0; }));
}

json SummaryJson(const kvmem::client::SessionSummary& s) {
  json j = {{"id", s.id},
            {"tenant", s.tenant},
            {"layers", s.profile.layers},
            {"q_heads", s.profile.q_heads},
            {"kv_heads", s.profile.kv_heads},
            {"head_dim", s.profile.head_dim},
            {"dtype", std::string(kvmem::DTypeName(s.profile.dtype))},
            {"tokens", s.tokens},
            {"chunks", s.chunks},
            {"tail_tokens", s.tail_tokens},
            {"mean_chunk_tokens", s.mean_chunk_tokens},
            {"bytes", s.bytes},
            {"mode", ModeName(s.options.mode)},
            {"durable", s.options.durable},
            {"label", s.options.label},
            {"created_unix_ms", s.created_unix_ms},
            {"last_used_unix_ms", s.last_used_unix_ms},
            {"dense_layers", s.profile.dense_layers},
            {"retrieval_heads", RetrievalHeads(s.profile)},
            {"retrieval", {{"rule", RuleName(s.options.retrieval.rule)},
                           {"rule_value", s.options.retrieval.rule_value},
                           {"block_tokens", s.options.retrieval.block_tokens},
                           {"block_pooling", s.options.retrieval.pooling == kvmem::client::BlockPooling::kMean
                                                 ? "mean" : "max"}}},
            {"host_bytes", s.host_bytes},
            {"disk_bytes", s.disk_bytes},
            {"fetched_blocks", s.fetched_blocks},
            {"prefetched_blocks", s.prefetched_blocks},
            {"evicted_blocks", s.evicted_blocks},
            {"memory_blocks", s.memory_blocks},
            {"memory_bytes", s.memory_bytes}};
  if (!s.layers.empty()) {
    json layers = json::array();
    for (const auto& l : s.layers) {
      layers.push_back({{"layer", l.layer}, {"tokens", l.tokens}, {"tree_depth", l.tree_depth},
                        {"tree_nodes", l.tree_nodes}});
    }
    j["layer_info"] = layers;
  }
  return j;
}

// Flags of the form --name VALUE after the command words.
struct Args {
  std::vector<std::string> words;
  std::vector<std::pair<std::string, std::string>> flags;
  const std::string* Get(const std::string& name) const {
    for (const auto& [k, v] : flags)
      if (k == name) return &v;
    return nullptr;
  }
};

bool ParseU64(const std::string& s, uint64_t* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  *out = std::strtoull(s.c_str(), &end, 10);
  return *end == '\0';
}


// --- memory commands ---

// The tensor `name` of a safetensors file, or the only tensor of a .npy / one-tensor file.
kvmem::Result<const kvmem::FileTensor*> PickTensor(const kvmem::TensorFile& f, const std::string& name) {
  if (f.format() == kvmem::TensorFile::Format::kNpy || f.tensors().size() == 1) return &f.tensors()[0];
  return f.Find(name);
}

std::vector<uint64_t> IntegersOf(const kvmem::FileTensor& t, Status* st) {
  std::vector<uint64_t> out(t.elements());
  const auto* p = reinterpret_cast<const unsigned char*>(t.data.data());
  auto le = [&](size_t i, size_t w) {
    uint64_t v = 0;
    for (size_t b = w; b-- > 0;) v = (v << 8) | p[i * w + b];
    return v;
  };
  for (size_t i = 0; i < out.size(); ++i) {
    switch (t.dtype) {
      case kvmem::FileDType::kU64: out[i] = le(i, 8); break;
      case kvmem::FileDType::kU32: out[i] = le(i, 4); break;
      case kvmem::FileDType::kI64: {
        const int64_t v = static_cast<int64_t>(le(i, 8));
        if (v < 0) *st = kvmem::InvalidArgument("spans: negative token position");
        out[i] = static_cast<uint64_t>(v);
        break;
      }
      case kvmem::FileDType::kI32: {
        const int32_t v = static_cast<int32_t>(le(i, 4));
        if (v < 0) *st = kvmem::InvalidArgument("spans: negative token position");
        out[i] = static_cast<uint64_t>(v);
        break;
      }
      default:
        *st = kvmem::InvalidArgument("spans: need an integer tensor (I64, I32, U64, U32), got " +
                                     std::string(kvmem::FileDTypeName(t.dtype)));
        return {};
    }
  }
  return out;
}

std::string GateName(kvmem::client::MemoryGate g) {
  switch (g) {
    case kvmem::client::MemoryGate::kTreeExact: return "tree_exact";
    case kvmem::client::MemoryGate::kTreeBudget: return "tree_budget";
    case kvmem::client::MemoryGate::kLinearScan: return "linear";
    case kvmem::client::MemoryGate::kScorer: return "scorer";
    default: return "default";
  }
}

bool ParseGate(const std::string& s, kvmem::client::MemoryGate* g) {
  for (auto c : {kvmem::client::MemoryGate::kTreeExact, kvmem::client::MemoryGate::kTreeBudget,
                 kvmem::client::MemoryGate::kLinearScan, kvmem::client::MemoryGate::kScorer}) {
    if (GateName(c) == s) {
      *g = c;
      return true;
    }
  }
  return false;
}

json BlockJson(const kvmem::client::MemoryBlockInfo& b) {
  return {{"id", b.id}, {"span_start", b.span_start}, {"span_end", b.span_end}, {"label", b.label}};
}

void PrintBlocks(const std::vector<kvmem::client::MemoryBlockInfo>& blocks, const std::vector<float>* scores) {
  std::printf("%-12s %s%14s %14s  %s\n", "BLOCK", scores ? "      SCORE " : "", "SPAN_START", "SPAN_END", "LABEL");
  for (size_t i = 0; i < blocks.size(); ++i) {
    const auto& b = blocks[i];
    if (scores) {
      std::printf("%-12llu %11.4f %14llu %14llu  %s\n", static_cast<unsigned long long>(b.id), (*scores)[i],
                  static_cast<unsigned long long>(b.span_start), static_cast<unsigned long long>(b.span_end),
                  b.label.c_str());
    } else {
      std::printf("%-12llu %14llu %14llu  %s\n", static_cast<unsigned long long>(b.id),
                  static_cast<unsigned long long>(b.span_start), static_cast<unsigned long long>(b.span_end),
                  b.label.c_str());
    }
  }
}

// `memory list|put|select|drop ID ...` against the daemon that owns the session.
int RunMemory(const Args& args, bool as_json, uint64_t id, Client* c) {
  const std::string& sub = args.words[1];
  if (sub == "list") {
    uint64_t after = 0, limit = 1000;
    if (const std::string* v = args.Get("--after"); v && !ParseU64(*v, &after)) return Usage("--after must be an integer");
    if (const std::string* v = args.Get("--limit"); v && (!ParseU64(*v, &limit) || limit == 0 || limit > 100000)) {
      return Usage("--limit must be in 1..100000");
    }
    auto l = c->ListMemoryBlocks(id, after, static_cast<uint32_t>(limit));
    if (!l.ok()) return Report(l.status(), as_json);
    if (as_json) {
      json blocks = json::array();
      for (const auto& b : l->blocks) blocks.push_back(BlockJson(b));
      std::printf("%s\n", json({{"blocks", blocks}, {"total_blocks", l->total_blocks}, {"bytes", l->bytes},
                                {"gate_dim", l->options.gate_dim}, {"payload_rows", l->options.payload_rows},
                                {"payload_dim", l->options.payload_dim},
                                {"payload_dtype", std::string(kvmem::DTypeName(l->options.payload_dtype))},
                                {"default_gate", GateName(l->options.default_gate)}})
                              .dump()
                              .c_str());
    } else {
      std::printf("%llu blocks, %s of payloads; gate keys [%u], payloads [%u x %u] %s, default gate %s\n",
                  static_cast<unsigned long long>(l->total_blocks), kvmem::FormatBytes(l->bytes).c_str(),
                  l->options.gate_dim, l->options.payload_rows, l->options.payload_dim,
                  std::string(kvmem::DTypeName(l->options.payload_dtype)).c_str(),
                  GateName(l->options.default_gate).c_str());
      PrintBlocks(l->blocks, nullptr);
    }
    return 0;
  }
  if (sub == "drop") {
    std::vector<uint64_t> ids;
    for (size_t i = 3; i < args.words.size(); ++i) {
      uint64_t b = 0;
      if (!ParseU64(args.words[i], &b)) return Usage("memory drop: block ids must be integers");
      ids.push_back(b);
    }
    if (ids.empty()) return Usage("memory drop needs block ids");
    auto left = c->DropMemoryBlocks(id, ids);
    if (!left.ok()) return Report(left.status(), as_json);
    if (as_json) std::printf("%s\n", json({{"dropped", ids.size()}, {"blocks", *left}}).dump().c_str());
    else std::printf("dropped %zu blocks, %llu left\n", ids.size(), static_cast<unsigned long long>(*left));
    return 0;
  }
  // put and select need the session's geometry.
  auto geo = c->ListMemoryBlocks(id, ~0ull, 1);
  if (!geo.ok()) return Report(geo.status(), as_json);
  const kvmem::client::MemoryOptions& o = geo->options;
  if (sub == "put") {
    const std::string* kf = args.Get("--keys");
    const std::string* pf = args.Get("--payloads");
    if (!kf || !pf) return Usage("memory put needs --keys FILE and --payloads FILE");
    auto keys_file = kvmem::TensorFile::Open(*kf);
    if (!keys_file.ok()) return Report(keys_file.status(), as_json);
    auto kt = PickTensor(*keys_file, "gate_keys");
    if (!kt.ok()) return Report(kt.status(), as_json);
    auto pay_file = kvmem::TensorFile::Open(*pf);
    if (!pay_file.ok()) return Report(pay_file.status(), as_json);
    auto pt = PickTensor(*pay_file, "payloads");
    if (!pt.ok()) return Report(pt.status(), as_json);
    if ((*kt)->shape.size() != 2 || (*kt)->shape[1] != o.gate_dim) {
      return Report(kvmem::InvalidArgument(*kf + ": gate keys must be [n, " + std::to_string(o.gate_dim) + "]"), as_json);
    }
    const uint64_t n = (*kt)->shape[0];
    if ((*pt)->shape != std::vector<uint64_t>{n, o.payload_rows, o.payload_dim}) {
      return Report(kvmem::InvalidArgument(*pf + ": payloads must be [" + std::to_string(n) + ", " +
                                           std::to_string(o.payload_rows) + ", " + std::to_string(o.payload_dim) + "]"),
                    as_json);
    }
    std::vector<float> keys = (*kt)->ToFloat();
    std::vector<float> pay = (*pt)->ToFloat();
    std::vector<uint8_t> pay_bytes(pay.size() * kvmem::DTypeSize(o.payload_dtype));
    kvmem::ConvertFromFloat(pay.data(), pay.size(), o.payload_dtype, pay_bytes.data());
    kvmem::client::MemoryBlocksToPut put;
    put.gate_keys = kvmem::client::TensorView{keys.data(), kvmem::DType::kF32, {n, o.gate_dim}};
    put.payloads = kvmem::client::TensorView{pay_bytes.data(), o.payload_dtype, {n, o.payload_rows, o.payload_dim}};
    put.span_starts.assign(n, 0);
    put.span_ends.assign(n, 0);
    if (const std::string* sf = args.Get("--spans")) {
      auto spans_file = kvmem::TensorFile::Open(*sf);
      if (!spans_file.ok()) return Report(spans_file.status(), as_json);
      auto st = PickTensor(*spans_file, "spans");
      if (!st.ok()) return Report(st.status(), as_json);
      if ((*st)->shape != std::vector<uint64_t>{n, 2}) {
        return Report(kvmem::InvalidArgument(*sf + ": spans must be [" + std::to_string(n) + ", 2]"), as_json);
      }
      Status s;
      std::vector<uint64_t> v = IntegersOf(**st, &s);
      if (!s.ok()) return Report(s.WithContext(*sf), as_json);
      for (uint64_t i = 0; i < n; ++i) {
        put.span_starts[i] = v[2 * i];
        put.span_ends[i] = v[2 * i + 1];
      }
    }
    if (const std::string* lv = args.Get("--labels")) {
      std::string cur;
      for (char ch : *lv + ",") {
        if (ch == ',') {
          put.labels.push_back(cur);
          cur.clear();
        } else {
          cur.push_back(ch);
        }
      }
      if (put.labels.size() != n) return Usage("--labels needs one label per block");
    }
    auto r = c->PutMemoryBlocks(id, put);
    if (!r.ok()) return Report(r.status(), as_json);
    if (as_json) {
      std::printf("%s\n", json({{"ids", r->ids}, {"blocks", r->blocks}, {"bytes", r->bytes}}).dump().c_str());
    } else {
      std::printf("added %zu blocks (ids %llu..%llu); session holds %llu blocks, %s\n", r->ids.size(),
                  static_cast<unsigned long long>(r->ids.front()), static_cast<unsigned long long>(r->ids.back()),
                  static_cast<unsigned long long>(r->blocks), kvmem::FormatBytes(r->bytes).c_str());
    }
    return 0;
  }
  if (sub == "select") {
    std::vector<float> q;
    if (const std::string* qf = args.Get("--query")) {
      auto f = kvmem::TensorFile::Open(*qf);
      if (!f.ok()) return Report(f.status(), as_json);
      auto t = PickTensor(*f, "query");
      if (!t.ok()) return Report(t.status(), as_json);
      q = (*t)->ToFloat();
    } else if (const std::string* qv = args.Get("--query-values")) {
      std::string cur;
      for (char ch : *qv + ",") {
        if (ch != ',') {
          cur.push_back(ch);
          continue;
        }
        char* end = nullptr;
        const float x = std::strtof(cur.c_str(), &end);
        if (cur.empty() || *end) return Usage("--query-values must be comma-separated numbers");
        q.push_back(x);
        cur.clear();
      }
    } else {
      return Usage("memory select needs --query FILE or --query-values V,V,...");
    }
    if (q.size() != o.gate_dim) {
      return Report(kvmem::InvalidArgument("query has " + std::to_string(q.size()) + " values, the session's gate keys " +
                                           std::to_string(o.gate_dim)),
                    as_json);
    }
    uint64_t k = 10, budget = 0;
    if (const std::string* v = args.Get("--k"); v && (!ParseU64(*v, &k) || k == 0)) return Usage("--k must be a positive integer");
    if (const std::string* v = args.Get("--budget-leaves"); v && !ParseU64(*v, &budget)) {
      return Usage("--budget-leaves must be an integer");
    }
    kvmem::client::MemoryGate gate = kvmem::client::MemoryGate::kDefault;
    if (const std::string* v = args.Get("--gate"); v && !ParseGate(*v, &gate)) {
      return Usage("--gate must be tree_exact, tree_budget, linear or scorer");
    }
    auto r = c->SelectMemory(id, kvmem::client::TensorView{q.data(), kvmem::DType::kF32, {q.size()}},
                             static_cast<uint32_t>(k), gate, static_cast<uint32_t>(budget), false);
    if (!r.ok()) return Report(r.status(), as_json);
    if (as_json) {
      json blocks = json::array();
      for (size_t i = 0; i < r->blocks.size(); ++i) {
        json b = BlockJson(r->blocks[i]);
        b["score"] = r->scores[i];
        blocks.push_back(b);
      }
      std::printf("%s\n", json({{"blocks", blocks}, {"exact", r->exact}, {"keys_scored", r->keys_scored},
                                {"leaves_visited", r->leaves_visited}})
                              .dump()
                              .c_str());
    } else {
      PrintBlocks(r->blocks, &r->scores);
      std::printf("(%s; %llu keys scored in %llu leaves)\n", r->exact ? "exact" : "approximate",
                  static_cast<unsigned long long>(r->keys_scored),
                  static_cast<unsigned long long>(r->leaves_visited));
    }
    return 0;
  }
  return Usage("unknown memory command '" + sub + "'");
}

}  // namespace

int main(int argc, char** argv) {
  std::string addr = std::getenv("KVMEM_ADDR") ? std::getenv("KVMEM_ADDR") : "127.0.0.1:7420";
  kvmem::client::ClientOptions opts;
  if (const char* t = std::getenv("KVMEM_TOKEN")) opts.token = t;
  opts.client_name = "kvmemctl";
  bool as_json = false;
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (a == "--json") {
      as_json = true;
      continue;
    }
    if (a.rfind("--", 0) == 0) {
      std::string value;
      const size_t eq = a.find('=');
      if (eq != std::string::npos) {
        value = a.substr(eq + 1);
        a = a.substr(0, eq);
      } else {
        if (i + 1 >= argc) return Usage("option " + a + " needs a value");
        value = argv[++i];
      }
      if (a == "--addr") addr = value;
      else if (a == "--token") opts.token = value;
      else if (a == "--transport") opts.transport = value;
      else args.flags.emplace_back(a, value);
      continue;
    }
    args.words.push_back(a);
  }
  if (args.words.empty()) return Usage("no command given");

  const std::string cmd = args.words[0];
  const std::string sub = args.words.size() > 1 ? args.words[1] : "";
  const bool known = cmd == "status" || cmd == "ping" || cmd == "top" ||
                     (cmd == "session" && (sub == "create" || sub == "list" || sub == "show" || sub == "drop" ||
                                           sub == "verify" || sub == "evict" || sub == "snapshot" ||
                                           sub == "restore" || sub == "snapshot-drop")) ||
                     (cmd == "memory" && (sub == "list" || sub == "put" || sub == "select" || sub == "drop"));
  if (!known) return Usage("unknown command '" + cmd + (sub.empty() ? "" : " " + sub) + "'");

  // Validate flags before connecting, so usage errors do not need a daemon.
  kvmem::client::Profile profile;
  kvmem::client::SessionOptions sopts;
  uint64_t id = 0;
  if (cmd == "session" && sub == "create") {
    auto need = [&](const char* name, uint32_t* out) -> bool {
      const std::string* v = args.Get(name);
      uint64_t x = 0;
      if (v == nullptr || !ParseU64(*v, &x) || x == 0 || x > 0xffffffffu) return false;
      *out = static_cast<uint32_t>(x);
      return true;
    };
    if (!need("--layers", &profile.layers)) return Usage("session create needs --layers N (N > 0)");
    if (!need("--q-heads", &profile.q_heads)) return Usage("session create needs --q-heads N");
    if (!need("--kv-heads", &profile.kv_heads)) return Usage("session create needs --kv-heads N");
    if (!need("--head-dim", &profile.head_dim)) return Usage("session create needs --head-dim N");
    if (const std::string* d = args.Get("--dtype")) {
      auto dt = kvmem::ParseDType(*d);
      if (!dt) return Usage("--dtype must be bf16, fp16 or fp32");
      profile.dtype = *dt;
    }
    if (const std::string* v = args.Get("--id"); v && !ParseU64(*v, &id)) return Usage("--id must be an integer");
    uint32_t x = 0;
    if (args.Get("--chunk-min") && need("--chunk-min", &x)) sopts.chunk_min_tokens = x;
    if (args.Get("--chunk-max") && need("--chunk-max", &x)) sopts.chunk_max_tokens = x;
    if (args.Get("--budget") && need("--budget", &x)) sopts.default_budget_tokens = x;
    if (const std::string* v = args.Get("--sink")) {
      uint64_t s = 0;
      if (!ParseU64(*v, &s)) return Usage("--sink must be an integer");
      sopts.sink_tokens = static_cast<uint32_t>(s);
    }
    if (const std::string* v = args.Get("--label")) sopts.label = *v;
    if (const std::string* v = args.Get("--mode")) {
      if (*v == "dense") sopts.mode = kvmem::client::Mode::kDense;
      else if (*v == "index") sopts.mode = kvmem::client::Mode::kIndex;
      else if (*v == "retrieval_heads") sopts.mode = kvmem::client::Mode::kRetrievalHeads;
      else if (*v == "hybrid") sopts.mode = kvmem::client::Mode::kHybrid;
      else return Usage("--mode must be dense, index, retrieval_heads or hybrid");
    }
    if (const std::string* v = args.Get("--dense-layers")) {
      profile.dense_layers.clear();
      std::stringstream ss(*v);
      std::string item;
      while (std::getline(ss, item, ',')) {
        uint64_t l = 0;
        if (!ParseU64(item, &l) || l >= profile.layers) {
          return Usage("--dense-layers must list layer numbers below --layers, e.g. 0,1");
        }
        profile.dense_layers.push_back(static_cast<uint32_t>(l));
      }
    }
    if (const std::string* v = args.Get("--retrieval-heads")) {
      auto mask = kvmem::LoadHeadMaskFile(*v);
      if (!mask.ok()) return Report(mask.status(), as_json);
      if (kvmem::Status st = kvmem::CheckHeadMaskShape(*mask, profile.layers, profile.kv_heads, *v);
          !st.ok()) {
        return Report(st, as_json);
      }
      profile.retrieval_head_mask = mask->mask;
      if (mask->dense_layers && !args.Get("--dense-layers")) profile.dense_layers = *mask->dense_layers;
    }
    if (const std::string* v = args.Get("--rule")) {
      using R = kvmem::client::SelectionRule;
      if (*v == "top_k") sopts.retrieval.rule = R::kTopK;
      else if (*v == "ratio") sopts.retrieval.rule = R::kRatio;
      else if (*v == "threshold") sopts.retrieval.rule = R::kThreshold;
      else if (*v == "top_p") sopts.retrieval.rule = R::kTopP;
      else return Usage("--rule must be top_k, ratio, threshold or top_p");
    }
    if (const std::string* v = args.Get("--rule-value")) {
      char* end = nullptr;
      const float f = std::strtof(v->c_str(), &end);
      if (v->empty() || *end != '\0' || !(f > 0)) return Usage("--rule-value must be a positive number");
      sopts.retrieval.rule_value = f;
    }
    if (args.Get("--block-tokens") && need("--block-tokens", &x)) sopts.retrieval.block_tokens = x;
    if (const std::string* v = args.Get("--block-pooling")) {
      if (*v == "max") sopts.retrieval.pooling = kvmem::client::BlockPooling::kMax;
      else if (*v == "mean") sopts.retrieval.pooling = kvmem::client::BlockPooling::kMean;
      else return Usage("--block-pooling must be max or mean");
    }
    if (const std::string* v = args.Get("--durability")) {
      if (*v == "durable") sopts.durable = true;
      else if (*v == "ephemeral") sopts.durable = false;
      else return Usage("--durability must be ephemeral or durable");
    }
    if (args.Get("--memory-gate-dim")) {
      if (!need("--memory-gate-dim", &sopts.memory.gate_dim) || !need("--memory-rows", &sopts.memory.payload_rows) ||
          !need("--memory-dim", &sopts.memory.payload_dim)) {
        return Usage("memory blocks need --memory-gate-dim, --memory-rows and --memory-dim (all > 0)");
      }
      if (const std::string* d = args.Get("--memory-dtype")) {
        auto dt = kvmem::ParseDType(*d);
        if (!dt) return Usage("--memory-dtype must be bf16, fp16 or fp32");
        sopts.memory.payload_dtype = *dt;
      }
      if (const std::string* g = args.Get("--memory-gate"); g && !ParseGate(*g, &sopts.memory.default_gate)) {
        return Usage("--memory-gate must be tree_exact, tree_budget, linear or scorer");
      }
      if (const std::string* f = args.Get("--memory-scorer")) sopts.memory.scorer_file = *f;
    }
  }
  if (cmd == "memory") {
    if (args.words.size() < 3 || !ParseU64(args.words[2], &id)) return Usage("memory " + sub + " needs a session ID");
  }
  if (cmd == "session" && (sub == "show" || sub == "drop" || sub == "verify" || sub == "evict" || sub == "snapshot")) {
    if (args.words.size() < 3 || !ParseU64(args.words[2], &id)) return Usage("session " + sub + " needs a session ID");
  }

  auto cluster_or = kvmem::client::Cluster::Connect(addr, opts);
  if (!cluster_or.ok()) return Report(cluster_or.status(), as_json);
  kvmem::client::Cluster& cluster = **cluster_or;
  if (cmd == "session" && (sub == "restore" || sub == "snapshot-drop")) {
    if (args.words.size() < 3) return Usage("session " + sub + " needs a snapshot NAME");
    const std::string name = args.words[2];
    if (sub == "snapshot-drop") {
      // A snapshot lives on the daemon that held its session: try each until one has it.
      Status s = kvmem::NotFound("snapshot '" + name + "' not found");
      for (size_t i = 0; i < cluster.addresses().size() && s.code() == kvmem::StatusCode::kNotFound; ++i) {
        auto c = cluster.At(i);
        s = c.ok() ? (*c)->DropSnapshot(name) : c.status();
      }
      if (!s.ok()) return Report(s, as_json);
      if (as_json) std::printf("%s\n", json({{"dropped", name}}).dump().c_str());
      else std::printf("dropped snapshot %s\n", name.c_str());
      return 0;
    }
    uint64_t new_id = 0;
    if (!args.Get("--id") || !ParseU64(*args.Get("--id"), &new_id) || new_id == 0) {
      return Usage("session restore needs --id ID (nonzero)");
    }
    const std::string dur = args.Get("--durability") ? *args.Get("--durability") : "ephemeral";
    if (dur != "ephemeral" && dur != "durable") return Usage("--durability must be ephemeral or durable");
    // Restored on the daemon the new id places on (it must hold the snapshot).
    auto owner = cluster.For(new_id);
    if (!owner.ok()) return Report(owner.status(), as_json);
    auto r = (*owner)->Restore(name, new_id, dur == "durable");
    if (!r.ok()) return Report(r.status(), as_json);
    if (as_json) {
      std::printf("%s\n", json({{"id", r->id}, {"tokens", r->tokens}, {"chunks", r->chunks}}).dump().c_str());
    } else {
      std::printf("restored snapshot %s as session %llu (%llu tokens, %llu chunks)\n", name.c_str(),
                  static_cast<unsigned long long>(r->id), static_cast<unsigned long long>(r->tokens),
                  static_cast<unsigned long long>(r->chunks));
    }
    return 0;
  }
  const auto& daemons = cluster.addresses();
  if (cmd == "memory") {
    auto owner = cluster.For(id);  // the daemon the session's id places it on
    if (!owner.ok()) return Report(owner.status(), as_json);
    return RunMemory(args, as_json, id, *owner);
  }

  if (cmd == "status") {
    json all = json::array();
    int rc = 0;
    for (size_t i = 0; i < daemons.size(); ++i) {
      auto c = cluster.At(i);
      auto sessions = c.ok() ? (*c)->ListSessions() : kvmem::Result<std::vector<kvmem::client::SessionSummary>>(c.status());
      if (!sessions.ok()) {
        if (daemons.size() == 1) return Report(sessions.status(), as_json);
        std::fprintf(stderr, "kvmemctl: %s: %s\n", daemons[i].c_str(), sessions.status().ToString().c_str());
        all.push_back({{"address", daemons[i]}, {"error", sessions.status().ToString()}});
        rc = 1;
        continue;
      }
      const kvmem::client::ServerInfo& si = (*c)->server();
      uint64_t tokens = 0, bytes = 0;
      for (const auto& s : *sessions) {
        tokens += s.tokens;
        bytes += s.bytes;
      }
      json tiers = json::array();
      for (const auto& t : si.tiers) {
        tiers.push_back({{"tier", t.tier}, {"capacity_bytes", t.capacity_bytes}, {"used_bytes", t.used_bytes},
                         {"chunks", t.chunks}});
      }
      json j = {{"address", daemons.size() == 1 ? addr : daemons[i]},
                {"server_version", si.server_version},
                {"backend", si.backend},
                {"gpu", si.gpu.empty() ? "none" : si.gpu},
                {"uptime_seconds", si.uptime_ms / 1000.0},
                {"tenant", si.tenant},
                {"sessions", sessions->size()},
                {"sessions_all_tenants", si.sessions_total},
                {"tokens", tokens},
                {"bytes", bytes},
                {"tiers", tiers}};
      if (as_json) {
        all.push_back(j);
        continue;
      }
      const uint64_t up = si.uptime_ms / 1000;
      std::printf("%sdaemon     %s at %s\nuptime     %llud %02lluh %02llum %02llus\nbackend    %s\ngpu        %s\n"
                  "tenant     %s\nsessions   %zu (all tenants: %llu)\ntokens     %llu\nmemory     %s\n",
                  i ? "\n" : "", si.server_version.c_str(), j["address"].get<std::string>().c_str(),
                  static_cast<unsigned long long>(up / 86400), static_cast<unsigned long long>(up / 3600 % 24),
                  static_cast<unsigned long long>(up / 60 % 60), static_cast<unsigned long long>(up % 60),
                  si.backend.c_str(), j["gpu"].get<std::string>().c_str(), si.tenant.c_str(), sessions->size(),
                  static_cast<unsigned long long>(si.sessions_total), static_cast<unsigned long long>(tokens),
                  kvmem::FormatBytes(bytes).c_str());
      for (const auto& t : si.tiers) {
        std::printf("  %-8s %10s used of %10s, %llu chunks\n", t.tier.c_str(), kvmem::FormatBytes(t.used_bytes).c_str(),
                    kvmem::FormatBytes(t.capacity_bytes).c_str(), static_cast<unsigned long long>(t.chunks));
      }
    }
    if (as_json) std::printf("%s\n", (daemons.size() == 1 && !all.empty() ? all[0] : json({{"daemons", all}})).dump().c_str());
    return rc;
  }
  if (cmd == "ping") {
    uint64_t count = 5;
    if (const std::string* v = args.Get("--count"); v && (!ParseU64(*v, &count) || count == 0)) {
      return Usage("--count must be a positive integer");
    }
    json all = json::array();
    for (size_t d = 0; d < daemons.size(); ++d) {
      auto c = cluster.At(d);
      if (!c.ok()) return Report(c.status(), as_json);
      std::vector<double> us;
      for (uint64_t i = 0; i < count; ++i) {
        auto t0 = std::chrono::steady_clock::now();
        Status s = (*c)->Ping(i);
        auto t1 = std::chrono::steady_clock::now();
        if (!s.ok()) return Report(s, as_json);
        us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      }
      std::sort(us.begin(), us.end());
      const double p50 = us[us.size() / 2];
      const std::string where = daemons.size() == 1 ? addr : daemons[d];
      if (as_json) {
        all.push_back({{"address", where}, {"count", count}, {"rtt_p50_us", p50}, {"rtt_min_us", us.front()},
                       {"rtt_max_us", us.back()}});
      } else {
        std::printf("%llu pings to %s: min %.1f us, median %.1f us, max %.1f us\n",
                    static_cast<unsigned long long>(count), where.c_str(), us.front(), p50, us.back());
      }
    }
    if (as_json) {
      json j = all.size() == 1 ? all[0] : json({{"daemons", all}});
      if (all.size() == 1) j.erase("address");
      std::printf("%s\n", j.dump().c_str());
    }
    return 0;
  }
  if (cmd == "top") {
    double interval_s = 2.0;
    uint64_t iterations = 0, limit = 20;
    if (const std::string* v = args.Get("--interval")) {
      char* end = nullptr;
      interval_s = std::strtod(v->c_str(), &end);
      if (*end || interval_s <= 0) return Usage("--interval must be a positive number of seconds");
    }
    if (const std::string* v = args.Get("--iterations"); v && !ParseU64(*v, &iterations)) {
      return Usage("--iterations must be an integer (0: until interrupted)");
    }
    if (const std::string* v = args.Get("--limit"); v && (!ParseU64(*v, &limit) || limit == 0)) {
      return Usage("--limit must be a positive integer");
    }
    std::map<std::pair<std::string, uint64_t>, uint64_t> prev_tokens;
    auto prev_time = std::chrono::steady_clock::now();
    const bool tty = isatty(STDOUT_FILENO) && !as_json;
    for (uint64_t it = 0; iterations == 0 || it < iterations; ++it) {
      if (it > 0) std::this_thread::sleep_for(std::chrono::duration<double>(interval_s));
      auto listing = cluster.ListSessions();
      if (!listing.ok()) return Report(listing.status(), as_json);
      const auto now = std::chrono::steady_clock::now();
      const double dt = std::max(1e-3, std::chrono::duration<double>(now - prev_time).count());
      prev_time = now;
      struct Row {
        const kvmem::client::ClusterSession* cs;
        double tokens_per_s;
      };
      std::vector<Row> rows;
      std::map<std::pair<std::string, uint64_t>, uint64_t> cur;
      for (const auto& cs : listing->sessions) {
        const auto key = std::make_pair(cs.address, cs.session.id);
        cur[key] = cs.session.tokens;
        auto p = prev_tokens.find(key);
        const double rate = (it == 0 || p == prev_tokens.end() || cs.session.tokens < p->second)
                                ? 0.0
                                : static_cast<double>(cs.session.tokens - p->second) / dt;
        rows.push_back({&cs, rate});
      }
      prev_tokens.swap(cur);
      // Busiest first: token growth rate, then most recently used, then size.
      std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
        if (a.tokens_per_s != b.tokens_per_s) return a.tokens_per_s > b.tokens_per_s;
        if (a.cs->session.last_used_unix_ms != b.cs->session.last_used_unix_ms)
          return a.cs->session.last_used_unix_ms > b.cs->session.last_used_unix_ms;
        return a.cs->session.tokens > b.cs->session.tokens;
      });
      if (rows.size() > limit) rows.resize(limit);
      const uint64_t now_ms = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                        std::chrono::system_clock::now().time_since_epoch())
                                                        .count());
      if (as_json) {
        json arr = json::array();
        for (const auto& r : rows) {
          json j = SummaryJson(r.cs->session);
          j["address"] = r.cs->address;
          j["tokens_per_s"] = r.tokens_per_s;
          arr.push_back(j);
        }
        std::printf("%s\n", json({{"iteration", it}, {"sessions_total", listing->sessions.size()}, {"top", arr}}).dump().c_str());
      } else {
        if (tty) std::printf("\033[H\033[2J");
        std::printf("kvmemctl top: %zu daemon(s), %zu session(s), every %.1fs\n", daemons.size(),
                    listing->sessions.size(), interval_s);
        for (const auto& [a, st] : listing->failures) std::printf("  %s: %s\n", a.c_str(), st.ToString().c_str());
        std::printf("%-20s %-22s %10s %10s %10s %9s  %s\n", "ID", "DAEMON", "TOKENS", "TOK/S", "MEMORY", "IDLE",
                    "LABEL");
        for (const auto& r : rows) {
          const auto& s = r.cs->session;
          const double idle = s.last_used_unix_ms && now_ms > s.last_used_unix_ms ? (now_ms - s.last_used_unix_ms) / 1000.0 : 0;
          std::printf("%-20llu %-22s %10llu %10.1f %10s %8.1fs  %s\n", static_cast<unsigned long long>(s.id),
                      r.cs->address.c_str(), static_cast<unsigned long long>(s.tokens), r.tokens_per_s,
                      kvmem::FormatBytes(s.bytes).c_str(), idle, s.options.label.c_str());
        }
      }
      std::fflush(stdout);
    }
    return 0;
  }
  if (sub == "create") {
    auto created = cluster.CreateSession(profile, sopts, id);
    if (!created.ok()) return Report(created.status(), as_json);
    if (as_json) std::printf("%s\n", json({{"id", *created}, {"address", cluster.AddressFor(*created)}}).dump().c_str());
    else std::printf("%llu\n", static_cast<unsigned long long>(*created));
    return 0;
  }
  if (sub == "list") {
    auto listing = cluster.ListSessions();
    if (!listing.ok()) return Report(listing.status(), as_json);
    for (const auto& [a, st] : listing->failures) {
      std::fprintf(stderr, "kvmemctl: %s: %s (its sessions are not listed)\n", a.c_str(), st.ToString().c_str());
    }
    if (as_json) {
      json arr = json::array();
      for (const auto& cs : listing->sessions) {
        json j = SummaryJson(cs.session);
        j["address"] = cs.address;
        arr.push_back(j);
      }
      std::printf("%s\n", json({{"sessions", arr}}).dump().c_str());
    } else {
      const bool many = daemons.size() > 1;
      std::printf("%-20s %6s %5s %5s %5s %5s %10s %8s %10s  %s%s\n", "ID", "LAYERS", "HQ", "HKV", "D", "DTYPE",
                  "TOKENS", "CHUNKS", "MEMORY", many ? "DAEMON  " : "", "LABEL");
      for (const auto& cs : listing->sessions) {
        const auto& s = cs.session;
        std::printf("%-20llu %6u %5u %5u %5u %5s %10llu %8llu %10s  %s%s%s\n", static_cast<unsigned long long>(s.id),
                    s.profile.layers, s.profile.q_heads, s.profile.kv_heads, s.profile.head_dim,
                    std::string(kvmem::DTypeName(s.profile.dtype)).c_str(),
                    static_cast<unsigned long long>(s.tokens), static_cast<unsigned long long>(s.chunks),
                    kvmem::FormatBytes(s.bytes).c_str(), many ? cs.address.c_str() : "", many ? "  " : "",
                    s.options.label.c_str());
      }
    }
    return listing->failures.empty() ? 0 : 1;
  }
  if (sub == "show") {
    auto s = cluster.SessionInfo(id);
    if (!s.ok()) return Report(s.status(), as_json);
    if (as_json) {
      std::printf("%s\n", SummaryJson(*s).dump().c_str());
    } else {
      std::printf("session      %llu (tenant %s)%s%s\n", static_cast<unsigned long long>(s->id), s->tenant.c_str(),
                  s->options.label.empty() ? "" : ", label ", s->options.label.c_str());
      std::printf("profile      %u layers, %u q heads, %u kv heads, head dim %u, %s\n", s->profile.layers,
                  s->profile.q_heads, s->profile.kv_heads, s->profile.head_dim,
                  std::string(kvmem::DTypeName(s->profile.dtype)).c_str());
      std::printf("mode         %s, sinks %u, budget %u tokens\n", ModeName(s->options.mode).c_str(),
                  s->options.sink_tokens, s->options.default_budget_tokens);
      if (s->options.mode == kvmem::client::Mode::kRetrievalHeads || s->options.mode == kvmem::client::Mode::kHybrid ||
          !s->profile.retrieval_head_mask.empty()) {
        std::printf("hybrid heads %zu retrieval heads of %zu, rule %s %.3g, blocks of %u tokens (%s)\n",
                    RetrievalHeads(s->profile), s->profile.retrieval_head_mask.size(),
                    RuleName(s->options.retrieval.rule), s->options.retrieval.rule_value,
                    s->options.retrieval.block_tokens,
                    s->options.retrieval.pooling == kvmem::client::BlockPooling::kMean ? "mean" : "max");
      }
      std::printf("tokens       %llu (%llu chunks, mean %.1f tokens; tail %u)\n",
                  static_cast<unsigned long long>(s->tokens), static_cast<unsigned long long>(s->chunks),
                  s->mean_chunk_tokens, s->tail_tokens);
      std::printf("memory       %s device, %s host, %s only in RocksDB\n", kvmem::FormatBytes(s->bytes).c_str(),
                  kvmem::FormatBytes(s->host_bytes).c_str(), kvmem::FormatBytes(s->disk_bytes).c_str());
      std::printf("tiers        %llu blocks evicted, %llu fetched back when selected, %llu prefetched\n",
                  static_cast<unsigned long long>(s->evicted_blocks),
                  static_cast<unsigned long long>(s->fetched_blocks),
                  static_cast<unsigned long long>(s->prefetched_blocks));
      if (s->options.memory.gate_dim > 0) {
        std::printf("memory blocks %llu (%s of payloads; gate keys [%u], payloads [%u x %u] %s)\n",
                    static_cast<unsigned long long>(s->memory_blocks), kvmem::FormatBytes(s->memory_bytes).c_str(),
                    s->options.memory.gate_dim, s->options.memory.payload_rows, s->options.memory.payload_dim,
                    std::string(kvmem::DTypeName(s->options.memory.payload_dtype)).c_str());
      }
      std::printf("%-6s %10s %6s  %s\n", "LAYER", "TOKENS", "DEPTH", "TREE NODES PER LEVEL");
      for (const auto& l : s->layers) {
        std::string nodes;
        for (size_t i = 0; i < l.tree_nodes.size(); ++i) nodes += (i ? " / " : "") + std::to_string(l.tree_nodes[i]);
        std::printf("%-6u %10llu %6u  %s\n", l.layer, static_cast<unsigned long long>(l.tokens), l.tree_depth,
                    nodes.empty() ? "-" : nodes.c_str());
      }
    }
    return 0;
  }
  if (sub == "verify") {
    auto owner = cluster.For(id);  // the daemon the session's id places it on
    if (!owner.ok()) return Report(owner.status(), as_json);
    auto v = (*owner)->VerifySession(id);
    if (!v.ok()) return Report(v.status(), as_json);
    if (as_json) {
      std::printf("%s\n", json({{"ok", v->ok}, {"tokens", v->tokens}, {"chunks", v->chunks},
                                {"bad", v->bad}}).dump().c_str());
    } else {
      std::printf("%s: %llu tokens, %llu chunks checked, %zu bad\n", v->ok ? "ok" : "BAD",
                  static_cast<unsigned long long>(v->tokens),
                  static_cast<unsigned long long>(v->chunks), v->bad.size());
      for (const auto& b : v->bad) std::printf("  %s\n", b.c_str());
    }
    return v->ok ? 0 : 1;
  }
  if (sub == "snapshot") {
    if (args.words.size() < 4) return Usage("session snapshot needs ID and NAME");
    auto owner = cluster.For(id);
    if (!owner.ok()) return Report(owner.status(), as_json);
    auto r = (*owner)->Snapshot(id, args.words[3]);
    if (!r.ok()) return Report(r.status(), as_json);
    if (as_json) {
      std::printf("%s\n", json({{"name", args.words[3]}, {"tokens", r->tokens}, {"chunks", r->chunks},
                                {"bytes", r->bytes}}).dump().c_str());
    } else {
      std::printf("snapshot %s: %llu tokens, %llu chunks, %s\n", args.words[3].c_str(),
                  static_cast<unsigned long long>(r->tokens), static_cast<unsigned long long>(r->chunks),
                  kvmem::FormatBytes(r->bytes).c_str());
    }
    return 0;
  }
  if (sub == "evict") {
    const std::string to = args.Get("--to") ? *args.Get("--to") : "disk";
    if (to != "host" && to != "disk") return Usage("session evict: --to must be host or disk");
    auto owner = cluster.For(id);
    if (!owner.ok()) return Report(owner.status(), as_json);
    auto e = (*owner)->EvictSession(id, to == "disk");
    if (!e.ok()) return Report(e.status(), as_json);
    if (as_json) {
      std::printf("%s\n", json({{"blocks", e->blocks}, {"bytes", e->bytes}, {"device_bytes", e->device_bytes},
                                {"host_bytes", e->host_bytes}, {"disk_bytes", e->disk_bytes}}).dump().c_str());
    } else {
      std::printf("evicted %llu blocks (%s) to %s; session now %s device, %s host, %s only in RocksDB\n",
                  static_cast<unsigned long long>(e->blocks), kvmem::FormatBytes(e->bytes).c_str(), to.c_str(),
                  kvmem::FormatBytes(e->device_bytes).c_str(), kvmem::FormatBytes(e->host_bytes).c_str(),
                  kvmem::FormatBytes(e->disk_bytes).c_str());
    }
    return 0;
  }
  if (sub == "drop") {
    Status s = cluster.DropSession(id);
    if (!s.ok()) return Report(s, as_json);
    if (as_json) std::printf("%s\n", json({{"dropped", id}}).dump().c_str());
    else std::printf("dropped %llu\n", static_cast<unsigned long long>(id));
    return 0;
  }
  return Usage("unknown command");
}
