// Retrieval-head masks from files (LycheeDecode roles, learned offline): the model profile's
// retrieval_head_mask [layers × KV heads] and, optionally, its dense layers.
//
// JSON (.json): either the mask itself, one row per layer,
//     [[0, 1, 0, 0], [0, 0, 0, 1], ...]
// or an object {"retrieval_heads": <that>, "dense_layers": [0, 1]} ("dense_layers" optional).
// Entries are 0/1 or false/true; rows must all have the same length.
//
// safetensors (.safetensors): a tensor "retrieval_heads" [layers, kv_heads] of any dtype with
// values 0/1 (or the file's only tensor), and optionally "dense_layers" [n] (integers).
// NumPy (.npy): the mask array [layers, kv_heads] itself.
// Read through common/tensor_file.h, which validates the file before anything is used.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace kvmem {

struct HeadMaskFile {
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  std::vector<uint8_t> mask;  // [layers * kv_heads], row-major, 0/1
  std::optional<std::vector<uint32_t>> dense_layers;
};

// Reads and checks a mask file. NOT_FOUND when it cannot be opened; INVALID_ARGUMENT naming
// the file and the offending entry otherwise; UNIMPLEMENTED for an unknown extension (.json,
// .safetensors and .npy are known).
Result<HeadMaskFile> LoadHeadMaskFile(const std::string& path);

// The same from JSON text (`origin` names it in errors).
Result<HeadMaskFile> ParseHeadMaskJson(const std::string& text, const std::string& origin);

// INVALID_ARGUMENT unless the mask is layers × kv_heads: "FILE: mask is 3 x 4, the profile has
// 2 layers x 4 KV heads".
Status CheckHeadMaskShape(const HeadMaskFile& m, uint32_t layers, uint32_t kv_heads,
                          const std::string& origin);

}  // namespace kvmem
