#include "client/client.h"

#include <poll.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <unordered_map>

#include "wire/framing.h"
#include "wire/ucx.h"

namespace kvmem::client {

namespace w = ::kvmem::wire;

namespace detail {

// One request in flight and, once complete, its reply.
struct CallState {
  uint64_t request_id = 0;
  std::string address;                    // for error messages
  w::Frame frame;                         // keeps the request's header / spill alive
  std::vector<ucp_dt_iov_t> iov;
  std::vector<std::vector<uint8_t>> keep; // request-owned buffers (e.g. zero boundaries)
  std::atomic<bool> done{false};
  std::atomic<bool> send_done{false};
  Status status;                          // transport status
  std::vector<uint8_t> header;
  std::unique_ptr<uint8_t[], void (*)(void*)> data{nullptr, std::free};
  size_t data_bytes = 0;
  w::Parsed parsed;
  std::chrono::steady_clock::time_point deadline;
};

}  // namespace detail

using detail::CallState;

// The daemon's listener refused the connection request (UCS_ERR_REJECTED): it holds
// max_connections connections, or it is shutting down.
Status Rejected(const std::string& address) {
  return ResourceExhausted("kvmemd at " + address +
                           " rejected the connection (at its max_connections limit, or "
                           "shutting down)");
}

// Payloads at least this large are sent from one contiguous buffer (see Send).
constexpr size_t kGatherThreshold = 64 << 10;

struct Client::Impl {
  ClientOptions options;
  std::string address;
  ServerInfo server;
  ucx::Context context;
  ucx::Worker worker;
  ucp_ep_h ep = nullptr;
  size_t max_am_header = 0;
  int efd = -1;
  std::atomic<uint64_t> next_id{1};
  std::atomic<bool> broken{false};
  Status broken_status;

  mutable std::mutex mu;  // serialises the worker, the endpoint, `calls` and `requests`
  std::unordered_map<uint64_t, std::shared_ptr<CallState>> calls;

  // What a UCX request's callback receives. Every request still in UCX is listed in `requests`
  // (holder -> request handle), so that closing the client can cancel them and free what their
  // callbacks would have freed: with the peer gone (kill -9), a rendezvous send never completes
  // on its own.
  struct Holder {
    Impl* impl;
    std::shared_ptr<CallState> call;
  };
  std::unordered_map<Holder*, void*> requests;

  ~Impl() {
    std::lock_guard<std::mutex> lock(mu);
    if (ep != nullptr) {
      ucx::CloseEndpoint(worker.get(), ep, /*force=*/broken.load(), 500);
      ep = nullptr;
    }
    if (worker.get() != nullptr && !requests.empty()) {
      std::vector<void*> pending;  // a cancel may complete a request (and erase it) right away
      for (const auto& entry : requests) pending.push_back(entry.second);
      for (void* req : pending) ucp_request_cancel(worker.get(), req);
      for (int i = 0; i < 1000 && !requests.empty(); ++i) ucp_worker_progress(worker.get());
      for (const auto& [holder, req] : requests) {  // callbacks that never came: free their share
        ucp_request_free(req);
        delete holder;
      }
      requests.clear();
    }
    calls.clear();
    worker.reset();
    context.reset();
  }

  static ucs_status_t OnReplyAm(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param);
  static void OnRndvDone(void* request, ucs_status_t status, size_t length, void* user_data);
  static void OnSendDone(void* request, ucs_status_t status, void* user_data);
  static void OnEpError(void* arg, ucp_ep_h ep, ucs_status_t status);

