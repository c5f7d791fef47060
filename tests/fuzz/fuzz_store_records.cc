// libFuzzer target: what kvmemd decodes from its RocksDB store at restart and on VerifySession
// (daemon/chunk_store.*, daemon/tiers.*): record envelopes ([version][crc32c][payload]), session
// header FlatBuffers, chunk table entries, chunk blocks, tail segments and the keys they sit
// under. The input is a small program of records written beneath the record encoding (with a
// valid or a broken checksum, so the decoders behind the CRC are reached), then the store is
// restored and verified like kvmemd does at start. Whatever the bytes, restore must end in OK
// or a clear status, never a crash, and a restored session must be usable.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <unistd.h>

#include "daemon/chunk_store.h"
#include "daemon/crc32c.h"
#include "daemon/kv_pool.h"
#include "daemon/tiers.h"

namespace kvmem {
namespace {

struct Env {
  std::filesystem::path dir;
  std::unique_ptr<KVPool> pool;
  std::unique_ptr<ChunkStore> store;
};

Env& GetEnv() {
  static Env* env = [] {
    auto* e = new Env;
    const char* base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp";
    e->dir = std::filesystem::path(base) / ("kvmem-fuzz-store-" + std::to_string(::getpid()));
    std::filesystem::remove_all(e->dir);
    SlabAllocator::Options po;
    po.capacity_bytes = 64ull << 20;
    auto pool = CreateHostPool(po);
    if (!pool.ok()) std::abort();
    e->pool = std::move(*pool);
    StoreOptions so;
    so.path = (e->dir / "db").string();
    so.write_buffer_size = 4ull << 20;
    auto store = ChunkStore::Open(so);
    if (!store.ok()) std::abort();
    e->store = std::move(*store);
    std::atexit([] { std::filesystem::remove_all(GetEnv().dir); });
    return e;
  }();
  return *env;
}

class Input {
 public:
  Input(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  bool empty() const { return n_ == 0; }
  uint8_t U8() { return n_ ? (--n_, *p_++) : 0; }
  uint16_t U16() { return static_cast<uint16_t>(U8() | (U8() << 8)); }
  uint64_t U64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t{U8()} << (8 * i);
    return v;
  }
  std::string Bytes(size_t want) {
    const size_t k = std::min(want, n_);
    std::string s(reinterpret_cast<const char*>(p_), k);
    p_ += k;
    n_ -= k;
    return s;
  }

 private:
  const uint8_t* p_;
  size_t n_;
};

void PutBE(std::string* s, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

// The record encoding (docs/wire-format.md); `how` 0 is a valid record, others break it.
std::string Record(std::string_view key, std::string_view payload, uint8_t how) {
  uint32_t crc = Crc32c(payload.data(), payload.size(), Crc32c(key.data(), key.size()));
  std::string v(1, '\x01');
  if (how == 1) crc ^= 1;                 // checksum mismatch
  if (how == 2) v[0] = '\x02';            // unknown version
  for (int i = 0; i < 4; ++i) v.push_back(static_cast<char>((crc >> (8 * i)) & 0xFF));
  v.append(payload);
  if (how == 3) v.resize(v.size() % 5);   // truncated
  return v;
}

// K/V bytes of `n` elements that are finite in every dtype (restore refuses NaN / Inf).
std::string FiniteBytes(size_t bytes, uint8_t fill) {
  return std::string(bytes, static_cast<char>(fill & 0x3f));
}

constexpr char kTenant[] = "fuzz";

}  // namespace
}  // namespace kvmem

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvmem;
  Env& env = GetEnv();
  if (!env.store->ClearForTest().ok()) std::abort();
  Input in(data, size);

  // The profile the valid headers declare (small, so blocks stay small).
  ModelProfile profile;
  const uint8_t shape = in.U8();
  profile.layers = 1 + (shape & 1);
  profile.kv_heads = 1 + ((shape >> 1) & 1);
  profile.q_heads = profile.kv_heads * (1 + ((shape >> 2) & 1));
  profile.head_dim = (shape & 8) ? 8 : 4;
  profile.dtype = static_cast<DType>((shape >> 4) % 3);
  SessionOptions options;
  options.durability = Durability::kDurable;
  options.chunker.min_tokens = 2 + in.U8() % 4;
  options.chunker.max_tokens = options.chunker.min_tokens + in.U8() % 8;
  const uint64_t row = uint64_t{profile.head_dim} * DTypeSize(profile.dtype);
  const uint64_t block_row = 2 * uint64_t{profile.kv_heads} * row;           // chunk block, per token
  const uint64_t tail_row = profile.layers * uint64_t{profile.kv_heads} * row;  // tail K (or V), per token

