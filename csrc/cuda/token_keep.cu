// CUDA kernels of attentive token removal (A-CLIP arXiv:2212.08653, EViT arXiv:2202.07800; contract in
// clipfast/reference/token_keep.py). Shapes: scores (B, L); tokens (B, P + L, D) (P prefix tokens, then L
// patches); keep_index (B, K) int64 ascending; fuse_weights w (B, L) fp32.
//
//   index:    the n candidates of a row (the L patches, or with block = b > 1 the L / b^2 blocks of the
//             (L / grid_width, grid_width) grid, a block's score being the sum of its b^2 patch scores added
//             in row-major order in the scores' dtype) ranked by the total order "larger first, NaN above
//             +inf, -0.0 == +0.0, ties to the lower index"; the count = K (or K / b^2) best are kept and
//             their patches emitted in ascending order.
//   gather:   kept[b] = [tokens[b, :P], tokens[b, P + keep_index[b, j]] for j < K (, fused[b])],
//             fused[b] = sum over dropped i of w[b, i] * tokens[b, P + i]   (fp32 accumulation)
//   backward: with g[b] = grad_kept[b, P + K] (the fused row's gradient, fusion only)
//             grad_tokens[b, r] = grad_kept[b, r] for r < P, grad_kept[b, P + j] at row P + keep_index[b, j],
//             w[b, i] * g[b] at dropped rows with fusion, else 0;
//             grad_w[b, i] = <tokens[b, P + i], g[b]> for dropped i, 0 for kept i   (fp32).
//
// Algorithm (driven by csrc/cuda/token_keep_binding.cpp, one launcher per op):
//   - index_kernel: one block of 256 threads per batch row (grid-stride beyond). The candidates' scores
//     become integer order keys in shared memory (larger key = ranks first; every NaN gets the largest key,
//     -0.0 the key of +0.0), so the total order is a plain unsigned comparison. Thread t ranks candidates
//     t, t + 256, ...: rank_c = #{j: key_j > key_c} + #{j < c: key_j == key_c} (O(n^2) per row, every read
//     a shared-memory broadcast); the ranks are a permutation of [0, n), so exactly count candidates have
//     rank < count and are flagged kept. Then thread t takes a contiguous run of patches, counts its kept
//     ones (a patch is kept when its candidate is), and a block-wide exclusive prefix sum of the counts
//     gives each run its first output position: the patches come out ascending with no sort, and a kept
//     block's b^2 patches land interleaved with the other kept blocks' patches of the same grid rows.
//   - The gather and backward kernels run on 2-D grids, x over the pieces of a batch row and y over the
//     batch rows (both grid-strided), so a block builds its per-row table once per batch row and no 64-bit
//     division splits a task index. Rows move as 16-byte packs (single elements when the rows are not
//     16-byte aligned), one warp per row.
//   - gather_rows_kernel: one warp per output row (prefix and kept rows), from the strided tokens.
//   - fused_row_kernel: piece = 32 packs of columns (one per lane); warp w sums the dropped patches
//     i = w (mod 8) in ascending order, kFuseUnroll loads in flight, and warp 0 adds the 8 partial sums in
//     warp order: a fixed reduction shape, hence bitwise reproducible. Dropped patches are read from a
//     patch -> output position map built in shared memory from keep_index (-1 = dropped).
//   - backward_kernel: piece = kRowsPerBlock rows of grad_tokens; the block builds the same map, and each
//     row is written exactly once by its warp: a copy of the grad_kept row it came from, zeros, or w * g
//     with the dot product <x, g> reduced over the warp by a fixed shuffle tree. No zero fill, no scatter,
//     no atomics.
// Cost: index O(B * n^2) comparisons in shared memory; gather and backward read and write each row once
// (the fused row reads the dropped rows once more; its backward reads them for grad_w).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "clipfast/cuda_elements.cuh"
#include "clipfast/cuda_launch.cuh"
#include "clipfast/token_keep_cuda.h"

