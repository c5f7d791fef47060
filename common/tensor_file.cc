#include "common/tensor_file.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <utility>

#include "common/dtype.h"

namespace kvmem {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // safetensors' own limit
constexpr size_t kMaxRank = 16;

struct DTypeInfo {
  FileDType type;
  std::string_view safetensors;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {FileDType::kF64, "F64", 8},  {FileDType::kF32, "F32", 4}, {FileDType::kF16, "F16", 2},
    {FileDType::kBF16, "BF16", 2}, {FileDType::kI64, "I64", 8}, {FileDType::kI32, "I32", 4},
    {FileDType::kI16, "I16", 2},  {FileDType::kI8, "I8", 1},   {FileDType::kU64, "U64", 8},
    {FileDType::kU32, "U32", 4},  {FileDType::kU16, "U16", 2}, {FileDType::kU8, "U8", 1},
    {FileDType::kBool, "BOOL", 1},
};

const DTypeInfo& Info(FileDType t) {
  for (const auto& d : kDTypes) {
    if (d.type == t) return d;
  }
  return kDTypes[0];
}

std::optional<FileDType> FromSafetensors(std::string_view name) {
  for (const auto& d : kDTypes) {
    if (d.safetensors == name) return d.type;
  }
  return std::nullopt;
}

// NumPy descr -> dtype: '<f4', '|u1', '|b1', '<i8', ... Big-endian data is refused (every
// machine we run on is little-endian and converting silently would hide a producer bug).
std::optional<FileDType> FromNumpyDescr(std::string_view d) {
  if (d.size() < 3) return std::nullopt;
  const char order = d[0];
  const std::string_view code = d.substr(1);
  if (order == '>') return std::nullopt;
  if (order != '<' && order != '|' && order != '=') return std::nullopt;
  static constexpr std::pair<std::string_view, FileDType> kCodes[] = {
      {"f8", FileDType::kF64}, {"f4", FileDType::kF32}, {"f2", FileDType::kF16},
      {"i8", FileDType::kI64}, {"i4", FileDType::kI32}, {"i2", FileDType::kI16},
      {"i1", FileDType::kI8},  {"u8", FileDType::kU64}, {"u4", FileDType::kU32},
      {"u2", FileDType::kU16}, {"u1", FileDType::kU8},  {"b1", FileDType::kBool},
  };
  for (const auto& [c, t] : kCodes) {
    if (c == code) return t;
  }
  return std::nullopt;
}

// Elements and bytes of a shape, or nullopt on overflow.
std::optional<uint64_t> ByteSize(std::span<const uint64_t> shape, size_t elem) {
  uint64_t n = 1;
  for (uint64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<uint64_t>::max() / d) return std::nullopt;
    n *= d;
  }
  if (elem != 0 && n > std::numeric_limits<uint64_t>::max() / elem) return std::nullopt;
  return n * elem;
}

