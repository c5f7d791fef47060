// Several kvmemd daemons as one store, without a coordinator.
//
//   auto c = kvmem::client::Cluster::Connect("10.0.0.1:7420,10.0.0.2:7420");
//   // or a DNS name with many A/AAAA records, e.g. a Kubernetes headless Service:
//   auto c = kvmem::client::Cluster::Connect("kvmemd-peers.kvmem.svc:7420");
//   auto id = (*c)->CreateSession(profile);       // placed on the session's daemon
//   (*c)->AppendKV(*id, keys, values);            // reaches the same daemon
//
// Placement is rendezvous (highest-random-weight) hashing of the session id over the resolved
// daemon addresses ("ip:port"): every client with the same address set picks the same daemon
// for a session, and adding or removing a daemon moves only the sessions that hash to it.
// Daemons are connected lazily, on first use; a daemon that is down fails only the calls for
// sessions placed on it (UNAVAILABLE). Thread-safe like Client.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "client/client.h"

namespace kvmem::client {

// Expands "HOST:PORT[,HOST:PORT...]": each name resolves to all its IPv4/IPv6 addresses.
// Returns sorted, deduplicated "ip:port" strings (IPv6 as "[ip]:port"). INVALID_ARGUMENT for a
// malformed entry, UNAVAILABLE when a name does not resolve.
Result<std::vector<std::string>> ResolveAddresses(const std::string& spec);

// Rendezvous hashing: the index in `nodes` that owns `session_id` (nodes must be non-empty).
// Stable across processes and platforms (64-bit mixing of the id and the node string).
size_t RendezvousOwner(uint64_t session_id, const std::vector<std::string>& nodes);

struct ClusterSession {
  std::string address;  // daemon holding it
  SessionSummary session;
};

struct ClusterListing {
  std::vector<ClusterSession> sessions;                  // every reachable daemon's sessions
  std::vector<std::pair<std::string, Status>> failures;  // daemons that did not answer
};

class Cluster {
 public:
  // Resolves `spec` (see ResolveAddresses); connects nothing yet.
  static Result<std::unique_ptr<Cluster>> Connect(const std::string& spec,
                                                  const ClientOptions& options = {});
  static Result<std::unique_ptr<Cluster>> Connect(std::vector<std::string> addresses,
                                                  const ClientOptions& options = {});
  ~Cluster();

  const std::vector<std::string>& addresses() const { return addresses_; }
  // The daemon address that owns `session_id`.
  const std::string& AddressFor(uint64_t session_id) const;
  // The connection to the daemon owning `session_id` (connecting on first use).
  Result<Client*> For(uint64_t session_id);
  // The connection to one daemon by its index in addresses().
  Result<Client*> At(size_t index);

  // Like Client's, routed by session id. CreateSession with id 0 draws a random id first.
  Result<uint64_t> CreateSession(const Profile& profile, const SessionOptions& options = {},
                                 uint64_t id = 0);
  Status DropSession(uint64_t id);
  Result<SessionSummary> SessionInfo(uint64_t id);
  Result<AppendResult> AppendKV(uint64_t id, const TensorView& keys, const TensorView& values,
                                std::span<const uint8_t> boundaries = {});
  Result<AttendResult> Attend(uint64_t id, const AttendRequest& request);

  // Sessions of this tenant on every daemon, merged. OK even when some daemons fail (listed in
  // failures); UNAVAILABLE only when none answered.
  Result<ClusterListing> ListSessions();

 private:
  Cluster(std::vector<std::string> addresses, ClientOptions options);

  struct Node {
    std::mutex mu;
    std::unique_ptr<Client> client;  // guarded by mu
  };
  const std::vector<std::string> addresses_;
  const ClientOptions options_;
  std::vector<std::unique_ptr<Node>> nodes_;
};

}  // namespace kvmem::client
