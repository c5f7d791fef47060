// kvmemd reclaims what a departed client held: its UCX endpoint, and a rendezvous receive the
// client left unfinished (docs/reliability.md, "Client endpoints"). Each test drives clients
// away, then polls /metrics (with a generous deadline, not a fixed sleep) until the endpoint
// and in-flight gauges are back at 0. kvmemd's RSS is printed per batch, not asserted.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client/client.h"
#include "testing/daemon_process.h"
#include "testing/http_get.h"
#include "wire/framing.h"
#include "wire/ucx.h"

namespace kvmem {
namespace {

// The value of an unlabelled metric, -1 when absent.
double Metric(uint16_t admin_port, const std::string& name) {
  return testing::MetricValue(admin_port, name);
}

// Polls until `name` equals `want` or the deadline passes; returns the last value.
double WaitMetric(uint16_t admin_port, const std::string& name, double want,
                  std::chrono::seconds deadline = std::chrono::seconds(30)) {
  const auto end = std::chrono::steady_clock::now() + deadline;
  double v = Metric(admin_port, name);
  while (v != want && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    v = Metric(admin_port, name);
  }
  return v;
}

uint64_t RssKib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6));
  }
  return 0;
}

struct Daemon {
  uint16_t admin = testing::FreePort();
  testing::DaemonProcess d;
  explicit Daemon(std::vector<std::string> extra = {})
      : d([&] {
          extra.push_back("--admin");
          extra.push_back("127.0.0.1:" + std::to_string(admin));
          return extra;
        }()) {}
};

// Clients that connect, say Hello and close: every endpoint is closed and destroyed.
TEST(Reclaim, ClosedClientsEndpointsAreDestroyed) {
  Daemon daemon;
  ASSERT_TRUE(daemon.d.ready());
  constexpr int kBatches = 4, kPerBatch = 50;
  for (int b = 0; b < kBatches; ++b) {
    for (int i = 0; i < kPerBatch; ++i) {
      auto c = client::Client::Connect(daemon.d.address());
      ASSERT_TRUE(c.ok()) << c.status().ToString();
    }
    std::printf("after %d closed clients: kvmemd RSS %llu KiB, endpoints %g\n", (b + 1) * kPerBatch,
                static_cast<unsigned long long>(RssKib(daemon.d.pid())),
                Metric(daemon.admin, "kvmem_ucx_endpoints"));
  }
  EXPECT_EQ(WaitMetric(daemon.admin, "kvmem_ucx_endpoints", 0), 0);
  EXPECT_EQ(Metric(daemon.admin, "kvmem_ucx_endpoints_open"), 0);
  const double accepted = Metric(daemon.admin, "kvmem_ucx_endpoints_accepted_total");
  EXPECT_GE(accepted, kBatches * kPerBatch);
  EXPECT_EQ(Metric(daemon.admin, "kvmem_ucx_endpoints_closed_total"), accepted);
  EXPECT_EQ(Metric(daemon.admin, "kvmem_ucx_endpoints_left_open_total"), 0);
  EXPECT_EQ(daemon.d.Stop(), 0);
}