  Result<std::shared_ptr<CallState>> Send(flatbuffers::FlatBufferBuilder& fbb,
                                          const w::TensorPacker& packer, uint64_t request_id);
  Status Wait(CallState& call);
  void Complete(const std::shared_ptr<CallState>& call, Status status) {
    call->status = std::move(status);
    call->done.store(true, std::memory_order_release);
  }
};

ucs_status_t Client::Impl::OnReplyAm(void* arg, const void* header, size_t header_length,
                                     void* data, size_t length, const ucp_am_recv_param_t* param) {
  auto* impl = static_cast<Impl*>(arg);
  const auto* h = static_cast<const uint8_t*>(header);
  const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
  // UCX hands the header at any address (odd ones included over TCP); FlatBuffers reads its
  // scalars and vectors assuming the buffer start is aligned (UBSan: misaligned member call in
  // the verifier). Verify and read an aligned copy, the one the call keeps.
  std::vector<uint8_t> copy(h, h + header_length);
  flatbuffers::Verifier v(copy.data(), copy.size(), w::kMaxVerifierDepth, w::kMaxVerifierTables);
  // Unmatched rendezvous data is dropped by returning UCS_OK without receiving it.
  if (header_length < 8 || !w::VerifyEnvelopeBuffer(v)) {
    return UCS_OK;  // not ours to match; a waiting call will time out
  }
  const uint64_t rid = w::GetEnvelope(copy.data())->request_id();
  auto it = impl->calls.find(rid);
  if (it == impl->calls.end()) {
    // Replies without a matching call: request id 0 means the daemon could not read the id
    // (malformed request); fail every call that was waiting (the oldest first would be a guess).
    if (rid == 0 && !impl->calls.empty()) it = impl->calls.begin();
    else {
      return UCS_OK;
    }
  }
  std::shared_ptr<CallState> call = it->second;
  impl->calls.erase(it);
  call->header = std::move(copy);
  call->data_bytes = length;
  call->data.reset(static_cast<uint8_t*>(std::aligned_alloc(64, w::AlignUp(length ? length : 1, 64))));
  if (!rndv) {
    if (length) std::memcpy(call->data.get(), data, length);
    impl->Complete(call, Status::OK());
    return UCS_OK;
  }
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
  rp.cb.recv_am = &Impl::OnRndvDone;
  auto* holder = new Holder{impl, call};
  rp.user_data = holder;
  rp.datatype = ucp_dt_make_contig(1);
  ucs_status_ptr_t req = ucp_am_recv_data_nbx(impl->worker.get(), data, call->data.get(), length, &rp);
  if (req == nullptr) {
    delete holder;
    impl->Complete(call, Status::OK());
  } else if (UCS_PTR_IS_ERR(req)) {
    delete holder;
    impl->Complete(call, ucx::FromUcs(UCS_PTR_STATUS(req), "receive reply data"));
  } else {
    impl->requests.emplace(holder, req);
  }
  return UCS_OK;
}

void Client::Impl::OnRndvDone(void* request, ucs_status_t status, size_t, void* user_data) {
  std::unique_ptr<Holder> holder(static_cast<Holder*>(user_data));
  holder->impl->requests.erase(holder.get());
  ucp_request_free(request);
  holder->call->status = ucx::FromUcs(status, "receive reply data");
  holder->call->done.store(true, std::memory_order_release);
}

void Client::Impl::OnSendDone(void* request, ucs_status_t status, void* user_data) {
  std::unique_ptr<Holder> holder(static_cast<Holder*>(user_data));
  holder->impl->requests.erase(holder.get());
  ucp_request_free(request);
  holder->call->send_done.store(true, std::memory_order_release);
  if (status != UCS_OK && !holder->call->done.load()) {
    holder->call->status = status == UCS_ERR_REJECTED ? Rejected(holder->call->address)
                                                      : ucx::FromUcs(status, "send request");
    holder->call->done.store(true, std::memory_order_release);
  }
}

void Client::Impl::OnEpError(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* impl = static_cast<Impl*>(arg);
  if (status == UCS_ERR_REJECTED) {
    impl->broken_status = Rejected(impl->address);
  } else {
    impl->broken_status =
        Unavailable(std::string("connection to kvmemd lost: ") + ucs_status_string(status));
  }
  impl->broken = true;
}

Result<std::shared_ptr<CallState>> Client::Impl::Send(flatbuffers::FlatBufferBuilder& fbb,
                                                      const w::TensorPacker& packer,
                                                      uint64_t request_id) {
  if (broken) return broken_status;
  auto call = std::make_shared<CallState>();
  call->request_id = request_id;
  call->address = address;
  call->frame = w::MakeFrame(fbb, packer, max_am_header);
  call->deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options.request_timeout_ms);
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_AM_SEND_FLAG_REPLY |
            ucx::AmProtocolFlag(call->frame.header.size() + call->frame.data_bytes);
  p.cb.send = &Impl::OnSendDone;
  const void* buffer = nullptr;
  size_t count = 0;
  const auto& segs = call->frame.data;
  if (segs.size() == 1) {
    buffer = segs[0].ptr;
    count = segs[0].bytes;
  } else if (segs.size() > 1 && call->frame.data_bytes >= kGatherThreshold) {
    // UCX 1.13 moves a multi-segment (IOV) rendezvous send through fragments, an order of
    // magnitude slower than a contiguous one (measured: ~9 ms vs ~0.3 ms for 2 MiB over
    // shm/CMA): gather large payloads into one buffer first.
    call->keep.emplace_back(call->frame.data_bytes);
    uint8_t* dst = call->keep.back().data();
    for (const auto& s : segs) {
      std::memcpy(dst, s.ptr, s.bytes);
      dst += s.bytes;
    }
    buffer = call->keep.back().data();
    count = call->frame.data_bytes;
  } else if (segs.size() > 1) {
    for (const auto& s : segs) call->iov.push_back({const_cast<void*>(s.ptr), s.bytes});
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
    p.datatype = UCP_DATATYPE_IOV;
    buffer = call->iov.data();
    count = call->iov.size();
  }
  std::lock_guard<std::mutex> lock(mu);
  calls[request_id] = call;
  auto* holder = new Holder{this, call};
  p.user_data = holder;
  ucs_status_ptr_t req = ucp_am_send_nbx(ep, w::kRequestAmId, call->frame.header.data(),
                                         call->frame.header.size(), buffer, count, &p);
  if (req == nullptr) {
    delete holder;
    call->send_done = true;
  } else if (UCS_PTR_IS_ERR(req)) {
    delete holder;
    calls.erase(request_id);
    return ucx::FromUcs(UCS_PTR_STATUS(req), "send request");
  } else {
    requests.emplace(holder, req);
  }
  return call;
}

Status Client::Impl::Wait(CallState& call) {
  const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(options.spin_us);
  unsigned idle_spins = 0;
  for (;;) {
    // The request's buffers must outlive the send even when the reply came first.
    if (call.done.load(std::memory_order_acquire) && call.send_done.load(std::memory_order_acquire)) break;
    const auto now = std::chrono::steady_clock::now();
    if (broken) return broken_status;
    if (now > call.deadline) {
      std::lock_guard<std::mutex> lock(mu);
      calls.erase(call.request_id);
      if (!call.done.load()) {
        return DeadlineExceeded("no reply from kvmemd at " + address + " within " +
                                std::to_string(options.request_timeout_ms) + " ms");
      }
    }
    bool sleep = false;
    {
      std::unique_lock<std::mutex> lock(mu, std::try_to_lock);
      if (lock.owns_lock()) {
        if (ucp_worker_progress(worker.get()) == 0 && now > spin_until) {
          sleep = ucp_worker_arm(worker.get()) == UCS_OK;
        }
      }
    }
    if (sleep) {
      pollfd pfd{efd, POLLIN, 0};
      ::poll(&pfd, 1, 1);
    } else if (++idle_spins % 64 == 0) {
      sched_yield();  // let the daemon's threads run when cores are few
    }
  }
  KVMEM_RETURN_IF_ERROR(call.status);
  KVMEM_ASSIGN_OR_RETURN(call.parsed, w::ParseMessage(call.header, call.data.get(), call.data_bytes));
  return w::EnvelopeStatus(call.parsed.envelope);
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

const ServerInfo& Client::server() const { return impl_->server; }
const std::string& Client::address() const { return impl_->address; }

std::string Client::TransportInfo() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  char* buf = nullptr;
  size_t len = 0;
  FILE* f = open_memstream(&buf, &len);
  if (f == nullptr) return "";
  ucp_ep_print_info(impl_->ep, f);
  std::fclose(f);
  std::string s(buf, len);
  std::free(buf);
  return s;
}

namespace {

template <typename Body>
uint64_t Begin(flatbuffers::FlatBufferBuilder& fbb, std::atomic<uint64_t>& ids,
               flatbuffers::Offset<Body> body, const w::TensorPacker& packer) {
  const uint64_t rid = ids.fetch_add(1);
  fbb.Finish(w::MakeEnvelope(fbb, rid, body, packer.bytes()));
  return rid;
}

}  // namespace

