// Command-line helpers shared by the GPU benchmarks.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace kvmem::bench {

// "8192,32768,131072" -> {8192, 32768, 131072}; std::stoul throws on a malformed item.
inline std::vector<uint32_t> ParseList(const char* s) {
  std::vector<uint32_t> v;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) v.push_back(static_cast<uint32_t>(std::stoul(tok)));
  return v;
}

}  // namespace kvmem::bench
