// C ABI of the fused contrastive-loss CUDA kernels (csrc/cuda/contrastive.cu). Plain C on purpose: the
// kernels are compiled by nvcc without any torch header, and the torch binding
// (csrc/cuda/contrastive_binding.cpp) is compiled by the host compiler and sees only these declarations.
//
// Common contract of every launcher:
//   - x: (rows, dim) and y: (cols, dim), row-major contiguous, same dtype (CLIPFAST_F32/F16/BF16), no
//     alignment requirement beyond the element type's. S_ij = scale * <x_i, y_j>, accumulated in fp32.
//   - A gradient is grad_x = G @ V for a value matrix V: (cols, value_dim) of x's dtype, row j at
//     V + j * value_stride elements (column stride 1, value_stride >= 0), same alignment rule; grad_x is
//     (rows, value_dim), row-major contiguous.
//   - scale, bias, lse vectors and outputs are fp32 device pointers on the current CUDA device.
//   - Launches on `stream` (a cudaStream_t; NULL = legacy default stream), never synchronises, and returns
//     the cudaError_t of its launches as an int (0 = success; like any cudaGetLastError check it may also
//     report an earlier asynchronous error; clipfast_cuda_error_string of cuda_errors.h names it). Invalid
//     arguments (unknown dtype, negative sizes or stride, a NULL pointer that will be dereferenced; x, y,
//     values and grad_x may be NULL when they hold no element) return cudaErrorInvalidValue without
//     launching anything.
//   - rows == 0 launches nothing and returns 0. cols == 0 is valid: sums over zero columns (lse = -inf,
//     softplus sum = 0, gradients = 0) are written without reading x, y or values. dim == 0 is valid
//     (S = 0), and so is value_dim == 0 (grad_x holds no element).
//   - Deterministic: every output element is written by one thread in a fixed order (no atomics).
#pragma once
#include <stdint.h>

#include "clipfast/cuda_errors.h"  // clipfast_cuda_error_string: the message of a returned code
#include "clipfast/dtype_codes.h"  // CLIPFAST_F32 / F16 / BF16: the dtype codes of the feature matrices

#ifdef __cplusplus
extern "C" {
#endif

// lse[i] = log sum_j exp(S_ij)                                                          lse: (rows,)
int clipfast_contrastive_lse_cuda(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                                  const float* scale, float* lse, void* stream);

// G_ij = own_weight * exp(S_ij - own_lse[i]) + other_weight * exp(S_ij - other_lse[j]);
// grad_x = G @ values, values: (cols, value_dim)                   grad_x: (rows, value_dim), OVERWRITTEN.
// values is y (value_dim = value_stride = dim) for the loss's own gradient; distillation passes a
// student's features of the same columns (any width) to contract a teacher's softmax (x, y) with them.
// Each term is skipped when its lse pointer is NULL or its weight is 0, so own_lse may be NULL when
// own_weight == 0 and other_lse may be NULL when other_weight == 0 (both skipped: grad_x = 0). This lets
// one launcher serve both directions: grad_y = G^T @ x_values is the same call with x/y, own/other swapped
// and the row side's values (rows of x) as values.
int clipfast_contrastive_grad_cuda(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                                   const void* values, int64_t value_dim, int64_t value_stride, const float* scale,
                                   const float* own_lse, const float* other_lse, float own_weight,
                                   float other_weight, float* grad_x, void* stream);

// row_sum[i] = sum_j softplus(S_ij + bias), softplus(z) = max(z, 0) + log1p(exp(-|z|))        row_sum: (rows,)
int clipfast_siglip_softplus_cuda(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                                  const float* scale, const float* bias, float* row_sum, void* stream);

// G_ij = sigmoid(S_ij + bias); grad_x = G @ y (rows, dim), OVERWRITTEN (the value matrix is y itself);
// grad_row_sum[i] = sum_j G_ij (rows,), skipped when grad_row_sum is NULL.
int clipfast_siglip_grad_cuda(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                              const float* scale, const float* bias, float* grad_x, float* grad_row_sum, void* stream);

#ifdef __cplusplus
}
#endif