namespace {

using clipfast::allow_shared;
using clipfast::dispatch_dtype;
using clipfast::from_float;
using clipfast::grid_2d;
using clipfast::grid_size;
using clipfast::kDefaultSharedBytes;
using clipfast::to_float;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 4;          // register cap 64 (without a minimum, ptxas 13.0 spills at 32 on sm_90)
constexpr int kRowsPerBlock = 32;        // backward: grad_tokens rows per block (4 per warp)
constexpr int kFuseUnroll = 4;           // fused row: patch rows loaded per warp before accumulating
constexpr int kMaxPack = 8;              // elements of a 16-byte pack (16-bit types)
constexpr int64_t kStaticSharedBound = 16 * 1024;   // at least the static shared memory of any kernel here
static_assert(sizeof(float) * kWarps * kMaxPack * 32 <= kStaticSharedBound, "fused_row_kernel's partial sums");

__device__ __forceinline__ int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }

// V consecutive elements moved as one load / store: `bits` for copies (a 16-byte pack is one vector
// access), `v` for arithmetic. The bit pattern 0 is +0.0 in every element type.
template <int kBytes>
struct BitsOf;
template <>
struct BitsOf<2> {
  using type = unsigned short;
};
template <>
struct BitsOf<4> {
  using type = unsigned int;
};
template <>
struct BitsOf<16> {
  using type = uint4;
};

template <typename T, int V>
union Pack {
  using Bits = typename BitsOf<sizeof(T) * V>::type;
  Bits bits;
  T v[V];
};

template <typename T>
constexpr int kWidePack = 16 / static_cast<int>(sizeof(T));

// ---------------------------------------------------------------------------------------------------
// Index
// ---------------------------------------------------------------------------------------------------

// Order keys: the unsigned order of the keys is the selection order of the values (see the opening comment).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t bits = v == 0.f ? 0u : __float_as_uint(v);
  const uint32_t key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return v != v ? 0xffffffffu : key;
}

__device__ __forceinline__ unsigned long long order_key(double v) {
  constexpr unsigned long long kSign = 1ull << 63;
  const unsigned long long bits = v == 0.0 ? 0ull : static_cast<unsigned long long>(__double_as_longlong(v));
  const unsigned long long key = (bits & kSign) ? ~bits : (bits | kSign);
  return v != v ? ~0ull : key;
}

template <typename S>
struct OrderKey;
template <>
struct OrderKey<float> {
  using type = uint32_t;
};
template <>
struct OrderKey<double> {
  using type = unsigned long long;
};

// Exclusive prefix sum of the threads' values in thread order (warp shuffle scans, then the totals of the
// earlier warps). Must be reached by every thread of the block; ends with a barrier, after which
// warp_totals is free again.
__device__ __forceinline__ int block_exclusive_scan(int value, int* warp_totals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_totals[w];
  __syncthreads();
  return before + inclusive - value;
}

// Row r of the batch is handled by block r (mod gridDim.x); block-uniform control flow throughout. Patch-space
// indices are int (length < 2^31, checked by the launcher); global offsets are int64. Dynamic shared memory:
// candidates keys, then candidates flag bytes.
template <typename S>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    index_kernel(const S* __restrict__ scores, int64_t batch, int length, int64_t stride_batch,
                 int64_t stride_patch, int candidates, int count, int block, int grid_width, int64_t num_keep,
                 int64_t* __restrict__ keep_index) {
  using Key = typename OrderKey<S>::type;
  extern __shared__ uint4 dynamic_shared[];  // uint4: 16-byte aligned
  Key* keys = reinterpret_cast<Key*>(dynamic_shared);
  unsigned char* kept = reinterpret_cast<unsigned char*>(keys + candidates);
  __shared__ int warp_totals[kWarps];
  const int width_blocks = grid_width / block;  // used only when block > 1
  // Contiguous run of patches of this thread: [first_patch, last_patch).
  const int64_t per_thread = (static_cast<int64_t>(length) + kThreads - 1) / kThreads;
  const int first_patch = static_cast<int>(lesser(threadIdx.x * per_thread, length));
  const int last_patch = static_cast<int>(lesser(first_patch + per_thread, length));
  // Candidate of patch p: the patch itself, or its block in row-major block order.
  auto candidate_of = [&](int p) {
    return block == 1 ? p : (p / grid_width / block) * width_blocks + (p % grid_width) / block;
  };
  for (int64_t row = blockIdx.x; row < batch; row += gridDim.x) {
    const S* s = scores + row * stride_batch;
    for (int c = threadIdx.x; c < candidates; c += kThreads) {
      S value;
      if (block == 1) {
        value = s[c * stride_patch];
      } else {
        // Added one by one in row-major order, like the reference: bitwise the same sum.
        const int first = (c / width_blocks) * block * grid_width + (c % width_blocks) * block;
        value = s[first * stride_patch];
        for (int r = 0; r < block; ++r) {
          for (int col = r == 0 ? 1 : 0; col < block; ++col)
            value = value + s[(first + r * grid_width + col) * stride_patch];
        }
      }
      keys[c] = order_key(value);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < candidates; c += kThreads) {
      const Key key = keys[c];
      int rank = 0;
      for (int j = 0; j < candidates; ++j) {
        const Key other = keys[j];  // the same j across the warp: a broadcast
        rank += (other > key || (other == key && j < c)) ? 1 : 0;
      }
      kept[c] = rank < count ? 1 : 0;
    }
    __syncthreads();
    int mine = 0;
    for (int p = first_patch; p < last_patch; ++p) mine += kept[candidate_of(p)];
    int64_t position = block_exclusive_scan(mine, warp_totals);
    int64_t* out = keep_index + row * num_keep;
    for (int p = first_patch; p < last_patch; ++p) {
      if (kept[candidate_of(p)]) out[position++] = p;
    }
    __syncthreads();  // keys and flags are rewritten for the next row
  }
}

