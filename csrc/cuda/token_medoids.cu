// CUDA kernels of the token medoids index (clipfast issue 5; contract in clipfast/reference/token_medoids.py):
// for every row (segment) of N tokens x (N, D), K medoid tokens chosen by KKZ seeding followed by k-medoids
// ("alternate") iterations, as in CenterCLIP's token clustering (Zhao et al., SIGIR 2022). Per row:
//
//   D[i][j]   euclidean ||x_i - x_j|| or cosine 1 - cos(x_i, x_j) (norms clamped at 1e-8)
//   KKZ       m_0 = argmax_n ||x_n|| (raw norm); m_i = argmax_n min_{j<i} D[m_j][n] over the tokens not
//             chosen yet (running min vector, chosen entries -inf): K distinct medoids
//   iterate   a_n = argmin_k D[m_k][n] (a medoid token in its own cluster);
//             m'_k = argmin_{i: a_i = k} sum_{j: a_j = k} D[i][j]; stop when m' == m
//   finish    sort the medoids ascending; a_n = argmin over the sorted medoids.   Ties: lowest index, always.
//
// Algorithm (driven by csrc/cuda/token_medoids_binding.cpp over tiles of whole chunks of rows):
//   - distances_kernel: one block per (row, 64 x 64 tile pair (ti <= tj)) of the upper triangle; 256 threads,
//     each a 4 x 4 register tile, tokens staged through shared memory kChunkD features at a time and
//     converted to fp32 on load. Euclidean sums (x_i - x_j)^2 directly (no ||x||^2 + ||y||^2 - 2 x.y
//     cancellation: exact for tokens of norm ~1000, and D[i][i] = 0 exactly); cosine accumulates the dot
//     product and both squared norms in the same pass. Each value is written to (i, j) and (j, i), so the
//     matrices are bitwise symmetric, which lets the medoid kernel read columns instead of rows (coalesced).
//   - medoids_kernel: one block of 256 threads per chunk of rows (a single row when split_size == 0), looping
//     over its rows, so chunk-level stopping needs no grid synchronisation. Token-indexed work (running
//     min, assignment, in-cluster sums, final assignment) is owned by thread t for tokens t, t + 256, ...;
//     medoid-indexed work (update, sort) by thread t for medoids t, t + 256, .... Block argmax: per-thread
//     ascending scan, warp shuffles, then a fixed-order pass over the 8 warp results (lowest index wins ties).
//     In-cluster sums: thread i adds D[j][i] (= D[i][j]) over j ascending with a_j = a_i: O(N^2) per iteration.
//     The sums are fp64 (like the reference's Python floats), so near-ties do not hinge on summation order.
//     Convergence is __syncthreads_or over the medoids that changed; per-row state (medoids, assignment,
//     running min / fp64 costs) lives in a global workspace, each element owned by one thread between barriers.
// Determinism: no atomics, fixed reduction shapes and orders: bitwise reproducible results.
// Cost: distances about R * N^2 * D / 2 FMAs (pairs of 64-token tiles); KKZ O(R * K * N); each iteration
// O(R * (K * N + N^2)).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "clipfast/cuda_elements.cuh"
#include "clipfast/token_medoids_cuda.h"