// Shared plumbing: build, send, wrap.
#define KVMEM_CLIENT_CALL(T, IMPL, BUILD, PARSE)                                          \
  [&]() -> Future<T> {                                                                    \
    flatbuffers::FlatBufferBuilder fbb(256);                                              \
    w::TensorPacker packer;                                                               \
    auto body = BUILD(fbb, packer);                                                       \
    if (!body.ok()) return Future<T>(body.status());                                      \
    const uint64_t rid = Begin(fbb, (IMPL)->next_id, *body, packer);                      \
    auto call = (IMPL)->Send(fbb, packer, rid);                                           \
    if (!call.ok()) return Future<T>(call.status());                                      \
    Impl* impl_ptr = (IMPL);                                                              \
    return Future<T>(*call, PARSE,                                                        \
                     [impl_ptr](CallState& c) { return impl_ptr->Wait(c); });             \
  }()

Result<std::unique_ptr<Client>> Client::Connect(const std::string& address,
                                                const ClientOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->address = address;
  std::string tls;
  if (options.transport == "tcp") tls = "tcp";
  else if (options.transport == "shm") tls = "sm,self,tcp";
  else if (options.transport != "auto" && !options.transport.empty()) {
    return InvalidArgument("transport must be auto, shm or tcp, got '" + options.transport + "'");
  }
  KVMEM_ASSIGN_OR_RETURN(impl->context, ucx::CreateContext({tls, /*wakeup=*/true}));
  KVMEM_ASSIGN_OR_RETURN(impl->worker, ucx::CreateWorker(impl->context.get(), UCS_THREAD_MODE_SERIALIZED));
  KVMEM_ASSIGN_OR_RETURN(impl->max_am_header, ucx::MaxAmHeader(impl->worker.get()));
  KVMEM_RETURN_IF_ERROR(ucx::FromUcs(ucp_worker_get_efd(impl->worker.get(), &impl->efd), "ucp_worker_get_efd"));

  ucp_am_handler_param_t am{};
  am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  am.id = w::kReplyAmId;
  am.cb = &Impl::OnReplyAm;
  am.arg = impl.get();
  am.flags = UCP_AM_FLAG_WHOLE_MSG;
  KVMEM_RETURN_IF_ERROR(ucx::FromUcs(ucp_worker_set_am_recv_handler(impl->worker.get(), &am),
                                     "ucp_worker_set_am_recv_handler"));

  std::string host;
  uint16_t port = 0;
  KVMEM_RETURN_IF_ERROR(ucx::ParseHostPort(address, &host, &port));
  sockaddr_storage addr{};
  socklen_t addrlen = 0;
  KVMEM_RETURN_IF_ERROR(ucx::ResolveSockaddr(host, port, &addr, &addrlen));
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                  UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  ep.sockaddr.addrlen = addrlen;
  ep.err_mode = options.peer_error_handling ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  ep.err_handler.cb = &Impl::OnEpError;
  ep.err_handler.arg = impl.get();
  KVMEM_RETURN_IF_ERROR(ucx::FromUcs(ucp_ep_create(impl->worker.get(), &ep, &impl->ep),
                                     "connect to " + address));

  // Hello, with the connect deadline.
  const int saved_timeout = impl->options.request_timeout_ms;
  impl->options.request_timeout_ms = options.connect_timeout_ms;
  Impl* raw = impl.get();
  auto hello = KVMEM_CLIENT_CALL(
      ServerInfo, raw,
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::Hello>> {
        return w::CreateHelloDirect(fbb, w::kProtocolVersion, options.client_name.c_str(),
                                    options.token.c_str());
      }),
      ([](CallState& c) -> Result<ServerInfo> {
        const w::HelloReply* r = c.parsed.envelope->body_as_HelloReply();
        if (r == nullptr) return Internal("Hello: unexpected reply type");
        ServerInfo s;
        s.tenant = r->tenant() ? r->tenant()->str() : "";
        s.server_version = r->server_version() ? r->server_version()->str() : "";
        s.backend = r->backend() ? r->backend()->str() : "";
        s.max_message_bytes = r->max_message_bytes();
        s.uptime_ms = r->uptime_ms();
        s.gpu = r->gpu() ? r->gpu()->str() : "";
        if (r->tiers()) {
          for (const w::TierUsage* t : *r->tiers()) {
            s.tiers.push_back({t->tier() ? t->tier()->str() : "", t->capacity_bytes(),
                               t->used_bytes(), t->chunks()});
          }
        }
        s.sessions_total = r->sessions_total();
        return s;
      }));
  auto info = hello.Get();
  impl->options.request_timeout_ms = saved_timeout;
  if (!info.ok()) {
    if (info.status().code() == StatusCode::kDeadlineExceeded) {
      return Unavailable("no kvmemd answered at " + address + " within " +
                         std::to_string(options.connect_timeout_ms) + " ms");
    }
    return info.status().WithContext("connect to " + address);
  }
  impl->server = *info;
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

Future<uint64_t> Client::PingAsync(uint64_t payload) {
  return KVMEM_CLIENT_CALL(
      uint64_t, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::Ping>> {
        return w::CreatePing(fbb, payload);
      }),
      ([](CallState& c) -> Result<uint64_t> {
        const w::PingReply* r = c.parsed.envelope->body_as_PingReply();
        if (r == nullptr) return Internal("Ping: unexpected reply type");
        return r->payload();
      }));
}

Status Client::Ping(uint64_t payload) {
  KVMEM_ASSIGN_OR_RETURN(uint64_t echo, PingAsync(payload).Get());
  if (echo != payload) return DataLoss("Ping: payload came back changed");
  return Status::OK();
}