// ---------------------------------------------------------------------------------------------------
// Gather and backward
// ---------------------------------------------------------------------------------------------------

// inverse[i] = j when keep_row[j] == i, -1 for a dropped patch i < length (entries of keep_row outside
// [0, length) are skipped). Must be reached by every thread of the block, with inverse free (after a
// barrier); ends with a barrier.
__device__ __forceinline__ void build_inverse_map(const int64_t* __restrict__ keep_row, int64_t num_keep, int length,
                                                  int* inverse) {
  for (int i = threadIdx.x; i < length; i += kThreads) inverse[i] = -1;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < num_keep; j += kThreads) {
    const int64_t i = keep_row[j];
    if (i >= 0 && i < length) inverse[i] = static_cast<int>(j);
  }
  __syncthreads();
}

// Warp-per-row copy of the prefix + num_keep leading rows of every batch row of kept (B, out_rows, dim).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    gather_rows_kernel(const T* __restrict__ tokens, int64_t batch, int64_t prefix, int64_t length, int64_t dim,
                       int64_t stride_batch, int64_t stride_row, const int64_t* __restrict__ keep_index,
                       int64_t num_keep, int64_t out_rows, T* __restrict__ kept) {
  using P = Pack<T, V>;
  const int lane = threadIdx.x % 32;
  const int64_t units = dim / V;
  const int64_t rows = prefix + num_keep;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; j < rows;
         j += static_cast<int64_t>(gridDim.x) * kWarps) {
      int64_t source = j;
      if (j >= prefix) {
        const int64_t i = keep_index[b * num_keep + (j - prefix)];
        source = i >= 0 && i < length ? prefix + i : -1;
      }
      P* dst = reinterpret_cast<P*>(kept + (b * out_rows + j) * dim);
      if (source < 0) {
        for (int64_t u = lane; u < units; u += 32) dst[u].bits = typename P::Bits{};
        continue;
      }
      const P* src = reinterpret_cast<const P*>(tokens + b * stride_batch + source * stride_row);
#pragma unroll 4
      for (int64_t u = lane; u < units; u += 32) dst[u].bits = src[u].bits;
    }
  }
}

