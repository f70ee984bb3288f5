// CUDA kernels of token merging (ToMe, arXiv:2210.09461; contract in clipfast/reference/token_merge.py).
// Shapes: metric (B, N, C); x (B, N, D); size (B, N) fp32 or none; dest (B, N) int64; N' = num_out rows.
// A = tokens at even positions (num_a = ceil(N / 2)), B = odd positions (num_b = floor(N / 2)); the first
// ceil(P / 2) A and floor(P / 2) B tokens are the P protected prefix tokens.
//
//   match:    the cosine of every A x B pair, every non-prefix A token's best non-prefix B partner (ties to
//             the lower B), the A tokens ranked by a stable descending sort of their best scores, the first
//             r' merged into their partners, and every token's output row in ToMe's order.
//   reduce:   merged[o] = sum_{dest_i = o} size_i x_i / merged_size[o], merged_size[o] = sum_{dest_i = o} size_i
//   backward: grad_x[i] = size_i / merged_size[dest_i] * grad_merged[dest_i]
//
// Algorithm (driven by csrc/cuda/token_merge_binding.cpp, one launcher per op):
//   - match_kernel: one block of 256 threads per batch row (grid-stride beyond). Warps compute the inverse
//     norms (one token per warp, lanes over C, a fixed xor-shuffle tree), then the best partner of each A
//     token (one A token per warp, the B tokens in ascending order, a strict > keeping the lower B on ties),
//     into shared memory; each thread ranks A tokens, rank_a = #{a' : best_a' > best_a} + #{a' < a :
//     best_a' = best_a} (O(num_a^2), shared-memory broadcasts). Kept A tokens behind a prefix take rows in
//     position order: thread 0 walks the A tokens once (num_a steps; a ViT has a few hundred). fp32 on FMA
//     units: ToMe's matching is a (N/2 x N/2 x C) product per row, small next to the token traffic.
//   - reduce_kernel: grid (pieces of 32 output rows, batch rows). Each block builds its batch row's sources
//     per output row (a CSR, ascending) in shared memory: source counts by one thread per output row,
//     an exclusive prefix sum, and each token's slot = offsets[dest_i] + #{i' < i : dest_i' = dest_i}. Then
//     one warp per output row, lanes over D, adds size_i x_i over the row's sources in ascending order and
//     divides by the summed sizes: every output element written once, in fp32, no atomics.
//   - backward_kernel: grid (pieces of 32 rows, batch rows), one warp per input row: a scaled copy of the
//     output row it went to.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "clipfast/cuda_elements.cuh"
#include "clipfast/cuda_launch.cuh"
#include "clipfast/token_merge_cuda.h"

