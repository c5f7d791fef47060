// Writes the seed corpus for fuzz_dispatch: one well-formed message per op, in the fuzzer's
// input format ([u32 header length][header][data]). Run: make_corpus DIR [REGRESSIONS_DIR]
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "wire/framing.h"

namespace w = kvmem::wire;

static void Write(const std::string& dir, const std::string& name, const flatbuffers::FlatBufferBuilder& fbb,
                  const w::TensorPacker& packer) {
  std::vector<uint8_t> out(4);
  const uint32_t n = fbb.GetSize();
  std::memcpy(out.data(), &n, 4);
  out.insert(out.end(), fbb.GetBufferPointer(), fbb.GetBufferPointer() + n);
  for (const auto& s : packer.segments())
    out.insert(out.end(), static_cast<const uint8_t*>(s.ptr), static_cast<const uint8_t*>(s.ptr) + s.bytes);
  std::ofstream(dir + "/" + name, std::ios::binary).write(reinterpret_cast<const char*>(out.data()), out.size());
}

// Regression inputs for crashes the fuzzer found, rebuilt here so they stay readable; written
// to tests/fuzz/regressions/dispatch by `make_corpus CORPUS_DIR REGRESSIONS_DIR`.
static void WriteRegressions(const std::string& dir) {
  // AppendKV to session 1 whose K and V tensors start at an odd offset of the tensor region:
  // the NaN/Inf check loaded bf16 elements misaligned (UBSan, fuzz_dispatch). Now refused with
  // INVALID_ARGUMENT by wire::ResolveTensor.
  const uint32_t L = 2, HKV = 2, D = 16, T = 4;
  const uint64_t bytes = uint64_t{L} * HKV * T * D * 2;
  flatbuffers::FlatBufferBuilder fbb;
  const std::vector<uint64_t> shape = {L, HKV, T, D}, bshape = {T};
  auto k = w::CreateTensorDirect(fbb, w::DType::BF16, &shape, 1, bytes);
  auto v = w::CreateTensorDirect(fbb, w::DType::BF16, &shape, 1, bytes);
  auto b = w::CreateTensorDirect(fbb, w::DType::U8, &bshape, 0, T);
  std::vector<uint8_t> region(1 + bytes, 0x3e);
  for (uint32_t t = 0; t < T; ++t) region[t] = 1;
  auto body = w::CreateAppendKV(fbb, 1, T, k, v, b);
  fbb.Finish(w::MakeEnvelope(fbb, 9, body, region.size()));
  std::vector<uint8_t> out(4);
  const uint32_t n = fbb.GetSize();
  std::memcpy(out.data(), &n, 4);
  out.insert(out.end(), fbb.GetBufferPointer(), fbb.GetBufferPointer() + n);
  out.insert(out.end(), region.begin(), region.end());
  std::ofstream(dir + "/append-tensor-at-odd-offset-misaligned-bf16-load", std::ios::binary)
      .write(reinterpret_cast<const char*>(out.data()), out.size());
}

