// Output buffers for kernels that write a large tensor once, in full: backed by transparent huge pages
// where the kernel allows it, so that first touching them costs one page fault per 2 MiB instead of one
// per 4 KiB. Why it matters: glibc serves allocations above its mmap threshold (32 MiB at most) with fresh
// mappings, so such a tensor is faulted in page by page on every call; a 38.7 MB token-gradient buffer
// spends ~10 ms of a ~12 ms backward in the kernel's fault handler on a 2-core VM. Not below glibc's
// threshold: a smaller buffer that glibc serves from its heap is faulted in fresh only after other work
// freed much memory, and there a huge-page fault can stall for direct compaction (a 14 MB buffer after
// CenterCLIP's procedure: 1.3-1.6 s on the first call, measured on the 2-core VM, where its 4 KiB faults
// cost 4-7 ms). Only the buffer returned here is advised (MADV_HUGEPAGE); the process's allocator
// settings are untouched. Smaller buffers, and platforms without madvise, get a plain at::empty.
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace clipfast {

inline at::Tensor empty_huge_page_backed(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t{2} << 20;
  constexpr size_t kThreshold = size_t{32} << 20;  // glibc's largest mmap threshold: below it memory is reused
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(options.dtype().toScalarType());
  if (options.device().is_cpu() && bytes >= kThreshold) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, rounded);
    if (data != nullptr) {
      madvise(data, rounded, MADV_HUGEPAGE);  // advisory: on failure the pages are simply small
      // Fault the pages in here, on one thread: when the kernel's worker threads took their first-touch
      // faults concurrently, one call in ten stalled for ~45 ms (2 threads, measured), never on one thread.
      for (size_t offset = 0; offset < rounded; offset += kHugePage) static_cast<volatile char*>(data)[offset] = 0;
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace clipfast