namespace {

using clipfast::allow_shared;
using clipfast::dispatch_dtype;
using clipfast::from_float;
using clipfast::grid_2d;
using clipfast::grid_size;
using clipfast::plan_shared;
using clipfast::to_float;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 4;    // register cap 64 (without a minimum, ptxas 13.0 spills at 40 on sm_80)
constexpr int kRowsPerBlock = 32;  // reduce / backward: rows per block (4 per warp)
constexpr float kMetricNormEps = 1e-12f;

// The sum over the warp's lanes by a fixed xor-butterfly: every lane gets the same, reproducible value.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Output row of B token j: a prefix token keeps its position, the others follow the kept A tokens.
__device__ __forceinline__ int64_t b_row(int j, int prefix_b, int num_prefix, int kept_a) {
  return j < prefix_b ? 2 * j + 1 : num_prefix + kept_a + (j - prefix_b);
}

// ---------------------------------------------------------------------------------------------------
// Match
// ---------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) match_kernel(const T* __restrict__ metric, int64_t batch, int n,
                                                         int channels, int64_t stride_batch, int64_t stride_row,
                                                         int merged, int num_prefix, int64_t* __restrict__ dest) {
  extern __shared__ float tables[];
  const int num_a = (n + 1) / 2, num_b = n / 2;
  const int prefix_a = (num_prefix + 1) / 2, prefix_b = num_prefix / 2;
  const int kept_a = num_a - prefix_a - merged;
  float* inv_norm = tables;         // n
  float* best = inv_norm + n;       // num_a
  int* partner = reinterpret_cast<int*>(best + num_a);  // num_a
  int* rank = partner + num_a;      // num_a
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const T* m = metric + b * stride_batch;
    for (int i = warp; i < n; i += kWarps) {
      const T* row = m + i * stride_row;
      float squares = 0.f;
      for (int c = lane; c < channels; c += 32) {
        const float v = to_float(row[c]);
        squares = fmaf(v, v, squares);
      }
      squares = warp_sum(squares);
      if (lane == 0) inv_norm[i] = 1.f / fmaxf(sqrtf(squares), kMetricNormEps);
    }
    __syncthreads();
    for (int a = warp; a < num_a; a += kWarps) {
      float top = -INFINITY;
      int arg = 0;
      if (a >= prefix_a) {  // a protected source keeps -inf: it ranks last and is never merged
        const T* row_a = m + (2 * a) * stride_row;
        for (int j = prefix_b; j < num_b; ++j) {
          const T* row_b = m + (2 * j + 1) * stride_row;
          float dot = 0.f;
          for (int c = lane; c < channels; c += 32) dot = fmaf(to_float(row_a[c]), to_float(row_b[c]), dot);
          const float score = warp_sum(dot) * inv_norm[2 * a] * inv_norm[2 * j + 1];
          if (j == prefix_b || score > top) {
            top = score;
            arg = j;
          }
        }
      }
      if (lane == 0) {
        best[a] = top;
        partner[a] = arg;
      }
    }
    __syncthreads();
    for (int a = threadIdx.x; a < num_a; a += kThreads) {
      const float mine = best[a];
      int ahead = 0;
      for (int k = 0; k < num_a; ++k) ahead += (best[k] > mine) || (best[k] == mine && k < a);
      rank[a] = ahead;
    }
    __syncthreads();
    int64_t* d = dest + b * n;
    for (int j = threadIdx.x; j < num_b; j += kThreads) d[2 * j + 1] = b_row(j, prefix_b, num_prefix, kept_a);
    if (num_prefix == 0) {  // ToMe without a prefix keeps the A tokens in the sorted order
      for (int a = threadIdx.x; a < num_a; a += kThreads)
        d[2 * a] = rank[a] < merged ? b_row(partner[a], prefix_b, num_prefix, kept_a) : rank[a] - merged;
    } else if (threadIdx.x == 0) {  // ... and behind a prefix in position order
      int next = num_prefix;
      for (int a = 0; a < num_a; ++a)
        d[2 * a] = a < prefix_a ? 2 * a : rank[a] < merged ? b_row(partner[a], prefix_b, num_prefix, kept_a) : next++;
    }
    __syncthreads();  // the tables are rebuilt for the next batch row
  }
}

