// kvmem-load: appends a reproducible synthetic K/V stream to one session (client/
// synthetic_stream.h), creating it durable if missing and resuming at its current length, so
// a run interrupted by a daemon crash can be checked token for token afterwards.
// Progress on stderr; the last stdout line is JSON {"tokens", "bytes", "seconds", ...}.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "client/client.h"
#include "client/synthetic_stream.h"

namespace {

constexpr char kUsage[] = R"(kvmem-load - append a reproducible synthetic K/V stream

Usage: kvmem-load --session ID --tokens N [--addr HOST:PORT] [--token T] [--seed S] [--batch B]
                  [--layers L] [--q-heads HQ] [--kv-heads HKV] [--head-dim D] [--dtype bf16|fp16|fp32]
                  [--durability durable|ephemeral] [--request-timeout-ms MS]

Creates the session (durable by default, profile defaults 4 x 8/2 x 64 bf16) when missing, else
continues it from its current token count. Appends N tokens in batches of B (default 256);
token t's values depend only on (seed, layer, head, t, dim). Last stdout line:
{"tokens": acknowledged, "bytes": n, "seconds": s, "session_tokens": total, "error": ...}.
Exit 0 when all N tokens were acknowledged, 1 otherwise, 2 on usage errors.
)";

int Usage(const std::string& m) {
  std::fprintf(stderr, "kvmem-load: %s\n(see --help)\n", m.c_str());
  return 2;
}

bool ParseU64(const char* s, uint64_t* out) {
  char* end = nullptr;
  *out = std::strtoull(s, &end, 10);
  return *s != '\0' && *end == '\0';
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kvmem;
  std::string addr = std::getenv("KVMEM_ADDR") ? std::getenv("KVMEM_ADDR") : "127.0.0.1:7420";
  client::ClientOptions opts;
  opts.client_name = "kvmem-load";
  if (const char* t = std::getenv("KVMEM_TOKEN")) opts.token = t;
  uint64_t session = 0, tokens = 0, seed = 1, batch = 256;
  uint64_t layers = 4, q_heads = 8, kv_heads = 2, head_dim = 64;
  DType dtype = DType::kBF16;
  bool durable = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (i + 1 >= argc) return Usage("option " + a + " needs a value");
    const char* v = argv[++i];
    bool ok = true;
    if (a == "--addr") addr = v;
    else if (a == "--token") opts.token = v;
    else if (a == "--session") ok = ParseU64(v, &session) && session > 0;
    else if (a == "--tokens") ok = ParseU64(v, &tokens);
    else if (a == "--seed") ok = ParseU64(v, &seed);
    else if (a == "--request-timeout-ms") {
      uint64_t ms = 0;
      ok = ParseU64(v, &ms) && ms > 0 && ms < (1u << 30);
      opts.request_timeout_ms = static_cast<int>(ms);
    }
    else if (a == "--batch") ok = ParseU64(v, &batch) && batch > 0 && batch <= (1u << 20);
    else if (a == "--layers") ok = ParseU64(v, &layers);
    else if (a == "--q-heads") ok = ParseU64(v, &q_heads);
    else if (a == "--kv-heads") ok = ParseU64(v, &kv_heads);
    else if (a == "--head-dim") ok = ParseU64(v, &head_dim);
    else if (a == "--dtype") {
      auto d = ParseDType(v);
      ok = d.has_value();
      if (ok) dtype = *d;
    } else if (a == "--durability") {
      ok = std::string(v) == "durable" || std::string(v) == "ephemeral";
      durable = std::string(v) == "durable";
    } else {
      return Usage("unknown option " + a);
    }
    if (!ok) return Usage("bad value for " + a + ": " + v);
  }
  if (session == 0) return Usage("--session ID (nonzero) is required");

  auto connected = client::Client::Connect(addr, opts);
  if (!connected.ok()) {
    std::fprintf(stderr, "kvmem-load: %s\n", connected.status().ToString().c_str());
    return 1;
  }
  client::Client& c = **connected;
  client::Profile profile{static_cast<uint32_t>(layers), static_cast<uint32_t>(q_heads),
                          static_cast<uint32_t>(kv_heads), static_cast<uint32_t>(head_dim),
                          dtype, {}, {}, "kvmem-load"};
  uint64_t start = 0;
  auto info = c.SessionInfo(session);
  if (info.ok()) {
    profile = info->profile;
    start = info->tokens;
  } else {
    client::SessionOptions so;
    so.durable = durable;
    auto created = c.CreateSession(profile, so, session);
    if (!created.ok()) {
      std::fprintf(stderr, "kvmem-load: create: %s\n", created.status().ToString().c_str());
      return 1;
    }
  }
  client::SyntheticStream stream(seed, profile.layers, profile.kv_heads, profile.head_dim,
                                 profile.dtype);
  const auto t0 = std::chrono::steady_clock::now();
  auto last = t0;
  uint64_t done = 0, bytes = 0, session_tokens = start;
  Status error;
  std::vector<uint8_t> k, v;
  while (done < tokens) {
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(batch, tokens - done));
    stream.Fill(session_tokens, n, &k, &v);
    auto b = stream.Boundaries(session_tokens, n);
    const std::vector<uint64_t> shape = {profile.layers, profile.kv_heads, n, profile.head_dim};
    auto r = c.AppendKV(session, client::TensorView{k.data(), profile.dtype, shape},
                        client::TensorView{v.data(), profile.dtype, shape}, b);
    if (!r.ok()) {
      error = r.status();
      break;
    }
    done += n;
    bytes += 2 * k.size();
    session_tokens = r->tokens;
    const auto now = std::chrono::steady_clock::now();
    if (now - last > std::chrono::seconds(1)) {
      last = now;
      std::fprintf(stderr, "kvmem-load: %llu / %llu tokens\n", static_cast<unsigned long long>(done),
                   static_cast<unsigned long long>(tokens));
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  nlohmann::json j = {{"tokens", done}, {"bytes", bytes}, {"seconds", secs},
                      {"session_tokens", session_tokens}, {"session", session}, {"seed", seed}};
  if (!error.ok()) j["error"] = error.ToString();
  std::printf("%s\n", j.dump().c_str());
  return error.ok() ? 0 : 1;
}
