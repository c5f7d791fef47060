// kvmemctl: the operator's command line for kvmemd.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <chrono>
#include <ctime>
#include <string>
#include <vector>

#include "client/client.h"
#include "common/units.h"

namespace {

using kvmem::Status;
using kvmem::client::Client;
using nlohmann::json;

constexpr char kUsage[] = R"(kvmemctl - operate kvmemd

Usage: kvmemctl [--addr HOST:PORT] [--token T] [--json] [--transport auto|shm|tcp] <command>

Commands:
  status                                 daemon version, backend, tenant, sessions
  ping [--count N]                       round trips, with latency
  session create --layers L --q-heads HQ --kv-heads HKV --head-dim D
                 [--dtype bf16|fp16|fp32] [--id ID] [--chunk-min N] [--chunk-max N]
                 [--sink N] [--budget N] [--mode dense|index] [--label TEXT]
                 [--durability ephemeral|durable]
                                         prints the new session id
  session list                           sessions of this tenant
  session show ID                        one session with per-layer detail
  session drop ID                        drop a session and free its memory (and its
                                         stored records when durable)
  session verify ID                      re-read every stored chunk of a durable session and
                                         check checksums; exit 1 when a record is bad

Options:
  --addr HOST:PORT   daemon address (default 127.0.0.1:7420, or $KVMEM_ADDR)
  --token T          tenant token (or $KVMEM_TOKEN)
  --json             machine-readable output
Exit status: 0 on success, 1 when the daemon returned an error, 2 on usage errors.
)";

int Usage(const std::string& msg) {
  std::fprintf(stderr, "kvmemctl: %s\n(see kvmemctl --help)\n", msg.c_str());
  return 2;
}

int Report(const Status& s, bool as_json) {
  if (as_json) {
    json j = {{"error", {{"code", std::string(kvmem::StatusCodeName(s.code()))}, {"message", s.message()}}}};
    std::printf("%s\n", j.dump().c_str());
  }
  std::fprintf(stderr, "kvmemctl: %s\n", s.ToString().c_str());
  return 1;
}

std::string ModeName(kvmem::client::Mode m) {
  switch (m) {
    case kvmem::client::Mode::kDense: return "dense";
    case kvmem::client::Mode::kIndex: return "index";
    case kvmem::client::Mode::kRetrievalHeads: return "retrieval_heads";
    case kvmem::client::Mode::kHybrid: return "hybrid";
    default: return "default";
  }
}

json SummaryJson(const kvmem::client::SessionSummary& s) {
  json j = {{"id", s.id},
            {"tenant", s.tenant},
            {"layers", s.profile.layers},
            {"q_heads", s.profile.q_heads},
            {"kv_heads", s.profile.kv_heads},
            {"head_dim", s.profile.head_dim},
            {"dtype", std::string(kvmem::DTypeName(s.profile.dtype))},
            {"tokens", s.tokens},
            {"chunks", s.chunks},
            {"tail_tokens", s.tail_tokens},
            {"mean_chunk_tokens", s.mean_chunk_tokens},
            {"bytes", s.bytes},
            {"mode", ModeName(s.options.mode)},
            {"durable", s.options.durable},
            {"label", s.options.label},
            {"created_unix_ms", s.created_unix_ms},
            {"last_used_unix_ms", s.last_used_unix_ms}};
  if (!s.layers.empty()) {
    json layers = json::array();
    for (const auto& l : s.layers) {
      layers.push_back({{"layer", l.layer}, {"tokens", l.tokens}, {"tree_depth", l.tree_depth},
                        {"tree_nodes", l.tree_nodes}});
    }
    j["layer_info"] = layers;
  }
  return j;
}

// Flags of the form --name VALUE after the command words.
struct Args {
  std::vector<std::string> words;
  std::vector<std::pair<std::string, std::string>> flags;
  const std::string* Get(const std::string& name) const {
    for (const auto& [k, v] : flags)
      if (k == name) return &v;
    return nullptr;
  }
};

bool ParseU64(const std::string& s, uint64_t* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  *out = std::strtoull(s.c_str(), &end, 10);
  return *end == '\0';
}

}  // namespace

