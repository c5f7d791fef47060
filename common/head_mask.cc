#include "common/head_mask.h"

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/tensor_file.h"

namespace kvmem {
namespace {

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Result<HeadMaskFile> ParseHeadMaskJson(const std::string& text, const std::string& origin) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument(origin + ": not valid JSON");
  HeadMaskFile out;
  const nlohmann::json* rows = &j;
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() != "retrieval_heads" && it.key() != "dense_layers") {
        return InvalidArgument(origin + ": unknown key '" + it.key() +
                               "' (expected retrieval_heads, dense_layers)");
      }
    }
    if (!j.contains("retrieval_heads")) return InvalidArgument(origin + ": no retrieval_heads");
    rows = &j["retrieval_heads"];
    if (j.contains("dense_layers")) {
      const auto& d = j["dense_layers"];
      if (!d.is_array()) return InvalidArgument(origin + ": dense_layers must be a list of layers");
      std::vector<uint32_t> dense;
      for (const auto& x : d) {
        if (!x.is_number_unsigned() || x.get<uint64_t>() > 0xffffffffull) {
          return InvalidArgument(origin + ": dense_layers entries must be layer numbers");
        }
        dense.push_back(x.get<uint32_t>());
      }
      out.dense_layers = std::move(dense);
    }
  }
  if (!rows->is_array() || rows->empty()) {
    return InvalidArgument(origin + ": retrieval heads must be a non-empty list of rows, one per layer");
  }
  out.layers = static_cast<uint32_t>(rows->size());
  for (size_t l = 0; l < rows->size(); ++l) {
    const auto& row = (*rows)[l];
    if (!row.is_array() || row.empty()) {
      return InvalidArgument(origin + ": layer " + std::to_string(l) + " is not a non-empty list");
    }
    if (l == 0) out.kv_heads = static_cast<uint32_t>(row.size());
    if (row.size() != out.kv_heads) {
      return InvalidArgument(origin + ": layer " + std::to_string(l) + " has " +
                             std::to_string(row.size()) + " entries, layer 0 has " +
                             std::to_string(out.kv_heads));
    }
    for (size_t h = 0; h < row.size(); ++h) {
      const auto& x = row[h];
      if (x.is_boolean()) {
        out.mask.push_back(x.get<bool>() ? 1 : 0);
      } else if (x.is_number_unsigned() && x.get<uint64_t>() <= 1) {
        out.mask.push_back(static_cast<uint8_t>(x.get<uint64_t>()));
      } else {
        return InvalidArgument(origin + ": entry [" + std::to_string(l) + "][" + std::to_string(h) +
                               "] must be 0 or 1, got " + x.dump());
      }
    }
  }
  return out;
}

// The mask from a tensor file (safetensors or .npy).
Result<HeadMaskFile> LoadHeadMaskTensors(const std::string& path) {
  KVMEM_ASSIGN_OR_RETURN(TensorFile f, TensorFile::Open(path, 64ull << 20));
  std::string name = "retrieval_heads";
  if (f.format() == TensorFile::Format::kNpy ||
      (f.tensors().size() == 1 && f.tensors()[0].name != "dense_layers")) {
    name = f.tensors()[0].name;
  }
  std::vector<uint64_t> shape;
  KVMEM_ASSIGN_OR_RETURN(std::vector<float> m, f.ReadFloat(name, 2, &shape));
  if (shape[0] == 0 || shape[1] == 0 || shape[0] > 0xffffffffull || shape[1] > 0xffffffffull) {
    return InvalidArgument(path + ": mask shape must be [layers, kv_heads], both nonzero");
  }
  HeadMaskFile out;
  out.layers = static_cast<uint32_t>(shape[0]);
  out.kv_heads = static_cast<uint32_t>(shape[1]);
  for (size_t i = 0; i < m.size(); ++i) {
    if (m[i] != 0.f && m[i] != 1.f) {
      return InvalidArgument(path + ": entry [" + std::to_string(i / out.kv_heads) + "][" +
                             std::to_string(i % out.kv_heads) + "] must be 0 or 1, got " +
                             std::to_string(m[i]));
    }
    out.mask.push_back(m[i] != 0.f ? 1 : 0);
  }
  if (f.format() == TensorFile::Format::kSafetensors && f.Find("dense_layers").ok() &&
      name != "dense_layers") {
    KVMEM_ASSIGN_OR_RETURN(std::vector<float> d, f.ReadFloat("dense_layers", 1));
    std::vector<uint32_t> dense;
    for (float x : d) {
      if (!(x >= 0.f) || x != static_cast<float>(static_cast<uint32_t>(x))) {
        return InvalidArgument(path + ": dense_layers entries must be layer numbers");
      }
      dense.push_back(static_cast<uint32_t>(x));
    }
    out.dense_layers = std::move(dense);
  }
  return out;
}

Result<HeadMaskFile> LoadHeadMaskFile(const std::string& path) {
  if (EndsWith(path, ".safetensors") || EndsWith(path, ".npy")) return LoadHeadMaskTensors(path);
  if (!EndsWith(path, ".json")) {
    return Unimplemented(path + ": retrieval-head mask files must be .json, .safetensors or .npy");
  }
  std::ifstream f(path);
  if (!f) return NotFound(path + ": cannot open retrieval-head mask file");
  std::stringstream ss;
  ss << f.rdbuf();
  return ParseHeadMaskJson(ss.str(), path);
}

Status CheckHeadMaskShape(const HeadMaskFile& m, uint32_t layers, uint32_t kv_heads,
                          const std::string& origin) {
  if (m.layers == layers && m.kv_heads == kv_heads) return Status::OK();
  return InvalidArgument(origin + ": mask is " + std::to_string(m.layers) + " x " +
                         std::to_string(m.kv_heads) + ", the profile has " +
                         std::to_string(layers) + " layers x " + std::to_string(kv_heads) +
                         " KV heads");
}

}  // namespace kvmem
