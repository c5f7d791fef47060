// Framing of kvmem messages over UCX active messages (docs/wire-format.md).
//
// Outbound: a finished FlatBuffers Envelope plus tensors gathered as an iovec list; if the
// Envelope exceeds the transport's maximum AM header, it moves to the front of the data part
// and a stub Envelope (request_id, spilled_bytes) goes in the header.
// Inbound: verify the header Envelope (and the spilled one), locate the tensor region, and
// resolve Tensor descriptors against it with full bounds and shape checks.
#pragma once

#include <flatbuffers/flatbuffers.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "schemas/kvmem_generated.h"

namespace kvmem::wire {

inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr unsigned kRequestAmId = 11;  // client -> daemon
inline constexpr unsigned kReplyAmId = 12;    // daemon -> client
inline constexpr size_t kTensorAlign = 64;
// Envelopes deeper or wider than this are rejected by the verifier.
inline constexpr uint32_t kMaxVerifierDepth = 16;
inline constexpr uint32_t kMaxVerifierTables = 1u << 20;

inline size_t AlignUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Wire <-> in-memory conversions, one place each.
StatusCode FromWire(Code code);
Code ToWire(StatusCode code);
Result<kvmem::DType> FloatDTypeFromWire(wire::DType t);  // F32/F16/BF16 only
wire::DType ToWire(kvmem::DType t);
size_t WireDTypeSize(wire::DType t);

// One contiguous piece of the data part. Not owned.
struct Segment {
  const void* ptr;
  size_t bytes;
};

// Collects tensors for the data part, 64-byte aligned; hands out Tensor descriptors.
class TensorPacker {
 public:
  // Adds a tensor and returns its descriptor (built into fbb). `data` must stay valid until the
  // message is sent.
  flatbuffers::Offset<Tensor> Add(flatbuffers::FlatBufferBuilder& fbb, wire::DType dtype,
                                  std::span<const uint64_t> shape, const void* data);
  size_t bytes() const { return size_; }
  const std::vector<Segment>& segments() const { return segments_; }

 private:
  std::vector<Segment> segments_;
  size_t size_ = 0;
};

// A message ready for ucp_am_send_nbx: header bytes and the data part as an iovec list.
struct Frame {
  std::vector<uint8_t> header;       // the Envelope or the stub
  std::vector<Segment> data;         // spilled Envelope (if any), padding, tensors
  size_t data_bytes = 0;
  std::unique_ptr<uint8_t[]> spill;  // owns the spilled Envelope copy
};

// Builds a Frame from a finished builder whose root is an Envelope with data_bytes set to
// packer.bytes(). `max_header` is the transport's max AM header size.
Frame MakeFrame(const flatbuffers::FlatBufferBuilder& fbb, const TensorPacker& packer,
                size_t max_header);

// An inbound message after verification. Envelope points into `header_copy` or `data`.
struct Parsed {
  const Envelope* envelope = nullptr;
  const uint8_t* tensors = nullptr;  // start of the tensor region
  size_t tensor_bytes = 0;
};

// Verifies header (and spilled envelope) and the declared data size against what arrived.
// `header` must stay alive while the result is used (it is where the Envelope lives unless
// spilled).
Result<Parsed> ParseMessage(std::span<const uint8_t> header, const uint8_t* data,
                            size_t data_bytes);

// Expected shape of a tensor: dims, and which dtypes are acceptable.
// Returns a pointer into the tensor region after checking dtype, shape, size and bounds.
Result<const uint8_t*> ResolveTensor(const Parsed& msg, const Tensor* t, std::string_view name,
                                     std::span<const uint64_t> shape,
                                     std::span<const wire::DType> dtypes);

// Builds a reply/request Envelope around a body. status == nullptr means OK.
template <typename Body>
flatbuffers::Offset<Envelope> MakeEnvelope(flatbuffers::FlatBufferBuilder& fbb,
                                           uint64_t request_id, flatbuffers::Offset<Body> body,
                                           uint64_t data_bytes,
                                           flatbuffers::Offset<wire::Status> status = 0) {
  EnvelopeBuilder b(fbb);
  b.add_request_id(request_id);
  b.add_body_type(BodyTraits<Body>::enum_value);
  b.add_body(body.Union());
  b.add_data_bytes(data_bytes);
  if (!status.IsNull()) b.add_status(status);
  return b.Finish();
}

// An error reply with no body.
void BuildErrorEnvelope(flatbuffers::FlatBufferBuilder& fbb, uint64_t request_id,
                        const kvmem::Status& status);

// Status carried by an envelope (OK when absent).
kvmem::Status EnvelopeStatus(const Envelope* env);

}  // namespace kvmem::wire
