// kvmem-stress: load and soak test for kvmemd (issue 9). Many client threads, each with its own
// kvmem::Client connection, run a mixed load on durable and ephemeral sessions, drop their
// connection at random with a request in flight and reconnect, and track every acknowledged
// append. At the end every session is checked: its token count against what was acknowledged,
// durable sessions' stored records (VerifySession), and dense attention against a reference
// computed here from the same synthetic tokens. The daemon's RSS is read at a baseline (after
// a warm-up phase whose sessions are dropped) and at the end (after this run's sessions are
// dropped), so the growth measures what the daemon kept.
//
// Ownership: session slot i belongs to thread i % clients, which alone appends to, drops and
// recreates it; so the token count of a session is known exactly. Attend, Retrieve and
// SessionInfo also go to other threads' sessions (read-only), where NOT_FOUND is expected: the
// owner may just have dropped it. Every other error is unexpected.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "client/client.h"
#include "client/synthetic_stream.h"
#include "testing/daemon_process.h"
#include "testing/http_get.h"
#include "testing/reference.h"

namespace kvmem {
namespace {

constexpr char kUsage[] = R"(kvmem-stress - load and soak test for kvmemd

Usage: kvmem-stress (--addr HOST:PORT [--pid PID] | --spawn) --clients C --sessions S
                    --duration SECONDS --json FILE [options]
  --token T               tenant token (Hello)
  --mix OP=W,...          weights of append, attend, retrieve, drop, info
                          (default append=50,attend=25,retrieve=15,drop=5,info=5)
  --disconnect-rate R     probability that an append / attend is sent asynchronously and the
                          client is destroyed with it in flight, then reconnected (default 0.01)
  --durable-fraction F    share of sessions created durable (default 0.5)
  --index-fraction F      share of sessions created in index mode (default 0), with a budget
                          over every token they can hold, so their Attends run the index search
                          (on the GPU: the device search) and still equal dense attention, which
                          the reference checks hold them to
  --max-session-tokens N  an owner drops and recreates a session past N tokens (default 2048)
  --warmup SECONDS        warm-up phase before the baseline RSS (default min(30, duration/10), >= 1)
  --reference-rate P      share of own-session Attends checked against the reference (default 0.05)
  --pid PID               daemon process whose RSS is read from /proc/PID/status
  --admin-port PORT       daemon admin port (loopback): endpoints open at the end
  --spawn                 start kvmemd (next to this binary) on free ports with a temporary
                          data dir, stop it with SIGTERM at the end (exit status reported)
  --daemon-arg ARG        extra kvmemd argument with --spawn (repeatable)
  --settle SECONDS        idle wait after the sessions are dropped, before each RSS reading
                          (default 25: kvmemd gives memory back after idle_trim_seconds, 10).
                          With the admin port known, the wait ends early, 1 s after kvmemd's
                          next idle trim (kvmem_idle_trims_total)
  --seed N                (default 1)
Exit status: 0 when there were no unexpected errors and verification passed, 1 otherwise.
)";

enum Op { kAppend, kAttend, kRetrieve, kDrop, kInfo, kNumOps };
const char* const kOpNames[kNumOps] = {"append", "attend", "retrieve", "drop", "info"};

// The session profile: small, so 64 clients fit a small machine; appends of 1..64 tokens cover
// both eager (small) and rendezvous (large) messages.
constexpr uint32_t kLayers = 2, kQHeads = 4, kKvHeads = 2, kHeadDim = 64;
constexpr DType kDType = DType::kBF16;
constexpr uint32_t kMaxAppend = 64;

struct Args {
  std::string addr;
  std::string token;
  int clients = 4;
  int sessions = 8;
  double duration_s = 10;
  double warmup_s = -1;
  double weights[kNumOps] = {50, 25, 15, 5, 5};
  double disconnect_rate = 0.01;
  double durable_fraction = 0.5;
  double index_fraction = 0;
  uint64_t max_session_tokens = 2048;
  double reference_rate = 0.05;
  pid_t pid = 0;
  uint16_t admin_port = 0;
  bool spawn = false;
  std::vector<std::string> daemon_args;
  uint64_t seed = 1;
  double settle_s = 25;
  std::string json;
};

// One session slot, owned by one thread. `id` is readable by every thread (cross reads).
struct Slot {
  std::atomic<uint64_t> id{0};
  bool durable = false;
  bool index = false;            // index mode (budget over every token it can hold)
  uint64_t seed = 0;             // synthetic stream seed of the current session
  uint64_t tokens = 0;           // exact token count as acknowledged / resynced
  uint32_t uncertain = 0;        // tokens of an append abandoned with the connection
  bool resync = false;           // the count must be re-read (after an abandoned append / error)
  bool tainted = false;          // an abandoned append landed after the resync: content unknown
};

struct ThreadStats {
  uint64_t ops[kNumOps] = {};
  std::vector<uint32_t> lat_us[kNumOps];
  std::map<std::string, uint64_t> expected, unexpected;
  std::vector<std::string> unexpected_samples;  // first few messages
  uint64_t disconnects = 0, reconnects = 0, connect_failures = 0;
  uint64_t acked_tokens = 0, reference_checks = 0, reference_failures = 0;
  uint64_t lost_tokens = 0, count_anomalies = 0, sessions_created = 0, index_sessions_created = 0;
};

struct Shared {
  const Args* args = nullptr;
  std::string addr;
  std::vector<Slot> slots;
  std::atomic<uint64_t> next_seed{1};
  explicit Shared(size_t n) : slots(n) {}
};

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void Unexpected(ThreadStats& st, const std::string& what, const Status& s) {
  st.unexpected[std::string(StatusCodeName(s.code()))]++;
  if (st.unexpected_samples.size() < 5) st.unexpected_samples.push_back(what + ": " + s.ToString());
}

client::Profile MakeProfile() { return client::Profile{kLayers, kQHeads, kKvHeads, kHeadDim, kDType, {}, {}, "stress"}; }

// Attention of a session holding synthetic tokens [0, tokens) of stream `seed`, checked
// against the double-precision dense reference: dense mode, or index mode with a budget that
// selects every chunk. OK or a message naming the difference.
Status CheckAgainstReference(client::Client& c, uint64_t id, uint64_t seed, uint64_t tokens,
                             bool index, std::mt19937_64& rng) {
  if (tokens == 0) return Status::OK();
  client::SyntheticStream stream(seed, kLayers, kKvHeads, kHeadDim, kDType);
  std::vector<uint8_t> k, v;
  stream.Fill(0, static_cast<uint32_t>(tokens), &k, &v);
  std::normal_distribution<float> nd(0.f, 0.3f);
  std::vector<float> q(kQHeads * kHeadDim);
  for (float& x : q) x = nd(rng);
  const uint32_t layer = static_cast<uint32_t>(rng() % kLayers);
  client::AttendRequest req;
  req.layer = layer;
  req.q = {q.data(), DType::kF32, {kQHeads, kHeadDim}};
  req.out_dtype = DType::kF32;
  req.mode = index ? client::Mode::kIndex : client::Mode::kDense;
  auto r = c.Attend(id, req);
  if (!r.ok()) return r.status();
  std::vector<float> out(kQHeads * kHeadDim);
  std::memcpy(out.data(), r->out.data(), out.size() * sizeof(float));
  const auto ref = testing::ReferenceAttention(k, v, kDType, kLayers, kKvHeads, tokens, kHeadDim,
                                               layer, q, kQHeads);
  const double err = testing::RelativeError(out, ref);
  if (!(err <= 1e-3)) {
    return DataLoss("session " + std::to_string(id) + (index ? " (index mode)" : "") + ": attention over " +
                    std::to_string(tokens) + " tokens differs from the reference (rel. error " +
                    std::to_string(err) + ")");
  }
  return Status::OK();
}

class Worker {
 public:
  Worker(Shared* sh, int index, double end_time)
      : sh_(sh), a_(*sh->args), index_(index), end_(end_time), rng_(a_.seed * 7919 + index) {
    for (size_t i = index; i < sh_->slots.size(); i += a_.clients) own_.push_back(i);
    for (int o = 0; o < kNumOps; ++o) total_weight_ += a_.weights[o];
  }