namespace {

flatbuffers::Offset<w::ModelProfile> ProfileToWire(flatbuffers::FlatBufferBuilder& fbb, const Profile& p) {
  return w::CreateModelProfileDirect(fbb, p.layers, p.q_heads, p.kv_heads, p.head_dim, w::ToWire(p.dtype),
                                     &p.dense_layers,
                                     p.retrieval_head_mask.empty() ? nullptr : &p.retrieval_head_mask,
                                     p.name.c_str());
}

Profile ProfileFromWire(const w::ModelProfile* p) {
  Profile out;
  if (p == nullptr) return out;
  out.layers = p->layers();
  out.q_heads = p->q_heads();
  out.kv_heads = p->kv_heads();
  out.head_dim = p->head_dim();
  out.dtype = static_cast<DType>(p->dtype());
  if (p->dense_layers()) out.dense_layers.assign(p->dense_layers()->begin(), p->dense_layers()->end());
  if (p->retrieval_head_mask())
    out.retrieval_head_mask.assign(p->retrieval_head_mask()->begin(), p->retrieval_head_mask()->end());
  if (p->name()) out.name = p->name()->str();
  return out;
}

flatbuffers::Offset<w::MemoryOptions> MemoryOptionsToWire(flatbuffers::FlatBufferBuilder& fbb,
                                                          const MemoryOptions& m) {
  return w::CreateMemoryOptionsDirect(fbb, m.gate_dim, m.payload_rows, m.payload_dim,
                                      w::ToWire(m.payload_dtype),
                                      static_cast<w::MemoryGate>(m.default_gate), m.budget_leaves,
                                      m.scorer_file.empty() ? nullptr : m.scorer_file.c_str(),
                                      m.max_blocks);
}

MemoryOptions MemoryOptionsFromWire(const w::MemoryOptions* m) {
  MemoryOptions o;
  if (m == nullptr) return o;
  o.gate_dim = m->gate_dim();
  o.payload_rows = m->payload_rows();
  o.payload_dim = m->payload_dim();
  o.payload_dtype = static_cast<DType>(m->payload_dtype());
  o.default_gate = static_cast<MemoryGate>(m->default_gate());
  o.budget_leaves = m->budget_leaves();
  o.scorer_file = m->scorer_file() ? m->scorer_file()->str() : "";
  o.max_blocks = m->max_blocks();
  return o;
}

std::vector<MemoryBlockInfo> BlocksFromWire(
    const flatbuffers::Vector<flatbuffers::Offset<w::MemoryBlockInfo>>* v) {
  std::vector<MemoryBlockInfo> out;
  if (v == nullptr) return out;
  for (const w::MemoryBlockInfo* b : *v) {
    out.push_back({b->id(), b->span_start(), b->span_end(), b->label() ? b->label()->str() : ""});
  }
  return out;
}

// Copies a reply's payload tensor [n, rows, dim] (any float dtype) out.
Status PayloadsFromWire(const CallState& c, const w::Tensor* t, size_t n, std::vector<uint8_t>* out,
                        DType* dtype) {
  if (t == nullptr) {
    if (n == 0) return Status::OK();
    return Internal("memory reply without payloads");
  }
  if (t->shape() == nullptr || t->shape()->size() != 3 || t->shape()->Get(0) != n) {
    return Internal("memory reply: payloads shape does not match the blocks");
  }
  const uint64_t shape[3] = {n, t->shape()->Get(1), t->shape()->Get(2)};
  const w::DType floats[3] = {w::DType::BF16, w::DType::F16, w::DType::F32};
  KVMEM_ASSIGN_OR_RETURN(const uint8_t* p, w::ResolveTensor(c.parsed, t, "payloads", shape, floats));
  out->assign(p, p + t->bytes());
  KVMEM_ASSIGN_OR_RETURN(*dtype, w::FloatDTypeFromWire(t->dtype()));
  return Status::OK();
}

SessionSummary SummaryFromWire(const w::SessionSummary* s) {
  SessionSummary out;
  if (s == nullptr) return out;
  out.id = s->session_id();
  out.tenant = s->tenant() ? s->tenant()->str() : "";
  out.profile = ProfileFromWire(s->profile());
  if (const auto* o = s->options()) {
    out.options.chunk_min_tokens = o->chunk_min_tokens();
    out.options.chunk_max_tokens = o->chunk_max_tokens();
    out.options.sink_tokens = o->sink_tokens();
    out.options.recent_window = o->recent_window();
    out.options.default_budget_tokens = o->default_budget_tokens();
    out.options.mode = static_cast<Mode>(o->mode());
    out.options.durable = o->durability() == w::Durability::DURABLE;
    out.options.ttl_seconds = o->ttl_seconds();
    out.options.label = o->label() ? o->label()->str() : "";
    out.options.memory = MemoryOptionsFromWire(o->memory());
    out.options.retrieval.rule = static_cast<SelectionRule>(o->retrieval_rule());
    out.options.retrieval.rule_value = o->retrieval_rule_value();
    out.options.retrieval.block_tokens = o->retrieval_block_tokens();
    out.options.retrieval.pooling = static_cast<BlockPooling>(o->retrieval_block_pooling());
  }
  out.tokens = s->tokens();
  out.chunks = s->chunks();
  out.tail_tokens = s->tail_tokens();
  out.bytes = s->bytes();
  out.created_unix_ms = s->created_unix_ms();
  out.last_used_unix_ms = s->last_used_unix_ms();
  out.mean_chunk_tokens = s->mean_chunk_tokens();
  out.host_bytes = s->host_bytes();
  out.disk_bytes = s->disk_bytes();
  out.fetched_blocks = s->fetched_blocks();
  out.prefetched_blocks = s->prefetched_blocks();
  out.evicted_blocks = s->evicted_blocks();
  out.memory_blocks = s->memory_blocks();
  out.memory_bytes = s->memory_bytes();
  if (s->layers()) {
    for (const w::LayerInfo* l : *s->layers()) {
      LayerInfo li;
      li.layer = l->layer();
      li.tokens = l->tokens();
      li.tree_depth = l->tree_depth();
      if (l->tree_nodes()) li.tree_nodes.assign(l->tree_nodes()->begin(), l->tree_nodes()->end());
      out.layers.push_back(std::move(li));
    }
  }
  return out;
}

HeadSelection SelectionFromWire(const w::HeadSelection* h) {
  HeadSelection out;
  out.kv_head = h->kv_head();
  if (h->chunk_ids()) out.chunks.assign(h->chunk_ids()->begin(), h->chunk_ids()->end());
  if (h->starts()) out.starts.assign(h->starts()->begin(), h->starts()->end());
  if (h->ends()) out.ends.assign(h->ends()->begin(), h->ends()->end());
  if (h->scores()) out.scores.assign(h->scores()->begin(), h->scores()->end());
  out.role = static_cast<HeadRole>(h->role());
  out.source_layer = h->source_layer();
  return out;
}

uint64_t RandomSessionId() {
  static thread_local std::mt19937_64 rng(std::random_device{}() ^
                                          static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()));
  uint64_t id = 0;
  while (id == 0) id = rng() >> 11;  // 53 bits: exact in JSON and Python floats
  return id;
}

