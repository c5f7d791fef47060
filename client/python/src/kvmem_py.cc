// nanobind module kvmem._kvmem: a thin, typed layer over kvmem::client::Client.
//
// Tensors arrive as C-contiguous CPU ndarrays whose element type the Python layer has already
// matched to the session dtype (bf16 travels as uint16 bits); the dtype name rides beside them.
// Every non-OK Status raises kvmem.Error(code_name, message). Network calls release the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "client/client.h"
#include "common/dtype.h"
#include "common/status.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvmem::python {
namespace {

using client::AttendRequest;
using client::Client;
using client::Mode;
using client::TensorView;
using AnyArray = nb::ndarray<nb::c_contig, nb::device::cpu, nb::ro>;

// Carries a non-OK Status to the exception translator.
struct StatusError {
  Status status;
};

template <typename T>
T Unwrap(Result<T> r) {
  if (!r.ok()) throw StatusError{r.status()};
  return std::move(r).value();
}
void Check(const Status& s) {
  if (!s.ok()) throw StatusError{s};
}

DType DTypeFromName(const std::string& name) {
  auto d = ParseDType(name);
  if (!d) throw StatusError{InvalidArgument("unknown dtype '" + name + "' (fp32, fp16, bf16)")};
  return *d;
}

Mode ModeFromName(const std::string& name) {
  if (name == "" || name == "default") return Mode::kDefault;
  if (name == "dense") return Mode::kDense;
  if (name == "index") return Mode::kIndex;
  if (name == "retrieval_heads") return Mode::kRetrievalHeads;
  if (name == "hybrid") return Mode::kHybrid;
  throw StatusError{InvalidArgument("unknown mode '" + name +
                                    "' (dense, index, retrieval_heads, hybrid)")};
}

const char* ModeName(Mode m) {
  switch (m) {
    case Mode::kDefault: return "default";
    case Mode::kDense: return "dense";
    case Mode::kIndex: return "index";
    case Mode::kRetrievalHeads: return "retrieval_heads";
    case Mode::kHybrid: return "hybrid";
  }
  return "default";
}

// A view of `a` as dtype `d`; the element size must match (the Python layer converts).
TensorView View(const AnyArray& a, DType d, const char* what) {
  if (a.itemsize() != DTypeSize(d)) {
    throw StatusError{InvalidArgument(std::string(what) + ": element size " +
                                      std::to_string(a.itemsize()) + " does not match dtype " +
                                      std::string(DTypeName(d)))};
  }
  TensorView v;
  v.data = a.data();
  v.dtype = d;
  for (size_t i = 0; i < a.ndim(); ++i) v.shape.push_back(a.shape(i));
  return v;
}

template <typename T>
nb::ndarray<nb::numpy, T> ToNumpy(std::vector<T> data, std::vector<size_t> shape) {
  auto* owned = new std::vector<T>(std::move(data));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(owned->data(), shape.size(), shape.data(), owner);
}

const char* RoleName(client::HeadRole r) {
  switch (r) {
    case client::HeadRole::kNone: return "none";
    case client::HeadRole::kRetrieval: return "retrieval";
    case client::HeadRole::kReused: return "reused";
    case client::HeadRole::kDense: return "dense";
  }
  return "unknown";
}

client::SelectionRule RuleFromName(const std::string& name) {
  if (name == "" || name == "default") return client::SelectionRule::kDefault;
  if (name == "top_k") return client::SelectionRule::kTopK;
  if (name == "ratio") return client::SelectionRule::kRatio;
  if (name == "threshold") return client::SelectionRule::kThreshold;
  if (name == "top_p") return client::SelectionRule::kTopP;
  throw StatusError{InvalidArgument("retrieval_rule must be top_k, ratio, threshold or top_p, got '" + name + "'")};
}

client::BlockPooling PoolingFromName(const std::string& name) {
  if (name == "" || name == "default") return client::BlockPooling::kDefault;
  if (name == "max") return client::BlockPooling::kMax;
  if (name == "mean") return client::BlockPooling::kMean;
  throw StatusError{InvalidArgument("retrieval_block_pooling must be max or mean, got '" + name + "'")};
}

client::RetrievalParams Retrieval(const std::string& rule, float value, uint32_t block_tokens,
                                  const std::string& pooling) {
  client::RetrievalParams r;
  r.rule = RuleFromName(rule);
  r.rule_value = value;
  r.block_tokens = block_tokens;
  r.pooling = PoolingFromName(pooling);
  return r;
}

nb::list Selections(const std::vector<client::HeadSelection>& heads) {
  nb::list out;
  for (const auto& h : heads) {
    nb::dict d;
    d["kv_head"] = h.kv_head;
    d["chunks"] = h.chunks;
    d["starts"] = h.starts;
    d["ends"] = h.ends;
    d["scores"] = h.scores;
    d["role"] = RoleName(h.role);
    d["source_layer"] = h.source_layer;
    out.append(d);
  }
  return out;
}

client::MemoryGate GateFromName(const std::string& name) {
  if (name == "" || name == "default") return client::MemoryGate::kDefault;
  if (name == "tree_exact") return client::MemoryGate::kTreeExact;
  if (name == "tree_budget") return client::MemoryGate::kTreeBudget;
  if (name == "linear") return client::MemoryGate::kLinearScan;
  if (name == "scorer") return client::MemoryGate::kScorer;
  throw StatusError{InvalidArgument("unknown gate '" + name +
                                    "' (tree_exact, tree_budget, linear, scorer)")};
}

const char* GateName(client::MemoryGate g) {
  switch (g) {
    case client::MemoryGate::kTreeExact: return "tree_exact";
    case client::MemoryGate::kTreeBudget: return "tree_budget";
    case client::MemoryGate::kLinearScan: return "linear";
    case client::MemoryGate::kScorer: return "scorer";
    default: return "default";
  }
}

nb::dict MemoryOptionsDict(const client::MemoryOptions& m) {
  nb::dict d;
  d["gate_dim"] = m.gate_dim;
  d["payload_rows"] = m.payload_rows;
  d["payload_dim"] = m.payload_dim;
  d["payload_dtype"] = std::string(DTypeName(m.payload_dtype));
  d["default_gate"] = GateName(m.default_gate);
  d["budget_leaves"] = m.budget_leaves;
  d["scorer_file"] = m.scorer_file;
  d["max_blocks"] = m.max_blocks;
  return d;
}

nb::list BlockList(const std::vector<client::MemoryBlockInfo>& blocks) {
  nb::list out;
  for (const auto& b : blocks) {
    nb::dict d;
    d["id"] = b.id;
    d["span_start"] = b.span_start;
    d["span_end"] = b.span_end;
    d["label"] = b.label;
    out.append(d);
  }
  return out;
}

// Payload bytes [n, rows, dim] of `dtype` as a float32 array.
nb::ndarray<nb::numpy, float> PayloadArray(const std::vector<uint8_t>& bytes, DType dtype, size_t n) {
  const size_t elems = bytes.size() / DTypeSize(dtype);
  std::vector<float> f(elems);
  ConvertToFloat(bytes.data(), dtype, elems, f.data());
  const size_t per = n == 0 ? 0 : elems / n;
  return ToNumpy<float>(std::move(f), {n, per});
}

nb::dict Summary(const client::SessionSummary& s) {
  nb::dict d;
  d["id"] = s.id;
  d["tenant"] = s.tenant;
  nb::dict p;
  p["layers"] = s.profile.layers;
  p["q_heads"] = s.profile.q_heads;
  p["kv_heads"] = s.profile.kv_heads;
  p["head_dim"] = s.profile.head_dim;
  p["dtype"] = std::string(DTypeName(s.profile.dtype));
  p["dense_layers"] = s.profile.dense_layers;
  p["retrieval_head_mask"] = s.profile.retrieval_head_mask;
  p["name"] = s.profile.name;
  d["profile"] = p;
  nb::dict o;
  o["chunk_min_tokens"] = s.options.chunk_min_tokens;
  o["chunk_max_tokens"] = s.options.chunk_max_tokens;
  o["sink_tokens"] = s.options.sink_tokens;
  o["recent_window"] = s.options.recent_window;
  o["default_budget_tokens"] = s.options.default_budget_tokens;
  o["mode"] = ModeName(s.options.mode);
  o["durable"] = s.options.durable;
  o["ttl_seconds"] = s.options.ttl_seconds;
  o["label"] = s.options.label;
  o["memory"] = MemoryOptionsDict(s.options.memory);
  d["options"] = o;
  d["tokens"] = s.tokens;
  d["chunks"] = s.chunks;
  d["tail_tokens"] = s.tail_tokens;
  d["bytes"] = s.bytes;
  d["created_unix_ms"] = s.created_unix_ms;
  d["last_used_unix_ms"] = s.last_used_unix_ms;
  d["mean_chunk_tokens"] = s.mean_chunk_tokens;
  d["memory_blocks"] = s.memory_blocks;
  d["memory_bytes"] = s.memory_bytes;
  nb::list layers;
  for (const auto& l : s.layers) {
    nb::dict ld;
    ld["layer"] = l.layer;
    ld["tokens"] = l.tokens;
    ld["tree_depth"] = l.tree_depth;
    ld["tree_nodes"] = l.tree_nodes;
    layers.append(ld);
  }
  d["layers"] = layers;
  return d;
}

nb::dict AppendDict(const client::AppendResult& r) {
  nb::dict d;
  d["tokens"] = r.tokens;
  d["chunks"] = r.chunks;
  d["sealed"] = r.sealed;
  return d;
}

class PyClient {
 public:
  PyClient(const std::string& address, const std::string& token, const std::string& transport,
           int connect_timeout_ms, int request_timeout_ms, const std::string& client_name) {
    client::ClientOptions o;
    o.token = token;
    o.transport = transport;
    o.connect_timeout_ms = connect_timeout_ms;
    o.request_timeout_ms = request_timeout_ms;
    o.client_name = client_name;
    Result<std::unique_ptr<Client>> c = Status(StatusCode::kUnknown, "not connected");
    {
      nb::gil_scoped_release nogil;
      c = Client::Connect(address, o);
    }
    client_ = Unwrap(std::move(c));
  }