  void Run() {
    client_opts_.token = a_.token;
    client_opts_.client_name = "kvmem-stress";
    client_opts_.request_timeout_ms = 60000;
    if (!Connect()) return;
    for (size_t i : own_) CreateFresh(sh_->slots[i]);
    while (Now() < end_) {
      if (!client_ && !Connect()) continue;
      Step();
    }
  }

  // End of a phase: resync and verify every owned session, then drop them.
  void Finish(bool verify) {
    if (!client_ && !Connect() && !Connect()) return;
    for (size_t i : own_) {
      Slot& s = sh_->slots[i];
      if (s.id == 0) continue;
      if (s.resync && !Resync(s)) continue;
      if (verify) Verify(s);
      const Status d = client_->DropSession(s.id);
      if (!d.ok()) Unexpected(st_, "final drop", d);
      s.id = 0;
    }
    client_.reset();
  }

  ThreadStats& stats() { return st_; }

 private:
  bool Connect() {
    auto c = client::Client::Connect(sh_->addr, client_opts_);
    if (!c.ok()) {
      st_.connect_failures++;
      Unexpected(st_, "connect", c.status());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      return false;
    }
    client_ = std::move(*c);
    st_.reconnects++;
    for (size_t i : own_) {
      if (sh_->slots[i].resync) Resync(sh_->slots[i]);
    }
    return true;
  }

