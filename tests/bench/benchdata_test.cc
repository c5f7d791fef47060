// kvmem_benchdata: the safetensors reader rejects malformed files without crashing; the
// synthetic generator is deterministic and random-access.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/data/safetensors.h"
#include "bench/data/synthetic_kv.h"
#include "common/dtype.h"

namespace kvmem::bench {
namespace {

std::vector<uint8_t> Image(const std::string& header, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> out(8);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

TEST(SafetensorsTest, ReadsEveryDType) {
  std::vector<uint8_t> data;
  const float f[3] = {1.5f, -2.f, 0.25f};
  data.insert(data.end(), reinterpret_cast<const uint8_t*>(f), reinterpret_cast<const uint8_t*>(f) + 12);
  for (float x : f) {
    uint16_t h = FloatToBF16(x);
    data.push_back(h & 0xff);
    data.push_back(h >> 8);
  }
  for (float x : f) {
    uint16_t h = FloatToF16(x);
    data.push_back(h & 0xff);
    data.push_back(h >> 8);
  }
  data.push_back(7);
  data.push_back(200);
  const std::string hdr =
      R"({"__metadata__":{"a":"b"},"f":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
      R"("b":{"dtype":"BF16","shape":[1,3],"data_offsets":[12,18]},)"
      R"("h":{"dtype":"F16","shape":[3,1],"data_offsets":[18,24]},)"
      R"("u":{"dtype":"U8","shape":[2],"data_offsets":[24,26]}})";
  auto file = SafetensorsFile::Parse(Image(hdr, data));
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  for (const char* name : {"f", "b", "h"}) {
    std::vector<uint64_t> shape;
    auto v = file->ReadFloat(name, 0, &shape);
    ASSERT_TRUE(v.ok()) << name;
    EXPECT_EQ(*v, (std::vector<float>{1.5f, -2.f, 0.25f})) << name;
  }
  auto u = file->ReadFloat("u", 1, nullptr);
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(*u, (std::vector<float>{7.f, 200.f}));
  EXPECT_EQ(file->ReadFloat("f", 2, nullptr).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(file->ReadFloat("zz", 0, nullptr).status().code(), StatusCode::kNotFound);
}

TEST(SafetensorsTest, RejectsMalformedHeaders) {
  const std::vector<uint8_t> data(16, 0);
  const char* bad[] = {
      "not json",
      "[1,2]",
      R"({"t":1})",
      R"({"t":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}})",
      R"({"t":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}})",
      R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,17]}})",
      R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[8,4]}})",
      R"({"t":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})",
      R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0]}})",
      R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})",
      R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"u":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      R"({"t":{"dtype":7,"shape":[4],"data_offsets":[0,16]}})",
      R"({"t":{"dtype":"F32","shape":"4","data_offsets":[0,16]}})",
      R"({"t":{"dtype":"F32","shape":[4],"data_offsets":["0",16]}})",
  };
  for (const char* h : bad) {
    EXPECT_FALSE(SafetensorsFile::Parse(Image(h, data)).ok()) << h;
  }
  EXPECT_FALSE(SafetensorsFile::Parse({1, 2, 3}).ok());
  std::vector<uint8_t> huge = Image("{}", {});
  huge[7] = 0x7f;  // header length far past the end
  EXPECT_FALSE(SafetensorsFile::Parse(huge).ok());
  EXPECT_FALSE(SafetensorsFile::Open("/nonexistent/file.safetensors").ok());
}

TEST(SafetensorsTest, RandomBytesNeverCrash) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const std::string hdr = R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  const std::vector<uint8_t> good = Image(hdr, std::vector<uint8_t>(16, 1));
  ASSERT_TRUE(SafetensorsFile::Parse(good).ok());
  for (int i = 0; i < 2000; ++i) {
    std::vector<uint8_t> img = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) img[rng() % img.size()] = static_cast<uint8_t>(rng());
    if (rng() % 4 == 0) img.resize(rng() % img.size());
    auto r = SafetensorsFile::Parse(img);
    if (r.ok()) {
      for (const auto& t : r->tensors()) (void)r->ReadFloat(t.name, 0, nullptr);
    }
  }
}

TEST(SyntheticKVTest, DeterministicAndRandomAccess) {
  SyntheticKVOptions o;
  o.tokens = 3000;
  o.head_dim = 32;
  SyntheticKV a(o), b(o);
  std::vector<float> all(3000 * 32), part(500 * 32);
  a.Keys(1, 0, 3000, all.data());
  b.Keys(1, 1200, 1700, part.data());
  EXPECT_EQ(0, std::memcmp(&all[1200 * 32], part.data(), part.size() * 4));
  std::vector<uint8_t> c1(3000), c2(100);
  a.Boundaries(0, 3000, c1.data());
  b.Boundaries(2900, 3000, c2.data());
  EXPECT_EQ(0, std::memcmp(&c1[2900], c2.data(), 100));
  int sections = 0;
  for (uint8_t c : c1) {
    EXPECT_LE(c, 5);
    sections += c == 5;
  }
  EXPECT_GT(sections, 2);
  std::vector<float> q1(8 * 32), q2(8 * 32);
  a.Query(3, 16, 2800, q1.data());
  b.Query(3, 16, 2800, q2.data());
  EXPECT_EQ(q1, q2);
  // The sink dominates: token 0 has the largest key norm.
  float n0 = 0, nmax = 0;
  for (int d = 0; d < 32; ++d) n0 += all[d] * all[d];
  for (int t = 1; t < 3000; ++t) {
    float n = 0;
    for (int d = 0; d < 32; ++d) n += all[t * 32 + d] * all[t * 32 + d];
    nmax = std::max(nmax, n);
  }
  EXPECT_GT(n0, nmax);
}

}  // namespace
}  // namespace kvmem::bench