// ---------------------------------------------------------------------------------------------------
// Reduce and backward
// ---------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) reduce_kernel(const T* __restrict__ x, int64_t batch, int n, int dim,
                                                          int64_t stride_batch, int64_t stride_row,
                                                          const int64_t* __restrict__ dest,
                                                          const float* __restrict__ size, int num_out,
                                                          T* __restrict__ merged, float* __restrict__ merged_size) {
  extern __shared__ int csr[];
  int* row_of = csr;                 // n: dest, -1 where out of range
  int* offsets = row_of + n;         // num_out + 1
  int* sources = offsets + num_out + 1;  // n
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int64_t o = dest[b * n + i];
      row_of[i] = o >= 0 && o < num_out ? static_cast<int>(o) : -1;
    }
    __syncthreads();
    for (int o = threadIdx.x; o < num_out; o += kThreads) {
      int count = 0;
      for (int i = 0; i < n; ++i) count += row_of[i] == o;
      offsets[o + 1] = count;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      offsets[0] = 0;
      for (int o = 0; o < num_out; ++o) offsets[o + 1] += offsets[o];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int o = row_of[i];
      if (o < 0) continue;
      int earlier = 0;
      for (int k = 0; k < i; ++k) earlier += row_of[k] == o;
      sources[offsets[o] + earlier] = i;
    }
    __syncthreads();
    const float* s = size == nullptr ? nullptr : size + b * n;
    for (int64_t piece = blockIdx.x; piece * kRowsPerBlock < num_out; piece += gridDim.x) {
      const int end = static_cast<int>(min(static_cast<int64_t>(num_out), (piece + 1) * kRowsPerBlock));
      for (int o = static_cast<int>(piece * kRowsPerBlock) + warp; o < end; o += kWarps) {
        const int first = offsets[o], last = offsets[o + 1];
        float total = 0.f;
        for (int k = first; k < last; ++k) total += s == nullptr ? 1.f : s[sources[k]];
        T* out = merged + (b * num_out + o) * dim;
        for (int col = lane; col < dim; col += 32) {
          float acc = 0.f;
          for (int k = first; k < last; ++k) {
            const int i = sources[k];
            acc += (s == nullptr ? 1.f : s[i]) * to_float(x[b * stride_batch + i * stride_row + col]);
          }
          out[col] = from_float<T>(acc / total);
        }
        if (lane == 0) merged_size[b * num_out + o] = total;
      }
    }
    __syncthreads();  // the tables are rebuilt for the next batch row
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) backward_kernel(const T* __restrict__ grad, int64_t batch, int num_out,
                                                            int dim, int64_t stride_batch, int64_t stride_row,
                                                            const int64_t* __restrict__ dest, int n,
                                                            const float* __restrict__ size,
                                                            const float* __restrict__ merged_size,
                                                            T* __restrict__ grad_x) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int64_t piece = blockIdx.x; piece * kRowsPerBlock < n; piece += gridDim.x) {
      const int end = static_cast<int>(min(static_cast<int64_t>(n), (piece + 1) * kRowsPerBlock));
      for (int i = static_cast<int>(piece * kRowsPerBlock) + warp; i < end; i += kWarps) {
        const int64_t o = dest[b * n + i];
        const bool ok = o >= 0 && o < num_out;
        const float w = ok ? (size == nullptr ? 1.f : size[b * n + i]) / merged_size[b * num_out + o] : 0.f;
        const T* g = grad + b * stride_batch + (ok ? o : 0) * stride_row;
        T* out = grad_x + (b * n + i) * dim;
        for (int col = lane; col < dim; col += 32) out[col] = from_float<T>(ok ? to_float(g[col]) * w : 0.f);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------

bool valid_dtype(int dtype) { return dtype == CLIPFAST_F32 || dtype == CLIPFAST_F16 || dtype == CLIPFAST_BF16; }

int run_match(const void* metric, int dtype, int64_t batch, int64_t n, int64_t channels, int64_t stride_batch,
              int64_t stride_row, int64_t merged, int64_t num_prefix, int64_t* dest, cudaStream_t stream) {
  if (!valid_dtype(dtype) || batch < 0 || n < 0 || n > 0x7fffffff || channels < 0 || channels > 0x7fffffff ||
      stride_batch < 0 || stride_row < 0 || num_prefix < 0 || num_prefix > n || merged < 1 ||
      merged > (n - num_prefix) / 2)
    return cudaErrorInvalidValue;
  if (batch == 0) return 0;
  if (metric == nullptr || dest == nullptr) return cudaErrorInvalidValue;
  const int64_t bytes = (n + 3 * ((n + 1) / 2)) * static_cast<int64_t>(sizeof(float));
  int opt_in = 0;
  const int planned = plan_shared(bytes, 0, &opt_in);
  if (planned != 0) return planned;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const cudaError_t error = allow_shared(match_kernel<T>, opt_in);
    if (error != cudaSuccess) return error;
    match_kernel<T><<<grid_size(batch), kThreads, static_cast<size_t>(bytes), stream>>>(
        static_cast<const T*>(metric), batch, static_cast<int>(n), static_cast<int>(channels), stride_batch,
        stride_row, static_cast<int>(merged), static_cast<int>(num_prefix), dest);
    return cudaGetLastError();
  });
}

