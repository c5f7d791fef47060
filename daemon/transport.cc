#include "daemon/transport.h"

#include <boost/asio/post.hpp>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <bit>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include <ucs/debug/log_def.h>

#include "common/log.h"
#include "wire/framing.h"

namespace kvmem {

namespace w = ::kvmem::wire;

struct UcxServer::Connection {
  uint64_t id = 0;
  ucp_ep_h ep = nullptr;
  std::string tenant;          // set by Hello on the transport thread
  std::string peer;
  uint32_t inflight = 0;       // transport thread only
  bool dead = false;           // the client left (error callback) or is closed by the daemon
  std::chrono::steady_clock::time_point last_active;  // last request received
  // Rendezvous receives still in UCX, with their requests: cancelled when the endpoint is
  // closed, so a client that left mid-transfer cannot keep their buffers (transport thread).
  std::unordered_map<UcxServer::Inbound*, void*> receives;
  UcxServer* server = nullptr;  // for the error callback: a departed client is due for reaping
};

namespace {

// Receive buffers. Large messages (AppendKV payloads of megabytes) would otherwise cost a fresh
// allocation each: glibc serves them with mmap or trims them back to the kernel, and every reuse
// then page-faults and zero-fills the buffer before UCX copies into it — a second pass over the
// data. Buffers of 64 KiB and more are therefore kept on per-size-class free lists (powers of
// two) and reused, up to kRetainBytes in all; smaller ones go to malloc. Buffers are released
// from executor threads too, hence the mutex (held for a list push/pop only).
class RecvBufferPool {
 public:
  static constexpr size_t kMinPooled = 64 << 10;
  static constexpr size_t kRetainBytes = 256ull << 20;
  // Messages over kMinHuge (tensor payloads) get a buffer of at least one 2 MiB huge page.
  static constexpr size_t kHugeShift = 21;
  static constexpr size_t kMinHuge = 512 << 10;

  uint8_t* Get(size_t bytes, size_t* capacity) {
    const size_t n = w::AlignUp(bytes == 0 ? 1 : bytes, 64);
    if (n < kMinPooled) {
      *capacity = n;
      return static_cast<uint8_t*>(std::aligned_alloc(64, n));
    }
    // capacity 2^cls >= n; over kMinHuge, at least a whole huge page (see Fresh).
    const size_t cls = std::max<size_t>(std::bit_width(n - 1), n > kMinHuge ? kHugeShift : 0);
    *capacity = size_t{1} << cls;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cls < free_.size() && !free_[cls].empty()) {
        uint8_t* p = free_[cls].back();
        free_[cls].pop_back();
        retained_ -= *capacity;
        return p;
      }
    }
    return Fresh(*capacity);
  }

  void Put(uint8_t* p, size_t capacity) {
    if (p == nullptr) return;
    if (capacity >= kMinPooled) {
      const size_t cls = std::bit_width(capacity - 1);
      std::lock_guard<std::mutex> lock(mu_);
      if (retained_ + capacity <= kRetainBytes) {
        if (free_.size() <= cls) free_.resize(cls + 1);
        free_[cls].push_back(p);
        retained_ += capacity;
        return;
      }
    }
    std::free(p);
  }

  // Frees every retained buffer (idle trim): the retention is for back-to-back large
  // messages, and an idle daemon should not keep up to kRetainBytes of touched pages.
  uint64_t ReleaseRetained() {
    std::vector<std::vector<uint8_t*>> lists;
    uint64_t released = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      lists.swap(free_);
      released = retained_;
      retained_ = 0;
    }
    for (auto& list : lists)
      for (uint8_t* p : list) std::free(p);
    return released;
  }

  uint64_t retained_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return retained_;
  }

  ~RecvBufferPool() {
    for (auto& list : free_)
      for (uint8_t* p : list) std::free(p);
  }

 private:
  // Buffers of 2 MiB and more start on a huge-page boundary and ask for transparent huge pages:
  // UCX's shared-memory rendezvous (CMA) then writes them with far fewer page walks.
  static uint8_t* Fresh(size_t capacity) {
    constexpr size_t kHuge = size_t{1} << kHugeShift;
    if (capacity < kHuge) return static_cast<uint8_t*>(std::aligned_alloc(64, capacity));
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(kHuge, capacity));
    if (p != nullptr) (void)madvise(p, capacity, MADV_HUGEPAGE);
    return p;
  }

  std::mutex mu_;
  std::vector<std::vector<uint8_t*>> free_;  // by log2(capacity)
  size_t retained_ = 0;
};

RecvBufferPool& RecvBuffers() {
  static RecvBufferPool* pool = new RecvBufferPool();  // outlives every Inbound; never destroyed
  return *pool;
}