Result<flatbuffers::Offset<w::Tensor>> AddTensor(flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker& packer,
                                                 const TensorView& t, const char* name) {
  if (t.data == nullptr) {
    uint64_t n = 1;
    for (auto d : t.shape) n *= d;
    if (n != 0) return InvalidArgument(std::string(name) + ": null data");
  }
  return packer.Add(fbb, w::ToWire(t.dtype), t.shape, t.data);
}

}  // namespace

Result<uint64_t> Client::CreateSession(const Profile& profile, const SessionOptions& options, uint64_t id) {
  if (id == 0) id = RandomSessionId();
  auto f = KVMEM_CLIENT_CALL(
      uint64_t, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::CreateSession>> {
        auto prof = ProfileToWire(fbb, profile);
        auto opts = w::CreateSessionOptionsDirect(
            fbb, options.chunk_min_tokens, options.chunk_max_tokens, options.sink_tokens,
            options.recent_window, options.default_budget_tokens,
            static_cast<w::SelectionMode>(options.mode),
            options.durable ? w::Durability::DURABLE : w::Durability::EPHEMERAL, options.ttl_seconds,
            options.label.c_str(), false, static_cast<w::SelectionRule>(options.retrieval.rule),
            options.retrieval.rule_value, options.retrieval.block_tokens,
            static_cast<w::BlockPooling>(options.retrieval.pooling),
            options.memory.gate_dim ? MemoryOptionsToWire(fbb, options.memory) : 0);
        return w::CreateCreateSession(fbb, id, prof, opts);
      }),
      ([](CallState& c) -> Result<uint64_t> {
        const w::CreateSessionReply* r = c.parsed.envelope->body_as_CreateSessionReply();
        if (r == nullptr) return Internal("CreateSession: unexpected reply type");
        return r->session_id();
      }));
  return f.Get();
}

Status Client::DropSession(uint64_t id) {
  auto f = KVMEM_CLIENT_CALL(
      bool, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::DropSession>> {
        return w::CreateDropSession(fbb, id);
      }),
      ([](CallState& c) -> Result<bool> {
        if (c.parsed.envelope->body_as_DropSessionReply() == nullptr) return Internal("DropSession: unexpected reply type");
        return true;
      }));
  return f.Get().status();
}

Result<std::vector<SessionSummary>> Client::ListSessions() {
  auto f = KVMEM_CLIENT_CALL(
      std::vector<SessionSummary>, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::ListSessions>> {
        return w::CreateListSessions(fbb);
      }),
      ([](CallState& c) -> Result<std::vector<SessionSummary>> {
        const w::ListSessionsReply* r = c.parsed.envelope->body_as_ListSessionsReply();
        if (r == nullptr) return Internal("ListSessions: unexpected reply type");
        std::vector<SessionSummary> out;
        if (r->sessions())
          for (const auto* s : *r->sessions()) out.push_back(SummaryFromWire(s));
        return out;
      }));
  return f.Get();
}

Result<SessionSummary> Client::SessionInfo(uint64_t id) {
  auto f = KVMEM_CLIENT_CALL(
      SessionSummary, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::SessionInfo>> {
        return w::CreateSessionInfo(fbb, id);
      }),
      ([](CallState& c) -> Result<SessionSummary> {
        const w::SessionInfoReply* r = c.parsed.envelope->body_as_SessionInfoReply();
        if (r == nullptr) return Internal("SessionInfo: unexpected reply type");
        return SummaryFromWire(r->session());
      }));
  return f.Get();
}

Result<VerifyResult> Client::VerifySession(uint64_t id) {
  auto f = KVMEM_CLIENT_CALL(
      VerifyResult, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::VerifySession>> {
        return w::CreateVerifySession(fbb, id);
      }),
      ([](CallState& c) -> Result<VerifyResult> {
        const w::VerifySessionReply* r = c.parsed.envelope->body_as_VerifySessionReply();
        if (r == nullptr) return Internal("VerifySession: unexpected reply type");
        VerifyResult v;
        v.ok = r->ok();
        v.tokens = r->tokens();
        v.chunks = r->chunks();
        if (r->bad()) for (const auto* b : *r->bad()) v.bad.push_back(b->str());
        return v;
      }));
  return f.Get();
}

Result<SnapshotResult> Client::Snapshot(uint64_t id, const std::string& name) {
  auto f = KVMEM_CLIENT_CALL(
      SnapshotResult, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::Snapshot>> {
        return w::CreateSnapshotDirect(fbb, id, name.c_str());
      }),
      ([](CallState& c) -> Result<SnapshotResult> {
        const w::SnapshotReply* r = c.parsed.envelope->body_as_SnapshotReply();
        if (r == nullptr) return Internal("Snapshot: unexpected reply type");
        return SnapshotResult{r->tokens(), r->chunks(), r->bytes()};
      }));
  return f.Get();
}

Result<RestoreResult> Client::Restore(const std::string& name, uint64_t new_id, bool durable) {
  auto f = KVMEM_CLIENT_CALL(
      RestoreResult, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::Restore>> {
        return w::CreateRestoreDirect(fbb, name.c_str(), new_id,
                                      durable ? w::Durability::DURABLE : w::Durability::EPHEMERAL);
      }),
      ([](CallState& c) -> Result<RestoreResult> {
        const w::RestoreReply* r = c.parsed.envelope->body_as_RestoreReply();
        if (r == nullptr) return Internal("Restore: unexpected reply type");
        return RestoreResult{r->session_id(), r->tokens(), r->chunks()};
      }));
  return f.Get();
}

Status Client::DropSnapshot(const std::string& name) {
  auto f = KVMEM_CLIENT_CALL(
      bool, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::DropSnapshot>> {
        return w::CreateDropSnapshotDirect(fbb, name.c_str());
      }),
      ([](CallState& c) -> Result<bool> {
        if (c.parsed.envelope->body_as_DropSnapshotReply() == nullptr) {
          return Internal("DropSnapshot: unexpected reply type");
        }
        return true;
      }));
  return f.Get().status();
}

