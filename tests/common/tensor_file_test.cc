// TensorFile against files written by the reference writers (numpy.save, safetensors.numpy;
// tests/data/tensor_file/make_fixtures.py) and against hand-built malformed inputs.
#include "common/tensor_file.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "testing/seed.h"

namespace kvmem {
namespace {

std::string Fixture(const char* name) { return std::string(KVMEM_SOURCE_DIR) + "/tests/data/tensor_file/" + name; }

std::vector<float> GateWeights() {
  std::vector<float> w(12);
  for (int i = 0; i < 12; ++i) w[i] = (static_cast<float>(i) - 5.5f) / 2.f;
  return w;
}

std::vector<std::byte> Bytes(const std::string& s) {
  std::vector<std::byte> b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

// A safetensors file from a JSON header and a data region.
std::vector<std::byte> Safetensors(const std::string& header, const std::string& data) {
  std::string s(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(s.data(), &n, 8);
  return Bytes(s + header + data);
}

// A version-1 .npy file from a header dict literal and a data region.
std::vector<std::byte> Npy(const std::string& dict, const std::string& data) {
  std::string s = "\x93NUMPY";
  s += '\x01';
  s += '\x00';
  std::string h = dict + "\n";
  const uint16_t n = static_cast<uint16_t>(h.size());
  s.append(reinterpret_cast<const char*>(&n), 2);
  return Bytes(s + h + data);
}

TEST(TensorFile, ReadsSafetensorsFromTheReferenceWriter) {
  auto f = TensorFile::Open(Fixture("mixed.safetensors"));
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->format(), TensorFile::Format::kSafetensors);
  ASSERT_EQ(f->tensors().size(), 3u);
  EXPECT_EQ(f->metadata().at("model"), "fixture");

  auto mask = f->Find("retrieval_heads");
  ASSERT_TRUE(mask.ok());
  EXPECT_EQ((*mask)->dtype, FileDType::kU8);
  EXPECT_EQ((*mask)->shape, (std::vector<uint64_t>{2, 4}));
  EXPECT_EQ((*mask)->ToFloat(), (std::vector<float>{1, 0, 0, 1, 0, 1, 1, 0}));

  auto w = f->Find("gate.weight");
  ASSERT_TRUE(w.ok());
  EXPECT_EQ((*w)->dtype, FileDType::kF32);
  EXPECT_EQ((*w)->shape, (std::vector<uint64_t>{3, 4}));
  EXPECT_EQ((*w)->ToFloat(), GateWeights());

  auto half = f->Find("scale");
  ASSERT_TRUE(half.ok());
  EXPECT_EQ((*half)->dtype, FileDType::kF16);
  EXPECT_EQ((*half)->ToFloat(), (std::vector<float>{0.5f, -1.25f, 3.0f}));

  auto missing = f->Find("nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("'retrieval_heads'"), std::string::npos);
}

TEST(TensorFile, ReadsNpyFromTheReferenceWriter) {
  auto g = TensorFile::Open(Fixture("gate_f32.npy"));
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->format(), TensorFile::Format::kNpy);
  ASSERT_EQ(g->tensors().size(), 1u);
  const FileTensor& t = g->tensors()[0];
  EXPECT_EQ(t.shape, (std::vector<uint64_t>{3, 4}));
  EXPECT_EQ(t.ToFloat(), GateWeights());

  auto b = TensorFile::Open(Fixture("mask_bool.npy"));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->tensors()[0].dtype, FileDType::kBool);
  EXPECT_EQ(b->tensors()[0].ToFloat(), (std::vector<float>{1, 0, 0, 1, 0, 1, 1, 0}));

  auto i = TensorFile::Open(Fixture("ids_i64.npy"));
  ASSERT_TRUE(i.ok()) << i.status().ToString();
  EXPECT_EQ(i->tensors()[0].ToFloat(), (std::vector<float>{7.f, -3.f, 1099511627776.f}));

  auto s = TensorFile::Open(Fixture("scalar_f16.npy"));
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_TRUE(s->tensors()[0].shape.empty());
  EXPECT_EQ(s->tensors()[0].ToFloat(), (std::vector<float>{2.5f}));
}

TEST(TensorFile, RefusesFortranOrderWithAClearMessage) {
  auto f = TensorFile::Open(Fixture("fortran.npy"));
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(f.status().message().find("fortran_order"), std::string::npos);
  EXPECT_NE(f.status().message().find("fortran.npy"), std::string::npos);
}

TEST(TensorFile, ReadsBf16Safetensors) {
  // numpy has no bf16; hand-build one: 1.0, -2.0, 0.15625 exactly.
  std::string data;
  for (float v : {1.0f, -2.0f, 0.15625f}) {
    const uint16_t h = FloatToBF16(v);
    data.append(reinterpret_cast<const char*>(&h), 2);
  }
  auto f = TensorFile::Parse(Safetensors(R"({"k":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}})", data));
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->tensors()[0].ToFloat(), (std::vector<float>{1.0f, -2.0f, 0.15625f}));
}

TEST(TensorFile, MovingKeepsTensorViewsValid) {
  auto f = TensorFile::Open(Fixture("gate_f32.npy"));
  ASSERT_TRUE(f.ok());
  TensorFile moved = std::move(*f);
  EXPECT_EQ(moved.tensors()[0].ToFloat(), GateWeights());
}

struct BadCase {
  const char* name;
  std::vector<std::byte> bytes;
  const char* expect;  // substring of the error message
};

TEST(TensorFile, RejectsMalformedInputsNamingTheProblem) {
  const std::string f32x2(8, '\0');
  std::string over(8, '\0');
  const uint64_t n = 1000;
  std::memcpy(over.data(), &n, 8);
  const std::vector<std::byte> header_past_end = Bytes(over + "{}");
  std::vector<std::byte> npy_v9 = Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", f32x2);
  npy_v9[6] = std::byte{9};
  std::vector<BadCase> cases = {
      {"empty", {}, "no header"},
      {"header longer than file", header_past_end, "exceeds the file"},
      {"header not json", Safetensors("{nope", ""), "not a JSON object"},
      {"header is array", Safetensors("[1,2]", ""), "not a JSON object"},
      {"unknown dtype", Safetensors(R"({"t":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", f32x2), "unsupported dtype 'C64'"},
      {"offsets past end", Safetensors(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", f32x2), "outside the data region"},
      {"offsets reversed", Safetensors(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", f32x2), "outside the data region"},
      {"shape vs bytes", Safetensors(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", f32x2), "needs 12 bytes"},
      {"shape overflow", Safetensors(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", f32x2), "too many"},
      {"negative dim", Safetensors(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", f32x2), "non-negative"},
      {"missing offsets", Safetensors(R"({"t":{"dtype":"F32","shape":[2]}})", f32x2), "missing data_offsets"},
      {"overlap", Safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})", f32x2), "overlap"},
      {"bad metadata", Safetensors(R"({"__metadata__":{"a":1}})", ""), "not a string"},
      {"npy truncated", Bytes("\x93NUMPY\x01"), "truncated"},
      {"npy version", npy_v9, "version 9"},
      {"npy big endian", Npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", f32x2), "unsupported dtype '>f4'"},
      {"npy object", Npy("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", f32x2), "unsupported dtype"},
      {"npy short data", Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", f32x2), "needs 12 bytes"},
      {"npy missing key", Npy("{'descr': '<f4', 'shape': (2,), }", f32x2), "lacks"},
      {"npy unknown key", Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", f32x2), "unknown header key"},
      {"npy bad shape", Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (a,), }", f32x2), "not a number"},
      {"npy shape overflow", Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", f32x2), "overflows"},
      {"npy unterminated", Npy("{'descr': '<f4", f32x2), "unterminated"},
  };
  for (const auto& c : cases) {
    auto f = TensorFile::Parse(c.bytes, "case.bin");
    ASSERT_FALSE(f.ok()) << c.name;
    EXPECT_EQ(f.status().code(), StatusCode::kInvalidArgument) << c.name;
    EXPECT_NE(f.status().message().find(c.expect), std::string::npos) << c.name << ": " << f.status().message();
    EXPECT_NE(f.status().message().find("case.bin"), std::string::npos) << c.name;
  }
}

TEST(TensorFile, RandomCorruptionsNeverCrash) {
  const uint64_t seed = ::kvmem::testing::TestSeed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const std::string data(16, '\x01');
  const std::vector<std::vector<std::byte>> goods = {
      Safetensors(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", data),
      Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", data)};
  for (const auto& good : goods) {
    ASSERT_TRUE(TensorFile::Parse(good).ok());
    for (int i = 0; i < 2000; ++i) {
      std::vector<std::byte> img = good;
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) img[rng() % img.size()] = static_cast<std::byte>(rng());
      if (rng() % 4 == 0) img.resize(rng() % img.size());
      auto r = TensorFile::Parse(img);
      if (!r.ok()) continue;
      for (const auto& t : r->tensors()) {
        ASSERT_EQ(t.elements() * FileDTypeSize(t.dtype), t.data.size());
        ASSERT_LE(t.data.size(), img.size());
        (void)t.ToFloat();
      }
    }
  }
}

TEST(TensorFile, WriteThenReadRoundTrips) {
  const std::string path = ::testing::TempDir() + "/kvmem_tensor_file_rt.safetensors";
  const std::vector<float> w = GateWeights();
  const std::vector<float> u = {0.f, 7.f, 200.f, 300.f};
  ASSERT_TRUE(WriteSafetensors(path,
                               {{"w32", FileDType::kF32, {3, 4}, w.data()},
                                {"wbf", FileDType::kBF16, {12}, w.data()},
                                {"w16", FileDType::kF16, {2, 6}, w.data()},
                                {"u", FileDType::kU8, {4}, u.data()}},
                               {{"k", "v"}})
                  .ok());
  auto f = TensorFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  std::vector<uint64_t> shape;
  auto w32 = f->ReadFloat("w32", 2, &shape);
  ASSERT_TRUE(w32.ok());
  EXPECT_EQ(*w32, w);
  EXPECT_EQ(shape, (std::vector<uint64_t>{3, 4}));
  EXPECT_EQ(*f->ReadFloat("wbf"), w);  // halves and small integers are exact in bf16 / fp16
  EXPECT_EQ(*f->ReadFloat("w16"), w);
  EXPECT_EQ(*f->ReadFloat("u"), (std::vector<float>{0.f, 7.f, 200.f, 255.f}));
  EXPECT_EQ(f->metadata().at("k"), "v");
  EXPECT_EQ(f->ReadFloat("w32", 3).status().code(), StatusCode::kInvalidArgument);
  const float one = 1.f;
  EXPECT_EQ(WriteSafetensors(path, {{"x", FileDType::kI64, {1}, &one}}).code(), StatusCode::kInvalidArgument);
}

TEST(TensorFile, OpenReportsMissingFilesAndSizeLimit) {
  auto f = TensorFile::Open("/nonexistent/x.safetensors");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kNotFound);
  auto big = TensorFile::Open(Fixture("gate_f32.npy"), 16);
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("exceeds the limit"), std::string::npos);
}

}  // namespace
}  // namespace kvmem