struct PooledFree {
  size_t capacity = 0;
  void operator()(uint8_t* p) const { RecvBuffers().Put(p, capacity); }
};
using AlignedBuffer = std::unique_ptr<uint8_t[], PooledFree>;

}  // namespace

// Closing the endpoint of a departed client flushes lanes UCX already failed; UCX then logs
// "error during flush" once per lane at ERROR level in error mode none (DIAG in mode peer),
// three lines per departed client. kvmemd flushes endpoints only to close them, and the close
// completes regardless, so these are demoted to debug here and every other message goes on to
// UCX's own handler.
static std::atomic<uint64_t> g_close_flush_errors{0};

static ucs_log_func_rc_t DemoteCloseFlushErrors(const char* file, unsigned line, const char* function,
                                                ucs_log_level_t level,
                                                const ucs_log_component_config_t* comp_conf,
                                                const char* message, va_list ap) {
  (void)file;
  (void)line;
  (void)comp_conf;
  (void)ap;
  if (level == UCS_LOG_LEVEL_ERROR && message != nullptr &&
      std::strstr(message, "error during flush") != nullptr &&
      (function == nullptr || std::strstr(function, "flush") != nullptr)) {
    if (g_close_flush_errors.fetch_add(1, std::memory_order_relaxed) % 100000 == 0) {
      KVMEM_LOG_DEBUG("UCX flush error while closing a departed client's endpoint (demoted)");
    }
    return UCS_LOG_FUNC_RC_STOP;
  }
  return UCS_LOG_FUNC_RC_CONTINUE;
}

uint64_t ReleaseRetainedReceiveBuffers() { return RecvBuffers().ReleaseRetained(); }
uint64_t RetainedReceiveBufferBytes() { return RecvBuffers().retained_bytes(); }

static AlignedBuffer AllocAligned(size_t bytes) {
  size_t capacity = 0;
  uint8_t* p = RecvBuffers().Get(bytes, &capacity);
  return AlignedBuffer(p, PooledFree{capacity});
}

struct UcxServer::Inbound {
  UcxServer* server = nullptr;
  std::shared_ptr<Connection> conn;
  std::vector<uint8_t> header;
  AlignedBuffer data;
  size_t data_bytes = 0;
  // AppendKV received in place: the plan, and the receive's iovec list (lives until it ends).
  std::unique_ptr<AppendLanding> landing;
  std::vector<ucp_dt_iov_t> iov;
  w::Parsed parsed;
  // Operations: latency is measured from `arrival` to the reply send, per op (daemon/metrics.h).
  std::chrono::steady_clock::time_point arrival;
  // AppendKV phases (kvmem_append_phase_seconds): payload complete, handler start and end.
  std::chrono::steady_clock::time_point received, started, handled;
  int op = 0;
};

namespace {

struct PendingSend {
  std::atomic<uint64_t>* outstanding = nullptr;
  ~PendingSend() {
    if (outstanding) outstanding->fetch_sub(1);
  }
  w::Frame frame;
  std::unique_ptr<Reply> reply;
  std::vector<ucp_dt_iov_t> iov;
};

}  // namespace

UcxServer::UcxServer(TransportOptions options, Service* service, ExecutorPool* executors,
                     boost::asio::io_context* io)
    : options_(std::move(options)), service_(service), executors_(executors), io_(io) {}

UcxServer::~UcxServer() {
  if (poll_thread_.joinable()) {
    poll_exit_ = true;
    poll_thread_.join();
  }
  if (worker_) CloseAll();
  housekeeping_.reset();
  efd_.reset();
  listener_.reset();
  worker_.reset();
  context_.reset();
}

