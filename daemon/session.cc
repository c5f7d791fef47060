#include "daemon/session.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>

namespace kvmem {
namespace {

uint64_t NowMs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

}  // namespace

Status ValidateProfile(const ModelProfile& p, const ProfileLimits& lim) {
  if (p.layers == 0 || p.layers > lim.max_layers) {
    return InvalidArgument("profile: layers must be in [1, " + std::to_string(lim.max_layers) +
                           "], got " + std::to_string(p.layers));
  }
  if (p.kv_heads == 0 || p.q_heads == 0 || p.q_heads > lim.max_heads) {
    return InvalidArgument("profile: q_heads and kv_heads must be in [1, " +
                           std::to_string(lim.max_heads) + "]");
  }
  if (p.q_heads % p.kv_heads != 0) {
    return InvalidArgument("profile: q_heads (" + std::to_string(p.q_heads) +
                           ") must be a multiple of kv_heads (" + std::to_string(p.kv_heads) + ")");
  }
  if (p.head_dim == 0 || p.head_dim > lim.max_head_dim || p.head_dim % 8 != 0) {
    return InvalidArgument("profile: head_dim must be a multiple of 8 in [8, " +
                           std::to_string(lim.max_head_dim) + "], got " +
                           std::to_string(p.head_dim));
  }
  for (uint32_t l : p.dense_layers) {
    if (l >= p.layers) {
      return InvalidArgument("profile: dense layer " + std::to_string(l) + " >= layers " +
                             std::to_string(p.layers));
    }
  }
  if (!p.retrieval_head_mask.empty() &&
      p.retrieval_head_mask.size() != static_cast<size_t>(p.layers) * p.kv_heads) {
    return InvalidArgument("profile: retrieval_head_mask has " +
                           std::to_string(p.retrieval_head_mask.size()) + " entries, expected " +
                           std::to_string(static_cast<size_t>(p.layers) * p.kv_heads));
  }
  return Status::OK();
}

Status ValidateOptions(const SessionOptions& o) {
  KVMEM_RETURN_IF_ERROR(index::Chunker::Validate(o.chunker).WithContext("options"));
  if (o.mode != SelectionMode::kDense && o.mode != SelectionMode::kDefault) {
    return Unimplemented("options: selection mode " + std::to_string(static_cast<int>(o.mode)) +
                         " is not available in this build (only dense)");
  }
  if (o.durability == Durability::kDurable) {
    return Unimplemented("options: durable sessions are not available in this build");
  }
  return Status::OK();
}

Session::Session(uint64_t id, std::string tenant, ModelProfile profile, SessionOptions options,
                 KVPool* pool)
    : id_(id),
      tenant_(std::move(tenant)),
      profile_(std::move(profile)),
      options_(std::move(options)),
      pool_(pool),
      tail_capacity_(options_.chunker.max_tokens + kMaxLayerSkew),
      chunker_(options_.chunker),
      layers_(profile_.layers) {}

Result<std::unique_ptr<Session>> Session::Create(uint64_t id, std::string tenant,
                                                 ModelProfile profile, SessionOptions options,
                                                 KVPool* pool) {
  KVMEM_RETURN_IF_ERROR(ValidateProfile(profile, ProfileLimits{}));
  KVMEM_RETURN_IF_ERROR(ValidateOptions(options));
  std::unique_ptr<Session> s(
      new Session(id, std::move(tenant), std::move(profile), std::move(options), pool));
  KVMEM_RETURN_IF_ERROR(s->Init());
  return s;
}

Status Session::Init() {
  const uint64_t bytes = BlockBytes(tail_capacity_);
  for (uint32_t l = 0; l < profile_.layers; ++l) {
    auto off = pool_->Allocate(bytes);
    if (!off.ok()) {
      for (uint32_t j = 0; j < l; ++j) pool_->Free(layers_[j].tail_block);
      layers_.clear();
      return off.status().WithContext("session tail buffers");
    }
    layers_[l].tail_block = *off;
  }
  stat_bytes_ = pool_->allocator().ReservedBytes(bytes) * profile_.layers;
  created_ms_ = NowMs();
  last_used_ms_ = created_ms_.load();
  return Status::OK();
}

Session::~Session() {
  for (const Layer& l : layers_) pool_->Free(l.tail_block);
  for (const Chunk& c : chunks_)
    for (uint64_t b : c.block) pool_->Free(b);
}

uint64_t Session::BlockBytes(uint32_t stride_tokens) const {
  return 2ull * profile_.kv_heads * stride_tokens * profile_.head_dim * DTypeSize(profile_.dtype);
}

uint64_t Session::ElemOffset(uint64_t byte_offset) const {
  return byte_offset / DTypeSize(profile_.dtype);
}

void Session::TouchNow() { last_used_ms_.store(NowMs(), std::memory_order_relaxed); }

Status Session::SealAndStore(std::span<const uint32_t> sealed, uint32_t n, const uint8_t* keys,
                             const uint8_t* values) {
  const uint32_t L = profile_.layers, H = profile_.kv_heads, D = profile_.head_dim;
  const uint64_t esize = DTypeSize(profile_.dtype);
  const uint64_t row = uint64_t{D} * esize;

  // Allocate every block first so a full pool leaves the session untouched.
  std::vector<Chunk> fresh(sealed.size());
  uint64_t pos = 0, reserved = 0;
  for (size_t i = 0; i < sealed.size(); ++i) {
    fresh[i].start = chunker_.sealed_tokens() + pos;  // caller updates chunker_ after success
    fresh[i].tokens = sealed[i];
    pos += sealed[i];
    const uint64_t bytes = BlockBytes(sealed[i]);
    for (uint32_t l = 0; l < L; ++l) {
      auto off = pool_->Allocate(bytes);
      if (!off.ok()) {
        for (auto& c : fresh)
          for (uint64_t b : c.block) pool_->Free(b);
        return off.status();
      }
      fresh[i].block.push_back(*off);
      reserved += pool_->allocator().ReservedBytes(bytes);
    }
  }
  const uint64_t consumed = pos;

  for (uint32_t l = 0; l < L; ++l) {
    Layer& layer = layers_[l];
    const uint64_t T = layer.tail_tokens;
    const uint64_t tail_k = layer.tail_block;
    const uint64_t tail_v = tail_k + uint64_t{H} * tail_capacity_ * row;
    // Copies stream rows [a, a+count) of head h (K and V) to pool offsets dk / dv.
    auto copy_rows = [&](uint32_t h, uint64_t a, uint64_t count, uint64_t dk,
                         uint64_t dv) -> Status {
      if (a < T) {
        const uint64_t m = std::min(count, T - a);
        const uint64_t src = (uint64_t{h} * tail_capacity_ + a) * row;
        KVMEM_RETURN_IF_ERROR(pool_->CopyWithin(dk, tail_k + src, m * row));
        KVMEM_RETURN_IF_ERROR(pool_->CopyWithin(dv, tail_v + src, m * row));
        a += m;
        count -= m;
        dk += m * row;
        dv += m * row;
      }
      if (count > 0) {
        const uint64_t src = ((uint64_t{l} * H + h) * n + (a - T)) * row;
        KVMEM_RETURN_IF_ERROR(pool_->CopyIn(dk, keys + src, count * row));
        KVMEM_RETURN_IF_ERROR(pool_->CopyIn(dv, values + src, count * row));
      }
      return Status::OK();
    };
    uint64_t p = 0;
    for (const Chunk& c : fresh) {
      const uint64_t k0 = c.block[l];
      const uint64_t v0 = k0 + uint64_t{H} * c.tokens * row;
      for (uint32_t h = 0; h < H; ++h) {
        KVMEM_RETURN_IF_ERROR(copy_rows(h, p, c.tokens, k0 + uint64_t{h} * c.tokens * row,
                                        v0 + uint64_t{h} * c.tokens * row));
      }
      p += c.tokens;
      layer.chunk_spans.push_back({ElemOffset(k0), c.tokens, 0, c.tokens});
    }
    // The rest of the stream becomes the tail: shift old rows left, then append new rows.
    const uint64_t rest = T + n - consumed;
    if (rest > tail_capacity_) return Internal("tail overflow while sealing");
    for (uint32_t h = 0; h < H; ++h) {
      const uint64_t dk = tail_k + uint64_t{h} * tail_capacity_ * row;
      const uint64_t dv = tail_v + uint64_t{h} * tail_capacity_ * row;
      if (consumed < T) {
        const uint64_t m = T - consumed;
        KVMEM_RETURN_IF_ERROR(pool_->CopyWithin(dk, dk + consumed * row, m * row));
        KVMEM_RETURN_IF_ERROR(pool_->CopyWithin(dv, dv + consumed * row, m * row));
        if (n > 0) {
          const uint64_t src = (uint64_t{l} * H + h) * n * row;
          KVMEM_RETURN_IF_ERROR(pool_->CopyIn(dk + m * row, keys + src, n * row));
          KVMEM_RETURN_IF_ERROR(pool_->CopyIn(dv + m * row, values + src, n * row));
        }
      } else if (rest > 0) {
        const uint64_t src = ((uint64_t{l} * H + h) * n + (consumed - T)) * row;
        KVMEM_RETURN_IF_ERROR(pool_->CopyIn(dk, keys + src, rest * row));
        KVMEM_RETURN_IF_ERROR(pool_->CopyIn(dv, values + src, rest * row));
      }
    }
    layer.tail_tokens = static_cast<uint32_t>(rest);
  }
  for (Chunk& c : fresh) chunks_.push_back(std::move(c));
  stat_bytes_ += reserved;
  stat_chunks_ = chunks_.size();
  return Status::OK();
}

Result<AppendResult> Session::AppendKV(uint32_t n, const void* keys, const void* values,
                                       const uint8_t* boundaries) {
  if (layers_ahead_ != 0) {
    return FailedPrecondition("session " + std::to_string(id_) +
                              ": a decode step has appended to only some layers; finish it "
                              "(Attend with new k/v for every layer) before AppendKV");
  }
  if (n == 0) return AppendResult{tokens_, chunks_.size(), 0};
  std::vector<uint8_t> zeros;
  if (boundaries == nullptr) {
    zeros.assign(n, 0);
    boundaries = zeros.data();
  }
  index::Chunker trial = chunker_;
  std::vector<uint32_t> sealed;
  trial.Push(unsealed_boundaries_, &sealed);
  trial.Push(std::span<const uint8_t>(boundaries, n), &sealed);
  KVMEM_RETURN_IF_ERROR(SealAndStore(sealed, n, static_cast<const uint8_t*>(keys),
                                     static_cast<const uint8_t*>(values)));
  chunker_ = std::move(trial);
  unsealed_boundaries_.clear();
  tokens_ += n;
  stat_tokens_ = tokens_;
  stat_tail_ = layers_.empty() ? 0 : layers_[0].tail_tokens;
  TouchNow();
  return AppendResult{tokens_, chunks_.size(), static_cast<uint32_t>(sealed.size())};
}

Status Session::Attend(const AttendArgs& a, AttendInfo* info) {
  if (a.layer >= profile_.layers) {
    return InvalidArgument("layer " + std::to_string(a.layer) + " out of range (session has " +
                           std::to_string(profile_.layers) + " layers)");
  }
  if (a.mode != SelectionMode::kDefault && a.mode != SelectionMode::kDense) {
    return Unimplemented("selection mode " + std::to_string(static_cast<int>(a.mode)) +
                         " is not available in this build (only dense)");
  }
  Layer& layer = layers_[a.layer];
  const uint32_t H = profile_.kv_heads, D = profile_.head_dim;
  const uint64_t row = uint64_t{D} * DTypeSize(profile_.dtype);

  if (a.new_k != nullptr) {
    if (layer.pending >= kMaxLayerSkew) {
      return FailedPrecondition("layer " + std::to_string(a.layer) + " is already " +
                                std::to_string(layer.pending) +
                                " tokens ahead of the slowest layer");
    }
    if (layer.tail_tokens >= tail_capacity_) {
      return ResourceExhausted("layer " + std::to_string(a.layer) +
                               " tail is full (chunks could not be sealed; KV pool full?)");
    }
    const uint64_t tail_v = layer.tail_block + uint64_t{H} * tail_capacity_ * row;
    for (uint32_t h = 0; h < H; ++h) {
      const uint64_t at = (uint64_t{h} * tail_capacity_ + layer.tail_tokens) * row;
      KVMEM_RETURN_IF_ERROR(
          pool_->CopyIn(layer.tail_block + at, static_cast<const uint8_t*>(a.new_k) + h * row, row));
      KVMEM_RETURN_IF_ERROR(
          pool_->CopyIn(tail_v + at, static_cast<const uint8_t*>(a.new_v) + h * row, row));
    }
    ++layer.tail_tokens;
    if (++layer.pending == 1) ++layers_ahead_;
    if (pending_boundaries_.size() < layer.pending) pending_boundaries_.push_back(a.boundary);
  }

  // Attention over this layer's chunks and tail, before sealing moves rows around.
  std::vector<kernels::KVSpan> spans = layer.chunk_spans;
  spans.push_back({ElemOffset(layer.tail_block), tail_capacity_, 0, layer.tail_tokens});
  kernels::AttendProblem p{};
  p.pool = pool_->base();
  p.kv_dtype = profile_.dtype;
  p.q_heads = profile_.q_heads;
  p.kv_heads = H;
  p.head_dim = D;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.q = a.q;
  p.q_dtype = a.q_dtype;
  p.spans = spans.data();
  p.head_span_begin = nullptr;
  p.num_spans = static_cast<uint32_t>(spans.size());
  p.out = a.out;
  p.out_dtype = a.out_dtype;
  p.lse = a.lse;
  KVMEM_RETURN_IF_ERROR(kernels::ValidateAttendProblem(p));
  if (!pool_->is_host()) return Unimplemented("attention on a device pool needs the CUDA backend");
  kernels::AttendCpu(&p, 1);
  if (info != nullptr) {
    info->tokens_attended.assign(H, static_cast<uint32_t>(layer_tokens(a.layer)));
  }

  // A token every layer now holds is complete: chunk it.
  Status seal_status;
  while (layers_ahead_ == profile_.layers) {
    layers_ahead_ = 0;
    for (Layer& l : layers_)
      if (--l.pending > 0) ++layers_ahead_;
    ++tokens_;
    const uint8_t b = pending_boundaries_.front();
    pending_boundaries_.pop_front();
    unsealed_boundaries_.push_back(b);
    index::Chunker trial = chunker_;
    std::vector<uint32_t> sealed;
    trial.Push(unsealed_boundaries_, &sealed);
    Status s = SealAndStore(sealed, 0, nullptr, nullptr);
    if (s.ok()) {
      chunker_ = std::move(trial);
      unsealed_boundaries_.clear();
    } else {
      // The tokens stay in the tail unchunked; their boundaries are re-fed next time.
      seal_status = s.WithContext("sealing a chunk");
    }
  }
  stat_tokens_ = tokens_;
  stat_tail_ = layers_[0].tail_tokens;
  TouchNow();
  return seal_status;
}

SessionStats Session::Stats() const {
  SessionStats s;
  s.tokens = stat_tokens_.load(std::memory_order_relaxed);
  s.chunks = stat_chunks_.load(std::memory_order_relaxed);
  s.tail_tokens = stat_tail_.load(std::memory_order_relaxed);
  s.bytes = stat_bytes_.load(std::memory_order_relaxed);
  s.created_unix_ms = created_ms_.load(std::memory_order_relaxed);
  s.last_used_unix_ms = last_used_ms_.load(std::memory_order_relaxed);
  return s;
}

double Session::mean_chunk_tokens() const {
  const uint64_t c = stat_chunks_.load(std::memory_order_relaxed);
  if (c == 0) return 0;
  const uint64_t sealed_tokens = stat_tokens_.load() - stat_tail_.load();
  return static_cast<double>(sealed_tokens) / static_cast<double>(c);
}

}  // namespace kvmem
