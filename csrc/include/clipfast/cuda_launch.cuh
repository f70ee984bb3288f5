// Launch helpers of the CUDA kernels: grid sizes for grid-stride kernels and the dynamic shared memory a
// per-row table needs (opting in above the default 48 KB where the device allows). CUDA headers only.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "clipfast/cuda_errors.h"

namespace clipfast {

constexpr int64_t kMaxBlocks = 1 << 20;             // grid-stride beyond
constexpr int64_t kDefaultSharedBytes = 48 * 1024;  // per block (static + dynamic) without opting in

inline unsigned int grid_size(int64_t tasks) {
  return static_cast<unsigned int>(tasks < kMaxBlocks ? tasks : kMaxBlocks);
}

// x: pieces of a batch row, y: batch rows (gridDim.y is at most 65535; kernels grid-stride over both).
inline dim3 grid_2d(int64_t pieces, int64_t batch) {
  return dim3(grid_size(pieces), static_cast<unsigned int>(batch < 65535 ? batch : 65535));
}

// Whether `bytes` of dynamic shared memory fit one block next to `static_bytes` (at least the kernel's static
// shared memory) on the current device. *opt_in: 0 when they fit under the default limit, else the dynamic
// limit the kernel must be given (cudaFuncAttributeMaxDynamicSharedMemorySize; always the same value on a
// device, so concurrent callers agree). Returns 0, CLIPFAST_CUDA_ROW_TOO_LONG, or the error of a device query.
inline int plan_shared(int64_t bytes, int64_t static_bytes, int* opt_in) {
  *opt_in = 0;
  if (bytes + static_bytes <= kDefaultSharedBytes) return 0;
  int device = 0, max_bytes = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error != cudaSuccess) return error;
  const int64_t limit = max_bytes - static_bytes;
  if (bytes > limit) return CLIPFAST_CUDA_ROW_TOO_LONG;
  *opt_in = static_cast<int>(limit);
  return 0;
}

template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, int opt_in) {
  if (opt_in == 0) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in);
}

}  // namespace clipfast
