// RAII owners for UCX handles and the one translation point for ucs_status_t.
#pragma once

#include <ucp/api/ucp.h>

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace kvmem::ucx {

// ucs_status_t -> Status, naming what failed. UCS_INPROGRESS maps to kInProgress.
Status FromUcs(ucs_status_t s, std::string_view what);

struct ContextDeleter {
  void operator()(ucp_context_h c) const { ucp_cleanup(c); }
};
struct WorkerDeleter {
  void operator()(ucp_worker_h w) const { ucp_worker_destroy(w); }
};
struct ListenerDeleter {
  void operator()(ucp_listener_h l) const { ucp_listener_destroy(l); }
};
struct ConfigDeleter {
  void operator()(ucp_config_t* c) const { ucp_config_release(c); }
};
using Context = std::unique_ptr<std::remove_pointer_t<ucp_context_h>, ContextDeleter>;
using Worker = std::unique_ptr<std::remove_pointer_t<ucp_worker_h>, WorkerDeleter>;
using Listener = std::unique_ptr<std::remove_pointer_t<ucp_listener_h>, ListenerDeleter>;

struct ContextOptions {
  // UCX transports ("TLS"), e.g. "tcp" or "sm,self,tcp". Empty: UCX's default (all).
  // Default: "".
  std::string transports;
  // Enables the wakeup feature (event fd). Default: true.
  bool wakeup = true;
  // UCX settings (name without the UCX_ prefix, value), applied with ucp_config_modify unless
  // the same UCX_<name> is set in the environment (the operator's variable wins). Default: none.
  std::vector<std::pair<std::string, std::string>> settings;
};

Result<Context> CreateContext(const ContextOptions& options);

// thread_mode: UCS_THREAD_MODE_SINGLE when one thread owns the worker.
Result<Worker> CreateWorker(ucp_context_h context, ucs_thread_mode_t thread_mode);

// The largest AM header this worker can send (ucp_worker_query).
Result<size_t> MaxAmHeader(ucp_worker_h worker);

// Active messages of at most this many bytes (header + data) are sent eagerly
// (UCP_AM_SEND_FLAG_EAGER). UCX 1.13 would send an Attend's 8 KiB q, and its reply's out, by
// rendezvous even over shared memory (RTS, the receiver's fetch, ATS: a round trip more than
// the eager copy through the FIFO). Default 32 KiB; KVMEM_EAGER_MAX_BYTES overrides it (0:
// UCX chooses the protocol for every size).
size_t EagerMaxBytes();
// The ucp_am_send_nbx flag for a message of `bytes`: UCP_AM_SEND_FLAG_EAGER or 0.
uint32_t AmProtocolFlag(size_t bytes);

// Waits for a request returned by a *_nbx call, progressing the worker. Releases it.
Status WaitRequest(ucp_worker_h worker, ucs_status_ptr_t request, std::string_view what);

// Closes an endpoint: flush (or force) and progress until done, bounded by timeout_ms.
// UCX 1.13 refuses a forced close (UCS_ERR_INVALID_PARAM, endpoint untouched and still open)
// unless the endpoint uses UCP_ERR_HANDLING_MODE_PEER. Do not fall back to a flush close for a
// failed endpoint in mode NONE: the peer addresses it by pointer, and a message of the vanished
// peer still in flight (a rendezvous RTS) then hits freed memory (kvmem-stress crashed kvmemd
// with "ucp_am_rndv_process_rts: Assertion (*ep_p)->worker == worker failed") — unless the
// worker's context uses indirect endpoint ids (UCX PROTO_INDIRECT_ID=on), as kvmemd's does:
// daemon/transport.cc then flush-closes departed clients' endpoints (without this function).
struct CloseResult {
  ucs_status_t status = UCS_OK;  // of the close; UCS_ERR_TIMED_OUT when timeout_ms passed
  bool forced = false;           // asked for a forced close
};
CloseResult CloseEndpoint(ucp_worker_h worker, ucp_ep_h ep, bool force, int timeout_ms = 1000);

// "host:port" -> sockaddr_storage. Resolves names (first IPv4/IPv6 result).
Status ParseHostPort(std::string_view text, std::string* host, uint16_t* port);
Status ResolveSockaddr(const std::string& host, uint16_t port, struct sockaddr_storage* out,
                       socklen_t* len);

}  // namespace kvmem::ucx