  for (int records = 0; !in.empty() && records < 64; ++records) {
    const uint8_t op = in.U8();
    const uint64_t session = 1 + (op >> 7);  // two sessions
    const uint8_t how = (op >> 4) & 7;       // 0 valid; 1..3 broken; 4..7 valid
    const uint8_t broken = how < 4 ? how : 0;
    std::string key, payload;
    bool chunks_family = false;
    switch (op & 7) {
      case 0:  // a valid session header
        key = ChunkStore::HeaderKey(kTenant, session);
        payload = EncodeSessionHeader(session, profile, options);
        break;
      case 1:  // a header with arbitrary payload bytes
        key = ChunkStore::HeaderKey(kTenant, session);
        payload = in.Bytes(in.U8());
        break;
      case 2: {  // a chunk table entry: start, tokens, boundaries
        key = ChunkStore::ChunkEntryKey(kTenant, session, in.U8() % 8);
        const uint8_t tokens = in.U8();
        PutBE(&payload, in.U16() % 256, 8);
        PutBE(&payload, (tokens & 0x80) ? in.U64() : tokens % 40, 4);
        payload += in.Bytes((tokens & 0x40) ? in.U8() % 40 : tokens % 40);
        break;
      }
      case 3: {  // a chunk block of one layer
        const uint32_t layer = in.U8() % 3, chunk = in.U8() % 8;
        key = ChunkStore::ChunkKey({kTenant, session, layer, chunk});
        chunks_family = true;
        const uint8_t tokens = in.U8();
        payload = (tokens & 0x80) ? in.Bytes(in.U16() % 4096)
                                  : FiniteBytes(block_row * (tokens % 40), in.U8());
        break;
      }
      case 4: {  // a tail segment: [n u32 LE][boundaries][K][V]
        key = ChunkStore::TailKey(kTenant, session, in.U16() % 256);
        const uint8_t n = in.U8();
        if (n & 0x80) {
          payload = in.Bytes(in.U16() % 4096);
        } else {
          const uint32_t tokens = n % 48;
          for (int i = 0; i < 4; ++i) payload.push_back(static_cast<char>((tokens >> (8 * i)) & 0xFF));
          std::string bounds = in.Bytes(tokens);
          bounds.resize(tokens, '\x01');
          payload += bounds + FiniteBytes(2 * tail_row * tokens, in.U8());
        }
        break;
      }
      case 5: {  // an arbitrary key in the manifests family (malformed keys)
        key = in.Bytes(in.U8() % 48);
        payload = in.Bytes(in.U8());
        break;
      }
      case 6: {  // a chunk-family record under an arbitrary key
        key = in.Bytes(in.U8() % 48);
        chunks_family = true;
        payload = in.Bytes(in.U8());
        break;
      }
      default: {  // a header of another profile / options, from raw fields
        ModelProfile p = profile;
        SessionOptions o = options;
        p.layers = in.U8();
        p.kv_heads = in.U8() % 5;
        p.q_heads = in.U8() % 9;
        p.head_dim = in.U8();
        o.chunker.min_tokens = in.U16();
        o.chunker.max_tokens = in.U16();
        o.sink_tokens = in.U16();
        o.mode = static_cast<SelectionMode>(in.U8() % 6);
        key = ChunkStore::HeaderKey(kTenant, session);
        payload = EncodeSessionHeader(session, p, o);
        break;
      }
    }
    if (key.empty()) continue;
    if (!env.store->PutRawForTest(chunks_family, key, Record(key, payload, broken)).ok()) std::abort();
  }

  // FUZZ_DEBUG=1: print what the store holds before and after the restore.
  auto dump = [&](const char* when) {
    if (!std::getenv("FUZZ_DEBUG")) return;
    for (uint64_t id : {1, 2}) {
      auto t = env.store->ChunkTable(kTenant, id);
      auto g = env.store->TailSegments(kTenant, id);
      std::fprintf(stderr, "%s session %llu: table %s", when, (unsigned long long)id, t.ok() ? "" : t.status().ToString().c_str());
      if (t.ok()) for (auto& e : *t) std::fprintf(stderr, " [%u: %llu+%u]", e.chunk, (unsigned long long)e.start, e.tokens);
      std::fprintf(stderr, "; tails %s", g.ok() ? "" : g.status().ToString().c_str());
      if (g.ok()) for (auto& e : *g) std::fprintf(stderr, " [%llu: %zu bytes, n=%u]", (unsigned long long)e.start, e.payload.size(), e.payload.size() >= 4 ? (unsigned)(uint8_t)e.payload[0] : 0u);
      std::fprintf(stderr, "\n");
    }
  };
  dump("before");
  RestoreStats stats;
  auto restored = RestoreSessions(env.store.get(), env.pool.get(), SessionOptions{}, &stats);
  if (!restored.ok()) return 0;
  dump("after");
  for (RestoredSession& r : *restored) {
    if (!r.session) continue;
    // A restored session must be consistent with its store and usable.
    auto rep = VerifySession(*env.store, r.tenant, r.id, r.profile);
    if (std::getenv("FUZZ_DEBUG")) {
      std::fprintf(stderr, "restored %s %llu: %llu tokens, %u chunks; verify %s tokens %llu\n", r.tenant.c_str(),
                   (unsigned long long)r.id, (unsigned long long)r.session->tokens(), r.session->chunk_count(),
                   rep.ok() ? "ok" : rep.status().ToString().c_str(), rep.ok() ? (unsigned long long)rep->tokens : 0ull);
    }
    if (rep.ok() && rep->bad.empty() && rep->tokens != r.session->tokens()) std::abort();
    std::vector<float> q(size_t{r.profile.q_heads} * r.profile.head_dim, 0.5f);
    std::vector<float> out(q.size());
    AttendArgs a;
    a.layer = 0;
    a.q = reinterpret_cast<const uint8_t*>(q.data());
    a.q_dtype = DType::kF32;
    a.out = reinterpret_cast<uint8_t*>(out.data());
    a.out_dtype = DType::kF32;
    a.mode = SelectionMode::kDense;
    (void)r.session->Attend(a, nullptr);
    r.session.reset();
  }
  if (env.pool->allocator().allocated_bytes() != 0) std::abort();  // every block returned
  return 0;
}