Result<EvictResult> Client::EvictSession(uint64_t id, bool to_disk) {
  auto f = KVMEM_CLIENT_CALL(
      EvictResult, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&) -> Result<flatbuffers::Offset<w::EvictSession>> {
        return w::CreateEvictSession(fbb, id, to_disk ? w::EvictTarget::DISK : w::EvictTarget::HOST);
      }),
      ([](CallState& c) -> Result<EvictResult> {
        const w::EvictSessionReply* r = c.parsed.envelope->body_as_EvictSessionReply();
        if (r == nullptr) return Internal("EvictSession: unexpected reply type");
        EvictResult e;
        e.blocks = r->blocks();
        e.bytes = r->bytes();
        e.device_bytes = r->device_bytes();
        e.host_bytes = r->host_bytes();
        e.disk_bytes = r->disk_bytes();
        return e;
      }));
  return f.Get();
}

namespace {

// Boundary classes of appends up to this many tokens travel inline in the FlatBuffer (no
// separate data segment); larger ones as a U8 tensor.
constexpr size_t kInlineBoundaries = 2048;

flatbuffers::Offset<w::AppendKV> BuildAppend(flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker& packer,
                                             uint64_t id, uint64_t n, flatbuffers::Offset<w::Tensor> k,
                                             flatbuffers::Offset<w::Tensor> v, flatbuffers::Offset<w::Tensor> kv,
                                             std::span<const uint8_t> boundaries) {
  flatbuffers::Offset<w::Tensor> bt;
  flatbuffers::Offset<flatbuffers::Vector<uint8_t>> inline_b;
  if (!boundaries.empty() && boundaries.size() <= kInlineBoundaries) {
    inline_b = fbb.CreateVector(boundaries.data(), boundaries.size());
  } else if (!boundaries.empty()) {
    const uint64_t shape[1] = {boundaries.size()};
    bt = packer.Add(fbb, w::DType::U8, shape, boundaries.data());
  }
  w::AppendKVBuilder b(fbb);
  b.add_session_id(id);
  b.add_tokens(static_cast<uint32_t>(n));
  if (!k.IsNull()) b.add_keys(k);
  if (!v.IsNull()) b.add_values(v);
  if (!kv.IsNull()) b.add_kv(kv);
  if (!bt.IsNull()) b.add_boundaries(bt);
  if (!inline_b.IsNull()) b.add_boundary_classes(inline_b);
  return b.Finish();
}

Result<AppendResult> ParseAppend(CallState& c) {
  const w::AppendKVReply* r = c.parsed.envelope->body_as_AppendKVReply();
  if (r == nullptr) return Internal("AppendKV: unexpected reply type");
  return AppendResult{r->tokens(), r->chunks(), r->sealed()};
}

}  // namespace

Future<AppendResult> Client::AppendKVAsync(uint64_t id, const TensorView& keys, const TensorView& values,
                                           std::span<const uint8_t> boundaries) {
  return KVMEM_CLIENT_CALL(
      AppendResult, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker& packer) -> Result<flatbuffers::Offset<w::AppendKV>> {
        if (keys.shape.size() != 4) return InvalidArgument("AppendKV: keys must be [layers, kv_heads, tokens, head_dim]");
        KVMEM_ASSIGN_OR_RETURN(auto k, AddTensor(fbb, packer, keys, "keys"));
        KVMEM_ASSIGN_OR_RETURN(auto v, AddTensor(fbb, packer, values, "values"));
        return BuildAppend(fbb, packer, id, keys.shape[2], k, v, 0, boundaries);
      }),
      ParseAppend);
}

Future<AppendResult> Client::AppendKVPackedAsync(uint64_t id, const TensorView& kv,
                                                 std::span<const uint8_t> boundaries) {
  return KVMEM_CLIENT_CALL(
      AppendResult, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker& packer) -> Result<flatbuffers::Offset<w::AppendKV>> {
        if (kv.shape.size() != 5 || kv.shape[0] != 2) {
          return InvalidArgument("AppendKVPacked: kv must be [2, layers, kv_heads, tokens, head_dim]");
        }
        KVMEM_ASSIGN_OR_RETURN(auto t, AddTensor(fbb, packer, kv, "kv"));
        return BuildAppend(fbb, packer, id, kv.shape[3], 0, 0, t, boundaries);
      }),
      ParseAppend);
}

Result<AppendResult> Client::AppendKVPacked(uint64_t id, const TensorView& kv, std::span<const uint8_t> boundaries) {
  return AppendKVPackedAsync(id, kv, boundaries).Get();
}

Result<AppendResult> Client::AppendKV(uint64_t id, const TensorView& keys, const TensorView& values,
                                      std::span<const uint8_t> boundaries) {
  return AppendKVAsync(id, keys, values, boundaries).Get();
}