std::string ShapeString(std::span<const uint64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

template <typename T>
T LoadLE(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// A cursor over the Python-literal dict of a .npy header. Accepts exactly what numpy writes
// (and the spacing variants of other writers): string keys in single or double quotes, string
// values, True/False, and tuples of non-negative integers.
class NpyHeaderParser {
 public:
  explicit NpyHeaderParser(std::string_view s) : s_(s) {}

  Status Parse(std::string* descr, bool* fortran, std::vector<uint64_t>* shape) {
    bool have_descr = false, have_order = false, have_shape = false;
    Skip();
    if (!Eat('{')) return Bad("header does not start with '{'");
    for (;;) {
      Skip();
      if (Eat('}')) break;
      std::string key;
      KVMEM_RETURN_IF_ERROR(String(&key));
      Skip();
      if (!Eat(':')) return Bad("expected ':' after key '" + key + "'");
      Skip();
      if (key == "descr") {
        KVMEM_RETURN_IF_ERROR(String(descr));
        have_descr = true;
      } else if (key == "fortran_order") {
        KVMEM_RETURN_IF_ERROR(Bool(fortran));
        have_order = true;
      } else if (key == "shape") {
        KVMEM_RETURN_IF_ERROR(Tuple(shape));
        have_shape = true;
      } else {
        return Bad("unknown header key '" + key + "'");
      }
      Skip();
      if (Eat(',')) continue;
      Skip();
      if (Eat('}')) break;
      return Bad("expected ',' or '}' after '" + key + "'");
    }
    if (!have_descr || !have_order || !have_shape) {
      return Bad("header lacks one of 'descr', 'fortran_order', 'shape'");
    }
    return Status::OK();
  }

 private:
  static Status Bad(std::string what) { return InvalidArgument("npy header: " + std::move(what)); }
  void Skip() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t')) ++pos_;
  }
  bool Eat(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  Status String(std::string* out) {
    if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"')) return Bad("expected a string");
    const char q = s_[pos_++];
    const size_t end = s_.find(q, pos_);
    if (end == std::string_view::npos || end - pos_ > 64) return Bad("unterminated or overlong string");
    *out = std::string(s_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return Status::OK();
  }
  Status Bool(bool* out) {
    if (s_.substr(pos_, 4) == "True") {
      pos_ += 4;
      *out = true;
    } else if (s_.substr(pos_, 5) == "False") {
      pos_ += 5;
      *out = false;
    } else {
      return Bad("expected True or False");
    }
    return Status::OK();
  }
  Status Tuple(std::vector<uint64_t>* out) {
    out->clear();
    if (!Eat('(')) return Bad("shape is not a tuple");
    for (;;) {
      Skip();
      if (Eat(')')) return Status::OK();
      if (pos_ >= s_.size() || s_[pos_] < '0' || s_[pos_] > '9') return Bad("shape entry is not a number");
      uint64_t v = 0;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
        const uint64_t digit = static_cast<uint64_t>(s_[pos_++] - '0');
        if (v > (std::numeric_limits<uint64_t>::max() - digit) / 10) return Bad("shape entry overflows");
        v = v * 10 + digit;
      }
      if (s_.substr(pos_, 1) == "L") ++pos_;  // Python 2 longs
      out->push_back(v);
      if (out->size() > kMaxRank) return Bad("more than 16 dimensions");
      Skip();
      if (Eat(',')) continue;
      Skip();
      if (Eat(')')) return Status::OK();
      return Bad("expected ',' or ')' in shape");
    }
  }

  std::string_view s_;
  size_t pos_ = 0;
};

}  // namespace

size_t FileDTypeSize(FileDType t) { return Info(t).size; }
std::string_view FileDTypeName(FileDType t) { return Info(t).safetensors; }

uint64_t FileTensor::elements() const {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;  // validated against the data size at parse time
  return n;
}

std::vector<float> FileTensor::ToFloat() const {
  const uint64_t n = elements();
  std::vector<float> out(n);
  const std::byte* p = data.data();
  const size_t es = FileDTypeSize(dtype);
  for (uint64_t i = 0; i < n; ++i, p += es) {
    float v = 0.f;
    switch (dtype) {
      case FileDType::kF64: v = static_cast<float>(LoadLE<double>(p)); break;
      case FileDType::kF32: v = LoadLE<float>(p); break;
      case FileDType::kF16: v = F16ToFloat(LoadLE<uint16_t>(p)); break;
      case FileDType::kBF16: v = BF16ToFloat(LoadLE<uint16_t>(p)); break;
      case FileDType::kI64: v = static_cast<float>(LoadLE<int64_t>(p)); break;
      case FileDType::kI32: v = static_cast<float>(LoadLE<int32_t>(p)); break;
      case FileDType::kI16: v = static_cast<float>(LoadLE<int16_t>(p)); break;
      case FileDType::kI8: v = static_cast<float>(LoadLE<int8_t>(p)); break;
      case FileDType::kU64: v = static_cast<float>(LoadLE<uint64_t>(p)); break;
      case FileDType::kU32: v = static_cast<float>(LoadLE<uint32_t>(p)); break;
      case FileDType::kU16: v = static_cast<float>(LoadLE<uint16_t>(p)); break;
      case FileDType::kU8: v = static_cast<float>(LoadLE<uint8_t>(p)); break;
      case FileDType::kBool: v = LoadLE<uint8_t>(p) != 0 ? 1.f : 0.f; break;
    }
    out[i] = v;
  }
  return out;
}

Result<TensorFile> TensorFile::Open(const std::string& path, uint64_t max_bytes) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return NotFound("tensor file " + path + ": cannot open");
  const std::streamoff size = f.tellg();
  if (size < 0) return InvalidArgument("tensor file " + path + ": cannot determine size");
  if (static_cast<uint64_t>(size) > max_bytes) {
    return InvalidArgument("tensor file " + path + ": " + std::to_string(size) + " bytes exceeds the limit of " +
                           std::to_string(max_bytes));
  }
  TensorFile tf;
  tf.origin_ = path;
  tf.bytes_.resize(static_cast<size_t>(size));
  f.seekg(0);
  if (!f.read(reinterpret_cast<char*>(tf.bytes_.data()), size)) {
    return Internal("tensor file " + path + ": short read");
  }
  KVMEM_RETURN_IF_ERROR(tf.bytes_.size() >= 6 && std::memcmp(tf.bytes_.data(), "\x93NUMPY", 6) == 0
                            ? tf.ParseNpy()
                            : tf.ParseSafetensors());
  return tf;
}

