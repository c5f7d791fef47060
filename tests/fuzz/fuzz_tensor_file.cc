// libFuzzer target: TensorFile::Parse (safetensors and .npy) on arbitrary bytes. Every tensor it
// accepts must lie inside the input and have exactly shape x dtype bytes; converting it to float
// must not read past it.
#include <cstdint>
#include <cstdlib>
#include <span>

#include "common/tensor_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  auto f = kvmem::TensorFile::Parse(bytes);
  if (!f.ok()) return 0;
  for (const auto& t : f->tensors()) {
    if (t.elements() * kvmem::FileDTypeSize(t.dtype) != t.data.size()) std::abort();
    if (t.data.size() > size) std::abort();
    if (t.elements() <= (1u << 20)) (void)t.ToFloat();
  }
  return 0;
}