Future<AttendResult> Client::AttendAsync(uint64_t id, const AttendRequest& req) {
  return KVMEM_CLIENT_CALL(
      AttendResult, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker& packer) -> Result<flatbuffers::Offset<w::Attend>> {
        KVMEM_ASSIGN_OR_RETURN(auto q, AddTensor(fbb, packer, req.q, "q"));
        flatbuffers::Offset<w::Tensor> nk, nv;
        if (req.new_k.has_value() != req.new_v.has_value()) {
          return InvalidArgument("Attend: new_k and new_v must be given together");
        }
        if (req.new_k) {
          KVMEM_ASSIGN_OR_RETURN(nk, AddTensor(fbb, packer, *req.new_k, "new_k"));
          KVMEM_ASSIGN_OR_RETURN(nv, AddTensor(fbb, packer, *req.new_v, "new_v"));
        }
        w::AttendBuilder b(fbb);
        b.add_session_id(id);
        b.add_layer(req.layer);
        b.add_q(q);
        if (req.new_k) {
          b.add_new_k(nk);
          b.add_new_v(nv);
        }
        b.add_boundary(req.boundary);
        b.add_budget_tokens(req.budget_tokens);
        b.add_mode(static_cast<w::SelectionMode>(req.mode));
        b.add_return_lse(req.return_lse);
        b.add_return_selection(req.return_selection);
        b.add_out_dtype(w::ToWire(req.out_dtype));
        b.add_retrieval_rule(static_cast<w::SelectionRule>(req.retrieval.rule));
        b.add_retrieval_rule_value(req.retrieval.rule_value);
        b.add_retrieval_block_tokens(req.retrieval.block_tokens);
        b.add_retrieval_block_pooling(static_cast<w::BlockPooling>(req.retrieval.pooling));
        return b.Finish();
      }),
      ([](CallState& c) -> Result<AttendResult> {
        const w::AttendReply* r = c.parsed.envelope->body_as_AttendReply();
        if (r == nullptr) return Internal("Attend: unexpected reply type");
        AttendResult out;
        const w::DType floats[3] = {w::DType::BF16, w::DType::F16, w::DType::F32};
        const w::Tensor* t = r->out();
        if (t == nullptr || t->shape() == nullptr || t->shape()->size() != 2) return Internal("Attend: reply without out");
        const uint64_t shape[2] = {t->shape()->Get(0), t->shape()->Get(1)};
        KVMEM_ASSIGN_OR_RETURN(const uint8_t* p, w::ResolveTensor(c.parsed, t, "out", shape, floats));
        out.out.assign(p, p + t->bytes());
        KVMEM_ASSIGN_OR_RETURN(out.out_dtype, w::FloatDTypeFromWire(t->dtype()));
        if (const w::Tensor* l = r->lse()) {
          const uint64_t lshape[1] = {shape[0]};
          const w::DType f32[1] = {w::DType::F32};
          KVMEM_ASSIGN_OR_RETURN(const uint8_t* lp, w::ResolveTensor(c.parsed, l, "lse", lshape, f32));
          out.lse.resize(shape[0]);
          std::memcpy(out.lse.data(), lp, shape[0] * 4);
        }
        if (r->tokens_attended()) out.tokens_attended.assign(r->tokens_attended()->begin(), r->tokens_attended()->end());
        if (r->selection())
          for (const auto* h : *r->selection()) out.selection.push_back(SelectionFromWire(h));
        return out;
      }));
}

Result<AttendResult> Client::Attend(uint64_t id, const AttendRequest& req) { return AttendAsync(id, req).Get(); }

Result<RetrieveResult> Client::Retrieve(uint64_t id, uint32_t layer, const TensorView& q, uint32_t budget_tokens,
                                        uint32_t top_chunks) {
  RetrieveRequest req;
  req.layer = layer;
  req.q = q;
  req.budget_tokens = budget_tokens;
  req.top_chunks = top_chunks;
  return Retrieve(id, req);
}

Result<RetrieveResult> Client::Retrieve(uint64_t id, const RetrieveRequest& req) {
  auto f = KVMEM_CLIENT_CALL(
      RetrieveResult, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker& packer) -> Result<flatbuffers::Offset<w::Retrieve>> {
        KVMEM_ASSIGN_OR_RETURN(auto qt, AddTensor(fbb, packer, req.q, "q"));
        return w::CreateRetrieve(fbb, id, req.layer, qt, req.budget_tokens, req.top_chunks,
                                 static_cast<w::SelectionMode>(req.mode),
                                 static_cast<w::SelectionRule>(req.retrieval.rule),
                                 req.retrieval.rule_value, req.retrieval.block_tokens,
                                 static_cast<w::BlockPooling>(req.retrieval.pooling));
      }),
      ([](CallState& c) -> Result<RetrieveResult> {
        const w::RetrieveReply* r = c.parsed.envelope->body_as_RetrieveReply();
        if (r == nullptr) return Internal("Retrieve: unexpected reply type");
        RetrieveResult out;
        if (r->heads())
          for (const auto* h : *r->heads()) out.heads.push_back(SelectionFromWire(h));
        out.nodes_visited = r->nodes_visited();
        out.bytes_read = r->bytes_read();
        return out;
      }));
  return f.Get();
}

Result<PutMemoryResult> Client::PutMemoryBlocks(uint64_t id, const MemoryBlocksToPut& blocks) {
  auto f = KVMEM_CLIENT_CALL(
      PutMemoryResult, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker& packer)
           -> Result<flatbuffers::Offset<w::PutMemoryBlocks>> {
        KVMEM_ASSIGN_OR_RETURN(auto keys, AddTensor(fbb, packer, blocks.gate_keys, "gate_keys"));
        KVMEM_ASSIGN_OR_RETURN(auto payloads, AddTensor(fbb, packer, blocks.payloads, "payloads"));
        std::vector<flatbuffers::Offset<flatbuffers::String>> labels;
        for (const std::string& l : blocks.labels) labels.push_back(fbb.CreateString(l));
        auto starts = fbb.CreateVector(blocks.span_starts);
        auto ends = fbb.CreateVector(blocks.span_ends);
        auto lv = blocks.labels.empty() ? 0 : fbb.CreateVector(labels);
        return w::CreatePutMemoryBlocks(fbb, id, keys, payloads, starts, ends, lv);
      }),
      ([](CallState& c) -> Result<PutMemoryResult> {
        const w::PutMemoryBlocksReply* r = c.parsed.envelope->body_as_PutMemoryBlocksReply();
        if (r == nullptr) return Internal("PutMemoryBlocks: unexpected reply type");
        PutMemoryResult out;
        if (r->ids()) out.ids.assign(r->ids()->begin(), r->ids()->end());
        out.blocks = r->blocks();
        out.bytes = r->bytes();
        return out;
      }));
  return f.Get();
}

Result<MemorySelection> Client::SelectMemory(uint64_t id, const TensorView& query, uint32_t k,
                                             MemoryGate gate, uint32_t budget_leaves,
                                             bool return_payloads) {
  auto f = KVMEM_CLIENT_CALL(
      MemorySelection, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker& packer)
           -> Result<flatbuffers::Offset<w::SelectMemory>> {
        KVMEM_ASSIGN_OR_RETURN(auto q, AddTensor(fbb, packer, query, "query"));
        return w::CreateSelectMemory(fbb, id, q, k, static_cast<w::MemoryGate>(gate),
                                     budget_leaves, return_payloads);
      }),
      ([](CallState& c) -> Result<MemorySelection> {
        const w::SelectMemoryReply* r = c.parsed.envelope->body_as_SelectMemoryReply();
        if (r == nullptr) return Internal("SelectMemory: unexpected reply type");
        MemorySelection out;
        if (r->ids()) out.ids.assign(r->ids()->begin(), r->ids()->end());
        if (r->scores()) out.scores.assign(r->scores()->begin(), r->scores()->end());
        out.blocks = BlocksFromWire(r->blocks());
        if (r->payloads()) {
          KVMEM_RETURN_IF_ERROR(
              PayloadsFromWire(c, r->payloads(), out.ids.size(), &out.payloads, &out.payload_dtype));
        }
        out.exact = r->exact();
        out.keys_scored = r->keys_scored();
        out.leaves_visited = r->leaves_visited();
        return out;
      }));
  return f.Get();
}