Status UcxServer::Start() {
  ucx::ContextOptions copts{options_.transports, /*wakeup=*/true, {}};
  if (options_.rndv_scheme != "auto") copts.settings.emplace_back("RNDV_SCHEME", options_.rndv_scheme);
  // One rendezvous rail. With put_zcopy UCX 1.13 would otherwise add TCP as a second rma_bw
  // lane beside CMA, which the peer (a client with UCX's defaults) did not wire up: the
  // endpoint's wireup then aborts the daemon (ep_addr_index < num_ep_addrs).
  if (options_.rndv_scheme == "put_zcopy") copts.settings.emplace_back("MAX_RNDV_RAILS", "1");
  // Endpoint ids on the wire are keys of a map, not pointers (UCX's default does this only in
  // error mode peer). A departed client's endpoint is closed and freed while a message it sent
  // (a rendezvous RTS) may still be queued in shared memory; with pointer ids UCX dereferences
  // the freed endpoint (ucp_am_rndv_process_rts: Assertion (*ep_p)->worker == worker), with
  // map keys it finds no endpoint and drops the message. UCX_PROTO_INDIRECT_ID overrides it.
  copts.settings.emplace_back("PROTO_INDIRECT_ID", "on");
  KVMEM_ASSIGN_OR_RETURN(context_, ucx::CreateContext(copts));
  static std::once_flag log_handler_once;
  std::call_once(log_handler_once, [] { ucs_log_push_handler(&DemoteCloseFlushErrors); });
  KVMEM_ASSIGN_OR_RETURN(worker_, ucx::CreateWorker(context_.get(), UCS_THREAD_MODE_SINGLE));
  KVMEM_ASSIGN_OR_RETURN(max_am_header_, ucx::MaxAmHeader(worker_.get()));

  ucp_am_handler_param_t am{};
  am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  am.id = w::kRequestAmId;
  am.cb = &UcxServer::OnRequestAm;
  am.arg = this;
  am.flags = UCP_AM_FLAG_WHOLE_MSG;
  KVMEM_RETURN_IF_ERROR(ucx::FromUcs(ucp_worker_set_am_recv_handler(worker_.get(), &am),
                                     "ucp_worker_set_am_recv_handler"));

  std::string host;
  KVMEM_RETURN_IF_ERROR(ucx::ParseHostPort(options_.listen, &host, &port_));
  sockaddr_storage addr{};
  socklen_t addrlen = 0;
  KVMEM_RETURN_IF_ERROR(ucx::ResolveSockaddr(host, port_, &addr, &addrlen));
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  lp.sockaddr.addrlen = addrlen;
  lp.conn_handler.cb = &UcxServer::OnConnRequest;
  lp.conn_handler.arg = this;
  ucp_listener_h listener = nullptr;
  KVMEM_RETURN_IF_ERROR(ucx::FromUcs(ucp_listener_create(worker_.get(), &lp, &listener),
                                     "listen on " + options_.listen));
  listener_.reset(listener);
  ucp_listener_attr_t la{};
  la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (ucp_listener_query(listener, &la) == UCS_OK) {
    if (la.sockaddr.ss_family == AF_INET) {
      port_ = ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port);
    } else if (la.sockaddr.ss_family == AF_INET6) {
      port_ = ntohs(reinterpret_cast<const sockaddr_in6*>(&la.sockaddr)->sin6_port);
    }
  }

  if (options_.poll) {
    poll_thread_ = std::thread([this] { PollLoop(); });
  } else {
    int fd = -1;
    KVMEM_RETURN_IF_ERROR(ucx::FromUcs(ucp_worker_get_efd(worker_.get(), &fd), "ucp_worker_get_efd"));
    efd_ = std::make_unique<boost::asio::posix::stream_descriptor>(*io_, ::dup(fd));
    ArmAndWait();
    housekeeping_ = std::make_unique<boost::asio::steady_timer>(*io_);
    Housekeeping();
  }
  KVMEM_LOG_INFO("listening on {} (port {}), progress={}, max_am_header={}B, error_mode={}, "
                 "client_idle_timeout={}s",
                 options_.listen, port_, options_.poll ? "poll" : "event", max_am_header_,
                 options_.peer_error_handling ? "peer" : "none", options_.idle_timeout.count());
  return Status::OK();
}

void UcxServer::OnConnRequest(ucp_conn_request_h request, void* arg) {
  static_cast<UcxServer*>(arg)->Accept(request);
}

void UcxServer::Accept(ucp_conn_request_h request) {
  ucp_conn_request_attr_t attr{};
  attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
  std::string peer = "?";
  if (ucp_conn_request_query(request, &attr) == UCS_OK) {
    char buf[INET6_ADDRSTRLEN] = {};
    if (attr.client_address.ss_family == AF_INET) {
      auto* a = reinterpret_cast<sockaddr_in*>(&attr.client_address);
      inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
      peer = std::string(buf) + ":" + std::to_string(ntohs(a->sin_port));
    }
  }
  if (stopping_) {
    ucp_listener_reject(listener_.get(), request);
    return;
  }
  if (connections_.size() >= options_.max_connections) {
    // Rejected before an endpoint exists: an over-limit client costs nothing but the log line
    // (the first and then every 1000th, so a flood cannot fill the log).
    ucp_listener_reject(listener_.get(), request);
    if (counters_.connections_rejected++ % 1000 == 0) {
      KVMEM_LOG_WARN("connection from {} rejected: {} connections open (max_connections); {} "
                     "rejected so far", peer, connections_.size(),
                     counters_.connections_rejected.load());
    }
    return;
  }
  auto conn = std::make_shared<Connection>();
  conn->id = next_connection_id_++;
  conn->peer = peer;
  conn->server = this;
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  ep.conn_request = request;
  ep.err_mode = options_.peer_error_handling ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.err_handler.cb = &UcxServer::OnEndpointError;
  ep.err_handler.arg = conn.get();
  ucp_ep_h handle = nullptr;
  ucs_status_t st = ucp_ep_create(worker_.get(), &ep, &handle);
  if (st != UCS_OK) {
    KVMEM_LOG_WARN("accept from {} failed: {}", peer, ucs_status_string(st));
    return;
  }
  conn->ep = handle;
  conn->last_active = std::chrono::steady_clock::now();
  connections_[handle] = conn;
  counters_.connections_accepted++;
  counters_.connections_open = connections_.size();
  counters_.endpoints++;
  KVMEM_LOG_DEBUG("connection {} from {}", conn->id, peer);
}