  void CreateFresh(Slot& s) {
    s.seed = sh_->next_seed.fetch_add(1) * 1000003 + a_.seed;
    s.durable = std::uniform_real_distribution<double>(0, 1)(rng_) < a_.durable_fraction;
    s.index = std::uniform_real_distribution<double>(0, 1)(rng_) < a_.index_fraction;
    s.tokens = 0;
    s.uncertain = 0;
    s.resync = false;
    s.tainted = false;
    client::SessionOptions so;
    so.durable = s.durable;
    so.mode = s.index ? client::Mode::kIndex : client::Mode::kDense;
    // An owner drops its session past max_session_tokens, after an append of at most kMaxAppend.
    if (s.index) so.default_budget_tokens = static_cast<uint32_t>(a_.max_session_tokens + kMaxAppend);
    so.label = "stress";
    for (int attempt = 0; attempt < 3; ++attempt) {
      auto id = client_->CreateSession(MakeProfile(), so);
      if (id.ok()) {
        s.id = *id;
        st_.sessions_created++;
        if (s.index) st_.index_sessions_created++;
        return;
      }
      if (id.status().code() != StatusCode::kAlreadyExists) {
        Unexpected(st_, "create", id.status());
        break;
      }
    }
    s.id = 0;
  }

  // Re-reads an owned session's token count after an abandoned append or an error.
  bool Resync(Slot& s) {
    auto info = client_->SessionInfo(s.id);
    if (!info.ok()) {
      Unexpected(st_, "resync session " + std::to_string(s.id), info.status());
      return false;
    }
    if (info->tokens < s.tokens) {
      st_.lost_tokens += s.tokens - info->tokens;
      Unexpected(st_, "resync", DataLoss("session " + std::to_string(s.id) + " holds " +
                                         std::to_string(info->tokens) + " tokens, " +
                                         std::to_string(s.tokens) + " were acknowledged"));
    } else if (info->tokens > s.tokens + s.uncertain) {
      st_.count_anomalies++;
      s.tainted = true;
    }
    s.tokens = info->tokens;
    s.uncertain = 0;
    s.resync = false;
    return true;
  }

  void Verify(Slot& s) {
    auto info = client_->SessionInfo(s.id);
    if (!info.ok()) return Unexpected(st_, "verify info", info.status());
    if (info->tokens != s.tokens) {
      if (info->tokens < s.tokens) st_.lost_tokens += s.tokens - info->tokens;
      else st_.count_anomalies++;
      Unexpected(st_, "verify", DataLoss("session " + std::to_string(s.id) + " holds " +
                                         std::to_string(info->tokens) + " tokens, expected " +
                                         std::to_string(s.tokens)));
      return;
    }
    if (s.durable) {
      auto v = client_->VerifySession(s.id);
      if (!v.ok()) return Unexpected(st_, "verify stored", v.status());
      if (!v->ok || v->tokens != s.tokens) {
        std::string bad = v->bad.empty() ? "" : v->bad[0];
        Unexpected(st_, "verify stored",
                   DataLoss("session " + std::to_string(s.id) + ": stored " +
                            std::to_string(v->tokens) + " tokens of " + std::to_string(s.tokens) +
                            (bad.empty() ? "" : ", " + bad)));
      }
    }
    if (!s.tainted) Reference(s);
  }

  void Reference(Slot& s) {
    st_.reference_checks++;
    const Status r = CheckAgainstReference(*client_, s.id, s.seed, s.tokens, s.index, rng_);
    if (!r.ok()) {
      st_.reference_failures++;
      Unexpected(st_, "reference", r);
    }
  }

