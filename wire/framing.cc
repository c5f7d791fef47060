#include "wire/framing.h"

#include <cstring>
#include <limits>

namespace kvmem::wire {

static_assert(static_cast<int>(Code::IN_PROGRESS) == static_cast<int>(StatusCode::kInProgress));
static_assert(static_cast<int>(wire::DType::BF16) == static_cast<int>(kvmem::DType::kBF16));

StatusCode FromWire(Code code) {
  const auto v = static_cast<uint16_t>(code);
  if (v > static_cast<uint16_t>(Code::IN_PROGRESS)) return StatusCode::kUnknown;
  return static_cast<StatusCode>(v);
}

Code ToWire(StatusCode code) { return static_cast<Code>(static_cast<uint16_t>(code)); }

Result<kvmem::DType> FloatDTypeFromWire(wire::DType t) {
  switch (t) {
    case wire::DType::F32: return kvmem::DType::kF32;
    case wire::DType::F16: return kvmem::DType::kF16;
    case wire::DType::BF16: return kvmem::DType::kBF16;
    default: break;
  }
  return InvalidArgument(std::string("dtype ") + EnumNameDType(t) + " is not a float type");
}

wire::DType ToWire(kvmem::DType t) { return static_cast<wire::DType>(static_cast<uint8_t>(t)); }

size_t WireDTypeSize(wire::DType t) {
  switch (t) {
    case wire::DType::F32: return 4;
    case wire::DType::F16: return 2;
    case wire::DType::BF16: return 2;
    case wire::DType::U8: return 1;
    case wire::DType::I32: return 4;
    case wire::DType::U32: return 4;
    case wire::DType::I64: return 8;
  }
  return 0;
}

namespace {
const uint8_t kZeros[kTensorAlign] = {};
}

flatbuffers::Offset<Tensor> TensorPacker::Add(flatbuffers::FlatBufferBuilder& fbb,
                                              wire::DType dtype, std::span<const uint64_t> shape,
                                              const void* data) {
  uint64_t bytes = WireDTypeSize(dtype);
  for (uint64_t d : shape) bytes *= d;
  const size_t pad = AlignUp(size_, kTensorAlign) - size_;
  if (pad) {
    segments_.push_back({kZeros, pad});
    size_ += pad;
  }
  const uint64_t offset = size_;
  if (bytes) {
    segments_.push_back({data, bytes});
    size_ += bytes;
  }
  auto shape_vec = fbb.CreateVector(shape.data(), shape.size());
  return CreateTensor(fbb, dtype, shape_vec, offset, bytes);
}

Frame MakeFrame(const flatbuffers::FlatBufferBuilder& fbb, const TensorPacker& packer,
                size_t max_header) {
  Frame f;
  const uint8_t* buf = fbb.GetBufferPointer();
  const size_t size = fbb.GetSize();
  if (size <= max_header) {
    f.header.assign(buf, buf + size);
    f.data = packer.segments();
    f.data_bytes = packer.bytes();
    return f;
  }
  // Spill: the real envelope leads the data part; a stub goes in the header.
  const Envelope* env = GetEnvelope(buf);
  flatbuffers::FlatBufferBuilder stub(64);
  EnvelopeBuilder b(stub);
  b.add_request_id(env->request_id());
  b.add_spilled_bytes(static_cast<uint32_t>(size));
  b.add_data_bytes(packer.bytes());
  stub.Finish(b.Finish());
  f.header.assign(stub.GetBufferPointer(), stub.GetBufferPointer() + stub.GetSize());
  const size_t padded = AlignUp(size, kTensorAlign);
  f.spill.reset(new uint8_t[padded]);
  std::memcpy(f.spill.get(), buf, size);
  std::memset(f.spill.get() + size, 0, padded - size);
  f.data.push_back({f.spill.get(), padded});
  for (const Segment& s : packer.segments()) f.data.push_back(s);
  f.data_bytes = padded + packer.bytes();
  return f;
}

namespace {

Result<const Envelope*> VerifyEnvelope(const uint8_t* buf, size_t size) {
  if (size < 8) return InvalidArgument("envelope truncated: " + std::to_string(size) + " bytes");
  flatbuffers::Verifier v(buf, size, kMaxVerifierDepth, kMaxVerifierTables);
  if (!VerifyEnvelopeBuffer(v)) return InvalidArgument("envelope failed FlatBuffers verification");
  return GetEnvelope(buf);
}

}  // namespace

Result<Parsed> ParseMessage(std::span<const uint8_t> header, const uint8_t* data,
                            size_t data_bytes) {
  KVMEM_ASSIGN_OR_RETURN(const Envelope* env, VerifyEnvelope(header.data(), header.size()));
  Parsed p;
  size_t region_start = 0;
  if (env->spilled_bytes() > 0) {
    const size_t spilled = env->spilled_bytes();
    if (spilled > data_bytes) {
      return InvalidArgument("spilled envelope of " + std::to_string(spilled) +
                             " bytes but only " + std::to_string(data_bytes) + " data bytes");
    }
    KVMEM_ASSIGN_OR_RETURN(env, VerifyEnvelope(data, spilled));
    if (env->spilled_bytes() != 0) return InvalidArgument("nested spilled envelope");
    region_start = AlignUp(spilled, kTensorAlign);
    if (region_start > data_bytes) region_start = data_bytes;
  }
  // The verifier accepts a union whose value is absent; a typed body without a table would be
  // read as a null table by every handler (found by fuzz_dispatch).
  if (env->body_type() != Body::NONE && env->body() == nullptr) {
    return InvalidArgument(std::string("envelope declares a ") + EnumNameBody(env->body_type()) +
                           " body but carries none");
  }
  const size_t region = data_bytes - region_start;
  if (env->data_bytes() != region) {
    return InvalidArgument("declared " + std::to_string(env->data_bytes()) +
                           " tensor bytes but received " + std::to_string(region));
  }
  p.envelope = env;
  p.tensors = data ? data + region_start : nullptr;
  p.tensor_bytes = region;
  return p;
}

Result<const uint8_t*> ResolveTensor(const Parsed& msg, const Tensor* t, std::string_view name,
                                     std::span<const uint64_t> shape,
                                     std::span<const wire::DType> dtypes) {
  const std::string n(name);
  if (t == nullptr) return InvalidArgument("missing tensor '" + n + "'");
  bool dtype_ok = false;
  for (auto d : dtypes) dtype_ok |= (d == t->dtype());
  if (!dtype_ok) {
    return InvalidArgument("tensor '" + n + "' has dtype " + EnumNameDType(t->dtype()) +
                           ", expected " + EnumNameDType(dtypes.empty() ? wire::DType::F32
                                                                        : dtypes[0]));
  }
  const auto* s = t->shape();
  // The verifier checks a vector's length field (4-byte aligned), not its 8-byte elements; a
  // crafted buffer can place the shape at an address that is not 8-byte aligned, and reading it
  // is then a misaligned load (found by fuzz_dispatch in CI, UBSan). Builders align it.
  if (s != nullptr && reinterpret_cast<uintptr_t>(s->data()) % alignof(uint64_t) != 0) {
    return InvalidArgument("tensor '" + n + "' has a misaligned shape vector");
  }
  const size_t rank = s ? s->size() : 0;
  auto shape_str = [&](auto get, size_t r) {
    std::string out = "[";
    for (size_t i = 0; i < r; ++i) out += (i ? ", " : "") + std::to_string(get(i));
    return out + "]";
  };
  bool shape_ok = rank == shape.size();
  for (size_t i = 0; shape_ok && i < rank; ++i) shape_ok = s->Get(static_cast<uint32_t>(i)) == shape[i];
  if (!shape_ok) {
    return InvalidArgument(
        "tensor '" + n + "' has shape " +
        shape_str([&](size_t i) { return s->Get(static_cast<uint32_t>(i)); }, rank) +
        ", expected " + shape_str([&](size_t i) { return shape[i]; }, shape.size()));
  }
  // bytes = prod(shape) * size, computed with overflow checks.
  uint64_t expect = WireDTypeSize(t->dtype());
  for (uint64_t d : shape) {
    if (d != 0 && expect > std::numeric_limits<uint64_t>::max() / d) {
      return InvalidArgument("tensor '" + n + "' size overflows");
    }
    expect *= d;
  }
  if (t->bytes() != expect) {
    return InvalidArgument("tensor '" + n + "' declares " + std::to_string(t->bytes()) +
                           " bytes, shape needs " + std::to_string(expect));
  }
  if (t->offset() > msg.tensor_bytes || t->bytes() > msg.tensor_bytes - t->offset()) {
    return InvalidArgument("tensor '" + n + "' at offset " + std::to_string(t->offset()) + " + " +
                           std::to_string(t->bytes()) + " bytes exceeds the " +
                           std::to_string(msg.tensor_bytes) + " data bytes received");
  }
  // The tensor region starts 64-byte aligned and every reader loads whole elements (found by
  // fuzz_dispatch: a bf16 tensor at an odd offset made the non-finite check load misaligned).
  if (t->offset() % WireDTypeSize(t->dtype()) != 0) {
    return InvalidArgument("tensor '" + n + "' at offset " + std::to_string(t->offset()) +
                           " is not aligned to its " + std::to_string(WireDTypeSize(t->dtype())) +
                           "-byte elements");
  }
  if (expect == 0) return static_cast<const uint8_t*>(nullptr);
  return msg.tensors + t->offset();
}

void BuildErrorEnvelope(flatbuffers::FlatBufferBuilder& fbb, uint64_t request_id,
                        const kvmem::Status& status) {
  auto msg = fbb.CreateString(status.message());
  auto st = CreateStatus(fbb, ToWire(status.code()), msg);
  EnvelopeBuilder b(fbb);
  b.add_request_id(request_id);
  b.add_status(st);
  fbb.Finish(b.Finish());
}

kvmem::Status EnvelopeStatus(const Envelope* env) {
  const wire::Status* s = env->status();
  if (s == nullptr || s->code() == Code::OK) return kvmem::Status::OK();
  return kvmem::Status(FromWire(s->code()), s->message() ? s->message()->str() : "");
}

}  // namespace kvmem::wire
