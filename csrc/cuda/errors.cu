// The message of every code the C ABIs of the CUDA kernels return (csrc/include/clipfast/cuda_errors.h).
// One function for all launchers, compiled by nvcc with the kernels so that the torch bindings need no
// CUDA runtime header.
#include <cuda_runtime.h>

#include "clipfast/cuda_errors.h"

extern "C" const char* clipfast_cuda_error_string(int code) {
  if (code == CLIPFAST_CUDA_ROW_TOO_LONG)
    return "a row's table (scores or patch map) does not fit in the shared memory of one thread block on this device";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
