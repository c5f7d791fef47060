#include "daemon/admin.h"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/dtype.h"
#include "common/log.h"
#include "daemon/health.h"
#include "daemon/service.h"
#include "daemon/transport.h"
#include "wire/ucx.h"

namespace kvmem {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

const char* ModeName(SelectionMode m) {
  switch (m) {
    case SelectionMode::kDense:
      return "dense";
    case SelectionMode::kIndex:
      return "index";
    case SelectionMode::kRetrievalHeads:
      return "retrieval_heads";
    case SelectionMode::kHybrid:
      return "hybrid";
    default:
      return "default";
  }
}

// One HTTP/1.1 connection: read a request, answer, repeat while keep-alive.
class HttpSession : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(tcp::socket socket, const AdminServer* server, const std::string* token)
      : stream_(std::move(socket)), server_(server), token_(token) {}

  void Run() { Read(); }

 private:
  void Read() {
    req_ = {};
    parser_.emplace();
    parser_->body_limit(8192);
    stream_.expires_after(std::chrono::seconds(30));
    http::async_read(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
  }

  void OnRead(beast::error_code ec) {
    if (ec) {
      beast::error_code ignored;
      stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
      return;
    }
    req_ = parser_->release();
    auto res = std::make_shared<http::response<http::string_body>>(Respond());
    res->version(req_.version());
    res->keep_alive(req_.keep_alive());
    res->set(http::field::server, "kvmemd");
    res->prepare_payload();
    http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code e, size_t) {
      if (e || !res->keep_alive()) {
        beast::error_code ignored;
        self->stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
        return;
      }
      self->Read();
    });
  }

  http::response<http::string_body> Reply(http::status status, std::string body,
                                          const char* type = "text/plain; charset=utf-8") {
    http::response<http::string_body> r{status, req_.version()};
    r.set(http::field::content_type, type);
    r.body() = std::move(body);
    return r;
  }

  http::response<http::string_body> Respond() {
    std::string target(req_.target());
    if (auto q = target.find('?'); q != std::string::npos) target.resize(q);
    if (req_.method() != http::verb::get && req_.method() != http::verb::head) {
      auto r = Reply(http::status::method_not_allowed, "only GET\n");
      r.set(http::field::allow, "GET, HEAD");
      return r;
    }
    if (target == "/healthz") {
      if (server_->alive()) return Reply(http::status::ok, "ok\n");
      return Reply(http::status::service_unavailable,
                   fmt::format("event loop stalled: no tick for {:.0f} s\n", server_->LoopLagSeconds()));
    }
    if (target == "/readyz") {
      return server_->ready() ? Reply(http::status::ok, "ready\n")
                              : Reply(http::status::service_unavailable, "not ready\n");
    }
    if (!token_->empty()) {
      const auto auth = req_[http::field::authorization];
      if (auth != "Bearer " + *token_) {
        auto r = Reply(http::status::unauthorized, "admin token required\n");
        r.set(http::field::www_authenticate, "Bearer realm=\"kvmemd\"");
        return r;
      }
    }
    if (target == "/metrics") {
      return Reply(http::status::ok, server_->MetricsText(),
                   "text/plain; version=0.0.4; charset=utf-8");
    }
    if (target == "/v1/sessions")
      return Reply(http::status::ok, server_->SessionsJson(), "application/json");
    if (target == "/v1/status")
      return Reply(http::status::ok, server_->StatusJson(), "application/json");
    return Reply(http::status::not_found,
                 "not found; try /healthz /readyz /metrics /v1/sessions /v1/status\n");
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::request<http::string_body> req_;
  const AdminServer* server_;
  const std::string* token_;
};

}  // namespace

struct AdminServer::Impl {
  asio::io_context io{1};
  tcp::acceptor acceptor{io};

  void Accept(const AdminServer* server, const std::string* token) {
    acceptor.async_accept(asio::make_strand(io),
                          [this, server, token](beast::error_code ec, tcp::socket s) {
                            if (ec == asio::error::operation_aborted) return;
                            if (!ec)
                              std::make_shared<HttpSession>(std::move(s), server, token)->Run();
                            Accept(server, token);
                          });
  }
};

AdminServer::AdminServer(AdminOptions options, AdminSources sources)
    : options_(std::move(options)), sources_(std::move(sources)), impl_(std::make_unique<Impl>()) {}

AdminServer::~AdminServer() { Stop(); }

double AdminServer::LoopLagSeconds() const {
  if (sources_.loop_tick_ns == nullptr) return 0;
  return SecondsSince(*sources_.loop_tick_ns, std::chrono::steady_clock::now());
}

bool AdminServer::alive() const {
  return sources_.loop_stall_seconds == 0 || LoopLagSeconds() <= sources_.loop_stall_seconds;
}

bool AdminServer::ready() const {
  return sources_.ready && sources_.ready->load(std::memory_order_acquire);
}

