// C ABI of the CUDA kernels behind clipfast_C::token_merge_match, token_merge_reduce and
// token_merge_reduce_backward (csrc/cuda/token_merge.cu). Plain C on purpose, like token_keep_cuda.h: the kernels
// are compiled by nvcc without any torch header, and the torch binding (csrc/cuda/token_merge_binding.cpp) is
// compiled by the host compiler and sees only these declarations.
//
// Shapes (semantics: clipfast/reference/token_merge.py): metric (batch, n, channels); x (batch, n, dim);
// dest (batch, n) int64, every token's output row in [0, num_out); size (batch, n) fp32 or NULL (ones);
// merged (batch, num_out, dim); merged_size (batch, num_out) fp32.
//
// Common contract of every launcher:
//   - Token-like buffers hold elements of type CLIPFAST_F32/F16/BF16 (dtype_codes.h). Strides are in elements;
//     the last dimension is contiguous and the batch / row strides are any values >= 0; every other buffer is
//     row-major contiguous. Every pointer is a device pointer on the current CUDA device.
//   - Launches on `stream` (a cudaStream_t; NULL = legacy default stream), never synchronises, and returns 0
//     on success, the cudaError_t of its launches as an int, or CLIPFAST_CUDA_ROW_TOO_LONG (a row's tables do
//     not fit in shared memory). Invalid arguments return cudaErrorInvalidValue without launching.
//   - dest values are not checked on the device (that would need a host synchronisation): an entry outside
//     [0, num_out) is ignored (its token contributes nothing, its gradient row is zero), so no access leaves
//     the buffers; an output row without a source divides zero by zero (NaN).
//   - Empty problems launch nothing and return 0. 64-bit offsets into every buffer; token indices within a
//     row are 32-bit.
//   - Deterministic: no atomics; every reduction has a fixed shape and order.
#pragma once
#include <stdint.h>

#include "clipfast/cuda_errors.h"
#include "clipfast/dtype_codes.h"

#ifdef __cplusplus
extern "C" {
#endif

// dest (batch, n) int64, OVERWRITTEN: ToMe's bipartite soft matching with `merged` (= r', at least 1 and at
// most (n - num_prefix) / 2) tokens merged away and num_prefix protected tokens. metric: element (b, i, c) at
// metric[b * stride_batch + i * stride_row + c]. Cosines in fp32 (FMA units), ties to the lower index.
// Per row, n fp32 inverse norms and three (n + 1) / 2 tables live in shared memory.
int clipfast_token_merge_match_cuda(const void* metric, int dtype, int64_t batch, int64_t n, int64_t channels,
                                    int64_t stride_batch, int64_t stride_row, int64_t merged, int64_t num_prefix,
                                    int64_t* dest, void* stream);

// merged (batch, num_out, dim) contiguous and merged_size (batch, num_out), OVERWRITTEN: every output row the
// size-weighted mean of its sources (ascending, fp32 accumulation), rounded once to the tokens' dtype.
// x: element (b, i, d) at x[b * stride_batch + i * stride_row + d]. Per row, 3 n int32 live in shared memory.
int clipfast_token_merge_reduce_cuda(const void* x, int dtype, int64_t batch, int64_t n, int64_t dim,
                                     int64_t stride_batch, int64_t stride_row, const int64_t* dest, const float* size,
                                     int64_t num_out, void* merged, float* merged_size, void* stream);

// grad_x (batch, n, dim) contiguous, OVERWRITTEN: grad_x[b, i] = size[b, i] / merged_size[b, dest[b, i]] *
// grad_merged[b, dest[b, i]] (one fp32 product, rounded once). grad_merged: element (b, o, d) at
// grad_merged[b * stride_batch + o * stride_row + d].
int clipfast_token_merge_reduce_backward_cuda(const void* grad_merged, int dtype, int64_t batch, int64_t num_out,
                                              int64_t dim, int64_t stride_batch, int64_t stride_row,
                                              const int64_t* dest, int64_t n, const float* size,
                                              const float* merged_size, void* grad_x, void* stream);

#ifdef __cplusplus
}
#endif
