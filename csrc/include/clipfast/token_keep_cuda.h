// C ABI of the CUDA kernels behind clipfast_C::token_keep_index, token_keep_gather and
// token_keep_gather_backward (csrc/cuda/token_keep.cu). Plain C on purpose, like token_medoids_cuda.h: the
// kernels are compiled by nvcc without any torch header, and the torch binding
// (csrc/cuda/token_keep_binding.cpp) is compiled by the host compiler and sees only these declarations.
//
// Shapes (semantics: clipfast/reference/token_keep.py): scores (batch, length); tokens (batch, prefix + length,
// dim); keep_index (batch, num_keep) int64, ascending and unique in [0, length); fuse_weights (batch, length)
// fp32; kept (batch, prefix + num_keep + fuse, dim), fuse = 1 with EViT's fused token, 0 without.
//
// Common contract of every launcher:
//   - Token-like buffers hold elements of type CLIPFAST_F32/F16/BF16 (dtype_codes.h). Strides are in
//     elements; tokens' features are contiguous (stride 1) and its batch / row strides are any values >= 0;
//     every other buffer is row-major contiguous. Every pointer is a device pointer on the current CUDA device.
//   - Launches on `stream` (a cudaStream_t; NULL = legacy default stream), never synchronises, and returns
//     0 on success, the cudaError_t of its launches as an int (like any cudaGetLastError check it may also
//     report an earlier asynchronous error), or CLIPFAST_CUDA_ROW_TOO_LONG of cuda_errors.h (a row's table
//     does not fit in shared memory); clipfast_cuda_error_string names every code. Invalid arguments
//     (unknown dtype, negative sizes or strides, num_keep or block out of range, a NULL pointer that will
//     be dereferenced) return cudaErrorInvalidValue without launching.
//   - keep_index values are not checked on the device (that would need a host synchronisation): an entry
//     outside [0, length) reads as a zero row and is otherwise ignored, so no access leaves the buffers;
//     repeated entries give unspecified (but in-bounds) results.
//   - Empty problems (no output element) launch nothing and return 0. 64-bit offsets into every buffer;
//     patch indices within a row are 32-bit (length < 2^31, and the shared-memory tables bound it further).
//   - Deterministic: no atomics; every reduction has a fixed shape and order.
#pragma once
#include <stdint.h>

#include "clipfast/cuda_errors.h"
#include "clipfast/dtype_codes.h"

#ifdef __cplusplus
extern "C" {
#endif

// keep_index (batch, num_keep) int64 ascending, OVERWRITTEN: the num_keep best patches (block == 1) or the
// patches of the num_keep / block^2 best block x block blocks of the (length / grid_width, grid_width) grid
// (block > 1; block sums added in row-major order within the block, in the scores' dtype), under the total
// order "larger first, NaN above +inf, -0.0 == +0.0, ties to the lower (block) index".
// scores: fp32 (double_scores == 0) or fp64 (double_scores == 1), element (b, i) at
// scores[b * stride_batch + i * stride_patch]. block > 1 needs grid_width > 0 dividing length, block dividing
// grid_width and length / grid_width, and block^2 dividing num_keep; grid_width is ignored when block == 1.
// Per row, length / block^2 scores (as fp32 / fp64 order keys) and as many flag bytes live in shared memory.
int clipfast_token_keep_index_cuda(const void* scores, int double_scores, int64_t batch, int64_t length,
                                   int64_t stride_batch, int64_t stride_patch, int64_t num_keep, int64_t grid_width,
                                   int64_t block, int64_t* keep_index, void* stream);

// kept (batch, prefix + num_keep + fuse, dim) contiguous, OVERWRITTEN: the prefix rows, the patch rows
// keep_index[b, :] in order and, when fuse == 1, the fused row: the sum over dropped i (a fixed-shape fp32
// reduction) of fuse_weights[b, i] * tokens[b, prefix + i], rounded once to the tokens' dtype.
// tokens: element (b, r, d) at tokens[b * token_stride_batch + r * token_stride_row + d].
// fuse_weights: read only when fuse == 1. With fusion, length int32 per row live in shared memory.
int clipfast_token_keep_gather_cuda(const void* tokens, int dtype, int64_t batch, int64_t prefix, int64_t length,
                                    int64_t dim, int64_t token_stride_batch, int64_t token_stride_row,
                                    const int64_t* keep_index, int64_t num_keep, int fuse, const float* fuse_weights,
                                    void* kept, void* stream);

// Backward of the gather. grad_kept (batch, prefix + num_keep + fuse, dim) contiguous, its last row
// grad_fused[b] when fuse == 1; grad_tokens (batch, prefix + length, dim) contiguous, OVERWRITTEN, every row
// written once: prefix rows copy grad_kept's, kept patch keep_index[b, j] gets grad_kept[b, prefix + j], a
// dropped patch i gets fuse_weights[b, i] * grad_fused[b] (one fp32 product, rounded once) with fusion and
// zeros without. grad_weights (batch, length) fp32, OVERWRITTEN with fusion (<tokens[b, prefix + i],
// grad_fused[b]> in fp32 for dropped i, 0 for kept i). Without fusion, tokens, fuse_weights and grad_weights
// are never touched (may be NULL). length int32 per row live in shared memory.
int clipfast_token_keep_gather_backward_cuda(const void* grad_kept, const void* tokens, int dtype, int64_t batch,
                                             int64_t prefix, int64_t length, int64_t dim, int64_t token_stride_batch,
                                             int64_t token_stride_row, const int64_t* keep_index, int64_t num_keep,
                                             int fuse, const float* fuse_weights, void* grad_tokens,
                                             float* grad_weights, void* stream);

#ifdef __cplusplus
}
#endif