  Client& c() {
    if (!client_) throw StatusError{FailedPrecondition("client is closed")};
    return *client_;
  }

  void Close() {
    nb::gil_scoped_release nogil;
    client_.reset();
  }

  nb::dict Server() {
    const auto& s = c().server();
    nb::dict d;
    d["tenant"] = s.tenant;
    d["server_version"] = s.server_version;
    d["backend"] = s.backend;
    d["max_message_bytes"] = s.max_message_bytes;
    d["address"] = c().address();
    d["transport"] = c().TransportInfo();
    return d;
  }

  void Ping(uint64_t payload) {
    Client& cl = c();
    nb::gil_scoped_release nogil;
    Check(cl.Ping(payload));
  }

  uint64_t CreateSession(uint32_t layers, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                         const std::string& dtype, std::vector<uint32_t> dense_layers,
                         std::vector<uint8_t> retrieval_head_mask, const std::string& name,
                         uint32_t chunk_min_tokens, uint32_t chunk_max_tokens,
                         uint32_t sink_tokens, uint32_t recent_window,
                         uint32_t default_budget_tokens, const std::string& mode, bool durable,
                         uint64_t ttl_seconds, const std::string& label, uint64_t id,
                         const std::string& retrieval_rule, float retrieval_rule_value,
                         uint32_t retrieval_block_tokens, const std::string& retrieval_block_pooling,
                         uint32_t memory_gate_dim, uint32_t memory_payload_rows,
                         uint32_t memory_payload_dim, const std::string& memory_payload_dtype,
                         const std::string& memory_gate, const std::string& memory_scorer_file) {
    client::Profile p;
    p.layers = layers;
    p.q_heads = q_heads;
    p.kv_heads = kv_heads;
    p.head_dim = head_dim;
    p.dtype = DTypeFromName(dtype);
    p.dense_layers = std::move(dense_layers);
    p.retrieval_head_mask = std::move(retrieval_head_mask);
    p.name = name;
    client::SessionOptions o;
    o.chunk_min_tokens = chunk_min_tokens;
    o.chunk_max_tokens = chunk_max_tokens;
    o.sink_tokens = sink_tokens;
    o.recent_window = recent_window;
    o.default_budget_tokens = default_budget_tokens;
    o.mode = ModeFromName(mode);
    if (o.mode == Mode::kDefault) o.mode = Mode::kDense;
    o.durable = durable;
    o.ttl_seconds = ttl_seconds;
    o.label = label;
    o.retrieval = Retrieval(retrieval_rule, retrieval_rule_value, retrieval_block_tokens,
                            retrieval_block_pooling);
    o.memory.gate_dim = memory_gate_dim;
    o.memory.payload_rows = memory_payload_rows;
    o.memory.payload_dim = memory_payload_dim;
    o.memory.payload_dtype = DTypeFromName(memory_payload_dtype);
    o.memory.default_gate = GateFromName(memory_gate);
    if (o.memory.default_gate == client::MemoryGate::kDefault) {
      o.memory.default_gate = client::MemoryGate::kTreeExact;
    }
    o.memory.scorer_file = memory_scorer_file;
    Client& cl = c();
    nb::gil_scoped_release nogil;
    return Unwrap(cl.CreateSession(p, o, id));
  }