void UcxServer::OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status) {
  auto* conn = static_cast<Connection*>(arg);
  conn->dead = true;
  conn->server->reap_due_ = true;
  KVMEM_LOG_DEBUG("connection {} ({}) closed: {}", conn->id, conn->peer, ucs_status_string(status));
}

void UcxServer::SendError(Connection* conn, uint64_t request_id, const Status& status) {
  auto reply = std::make_unique<Reply>();
  reply->SetError(request_id, status);
  counters_.messages_rejected++;
  GlobalMetrics().errors[std::min<int>(static_cast<int>(w::ToWire(status.code())), kMaxCodes - 1)]++;
  SendReply(conn, std::move(reply));
}

ucs_status_t UcxServer::OnRequestAm(void* arg, const void* header, size_t header_length,
                                    void* data, size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxServer*>(arg);
  const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
  auto it = self->connections_.find(param->reply_ep);
  // Refusing a rendezvous message: returning UCS_OK without receiving makes UCX drop it and
  // complete the sender (calling ucp_am_data_release here as well would free it twice).
  if (param->reply_ep == nullptr || it == self->connections_.end()) {
    // Nobody to answer: the client must send with UCP_AM_SEND_FLAG_REPLY.
    return UCS_OK;
  }
  std::shared_ptr<Connection> conn = it->second;
  if (conn->dead) return UCS_OK;  // departed (or closed for idleness): nobody to answer
  conn->last_active = std::chrono::steady_clock::now();
  self->counters_.bytes_in += header_length + length;
  (rndv ? self->counters_.received_rendezvous : self->counters_.received_eager)++;

  // The request id, when the header verifies, so even refusals can be matched by the client.
  auto in = std::make_unique<Inbound>();
  in->server = self;
  in->conn = conn;
  in->arrival = std::chrono::steady_clock::now();
  in->header.assign(static_cast<const uint8_t*>(header),
                    static_cast<const uint8_t*>(header) + header_length);
  uint64_t rid = 0;
  {
    flatbuffers::Verifier v(in->header.data(), in->header.size(), w::kMaxVerifierDepth,
                            w::kMaxVerifierTables);
    if (header_length >= 8 && w::VerifyEnvelopeBuffer(v)) {
      rid = w::GetEnvelope(in->header.data())->request_id();
    }
  }
  Status refuse;
  if (header_length + length > self->options_.max_message_bytes) {
    refuse = InvalidArgument("message of " + std::to_string(header_length + length) +
                             " bytes exceeds max_message_bytes (" +
                             std::to_string(self->options_.max_message_bytes) + ")");
  } else if (self->stopping_) {
    refuse = Unavailable("daemon is shutting down");
  } else if (conn->inflight >= self->options_.max_inflight_per_endpoint) {
    refuse = ResourceExhausted("too many requests in flight on this connection (max " +
                               std::to_string(self->options_.max_inflight_per_endpoint) + ")");
  }
  if (!refuse.ok()) {
    self->SendError(conn.get(), rid, refuse);
    return UCS_OK;
  }

  ++conn->inflight;
  self->counters_.requests_inflight++;
  in->data_bytes = length;
  in->data = AllocAligned(length);
  if (in->data == nullptr) {
    self->Finish(std::move(in), nullptr);
    return UCS_OK;
  }
  if (!rndv) {
    if (length) std::memcpy(in->data.get(), data, length);
    // An eager AppendKV is only recorded (the session's prediction counts it).
    if (!conn->tenant.empty() && self->options_.append_landing) {
      in->landing = self->service_->PlanLanding(conn->tenant, in->header, in->data.get(), length, /*place=*/false);
    }
    self->Dispatch(std::move(in));
    return UCS_OK;
  }
  // Rendezvous: fetch the data straight into our buffer, or, for an AppendKV whose chunk rows
  // have a plan, those rows straight into their KV-pool blocks and the rest into our buffer at
  // its own offsets (one iovec list in message order; docs/architecture.md, "Append path").
  if (!conn->tenant.empty() && self->options_.append_landing) {
    in->landing = self->service_->PlanLanding(conn->tenant, in->header, in->data.get(), length, /*place=*/true);
  }
  if (in->landing != nullptr && in->landing->placed) {
    uint64_t at = 0;
    uint8_t* buf = in->data.get();
    for (const AppendLanding::Piece& p : in->landing->pieces) {
      if (p.msg_offset > at) in->iov.push_back({buf + at, p.msg_offset - at});
      in->iov.push_back({in->landing->pool_base + p.pool_offset, p.bytes});
      at = p.msg_offset + p.bytes;
    }
    if (length > at) in->iov.push_back({buf + at, length - at});
    in->landing->data = buf;
  }
  Inbound* raw = in.release();
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                    UCP_OP_ATTR_FIELD_DATATYPE;
  rp.cb.recv_am = &UcxServer::OnRndvDone;
  rp.user_data = raw;
  void* dst = raw->data.get();
  size_t count = length;
  rp.datatype = ucp_dt_make_contig(1);
  if (!raw->iov.empty()) {
    rp.datatype = UCP_DATATYPE_IOV;
    dst = raw->iov.data();
    count = raw->iov.size();
  }
  ucs_status_ptr_t req = ucp_am_recv_data_nbx(self->worker_.get(), data, dst, count, &rp);
  if (req == nullptr) {
    self->Dispatch(std::unique_ptr<Inbound>(raw));
  } else if (UCS_PTR_IS_PTR(req)) {
    conn->receives.emplace(raw, req);
  } else {
    std::unique_ptr<Inbound> owned(raw);
    auto reply = std::make_unique<Reply>();
    reply->SetError(rid, ucx::FromUcs(UCS_PTR_STATUS(req), "receive data"));
    self->Finish(std::move(owned), std::move(reply));
  }
  return UCS_OK;
}

