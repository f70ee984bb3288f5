// Return codes of the C ABIs of the CUDA kernels (csrc/cuda/*.cu) and their one message function. Plain C
// on purpose: included by nvcc and by the host compiler alike.
//
// A launcher returns 0 on success, a cudaError_t (> 0) as an int, or one of clipfast's own codes below
// (< 0, so they never collide with CUDA's).
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

enum {
  // A per-row table a kernel keeps in shared memory (token_keep: a row's scores, or its patch -> output
  // position map) does not fit in one thread block's shared memory on the current device.
  CLIPFAST_CUDA_ROW_TOO_LONG = -1
};

// The message of any code a clipfast CUDA launcher returns: cudaGetErrorString for CUDA's codes, the
// meaning of clipfast's own codes above (csrc/cuda/errors.cu).
const char* clipfast_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