// Row prefix + num_keep of every batch row of kept: the fused token. Pieces: 32 packs of columns each.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fused_row_kernel(const T* __restrict__ tokens, int64_t batch, int64_t prefix, int length, int64_t dim,
                     int64_t stride_batch, int64_t stride_row, const int64_t* __restrict__ keep_index,
                     int64_t num_keep, const float* __restrict__ weights, int64_t out_rows, T* __restrict__ kept) {
  using P = Pack<T, V>;
  extern __shared__ uint4 dynamic_shared[];
  int* inverse = reinterpret_cast<int*>(dynamic_shared);
  __shared__ float partial[kWarps][kMaxPack][32];  // [warp][element of the pack][lane]: conflict-free
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t units = dim / V;
  const int64_t chunks = (units + 31) / 32;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    // inverse is free here: its last reads (below) precede the last barrier of the chunk loop, which runs at
    // least once since gridDim.x <= chunks.
    build_inverse_map(keep_index + b * num_keep, num_keep, length, inverse);
    const T* patches = tokens + b * stride_batch + prefix * stride_row;
    const float* w = weights + b * length;
    for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
      const int64_t u = chunk * 32 + lane;
      const bool active = u < units;
      float acc[V];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = 0.f;
      for (int i0 = warp; i0 < length; i0 += kWarps * kFuseUnroll) {
        // Every load of the group is issued before the first one is used.
        P x[kFuseUnroll];
        float wi[kFuseUnroll];
        bool take[kFuseUnroll];
#pragma unroll
        for (int q = 0; q < kFuseUnroll; ++q) {
          const int i = i0 + q * kWarps;
          take[q] = i < length && inverse[i] < 0;
          wi[q] = take[q] ? w[i] : 0.f;
          x[q].bits = typename P::Bits{};
          if (take[q] && active) x[q].bits = reinterpret_cast<const P*>(patches + i * stride_row)[u].bits;
        }
#pragma unroll
        for (int q = 0; q < kFuseUnroll; ++q) {
          if (!take[q]) continue;  // kept rows add nothing (not even 0 * inf)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] = fmaf(wi[q], to_float(x[q].v[v]), acc[v]);
        }
      }
#pragma unroll
      for (int v = 0; v < V; ++v) partial[warp][v][lane] = acc[v];
      __syncthreads();
      if (warp == 0 && active) {
        P out;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          float sum = partial[0][v][lane];
#pragma unroll
          for (int k = 1; k < kWarps; ++k) sum += partial[k][v][lane];
          out.v[v] = from_float<T>(sum);
        }
        reinterpret_cast<P*>(kept + (b * out_rows + prefix + num_keep) * dim)[u].bits = out.bits;
      }
      __syncthreads();  // partial is rewritten by the next chunk, inverse by the next batch row
    }
  }
}

// grad_tokens (B, prefix + length, dim) and, with kFused, grad_weights (B, length). Pieces: kRowsPerBlock
// rows of grad_tokens each; one warp per row, warp-uniform branches.
template <typename T, int V, bool kFused>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    backward_kernel(const T* __restrict__ grad_kept, const T* __restrict__ tokens, int64_t batch, int64_t prefix,
                    int length, int64_t dim, int64_t stride_batch, int64_t stride_row,
                    const int64_t* __restrict__ keep_index, int64_t num_keep, const float* __restrict__ weights,
                    T* __restrict__ grad_tokens, float* __restrict__ grad_weights) {
  using P = Pack<T, V>;
  extern __shared__ uint4 dynamic_shared[];
  int* inverse = reinterpret_cast<int*>(dynamic_shared);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t units = dim / V;
  const int64_t rows = prefix + length;
  const int64_t kept_rows = prefix + num_keep + (kFused ? 1 : 0);
  const int64_t chunks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    build_inverse_map(keep_index + b * num_keep, num_keep, length, inverse);
    for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
      const int64_t last = lesser((chunk + 1) * kRowsPerBlock, rows);
      for (int64_t r = chunk * kRowsPerBlock + warp; r < last; r += kWarps) {
        P* dst = reinterpret_cast<P*>(grad_tokens + (b * rows + r) * dim);
        const int64_t i = r - prefix;  // patch index; negative for prefix rows
        const int64_t source = i < 0 ? r : (inverse[i] >= 0 ? prefix + inverse[i] : -1);  // row of grad_kept
        if (source >= 0) {
          const P* src = reinterpret_cast<const P*>(grad_kept + (b * kept_rows + source) * dim);
#pragma unroll 4
          for (int64_t u = lane; u < units; u += 32) dst[u].bits = src[u].bits;
          if (kFused && i >= 0 && lane == 0) grad_weights[b * length + i] = 0.f;
        } else if (!kFused) {
          for (int64_t u = lane; u < units; u += 32) dst[u].bits = typename P::Bits{};
        } else {
          const float wi = weights[b * length + i];
          const P* g = reinterpret_cast<const P*>(grad_kept + (b * kept_rows + prefix + num_keep) * dim);
          const P* x = reinterpret_cast<const P*>(tokens + b * stride_batch + r * stride_row);
          float dot = 0.f;
          for (int64_t u = lane; u < units; u += 32) {
            P gu, xu, out;
            gu.bits = g[u].bits;
            xu.bits = x[u].bits;
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const float gv = to_float(gu.v[v]);
              out.v[v] = from_float<T>(wi * gv);  // one fp32 product, rounded once: bitwise the reference's
              dot = fmaf(to_float(xu.v[v]), gv, dot);
            }
            dst[u].bits = out.bits;
          }
#pragma unroll
          for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
          if (lane == 0) grad_weights[b * length + i] = dot;
        }
      }
    }
    __syncthreads();  // inverse is rebuilt for the next batch row
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------

