#include "bench/data/safetensors.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "common/dtype.h"

namespace kvmem::bench {

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the format's own limit is 100 MB
constexpr uint32_t kMaxRank = 8;

size_t ElementSize(TensorDType t) {
  switch (t) {
    case TensorDType::kF32: return 4;
    case TensorDType::kF16:
    case TensorDType::kBF16: return 2;
    case TensorDType::kU8: return 1;
  }
  return 1;
}

bool ParseTensorDType(const std::string& s, TensorDType* t) {
  if (s == "F32") *t = TensorDType::kF32;
  else if (s == "F16") *t = TensorDType::kF16;
  else if (s == "BF16") *t = TensorDType::kBF16;
  else if (s == "U8") *t = TensorDType::kU8;
  else return false;
  return true;
}

}  // namespace

uint64_t TensorView::elements() const {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;  // overflow excluded by Parse()
  return n;
}

Result<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return NotFound("safetensors: cannot open " + path);
  const std::streamoff size = in.tellg();
  if (size < 0) return Unavailable("safetensors: cannot size " + path);
  std::vector<uint8_t> image(static_cast<size_t>(size));
  in.seekg(0);
  if (size > 0 && !in.read(reinterpret_cast<char*>(image.data()), size)) {
    return Unavailable("safetensors: short read of " + path);
  }
  auto f = Parse(std::move(image));
  if (!f.ok()) return f.status().WithContext(path);
  return f;
}