void UcxServer::OnRndvDone(void* request, ucs_status_t status, size_t length, void* user_data) {
  std::unique_ptr<Inbound> in(static_cast<Inbound*>(user_data));
  ucp_request_free(request);
  in->conn->receives.erase(in.get());
  UcxServer* self = in->server;
  if (status != UCS_OK) {
    auto reply = std::make_unique<Reply>();
    reply->SetError(0, ucx::FromUcs(status, "receive data"));
    self->Finish(std::move(in), std::move(reply));
    return;
  }
  self->Dispatch(std::move(in));
}

void UcxServer::Dispatch(std::unique_ptr<Inbound> in) {
  in->received = std::chrono::steady_clock::now();
  auto parsed = w::ParseMessage(in->header, in->data.get(), in->data_bytes);
  if (!parsed.ok()) {
    auto reply = std::make_unique<Reply>();
    uint64_t rid = 0;
    flatbuffers::Verifier v(in->header.data(), in->header.size(), w::kMaxVerifierDepth,
                            w::kMaxVerifierTables);
    if (in->header.size() >= 8 && w::VerifyEnvelopeBuffer(v)) {
      rid = w::GetEnvelope(in->header.data())->request_id();
    }
    reply->SetError(rid, parsed.status());
    counters_.messages_rejected++;
    Finish(std::move(in), std::move(reply));
    return;
  }
  in->parsed = *parsed;
  const w::Envelope* env = in->parsed.envelope;
  in->op = static_cast<int>(env->body_type());
  Connection* conn = in->conn.get();

  // Connection-level ops run inline on the transport thread.
  if (env->body_type() == w::Body::Hello) {
    auto reply = std::make_unique<Reply>();
    auto tenant = service_->Authenticate(env->body_as_Hello());
    if (tenant.ok()) {
      conn->tenant = *tenant;
      service_->HelloReply(env->request_id(), conn->tenant, reply.get());
      KVMEM_LOG_DEBUG("connection {} authenticated as tenant '{}'", conn->id, conn->tenant);
    } else {
      conn->tenant.clear();
      reply->SetError(env->request_id(), tenant.status());
    }
    Finish(std::move(in), std::move(reply));
    return;
  }
  if (env->body_type() == w::Body::Ping || conn->tenant.empty()) {
    auto reply = std::make_unique<Reply>();
    service_->Handle(RequestContext{conn->id, conn->tenant}, in->parsed, reply.get());
    Finish(std::move(in), std::move(reply));
    return;
  }
  const uint64_t key = Service::ShardKey(env);
  RequestContext ctx{conn->id, conn->tenant};
  Inbound* raw = in.release();
  executors_->Submit(key, [this, raw, ctx, key] {
    std::unique_ptr<Inbound> owned(raw);
    owned->started = std::chrono::steady_clock::now();
    auto reply = std::make_unique<Reply>();
    service_->Handle(ctx, owned->parsed, reply.get(), owned->landing.get());
    owned->handled = std::chrono::steady_clock::now();
    owned->landing.reset();  // blocks not adopted go back to the pool
    // The request's data is consumed (replies never point into it): its buffer goes back to the
    // pool now rather than after the reply is sent, so the next rendezvous receive reuses a
    // buffer that is still in cache (LIFO) and only a couple of large buffers stay in
    // circulation however many requests are in flight.
    owned->parsed = w::Parsed{};
    owned->data.reset();
    PostReply(std::move(owned), std::move(reply));
    service_->AfterReply(ctx, key);  // index upkeep once the client has its answer
  });
}

