#include "client/cluster.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <set>

#include "wire/ucx.h"

namespace kvmem::client {

namespace {

uint64_t Mix64(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t Fnv1a64(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

uint64_t NewSessionId() {
  static thread_local std::mt19937_64 rng(
      std::random_device{}() ^
      static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()));
  uint64_t id = 0;
  while (id == 0) id = rng() >> 11;  // 53 bits, like Client's
  return id;
}

}  // namespace

size_t RendezvousOwner(uint64_t session_id, const std::vector<std::string>& nodes) {
  size_t best = 0;
  uint64_t best_w = 0;
  const uint64_t key = Mix64(session_id);
  for (size_t i = 0; i < nodes.size(); ++i) {
    const uint64_t w = Mix64(key ^ Fnv1a64(nodes[i]));
    if (i == 0 || w > best_w || (w == best_w && nodes[i] < nodes[best])) {
      best = i;
      best_w = w;
    }
  }
  return best;
}

Result<std::vector<std::string>> ResolveAddresses(const std::string& spec) {
  std::set<std::string> out;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t comma = spec.find(',', start);
    if (comma == std::string::npos) comma = spec.size();
    std::string item = spec.substr(start, comma - start);
    start = comma + 1;
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty()) continue;
    std::string host;
    uint16_t port = 0;
    KVMEM_RETURN_IF_ERROR(ucx::ParseHostPort(item, &host, &port));
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &res);
    if (rc != 0) return Unavailable("cannot resolve '" + host + "': " + gai_strerror(rc));
    // One family per name: IPv4 when the name has any ("localhost" is one daemon, not two).
    bool has_v4 = false;
    for (addrinfo* a = res; a != nullptr; a = a->ai_next) has_v4 |= a->ai_family == AF_INET;
    for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
      if (has_v4 && a->ai_family != AF_INET) continue;
      char buf[INET6_ADDRSTRLEN] = {};
      if (a->ai_family == AF_INET) {
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, buf, sizeof buf);
        out.insert(std::string(buf) + ":" + std::to_string(port));
      } else if (a->ai_family == AF_INET6) {
        inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, buf,
                  sizeof buf);
        out.insert("[" + std::string(buf) + "]:" + std::to_string(port));
      }
    }
    ::freeaddrinfo(res);
  }
  if (out.empty()) return InvalidArgument("no daemon addresses in '" + spec + "'");
  return std::vector<std::string>(out.begin(), out.end());
}

Cluster::Cluster(std::vector<std::string> addresses, ClientOptions options)
    : addresses_(std::move(addresses)), options_(std::move(options)) {
  for (size_t i = 0; i < addresses_.size(); ++i) nodes_.push_back(std::make_unique<Node>());
}

Cluster::~Cluster() = default;

Result<std::unique_ptr<Cluster>> Cluster::Connect(const std::string& spec,
                                                  const ClientOptions& options) {
  KVMEM_ASSIGN_OR_RETURN(std::vector<std::string> addrs, ResolveAddresses(spec));
  return std::unique_ptr<Cluster>(new Cluster(std::move(addrs), options));
}

Result<std::unique_ptr<Cluster>> Cluster::Connect(std::vector<std::string> addresses,
                                                  const ClientOptions& options) {
  std::sort(addresses.begin(), addresses.end());
  addresses.erase(std::unique(addresses.begin(), addresses.end()), addresses.end());
  if (addresses.empty()) return InvalidArgument("Cluster: no daemon addresses");
  return std::unique_ptr<Cluster>(new Cluster(std::move(addresses), options));
}

const std::string& Cluster::AddressFor(uint64_t session_id) const {
  return addresses_[RendezvousOwner(session_id, addresses_)];
}

Result<Client*> Cluster::At(size_t index) {
  if (index >= nodes_.size()) return OutOfRange("Cluster: no daemon #" + std::to_string(index));
  Node& n = *nodes_[index];
  std::lock_guard<std::mutex> lock(n.mu);
  if (!n.client) {
    KVMEM_ASSIGN_OR_RETURN(n.client, Client::Connect(addresses_[index], options_));
  }
  return n.client.get();
}

Result<Client*> Cluster::For(uint64_t session_id) {
  return At(RendezvousOwner(session_id, addresses_));
}

Result<uint64_t> Cluster::CreateSession(const Profile& profile, const SessionOptions& options,
                                        uint64_t id) {
  if (id == 0) id = NewSessionId();
  KVMEM_ASSIGN_OR_RETURN(Client * c, For(id));
  return c->CreateSession(profile, options, id);
}

Status Cluster::DropSession(uint64_t id) {
  KVMEM_ASSIGN_OR_RETURN(Client * c, For(id));
  return c->DropSession(id);
}

Result<SessionSummary> Cluster::SessionInfo(uint64_t id) {
  KVMEM_ASSIGN_OR_RETURN(Client * c, For(id));
  return c->SessionInfo(id);
}

Result<AppendResult> Cluster::AppendKV(uint64_t id, const TensorView& keys,
                                       const TensorView& values,
                                       std::span<const uint8_t> boundaries) {
  KVMEM_ASSIGN_OR_RETURN(Client * c, For(id));
  return c->AppendKV(id, keys, values, boundaries);
}

Result<AttendResult> Cluster::Attend(uint64_t id, const AttendRequest& request) {
  KVMEM_ASSIGN_OR_RETURN(Client * c, For(id));
  return c->Attend(id, request);
}

Result<ClusterListing> Cluster::ListSessions() {
  ClusterListing out;
  for (size_t i = 0; i < addresses_.size(); ++i) {
    auto c = At(i);
    if (!c.ok()) {
      out.failures.emplace_back(addresses_[i], c.status());
      continue;
    }
    auto list = (*c)->ListSessions();
    if (!list.ok()) {
      out.failures.emplace_back(addresses_[i], list.status());
      continue;
    }
    for (auto& s : *list) out.sessions.push_back({addresses_[i], std::move(s)});
  }
  if (out.sessions.empty() && out.failures.size() == addresses_.size()) {
    return Unavailable("no daemon answered: " + out.failures.front().first + ": " +
                       out.failures.front().second.ToString());
  }
  return out;
}

}  // namespace kvmem::client