Result<SafetensorsFile> SafetensorsFile::Parse(std::vector<uint8_t> image) {
  if (image.size() < 8) return InvalidArgument("safetensors: shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | image[static_cast<size_t>(i)];
  if (n > kMaxHeaderBytes) return InvalidArgument("safetensors: header length over 100 MB");
  if (n > image.size() - 8) return InvalidArgument("safetensors: header runs past end of file");
  const char* hdr = reinterpret_cast<const char*>(image.data() + 8);
  nlohmann::json j = nlohmann::json::parse(hdr, hdr + n, /*cb=*/nullptr,
                                           /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgument("safetensors: header is not a JSON object");
  }
  const uint64_t data_begin = 8 + n;
  const uint64_t data_size = image.size() - data_begin;
  SafetensorsFile f;
  std::vector<std::pair<uint64_t, uint64_t>> extents;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const nlohmann::json& t = it.value();
    const std::string where = "safetensors: tensor '" + name.substr(0, 64) + "': ";
    if (!t.is_object()) return InvalidArgument(where + "entry is not an object");
    auto dt = t.find("dtype");
    auto sh = t.find("shape");
    auto off = t.find("data_offsets");
    if (dt == t.end() || !dt->is_string()) return InvalidArgument(where + "missing dtype");
    if (sh == t.end() || !sh->is_array()) return InvalidArgument(where + "missing shape");
    if (off == t.end() || !off->is_array() || off->size() != 2) {
      return InvalidArgument(where + "data_offsets must be [begin, end]");
    }
    TensorView v;
    v.name = name;
    if (!ParseTensorDType(dt->get_ref<const std::string&>(), &v.dtype)) {
      return InvalidArgument(where + "unsupported dtype (F32, F16, BF16, U8)");
    }
    if (sh->size() > kMaxRank) return InvalidArgument(where + "rank over 8");
    uint64_t elements = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned()) return InvalidArgument(where + "shape entry not unsigned");
      const uint64_t x = d.get<uint64_t>();
      if (x != 0 && elements > std::numeric_limits<uint64_t>::max() / x) {
        return InvalidArgument(where + "shape product overflows");
      }
      elements *= x;
      v.shape.push_back(x);
    }
    const auto& o0 = (*off)[0];
    const auto& o1 = (*off)[1];
    if (!o0.is_number_unsigned() || !o1.is_number_unsigned()) {
      return InvalidArgument(where + "data_offsets not unsigned");
    }
    const uint64_t b = o0.get<uint64_t>(), e = o1.get<uint64_t>();
    if (b > e || e > data_size) return InvalidArgument(where + "data_offsets out of the file");
    const uint64_t es = ElementSize(v.dtype);
    if (elements > std::numeric_limits<uint64_t>::max() / es || e - b != elements * es) {
      return InvalidArgument(where + "byte size does not match shape and dtype");
    }
    extents.push_back({b, e});
    f.tensors_.push_back(std::move(v));
    f.tensors_.back().bytes = std::span<const uint8_t>(image.data() + data_begin + b, e - b);
  }
  std::sort(extents.begin(), extents.end());
  for (size_t i = 1; i < extents.size(); ++i) {
    if (extents[i].first < extents[i - 1].second) {
      return InvalidArgument("safetensors: tensors overlap");
    }
  }
  // Moving the vector keeps its buffer, so the spans stay valid.
  f.image_ = std::move(image);
  return f;
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  for (const auto& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

Result<std::vector<float>> SafetensorsFile::ReadFloat(std::string_view name, uint32_t rank,
                                                      std::vector<uint64_t>* shape) const {
  const TensorView* t = Find(name);
  if (t == nullptr) return NotFound("safetensors: no tensor '" + std::string(name) + "'");
  if (rank != 0 && t->shape.size() != rank) {
    return InvalidArgument("safetensors: tensor '" + std::string(name) + "' has rank " +
                           std::to_string(t->shape.size()) + ", expected " +
                           std::to_string(rank));
  }
  const uint64_t n = t->elements();
  if (n > (uint64_t{1} << 34)) return ResourceExhausted("safetensors: tensor too large");
  std::vector<float> out(n);
  switch (t->dtype) {
    case TensorDType::kF32: std::memcpy(out.data(), t->bytes.data(), n * 4); break;
    case TensorDType::kF16: {
      for (uint64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t->bytes.data() + 2 * i, 2);
        out[i] = F16ToFloat(h);
      }
      break;
    }
    case TensorDType::kBF16: {
      for (uint64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t->bytes.data() + 2 * i, 2);
        out[i] = BF16ToFloat(h);
      }
      break;
    }
    case TensorDType::kU8:
      for (uint64_t i = 0; i < n; ++i) out[i] = t->bytes[i];
      break;
  }
  if (shape != nullptr) *shape = t->shape;
  return out;
}

Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<uint8_t> data;
  for (const auto& t : tensors) {
    uint64_t n = 1;
    for (uint64_t d : t.shape) n *= d;
    const uint64_t begin = data.size();
    const size_t es = ElementSize(t.dtype);
    data.resize(begin + n * es);
    uint8_t* out = data.data() + begin;
    for (uint64_t i = 0; i < n; ++i) {
      const float x = t.data[i];
      switch (t.dtype) {
        case TensorDType::kF32: std::memcpy(out + 4 * i, &x, 4); break;
        case TensorDType::kF16: {
          const uint16_t h = FloatToF16(x);
          std::memcpy(out + 2 * i, &h, 2);
          break;
        }
        case TensorDType::kBF16: {
          const uint16_t h = FloatToBF16(x);
          std::memcpy(out + 2 * i, &h, 2);
          break;
        }
        case TensorDType::kU8:
          out[i] = static_cast<uint8_t>(std::clamp(x, 0.f, 255.f));
          break;
      }
    }
    static const char* kNames[] = {"F32", "F16", "BF16", "U8"};
    header[t.name] = {{"dtype", kNames[static_cast<int>(t.dtype)]},
                      {"shape", t.shape},
                      {"data_offsets", {begin, data.size()}}};
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');  // align the data section
  std::ofstream f(path, std::ios::binary);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{h.size()} >> (8 * i));
  f.write(reinterpret_cast<const char*>(len), 8);
  f.write(h.data(), static_cast<std::streamsize>(h.size()));
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  if (!f) return Unavailable("safetensors: cannot write " + path);
  return Status::OK();
}

}  // namespace kvmem::bench
