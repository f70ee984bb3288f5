// C ABI of the CUDA kernels behind clipfast_C::token_medoids_index (csrc/cuda/token_medoids.cu). Plain C on
// purpose, like schur_covariance_cuda.h: the kernels are compiled by nvcc without any torch header, and the
// torch binding (csrc/cuda/token_medoids_binding.cpp) is compiled by the host compiler and sees only these
// declarations.
//
// The binding drives two launchers over tiles of whole chunks of rows (see the .cu file's opening comment):
//   1. clipfast_token_medoids_distances_cuda: the (rows, n, n) fp32 distance matrices of the tile;
//   2. clipfast_token_medoids_cuda: KKZ initialisation, k-medoids iterations (per row, or per chunk of
//      split_size rows), ascending sort and final assignment, straight into the int64 outputs.
//
// Common contract of every launcher:
//   - x: (rows, n, dim) row-major contiguous, element type CLIPFAST_F32/F16/BF16 of dtype_codes.h; every
//     pointer is a device pointer on the current CUDA device; every buffer is tile-local (row 0 is the
//     tile's first row).
//   - Launches on `stream` (a cudaStream_t; NULL = legacy default stream), never synchronises, and returns
//     the cudaError_t of its launches as an int (0 = success; like any cudaGetLastError check it may also
//     report an earlier asynchronous error; clipfast_cuda_error_string of cuda_errors.h names it). Invalid
//     arguments (unknown dtype or metric, negative sizes, k outside [1, n] when n > 0, n >= 2^31, a NULL
//     pointer that will be dereferenced) return cudaErrorInvalidValue without launching; a grid that does
//     not fit returns cudaErrorInvalidConfiguration.
//   - Empty problems (no output element) launch nothing and return 0. 64-bit index math throughout.
//   - Deterministic: no atomics; every reduction has a fixed shape and order, ties go to the lowest index.
#pragma once
#include <stdint.h>

#include "clipfast/cuda_errors.h"
#include "clipfast/dtype_codes.h"

#ifdef __cplusplus
extern "C" {
#endif

// distance metrics
enum {
  CLIPFAST_MEDOIDS_EUCLIDEAN = 0,  // D[i][j] = ||x_i - x_j||_2 (direct differences; D[i][i] = 0 exactly)
  CLIPFAST_MEDOIDS_COSINE = 1      // D[i][j] = 1 - <x_i, x_j> / (max(||x_i||, 1e-8) * max(||x_j||, 1e-8))
};

// D[r][i][j] for every row r of x (rows, n, dim), fp32.             distances: (rows, n, n) fp32, OVERWRITTEN.
// Bitwise symmetric (each pair is computed once and written to both halves).
int clipfast_token_medoids_distances_cuda(const void* x, int dtype, int64_t rows, int64_t n, int64_t dim, int metric,
                                          float* distances, void* stream);

// Number of int32 elements of the workspace clipfast_token_medoids_cuda needs (8-byte aligned, as from any
// allocator): rows * (2 n + round_up_to_even(k + n)) (fp64 costs, medoids, assignment); -1 when the
// arguments are invalid.
int64_t clipfast_token_medoids_workspace_elements(int64_t rows, int64_t n, int64_t k);

// k-medoids of every row from its distance matrix (clipfast_token_medoids_distances_cuda) and x (for the
// raw-norm argmax that seeds KKZ). split_size == 0: every row converges on its own; split_size = s > 0:
// consecutive chunks of s rows (counted from this call's row 0; the last one may be shorter) iterate
// together until no row of the chunk changed (or max_iters iterations).
//   medoid_index: (rows, k) int64, ascending, OVERWRITTEN;  assignment: (rows, n) int64 (index into the
//   sorted medoids), OVERWRITTEN;  workspace: clipfast_token_medoids_workspace_elements(rows, n, k) int32.
int clipfast_token_medoids_cuda(const float* distances, const void* x, int dtype, int64_t rows, int64_t n,
                                int64_t dim, int64_t k, int64_t max_iters, int64_t split_size, int64_t* medoid_index,
                                int64_t* assignment, int32_t* workspace, void* stream);

#ifdef __cplusplus
}
#endif