Result<MemoryBlocks> Client::GetMemoryBlocks(uint64_t id, std::span<const uint64_t> ids,
                                             bool return_gate_keys) {
  auto f = KVMEM_CLIENT_CALL(
      MemoryBlocks, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&)
           -> Result<flatbuffers::Offset<w::GetMemoryBlocks>> {
        return w::CreateGetMemoryBlocks(fbb, id, fbb.CreateVector(ids.data(), ids.size()),
                                        return_gate_keys);
      }),
      ([](CallState& c) -> Result<MemoryBlocks> {
        const w::GetMemoryBlocksReply* r = c.parsed.envelope->body_as_GetMemoryBlocksReply();
        if (r == nullptr) return Internal("GetMemoryBlocks: unexpected reply type");
        MemoryBlocks out;
        out.blocks = BlocksFromWire(r->blocks());
        KVMEM_RETURN_IF_ERROR(
            PayloadsFromWire(c, r->payloads(), out.blocks.size(), &out.payloads, &out.payload_dtype));
        if (const w::Tensor* t = r->gate_keys()) {
          if (t->shape() == nullptr || t->shape()->size() != 2) return Internal("GetMemoryBlocks: bad gate_keys");
          const uint64_t shape[2] = {out.blocks.size(), t->shape()->Get(1)};
          const w::DType f32[1] = {w::DType::F32};
          KVMEM_ASSIGN_OR_RETURN(const uint8_t* p, w::ResolveTensor(c.parsed, t, "gate_keys", shape, f32));
          out.gate_keys.resize(shape[0] * shape[1]);
          std::memcpy(out.gate_keys.data(), p, out.gate_keys.size() * sizeof(float));
        }
        return out;
      }));
  return f.Get();
}

Result<uint64_t> Client::DropMemoryBlocks(uint64_t id, std::span<const uint64_t> ids) {
  auto f = KVMEM_CLIENT_CALL(
      uint64_t, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&)
           -> Result<flatbuffers::Offset<w::DropMemoryBlocks>> {
        return w::CreateDropMemoryBlocks(fbb, id, fbb.CreateVector(ids.data(), ids.size()));
      }),
      ([](CallState& c) -> Result<uint64_t> {
        const w::DropMemoryBlocksReply* r = c.parsed.envelope->body_as_DropMemoryBlocksReply();
        if (r == nullptr) return Internal("DropMemoryBlocks: unexpected reply type");
        return r->blocks();
      }));
  return f.Get();
}

Result<MemoryListing> Client::ListMemoryBlocks(uint64_t id, uint64_t after_id, uint32_t limit) {
  auto f = KVMEM_CLIENT_CALL(
      MemoryListing, impl_.get(),
      ([&](flatbuffers::FlatBufferBuilder& fbb, w::TensorPacker&)
           -> Result<flatbuffers::Offset<w::ListMemoryBlocks>> {
        return w::CreateListMemoryBlocks(fbb, id, after_id, limit);
      }),
      ([](CallState& c) -> Result<MemoryListing> {
        const w::ListMemoryBlocksReply* r = c.parsed.envelope->body_as_ListMemoryBlocksReply();
        if (r == nullptr) return Internal("ListMemoryBlocks: unexpected reply type");
        MemoryListing out;
        out.blocks = BlocksFromWire(r->blocks());
        out.total_blocks = r->total_blocks();
        out.bytes = r->bytes();
        out.options = MemoryOptionsFromWire(r->options());
        return out;
      }));
  return f.Get();
}

std::vector<uint8_t> BoundaryClassesFromTokens(const std::vector<std::string>& tokens) {
  std::vector<uint8_t> out(tokens.size(), 0);
  auto starts_word = [](const std::string& t) {
    if (t.empty()) return false;
    const unsigned char c = static_cast<unsigned char>(t[0]);
    if (c == ' ' || c == '\t' || c == '\n') return true;
    // GPT-2 byte-level BPE marks a leading space as "Ġ" (C4 A0), SentencePiece as "▁" (E2 96 81).
    if (t.size() >= 2 && c == 0xC4 && static_cast<unsigned char>(t[1]) == 0xA0) return true;
    if (t.size() >= 3 && c == 0xE2 && static_cast<unsigned char>(t[1]) == 0x96 &&
        static_cast<unsigned char>(t[2]) == 0x81) return true;
    return false;
  };
  for (size_t i = 0; i < tokens.size(); ++i) {
    std::string t = tokens[i];
    // Byte-level BPE spells "\n" as "Ċ" (C4 8A).
    size_t pos;
    while ((pos = t.find("\xC4\x8A")) != std::string::npos) t.replace(pos, 2, "\n");
    std::string trimmed = t;
    while (!trimmed.empty() && (trimmed.back() == ' ' || trimmed.back() == '\t')) trimmed.pop_back();
    uint8_t c = 0;
    if (t.find("\n\n") != std::string::npos) c = 5;
    else if (t.find('\n') != std::string::npos || trimmed == "{" || trimmed == "}" ||
             (!trimmed.empty() && (trimmed.back() == '{' || trimmed.back() == '}'))) c = 4;
    else if (!trimmed.empty() && (trimmed.back() == '.' || trimmed.back() == '!' || trimmed.back() == '?')) c = 3;
    else if (!trimmed.empty() && (trimmed.back() == ',' || trimmed.back() == ';' || trimmed.back() == ':')) c = 2;
    else if (i + 1 < tokens.size() && starts_word(tokens[i + 1])) c = 1;
    else if (!t.empty() && (t.back() == ' ' || t.back() == '\t')) c = 1;
    // A section marker ("#" heading start or "\n\n") after this token also makes a section cut.
    if (i + 1 < tokens.size() && c < 5) {
      const std::string& next = tokens[i + 1];
      if (!next.empty() && next[0] == '#' && c == 4) c = 5;
    }
    out[i] = c;
  }
  return out;
}

}  // namespace kvmem::client
