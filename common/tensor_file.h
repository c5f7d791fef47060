// Reads tensors from safetensors and NumPy .npy files: retrieval-head masks, gate weights,
// memory-block payloads handed to kvmemctl. Everything in the file is untrusted: header lengths,
// offsets, shapes and dtypes are checked against the bytes actually present before any tensor is
// exposed, and every error names the file (or "<memory>") and the tensor.
//
//   KVMEM_ASSIGN_OR_RETURN(TensorFile f, TensorFile::Open("mask.safetensors"));
//   KVMEM_ASSIGN_OR_RETURN(const FileTensor* t, f.Find("retrieval_heads"));
//   std::vector<float> mask = t->ToFloat();
//
// Formats:
//   safetensors  u64 little-endian header length N, N bytes of JSON
//                {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//                 "__metadata__": {"k": "v"}}, then the data region; offsets are relative to it.
//   .npy         "\x93NUMPY", version 1.x / 2.x / 3.x, a Python-literal dict header
//                {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }, then C-order data.
//                The tensor is named "" (a .npy holds one array).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kvmem {

enum class FileDType : uint8_t { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU64, kU32, kU16, kU8, kBool };

size_t FileDTypeSize(FileDType t);
std::string_view FileDTypeName(FileDType t);  // safetensors spelling: "F32", "BF16", "BOOL", ...

struct FileTensor {
  std::string name;
  FileDType dtype;
  std::vector<uint64_t> shape;
  std::span<const std::byte> data;  // little-endian, C order; points into the owning TensorFile

  uint64_t elements() const;
  // Every element converted to float (integers and bools exactly where representable).
  std::vector<float> ToFloat() const;
};

class TensorFile {
 public:
  enum class Format : uint8_t { kSafetensors, kNpy };

  // Reads the whole file and parses it; the format comes from the content (the .npy magic),
  // not the file name. `max_bytes` bounds what is read.
  static Result<TensorFile> Open(const std::string& path, uint64_t max_bytes = 4ull << 30);
  // Parses bytes already in memory (copied into the result).
  static Result<TensorFile> Parse(std::span<const std::byte> bytes, std::string_view origin = "<memory>");

  Format format() const { return format_; }
  const std::vector<FileTensor>& tensors() const { return tensors_; }  // in file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // NOT_FOUND naming the file and the tensors it does have.
  Result<const FileTensor*> Find(std::string_view name) const;
  // The tensor as float. INVALID_ARGUMENT when its rank is not `rank` (0: any rank); `shape`
  // (optional) receives its shape.
  Result<std::vector<float>> ReadFloat(std::string_view name, uint32_t rank = 0,
                                       std::vector<uint64_t>* shape = nullptr) const;

  TensorFile(TensorFile&&) noexcept = default;
  TensorFile& operator=(TensorFile&&) noexcept = default;

 private:
  TensorFile() = default;
  Status ParseSafetensors();
  Status ParseNpy();

  std::string origin_;
  std::vector<std::byte> bytes_;
  Format format_ = Format::kSafetensors;
  std::vector<FileTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write from float data, stored as `dtype` (F32, F16, BF16 rounded to nearest
// even; U8 clamped to 0..255 and rounded).
struct TensorToWrite {
  std::string name;
  FileDType dtype = FileDType::kF32;
  std::vector<uint64_t> shape;
  const float* data = nullptr;  // product(shape) elements
};

// Writes a safetensors file (data section 8-byte aligned). Other dtypes: INVALID_ARGUMENT.
Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata = {});

}  // namespace kvmem
