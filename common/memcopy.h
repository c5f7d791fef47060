// Bulk copies into memory that will not be read again soon (KV blocks being filled by an
// append). Non-temporal stores skip the read-for-ownership of every destination line, which
// doubles single-thread fill bandwidth into DRAM-resident pools (measured: 3.4 -> 7-8 GB/s for
// 4 KiB pieces scattered over 128 MiB on the 2-core dev VM).
#pragma once

#include <cstddef>

#include "common/dtype.h"

namespace kvmem {

// memcpy semantics (no overlap). Uses AVX2 streaming stores when the CPU has them and the copy
// is at least kStreamingMinBytes; ends with a store fence, so the data is visible to other
// threads once this returns (and they synchronise with this thread as usual).
inline constexpr size_t kStreamingMinBytes = 1024;
void StreamingCopy(void* dst, const void* src, size_t bytes);

// StreamingCopy of `bytes` of `dtype` elements that also reports whether any of them is NaN or
// Inf (the check rides on the loads the copy makes anyway). The copy is always complete.
bool StreamingCopyChecked(void* dst, const void* src, size_t bytes, DType dtype);

// The same without the closing store fence, for a batch of pieces: call StreamingFence() once
// after the last piece, before another thread may read them. A fence per piece serialises on
// draining the write-combining buffers: on the dev VM 8 KiB pieces (an append's rows of one head
// of one chunk) streamed at 5.6 GB/s fenced each, against 16 GB/s for the same MiB in one piece.
void StreamingCopyUnfenced(void* dst, const void* src, size_t bytes);
bool StreamingCopyCheckedUnfenced(void* dst, const void* src, size_t bytes, DType dtype);
void StreamingFence();

}  // namespace kvmem
