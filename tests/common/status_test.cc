#include "common/status.h"

#include <gtest/gtest.h>

namespace kvmem {
namespace {

Result<int> Half(int x) {
  if (x % 2) return InvalidArgument("odd: " + std::to_string(x));
  return x / 2;
}

Status Quarter(int x, int* out) {
  KVMEM_ASSIGN_OR_RETURN(int h, Half(x));
  KVMEM_ASSIGN_OR_RETURN(*out, Half(h));
  return Status::OK();
}

TEST(Status, OkAndError) {
  EXPECT_TRUE(Status::OK().ok());
  Status s = NotFound("session 7");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_EQ(s.ToString(), "NOT_FOUND: session 7");
  EXPECT_EQ(s.WithContext("drop").message(), "drop: session 7");
  EXPECT_EQ(Status(StatusCode::kOk, "ignored").message(), "");
}

TEST(Status, ResultAndMacros) {
  int out = 0;
  EXPECT_TRUE(Quarter(12, &out).ok());
  EXPECT_EQ(out, 3);
  Status s = Quarter(6, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "odd: 3");
  Result<int> r = Status::OK();  // misuse is turned into an error, never a fake value
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
}

TEST(Status, CodeNamesAreDistinct) {
  std::set<std::string_view> names;
  for (int c = 0; c <= 17; ++c) names.insert(StatusCodeName(static_cast<StatusCode>(c)));
  EXPECT_EQ(names.size(), 18u);
}

}  // namespace
}  // namespace kvmem