// plan_shared for the tables of the kernels here (their static shared memory is below kStaticSharedBound).
int plan_shared(int64_t bytes, int* opt_in) { return clipfast::plan_shared(bytes, kStaticSharedBound, opt_in); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool valid_dtype(int dtype) { return dtype == CLIPFAST_F32 || dtype == CLIPFAST_F16 || dtype == CLIPFAST_BF16; }

template <typename S>
int launch_index(const S* scores, int64_t batch, int64_t length, int64_t stride_batch, int64_t stride_patch,
                 int64_t num_keep, int64_t grid_width, int64_t block, int64_t* keep_index, cudaStream_t stream) {
  using Key = typename OrderKey<S>::type;
  const int64_t area = block * block;
  const int64_t candidates = length / area;
  const int64_t bytes = candidates * static_cast<int64_t>(sizeof(Key) + 1);
  int opt_in = 0;
  const int planned = plan_shared(bytes, &opt_in);
  if (planned != 0) return planned;
  const cudaError_t error = allow_shared(index_kernel<S>, opt_in);
  if (error != cudaSuccess) return error;
  const int width = block == 1 ? 1 : static_cast<int>(grid_width);  // ignored (any value) when block == 1
  index_kernel<S><<<grid_size(batch), kThreads, static_cast<size_t>(bytes), stream>>>(
      scores, batch, static_cast<int>(length), stride_batch, stride_patch, static_cast<int>(candidates),
      static_cast<int>(num_keep / area), static_cast<int>(block), width, num_keep, keep_index);
  return cudaGetLastError();
}

int run_index(const void* scores, int double_scores, int64_t batch, int64_t length, int64_t stride_batch,
              int64_t stride_patch, int64_t num_keep, int64_t grid_width, int64_t block, int64_t* keep_index,
              cudaStream_t stream) {
  if (double_scores != 0 && double_scores != 1) return cudaErrorInvalidValue;
  if (batch < 0 || length < 1 || length > 0x7fffffff || stride_batch < 0 || stride_patch < 0)
    return cudaErrorInvalidValue;
  if (num_keep < 1 || num_keep > length || block < 1) return cudaErrorInvalidValue;
  if (block > 1) {
    // In this order, so that block^2 (<= length) cannot overflow.
    if (grid_width < block || length % grid_width != 0 || grid_width % block != 0) return cudaErrorInvalidValue;
    if ((length / grid_width) % block != 0 || num_keep % (block * block) != 0) return cudaErrorInvalidValue;
  }
  if (batch == 0) return 0;
  if (scores == nullptr || keep_index == nullptr) return cudaErrorInvalidValue;
  if (double_scores)
    return launch_index(static_cast<const double*>(scores), batch, length, stride_batch, stride_patch, num_keep,
                        grid_width, block, keep_index, stream);
  return launch_index(static_cast<const float*>(scores), batch, length, stride_batch, stride_patch, num_keep,
                      grid_width, block, keep_index, stream);
}

// Sizes, strides and flags shared by the gather and its backward.
bool valid_gather_args(int dtype, int64_t batch, int64_t prefix, int64_t length, int64_t dim, int64_t stride_batch,
                       int64_t stride_row, int64_t num_keep, int fuse) {
  return valid_dtype(dtype) && batch >= 0 && prefix >= 0 && length >= 0 && dim >= 0 && stride_batch >= 0 &&
         stride_row >= 0 && num_keep >= 0 && num_keep <= length && (fuse == 0 || fuse == 1);
}

template <typename T, int V>
cudaError_t launch_gather(const T* tokens, int64_t batch, int64_t prefix, int64_t length, int64_t dim,
                          int64_t stride_batch, int64_t stride_row, const int64_t* keep_index, int64_t num_keep,
                          int fuse, const float* weights, T* kept, int opt_in, cudaStream_t stream) {
  const int64_t out_rows = prefix + num_keep + fuse;
  if (prefix + num_keep > 0) {
    gather_rows_kernel<T, V><<<grid_2d((prefix + num_keep + kWarps - 1) / kWarps, batch), kThreads, 0, stream>>>(
        tokens, batch, prefix, length, dim, stride_batch, stride_row, keep_index, num_keep, out_rows, kept);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  if (!fuse) return cudaSuccess;
  const cudaError_t error = allow_shared(fused_row_kernel<T, V>, opt_in);
  if (error != cudaSuccess) return error;
  const int64_t chunks = (dim / V + 31) / 32;
  fused_row_kernel<T, V><<<grid_2d(chunks, batch), kThreads, static_cast<size_t>(length) * sizeof(int), stream>>>(
      tokens, batch, prefix, static_cast<int>(length), dim, stride_batch, stride_row, keep_index, num_keep, weights,
      out_rows, kept);
  return cudaGetLastError();
}

int run_gather(const void* tokens_handle, int dtype, int64_t batch, int64_t prefix, int64_t length, int64_t dim,
               int64_t stride_batch, int64_t stride_row, const int64_t* keep_index, int64_t num_keep, int fuse,
               const float* weights, void* kept_handle, cudaStream_t stream) {
  if (!valid_gather_args(dtype, batch, prefix, length, dim, stride_batch, stride_row, num_keep, fuse))
    return cudaErrorInvalidValue;
  if (batch == 0 || dim == 0 || prefix + num_keep + fuse == 0) return 0;  // kept has no element
  if (kept_handle == nullptr || (prefix + length > 0 && tokens_handle == nullptr) ||
      (num_keep > 0 && keep_index == nullptr) || (fuse && length > 0 && weights == nullptr))
    return cudaErrorInvalidValue;
  int opt_in = 0;
  if (fuse) {
    const int planned = plan_shared(length * static_cast<int64_t>(sizeof(int)), &opt_in);
    if (planned != 0) return planned;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kWide = kWidePack<T>;
    const T* tokens = static_cast<const T*>(tokens_handle);
    T* kept = static_cast<T*>(kept_handle);
    const bool wide = dim % kWide == 0 && stride_batch % kWide == 0 && stride_row % kWide == 0 &&
                      aligned16(tokens) && aligned16(kept);
    if (wide)
      return launch_gather<T, kWide>(tokens, batch, prefix, length, dim, stride_batch, stride_row, keep_index,
                                     num_keep, fuse, weights, kept, opt_in, stream);
    return launch_gather<T, 1>(tokens, batch, prefix, length, dim, stride_batch, stride_row, keep_index, num_keep,
                               fuse, weights, kept, opt_in, stream);
  });
}

template <typename T, int V, bool kFused>
cudaError_t launch_backward(const T* grad_kept, const T* tokens, int64_t batch, int64_t prefix, int64_t length,
                            int64_t dim, int64_t stride_batch, int64_t stride_row, const int64_t* keep_index,
                            int64_t num_keep, const float* weights, T* grad_tokens, float* grad_weights, int opt_in,
                            cudaStream_t stream) {
  const cudaError_t error = allow_shared(backward_kernel<T, V, kFused>, opt_in);
  if (error != cudaSuccess) return error;
  const int64_t chunks = (prefix + length + kRowsPerBlock - 1) / kRowsPerBlock;
  backward_kernel<T, V, kFused>
      <<<grid_2d(chunks, batch), kThreads, static_cast<size_t>(length) * sizeof(int), stream>>>(
          grad_kept, tokens, batch, prefix, static_cast<int>(length), dim, stride_batch, stride_row, keep_index,
          num_keep, weights, grad_tokens, grad_weights);
  return cudaGetLastError();
}

int run_gather_backward(const void* grad_kept_handle, const void* tokens_handle, int dtype, int64_t batch,
                        int64_t prefix, int64_t length, int64_t dim, int64_t stride_batch, int64_t stride_row,
                        const int64_t* keep_index, int64_t num_keep, int fuse, const float* weights,
                        void* grad_tokens_handle, float* grad_weights, cudaStream_t stream) {
  if (!valid_gather_args(dtype, batch, prefix, length, dim, stride_batch, stride_row, num_keep, fuse))
    return cudaErrorInvalidValue;
  const bool fused_weights = fuse && length > 0;  // grad_weights has elements
  if (batch == 0 || (dim == 0 && !fused_weights) || prefix + length == 0) return 0;  // nothing to write
  if ((dim > 0 && (grad_tokens_handle == nullptr || grad_kept_handle == nullptr)) ||
      (num_keep > 0 && keep_index == nullptr) ||
      (fused_weights && (weights == nullptr || grad_weights == nullptr || (dim > 0 && tokens_handle == nullptr))))
    return cudaErrorInvalidValue;
  int opt_in = 0;
  const int planned = plan_shared(length * static_cast<int64_t>(sizeof(int)), &opt_in);
  if (planned != 0) return planned;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kWide = kWidePack<T>;
    const T* grad_kept = static_cast<const T*>(grad_kept_handle);
    const T* tokens = fuse ? static_cast<const T*>(tokens_handle) : nullptr;  // never read without fusion
    T* grad_tokens = static_cast<T*>(grad_tokens_handle);
    const bool wide = dim % kWide == 0 && aligned16(grad_kept) && aligned16(grad_tokens) &&
                      (!fuse || (stride_batch % kWide == 0 && stride_row % kWide == 0 && aligned16(tokens)));
    if (fuse && wide)
      return launch_backward<T, kWide, true>(grad_kept, tokens, batch, prefix, length, dim, stride_batch, stride_row,
                                             keep_index, num_keep, weights, grad_tokens, grad_weights, opt_in, stream);
    if (fuse)
      return launch_backward<T, 1, true>(grad_kept, tokens, batch, prefix, length, dim, stride_batch, stride_row,
                                         keep_index, num_keep, weights, grad_tokens, grad_weights, opt_in, stream);
    if (wide)
      return launch_backward<T, kWide, false>(grad_kept, tokens, batch, prefix, length, dim, stride_batch, stride_row,
                                              keep_index, num_keep, weights, grad_tokens, grad_weights, opt_in, stream);
    return launch_backward<T, 1, false>(grad_kept, tokens, batch, prefix, length, dim, stride_batch, stride_row,
                                        keep_index, num_keep, weights, grad_tokens, grad_weights, opt_in, stream);
  });
}

}  // namespace