Result<TensorFile> TensorFile::Parse(std::span<const std::byte> bytes, std::string_view origin) {
  TensorFile tf;
  tf.origin_ = std::string(origin);
  tf.bytes_.assign(bytes.begin(), bytes.end());
  KVMEM_RETURN_IF_ERROR(tf.bytes_.size() >= 6 && std::memcmp(tf.bytes_.data(), "\x93NUMPY", 6) == 0
                            ? tf.ParseNpy()
                            : tf.ParseSafetensors());
  return tf;
}

Result<const FileTensor*> TensorFile::Find(std::string_view name) const {
  for (const auto& t : tensors_) {
    if (t.name == name) return &t;
  }
  std::string have;
  for (const auto& t : tensors_) have += (have.empty() ? "'" : ", '") + t.name + "'";
  return NotFound("tensor file " + origin_ + ": no tensor '" + std::string(name) + "' (it has " +
                  (have.empty() ? std::string("none") : have) + ")");
}

Result<std::vector<float>> TensorFile::ReadFloat(std::string_view name, uint32_t rank,
                                                 std::vector<uint64_t>* shape) const {
  KVMEM_ASSIGN_OR_RETURN(const FileTensor* t, Find(name));
  if (rank != 0 && t->shape.size() != rank) {
    return InvalidArgument("tensor file " + origin_ + ": tensor '" + t->name + "' has rank " +
                           std::to_string(t->shape.size()) + ", expected " + std::to_string(rank));
  }
  if (shape != nullptr) *shape = t->shape;
  return t->ToFloat();
}

Status TensorFile::ParseSafetensors() {
  format_ = Format::kSafetensors;
  const std::string where = "safetensors " + origin_;
  if (bytes_.size() < 8) return InvalidArgument(where + ": " + std::to_string(bytes_.size()) + " bytes, no header");
  const uint64_t n = LoadLE<uint64_t>(bytes_.data());
  if (n > kMaxHeaderBytes || n > bytes_.size() - 8) {
    return InvalidArgument(where + ": header length " + std::to_string(n) + " exceeds the file (" +
                           std::to_string(bytes_.size()) + " bytes)");
  }
  const char* hdr = reinterpret_cast<const char*>(bytes_.data()) + 8;
  nlohmann::json j = nlohmann::json::parse(hdr, hdr + n, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return InvalidArgument(where + ": header is not a JSON object");
  const std::span<const std::byte> region(bytes_.data() + 8 + n, bytes_.size() - 8 - n);

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return InvalidArgument(where + ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) return InvalidArgument(where + ": __metadata__ value '" + m.key() + "' is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string what = where + ": tensor '" + name + "'";
    if (!v.is_object()) return InvalidArgument(what + " is not an object");
    const auto dt = v.find("dtype");
    const auto sh = v.find("shape");
    const auto off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string()) return InvalidArgument(what + ": missing dtype");
    if (sh == v.end() || !sh->is_array()) return InvalidArgument(what + ": missing shape");
    if (off == v.end() || !off->is_array() || off->size() != 2) return InvalidArgument(what + ": missing data_offsets");
    FileTensor t;
    t.name = name;
    const auto type = FromSafetensors(dt->get<std::string>());
    if (!type) return InvalidArgument(what + ": unsupported dtype '" + dt->get<std::string>() + "'");
    t.dtype = *type;
    if (sh->size() > kMaxRank) return InvalidArgument(what + ": more than 16 dimensions");
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned()) return InvalidArgument(what + ": shape entries must be non-negative integers");
      t.shape.push_back(d.get<uint64_t>());
    }
    if (!(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) {
      return InvalidArgument(what + ": data_offsets must be non-negative integers");
    }
    const uint64_t begin = (*off)[0].get<uint64_t>(), end = (*off)[1].get<uint64_t>();
    if (begin > end || end > region.size()) {
      return InvalidArgument(what + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                             ") outside the data region of " + std::to_string(region.size()) + " bytes");
    }
    const auto need = ByteSize(t.shape, FileDTypeSize(t.dtype));
    if (!need || *need != end - begin) {
      return InvalidArgument(what + ": shape " + ShapeString(t.shape) + " of " + std::string(FileDTypeName(t.dtype)) +
                             " needs " + (need ? std::to_string(*need) : std::string("too many")) + " bytes, offsets give " +
                             std::to_string(end - begin));
    }
    t.data = region.subspan(begin, end - begin);
    ranges.emplace_back(begin, end);
    tensors_.push_back(std::move(t));
  }
  // The format requires tensors not to overlap (a writer bug otherwise; aliasing would let one
  // tensor's validation vouch for another's bytes).
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return InvalidArgument(where + ": tensors overlap in the data region");
  }
  // nlohmann's object is ordered by key; report tensors in data order, which is file order.
  std::sort(tensors_.begin(), tensors_.end(), [](const FileTensor& a, const FileTensor& b) {
    return a.data.data() != b.data.data() ? a.data.data() < b.data.data() : a.name < b.name;
  });
  return Status::OK();
}

