#include "wire/ucx.h"

#include <netdb.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdlib>
#include <cstring>

namespace kvmem::ucx {

Status FromUcs(ucs_status_t s, std::string_view what) {
  if (s == UCS_OK) return Status::OK();
  std::string msg = std::string(what) + ": " + ucs_status_string(s);
  switch (s) {
    case UCS_INPROGRESS: return Status(StatusCode::kInProgress, msg);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT: return ResourceExhausted(msg);
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR: return InvalidArgument(msg);
    case UCS_ERR_UNSUPPORTED: return Unimplemented(msg);
    case UCS_ERR_TIMED_OUT: return DeadlineExceeded(msg);
    case UCS_ERR_CANCELED: return Cancelled(msg);
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_BUSY:
    case UCS_ERR_IO_ERROR: return Unavailable(msg);
    case UCS_ERR_MESSAGE_TRUNCATED: return InvalidArgument(msg);
    default: return Internal(msg);
  }
}

Result<Context> CreateContext(const ContextOptions& options) {
  ucp_config_t* raw_config = nullptr;
  KVMEM_RETURN_IF_ERROR(FromUcs(ucp_config_read(nullptr, nullptr, &raw_config), "ucp_config_read"));
  std::unique_ptr<ucp_config_t, ConfigDeleter> config(raw_config);
  if (!options.transports.empty()) {
    KVMEM_RETURN_IF_ERROR(FromUcs(ucp_config_modify(config.get(), "TLS", options.transports.c_str()),
                                  "ucp_config_modify TLS=" + options.transports));
  }
  for (const auto& [name, value] : options.settings) {
    if (std::getenv(("UCX_" + name).c_str()) != nullptr) continue;
    KVMEM_RETURN_IF_ERROR(FromUcs(ucp_config_modify(config.get(), name.c_str(), value.c_str()),
                                  "ucp_config_modify " + name + "=" + value));
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_AM | (options.wakeup ? UCP_FEATURE_WAKEUP : 0);
  params.mt_workers_shared = 0;
  ucp_context_h ctx = nullptr;
  KVMEM_RETURN_IF_ERROR(FromUcs(ucp_init(&params, config.get(), &ctx), "ucp_init"));
  return Context(ctx);
}

Result<Worker> CreateWorker(ucp_context_h context, ucs_thread_mode_t thread_mode) {
  ucp_worker_params_t params{};
  params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  params.thread_mode = thread_mode;
  ucp_worker_h w = nullptr;
  KVMEM_RETURN_IF_ERROR(FromUcs(ucp_worker_create(context, &params, &w), "ucp_worker_create"));
  return Worker(w);
}

Result<size_t> MaxAmHeader(ucp_worker_h worker) {
  ucp_worker_attr_t attr{};
  attr.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
  KVMEM_RETURN_IF_ERROR(FromUcs(ucp_worker_query(worker, &attr), "ucp_worker_query"));
  return static_cast<size_t>(attr.max_am_header);
}

size_t EagerMaxBytes() {
  static const size_t bytes = [] {
    const char* e = std::getenv("KVMEM_EAGER_MAX_BYTES");
    if (e == nullptr || *e == '\0') return size_t{32} << 10;
    char* end = nullptr;
    const unsigned long long v = std::strtoull(e, &end, 10);
    return end != nullptr && *end == '\0' ? static_cast<size_t>(v) : size_t{32} << 10;
  }();
  return bytes;
}

uint32_t AmProtocolFlag(size_t bytes) {
  return bytes <= EagerMaxBytes() ? static_cast<uint32_t>(UCP_AM_SEND_FLAG_EAGER) : 0u;
}

Status WaitRequest(ucp_worker_h worker, ucs_status_ptr_t request, std::string_view what) {
  if (request == nullptr) return Status::OK();
  if (UCS_PTR_IS_ERR(request)) return FromUcs(UCS_PTR_STATUS(request), what);
  ucs_status_t st;
  while ((st = ucp_request_check_status(request)) == UCS_INPROGRESS) ucp_worker_progress(worker);
  ucp_request_free(request);
  return FromUcs(st, what);
}

CloseResult CloseEndpoint(ucp_worker_h worker, ucp_ep_h ep, bool force, int timeout_ms) {
  CloseResult result;
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucs_status_ptr_t req = ucp_ep_close_nbx(ep, &param);
  result.forced = force;
  if (req == nullptr) return result;
  if (UCS_PTR_IS_ERR(req)) {
    result.status = UCS_PTR_STATUS(req);
    return result;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  ucs_status_t st;
  while ((st = ucp_request_check_status(req)) == UCS_INPROGRESS) {
    ucp_worker_progress(worker);
    if (std::chrono::steady_clock::now() > deadline) {
      ucp_request_cancel(worker, req);
      st = UCS_ERR_TIMED_OUT;
      break;
    }
  }
  ucp_request_free(req);
  result.status = st;
  return result;
}

Status ParseHostPort(std::string_view text, std::string* host, uint16_t* port) {
  const size_t colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size()) {
    return InvalidArgument("address '" + std::string(text) + "' is not HOST:PORT");
  }
  std::string h(text.substr(0, colon));
  if (h.size() > 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  const std::string p(text.substr(colon + 1));
  char* end = nullptr;
  const long v = std::strtol(p.c_str(), &end, 10);
  if (*end != '\0' || v <= 0 || v > 65535) {
    return InvalidArgument("bad port '" + p + "' in '" + std::string(text) + "'");
  }
  *host = h;
  *port = static_cast<uint16_t>(v);
  return Status::OK();
}

Status ResolveSockaddr(const std::string& host, uint16_t port, struct sockaddr_storage* out,
                       socklen_t* len) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = host.empty() ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  const std::string port_str = std::to_string(port);
  const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), port_str.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return Unavailable("cannot resolve '" + host + "': " + gai_strerror(rc));
  }
  std::memcpy(out, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return Status::OK();
}

}  // namespace kvmem::ucx
