#include "bench/data/synthetic_kv.h"

#include <algorithm>
#include <cmath>

namespace kvmem::bench {

namespace {

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A small counter-based stream: value n of stream `key` is SplitMix(key + n).
struct Stream {
  uint64_t key;
  uint64_t n = 0;
  explicit Stream(uint64_t k) : key(SplitMix(k)) {}
  uint64_t Next() { return SplitMix(key + 0x632be59bd9b4e019ull * ++n); }
  double Uniform() { return (Next() >> 11) * (1.0 / 9007199254740992.0); }
  // Approximately N(0,1): Irwin–Hall sum of four 16-bit uniforms, rescaled.
  float Normal() {
    const uint64_t r = Next();
    const double s = double(r & 0xffff) + double((r >> 16) & 0xffff) + double((r >> 32) & 0xffff) +
                     double(r >> 48);
    return static_cast<float>((s / 65536.0 - 2.0) * 1.7320508075688772);
  }
};

uint64_t Key(uint64_t seed, uint64_t salt, uint64_t a, uint64_t b = 0) {
  return SplitMix(SplitMix(seed * 0x100000001b3ull ^ salt) ^ (a * 0x9e3779b97f4a7c15ull)) ^
         (b * 0xd1b54a32d192ed03ull);
}

enum Salt : uint64_t {
  kSegments = 1, kTopic, kSentence, kNoise, kValue, kSink, kOutlier, kBoundary, kQuery, kTopicValue,
  kSentences,
};

// Fills v[lo, hi) with a random direction of the given norm (others untouched).
void AddRandomVector(Stream& s, float norm, uint32_t lo, uint32_t hi, float* v) {
  if (hi <= lo) return;
  const float scale = norm / std::sqrt(static_cast<float>(hi - lo));
  for (uint32_t d = lo; d < hi; ++d) v[d] += scale * s.Normal();
}

}  // namespace

SyntheticKV::SyntheticKV(SyntheticKVOptions options) : o_(options) {
  const uint32_t D = o_.head_dim;
  // Segments and, inside each, sentences.
  Stream seg(Key(o_.seed, kSegments, 0));
  Stream sen(Key(o_.seed, kSentences, 0));
  uint64_t t = 0;
  while (t < o_.tokens) {
    const uint64_t len = std::max<uint64_t>(
        8, static_cast<uint64_t>(o_.mean_segment_tokens * (0.25 + 1.5 * seg.Uniform())));
    segments_.push_back({t, static_cast<uint32_t>(seg.Next() % std::max(1u, o_.topics))});
    const uint64_t end = std::min<uint64_t>(o_.tokens, t + len);
    for (uint64_t s = t; s < end;) {
      sentence_begin_.push_back(s);
      s += std::max<uint64_t>(
          2, static_cast<uint64_t>(o_.mean_sentence_tokens * (0.5 + sen.Uniform())));
    }
    t = end;
  }
  topic_.resize(size_t{o_.kv_heads} * o_.topics);
  for (uint32_t h = 0; h < o_.kv_heads; ++h) {
    for (uint32_t z = 0; z < o_.topics; ++z) {
      Stream s(Key(o_.seed, kTopic, h, z));
      auto& v = topic_[size_t{h} * o_.topics + z];
      v.assign(D, 0.f);
      AddRandomVector(s, o_.topic_norm, D / 2, D, v.data());
    }
  }
  sink_dir_.resize(o_.kv_heads);
  for (uint32_t h = 0; h < o_.kv_heads; ++h) {
    Stream s(Key(o_.seed, kSink, h));
    auto& v = sink_dir_[h];
    v.assign(D, 0.f);
    AddRandomVector(s, 1.f, 0, D, v.data());
    float n = 0.f;
    for (float x : v) n += x * x;
    for (float& x : v) x /= std::sqrt(n);
  }
  inv_freq_.resize(D / 2);
  for (uint32_t i = 0; i < D / 2; ++i) {
    inv_freq_[i] = static_cast<float>(std::pow(double{o_.rope_base}, -2.0 * i / D));
  }
}

uint32_t SyntheticKV::SegmentAt(uint64_t t) const {
  auto it = std::upper_bound(segments_.begin(), segments_.end(), t,
                             [](uint64_t x, const Segment& s) { return x < s.begin; });
  return static_cast<uint32_t>(it - segments_.begin() - 1);
}

uint64_t SyntheticKV::SentenceId(uint64_t t) const {
  return static_cast<uint64_t>(
      std::upper_bound(sentence_begin_.begin(), sentence_begin_.end(), t) -
      sentence_begin_.begin() - 1);
}

void SyntheticKV::Rotate(uint64_t position, float* v) const {
  for (uint32_t i = 0; i < o_.head_dim / 2; ++i) {
    const double a = static_cast<double>(position) * inv_freq_[i];
    const float c = static_cast<float>(std::cos(a)), s = static_cast<float>(std::sin(a));
    const float x = v[2 * i], y = v[2 * i + 1];
    v[2 * i] = c * x - s * y;
    v[2 * i + 1] = s * x + c * y;
  }
}

void SyntheticKV::Keys(uint32_t head, uint64_t begin, uint64_t end, float* out) const {
  const uint32_t D = o_.head_dim;
  for (uint64_t t = begin; t < end; ++t) {
    float* k = out + (t - begin) * D;
    std::fill_n(k, D, 0.f);
    if (t == 0) {
      for (uint32_t d = 0; d < D; ++d) k[d] = o_.sink_norm * sink_dir_[head][d];
      continue;
    }
    const auto& topic = topic_[size_t{head} * o_.topics + segments_[SegmentAt(t)].topic];
    for (uint32_t d = 0; d < D; ++d) k[d] = topic[d];
    Stream sent(Key(o_.seed, kSentence, head, SentenceId(t)));
    AddRandomVector(sent, o_.sentence_norm, D / 2, D, k);
    Stream noise(Key(o_.seed, kNoise, head, t));
    AddRandomVector(noise, o_.noise_norm, 0, D, k);
    for (uint32_t c = 0; c < o_.outlier_channels && c < D; ++c) {
      const uint32_t ch = D - 1 - 2 * c;  // slowest-rotating pairs
      const float sign = (Key(o_.seed, kOutlier, head, c) & 1) ? 1.f : -1.f;
      k[ch] += sign * o_.outlier_value;
    }
    Rotate(t, k);
  }
}

void SyntheticKV::Values(uint32_t head, uint64_t begin, uint64_t end, float* out) const {
  const uint32_t D = o_.head_dim;
  for (uint64_t t = begin; t < end; ++t) {
    float* v = out + (t - begin) * D;
    std::fill_n(v, D, 0.f);
    Stream tv(Key(o_.seed, kTopicValue, head, t == 0 ? ~0ull : segments_[SegmentAt(t)].topic));
    AddRandomVector(tv, 4.f, 0, D, v);
    Stream noise(Key(o_.seed, kValue, head, t));
    AddRandomVector(noise, 4.f, 0, D, v);
  }
}

void SyntheticKV::Boundaries(uint64_t begin, uint64_t end, uint8_t* out) const {
  for (uint64_t t = begin; t < end; ++t) {
    uint8_t c;
    const uint32_t seg = SegmentAt(t);
    const uint64_t seg_end = seg + 1 < segments_.size() ? segments_[seg + 1].begin : o_.tokens;
    const uint64_t sid = SentenceId(t);
    const uint64_t sent_end =
        sid + 1 < sentence_begin_.size() ? sentence_begin_[sid + 1] : o_.tokens;
    const uint64_t h = Key(o_.seed, kBoundary, t);
    if (t + 1 == seg_end) {
      c = 5;
    } else if (t + 1 == sent_end) {
      c = (h % 5 == 0) ? 4 : 3;  // some sentences end a line
    } else if (h % 100 < 8) {
      c = 2;
    } else if (h % 100 < 80) {
      c = 1;
    } else {
      c = 0;
    }
    out[t - begin] = c;
  }
}

void SyntheticKV::Query(uint64_t i, uint64_t min_token, uint64_t max_token, float* out) const {
  const uint32_t D = o_.head_dim;
  const uint32_t G = o_.q_heads / o_.kv_heads;
  Stream s(Key(o_.seed, kQuery, i));
  // Segments entirely inside [min_token, max_token).
  std::vector<uint32_t> eligible;
  for (uint32_t j = 0; j < segments_.size(); ++j) {
    const uint64_t e = j + 1 < segments_.size() ? segments_[j + 1].begin : o_.tokens;
    if (segments_[j].begin >= min_token && e <= max_token) eligible.push_back(j);
  }
  // Targets (segment, token) per head: drawn in head order from one stream (independent
  // heads), or per target group (query_target_period) from the group's own stream.
  struct Target {
    uint32_t seg;
    uint64_t t;
  };
  auto draw = [&](Stream& st, bool main_only) {
    std::vector<Target> out;
    const uint32_t n = main_only ? 1 : 1 + static_cast<uint32_t>(st.Next() % 3);
    for (uint32_t j = 0; j < n && !eligible.empty(); ++j) {
      const uint32_t seg = eligible[st.Next() % eligible.size()];
      const uint64_t b = segments_[seg].begin;
      const uint64_t e = seg + 1 < segments_.size() ? segments_[seg + 1].begin : o_.tokens;
      out.push_back({seg, b + st.Next() % (e - b)});  // a token; its sentence is the needle
    }
    return out;
  };
  std::vector<float> base(D);
  for (uint32_t h = 0; h < o_.kv_heads; ++h) {
    std::fill(base.begin(), base.end(), 0.f);
    std::vector<Target> targets;
    if (o_.query_target_period == 0) {
      targets = draw(s, false);
    } else {
      Stream group(Key(o_.seed, kQuery, i, 500000 + h % o_.query_target_period));
      targets = draw(group, o_.query_share_main_target_only);
      if (o_.query_share_main_target_only) {
        Stream own(Key(o_.seed, kQuery, i, 600000 + h));
        std::vector<Target> more = draw(own, false);
        if (!more.empty()) more.erase(more.begin());  // the head's own extra targets
        targets.insert(targets.end(), more.begin(), more.end());
      }
    }
    for (uint32_t j = 0; j < targets.size(); ++j) {
      const uint32_t seg = targets[j].seg;
      const uint64_t t = targets[j].t;
      const float w = j == 0 ? 1.f : 0.75f;
      std::vector<float> a(D, 0.f);
      const auto& topic = topic_[size_t{h} * o_.topics + segments_[seg].topic];
      for (uint32_t d = 0; d < D; ++d) a[d] = o_.query_topic_weight * topic[d];
      std::vector<float> sent(D, 0.f);
      Stream ss(Key(o_.seed, kSentence, h, SentenceId(t)));
      AddRandomVector(ss, o_.sentence_norm, D / 2, D, sent.data());
      for (uint32_t d = 0; d < D; ++d) a[d] += o_.query_sentence_weight * sent[d];
      Rotate(t, a.data());
      for (uint32_t d = 0; d < D; ++d) base[d] += w * a[d];
    }
    const float sink_w = o_.query_sink_dot / std::max(1e-6f, o_.sink_norm);
    for (uint32_t d = 0; d < D; ++d) base[d] += sink_w * sink_dir_[h][d];
    for (uint32_t g = 0; g < G; ++g) {
      float* q = out + (size_t{h} * G + g) * D;
      std::copy(base.begin(), base.end(), q);
      Stream noise(Key(o_.seed, kQuery, i, 1000 + h * G + g));
      AddRandomVector(noise, o_.query_noise_norm, 0, D, q);
    }
  }
}

}  // namespace kvmem::bench
