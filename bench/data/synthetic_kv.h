// Synthetic KV with the structure retrieval methods exploit or trip over. Shared by the CPU
// index benchmark and the GPU benchmarks (target kvmem_benchdata).
//
// What is modelled, per KV head:
//   - topic segments: the context is a sequence of segments (mean length mean_segment_tokens),
//     each about one of `topics` recurring topics; a key is its topic vector + a sentence
//     vector shared by the tokens of one sentence + per-token noise. Topic energy sits in the
//     low-frequency (slowly rotating) channel pairs, as semantic content does in RoPE models;
//   - a heavy attention sink at token 0 (large key along a direction every query shares);
//   - a few outlier channels: large, nearly constant key values (they inflate key norms and
//     make norm- or box-based bounds loose without carrying meaning);
//   - rotary-like position encoding: channel pair i of the key at position t is rotated by
//     t·θ_i, θ_i = rope_base^(−2i/D) (base 500000 as in Llama 3); topic and sentence content
//     lives in the slow upper half of the channels, noise everywhere. A query's content for a
//     target is rotated to the target's position (what q·R(t−T)k amounts to for a head that
//     attends to that span), so the same topic elsewhere matches only partly;
//   - boundary classes for the chunker: word boundaries, clause and sentence ends (sentences
//     are the coherent units), line breaks, and a section boundary at every segment end.
// Queries (GQA groups of Hq/Hkv heads per KV head) target 1–3 segments of the context: the
// group shares the target, each head adds its own noise.
//
// Every value is a pure function of (seed, head, position): any token range can be generated
// on its own, so 1M-token contexts can be summarised without holding their keys.
#pragma once

#include <cstdint>
#include <vector>

namespace kvmem::bench {

struct SyntheticKVOptions {
  // Context length in tokens. Default: 32768.
  uint64_t tokens = 32768;
  // KV heads / query heads (GQA group = q_heads / kv_heads) / head dim. Default: 2 / 8 / 128.
  uint32_t kv_heads = 2;
  uint32_t q_heads = 8;
  uint32_t head_dim = 128;
  // Mean topic segment length; lengths are uniform in [mean/4, 7·mean/4]. Default: 384.
  uint32_t mean_segment_tokens = 384;
  // Distinct topics (segments reuse them, so a query's topic occurs in several places). Default: 48.
  uint32_t topics = 48;
  // Mean sentence length (tokens sharing a sentence vector, ended by class 3). Default: 14.
  uint32_t mean_sentence_tokens = 14;
  // Norms of the topic vector, the sentence vector and the per-token noise. Default: 6 / 4 / 4.
  float topic_norm = 6.f;
  float sentence_norm = 4.f;
  float noise_norm = 4.f;
  // Norm of the sink key (token 0) along the shared sink direction. Default: 40.
  float sink_norm = 40.f;
  // Outlier channels and their magnitude. Default: 4 channels, 12.
  uint32_t outlier_channels = 4;
  float outlier_value = 12.f;
  // Rotary base. Default: 500000.
  float rope_base = 500000.f;
  // Query: weight on the target topic / target sentence (times their key norms), the logit
  // (before 1/sqrt(D)) on the sink, and noise norm per head. Default: 1.6 / 1.6 / 90 / 2.5.
  float query_topic_weight = 1.6f;
  float query_sentence_weight = 1.6f;
  float query_sink_dot = 90.f;
  float query_noise_norm = 2.5f;
  // Which KV heads share a query's targets. 0: every KV head draws its own (independent
  // heads). p > 0: heads h and h' with h ≡ h' (mod p) share them: a stack of layers laid out as
  // heads [layer][p], where a decode step needs the same content in every layer (the premise of
  // retrieval-head reuse, LycheeDecode). Default: 0.
  uint32_t query_target_period = 0;
  // With query_target_period > 0: share only the first (main) target; a head's other targets
  // are its own, so layers agree on the needle but not on everything. Default: false.
  bool query_share_main_target_only = false;
  // Default: 1.
  uint64_t seed = 1;
};

class SyntheticKV {
 public:
  explicit SyntheticKV(SyntheticKVOptions options);

  const SyntheticKVOptions& options() const { return o_; }

  // Keys / values of `head` for tokens [begin, end) into out[(end-begin)][head_dim].
  void Keys(uint32_t head, uint64_t begin, uint64_t end, float* out) const;
  void Values(uint32_t head, uint64_t begin, uint64_t end, float* out) const;
  // Boundary classes (0..5) of tokens [begin, end).
  void Boundaries(uint64_t begin, uint64_t end, uint8_t* out) const;
  // Query i (deterministic in i) at position tokens(): out[q_heads][head_dim]. Targets are
  // drawn from segments fully inside [min_token, max_token).
  void Query(uint64_t i, uint64_t min_token, uint64_t max_token, float* out) const;

 private:
  struct Segment {
    uint64_t begin;
    uint32_t topic;
  };
  uint32_t SegmentAt(uint64_t t) const;
  uint64_t SentenceId(uint64_t t) const;  // global id of t's sentence
  void Rotate(uint64_t position, float* v) const;

  SyntheticKVOptions o_;
  std::vector<Segment> segments_;               // sorted by begin
  std::vector<uint64_t> sentence_begin_;        // sorted starts of all sentences
  std::vector<std::vector<float>> topic_;       // [kv_heads * topics][D]
  std::vector<std::vector<float>> sink_dir_;    // [kv_heads][D] unit
  std::vector<float> inv_freq_;                 // [D/2]
};

}  // namespace kvmem::bench