  Op PickOp() {
    double x = std::uniform_real_distribution<double>(0, total_weight_)(rng_);
    for (int o = 0; o < kNumOps; ++o) {
      if (x < a_.weights[o]) return static_cast<Op>(o);
      x -= a_.weights[o];
    }
    return kAppend;
  }

  Slot& OwnSlot() { return sh_->slots[own_[rng_() % own_.size()]]; }

  void Record(Op op, double t0) {
    st_.ops[op]++;
    st_.lat_us[op].push_back(static_cast<uint32_t>(std::min(4e9, (Now() - t0) * 1e6)));
  }

  bool Disconnect() {
    return std::uniform_real_distribution<double>(0, 1)(rng_) < a_.disconnect_rate;
  }

  // A read-only op's target: an own session or any slot (whose owner may drop it meanwhile).
  uint64_t ReadTarget(bool* own) {
    *own = (rng_() & 1) == 0;
    if (*own) return OwnSlot().id;
    return sh_->slots[rng_() % sh_->slots.size()].id.load();
  }

  void Step() {
    const Op op = PickOp();
    switch (op) {
      case kAppend: return Append();
      case kAttend: return Attend();
      case kRetrieve: return Retrieve();
      case kDrop: return Drop();
      case kInfo: return Info();
      default: return;
    }
  }

  void Append() {
    Slot& s = OwnSlot();
    if (s.id == 0) return CreateFresh(s);
    const uint32_t n = 1 + static_cast<uint32_t>(rng_() % kMaxAppend);
    if (s.tokens + n > a_.max_session_tokens) return Drop(&s);
    client::SyntheticStream stream(s.seed, kLayers, kKvHeads, kHeadDim, kDType);
    std::vector<uint8_t> k, v;
    stream.Fill(s.tokens, n, &k, &v);
    const auto b = stream.Boundaries(s.tokens, n);
    const std::vector<uint64_t> shape = {kLayers, kKvHeads, n, kHeadDim};
    const client::TensorView kt{k.data(), kDType, shape}, vt{v.data(), kDType, shape};
    if (Disconnect()) {
      // Abandon the request with the connection; its outcome is learnt at the resync.
      auto f = client_->AppendKVAsync(s.id, kt, vt, b);
      s.uncertain = n;
      s.resync = true;
      client_.reset();  // closes the endpoint while the request may be in flight
      st_.disconnects++;
      return;
    }
    const double t0 = Now();
    auto r = client_->AppendKV(s.id, kt, vt, b);
    Record(kAppend, t0);
    if (!r.ok()) {
      Unexpected(st_, "append", r.status());
      s.resync = true;
      Resync(s);
      return;
    }
    if (r->tokens != s.tokens + n) {
      // An abandoned append landed after the resync: positions no longer match the stream.
      st_.count_anomalies++;
      s.tainted = true;
    }
    s.tokens = r->tokens;
    st_.acked_tokens += n;
  }

  void Attend() {
    bool own = false;
    const uint64_t id = ReadTarget(&own);
    if (id == 0) return;
    Slot* mine = nullptr;
    for (size_t i : own_)
      if (sh_->slots[i].id == id) mine = &sh_->slots[i];
    if (mine != nullptr && !mine->tainted && !mine->resync &&
        std::uniform_real_distribution<double>(0, 1)(rng_) < a_.reference_rate) {
      const double t0 = Now();
      Reference(*mine);
      Record(kAttend, t0);
      return;
    }
    std::normal_distribution<float> nd(0.f, 0.3f);
    std::vector<float> q(kQHeads * kHeadDim);
    for (float& x : q) x = nd(rng_);
    client::AttendRequest req;
    req.layer = static_cast<uint32_t>(rng_() % kLayers);
    req.q = {q.data(), DType::kF32, {kQHeads, kHeadDim}};
    req.out_dtype = DType::kBF16;
    req.return_lse = true;
    if (Disconnect()) {
      auto f = client_->AttendAsync(id, req);
      client_.reset();
      st_.disconnects++;
      return;
    }
    const double t0 = Now();
    auto r = client_->Attend(id, req);
    Record(kAttend, t0);
    Classify("attend", r.status(), mine != nullptr);
  }

  void Retrieve() {
    bool own = false;
    const uint64_t id = ReadTarget(&own);
    if (id == 0) return;
    std::normal_distribution<float> nd(0.f, 0.3f);
    std::vector<float> q(kQHeads * kHeadDim);
    for (float& x : q) x = nd(rng_);
    const uint32_t top = (rng_() & 1) ? 4 : 0;
    const double t0 = Now();
    auto r = client_->Retrieve(id, static_cast<uint32_t>(rng_() % kLayers),
                               {q.data(), DType::kF32, {kQHeads, kHeadDim}}, 256, top);
    Record(kRetrieve, t0);
    Classify("retrieve", r.status(), IsOwn(id));
  }

