// Retrieval-head mask files: both JSON forms, and errors that name the file and the entry.
#include "common/head_mask.h"

#include "common/tensor_file.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

namespace kvmem {
namespace {

TEST(HeadMask, RowsAndObjectForms) {
  auto m = ParseHeadMaskJson("[[0, 1, 0], [1, 0, 0]]", "x.json");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->layers, 2u);
  EXPECT_EQ(m->kv_heads, 3u);
  EXPECT_EQ(m->mask, (std::vector<uint8_t>{0, 1, 0, 1, 0, 0}));
  EXPECT_FALSE(m->dense_layers.has_value());
  m = ParseHeadMaskJson(R"({"retrieval_heads": [[true, false], [false, true]], "dense_layers": [0]})", "x");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->mask, (std::vector<uint8_t>{1, 0, 0, 1}));
  ASSERT_TRUE(m->dense_layers.has_value());
  EXPECT_EQ(*m->dense_layers, (std::vector<uint32_t>{0}));
  EXPECT_TRUE(CheckHeadMaskShape(*m, 2, 2, "x").ok());
  Status st = CheckHeadMaskShape(*m, 3, 2, "x.json");
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("mask is 2 x 2, the profile has 3 layers x 2 KV heads"), std::string::npos);
}

TEST(HeadMask, ErrorsNameTheProblem) {
  auto expect = [](const std::string& text, const std::string& needle) {
    auto m = ParseHeadMaskJson(text, "heads.json");
    ASSERT_FALSE(m.ok()) << text;
    EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(m.status().message().find(needle), std::string::npos) << m.status().ToString();
    EXPECT_NE(m.status().message().find("heads.json"), std::string::npos);
  };
  expect("[[0, 1], [1]]", "layer 1 has 1 entries");
  expect("[[0, 2]]", "entry [0][1] must be 0 or 1");
  expect("[[0, 0.5]]", "entry [0][1]");
  expect("[]", "non-empty list");
  expect("{\"heads\": [[1]]}", "unknown key 'heads'");
  expect("{\"dense_layers\": [0]}", "no retrieval_heads");
  expect("[[1]", "not valid JSON");
  expect(R"({"retrieval_heads": [[1]], "dense_layers": [-1]})", "dense_layers");
}

TEST(HeadMask, Files) {
  const std::string path = ::testing::TempDir() + "/kvmem_head_mask_test.json";
  {
    std::ofstream f(path);
    f << "[[1, 0], [0, 1]]";
  }
  auto m = LoadHeadMaskFile(path);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->mask, (std::vector<uint8_t>{1, 0, 0, 1}));
  std::remove(path.c_str());
  EXPECT_EQ(LoadHeadMaskFile(path).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(LoadHeadMaskFile("/tmp/heads.bin").status().code(), StatusCode::kUnimplemented);
}

// Fixtures written by numpy / safetensors themselves (tests/data/tensor_file/make_fixtures.py).
TEST(HeadMask, SafetensorsAndNpyFromTheReferenceWriters) {
  const std::string dir = std::string(KVMEM_SOURCE_DIR) + "/tests/data/tensor_file/";
  const std::vector<uint8_t> want = {1, 0, 0, 1, 0, 1, 1, 0};
  auto st = LoadHeadMaskFile(dir + "mixed.safetensors");  // "retrieval_heads" among others
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->layers, 2u);
  EXPECT_EQ(st->kv_heads, 4u);
  EXPECT_EQ(st->mask, want);
  auto npy = LoadHeadMaskFile(dir + "mask_bool.npy");
  ASSERT_TRUE(npy.ok()) << npy.status().ToString();
  EXPECT_EQ(npy->mask, want);
  // A float array that is not a mask is refused, naming the entry.
  auto gate = LoadHeadMaskFile(dir + "gate_f32.npy");
  EXPECT_EQ(gate.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(gate.status().message().find("must be 0 or 1"), std::string::npos) << gate.status().ToString();
}

TEST(HeadMask, SafetensorsWithDenseLayers) {
  const std::string path = ::testing::TempDir() + "/kvmem_head_mask_test.safetensors";
  const std::vector<float> mask = {0, 1, 1, 0, 0, 0}, dense = {0};
  ASSERT_TRUE(WriteSafetensors(path, {{"retrieval_heads", FileDType::kU8, {3, 2}, mask.data()},
                                      {"dense_layers", FileDType::kF32, {1}, dense.data()}})
                  .ok());
  auto m = LoadHeadMaskFile(path);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->layers, 3u);
  EXPECT_EQ(m->mask, (std::vector<uint8_t>{0, 1, 1, 0, 0, 0}));
  ASSERT_TRUE(m->dense_layers.has_value());
  EXPECT_EQ(*m->dense_layers, (std::vector<uint32_t>{0}));
  const std::vector<float> flat = {1, 0, 1};
  ASSERT_TRUE(WriteSafetensors(path, {{"retrieval_heads", FileDType::kU8, {3}, flat.data()}}).ok());
  EXPECT_EQ(LoadHeadMaskFile(path).status().code(), StatusCode::kInvalidArgument);  // rank 1
  std::remove(path.c_str());
}

}  // namespace
}  // namespace kvmem
