// C ABI of the feature-Gram CUDA kernels behind the Schur-complement kernel covariance
// (csrc/cuda/schur_covariance.cu). Plain C on purpose, like contrastive_cuda.h: the kernels are compiled
// by nvcc without any torch header, and the torch binding (csrc/cuda/schur_covariance_binding.cpp) is
// compiled by the host compiler and sees only these declarations.
//
// The binding drives these launchers over tiles of image rows x and text rows t (see the .cu file's opening
// comment):
//   forward:  phi_x, phi_t = features(tile);  S_tt += phi_t^T phi_t;  S_tx += phi_t^T phi_x;  S_xx += phi_x^T phi_x
//   backward: dphi_x = phi_x (G_xx + G_xx^T) + phi_t G_tx;  dphi_t = phi_t (G_tt + G_tt^T) + phi_x G_tx^T;
//             dz = chain rule through phi (row_cosine: one launch; rff: du launch, then du @ W^T).
//
// Common contract of every launcher:
//   - Typed inputs (z: (n, dim), CLIPFAST_F32/F16/BF16 of dtype_codes.h) are passed whole, with the first row r0 of
//     the tile; every fp32 buffer (phi, dphi, du, dz, matmul operands) is tile-local: row 0 is the tile's
//     first row. All matrices are row-major and contiguous; all pointers are device pointers on the
//     current CUDA device.
//   - Launches on `stream` (a cudaStream_t; NULL = legacy default stream), never synchronises, and returns
//     the cudaError_t of its launches as an int (0 = success; like any cudaGetLastError check it may also
//     report an earlier asynchronous error; clipfast_cuda_error_string of cuda_errors.h names it). Invalid
//     arguments (unknown dtype or covariance, negative sizes, a NULL pointer that will be dereferenced)
//     return cudaErrorInvalidValue without launching; a problem whose grid does not fit returns
//     cudaErrorInvalidConfiguration.
//   - Empty problems (no output element) launch nothing and return 0. 64-bit index math throughout.
//   - Deterministic: every output element is written by one thread in a fixed order (no atomics).
#pragma once
#include <stdint.h>

#include "clipfast/cuda_errors.h"  // clipfast_cuda_error_string: the message of a returned code
#include "clipfast/dtype_codes.h"  // CLIPFAST_F32 / F16 / BF16: the dtype codes of the embeddings

#ifdef __cplusplus
extern "C" {
#endif

// Covariances (clipfast/reference/schur_covariance.py) and the features phi their Gram sums are made of
// (F = number of features per row):
enum {
  CLIPFAST_SCHUR_COVARIANCE_COLUMN_COSINE = 0,  // phi(z) = z (columns normalised later)  F = dim
  CLIPFAST_SCHUR_COVARIANCE_ROW_COSINE = 1,     // phi(z) = z / max(||z||, 1e-12)         F = dim
  CLIPFAST_SCHUR_COVARIANCE_RFF = 2             // phi(z) = [cos(z W), sin(z W)] / sqrt(m) F = 2m, W: (dim, m)
};

// phi of the rows [r0, r0 + rows) of z (n, dim)                            phi: (rows, F) fp32, OVERWRITTEN.
// omegas (W: (dim, m), fp32) and m are read for CLIPFAST_SCHUR_COVARIANCE_RFF only (m > 0; omegas may be NULL
// otherwise, and when dim == 0: then u = 0 and phi = [1, 0] / sqrt(m)).
int clipfast_schur_covariance_features_cuda(const void* z, int dtype, int64_t r0, int64_t rows, int64_t dim,
                                            int covariance, const float* omegas, int64_t m, float* phi, void* stream);

// S (features x features) += A^T B, with A and B (rows, features) fp32.                  S: ACCUMULATED.
// rows == 0 leaves S unchanged. Each S element is one thread's fixed-order sum over the rows.
int clipfast_schur_covariance_gram_accumulate_cuda(const float* a, const float* b, int64_t rows, int64_t features,
                                                   float* s, void* stream);

// C (rows x cols) = A (rows x inner) @ op(B), plus the old C when accumulate != 0 (beta = 1), all fp32;
// op(B) = B (inner x cols) when transpose_b == 0, B^T with B stored (cols x inner) otherwise.
// inner == 0 gives C = 0 (or leaves C unchanged when accumulating).
int clipfast_schur_covariance_matmul_cuda(const float* a, const float* b, int transpose_b, int64_t rows, int64_t inner,
                                          int64_t cols, int accumulate, float* c, void* stream);

// Chain rule of the row_cosine features for the rows [r0, r0 + rows) of z (n, dim), with phi and dphi the
// tile's (rows, dim) features and their gradient:
//   dz = (dphi - phi <phi, dphi>) / ||z|| where ||z|| > 1e-12, dphi / 1e-12 otherwise.
//                                                                           dz: (rows, dim) fp32, OVERWRITTEN.
int clipfast_schur_covariance_row_cosine_grad_cuda(const void* z, int dtype, int64_t r0, int64_t rows, int64_t dim,
                                                   const float* phi, const float* dphi, float* dz, void* stream);

// First half of the RFF chain rule: du = (cos u * dphi[:, m:] - sin u * dphi[:, :m]) / sqrt(m), computed
// from the tile's features (cos u / sqrt(m) = phi[:, :m], sin u / sqrt(m) = phi[:, m:]) as
//   du = phi[:, :m] * dphi[:, m:] - phi[:, m:] * dphi[:, :m].                 du: (rows, m) fp32, OVERWRITTEN.
// phi, dphi: (rows, 2m). The second half is clipfast_schur_covariance_matmul_cuda(du, W, transpose_b = 1, ...)
// -> dz.
int clipfast_schur_covariance_rff_du_cuda(const float* phi, const float* dphi, int64_t rows, int64_t m, float* du,
                                          void* stream);

#ifdef __cplusplus
}
#endif