// client_idle_timeout_seconds: a connection that stays silent is closed by kvmemd (counted),
// its client's next call fails, and a new connection works. One that keeps talking stays.
TEST(Reclaim, SilentConnectionIsClosedAfterIdleTimeout) {
  const auto config = std::filesystem::temp_directory_path() /
                      ("kvmem-reclaim-" + std::to_string(::getpid()) + ".json");
  {
    std::ofstream(config) << R"({"client_idle_timeout_seconds": 2})";
  }
  Daemon daemon({"--config", config.string()});
  ASSERT_TRUE(daemon.d.ready());
  client::ClientOptions o;
  o.request_timeout_ms = 10000;  // the call after the close fails at once or times out here
  auto silent = client::Client::Connect(daemon.d.address(), o);
  ASSERT_TRUE(silent.ok()) << silent.status().ToString();
  auto chatty = client::Client::Connect(daemon.d.address());
  ASSERT_TRUE(chatty.ok()) << chatty.status().ToString();
  // The silent one is closed 2-3 s after its Hello; keep the other busy meanwhile (a call every
  // 50 ms: only a stall of 2 s on a loaded machine could make it look idle).
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (Metric(daemon.admin, "kvmem_ucx_endpoints_idle_closed_total") < 1 &&
         std::chrono::steady_clock::now() < end) {
    ASSERT_TRUE((*chatty)->Ping(1).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_GE(Metric(daemon.admin, "kvmem_ucx_endpoints_idle_closed_total"), 1);
  EXPECT_FALSE((*silent)->Ping(2).ok());
  EXPECT_TRUE((*chatty)->Ping(3).ok());
  silent->reset();
  chatty->reset();
  EXPECT_EQ(WaitMetric(daemon.admin, "kvmem_ucx_endpoints", 0), 0);
  EXPECT_EQ(Metric(daemon.admin, "kvmem_ucx_endpoints_left_open_total"), 0);
  EXPECT_EQ(daemon.d.Stop(), 0);
  std::filesystem::remove(config);
}

// A client process that sends a rendezvous-size request and is killed before its data is
// read: the receive cannot complete, and kvmemd must still release it (buffer, request slot)
// and the endpoint. In a child process, so its death is real (SIGKILL, no close).
void SendLargeAndDie(const std::string& address, size_t bytes, bool wait_for_rts) {
  auto ctx = ucx::CreateContext({"", false});
  if (!ctx.ok()) ::_exit(2);
  auto worker = ucx::CreateWorker(ctx->get(), UCS_THREAD_MODE_SINGLE);
  if (!worker.ok()) ::_exit(3);
  ucp_am_handler_param_t am{};  // replies are dropped
  am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  am.id = wire::kReplyAmId;
  am.cb = [](void*, const void*, size_t, void*, size_t, const ucp_am_recv_param_t*) {
    return UCS_OK;
  };
  am.flags = UCP_AM_FLAG_WHOLE_MSG;
  if (ucp_worker_set_am_recv_handler(worker->get(), &am) != UCS_OK) ::_exit(8);
  std::string host;
  uint16_t port = 0;
  if (!ucx::ParseHostPort(address, &host, &port).ok()) ::_exit(4);
  sockaddr_storage addr{};
  socklen_t len = 0;
  if (!ucx::ResolveSockaddr(host, port, &addr, &len).ok()) ::_exit(5);
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                  UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.err_handler.cb = [](void*, ucp_ep_h, ucs_status_t) {};
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  ep.sockaddr.addrlen = len;
  ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
  ucp_ep_h h = nullptr;
  if (ucp_ep_create(worker->get(), &ep, &h) != UCS_OK) ::_exit(6);
  // Any 8+ byte header: the daemon reads the data before it parses the request.
  std::vector<uint8_t> header(64, 0);
  std::vector<uint8_t> data(bytes, 0x5a);
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_RNDV;
  ucs_status_ptr_t req = ucp_am_send_nbx(h, wire::kRequestAmId, header.data(), header.size(),
                                         data.data(), data.size(), &p);
  if (UCS_PTR_IS_ERR(req)) ::_exit(7);
  // Progress until the connection is up and the RTS has left (a few ms), never long enough
  // for the daemon to fetch the data unless it is very quick; then die without closing.
  const auto end = std::chrono::steady_clock::now() +
                   std::chrono::milliseconds(wait_for_rts ? 200 : 20);
  while (std::chrono::steady_clock::now() < end) ucp_worker_progress(worker->get());
  ::kill(::getpid(), SIGKILL);
}

// Runs only in the child process the test below starts.
TEST(Reclaim, Helper) {
  const char* address = std::getenv("KVMEM_RECLAIM_HELPER");
  if (address == nullptr) GTEST_SKIP() << "helper of KilledClients...; runs in its child process";
  const char* wait = std::getenv("KVMEM_RECLAIM_HELPER_WAIT");
  SendLargeAndDie(address, 8u << 20, wait != nullptr && wait[0] == '1');
}

void KilledClients(std::vector<std::string> daemon_args) {
  Daemon daemon(std::move(daemon_args));
  ASSERT_TRUE(daemon.d.ready());
  constexpr int kClients = 20;
  for (int i = 0; i < kClients; ++i) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      // A fresh process image: UCX state inherited through fork is not usable in the child.
      ::setenv("KVMEM_RECLAIM_HELPER", daemon.d.address().c_str(), 1);
      ::setenv("KVMEM_RECLAIM_HELPER_WAIT", i % 2 == 0 ? "1" : "0", 1);
      ::execl("/proc/self/exe", "reclaim_test", "--gtest_filter=Reclaim.Helper",
              static_cast<char*>(nullptr));
      ::_exit(127);
    }
    int st = 0;
    ASSERT_EQ(::waitpid(child, &st, 0), child);
    ASSERT_TRUE(WIFSIGNALED(st)) << "child exit " << WEXITSTATUS(st);
  }
  std::printf("after %d killed clients: kvmemd RSS %llu KiB, endpoints %g, in flight %g, bytes in %g\n",
              kClients, static_cast<unsigned long long>(RssKib(daemon.d.pid())),
              Metric(daemon.admin, "kvmem_ucx_endpoints"),
              Metric(daemon.admin, "kvmem_requests_inflight"),
              Metric(daemon.admin, "kvmem_bytes_in_total"));
  EXPECT_EQ(WaitMetric(daemon.admin, "kvmem_requests_inflight", 0), 0);
  EXPECT_EQ(WaitMetric(daemon.admin, "kvmem_ucx_endpoints", 0), 0);
  EXPECT_EQ(Metric(daemon.admin, "kvmem_ucx_endpoints_left_open_total"), 0);
  // The daemon still serves, and stops cleanly (no receive left for the grace period).
  auto c = client::Client::Connect(daemon.d.address());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_TRUE((*c)->Ping(7).ok());
  c->reset();
  EXPECT_EQ(daemon.d.Stop(), 0);
}

// Default rendezvous (the daemon reads the data): the read from a dead process fails.
TEST(Reclaim, KilledClientsPendingReceivesAndEndpointsAreReleased) { KilledClients({}); }

// put_zcopy: the daemon asks the client to write the data and waits; a killed client never
// does, so only closing the endpoint can end the receive.
TEST(Reclaim, KilledClientsPendingPutReceivesAreReleased) {
  KilledClients({"--ucx-rndv-scheme", "put_zcopy"});
}

}  // namespace
}  // namespace kvmem
