// The append store's copy on one thread: 1 MiB of bf16 rows per call into a rotating 128 MiB
// destination (a KV pool being filled: cold lines), whole and in 8 KiB pieces (an append's
// per-chunk, per-head rows), memcpy + HasNonFinite (two passes, ordinary stores) against
// StreamingCopyChecked (one pass, non-temporal stores) with a store fence per piece (stream/piece)
// and with one per call (stream/call: the Unfenced forms + StreamingFence, as KVPool::CopyBatch
// does). Also into one hot 1 MiB buffer. Mode 0 = memcpy+check, 1 = fenced pieces, 2 = one fence.
//
//   build/bin/kvmem-bench-memcopy [--reps N]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "common/dtype.h"
#include "common/memcopy.h"

namespace {

using kvmem::DType;

// A page-aligned byte buffer (as the pool's blocks are; a std::vector of 128 MiB starts 16 bytes
// into a page, and 8 KiB pieces at that offset share a line with their neighbour, which a
// streaming copy pays for at every piece).
struct Buffer {
  explicit Buffer(size_t n) : n_(n), p_(static_cast<uint8_t*>(std::aligned_alloc(4096, n))) { std::memset(p_, 0, n); }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  uint8_t* data() { return p_; }
  const uint8_t* data() const { return p_; }
  size_t size() const { return n_; }
  size_t n_;
  uint8_t* p_;
};

double Run(int mode, size_t piece, bool cold, int reps, const Buffer& src, Buffer& region, Buffer& hot,
           size_t shift, bool* sink) {
  const size_t bytes = src.size();
  const size_t slots = region.size() / bytes - 1;
  auto once = [&](int i) {
    uint8_t* d = (cold ? region.data() + (static_cast<size_t>(i) % slots) * bytes : hot.data()) + shift;
    bool bad = false;
    for (size_t o = 0; o < bytes; o += piece) {
      const size_t n = std::min(piece, bytes - o);
      if (mode == 1) {
        bad |= kvmem::StreamingCopyChecked(d + o, src.data() + o, n, DType::kBF16);
      } else if (mode == 2) {
        bad |= kvmem::StreamingCopyCheckedUnfenced(d + o, src.data() + o, n, DType::kBF16);
      } else {
        bad |= kvmem::HasNonFinite(src.data() + o, DType::kBF16, n / 2);
        std::memcpy(d + o, src.data() + o, n);
      }
    }
    if (mode == 2) kvmem::StreamingFence();
    *sink ^= bad;
  };
  for (int i = 0; i < 64; ++i) once(i);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) once(i);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(bytes) * reps / s / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 1024, trials = 5;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    if (std::string(argv[i]) == "--trials" && i + 1 < argc) trials = std::atoi(argv[++i]);
  }
  Buffer src(1u << 20);
  std::mt19937 rng(1);
  std::normal_distribution<float> g;
  for (size_t i = 0; i < src.size() / 2; ++i) kvmem::StoreFromFloat(src.data(), DType::kBF16, i, g(rng));
  Buffer region(128u << 20), hot(src.size() + 4096);
  bool sink = false;
  std::printf("1 MiB bf16 per call, GB/s, best of %d trials x %d calls (one thread)\n", trials, reps);
  std::printf("%-12s %-9s %10s %12s %12s\n", "destination", "pieces", "memcpy+chk", "stream/piece",
              "stream/call");
  // shift 16: the destination 16 bytes past a line (pieces straddle lines).
  for (size_t shift : {size_t{0}, size_t{16}}) {
    for (bool cold : {true, false}) {
      for (size_t piece : {size_t{1} << 20, size_t{8} << 10, size_t{4} << 10}) {
        double best[3] = {0, 0, 0};
        for (int t = 0; t < trials; ++t) {
          for (int m = 0; m < 3; ++m) {
            best[m] = std::max(best[m], Run(m, piece, cold, reps, src, region, hot, shift, &sink));
          }
        }
        std::printf("%-12s %-9s %10.2f %12.2f %12.2f\n", (std::string(cold ? "128MiB-rot" : "hot-1MiB") + (shift ? "+16" : "")).c_str(),
                    (std::to_string(piece >> 10) + "KiB").c_str(), best[0], best[1], best[2]);
      }
    }
  }
  return sink ? 1 : 0;
}
