// The short git commit of the working tree a benchmark runs in ("unknown" outside git), for the
// "commit" field of every bench/results JSON.
#pragma once

#include <cstdio>
#include <string>

namespace kvmem::bench {

inline std::string GitCommit() {
  std::string out;
  if (FILE* p = popen("git rev-parse --short HEAD 2>/dev/null", "r")) {
    char buf[64];
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out.empty() ? "unknown" : out;
}

}  // namespace kvmem::bench