Status AdminServer::Start() {
  std::string host;
  KVMEM_RETURN_IF_ERROR(ucx::ParseHostPort(options_.listen, &host, &port_).WithContext("admin"));
  beast::error_code ec;
  tcp::resolver resolver(impl_->io);
  auto results = resolver.resolve(host, std::to_string(port_), ec);
  if (ec || results.empty())
    return InvalidArgument("admin: cannot resolve '" + host + "': " + ec.message());
  const tcp::endpoint ep = results.begin()->endpoint();
  impl_->acceptor.open(ep.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(ep, ec);
  if (!ec) impl_->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Unavailable("admin: cannot listen on " + options_.listen + ": " + ec.message());
  port_ = impl_->acceptor.local_endpoint().port();
  impl_->Accept(this, &options_.token);
  thread_ = std::thread([this] { impl_->io.run(); });
  KVMEM_LOG_INFO("admin HTTP on {} (port {}){}", options_.listen, port_,
                 options_.token.empty() ? "" : ", bearer token required");
  return Status::OK();
}

void AdminServer::Stop() {
  if (!thread_.joinable()) return;
  asio::post(impl_->io, [this] {
    beast::error_code ec;
    impl_->acceptor.close(ec);
  });
  impl_->io.stop();
  thread_.join();
}

std::string AdminServer::MetricsText() const {
  MetricsSources m;
  m.service = sources_.service;
  m.transport = sources_.transport;
  m.device_capacity_bytes = sources_.device_capacity_bytes;
  m.backend = sources_.backend;
  m.version = sources_.version;
  m.started = sources_.started;
  m.ready = ready();
  m.loop_lag_seconds = LoopLagSeconds();
  return RenderPrometheus(m);
}

std::string AdminServer::SessionsJson() const {
  nlohmann::json arr = nlohmann::json::array();
  if (sources_.service == nullptr) return arr.dump();
  for (const auto& s : sources_.service->SnapshotSessions()) {
    const SessionStats st = s->Stats();
    const ModelProfile& p = s->profile();
    const SessionOptions& o = s->options();
    arr.push_back({{"id", s->id()},
                   {"tenant", s->tenant()},
                   {"layers", p.layers},
                   {"q_heads", p.q_heads},
                   {"kv_heads", p.kv_heads},
                   {"head_dim", p.head_dim},
                   {"dtype", std::string(DTypeName(p.dtype))},
                   {"tokens", st.tokens},
                   {"chunks", st.chunks},
                   {"tail_tokens", st.tail_tokens},
                   {"mean_chunk_tokens", s->mean_chunk_tokens()},
                   {"bytes", st.bytes},
                   {"mode", ModeName(o.mode)},
                   {"durable", o.durability == Durability::kDurable},
                   {"label", o.label},
                   {"created_unix_ms", st.created_unix_ms},
                   {"last_used_unix_ms", st.last_used_unix_ms}});
  }
  return arr.dump();
}

std::string AdminServer::StatusJson() const {
  uint64_t bytes = 0, chunks = 0, sessions = 0;
  if (sources_.service) {
    for (const auto& s : sources_.service->SnapshotSessions()) {
      const SessionStats st = s->Stats();
      bytes += st.bytes;
      chunks += st.chunks;
      ++sessions;
    }
  }
  const double uptime =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - sources_.started).count();
  nlohmann::json tiers = nlohmann::json::array();
  tiers.push_back({{"tier", "device"},
                   {"capacity_bytes", sources_.device_capacity_bytes},
                   {"used_bytes", bytes},
                   {"chunks", chunks}});
  tiers.push_back({{"tier", "host"}, {"capacity_bytes", 0}, {"used_bytes", 0}, {"chunks", 0}});
  tiers.push_back({{"tier", "disk"}, {"capacity_bytes", 0}, {"used_bytes", 0}, {"chunks", 0}});
  nlohmann::json j = {{"version", sources_.version},
                      {"backend", sources_.backend},
                      {"gpu", sources_.gpu},
                      {"uptime_seconds", uptime},
                      {"ready", ready()},
                      {"sessions", sessions},
                      {"tiers", tiers}};
  // Why /healthz or /readyz may fail besides startup and shutdown (docs/operations.md).
  const DaemonMetrics& m = GlobalMetrics();
  j["health"] = {{"alive", alive()},
                 {"event_loop_lag_seconds", LoopLagSeconds()},
                 {"executors_stalled", m.executors_stalled.load(std::memory_order_relaxed)},
                 {"executor_longest_task_seconds",
                  m.executor_longest_task_us.load(std::memory_order_relaxed) * 1e-6},
                 {"executor_stalls", m.executor_stalls.load(std::memory_order_relaxed)},
                 {"device_failures", m.device_failures.load(std::memory_order_relaxed)}};
  if (sources_.transport) {
    j["endpoints_open"] = sources_.transport->connections_open.load();
    j["endpoints_accepted"] = sources_.transport->connections_accepted.load();
  }
  return j.dump();
}

}  // namespace kvmem