void UcxServer::PostReply(std::unique_ptr<Inbound> in, std::unique_ptr<Reply> reply) {
  if (executors_->threads() == 0) {  // inline executor: already on the transport thread
    Finish(std::move(in), std::move(reply));
    return;
  }
  {
    std::lock_guard<std::mutex> lock(out_mu_);
    outbound_.emplace_back(std::move(in), std::move(reply));
  }
  outbound_pending_.store(true, std::memory_order_release);
  if (!options_.poll) boost::asio::post(*io_, [this] { ProgressAll(); });
}

void UcxServer::Finish(std::unique_ptr<Inbound> in, std::unique_ptr<Reply> reply) {
  Connection* conn = in->conn.get();
  if (conn->inflight > 0) --conn->inflight;
  counters_.requests_inflight--;
  if (reply == nullptr) {
    reply = std::make_unique<Reply>();
    reply->SetError(0, ResourceExhausted("out of host memory for the request"));
  }
  RecordMetrics(*in, *reply);
  SendReply(conn, std::move(reply));
}

void UcxServer::RecordMetrics(const Inbound& in, const Reply& reply) {
  int code = 0;
  const uint8_t* buf = reply.fbb.GetBufferPointer();
  if (reply.fbb.GetSize() > 0) {
    const w::Envelope* env = w::GetEnvelope(buf);
    if (env->status()) code = static_cast<int>(env->status()->code());
  }
  const auto now = std::chrono::steady_clock::now();
  GlobalMetrics().RecordRequest(in.op, now - in.arrival, code);
  if (in.op == static_cast<int>(w::Body::AppendKV) && in.handled != std::chrono::steady_clock::time_point{}) {
    auto& ph = GlobalMetrics().append_phase;
    ph[static_cast<int>(AppendPhase::kReceive)].Observe(in.received - in.arrival);
    ph[static_cast<int>(AppendPhase::kQueue)].Observe(in.started - in.received);
    ph[static_cast<int>(AppendPhase::kHandle)].Observe(in.handled - in.started);
    ph[static_cast<int>(AppendPhase::kReply)].Observe(now - in.handled);
  }
  if (in.op == static_cast<int>(w::Body::Attend) && in.handled != std::chrono::steady_clock::time_point{}) {
    auto& ph = GlobalMetrics().attend_phase;
    ph[static_cast<int>(AttendPhase::kRequestReceive)].Observe(in.received - in.arrival);
    ph[static_cast<int>(AttendPhase::kRequestQueue)].Observe(in.started - in.received);
    ph[static_cast<int>(AttendPhase::kRequestReply)].Observe(now - in.handled);
  }
}

void UcxServer::OnSendDone(void* request, ucs_status_t status, void* user_data) {
  delete static_cast<PendingSend*>(user_data);
  ucp_request_free(request);
}

void UcxServer::SendReply(Connection* conn, std::unique_ptr<Reply> reply) {
  if (conn->dead || conn->ep == nullptr) return;
  auto ps = std::make_unique<PendingSend>();
  ps->frame = w::MakeFrame(reply->fbb, reply->packer, max_am_header_);
  ps->reply = std::move(reply);
  ps->outstanding = &sends_outstanding_;
  sends_outstanding_++;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = ucx::AmProtocolFlag(ps->frame.header.size() + ps->frame.data_bytes);
  p.cb.send = &UcxServer::OnSendDone;
  p.user_data = ps.get();
  const void* buffer = nullptr;
  size_t count = 0;
  const auto& segs = ps->frame.data;
  if (segs.size() == 1) {
    buffer = segs[0].ptr;
    count = segs[0].bytes;
  } else if (segs.size() > 1) {
    for (const auto& s : segs) ps->iov.push_back({const_cast<void*>(s.ptr), s.bytes});
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
    p.datatype = UCP_DATATYPE_IOV;
    buffer = ps->iov.data();
    count = ps->iov.size();
  }
  counters_.bytes_out += ps->frame.header.size() + ps->frame.data_bytes;
  ucs_status_ptr_t req = ucp_am_send_nbx(conn->ep, w::kReplyAmId, ps->frame.header.data(),
                                         ps->frame.header.size(), buffer, count, &p);
  if (req == nullptr) return;  // completed in place; ps freed here
  if (UCS_PTR_IS_ERR(req)) {
    KVMEM_LOG_WARN("reply to connection {} failed: {}", conn->id,
                   ucs_status_string(UCS_PTR_STATUS(req)));
    return;
  }
  ps.release();  // OnSendDone frees it
}