int main(int argc, char** argv) {
  std::string addr = std::getenv("KVMEM_ADDR") ? std::getenv("KVMEM_ADDR") : "127.0.0.1:7420";
  kvmem::client::ClientOptions opts;
  if (const char* t = std::getenv("KVMEM_TOKEN")) opts.token = t;
  opts.client_name = "kvmemctl";
  bool as_json = false;
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (a == "--json") {
      as_json = true;
      continue;
    }
    if (a.rfind("--", 0) == 0) {
      std::string value;
      const size_t eq = a.find('=');
      if (eq != std::string::npos) {
        value = a.substr(eq + 1);
        a = a.substr(0, eq);
      } else {
        if (i + 1 >= argc) return Usage("option " + a + " needs a value");
        value = argv[++i];
      }
      if (a == "--addr") addr = value;
      else if (a == "--token") opts.token = value;
      else if (a == "--transport") opts.transport = value;
      else args.flags.emplace_back(a, value);
      continue;
    }
    args.words.push_back(a);
  }
  if (args.words.empty()) return Usage("no command given");

  const std::string cmd = args.words[0];
  const std::string sub = args.words.size() > 1 ? args.words[1] : "";
  const bool known = cmd == "status" || cmd == "ping" ||
                     (cmd == "session" && (sub == "create" || sub == "list" || sub == "show" || sub == "drop" ||
                                           sub == "verify"));
  if (!known) return Usage("unknown command '" + cmd + (sub.empty() ? "" : " " + sub) + "'");

  // Validate flags before connecting, so usage errors do not need a daemon.
  kvmem::client::Profile profile;
  kvmem::client::SessionOptions sopts;
  uint64_t id = 0;
  if (cmd == "session" && sub == "create") {
    auto need = [&](const char* name, uint32_t* out) -> bool {
      const std::string* v = args.Get(name);
      uint64_t x = 0;
      if (v == nullptr || !ParseU64(*v, &x) || x == 0 || x > 0xffffffffu) return false;
      *out = static_cast<uint32_t>(x);
      return true;
    };
    if (!need("--layers", &profile.layers)) return Usage("session create needs --layers N (N > 0)");
    if (!need("--q-heads", &profile.q_heads)) return Usage("session create needs --q-heads N");
    if (!need("--kv-heads", &profile.kv_heads)) return Usage("session create needs --kv-heads N");
    if (!need("--head-dim", &profile.head_dim)) return Usage("session create needs --head-dim N");
    if (const std::string* d = args.Get("--dtype")) {
      auto dt = kvmem::ParseDType(*d);
      if (!dt) return Usage("--dtype must be bf16, fp16 or fp32");
      profile.dtype = *dt;
    }
    if (const std::string* v = args.Get("--id"); v && !ParseU64(*v, &id)) return Usage("--id must be an integer");
    uint32_t x = 0;
    if (args.Get("--chunk-min") && need("--chunk-min", &x)) sopts.chunk_min_tokens = x;
    if (args.Get("--chunk-max") && need("--chunk-max", &x)) sopts.chunk_max_tokens = x;
    if (args.Get("--budget") && need("--budget", &x)) sopts.default_budget_tokens = x;
    if (const std::string* v = args.Get("--sink")) {
      uint64_t s = 0;
      if (!ParseU64(*v, &s)) return Usage("--sink must be an integer");
      sopts.sink_tokens = static_cast<uint32_t>(s);
    }
    if (const std::string* v = args.Get("--label")) sopts.label = *v;
    if (const std::string* v = args.Get("--mode")) {
      if (*v == "dense") sopts.mode = kvmem::client::Mode::kDense;
      else if (*v == "index") sopts.mode = kvmem::client::Mode::kIndex;
      else if (*v == "retrieval_heads") sopts.mode = kvmem::client::Mode::kRetrievalHeads;
      else if (*v == "hybrid") sopts.mode = kvmem::client::Mode::kHybrid;
      else return Usage("--mode must be dense, index, retrieval_heads or hybrid");
    }
    if (const std::string* v = args.Get("--durability")) {
      if (*v == "durable") sopts.durable = true;
      else if (*v == "ephemeral") sopts.durable = false;
      else return Usage("--durability must be ephemeral or durable");
    }
  }
  if (cmd == "session" && (sub == "show" || sub == "drop" || sub == "verify")) {
    if (args.words.size() < 3 || !ParseU64(args.words[2], &id)) return Usage("session " + sub + " needs a session ID");
  }

  auto client = Client::Connect(addr, opts);
  if (!client.ok()) return Report(client.status(), as_json);
  Client& c = **client;

  if (cmd == "status") {
    auto sessions = c.ListSessions();
    if (!sessions.ok()) return Report(sessions.status(), as_json);
    uint64_t tokens = 0, bytes = 0;
    for (const auto& s : *sessions) {
      tokens += s.tokens;
      bytes += s.bytes;
    }
    if (as_json) {
      json j = {{"address", addr},
                {"server_version", c.server().server_version},
                {"backend", c.server().backend},
                {"tenant", c.server().tenant},
                {"sessions", sessions->size()},
                {"tokens", tokens},
                {"bytes", bytes}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("daemon     %s at %s\nbackend    %s\ntenant     %s\nsessions   %zu\ntokens     %llu\nmemory     %s\n",
                  c.server().server_version.c_str(), addr.c_str(), c.server().backend.c_str(),
                  c.server().tenant.c_str(), sessions->size(), static_cast<unsigned long long>(tokens),
                  kvmem::FormatBytes(bytes).c_str());
    }
    return 0;
  }
  if (cmd == "ping") {
    uint64_t count = 5;
    if (const std::string* v = args.Get("--count"); v && (!ParseU64(*v, &count) || count == 0)) {
      return Usage("--count must be a positive integer");
    }
    std::vector<double> us;
    for (uint64_t i = 0; i < count; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      Status s = c.Ping(i);
      auto t1 = std::chrono::steady_clock::now();
      if (!s.ok()) return Report(s, as_json);
      us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::sort(us.begin(), us.end());
    const double p50 = us[us.size() / 2];
    if (as_json) {
      std::printf("%s\n", json({{"count", count}, {"rtt_p50_us", p50}, {"rtt_min_us", us.front()}, {"rtt_max_us", us.back()}}).dump().c_str());
    } else {
      std::printf("%llu pings to %s: min %.1f us, median %.1f us, max %.1f us\n",
                  static_cast<unsigned long long>(count), addr.c_str(), us.front(), p50, us.back());
    }
    return 0;
  }
  if (sub == "create") {
    auto created = c.CreateSession(profile, sopts, id);
    if (!created.ok()) return Report(created.status(), as_json);
    if (as_json) std::printf("%s\n", json({{"id", *created}}).dump().c_str());
    else std::printf("%llu\n", static_cast<unsigned long long>(*created));
    return 0;
  }
  if (sub == "list") {
    auto sessions = c.ListSessions();
    if (!sessions.ok()) return Report(sessions.status(), as_json);
    if (as_json) {
      json arr = json::array();
      for (const auto& s : *sessions) arr.push_back(SummaryJson(s));
      std::printf("%s\n", json({{"sessions", arr}}).dump().c_str());
    } else {
      std::printf("%-20s %6s %5s %5s %5s %5s %10s %8s %10s  %s\n", "ID", "LAYERS", "HQ", "HKV", "D", "DTYPE",
                  "TOKENS", "CHUNKS", "MEMORY", "LABEL");
      for (const auto& s : *sessions) {
        std::printf("%-20llu %6u %5u %5u %5u %5s %10llu %8llu %10s  %s\n", static_cast<unsigned long long>(s.id),
                    s.profile.layers, s.profile.q_heads, s.profile.kv_heads, s.profile.head_dim,
                    std::string(kvmem::DTypeName(s.profile.dtype)).c_str(),
                    static_cast<unsigned long long>(s.tokens), static_cast<unsigned long long>(s.chunks),
                    kvmem::FormatBytes(s.bytes).c_str(), s.options.label.c_str());
      }
    }
    return 0;
  }
  if (sub == "show") {
    auto s = c.SessionInfo(id);
    if (!s.ok()) return Report(s.status(), as_json);
    if (as_json) {
      std::printf("%s\n", SummaryJson(*s).dump().c_str());
    } else {
      std::printf("session      %llu (tenant %s)%s%s\n", static_cast<unsigned long long>(s->id), s->tenant.c_str(),
                  s->options.label.empty() ? "" : ", label ", s->options.label.c_str());
      std::printf("profile      %u layers, %u q heads, %u kv heads, head dim %u, %s\n", s->profile.layers,
                  s->profile.q_heads, s->profile.kv_heads, s->profile.head_dim,
                  std::string(kvmem::DTypeName(s->profile.dtype)).c_str());
      std::printf("mode         %s, sinks %u, budget %u tokens\n", ModeName(s->options.mode).c_str(),
                  s->options.sink_tokens, s->options.default_budget_tokens);
      std::printf("tokens       %llu (%llu chunks, mean %.1f tokens; tail %u)\n",
                  static_cast<unsigned long long>(s->tokens), static_cast<unsigned long long>(s->chunks),
                  s->mean_chunk_tokens, s->tail_tokens);
      std::printf("memory       %s\n", kvmem::FormatBytes(s->bytes).c_str());
      std::printf("%-6s %10s %6s  %s\n", "LAYER", "TOKENS", "DEPTH", "TREE NODES PER LEVEL");
      for (const auto& l : s->layers) {
        std::string nodes;
        for (size_t i = 0; i < l.tree_nodes.size(); ++i) nodes += (i ? " / " : "") + std::to_string(l.tree_nodes[i]);
        std::printf("%-6u %10llu %6u  %s\n", l.layer, static_cast<unsigned long long>(l.tokens), l.tree_depth,
                    nodes.empty() ? "-" : nodes.c_str());
      }
    }
    return 0;
  }
  if (sub == "verify") {
    auto v = c.VerifySession(id);
    if (!v.ok()) return Report(v.status(), as_json);
    if (as_json) {
      std::printf("%s\n", json({{"ok", v->ok}, {"tokens", v->tokens}, {"chunks", v->chunks},
                                {"bad", v->bad}}).dump().c_str());
    } else {
      std::printf("%s: %llu tokens, %llu chunks checked, %zu bad\n", v->ok ? "ok" : "BAD",
                  static_cast<unsigned long long>(v->tokens),
                  static_cast<unsigned long long>(v->chunks), v->bad.size());
      for (const auto& b : v->bad) std::printf("  %s\n", b.c_str());
    }
    return v->ok ? 0 : 1;
  }
  if (sub == "drop") {
    Status s = c.DropSession(id);
    if (!s.ok()) return Report(s, as_json);
    if (as_json) std::printf("%s\n", json({{"dropped", id}}).dump().c_str());
    else std::printf("dropped %llu\n", static_cast<unsigned long long>(id));
    return 0;
  }
  return Usage("unknown command");
}
