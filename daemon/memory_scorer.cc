#include "daemon/memory_scorer.h"

#include <cmath>
#include <filesystem>

#include "common/tensor_file.h"

namespace kvmem {
namespace {

class AffineScorer final : public MemoryScorer {
 public:
  uint32_t dim() const override { return dim_; }
  void Transform(std::span<const float> q, std::vector<float>* t, double* offset) const override {
    t->assign(dim_, 0.f);
    double b = bias_;
    for (uint32_t i = 0; i < dim_; ++i) {
      if (!w_query_.empty()) b += double{w_query_[i]} * q[i];
    }
    if (!w_.empty()) {  // bilinear: t = Wᵀ q + v
      std::vector<double> acc(dim_, 0.0);
      for (uint32_t r = 0; r < dim_; ++r) {
        const double qr = q[r];
        const float* row = &w_[size_t{r} * dim_];
        for (uint32_t c = 0; c < dim_; ++c) acc[c] += qr * row[c];
      }
      for (uint32_t c = 0; c < dim_; ++c) {
        (*t)[c] = static_cast<float>(acc[c] + (w_key_.empty() ? 0.0 : w_key_[c]));
      }
    } else {  // linear: t = w_key + w_query_key ⊙ q
      for (uint32_t c = 0; c < dim_; ++c) {
        (*t)[c] = (w_key_.empty() ? 0.f : w_key_[c]) + (w_qk_.empty() ? 0.f : w_qk_[c] * q[c]);
      }
    }
    *offset = b;
  }
  std::string Describe() const override {
    return std::string(w_.empty() ? "linear" : "bilinear") + " (" + path_ + ")";
  }

  uint32_t dim_ = 0;
  std::string path_;
  std::vector<float> w_;      // bilinear W [D][D], row = query dim
  std::vector<float> w_key_;  // linear w_key, or bilinear v
  std::vector<float> w_qk_;   // linear w_query_key
  std::vector<float> w_query_;  // linear w_query, or bilinear u
  double bias_ = 0;
};

// Reads an optional tensor of exactly `shape`; empty when absent.
Status ReadOptional(const TensorFile& f, const std::string& path, const std::string& name,
                    std::vector<uint64_t> shape, std::vector<float>* out) {
  if (!f.Find(name).ok()) return Status::OK();
  std::vector<uint64_t> got;
  KVMEM_ASSIGN_OR_RETURN(*out, f.ReadFloat(name, 0, &got));
  if (got != shape) {
    std::string want, have;
    for (uint64_t d : shape) want += (want.empty() ? "" : ", ") + std::to_string(d);
    for (uint64_t d : got) have += (have.empty() ? "" : ", ") + std::to_string(d);
    return InvalidArgument(path + ": tensor '" + name + "' has shape [" + have + "], expected [" +
                           want + "] (gate_dim " + std::to_string(shape.empty() ? 0 : shape.back()) +
                           ")");
  }
  for (float v : *out) {
    if (!std::isfinite(v)) return InvalidArgument(path + ": tensor '" + name + "' is not finite");
  }
  return Status::OK();
}

}  // namespace

Result<std::shared_ptr<const MemoryScorer>> LoadMemoryScorer(const std::string& path,
                                                             uint32_t gate_dim) {
  KVMEM_ASSIGN_OR_RETURN(TensorFile f, TensorFile::Open(path, 1ull << 30));
  auto s = std::make_shared<AffineScorer>();
  s->dim_ = gate_dim;
  s->path_ = path;
  const uint64_t d = gate_dim;
  KVMEM_RETURN_IF_ERROR(ReadOptional(f, path, "W", {d, d}, &s->w_));
  const bool bilinear = !s->w_.empty();
  KVMEM_RETURN_IF_ERROR(ReadOptional(f, path, bilinear ? "v" : "w_key", {d}, &s->w_key_));
  KVMEM_RETURN_IF_ERROR(ReadOptional(f, path, bilinear ? "u" : "w_query", {d}, &s->w_query_));
  if (!bilinear) KVMEM_RETURN_IF_ERROR(ReadOptional(f, path, "w_query_key", {d}, &s->w_qk_));
  if (!bilinear && s->w_key_.empty() && s->w_qk_.empty()) {
    return InvalidArgument(path + ": no scorer weights (want W [D, D] for a bilinear scorer, or "
                           "w_key / w_query_key [D] for a linear one)");
  }
  std::vector<float> bias;
  if (f.Find("bias").ok()) {
    std::vector<uint64_t> shape;
    KVMEM_ASSIGN_OR_RETURN(bias, f.ReadFloat("bias", 0, &shape));
    if (bias.size() != 1 || !std::isfinite(bias[0])) {
      return InvalidArgument(path + ": tensor 'bias' must be one finite value");
    }
    s->bias_ = bias[0];
  }
  return std::shared_ptr<const MemoryScorer>(std::move(s));
}

Result<std::string> ResolveScorerPath(const std::string& dir, const std::string& name) {
  if (dir.empty()) {
    return FailedPrecondition("memory.scorer_file '" + name +
                              "': this daemon has no memory_scorer_dir, sessions may not name "
                              "scorer files");
  }
  const std::filesystem::path p(name);
  if (name.empty() || p.is_absolute()) {
    return InvalidArgument("memory.scorer_file '" + name + "' must be a relative file name");
  }
  for (const auto& part : p) {
    if (part == "..") {
      return InvalidArgument("memory.scorer_file '" + name + "' must not contain '..'");
    }
  }
  return (std::filesystem::path(dir) / p).string();
}

}  // namespace kvmem
