#include "common/units.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvmem {
namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Splits "1.5GiB" into 1.5 and "gib". Fails on empty number or garbage.
Status SplitNumber(std::string_view text, double* number, std::string* suffix) {
  std::string s = Lower(text);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  size_t start = i;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == start) return InvalidArgument("expected a number in '" + std::string(text) + "'");
  char* end = nullptr;
  std::string num = s.substr(start, i - start);
  *number = std::strtod(num.c_str(), &end);
  if (end != num.c_str() + num.size() || !std::isfinite(*number) || *number < 0) {
    return InvalidArgument("bad number in '" + std::string(text) + "'");
  }
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  *suffix = s.substr(i);
  return Status::OK();
}

}  // namespace

Result<uint64_t> ParseBytes(std::string_view text) {
  double n = 0;
  std::string suf;
  KVMEM_RETURN_IF_ERROR(SplitNumber(text, &n, &suf));
  double mult = 0;
  if (suf.empty() || suf == "b") mult = 1;
  else if (suf == "k" || suf == "kb") mult = 1e3;
  else if (suf == "kib") mult = 1024.0;
  else if (suf == "m" || suf == "mb") mult = 1e6;
  else if (suf == "mib") mult = 1024.0 * 1024;
  else if (suf == "g" || suf == "gb") mult = 1e9;
  else if (suf == "gib") mult = 1024.0 * 1024 * 1024;
  else if (suf == "t" || suf == "tb") mult = 1e12;
  else if (suf == "tib") mult = 1024.0 * 1024 * 1024 * 1024;
  else return InvalidArgument("unknown size suffix '" + suf + "' in '" + std::string(text) + "'");
  const double v = n * mult;
  if (v > 1.8e19) return InvalidArgument("size too large: '" + std::string(text) + "'");
  return static_cast<uint64_t>(std::llround(v));
}

Result<uint64_t> ParseDurationMs(std::string_view text) {
  double n = 0;
  std::string suf;
  KVMEM_RETURN_IF_ERROR(SplitNumber(text, &n, &suf));
  double mult = 0;
  if (suf.empty() || suf == "s") mult = 1000;
  else if (suf == "ms") mult = 1;
  else if (suf == "m" || suf == "min") mult = 60e3;
  else if (suf == "h") mult = 3600e3;
  else if (suf == "d") mult = 86400e3;
  else return InvalidArgument("unknown duration suffix '" + suf + "' in '" + std::string(text) + "'");
  return static_cast<uint64_t>(std::llround(n * mult));
}

std::string FormatBytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0) std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  else std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[u]);
  return buf;
}

}  // namespace kvmem
