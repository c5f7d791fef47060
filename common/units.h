// Human-readable sizes and durations in config and flags: "64MiB", "8GiB", "1500", "30s".
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace kvmem {

// Accepts a plain byte count or a number with a suffix: K/KB (1000), KiB (1024), M/MB, MiB,
// G/GB, GiB, T/TB, TiB; case-insensitive; fractions allowed ("1.5GiB").
Result<uint64_t> ParseBytes(std::string_view text);

// Accepts "250ms", "30s", "5m", "2h", "1d" or a plain number of seconds.
Result<uint64_t> ParseDurationMs(std::string_view text);

// 1536 -> "1.5 KiB".
std::string FormatBytes(uint64_t bytes);

}  // namespace kvmem