  void DropSession(uint64_t id) {
    Client& cl = c();
    nb::gil_scoped_release nogil;
    Check(cl.DropSession(id));
  }

  nb::list ListSessions() {
    Client& cl = c();
    Result<std::vector<client::SessionSummary>> r = Status(StatusCode::kUnknown, "");
    {
      nb::gil_scoped_release nogil;
      r = cl.ListSessions();
    }
    nb::list out;
    for (const auto& s : Unwrap(std::move(r))) out.append(Summary(s));
    return out;
  }

  nb::dict SessionInfo(uint64_t id) {
    Client& cl = c();
    Result<client::SessionSummary> r = Status(StatusCode::kUnknown, "");
    {
      nb::gil_scoped_release nogil;
      r = cl.SessionInfo(id);
    }
    return Summary(Unwrap(std::move(r)));
  }

  nb::dict AppendKV(uint64_t id, const AnyArray& k, const AnyArray& v, const std::string& dtype,
                    std::optional<nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu,
                                              nb::ro>> boundaries) {
    const DType d = DTypeFromName(dtype);
    TensorView kv = View(k, d, "k"), vv = View(v, d, "v");
    std::span<const uint8_t> b;
    if (boundaries) b = std::span<const uint8_t>(boundaries->data(), boundaries->shape(0));
    Client& cl = c();
    Result<client::AppendResult> r = Status(StatusCode::kUnknown, "");
    {
      nb::gil_scoped_release nogil;
      r = cl.AppendKV(id, kv, vv, b);
    }
    return AppendDict(Unwrap(std::move(r)));
  }