extern "C" {

int clipfast_token_keep_index_cuda(const void* scores, int double_scores, int64_t batch, int64_t length,
                                   int64_t stride_batch, int64_t stride_patch, int64_t num_keep, int64_t grid_width,
                                   int64_t block, int64_t* keep_index, void* stream) {
  return run_index(scores, double_scores, batch, length, stride_batch, stride_patch, num_keep, grid_width, block,
                   keep_index, static_cast<cudaStream_t>(stream));
}

int clipfast_token_keep_gather_cuda(const void* tokens, int dtype, int64_t batch, int64_t prefix, int64_t length,
                                    int64_t dim, int64_t token_stride_batch, int64_t token_stride_row,
                                    const int64_t* keep_index, int64_t num_keep, int fuse, const float* fuse_weights,
                                    void* kept, void* stream) {
  return run_gather(tokens, dtype, batch, prefix, length, dim, token_stride_batch, token_stride_row, keep_index,
                    num_keep, fuse, fuse_weights, kept, static_cast<cudaStream_t>(stream));
}

int clipfast_token_keep_gather_backward_cuda(const void* grad_kept, const void* tokens, int dtype, int64_t batch,
                                             int64_t prefix, int64_t length, int64_t dim, int64_t token_stride_batch,
                                             int64_t token_stride_row, const int64_t* keep_index, int64_t num_keep,
                                             int fuse, const float* fuse_weights, void* grad_tokens,
                                             float* grad_weights, void* stream) {
  return run_gather_backward(grad_kept, tokens, dtype, batch, prefix, length, dim, token_stride_batch,
                             token_stride_row, keep_index, num_keep, fuse, fuse_weights, grad_tokens, grad_weights,
                             static_cast<cudaStream_t>(stream));
}

}  // extern "C"
