// libFuzzer target: the daemon's verify-and-dispatch path. Input = [u32 header length][header
// bytes][data bytes], exactly what a UCX active message delivers. Every input goes through
// wire::ParseMessage and, when it verifies, Service::Handle + AfterReply against a service that
// holds one session (id 1: 2 layers, 4 q heads, 2 KV heads, head_dim 16, bf16), one with memory
// blocks (id 3: gate keys [8], payloads [2 x 4] f32) plus whatever earlier inputs created. Limits are small so RESOURCE_EXHAUSTED paths are reachable.
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "daemon/kv_pool.h"
#include "daemon/service.h"
#include "wire/framing.h"

namespace {

struct Harness {
  std::unique_ptr<kvmem::KVPool> pool;
  std::unique_ptr<kvmem::Service> service;

  Harness() {
    pool = std::move(*kvmem::CreateHostPool({64ull << 20, 1ull << 20}));
    kvmem::DaemonConfig config;
    config.max_sessions_per_tenant = 8;
    config.max_tokens_per_session = 4096;
    service = std::make_unique<kvmem::Service>(config, pool.get(), "cpu");
    flatbuffers::FlatBufferBuilder fbb;
    auto prof = kvmem::wire::CreateModelProfile(fbb, 2, 4, 2, 16, kvmem::wire::DType::BF16);
    auto body = kvmem::wire::CreateCreateSession(fbb, 1, prof, 0);
    fbb.Finish(kvmem::wire::MakeEnvelope(fbb, 1, body, 0));
    auto parsed = kvmem::wire::ParseMessage({fbb.GetBufferPointer(), fbb.GetSize()}, nullptr, 0);
    kvmem::Reply reply;
    service->Handle({1, "default"}, *parsed, &reply);
    // Session 3 keeps memory blocks: gate keys [8], payloads [2 x 4] f32.
    flatbuffers::FlatBufferBuilder mem;
    auto mprof = kvmem::wire::CreateModelProfile(mem, 1, 2, 1, 16, kvmem::wire::DType::BF16);
    auto mopts = kvmem::wire::CreateMemoryOptions(mem, 8, 2, 4, kvmem::wire::DType::F32);
    kvmem::wire::SessionOptionsBuilder ob(mem);
    ob.add_memory(mopts);
    auto sopts = ob.Finish();
    auto mbody = kvmem::wire::CreateCreateSession(mem, 3, mprof, sopts);
    mem.Finish(kvmem::wire::MakeEnvelope(mem, 2, mbody, 0));
    auto mparsed = kvmem::wire::ParseMessage({mem.GetBufferPointer(), mem.GetSize()}, nullptr, 0);
    kvmem::Reply mreply;
    service->Handle({1, "default"}, *mparsed, &mreply);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Harness* h = new Harness();
  if (size < 4) return 0;
  uint32_t header_len;
  std::memcpy(&header_len, data, 4);
  data += 4;
  size -= 4;
  if (header_len > size) header_len = static_cast<uint32_t>(size);
  // Copies, as the transport makes them: aligned, owned.
  std::vector<uint8_t> header(data, data + header_len);
  std::vector<uint8_t> payload(data + header_len, data + size);
  auto parsed = kvmem::wire::ParseMessage(header, payload.empty() ? nullptr : payload.data(), payload.size());
  if (!parsed.ok()) return 0;
  kvmem::Reply reply;
  const kvmem::RequestContext ctx{1, "default"};
  h->service->Handle(ctx, *parsed, &reply);
  h->service->AfterReply(ctx, kvmem::Service::ShardKey(parsed->envelope));
  // The reply must itself frame and verify.
  auto frame = kvmem::wire::MakeFrame(reply.fbb, reply.packer, 8100);
  std::vector<uint8_t> out;
  for (const auto& s : frame.data) out.insert(out.end(), static_cast<const uint8_t*>(s.ptr), static_cast<const uint8_t*>(s.ptr) + s.bytes);
  if (!kvmem::wire::ParseMessage(frame.header, out.data(), out.size()).ok()) __builtin_trap();
  return 0;
}