int run_reduce(const void* x, int dtype, int64_t batch, int64_t n, int64_t dim, int64_t stride_batch,
               int64_t stride_row, const int64_t* dest, const float* size, int64_t num_out, void* merged,
               float* merged_size, cudaStream_t stream) {
  if (!valid_dtype(dtype) || batch < 0 || n < 0 || n > 0x7fffffff || dim < 0 || dim > 0x7fffffff ||
      stride_batch < 0 || stride_row < 0 || num_out < 0 || num_out > n)
    return cudaErrorInvalidValue;
  if (batch == 0 || num_out == 0) return 0;
  if (x == nullptr || dest == nullptr || merged == nullptr || merged_size == nullptr) return cudaErrorInvalidValue;
  const int64_t bytes = (2 * n + num_out + 1) * static_cast<int64_t>(sizeof(int));
  int opt_in = 0;
  const int planned = plan_shared(bytes, 0, &opt_in);
  if (planned != 0) return planned;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const cudaError_t error = allow_shared(reduce_kernel<T>, opt_in);
    if (error != cudaSuccess) return error;
    reduce_kernel<T><<<grid_2d((num_out + kRowsPerBlock - 1) / kRowsPerBlock, batch), kThreads,
                       static_cast<size_t>(bytes), stream>>>(
        static_cast<const T*>(x), batch, static_cast<int>(n), static_cast<int>(dim), stride_batch, stride_row, dest,
        size, static_cast<int>(num_out), static_cast<T*>(merged), merged_size);
    return cudaGetLastError();
  });
}

int run_backward(const void* grad, int dtype, int64_t batch, int64_t num_out, int64_t dim, int64_t stride_batch,
                 int64_t stride_row, const int64_t* dest, int64_t n, const float* size, const float* merged_size,
                 void* grad_x, cudaStream_t stream) {
  if (!valid_dtype(dtype) || batch < 0 || n < 0 || n > 0x7fffffff || dim < 0 || dim > 0x7fffffff ||
      stride_batch < 0 || stride_row < 0 || num_out < 0 || num_out > n)
    return cudaErrorInvalidValue;
  if (batch == 0 || n == 0 || dim == 0) return 0;
  if (grad == nullptr || dest == nullptr || merged_size == nullptr || grad_x == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    backward_kernel<T><<<grid_2d((n + kRowsPerBlock - 1) / kRowsPerBlock, batch), kThreads, 0, stream>>>(
        static_cast<const T*>(grad), batch, static_cast<int>(num_out), static_cast<int>(dim), stride_batch,
        stride_row, dest, static_cast<int>(n), size, merged_size, static_cast<T*>(grad_x));
    return cudaGetLastError();
  });
}

}  // namespace

extern "C" {

int clipfast_token_merge_match_cuda(const void* metric, int dtype, int64_t batch, int64_t n, int64_t channels,
                                    int64_t stride_batch, int64_t stride_row, int64_t merged, int64_t num_prefix,
                                    int64_t* dest, void* stream) {
  return run_match(metric, dtype, batch, n, channels, stride_batch, stride_row, merged, num_prefix, dest,
                   static_cast<cudaStream_t>(stream));
}

int clipfast_token_merge_reduce_cuda(const void* x, int dtype, int64_t batch, int64_t n, int64_t dim,
                                     int64_t stride_batch, int64_t stride_row, const int64_t* dest, const float* size,
                                     int64_t num_out, void* merged, float* merged_size, void* stream) {
  return run_reduce(x, dtype, batch, n, dim, stride_batch, stride_row, dest, size, num_out, merged, merged_size,
                    static_cast<cudaStream_t>(stream));
}

int clipfast_token_merge_reduce_backward_cuda(const void* grad_merged, int dtype, int64_t batch, int64_t num_out,
                                              int64_t dim, int64_t stride_batch, int64_t stride_row,
                                              const int64_t* dest, int64_t n, const float* size,
                                              const float* merged_size, void* grad_x, void* stream) {
  return run_backward(grad_merged, dtype, batch, num_out, dim, stride_batch, stride_row, dest, n, size, merged_size,
                      grad_x, static_cast<cudaStream_t>(stream));
}

}  // extern "C"