Status TensorFile::ParseNpy() {
  format_ = Format::kNpy;
  const std::string where = "npy " + origin_;
  if (bytes_.size() < 10) return InvalidArgument(where + ": truncated preamble");
  const uint8_t major = static_cast<uint8_t>(bytes_[6]);
  size_t header_len = 0, header_at = 0;
  if (major == 1) {
    header_len = LoadLE<uint16_t>(bytes_.data() + 8);
    header_at = 10;
  } else if (major == 2 || major == 3) {
    if (bytes_.size() < 12) return InvalidArgument(where + ": truncated preamble");
    header_len = LoadLE<uint32_t>(bytes_.data() + 8);
    header_at = 12;
  } else {
    return InvalidArgument(where + ": unsupported format version " + std::to_string(major));
  }
  if (header_len > kMaxHeaderBytes || header_len > bytes_.size() - header_at) {
    return InvalidArgument(where + ": header length " + std::to_string(header_len) + " exceeds the file");
  }
  std::string_view header(reinterpret_cast<const char*>(bytes_.data()) + header_at, header_len);
  while (!header.empty() && (header.back() == '\n' || header.back() == ' ' || header.back() == '\0')) {
    header.remove_suffix(1);
  }
  std::string descr;
  bool fortran = false;
  FileTensor t;
  if (Status s = NpyHeaderParser(header).Parse(&descr, &fortran, &t.shape); !s.ok()) {
    return InvalidArgument(where + ": " + s.message());
  }
  const auto type = FromNumpyDescr(descr);
  if (!type) return InvalidArgument(where + ": unsupported dtype '" + descr + "' (little-endian numeric or bool only)");
  if (fortran) return InvalidArgument(where + ": fortran_order arrays are not supported; save with C order");
  t.dtype = *type;
  const size_t data_at = header_at + header_len;
  const auto need = ByteSize(t.shape, FileDTypeSize(t.dtype));
  if (!need || *need != bytes_.size() - data_at) {
    return InvalidArgument(where + ": shape " + ShapeString(t.shape) + " of " + descr + " needs " +
                           (need ? std::to_string(*need) : std::string("too many")) + " bytes, file has " +
                           std::to_string(bytes_.size() - data_at));
  }
  t.data = std::span<const std::byte>(bytes_.data() + data_at, *need);
  tensors_.push_back(std::move(t));
  return Status::OK();
}

Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<std::byte> data;
  for (const auto& t : tensors) {
    if (t.dtype != FileDType::kF32 && t.dtype != FileDType::kF16 && t.dtype != FileDType::kBF16 &&
        t.dtype != FileDType::kU8) {
      return InvalidArgument("safetensors " + path + ": cannot write tensor '" + t.name + "' as " +
                             std::string(FileDTypeName(t.dtype)));
    }
    const auto bytes = ByteSize(t.shape, FileDTypeSize(t.dtype));
    if (!bytes) return InvalidArgument("safetensors " + path + ": tensor '" + t.name + "' too large");
    const uint64_t n = *bytes / FileDTypeSize(t.dtype);
    const size_t begin = data.size();
    data.resize(begin + *bytes);
    std::byte* out = data.data() + begin;
    for (uint64_t i = 0; i < n; ++i) {
      const float x = t.data[i];
      switch (t.dtype) {
        case FileDType::kF32: std::memcpy(out + 4 * i, &x, 4); break;
        case FileDType::kF16: {
          const uint16_t h = FloatToF16(x);
          std::memcpy(out + 2 * i, &h, 2);
          break;
        }
        case FileDType::kBF16: {
          const uint16_t h = FloatToBF16(x);
          std::memcpy(out + 2 * i, &h, 2);
          break;
        }
        default: out[i] = static_cast<std::byte>(static_cast<uint8_t>(std::clamp(x, 0.f, 255.f) + 0.5f)); break;
      }
    }
    header[t.name] = {{"dtype", FileDTypeName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');  // align the data section
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  const uint64_t len = h.size();
  f.write(reinterpret_cast<const char*>(&len), 8);
  f.write(h.data(), static_cast<std::streamsize>(h.size()));
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  f.close();
  if (!f) return Unavailable("safetensors " + path + ": cannot write");
  return Status::OK();
}

}  // namespace kvmem