void UcxServer::DrainOutbound() {
  if (!outbound_pending_.exchange(false, std::memory_order_acq_rel)) return;
  std::vector<std::pair<std::unique_ptr<Inbound>, std::unique_ptr<Reply>>> batch;
  {
    std::lock_guard<std::mutex> lock(out_mu_);
    batch.swap(outbound_);
  }
  for (auto& [in, reply] : batch) Finish(std::move(in), std::move(reply));
}

void UcxServer::ProgressAll() {
  if (!worker_) return;
  for (int i = 0; i < 64; ++i) {
    DrainOutbound();
    if (ucp_worker_progress(worker_.get()) == 0 && !outbound_pending_.load()) break;
  }
  // The scan of every connection runs only when one departed (error callback), the 1 s
  // housekeeping asks (idle timeout) or closes are in flight, not after every request.
  if (reap_due_ || !closing_.empty()) ReapConnections();
  if (stopping_) ShutdownStep();
}

// How long a close may take before the endpoint is given up on (counted as left open). A
// flush close completes once the lanes are flushed and the peer acknowledged the disconnect
// (immediately when the peer is already gone); a live peer that never answers hits this.
constexpr auto kCloseDeadline = std::chrono::seconds(30);

// Departed clients (the error callback marked them dead: UCX's connection manager reported the
// disconnect, also in error mode none) and idle ones are closed here, off the callback path.
// The close is a flush close: a forced close needs error mode peer (UCX 1.13 answers
// UCS_ERR_INVALID_PARAM otherwise), which would confine same-host clients to TCP. It is safe
// to free the endpoint while the departed client's messages may still be queued because
// endpoint ids are indirect (PROTO_INDIRECT_ID in Start).
void UcxServer::ReapConnections() {
  reap_due_ = false;
  const auto now = std::chrono::steady_clock::now();
  for (auto it = connections_.begin(); it != connections_.end();) {
    Connection& c = *it->second;
    if (!c.dead && options_.idle_timeout.count() > 0 && c.inflight == 0 &&
        now - c.last_active > options_.idle_timeout) {
      c.dead = true;
      counters_.endpoints_idle_closed++;
      KVMEM_LOG_INFO("connection {} ({}, tenant '{}') closed: idle for {} s (client_idle_timeout_seconds)",
                     c.id, c.peer, c.tenant, options_.idle_timeout.count());
    }
    if (c.dead) {
      std::shared_ptr<Connection> conn = std::move(it->second);
      it = connections_.erase(it);
      StartClose(std::move(conn));
    } else {
      ++it;
    }
  }
  for (size_t i = 0; i < closing_.size();) {
    Closing& c = closing_[i];
    const ucs_status_t st = ucp_request_check_status(c.request);
    if (st == UCS_INPROGRESS && now < c.deadline) {
      ++i;
      continue;
    }
    ucp_request_free(c.request);  // UCX releases it when the close completes
    if (st == UCS_INPROGRESS) {
      ++left_open_;
      counters_.endpoints_left_open++;
      KVMEM_LOG_WARN("connection {}: close not done after {} s; endpoint left allocated",
                     c.conn->id, kCloseDeadline.count());
    } else {
      counters_.endpoints_closed++;
    }
    AbandonReceives(*c.conn);
    closing_[i] = std::move(closing_.back());
    closing_.pop_back();
  }
  counters_.connections_open = connections_.size();
  counters_.endpoints = connections_.size() + closing_.size() + left_open_;
}

void UcxServer::StartClose(std::shared_ptr<Connection> conn) {
  conn->dead = true;
  if (conn->ep == nullptr) return;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = 0;  // flush close (see ReapConnections)
  ucs_status_ptr_t req = ucp_ep_close_nbx(conn->ep, &p);
  conn->ep = nullptr;
  if (UCS_PTR_IS_PTR(req)) {
    closing_.push_back({std::move(conn), req, std::chrono::steady_clock::now() + kCloseDeadline});
    return;
  }
  // Done in place, or failed: either way UCX has released the endpoint.
  if (UCS_PTR_IS_ERR(req)) {
    KVMEM_LOG_DEBUG("connection {}: close: {}", conn->id, ucs_status_string(UCS_PTR_STATUS(req)));
  }
  counters_.endpoints_closed++;
  AbandonReceives(*conn);
}

