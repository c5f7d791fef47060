// CRC-32C (Castagnoli), the checksum on every stored chunk. Uses the SSE4.2 crc32 instruction
// when the CPU has it (about 20 GB/s per core), a table otherwise; both give the same value.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvmem {

// CRC-32C of data[0, n) continuing from `crc` (0 for a fresh checksum).
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);
// Copies n bytes src -> dst (not overlapping) and returns Crc32c(src, n, crc), reading src once.
uint32_t Crc32cCopy(void* dst, const void* src, size_t n, uint32_t crc = 0);

}  // namespace kvmem
