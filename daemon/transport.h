// The daemon's UCX transport: a listener, one endpoint per client, active-message receive
// (eager and rendezvous), replies, and progress driven either by the Asio io_context through
// the worker's event fd ("event") or by a spinning thread ("poll").
//
// Threading: the UCX worker is owned by one thread (the io_context thread in event mode, the
// poll thread in poll mode). Executors hand replies back through PostReply(), which queues
// them for that thread.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "daemon/executor.h"
#include "daemon/metrics.h"
#include "daemon/service.h"
#include "wire/ucx.h"

namespace kvmem {

struct TransportOptions {
  std::string listen = "127.0.0.1:7420";
  bool poll = false;               // progress mode
  bool peer_error_handling = false;
  uint64_t max_message_bytes = 1ull << 30;
  uint32_t max_inflight_per_endpoint = 256;
  uint32_t max_connections = 1024;  // more connection requests are rejected
  std::string transports;          // UCX_TLS override; empty = all
  // Rendezvous scheme for large messages (UCX_RNDV_SCHEME): "put_zcopy" makes each sender
  // write its payload into the daemon's receive buffer (over shared memory: CMA from the
  // client's process), so the daemon's single transport thread no longer spends the copy of
  // every payload; "get_zcopy" has the transport thread read it; "auto" is UCX's choice
  // (get). UCX_RNDV_SCHEME in the environment overrides it. put_zcopy: shared-memory clients
  // only (UCX 1.13 hangs TCP appends with it), and clients must be allowed to ptrace the
  // daemon (docs/architecture.md, "Append path").
  std::string rndv_scheme = "auto";
  // Packed AppendKV payloads on host-pool sessions are received straight into the blocks of
  // the chunks they seal (Service::PlanLanding; docs/architecture.md, "Append path"). Off by
  // default: UCX 1.13 receives an IOV rendezvous through fragments instead of one CMA read,
  // which cost more than the copy it saves (0.41-0.44x of ucp_am_bw against 0.57-0.72x on the
  // 16-core GPU host; bench/results/transport-h200host-ab.json).
  bool append_landing = false;

  // A connection with no request in flight that sent nothing for this long is closed by the
  // daemon (config client_idle_timeout_seconds); 0 = never. Clients that leave (close, exit,
  // killed) are closed when UCX reports the disconnect, whatever this is.
  std::chrono::seconds idle_timeout{0};
};

struct TransportCounters {
  std::atomic<uint64_t> connections_accepted{0};
  std::atomic<uint64_t> connections_open{0};
  std::atomic<uint64_t> messages_rejected{0};
  std::atomic<uint64_t> connections_rejected{0};  // over max_connections
  std::atomic<uint64_t> bytes_in{0};
  std::atomic<uint64_t> bytes_out{0};
  std::atomic<uint64_t> received_eager{0};       // messages whose data came with them
  std::atomic<uint64_t> received_rendezvous{0};  // messages whose data kvmemd fetched
  std::atomic<uint64_t> requests_inflight{0};      // received, not yet answered
  std::atomic<uint64_t> endpoints{0};               // allocated: open + closing + left open
  std::atomic<uint64_t> endpoints_closed{0};        // closed and destroyed
  std::atomic<uint64_t> endpoints_idle_closed{0};   // closed by the daemon: idle_timeout
  std::atomic<uint64_t> endpoints_left_open{0};     // close did not complete by its deadline
};

// Receive buffers of 64 KiB and more are kept for reuse, up to 256 MiB in all (transport.cc).
// ReleaseRetainedReceiveBuffers frees the ones not in use and returns their bytes (idle trim);
// both are thread-safe.
uint64_t ReleaseRetainedReceiveBuffers();
uint64_t RetainedReceiveBufferBytes();

class UcxServer {
 public:
  UcxServer(TransportOptions options, Service* service, ExecutorPool* executors,
            boost::asio::io_context* io);
  ~UcxServer();

  // Creates context, worker, listener; starts progress. After OK the server accepts clients.
  Status Start();

  // Graceful stop: refuse new connections and requests, let in-flight requests finish (up to
  // `grace`), close endpoints, then call `done` on the io_context thread.
  void Stop(std::chrono::milliseconds grace, std::function<void()> done);

  uint16_t port() const { return port_; }
  TransportCounters& counters() { return counters_; }

  // Thread-safe: queues a reply for the transport thread.
  struct Inbound;
  void PostReply(std::unique_ptr<Inbound> in, std::unique_ptr<Reply> reply);

  struct Connection;

 private:
  static void OnConnRequest(ucp_conn_request_h request, void* arg);
  static void OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status);
  static ucs_status_t OnRequestAm(void* arg, const void* header, size_t header_length, void* data,
                                  size_t length, const ucp_am_recv_param_t* param);
  static void OnRndvDone(void* request, ucs_status_t status, size_t length, void* user_data);
  static void OnSendDone(void* request, ucs_status_t status, void* user_data);

  void Accept(ucp_conn_request_h request);
  void Dispatch(std::unique_ptr<Inbound> in);
  void SendReply(Connection* conn, std::unique_ptr<Reply> reply);
  void Finish(std::unique_ptr<Inbound> in, std::unique_ptr<Reply> reply);
  void RecordMetrics(const Inbound& in, const Reply& reply);  // daemon/metrics.h
  void SendError(Connection* conn, uint64_t request_id, const Status& status);
  void DrainOutbound();
  void ProgressAll();          // progress until idle, send queued replies, close dead eps
  void ReapConnections();      // close departed / idle connections, finish closes
  void StartClose(std::shared_ptr<Connection> conn);
  void AbandonReceives(Connection& conn);
  void Housekeeping();         // event mode: a 1 s timer, so closes finish on an idle daemon
  void ArmAndWait();           // event mode
  void PollLoop();             // poll mode
  void ShutdownStep();         // runs on the transport thread while stopping
  void CloseAll();

  const TransportOptions options_;
  Service* const service_;
  ExecutorPool* const executors_;
  boost::asio::io_context* const io_;

  ucx::Context context_;
  ucx::Worker worker_;
  ucx::Listener listener_;
  size_t max_am_header_ = 0;
  uint16_t port_ = 0;
  std::unique_ptr<boost::asio::posix::stream_descriptor> efd_;
  std::thread poll_thread_;

  // Transport-thread state.
  std::unordered_map<ucp_ep_h, std::shared_ptr<Connection>> connections_;
  // Endpoints being closed (ucp_ep_close_nbx in flight); the Connection stays alive until
  // UCX is done with it (it is the error callback's argument).
  struct Closing {
    std::shared_ptr<Connection> conn;
    void* request = nullptr;
    std::chrono::steady_clock::time_point deadline;
  };
  std::vector<Closing> closing_;
  uint64_t left_open_ = 0;  // closes that missed their deadline: endpoint still allocated
  std::chrono::steady_clock::time_point next_reap_{};
  bool reap_due_ = false;  // a client departed or housekeeping ran: ProgressAll reaps
  std::unique_ptr<boost::asio::steady_timer> housekeeping_;
  uint64_t next_connection_id_ = 1;

  // Replies from executors.
  std::mutex out_mu_;
  std::vector<std::pair<std::unique_ptr<Inbound>, std::unique_ptr<Reply>>> outbound_;  // out_mu_
  std::atomic<bool> outbound_pending_{false};

  std::atomic<uint64_t> sends_outstanding_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> poll_exit_{false};
  std::chrono::steady_clock::time_point stop_deadline_;
  std::function<void()> on_stopped_;
  std::atomic<bool> stopped_{false};
  TransportCounters counters_;
};

}  // namespace kvmem