// Rendezvous receives of a closed endpoint that UCX did not complete with the close: cancel
// them, so their callbacks run (UCS_ERR_CANCELED) and free the Inbound and its buffer. One
// that does not complete even then stays counted in kvmem_requests_inflight: its buffer is not
// freed while UCX may still write into it.
void UcxServer::AbandonReceives(Connection& conn) {
  if (conn.receives.empty()) return;
  std::vector<void*> pending;  // a cancel may complete a receive (and erase it) right away
  for (const auto& [in, req] : conn.receives) pending.push_back(req);
  for (void* req : pending) ucp_request_cancel(worker_.get(), req);
  if (!conn.receives.empty()) {
    KVMEM_LOG_WARN("connection {}: {} receive(s) not completed by the close or a cancel",
                   conn.id, conn.receives.size());
  }
}

void UcxServer::Housekeeping() {
  housekeeping_->expires_after(std::chrono::seconds(1));
  housekeeping_->async_wait([this](const boost::system::error_code& ec) {
    if (ec || stopped_ || !worker_) return;
    reap_due_ = true;  // idle connections (client_idle_timeout_seconds)
    ProgressAll();
    Housekeeping();
  });
}

void UcxServer::ArmAndWait() {
  for (;;) {
    ProgressAll();
    if (stopped_ || !worker_) return;
    const ucs_status_t st = ucp_worker_arm(worker_.get());
    if (st == UCS_OK) break;
    if (st != UCS_ERR_BUSY) {
      KVMEM_LOG_ERROR("ucp_worker_arm: {}", ucs_status_string(st));
      break;
    }
  }
  efd_->async_wait(boost::asio::posix::stream_descriptor::wait_read,
                   [this](const boost::system::error_code& ec) {
                     if (!ec && !stopped_) ArmAndWait();
                   });
}

void UcxServer::PollLoop() {
  unsigned idle = 0;
  while (!poll_exit_.load(std::memory_order_relaxed)) {
    // Yield when idle so executor threads get a core even when cores are few (a spinning
    // thread that never yields starves them for a whole scheduler time slice).
    if (ucp_worker_progress(worker_.get()) != 0) idle = 0;
    else if (++idle >= 64) {
      sched_yield();
      idle = 0;
    }
    if (outbound_pending_.load(std::memory_order_acquire)) DrainOutbound();
    if (stopping_.load(std::memory_order_relaxed) && !stopped_) {
      ProgressAll();
    } else if (idle == 0 || idle == 63) {
      // Departed and idle connections, every 100 ms at most (a clock read otherwise).
      const auto now = std::chrono::steady_clock::now();
      if (now >= next_reap_) {
        ReapConnections();
        next_reap_ = now + std::chrono::milliseconds(100);
      }
    }
  }
}

void UcxServer::Stop(std::chrono::milliseconds grace, std::function<void()> done) {
  auto begin = [this, grace, done = std::move(done)]() mutable {
    if (stopping_) return;
    on_stopped_ = std::move(done);
    stop_deadline_ = std::chrono::steady_clock::now() + grace;
    stopping_ = true;
    KVMEM_LOG_INFO("stopping: refusing new connections, {} request(s) in flight", counters_.requests_inflight.load());
  };
  if (options_.poll) {
    // The poll thread owns the worker; it runs ShutdownStep once stopping_ is set.
    begin();
  } else {
    begin();
    ProgressAll();
  }
}

void UcxServer::ShutdownStep() {
  if (stopped_) return;
  if (listener_) listener_.reset();  // stop accepting
  const bool drained = counters_.requests_inflight.load() == 0 && sends_outstanding_.load() == 0;
  if (!drained && std::chrono::steady_clock::now() < stop_deadline_) {
    if (!options_.poll) {
      // Re-check shortly; replies arriving meanwhile wake the loop anyway.
      auto timer = std::make_shared<boost::asio::steady_timer>(*io_, std::chrono::milliseconds(5));
      timer->async_wait([this, timer](const boost::system::error_code&) { ProgressAll(); });
    }
    return;
  }
  if (!drained) KVMEM_LOG_WARN("stop: {} request(s) still in flight at the deadline", counters_.requests_inflight.load());
  // Every reply is delivered (or the deadline passed): no flush is owed to anyone.
  for (auto& [ep, conn] : connections_) conn->dead = true;
  CloseAll();
  stopped_ = true;
  if (options_.poll) poll_exit_ = true;
  if (on_stopped_) boost::asio::post(*io_, on_stopped_);
}

void UcxServer::CloseAll() {
  for (auto& [ep, conn] : connections_) conn->dead = true;
  ReapConnections();  // starts every close
  // Give the closes a moment (a live client acknowledges the disconnect), then free what is
  // left: ucp_worker_destroy releases those endpoints.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  while (!closing_.empty() && std::chrono::steady_clock::now() < deadline) {
    ucp_worker_progress(worker_.get());
    ReapConnections();
  }
  for (auto& c : closing_) ucp_request_free(c.request);
  closing_.clear();
  counters_.connections_open = 0;
}

}  // namespace kvmem