  void Info() {
    bool own = false;
    const uint64_t id = ReadTarget(&own);
    if (id == 0) return;
    const double t0 = Now();
    auto r = client_->SessionInfo(id);
    Record(kInfo, t0);
    Classify("info", r.status(), IsOwn(id));
  }

  void Drop(Slot* target = nullptr) {
    Slot& s = target ? *target : OwnSlot();
    if (s.id == 0) return CreateFresh(s);
    if (s.resync && !Resync(s)) return;
    const uint64_t id = s.id;
    s.id = 0;  // cross readers may still hold it: they get NOT_FOUND (expected)
    const double t0 = Now();
    const Status d = client_->DropSession(id);
    Record(kDrop, t0);
    if (!d.ok()) Unexpected(st_, "drop", d);
    CreateFresh(s);
  }

  bool IsOwn(uint64_t id) const {
    for (size_t i : own_)
      if (sh_->slots[i].id == id) return true;
    return false;
  }

  // NOT_FOUND on another thread's session is expected (its owner may have dropped it).
  void Classify(const char* what, const Status& s, bool own) {
    if (s.ok()) return;
    if (!own && s.code() == StatusCode::kNotFound) {
      st_.expected[std::string(StatusCodeName(s.code()))]++;
      return;
    }
    Unexpected(st_, what, s);
  }

  Shared* sh_;
  const Args& a_;
  int index_;
  double end_;
  std::mt19937_64 rng_;
  std::vector<size_t> own_;
  double total_weight_ = 0;
  client::ClientOptions client_opts_;
  std::unique_ptr<client::Client> client_;
  ThreadStats st_;
};

uint64_t ReadRss(pid_t pid, const char* field = "VmRSS:") {
  if (pid <= 0) return 0;
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(field, 0) == 0) return std::strtoull(line.c_str() + std::strlen(field), nullptr, 10) * 1024;
  }
  return 0;
}

// Runs one phase (all threads for `seconds`, then verify-and-drop) and returns the stats.
std::vector<ThreadStats> RunPhase(Shared* sh, double seconds, bool verify) {
  const double end = Now() + seconds;
  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < sh->args->clients; ++i) workers.push_back(std::make_unique<Worker>(sh, i, end));
  std::vector<std::thread> threads;
  for (auto& w : workers) {
    threads.emplace_back([&w, verify] {
      w->Run();
      w->Finish(verify);
    });
  }
  for (auto& t : threads) t.join();
  std::vector<ThreadStats> out;
  for (auto& w : workers) out.push_back(std::move(w->stats()));
  return out;
}

bool ParseMix(const std::string& s, double* w) {
  double fresh[kNumOps] = {};
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos) return false;
    const std::string name = item.substr(0, eq);
    const int o = static_cast<int>(std::find(kOpNames, kOpNames + kNumOps, name) - kOpNames);
    if (o >= kNumOps) return false;
    char* end = nullptr;
    fresh[o] = std::strtod(item.c_str() + eq + 1, &end);
    if (*end != '\0' || fresh[o] < 0) return false;
  }
  double total = 0;
  for (double x : fresh) total += x;
  if (total <= 0) return false;
  std::copy(fresh, fresh + kNumOps, w);
  return true;
}

int Usage(const std::string& m) {
  std::fprintf(stderr, "kvmem-stress: %s\n(see --help)\n", m.c_str());
  return 2;
}

uint64_t MetricValue(const std::string& text, const std::string& name) {
  const size_t at = text.find("\n" + name + " ");
  if (at == std::string::npos) return 0;
  return std::strtoull(text.c_str() + at + name.size() + 2, nullptr, 10);
}

// Waits until the daemon is idle and has given memory back: with the admin port, until the
// first idle trim after this call (so every RSS reading is taken in the same state: sessions
// dropped, memtables flushed, retained memory freed, heap trimmed), at most settle_s.
// Returns whether a trim was seen.
bool Settle(const Args& a) {
  auto trims = [&]() -> int64_t {
    if (a.admin_port == 0) return -1;
    auto m = testing::HttpGet(a.admin_port, "/metrics");
    return m.status == 200 ? static_cast<int64_t>(MetricValue(m.body, "kvmem_idle_trims_total")) : -1;
  };
  const int64_t before = trims();
  if (before < 0) {
    std::this_thread::sleep_for(std::chrono::duration<double>(a.settle_s));
    return false;
  }
  const double deadline = Now() + a.settle_s;
  while (Now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    if (trims() > before) {
      std::this_thread::sleep_for(std::chrono::seconds(1));
      return true;
    }
  }
  return false;
}

