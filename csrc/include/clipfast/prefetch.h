// Software prefetch of a whole row for the CPU kernels whose reads jump from row to row (gathers, merges): the
// hardware prefetcher follows sequential streams and stalls at the start of every scattered row, so the
// kernels fetch the next row while they work on the current one.
#pragma once
#include <cstdint>

namespace clipfast {

inline void prefetch_row(const void* row, int64_t bytes) {
  constexpr int64_t kCacheLine = 64;
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += kCacheLine) __builtin_prefetch(p + offset);
}

}  // namespace clipfast