  // Returns (out [q_heads, head_dim] float32, lse [q_heads] float32 or None, tokens_attended,
  // selection).
  nb::tuple Attend(uint64_t id, uint32_t layer, const AnyArray& q, std::optional<AnyArray> new_k,
                   std::optional<AnyArray> new_v, const std::string& q_dtype,
                   const std::string& dtype, uint8_t boundary,
                   uint32_t budget_tokens, const std::string& mode, bool return_lse,
                   bool return_selection, const std::string& retrieval_rule,
                   float retrieval_rule_value, uint32_t retrieval_block_tokens,
                   const std::string& retrieval_block_pooling) {
    const DType d = DTypeFromName(dtype);
    AttendRequest req;
    req.layer = layer;
    req.q = View(q, DTypeFromName(q_dtype), "q");
    if (new_k.has_value() != new_v.has_value()) {
      throw StatusError{InvalidArgument("attend: k and v must be given together")};
    }
    if (new_k) {
      req.new_k = View(*new_k, d, "k");
      req.new_v = View(*new_v, d, "v");
    }
    req.boundary = boundary;
    req.budget_tokens = budget_tokens;
    req.mode = ModeFromName(mode);
    req.return_lse = return_lse;
    req.return_selection = return_selection;
    req.out_dtype = DType::kF32;
    req.retrieval = Retrieval(retrieval_rule, retrieval_rule_value, retrieval_block_tokens,
                              retrieval_block_pooling);
    Client& cl = c();
    Result<client::AttendResult> r = Status(StatusCode::kUnknown, "");
    {
      nb::gil_scoped_release nogil;
      r = cl.Attend(id, req);
    }
    client::AttendResult res = Unwrap(std::move(r));
    const size_t rows = q.ndim() >= 1 ? q.shape(0) : 0;
    const size_t n = res.out.size() / sizeof(float);
    if (res.out_dtype != DType::kF32 || rows == 0 || n % rows != 0) {
      throw StatusError{Internal("attend: unexpected output from the daemon")};
    }
    std::vector<float> out(n);
    std::memcpy(out.data(), res.out.data(), n * sizeof(float));
    nb::object lse = nb::none();
    if (return_lse) lse = nb::cast(ToNumpy<float>(std::move(res.lse), {res.lse.size()}));
    return nb::make_tuple(ToNumpy<float>(std::move(out), {rows, n / rows}), lse,
                          res.tokens_attended, Selections(res.selection));
  }