int Main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (k == "--spawn") {
      a.spawn = true;
      continue;
    }
    if (i + 1 >= argc) return Usage("option " + k + " needs a value");
    const std::string v = argv[++i];
    char* end = nullptr;
    auto num = [&](double lo, double hi) {
      const double x = std::strtod(v.c_str(), &end);
      return (*end == '\0' && x >= lo && x <= hi) ? x : std::nan("");
    };
    double x = 0;
    if (k == "--addr") a.addr = v;
    else if (k == "--token") a.token = v;
    else if (k == "--json") a.json = v;
    else if (k == "--clients") { if (std::isnan(x = num(1, 1024))) return Usage("bad --clients"); a.clients = static_cast<int>(x); }
    else if (k == "--sessions") { if (std::isnan(x = num(1, 1 << 20))) return Usage("bad --sessions"); a.sessions = static_cast<int>(x); }
    else if (k == "--duration") { if (std::isnan(x = num(0.1, 1e6))) return Usage("bad --duration"); a.duration_s = x; }
    else if (k == "--warmup") { if (std::isnan(x = num(0, 1e6))) return Usage("bad --warmup"); a.warmup_s = x; }
    else if (k == "--disconnect-rate") { if (std::isnan(x = num(0, 1))) return Usage("bad --disconnect-rate"); a.disconnect_rate = x; }
    else if (k == "--durable-fraction") { if (std::isnan(x = num(0, 1))) return Usage("bad --durable-fraction"); a.durable_fraction = x; }
    else if (k == "--index-fraction") { if (std::isnan(x = num(0, 1))) return Usage("bad --index-fraction"); a.index_fraction = x; }
    else if (k == "--reference-rate") { if (std::isnan(x = num(0, 1))) return Usage("bad --reference-rate"); a.reference_rate = x; }
    else if (k == "--max-session-tokens") { if (std::isnan(x = num(kMaxAppend, 1 << 24))) return Usage("bad --max-session-tokens"); a.max_session_tokens = static_cast<uint64_t>(x); }
    else if (k == "--pid") { if (std::isnan(x = num(1, 1 << 30))) return Usage("bad --pid"); a.pid = static_cast<pid_t>(x); }
    else if (k == "--admin-port") { if (std::isnan(x = num(1, 65535))) return Usage("bad --admin-port"); a.admin_port = static_cast<uint16_t>(x); }
    else if (k == "--settle") { if (std::isnan(x = num(0, 3600))) return Usage("bad --settle"); a.settle_s = x; }
    else if (k == "--seed") { if (std::isnan(x = num(0, 1e15))) return Usage("bad --seed"); a.seed = static_cast<uint64_t>(x); }
    else if (k == "--mix") { if (!ParseMix(v, a.weights)) return Usage("bad --mix (e.g. append=50,attend=30,retrieve=15,drop=5)"); }
    else if (k == "--daemon-arg") a.daemon_args.push_back(v);
    else return Usage("unknown option " + k);
  }
  if (a.addr.empty() == !a.spawn) return Usage("give exactly one of --addr and --spawn");
  if (a.json.empty()) return Usage("--json FILE is required");
  if (a.sessions < a.clients) return Usage("--sessions must be >= --clients (each client owns sessions)");
  if (a.warmup_s < 0) a.warmup_s = std::max(1.0, std::min(30.0, a.duration_s / 10));

  std::unique_ptr<testing::DaemonProcess> daemon;
  if (a.spawn) {
    std::vector<std::string> extra = a.daemon_args;
    a.admin_port = testing::FreePort();
    extra.push_back("--admin");
    extra.push_back("127.0.0.1:" + std::to_string(a.admin_port));
    daemon = std::make_unique<testing::DaemonProcess>(extra, a.token);
    if (!daemon->ready()) {
      std::fprintf(stderr, "kvmem-stress: spawned kvmemd did not become ready\n");
      return 1;
    }
    a.addr = daemon->address();
    a.pid = daemon->pid();
  }

  // The daemon as started (or as found with --addr), idle, before any load of this run.
  const uint64_t rss_start = ReadRss(a.pid);
  Shared sh(static_cast<size_t>(a.sessions));
  sh.args = &a;
  sh.addr = a.addr;
  std::fprintf(stderr, "kvmem-stress: warm-up %.0f s\n", a.warmup_s);
  RunPhase(&sh, a.warmup_s, /*verify=*/true);
  const bool base_trimmed = Settle(a);
  const uint64_t rss_base = ReadRss(a.pid);
  std::fprintf(stderr, "kvmem-stress: baseline RSS %.1f MiB; %d clients, %d sessions, %.0f s\n",
               rss_base / 1048576.0, a.clients, a.sessions, a.duration_s);
  const double t0 = Now();
  // RSS during the run (a leak keeps climbing; caches level off).
  std::vector<nlohmann::json> rss_samples;
  std::atomic<bool> done{false};
  std::thread sampler([&] {
    const double every = std::max(1.0, a.duration_s / 20);
    double next = t0 + every;
    while (!done) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (Now() < next) continue;
      next += every;
      rss_samples.push_back({{"t_s", std::round(Now() - t0)}, {"rss_bytes", ReadRss(a.pid)}});
    }
  });
  std::vector<ThreadStats> st = RunPhase(&sh, a.duration_s, /*verify=*/true);
  const double elapsed = Now() - t0;
  done = true;
  sampler.join();
  const bool end_trimmed = Settle(a);
  const uint64_t rss_end = ReadRss(a.pid);
  const uint64_t rss_peak = ReadRss(a.pid, "VmHWM:");

  // Merge.
  ThreadStats all;
  for (auto& t : st) {
    for (int o = 0; o < kNumOps; ++o) {
      all.ops[o] += t.ops[o];
      all.lat_us[o].insert(all.lat_us[o].end(), t.lat_us[o].begin(), t.lat_us[o].end());
    }
    for (auto& [c, n] : t.expected) all.expected[c] += n;
    for (auto& [c, n] : t.unexpected) all.unexpected[c] += n;
    for (auto& m : t.unexpected_samples)
      if (all.unexpected_samples.size() < 10) all.unexpected_samples.push_back(m);
    all.disconnects += t.disconnects;
    all.reconnects += t.reconnects;
    all.connect_failures += t.connect_failures;
    all.acked_tokens += t.acked_tokens;
    all.reference_checks += t.reference_checks;
    all.reference_failures += t.reference_failures;
    all.lost_tokens += t.lost_tokens;
    all.count_anomalies += t.count_anomalies;
    all.sessions_created += t.sessions_created;
    all.index_sessions_created += t.index_sessions_created;
  }
  nlohmann::json j;
  uint64_t ops = 0;
  nlohmann::json counts, p50, p99, p999;
  for (int o = 0; o < kNumOps; ++o) {
    ops += all.ops[o];
    counts[kOpNames[o]] = all.ops[o];
    auto& v = all.lat_us[o];
    if (v.empty()) continue;
    std::sort(v.begin(), v.end());
    auto pct = [&](double p) { return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))]; };
    p50[kOpNames[o]] = pct(0.50);
    p99[kOpNames[o]] = pct(0.99);
    p999[kOpNames[o]] = pct(0.999);
  }
  nlohmann::json errors = nlohmann::json::object(), expected = nlohmann::json::object(),
                 unexpected = nlohmann::json::object();
  for (auto& [c, n] : all.expected) {
    expected[c] = n;
    errors[c] = errors.value(c, 0) + n;
  }
  uint64_t unexpected_total = 0;
  for (auto& [c, n] : all.unexpected) {
    unexpected[c] = n;
    errors[c] = errors.value(c, 0) + n;
    unexpected_total += n;
  }
  std::string endpoints_note;
  int64_t endpoints_open = -1;
  nlohmann::json device_submits = nlohmann::json::object();
  int64_t executor_stalls = -1, device_failures = -1;
  if (a.admin_port != 0) {
    auto m = testing::HttpGet(a.admin_port, "/metrics");
    if (m.status == 200) {
      endpoints_open = static_cast<int64_t>(MetricValue(m.body, "kvmem_ucx_endpoints_open"));
      executor_stalls = static_cast<int64_t>(MetricValue(m.body, "kvmem_executor_stalls_total"));
      device_failures = static_cast<int64_t>(MetricValue(m.body, "kvmem_device_failures_total"));
      for (const char* how : {"replayed", "captured", "direct"}) {
        device_submits[how] =
            MetricValue(m.body, std::string("kvmem_device_submits_total{how=\"") + how + "\"}");
      }
    }
  }
  int daemon_exit = -2;
  if (daemon) daemon_exit = daemon->Stop(std::chrono::milliseconds(10000));
  const bool verify_ok = all.lost_tokens == 0 && all.reference_failures == 0 && unexpected_total == 0;
  const int64_t growth = static_cast<int64_t>(rss_end) - static_cast<int64_t>(rss_base);
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  j["ops"] = ops;
  j["errors"] = errors;
  j["p50_us"] = p50;
  j["p99_us"] = p99;
  j["p999_us"] = p999;
  j["verify_ok"] = verify_ok;
  j["rss_growth_bytes"] = growth;
  j["rss_baseline_bytes"] = rss_base;
  j["rss_start_bytes"] = rss_start;
  j["rss_growth_from_start_bytes"] = static_cast<int64_t>(rss_end) - static_cast<int64_t>(rss_start);
  j["rss_end_bytes"] = rss_end;
  j["rss_peak_bytes"] = rss_peak;
  j["rss_samples"] = rss_samples;
  j["rss_growth_pct"] = rss_base ? 100.0 * static_cast<double>(growth) / static_cast<double>(rss_base) : 0.0;
  j["ops_per_op"] = counts;
  j["ops_per_s"] = ops / elapsed;
  j["duration_s"] = elapsed;
  j["warmup_s"] = a.warmup_s;
  j["settle_s"] = a.settle_s;
  j["rss_readings_after_idle_trim"] = base_trimmed && end_trimmed;
  j["rss_definition"] =
      "VmRSS of kvmemd, idle, every session dropped: baseline after a warm-up phase at the same "
      "load, end after the run; each read 1 s after the daemon's first idle trim following the "
      "phase (kvmem_idle_trims_total) when rss_readings_after_idle_trim, else after settle_s";
  j["clients"] = a.clients;
  j["sessions"] = a.sessions;
  j["mix"] = nlohmann::json::object();
  for (int o = 0; o < kNumOps; ++o) j["mix"][kOpNames[o]] = a.weights[o];
  j["disconnect_rate"] = a.disconnect_rate;
  j["durable_fraction"] = a.durable_fraction;
  j["index_fraction"] = a.index_fraction;
  j["max_session_tokens"] = a.max_session_tokens;
  j["profile"] = {{"layers", kLayers}, {"q_heads", kQHeads}, {"kv_heads", kKvHeads},
                  {"head_dim", kHeadDim}, {"dtype", "bf16"}, {"append_tokens", "1..64"}};
  j["expected_errors"] = expected;
  j["unexpected_errors"] = unexpected;
  j["unexpected_error_samples"] = all.unexpected_samples;
  j["expected_error_policy"] =
      "NOT_FOUND from attend/retrieve/info on a session owned by another client thread (its "
      "owner may have dropped it meanwhile). Everything else is unexpected, including any error "
      "on a client's own sessions.";
  j["disconnects"] = all.disconnects;
  j["connects"] = all.reconnects;
  j["acknowledged_tokens"] = all.acked_tokens;
  j["lost_acknowledged_tokens"] = all.lost_tokens;
  j["count_anomalies"] = all.count_anomalies;
  j["reference_checks"] = all.reference_checks;
  j["reference_failures"] = all.reference_failures;
  j["sessions_created"] = all.sessions_created;
  j["index_sessions_created"] = all.index_sessions_created;
  j["daemon_device_submits"] = device_submits;  // device searches by submission (CUDA backend)
  // Operations that held an executor past executor_stall_seconds, and CUDA errors that left
  // the GPU context unusable (-1: no admin endpoint to ask).
  j["daemon_executor_stalls"] = executor_stalls;
  j["daemon_device_failures"] = device_failures;
  j["daemon_endpoints_open_at_end"] = endpoints_open;
  j["daemon_pid"] = a.pid;
  if (daemon) j["daemon_exit_status"] = daemon_exit;
  j["machine"] = {{"host", host}, {"cores", std::thread::hardware_concurrency()}};
  std::ofstream(a.json) << j.dump(2) << "\n";
  std::printf("%s\n", j.dump().c_str());
  const bool ok = verify_ok && (daemon == nullptr || daemon_exit == 0);
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace kvmem

int main(int argc, char** argv) { return kvmem::Main(argc, argv); }
