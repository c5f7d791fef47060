// A small, defensive safetensors reader (https://github.com/huggingface/safetensors format):
//   u64 little-endian header length N | N bytes of JSON header | data
// header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//          "__metadata__": {...}} with offsets relative to the data section.
// Every length, offset, shape product and dtype is checked before use; malformed input gets
// InvalidArgument / DataLoss, never a crash (a fuzz target will drive Parse()).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kvmem::bench {

enum class TensorDType : uint8_t { kF32, kF16, kBF16, kU8 };

struct TensorView {
  std::string name;
  TensorDType dtype = TensorDType::kF32;
  std::vector<uint64_t> shape;
  std::span<const uint8_t> bytes;  // into the owning SafetensorsFile
  uint64_t elements() const;
};

class SafetensorsFile {
 public:
  // Reads and parses a file. NotFound / Unavailable when it cannot be read.
  static Result<SafetensorsFile> Open(const std::string& path);
  // Parses an in-memory image (takes ownership).
  static Result<SafetensorsFile> Parse(std::vector<uint8_t> image);

  const std::vector<TensorView>& tensors() const { return tensors_; }
  // nullptr when absent.
  const TensorView* Find(std::string_view name) const;

  // The tensor converted to float (U8 values as 0..255). NotFound when absent;
  // InvalidArgument when its rank differs from `rank` (0: any).
  Result<std::vector<float>> ReadFloat(std::string_view name, uint32_t rank,
                                       std::vector<uint64_t>* shape) const;

  SafetensorsFile(SafetensorsFile&&) = default;
  SafetensorsFile& operator=(SafetensorsFile&&) = default;

 private:
  SafetensorsFile() = default;
  std::vector<uint8_t> image_;
  std::vector<TensorView> tensors_;
};

// One tensor to write: float data stored as `dtype` (values rounded to nearest even).
struct TensorToWrite {
  std::string name;
  TensorDType dtype = TensorDType::kF32;
  std::vector<uint64_t> shape;
  const float* data = nullptr;  // shape product elements
};

// Writes a safetensors file (used to export synthetic data for other benchmarks and as fuzz
// seeds). Unavailable when the file cannot be written.
Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

}  // namespace kvmem::bench