  nb::dict Retrieve(uint64_t id, uint32_t layer, const AnyArray& q, const std::string& dtype,
                    uint32_t budget_tokens, uint32_t top_chunks, const std::string& mode,
                    const std::string& retrieval_rule, float retrieval_rule_value,
                    uint32_t retrieval_block_tokens, const std::string& retrieval_block_pooling) {
    client::RetrieveRequest req;
    req.layer = layer;
    req.q = View(q, DTypeFromName(dtype), "q");
    req.budget_tokens = budget_tokens;
    req.top_chunks = top_chunks;
    req.mode = ModeFromName(mode);
    req.retrieval = Retrieval(retrieval_rule, retrieval_rule_value, retrieval_block_tokens,
                              retrieval_block_pooling);
    Client& cl = c();
    Result<client::RetrieveResult> r = Status(StatusCode::kUnknown, "");
    {
      nb::gil_scoped_release nogil;
      r = cl.Retrieve(id, req);
    }
    client::RetrieveResult res = Unwrap(std::move(r));
    nb::dict d;
    d["heads"] = Selections(res.heads);
    d["nodes_visited"] = res.nodes_visited;
    d["bytes_read"] = res.bytes_read;
    return d;
  }

  // --- memory blocks ---
  nb::dict PutMemoryBlocks(uint64_t id, const AnyArray& keys, const AnyArray& payloads,
                           const std::string& payload_dtype, std::vector<uint64_t> span_starts,
                           std::vector<uint64_t> span_ends, std::vector<std::string> labels) {
    client::MemoryBlocksToPut b;
    b.gate_keys = View(keys, DType::kF32, "keys");
    b.payloads = View(payloads, DTypeFromName(payload_dtype), "payloads");
    b.span_starts = std::move(span_starts);
    b.span_ends = std::move(span_ends);
    b.labels = std::move(labels);
    Client& cl = c();
    Result<client::PutMemoryResult> r = Status(StatusCode::kUnknown, "");
    {
      nb::gil_scoped_release nogil;
      r = cl.PutMemoryBlocks(id, b);
    }
    client::PutMemoryResult res = Unwrap(std::move(r));
    nb::dict d;
    d["ids"] = res.ids;
    d["blocks"] = res.blocks;
    d["bytes"] = res.bytes;
    return d;
  }

  nb::dict SelectMemory(uint64_t id, const AnyArray& query, uint32_t k, const std::string& gate,
                        uint32_t budget_leaves, bool return_payloads) {
    TensorView q = View(query, DType::kF32, "query");
    const client::MemoryGate g = GateFromName(gate);
    Client& cl = c();
    Result<client::MemorySelection> r = Status(StatusCode::kUnknown, "");
    {
      nb::gil_scoped_release nogil;
      r = cl.SelectMemory(id, q, k, g, budget_leaves, return_payloads);
    }
    client::MemorySelection res = Unwrap(std::move(r));
    nb::dict d;
    d["ids"] = res.ids;
    d["scores"] = res.scores;
    d["blocks"] = BlockList(res.blocks);
    d["payloads"] = return_payloads ? nb::cast(PayloadArray(res.payloads, res.payload_dtype, res.ids.size()))
                                    : nb::none();
    d["exact"] = res.exact;
    d["keys_scored"] = res.keys_scored;
    d["leaves_visited"] = res.leaves_visited;
    return d;
  }

  nb::dict GetMemoryBlocks(uint64_t id, std::vector<uint64_t> ids, bool return_gate_keys) {
    Client& cl = c();
    Result<client::MemoryBlocks> r = Status(StatusCode::kUnknown, "");
    {
      nb::gil_scoped_release nogil;
      r = cl.GetMemoryBlocks(id, ids, return_gate_keys);
    }
    client::MemoryBlocks res = Unwrap(std::move(r));
    nb::dict d;
    d["blocks"] = BlockList(res.blocks);
    d["payloads"] = PayloadArray(res.payloads, res.payload_dtype, res.blocks.size());
    if (return_gate_keys) {
      const size_t n = res.blocks.size(), dim = n ? res.gate_keys.size() / n : 0;
      d["gate_keys"] = ToNumpy<float>(std::move(res.gate_keys), {n, dim});
    }
    return d;
  }

  uint64_t DropMemoryBlocks(uint64_t id, std::vector<uint64_t> ids) {
    Client& cl = c();
    nb::gil_scoped_release nogil;
    return Unwrap(cl.DropMemoryBlocks(id, ids));
  }