namespace {

using clipfast::dispatch_dtype;
using clipfast::to_float;

constexpr float kNormEps = 1e-8f;

// ---------------------------------------------------------------------------------------------------
// Distance matrices. 256 threads form a 16 x 16 grid: thread (thread_row, thread_col) computes the tokens
// thread_row * 4 + [0, 4) (rows) against thread_col * 4 + [0, 4) (columns) of a 64 x 64 tile.
// ---------------------------------------------------------------------------------------------------
constexpr int kThreads = 256;
constexpr int kTile = 64;       // tokens per tile side
constexpr int kThreadTile = 4;  // tokens per thread and side
constexpr int kChunkD = 32;     // features staged per step
constexpr int kPad = 4;         // keeps staged rows 16-byte aligned (float4 reads)
constexpr int kThreadCols = kTile / kThreadTile;  // 16
constexpr int64_t kMaxBlocks = 1 << 20;           // grid-stride beyond

static_assert((kTile / kThreadTile) * (kTile / kThreadTile) == kThreads, "one thread per 4 x 4 register tile");
static_assert(kThreadTile == 4, "register tiles are read from shared memory as float4");
static_assert(kThreads % kChunkD == 0, "staging loops assume whole chunks");

struct __align__(16) DistanceStaging {
  float a[kChunkD][kTile + kPad];  // a[d][i] = x[first_i + i][d0 + d]
  float b[kChunkD][kTile + kPad];  // b[d][j] = x[first_j + j][d0 + d]
};

// staged[d][i] = x[first + i][d0 + d] as fp32, zero outside the tokens / features (zeros change neither a
// squared difference sum nor a dot product). Consecutive threads read consecutive features (coalesced).
template <typename T>
__device__ __forceinline__ void stage_tokens(const T* __restrict__ x, int64_t n, int64_t dim, int64_t first,
                                             int64_t d0, float (*staged)[kTile + kPad]) {
  const int d = threadIdx.x % kChunkD;
  const int64_t dd = d0 + d;
#pragma unroll
  for (int i = threadIdx.x / kChunkD; i < kTile; i += kThreads / kChunkD) {
    const int64_t token = first + i;
    staged[d][i] = (token < n && dd < dim) ? to_float(x[token * dim + dd]) : 0.f;
  }
}

// (ti, tj), ti <= tj, of the p-th pair of the row-major upper triangle of tiles x tiles tile pairs.
__device__ __forceinline__ void tile_pair(int64_t p, int64_t tiles, int64_t& ti, int64_t& tj) {
  ti = 0;
  while (p >= tiles - ti) {
    p -= tiles - ti;
    ++ti;
  }
  tj = ti + p;
}

// Grid-stride over rows * pairs blocks (pairs = tiles (tiles + 1) / 2). Block-uniform loop: no thread leaves
// before the last barrier.
template <typename T, int kMetric>
__global__ void __launch_bounds__(kThreads, 2)
    distances_kernel(const T* __restrict__ x, int64_t rows, int64_t n, int64_t dim, int64_t tiles, int64_t pairs,
                     float* __restrict__ distances) {
  __shared__ DistanceStaging staging;
  const int thread_row = threadIdx.x / kThreadCols;
  const int thread_col = threadIdx.x % kThreadCols;
  const int64_t total = rows * pairs;
  for (int64_t block = blockIdx.x; block < total; block += gridDim.x) {
    const int64_t row = block / pairs;
    int64_t ti, tj;
    tile_pair(block % pairs, tiles, ti, tj);
    const int64_t first_i = ti * kTile, first_j = tj * kTile;
    const T* x_row = x + row * n * dim;

    float acc[kThreadTile][kThreadTile];
    float norm_a[kThreadTile], norm_b[kThreadTile];  // squared norms (cosine only)
#pragma unroll
    for (int r = 0; r < kThreadTile; ++r) {
      norm_a[r] = 0.f;
      norm_b[r] = 0.f;
#pragma unroll
      for (int c = 0; c < kThreadTile; ++c) acc[r][c] = 0.f;
    }

    for (int64_t d0 = 0; d0 < dim; d0 += kChunkD) {
      stage_tokens(x_row, n, dim, first_i, d0, staging.a);
      stage_tokens(x_row, n, dim, first_j, d0, staging.b);
      __syncthreads();
#pragma unroll 8
      for (int d = 0; d < kChunkD; ++d) {
        const float4 a4 = *reinterpret_cast<const float4*>(&staging.a[d][thread_row * kThreadTile]);
        const float4 b4 = *reinterpret_cast<const float4*>(&staging.b[d][thread_col * kThreadTile]);
        const float a[kThreadTile] = {a4.x, a4.y, a4.z, a4.w};
        const float b[kThreadTile] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int r = 0; r < kThreadTile; ++r) {
#pragma unroll
          for (int c = 0; c < kThreadTile; ++c) {
            if (kMetric == CLIPFAST_MEDOIDS_EUCLIDEAN) {
              const float diff = a[r] - b[c];  // (b - a)^2 is bitwise the same: symmetric
              acc[r][c] = fmaf(diff, diff, acc[r][c]);
            } else {
              acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
            }
          }
        }
        if (kMetric == CLIPFAST_MEDOIDS_COSINE) {
#pragma unroll
          for (int r = 0; r < kThreadTile; ++r) {
            norm_a[r] = fmaf(a[r], a[r], norm_a[r]);  // same order as norm_b: a token's norm is the same
            norm_b[r] = fmaf(b[r], b[r], norm_b[r]);  // whether it is a row or a column of the tile
          }
        }
      }
      __syncthreads();
    }

    float* d_row = distances + row * n * n;
#pragma unroll
    for (int r = 0; r < kThreadTile; ++r) {
      const int64_t i = first_i + thread_row * kThreadTile + r;
      if (i >= n) continue;
#pragma unroll
      for (int c = 0; c < kThreadTile; ++c) {
        const int64_t j = first_j + thread_col * kThreadTile + c;
        if (j >= n) continue;
        float value;
        if (kMetric == CLIPFAST_MEDOIDS_EUCLIDEAN) {
          value = sqrtf(acc[r][c]);
        } else {
          const float scale = fmaxf(sqrtf(norm_a[r]), kNormEps) * fmaxf(sqrtf(norm_b[c]), kNormEps);
          value = i == j ? 0.f : 1.f - acc[r][c] / scale;  // exact zero diagonal, zero tokens included
        }
        d_row[i * n + j] = value;
        if (ti != tj) d_row[j * n + i] = value;  // diagonal tiles compute both halves themselves
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Medoids: one block per chunk of rows.
// ---------------------------------------------------------------------------------------------------
constexpr int kWarps = kThreads / 32;
constexpr int kMedoidBlocksPerSm = 4;  // register cap 64 (without a minimum, ptxas 13.0 spills at 40 on sm_90)

// Does candidate (v, i) beat (best_v, best_i) for an argmax? Larger value, or equal value and lower index;
// index < 0 = no candidate.
__device__ __forceinline__ bool beats_max(float v, int i, float best_v, int best_i) {
  if (i < 0) return false;
  if (best_i < 0) return true;
  return v > best_v || (v == best_v && i < best_i);
}

struct ArgmaxScratch {
  float value[kWarps];
  int index[kWarps];
};

// Block-wide argmax of the threads' candidates (value, index); every thread gets the winning index (-1 when
// no thread has a candidate). Must be reached by every thread of the block; starts and ends with the
// scratch free (the last barrier orders the reads before any later write).
__device__ __forceinline__ int block_argmax(float value, int index, ArgmaxScratch& scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other_v = __shfl_down_sync(0xffffffffu, value, offset);
    const int other_i = __shfl_down_sync(0xffffffffu, index, offset);
    if (beats_max(other_v, other_i, value, index)) {
      value = other_v;
      index = other_i;
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    scratch.value[warp] = value;
    scratch.index[warp] = index;
  }
  __syncthreads();
  float best_v = scratch.value[0];
  int best_i = scratch.index[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    if (beats_max(scratch.value[w], scratch.index[w], best_v, best_i)) {
      best_v = scratch.value[w];
      best_i = scratch.index[w];
    }
  }
  __syncthreads();
  return best_i;
}

// Per-row state in the global workspace: n doubles (KKZ running min, then the in-cluster costs), then int32
// medoids[k] and assignment[n]; the row stride (in int32 elements) is even, so the doubles stay aligned.
struct RowState {
  double* scratch;
  int* medoids;
  int* assign;
};

__device__ __host__ __forceinline__ int64_t row_stride(int64_t n, int64_t k) { return 2 * n + ((k + n + 1) / 2) * 2; }

__device__ __forceinline__ RowState row_state(int32_t* workspace, int64_t row, int n, int k) {
  int32_t* base = workspace + row * row_stride(n, k);
  return RowState{reinterpret_cast<double*>(base), base + 2 * static_cast<int64_t>(n),
                  base + 2 * static_cast<int64_t>(n) + k};
}

// KKZ seeding of one row into s.medoids. Ends with a barrier (the medoids are visible to the block).
template <typename T>
__device__ __forceinline__ void kkz(const float* __restrict__ dist, const T* __restrict__ x_row, int n, int64_t dim,
                                    int k, const RowState s, ArgmaxScratch& scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // m_0 = argmax of the raw norms: one warp per token (fixed-shape shuffle sum), tokens ascending per warp.
  float best_v = 0.f;
  int best_i = -1;
  for (int t = warp; t < n; t += kWarps) {
    const T* token = x_row + static_cast<int64_t>(t) * dim;
    float sum = 0.f;
    for (int64_t d = lane; d < dim; d += 32) {
      const float v = to_float(token[d]);
      sum = fmaf(v, v, sum);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    const float norm = sqrtf(sum);  // the same in every lane
    if (beats_max(norm, t, best_v, best_i)) {
      best_v = norm;
      best_i = t;
    }
  }
  int m = block_argmax(best_v, best_i, scratch);
  if (threadIdx.x == 0) s.medoids[0] = m;
  // A chosen token leaves the running for good (-inf; fmin keeps it): the medoids are distinct tokens.
  for (int t = threadIdx.x; t < n; t += kThreads)
    s.scratch[t] = t == m ? -INFINITY : static_cast<double>(dist[static_cast<int64_t>(m) * n + t]);
  // m_i = argmax of the running min; each thread only touches its own tokens' entries.
  for (int i = 1; i < k; ++i) {
    best_v = 0.f;
    best_i = -1;
    for (int t = threadIdx.x; t < n; t += kThreads) {
      const float v = static_cast<float>(s.scratch[t]);  // an fp32 distance, stored exactly
      if (beats_max(v, t, best_v, best_i)) {
        best_v = v;
        best_i = t;
      }
    }
    m = block_argmax(best_v, best_i, scratch);
    if (threadIdx.x == 0) s.medoids[i] = m;
    const float* d_m = dist + static_cast<int64_t>(m) * n;
    for (int t = threadIdx.x; t < n; t += kThreads)
      s.scratch[t] = t == m ? -INFINITY : fmin(s.scratch[t], static_cast<double>(d_m[t]));
  }
  __syncthreads();
}

// One assignment + update step of one row. Returns (block-uniformly) whether any medoid changed; ends with
// a barrier.
__device__ __forceinline__ bool iterate(const float* __restrict__ dist, int n, int k, const RowState s) {
  // a_t = argmin_c D[m_c][t], lowest c on ties; a medoid token belongs to its own cluster (-inf).
  for (int t = threadIdx.x; t < n; t += kThreads) {
    int best_c = 0;
    float best = s.medoids[0] == t ? -INFINITY : dist[static_cast<int64_t>(s.medoids[0]) * n + t];
    for (int c = 1; c < k; ++c) {
      const float v = s.medoids[c] == t ? -INFINITY : dist[static_cast<int64_t>(s.medoids[c]) * n + t];
      if (v < best) {
        best = v;
        best_c = c;
      }
    }
    s.assign[t] = best_c;
  }
  __syncthreads();
  // cost_i = sum_{j: a_j = a_i} D[i][j], read as the column D[j][i] (symmetric; coalesced across threads).
  // Summed in fp64 like the reference (Python floats): for fp32 terms the sum is then (nearly) exact, so
  // near-ties between candidates do not hinge on the summation order.
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int cluster = s.assign[i];
    double cost = 0.0;
    for (int j = 0; j < n; ++j) {
      if (s.assign[j] == cluster) cost += static_cast<double>(dist[static_cast<int64_t>(j) * n + i]);
    }
    s.scratch[i] = cost;
  }
  __syncthreads();
  // m'_c = argmin_{i: a_i = c} cost_i, lowest i on ties; an empty cluster keeps its medoid.
  int changed = 0;
  for (int c = threadIdx.x; c < k; c += kThreads) {
    int best_i = -1;
    double best = 0.0;
    for (int i = 0; i < n; ++i) {
      if (s.assign[i] != c) continue;
      const double v = s.scratch[i];
      if (best_i < 0 || v < best) {
        best = v;
        best_i = i;
      }
    }
    if (best_i >= 0 && best_i != s.medoids[c]) {
      s.medoids[c] = best_i;  // only this thread reads or writes medoids[c] in this phase
      changed = 1;
    }
  }
  return __syncthreads_or(changed) != 0;
}

// Ascending medoids and the final assignment of one row into the int64 outputs. Ends with a barrier.
__device__ __forceinline__ void finish(const float* __restrict__ dist, int n, int k, const RowState s,
                                       int64_t* __restrict__ medoid_row, int64_t* __restrict__ assign_row) {
  // Rank sort (stable for repeated medoids): position = #smaller + #equal earlier.
  for (int c = threadIdx.x; c < k; c += kThreads) {
    const int m = s.medoids[c];
    int rank = 0;
    for (int j = 0; j < k; ++j) {
      const int other = s.medoids[j];
      rank += (other < m || (other == m && j < c)) ? 1 : 0;
    }
    medoid_row[rank] = m;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < n; t += kThreads) {
    int best_c = 0;
    float best = medoid_row[0] == t ? -INFINITY : dist[medoid_row[0] * n + t];
    for (int c = 1; c < k; ++c) {
      const float v = medoid_row[c] == t ? -INFINITY : dist[medoid_row[c] * n + t];
      if (v < best) {
        best = v;
        best_c = c;
      }
    }
    assign_row[t] = best_c;
  }
  __syncthreads();
}

// Block b handles the rows [b * chunk, min((b + 1) * chunk, rows)). Block-uniform control flow throughout.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMedoidBlocksPerSm)
    medoids_kernel(const float* __restrict__ distances, const T* __restrict__ x, int64_t rows, int n, int64_t dim,
                   int k, int64_t max_iters, int64_t chunk, int64_t* __restrict__ medoid_index,
                   int64_t* __restrict__ assignment, int32_t* __restrict__ workspace) {
  __shared__ ArgmaxScratch scratch;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t last = first + chunk < rows ? first + chunk : rows;
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t row = first; row < last; ++row)
    kkz(distances + row * nn, x + row * n * dim, n, dim, k, row_state(workspace, row, n, k), scratch);
  for (int64_t it = 0; it < max_iters; ++it) {
    bool changed = false;
    for (int64_t row = first; row < last; ++row)
      changed = iterate(distances + row * nn, n, k, row_state(workspace, row, n, k)) || changed;
    if (!changed) break;  // block-uniform (__syncthreads_or)
  }
  for (int64_t row = first; row < last; ++row)
    finish(distances + row * nn, n, k, row_state(workspace, row, n, k), medoid_index + row * k,
           assignment + row * n);
}

// ---------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------

bool valid_sizes(int64_t rows, int64_t n, int64_t dim) {
  return rows >= 0 && n >= 0 && dim >= 0 && n <= 0x7fffffff;
}

cudaError_t distances(const void* x_handle, int dtype, int64_t rows, int64_t n, int64_t dim, int metric,
                      float* out, cudaStream_t stream) {
  if (!valid_sizes(rows, n, dim)) return cudaErrorInvalidValue;
  if (metric != CLIPFAST_MEDOIDS_EUCLIDEAN && metric != CLIPFAST_MEDOIDS_COSINE) return cudaErrorInvalidValue;
  const bool empty = rows == 0 || n == 0;
  if (!empty && (out == nullptr || (dim > 0 && x_handle == nullptr))) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (empty) return cudaSuccess;
    const int64_t tiles = (n + kTile - 1) / kTile;
    const int64_t pairs = tiles * (tiles + 1) / 2;
    const int64_t total = rows * pairs;
    const unsigned int blocks = static_cast<unsigned int>(total < kMaxBlocks ? total : kMaxBlocks);
    const T* x = static_cast<const T*>(x_handle);
    if (metric == CLIPFAST_MEDOIDS_EUCLIDEAN)
      distances_kernel<T, CLIPFAST_MEDOIDS_EUCLIDEAN><<<blocks, kThreads, 0, stream>>>(x, rows, n, dim, tiles, pairs,
                                                                                       out);
    else
      distances_kernel<T, CLIPFAST_MEDOIDS_COSINE><<<blocks, kThreads, 0, stream>>>(x, rows, n, dim, tiles, pairs,
                                                                                    out);
    return cudaGetLastError();
  });
}

int64_t workspace_elements(int64_t rows, int64_t n, int64_t k) {
  if (rows < 0 || n < 0 || k < 0 || n > 0x7fffffff || k > n) return -1;
  return rows * row_stride(n, k);
}

cudaError_t medoids(const float* dist, const void* x_handle, int dtype, int64_t rows, int64_t n, int64_t dim,
                    int64_t k, int64_t max_iters, int64_t split_size, int64_t* medoid_index, int64_t* assignment,
                    int32_t* workspace, cudaStream_t stream) {
  if (!valid_sizes(rows, n, dim) || max_iters < 0 || split_size < 0) return cudaErrorInvalidValue;
  if (n > 0 && (k < 1 || k > n)) return cudaErrorInvalidValue;
  const bool empty = rows == 0 || n == 0;
  if (!empty && (dist == nullptr || medoid_index == nullptr || assignment == nullptr || workspace == nullptr ||
                 (dim > 0 && x_handle == nullptr)))
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (empty) return cudaSuccess;
    const int64_t chunk = split_size > 0 ? split_size : 1;
    const int64_t blocks = (rows + chunk - 1) / chunk;
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    medoids_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        dist, static_cast<const T*>(x_handle), rows, static_cast<int>(n), dim, static_cast<int>(k), max_iters, chunk,
        medoid_index, assignment, workspace);
    return cudaGetLastError();
  });
}

}  // namespace

extern "C" {

int clipfast_token_medoids_distances_cuda(const void* x, int dtype, int64_t rows, int64_t n, int64_t dim, int metric,
                                          float* distances_out, void* stream) {
  return distances(x, dtype, rows, n, dim, metric, distances_out, static_cast<cudaStream_t>(stream));
}

int64_t clipfast_token_medoids_workspace_elements(int64_t rows, int64_t n, int64_t k) {
  return workspace_elements(rows, n, k);
}

int clipfast_token_medoids_cuda(const float* distances_in, const void* x, int dtype, int64_t rows, int64_t n,
                                int64_t dim, int64_t k, int64_t max_iters, int64_t split_size, int64_t* medoid_index,
                                int64_t* assignment, int32_t* workspace, void* stream) {
  return medoids(distances_in, x, dtype, rows, n, dim, k, max_iters, split_size, medoid_index, assignment, workspace,
                 static_cast<cudaStream_t>(stream));
}

}  // extern "C"