int main(int argc, char** argv) {
  if (argc != 2 && argc != 3) return 2;
  const std::string dir = argv[1];
  const uint32_t L = 2, HQ = 4, HKV = 2, D = 16, T = 40;
  std::vector<uint16_t> kv(L * HKV * T * D), q(HQ * D), nk(HKV * D);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = kvmem::FloatToBF16(static_cast<float>(i % 17) * 0.1f - 0.8f);
  for (size_t i = 0; i < q.size(); ++i) q[i] = kvmem::FloatToBF16(static_cast<float>(i % 5) * 0.2f);
  for (size_t i = 0; i < nk.size(); ++i) nk[i] = kvmem::FloatToBF16(0.3f);
  std::vector<uint8_t> bounds(T);
  for (uint32_t t = 0; t < T; ++t) bounds[t] = t % 7 == 6 ? 3 : 1;
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    auto body = w::CreatePing(fbb, 7);
    fbb.Finish(w::MakeEnvelope(fbb, 1, body, 0));
    Write(dir, "ping", fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    auto body = w::CreateHelloDirect(fbb, w::kProtocolVersion, "seed", "");
    fbb.Finish(w::MakeEnvelope(fbb, 2, body, 0));
    Write(dir, "hello", fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    auto prof = w::CreateModelProfile(fbb, L, HQ, HKV, D, w::DType::BF16);
    auto opts = w::CreateSessionOptions(fbb, 4, 8, 4, 0, 16, w::SelectionMode::INDEX);
    auto body = w::CreateCreateSession(fbb, 2, prof, opts);
    fbb.Finish(w::MakeEnvelope(fbb, 3, body, 0));
    Write(dir, "create_index", fbb, p);
  }
  for (uint64_t sid : {1, 2}) {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    const uint64_t shape[4] = {L, HKV, T, D};
    auto k = p.Add(fbb, w::DType::BF16, shape, kv.data());
    auto v = p.Add(fbb, w::DType::BF16, shape, kv.data());
    const uint64_t bs[1] = {T};
    auto b = p.Add(fbb, w::DType::U8, bs, bounds.data());
    auto body = w::CreateAppendKV(fbb, sid, T, k, v, b);
    fbb.Finish(w::MakeEnvelope(fbb, 4, body, p.bytes()));
    Write(dir, "append_" + std::to_string(sid), fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    const uint64_t shape[5] = {2, L, HKV, T, D};
    std::vector<uint16_t> packed(kv);
    packed.insert(packed.end(), kv.begin(), kv.end());
    auto t = p.Add(fbb, w::DType::BF16, shape, packed.data());
    auto bc = fbb.CreateVector(bounds);
    w::AppendKVBuilder b(fbb);
    b.add_session_id(2);
    b.add_tokens(T);
    b.add_kv(t);
    b.add_boundary_classes(bc);
    auto body = b.Finish();
    fbb.Finish(w::MakeEnvelope(fbb, 5, body, p.bytes()));
    Write(dir, "append_packed", fbb, p);
  }
  for (uint64_t sid : {1, 2}) {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    const uint64_t qs[2] = {HQ, D}, ks[2] = {HKV, D};
    auto qt = p.Add(fbb, w::DType::BF16, qs, q.data());
    auto kt = p.Add(fbb, w::DType::BF16, ks, nk.data());
    auto vt = p.Add(fbb, w::DType::BF16, ks, nk.data());
    w::AttendBuilder b(fbb);
    b.add_session_id(sid);
    b.add_layer(1);
    b.add_q(qt);
    b.add_new_k(kt);
    b.add_new_v(vt);
    b.add_boundary(3);
    b.add_budget_tokens(16);
    b.add_return_lse(true);
    b.add_return_selection(true);
    auto body = b.Finish();
    fbb.Finish(w::MakeEnvelope(fbb, 6, body, p.bytes()));
    Write(dir, "attend_" + std::to_string(sid), fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    const uint64_t qs[2] = {HQ, D};
    auto qt = p.Add(fbb, w::DType::BF16, qs, q.data());
    auto body = w::CreateRetrieve(fbb, 2, 0, qt, 16, 3);
    fbb.Finish(w::MakeEnvelope(fbb, 7, body, p.bytes()));
    Write(dir, "retrieve", fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    auto body = w::CreateListSessions(fbb);
    fbb.Finish(w::MakeEnvelope(fbb, 8, body, 0));
    Write(dir, "list", fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    auto body = w::CreateSessionInfo(fbb, 2);
    fbb.Finish(w::MakeEnvelope(fbb, 9, body, 0));
    Write(dir, "info", fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    auto body = w::CreateDropSession(fbb, 2);
    fbb.Finish(w::MakeEnvelope(fbb, 10, body, 0));
    Write(dir, "drop", fbb, p);
  }
  // Memory blocks against session 3 (the harness creates it: gate keys [8], payloads [2 x 4] f32).
  {
    constexpr uint32_t N = 6, DG = 8;
    std::vector<float> keys(N * DG), pay(N * 2 * 4);
    for (size_t i = 0; i < keys.size(); ++i) keys[i] = static_cast<float>(i % 7) * 0.25f - 0.5f;
    for (size_t i = 0; i < pay.size(); ++i) pay[i] = static_cast<float>(i);
    std::vector<uint64_t> starts = {0, 10, 20, 30, 40, 50}, ends = {10, 20, 30, 40, 50, 60};
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    const uint64_t ks[2] = {N, DG}, ps[3] = {N, 2, 4};
    auto kt = p.Add(fbb, w::DType::F32, ks, keys.data());
    auto pt = p.Add(fbb, w::DType::F32, ps, pay.data());
    std::vector<flatbuffers::Offset<flatbuffers::String>> labels;
    for (uint32_t i = 0; i < N; ++i) labels.push_back(fbb.CreateString("b" + std::to_string(i)));
    auto body = w::CreatePutMemoryBlocks(fbb, 3, kt, pt, fbb.CreateVector(starts), fbb.CreateVector(ends),
                                         fbb.CreateVector(labels));
    fbb.Finish(w::MakeEnvelope(fbb, 11, body, p.bytes()));
    Write(dir, "memory_put", fbb, p);
  }
  for (auto gate : {w::MemoryGate::TREE_EXACT, w::MemoryGate::TREE_BUDGET, w::MemoryGate::LINEAR_SCAN,
                    w::MemoryGate::SCORER}) {
    std::vector<float> qv(8, 0.5f);
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    const uint64_t qs[1] = {8};
    auto qt = p.Add(fbb, w::DType::F32, qs, qv.data());
    auto body = w::CreateSelectMemory(fbb, 3, qt, 3, gate, 1, true);
    fbb.Finish(w::MakeEnvelope(fbb, 12, body, p.bytes()));
    Write(dir, std::string("memory_select_") + w::EnumNameMemoryGate(gate), fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    std::vector<uint64_t> ids = {1, 2};
    auto body = w::CreateGetMemoryBlocks(fbb, 3, fbb.CreateVector(ids), true);
    fbb.Finish(w::MakeEnvelope(fbb, 13, body, 0));
    Write(dir, "memory_get", fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    auto body = w::CreateListMemoryBlocks(fbb, 3, 0, 10);
    fbb.Finish(w::MakeEnvelope(fbb, 14, body, 0));
    Write(dir, "memory_list", fbb, p);
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    w::TensorPacker p;
    std::vector<uint64_t> ids = {2};
    auto body = w::CreateDropMemoryBlocks(fbb, 3, fbb.CreateVector(ids));
    fbb.Finish(w::MakeEnvelope(fbb, 15, body, 0));
    Write(dir, "memory_drop", fbb, p);
  }
  if (argc == 3) WriteRegressions(argv[2]);
  return 0;
}