  nb::dict ListMemoryBlocks(uint64_t id, uint64_t after_id, uint32_t limit) {
    Client& cl = c();
    Result<client::MemoryListing> r = Status(StatusCode::kUnknown, "");
    {
      nb::gil_scoped_release nogil;
      r = cl.ListMemoryBlocks(id, after_id, limit);
    }
    client::MemoryListing res = Unwrap(std::move(r));
    nb::dict d;
    d["blocks"] = BlockList(res.blocks);
    d["total_blocks"] = res.total_blocks;
    d["bytes"] = res.bytes;
    d["options"] = MemoryOptionsDict(res.options);
    return d;
  }

 private:
  std::unique_ptr<Client> client_;
};

}  // namespace

NB_MODULE(_kvmem, m) {
  m.doc() = "Low-level binding of the kvmem C++ client; use the kvmem package instead.";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusError& e) {
      nb::object cls = nb::module_::import_("kvmem._errors").attr("Error");
      nb::object exc = cls(std::string(StatusCodeName(e.status.code())), e.status.message(),
                           static_cast<int>(e.status.code()));
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });

  nb::class_<PyClient>(m, "Client")
      .def(nb::init<const std::string&, const std::string&, const std::string&, int, int,
                    const std::string&>(),
           "address"_a, "token"_a = "", "transport"_a = "auto", "connect_timeout_ms"_a = 5000,
           "request_timeout_ms"_a = 120000, "client_name"_a = "kvmem-python")
      .def("close", &PyClient::Close)
      .def("server", &PyClient::Server)
      .def("ping", &PyClient::Ping, "payload"_a = 0)
      .def("create_session", &PyClient::CreateSession, "layers"_a, "q_heads"_a, "kv_heads"_a,
           "head_dim"_a, "dtype"_a, "dense_layers"_a, "retrieval_head_mask"_a, "name"_a,
           "chunk_min_tokens"_a, "chunk_max_tokens"_a, "sink_tokens"_a, "recent_window"_a,
           "default_budget_tokens"_a, "mode"_a, "durable"_a, "ttl_seconds"_a, "label"_a, "id"_a,
           "retrieval_rule"_a, "retrieval_rule_value"_a, "retrieval_block_tokens"_a,
           "retrieval_block_pooling"_a,
           "memory_gate_dim"_a = 0, "memory_payload_rows"_a = 0, "memory_payload_dim"_a = 0,
           "memory_payload_dtype"_a = "bf16", "memory_gate"_a = "tree_exact",
           "memory_scorer_file"_a = "")
      .def("drop_session", &PyClient::DropSession, "id"_a)
      .def("list_sessions", &PyClient::ListSessions)
      .def("session_info", &PyClient::SessionInfo, "id"_a)
      .def("append_kv", &PyClient::AppendKV, "id"_a, "k"_a, "v"_a, "dtype"_a,
           "boundaries"_a.none())
      .def("attend", &PyClient::Attend, "id"_a, "layer"_a, "q"_a, "new_k"_a.none(),
           "new_v"_a.none(), "q_dtype"_a, "dtype"_a, "boundary"_a, "budget_tokens"_a, "mode"_a,
           "return_lse"_a, "return_selection"_a, "retrieval_rule"_a, "retrieval_rule_value"_a,
           "retrieval_block_tokens"_a, "retrieval_block_pooling"_a)
      .def("retrieve", &PyClient::Retrieve, "id"_a, "layer"_a, "q"_a, "dtype"_a,
           "budget_tokens"_a, "top_chunks"_a, "mode"_a, "retrieval_rule"_a,
           "retrieval_rule_value"_a, "retrieval_block_tokens"_a, "retrieval_block_pooling"_a)
      .def("put_memory_blocks", &PyClient::PutMemoryBlocks, "id"_a, "keys"_a, "payloads"_a,
           "payload_dtype"_a, "span_starts"_a, "span_ends"_a, "labels"_a)
      .def("select_memory", &PyClient::SelectMemory, "id"_a, "query"_a, "k"_a, "gate"_a,
           "budget_leaves"_a, "return_payloads"_a)
      .def("get_memory_blocks", &PyClient::GetMemoryBlocks, "id"_a, "ids"_a, "return_gate_keys"_a)
      .def("drop_memory_blocks", &PyClient::DropMemoryBlocks, "id"_a, "ids"_a)
      .def("list_memory_blocks", &PyClient::ListMemoryBlocks, "id"_a, "after_id"_a, "limit"_a);

  m.def(
      "boundary_classes",
      [](const std::vector<std::string>& tokens) {
        std::vector<uint8_t> b = client::BoundaryClassesFromTokens(tokens);
        return ToNumpy<uint8_t>(std::move(b), {tokens.size()});
      },
      "tokens"_a);
}

}  // namespace kvmem::python
