// Fused CUDA kernels for CLIP's softmax contrastive loss (InfoNCE) and SigLIP's sigmoid loss over the
// logits S = scale * x @ y^T (x: (rows, dim), y: (cols, dim)); the rows x cols matrix S is never stored.
//
// Algorithm (tiled, as in FlashAttention and Inf-CL):
//   - A block owns kBlockRows rows of x and sweeps y in tiles of kBlockCols columns. Each S tile is a
//     small GEMM: x and y are staged through shared memory kDimChunk dimensions at a time (converted to
//     fp32 on load), and each thread accumulates a kThreadRows x kThreadCols register tile in fp32.
//   - Row reduction (forward): every S tile is folded at once into per-row statistics:
//       softmax: online log-sum-exp. With a running max m and a running l = sum_j exp(S_ij - m), a new
//                tile (m_t, l_t) merges as m' = max(m, m_t), l' = l * exp(m - m') + l_t * exp(m_t - m');
//                lse = m + log(l). Masked (out-of-range) columns are -inf, and exp(-inf - m) is taken
//                as 0 even when m = -inf, so a row that has seen no column yet stays (-inf, 0).
//       sigmoid: running sum_j softplus(S_ij + bias).
//     The 16 threads that share a row merge their statistics with warp shuffles at the end.
//   - Gradient (backward): a second pass recomputes each S tile, turns it into G = dL/dS (softmax:
//     weighted exp(S - lse), sigmoid: sigmoid(S + bias)) and contracts it right away with a value matrix
//     V (cols, value_dim): grad_x = G @ V (rows, value_dim). V is y for the loss's own gradient; for
//     distillation, G is a teacher's softmax (S from teacher features x, y of width dim) and V holds the
//     student's features of the same columns (any width value_dim). The column direction (col_lse,
//     grad_y = G^T @ x_values) is the same launch with x and y (and the value matrices) swapped, because
//     S^T = scale * y @ x^T.
// Memory: outputs aside, O(rows + cols) (the lse vectors); each block holds only O(tile) shared memory.
// Cost: rows * cols * dim fp32 FMAs per row reduction, rows * cols * (dim + value_dim) per gradient launch
// (recompute S, then G @ V).
// Launch grids cover rows only (one block per kBlockRows rows), so few rows (e.g. a local batch against
// gathered columns) leave most SMs idle.
// Determinism: every output element is owned by one thread and accumulated in a fixed order (no atomics).
//
// References: CLIP (Radford et al., arXiv:2103.00020); SigLIP (Zhai et al., arXiv:2303.15343);
// FlashAttention (Dao et al., arXiv:2205.14135); Inf-CL (Cheng et al., arXiv:2410.17243); online softmax
// (Milakov & Gimelshein, arXiv:1805.02867).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "clipfast/cuda_elements.cuh"
#include "clipfast/contrastive_cuda.h"

namespace {

using clipfast::dispatch_dtype;
using clipfast::to_float;

// ---------------------------------------------------------------------------------------------------
// Per-element math, host+device so that it reads (and can be checked) as ordinary C++.
// ---------------------------------------------------------------------------------------------------

// exp(old_max - new_max) with the convention exp(-inf - (-inf)) = 0: a side that has seen no value yet
// (max -inf, sum 0) contributes nothing, instead of the NaN that IEEE arithmetic would give.
__host__ __device__ inline float rescale_factor(float old_max, float new_max) {
  return old_max == -INFINITY ? 0.f : expf(old_max - new_max);
}

// (max_a, sum_a) <- log-sum-exp state of the union of both sides; sum_* = sum exp(v - max_*).
__host__ __device__ inline void online_lse_merge(float& max_a, float& sum_a, float max_b, float sum_b) {
  const float new_max = fmaxf(max_a, max_b);
  sum_a = sum_a * rescale_factor(max_a, new_max) + sum_b * rescale_factor(max_b, new_max);
  max_a = new_max;
}

// log sum exp = max + log(sum); an empty state (-inf, 0) gives -inf + log(0) = -inf.
__host__ __device__ inline float lse_from_state(float running_max, float running_sum) {
  return running_max + logf(running_sum);
}

// softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|): no overflow, exact tail for z << 0; softplus(-inf) = 0.
__host__ __device__ inline float softplus(float z) { return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z))); }

// sigmoid(z) = 1 / (1 + e^-z) = e^z / (1 + e^z); e = e^-|z| is in (0, 1], so neither branch overflows.
__host__ __device__ inline float sigmoid(float z) {
  const float e = expf(-fabsf(z));
  return z >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}


// ---------------------------------------------------------------------------------------------------
// Tiling. 256 threads form a 16 x 16 grid: thread (thread_row, thread_col) computes S for the rows
// thread_row * 4 + [0, 4) and the columns thread_col * 4 + [0, 4) of a 64 x 64 tile. The 16 threads of
// one thread_row are the 16 consecutive lanes of one half-warp, so row statistics are merged with
// __shfl_xor_sync over lane offsets 8, 4, 2, 1.
// ---------------------------------------------------------------------------------------------------
constexpr int kThreads = 256;
constexpr int kBlockRows = 64;   // rows of x owned by one block
constexpr int kBlockCols = 64;   // rows of y per tile (columns of S)
constexpr int kThreadRows = 4;   // S rows per thread
constexpr int kThreadCols = 4;   // S columns per thread
constexpr int kRowThreads = kBlockRows / kThreadRows;  // 16 thread_row values
constexpr int kColThreads = kBlockCols / kThreadCols;  // 16 thread_col values = threads sharing a row
constexpr int kDimChunk = 32;    // dimensions staged in shared memory per step of the S tile
// Row padding of the staged arrays: keeps rows 16-byte aligned (float4 reads) and shifts consecutive
// rows by 4 banks.
constexpr int kPad = 4;
// Gradient: G is kept in shared memory for a panel of kPanelTiles column tiles, then contracted with the
// value matrix kGradDimChunk value columns at a time (see gradient_kernel).
constexpr int kPanelTiles = 2;
constexpr int kPanelCols = kPanelTiles * kBlockCols;
constexpr int kGradDimChunk = kColThreads * kThreadCols;  // 64: thread_col * 4 + [0, 4) covers it once

// Minimum resident blocks per SM promised to ptxas (__launch_bounds__), i.e. register caps of 64 and 80
// per thread. The gradient kernel's 51 KiB of shared memory allows 3 blocks on an A100 (164 KiB) anyway;
// without the cap ptxas gives it 128 registers and only 2 blocks fit.
constexpr int kRowReductionBlocksPerSm = 4;
constexpr int kGradientBlocksPerSm = 3;

static_assert(kRowThreads * kColThreads == kThreads, "one thread per 4 x 4 register tile");
static_assert(kThreadRows == 4 && kThreadCols == 4, "register tiles are read from shared memory as float4");
static_assert(32 % kColThreads == 0, "threads sharing a row must lie in one warp for the shuffles");
static_assert(kThreads % kDimChunk == 0 && kThreads % kGradDimChunk == 0, "staging loops assume whole rows");

enum class LossKind { kSoftmax, kSigmoid };

template <typename T>
struct PairwiseProblem {
  const T* __restrict__ x;  // (rows, dim)
  const T* __restrict__ y;  // (cols, dim)
  int64_t rows;
  int64_t cols;
  int64_t dim;
  const float* scale;  // device scalar
  const float* bias;   // device scalar, sigmoid only
};

// The matrix G is contracted with in the gradient: grad_x = G @ values, values (cols, width) with row j at
// data + j * row_stride (unit column stride, so a row-strided view such as a column slice needs no copy).
// Apart from PairwiseProblem because S never reads it: it is y for the loss's own gradient, other
// features of the same columns (any width) for distillation.
template <typename T>
struct ValueMatrix {
  const T* __restrict__ data;
  int64_t width;
  int64_t row_stride;  // in elements
};

// Softmax G_ij = own_weight * exp(S_ij - own_lse[i]) + other_weight * exp(S_ij - other_lse[j]); a term
// whose lse pointer is nullptr is skipped (the launcher nulls the pointer of a zero-weight term).
struct SoftmaxGradientTerms {
  const float* own_lse;    // (rows,)
  const float* other_lse;  // (cols,)
  float own_weight;
  float other_weight;
};

// Staged transposed (dimension-major), so that a thread's 4 rows (or 4 columns) at one dimension are one
// float4: staged_x[k][i] = x[first_row + i][k0 + k].
struct __align__(16) DotTileStaging {
  float x_chunk[kDimChunk][kBlockRows + kPad];
  float y_chunk[kDimChunk][kBlockCols + kPad];
};

// One rank-1 update of a thread's 4 x 4 register tile: acc[r][c] += a[r] * b[c] (both operands come
// from shared memory as float4, see the static_assert above).
__device__ __forceinline__ void accumulate_outer_product(float4 a4, float4 b4, float (&acc)[kThreadRows][kThreadCols]) {
  const float a[kThreadRows] = {a4.x, a4.y, a4.z, a4.w};
  const float b[kThreadCols] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r)
#pragma unroll
    for (int c = 0; c < kThreadCols; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
}

// staged[k][i] = matrix[first + i][k0 + k], zero outside the matrix (so ragged edges add nothing to the
// dot products). Consecutive threads read consecutive k of one row: coalesced global loads.
template <int kExtent, typename T>
__device__ __forceinline__ void stage_transposed_chunk(const T* __restrict__ matrix, int64_t n, int64_t dim,
                                                       int64_t first, int64_t k0, float (*staged)[kExtent + kPad]) {
  const int k = threadIdx.x % kDimChunk;
  const int64_t column = k0 + k;
#pragma unroll
  for (int i = threadIdx.x / kDimChunk; i < kExtent; i += kThreads / kDimChunk) {
    const int64_t row = first + i;
    staged[k][i] = (row < n && column < dim) ? to_float(matrix[row * dim + column]) : 0.f;
  }
}

// dots[r][c] = <x[first_row + thread_row * 4 + r], y[first_col + thread_col * 4 + c]> in fp32, 0 for rows
// or columns past the end. Ends with __syncthreads(), so `staging` may be reused right after.
template <typename T>
__device__ __forceinline__ void compute_dot_tile(const PairwiseProblem<T>& p, int64_t first_row, int64_t first_col,
                                                 DotTileStaging& staging, float (&dots)[kThreadRows][kThreadCols]) {
  const int thread_row = threadIdx.x / kColThreads;
  const int thread_col = threadIdx.x % kColThreads;
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r)
#pragma unroll
    for (int c = 0; c < kThreadCols; ++c) dots[r][c] = 0.f;

  for (int64_t k0 = 0; k0 < p.dim; k0 += kDimChunk) {
    stage_transposed_chunk<kBlockRows>(p.x, p.rows, p.dim, first_row, k0, staging.x_chunk);
    stage_transposed_chunk<kBlockCols>(p.y, p.cols, p.dim, first_col, k0, staging.y_chunk);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDimChunk; ++k) {
      accumulate_outer_product(*reinterpret_cast<const float4*>(&staging.x_chunk[k][thread_row * kThreadRows]),
                               *reinterpret_cast<const float4*>(&staging.y_chunk[k][thread_col * kThreadCols]), dots);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// Row statistics, one per (thread, row): add() folds the thread's 4 logits of a tile (masked ones are
// -inf), merge_row_threads() combines the 16 threads of the row (all threads must call it).
// ---------------------------------------------------------------------------------------------------
template <LossKind kKind>
struct RowStatistic;

template <>
struct RowStatistic<LossKind::kSoftmax> {
  float running_max = -INFINITY;
  float running_sum = 0.f;  // sum_j exp(S_ij - running_max)

  __device__ __forceinline__ void add(const float (&logits)[kThreadCols]) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < kThreadCols; ++c) tile_max = fmaxf(tile_max, logits[c]);
    float tile_sum = 0.f;
#pragma unroll
    for (int c = 0; c < kThreadCols; ++c) tile_sum += rescale_factor(logits[c], tile_max);
    online_lse_merge(running_max, running_sum, tile_max, tile_sum);
  }
  __device__ __forceinline__ void merge_row_threads() {
#pragma unroll
    for (int lane_offset = kColThreads / 2; lane_offset > 0; lane_offset /= 2) {
      const float other_max = __shfl_xor_sync(0xffffffffu, running_max, lane_offset);
      const float other_sum = __shfl_xor_sync(0xffffffffu, running_sum, lane_offset);
      online_lse_merge(running_max, running_sum, other_max, other_sum);
    }
  }
  __device__ __forceinline__ float result() const { return lse_from_state(running_max, running_sum); }
};

template <>
struct RowStatistic<LossKind::kSigmoid> {
  float softplus_sum = 0.f;

  __device__ __forceinline__ void add(const float (&logits)[kThreadCols]) {
#pragma unroll
    for (int c = 0; c < kThreadCols; ++c) softplus_sum += softplus(logits[c]);
  }
  __device__ __forceinline__ void merge_row_threads() {
#pragma unroll
    for (int lane_offset = kColThreads / 2; lane_offset > 0; lane_offset /= 2)
      softplus_sum += __shfl_xor_sync(0xffffffffu, softplus_sum, lane_offset);
  }
  __device__ __forceinline__ float result() const { return softplus_sum; }
};

// row_result[i] = lse_j(S_ij) (softmax) or sum_j softplus(S_ij + bias) (sigmoid). Grid: one block per
// kBlockRows rows; no thread returns early (the shuffles and barriers need all of them).
template <typename T, LossKind kKind>
__global__ void __launch_bounds__(kThreads, kRowReductionBlocksPerSm)
    row_reduction_kernel(const PairwiseProblem<T> p, float* __restrict__ row_result) {
  __shared__ DotTileStaging staging;
  const int thread_row = threadIdx.x / kColThreads;
  const int thread_col = threadIdx.x % kColThreads;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const float scale = *p.scale;
  const float bias = kKind == LossKind::kSigmoid ? *p.bias : 0.f;

  RowStatistic<kKind> statistic[kThreadRows];
  for (int64_t first_col = 0; first_col < p.cols; first_col += kBlockCols) {
    float dots[kThreadRows][kThreadCols];
    compute_dot_tile(p, first_row, first_col, staging, dots);
#pragma unroll
    for (int r = 0; r < kThreadRows; ++r) {
      float logits[kThreadCols];
#pragma unroll
      for (int c = 0; c < kThreadCols; ++c) {
        const int64_t col = first_col + thread_col * kThreadCols + c;
        // -inf is neutral for both statistics: exp(-inf) = 0 and softplus(-inf) = 0.
        logits[c] = col < p.cols ? fmaf(scale, dots[r][c], bias) : -INFINITY;
      }
      statistic[r].add(logits);
    }
  }

#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
    statistic[r].merge_row_threads();
    const int64_t row = first_row + thread_row * kThreadRows + r;
    if (thread_col == 0 && row < p.rows) row_result[row] = statistic[r].result();
  }
}

// Shared memory of the gradient kernel (dynamic: 51 KiB, above the 48 KiB static limit).
struct __align__(16) GradientSmem {
  // G^T of the current column panel: g_panel[j][i] = G[first_row + i][panel_col + j], transposed so that a
  // thread's 4 rows at one column are one float4.
  float g_panel[kPanelCols][kBlockRows + kPad];
  union {
    DotTileStaging dot;  // while recomputing S
    // values[first_col + j][d0 + d], while contracting G @ values
    float value_chunk[kBlockCols][kGradDimChunk + kPad];
  } staging;
};

// value_chunk[j][d] = values[first_col + j][d0 + d], zero outside the matrix (so ragged edges add nothing).
// Consecutive threads read consecutive d: coalesced global loads.
template <typename T>
__device__ __forceinline__ void stage_value_chunk(const ValueMatrix<T>& values, int64_t cols, int64_t first_col,
                                                  int64_t d0, float (*value_chunk)[kGradDimChunk + kPad]) {
  const int d = threadIdx.x % kGradDimChunk;
  const int64_t column = d0 + d;
#pragma unroll
  for (int j = threadIdx.x / kGradDimChunk; j < kBlockCols; j += kThreads / kGradDimChunk) {
    const int64_t value_row = first_col + j;
    value_chunk[j][d] = (value_row < cols && column < values.width)
                            ? to_float(values.data[value_row * values.row_stride + column])
                            : 0.f;
  }
}

// grad_x[i] = sum_j G_ij values_j (grad_x: (rows, values.width), row-major) for the block's kBlockRows rows,
// and grad_row_sum[i] = sum_j G_ij when non-null. The value width (up to ~1152) is too large for a whole
// grad_x row block to live in registers, so:
//   for each panel of kPanelCols columns:
//     recompute its S tiles, store G for the panel in shared memory (the expensive part, done once);
//     for each chunk of kGradDimChunk value columns:
//       acc (4 x 4 per thread, registers) = G_panel @ values[panel, chunk];
//       grad_x[rows, chunk] (= on the first panel, += afterwards) acc   -- read-modify-write in global.
// Each grad_x element is touched by one fixed thread, so the global read-modify-write needs no atomics
// or barriers and is deterministic; the panel amortises that traffic over kPanelCols columns. cols > 0.
template <typename T, LossKind kKind>
__global__ void __launch_bounds__(kThreads, kGradientBlocksPerSm)
    gradient_kernel(const PairwiseProblem<T> p, const ValueMatrix<T> values, const SoftmaxGradientTerms terms,
                    float* __restrict__ grad_x, float* __restrict__ grad_row_sum) {
  extern __shared__ float4 gradient_smem_storage[];  // float4: 16-byte aligned
  GradientSmem& smem = *reinterpret_cast<GradientSmem*>(gradient_smem_storage);
  const int thread_row = threadIdx.x / kColThreads;
  const int thread_col = threadIdx.x % kColThreads;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const float scale = *p.scale;
  const float bias = kKind == LossKind::kSigmoid ? *p.bias : 0.f;

  bool row_valid[kThreadRows];
  float own_lse[kThreadRows];  // softmax only: lse of this thread's rows
  float g_row_sum[kThreadRows];
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
    const int64_t row = first_row + thread_row * kThreadRows + r;
    row_valid[r] = row < p.rows;
    own_lse[r] = (kKind == LossKind::kSoftmax && terms.own_lse != nullptr && row_valid[r]) ? terms.own_lse[row] : 0.f;
    g_row_sum[r] = 0.f;
  }

  for (int64_t panel_col = 0; panel_col < p.cols; panel_col += kPanelCols) {
    // Tiles of this panel that hold at least one column; the same bound limits both loops below, so
    // g_panel entries left over from the previous panel are never read.
    const int64_t tiles_left = (p.cols - panel_col + kBlockCols - 1) / kBlockCols;
    const int panel_tiles = tiles_left < kPanelTiles ? static_cast<int>(tiles_left) : kPanelTiles;

    for (int tile = 0; tile < panel_tiles; ++tile) {
      const int64_t first_col = panel_col + tile * kBlockCols;
      float dots[kThreadRows][kThreadCols];
      compute_dot_tile(p, first_row, first_col, smem.staging.dot, dots);
      float g[kThreadRows][kThreadCols];
#pragma unroll
      for (int c = 0; c < kThreadCols; ++c) {
        const int64_t col = first_col + thread_col * kThreadCols + c;
        const bool col_valid = col < p.cols;
        float other_lse = 0.f;
        if (kKind == LossKind::kSoftmax && terms.other_lse != nullptr && col_valid) other_lse = terms.other_lse[col];
#pragma unroll
        for (int r = 0; r < kThreadRows; ++r) {
          const float logit = fmaf(scale, dots[r][c], bias);
          float coefficient = 0.f;  // rows/columns past the end contribute nothing
          if (row_valid[r] && col_valid) {
            if constexpr (kKind == LossKind::kSigmoid) {
              coefficient = sigmoid(logit);
            } else {
              if (terms.own_lse != nullptr) coefficient += terms.own_weight * expf(logit - own_lse[r]);
              if (terms.other_lse != nullptr) coefficient += terms.other_weight * expf(logit - other_lse);
            }
          }
          g[r][c] = coefficient;
          g_row_sum[r] += coefficient;
        }
      }
#pragma unroll
      for (int c = 0; c < kThreadCols; ++c) {
        float* g_column = &smem.g_panel[tile * kBlockCols + thread_col * kThreadCols + c][thread_row * kThreadRows];
        *reinterpret_cast<float4*>(g_column) = make_float4(g[0][c], g[1][c], g[2][c], g[3][c]);
      }
    }
    __syncthreads();  // g_panel complete; the last compute_dot_tile already released the staging area

    const bool first_panel = panel_col == 0;
    for (int64_t d0 = 0; d0 < values.width; d0 += kGradDimChunk) {
      // acc[r][e] = sum over the panel's columns j of G[thread_row*4 + r][j] * values[j][d0 + thread_col*4 + e]
      float acc[kThreadRows][kThreadCols];
#pragma unroll
      for (int r = 0; r < kThreadRows; ++r)
#pragma unroll
        for (int e = 0; e < kThreadCols; ++e) acc[r][e] = 0.f;

      for (int tile = 0; tile < panel_tiles; ++tile) {
        stage_value_chunk(values, p.cols, panel_col + tile * kBlockCols, d0, smem.staging.value_chunk);
        __syncthreads();
#pragma unroll 8
        for (int j = 0; j < kBlockCols; ++j) {
          accumulate_outer_product(
              *reinterpret_cast<const float4*>(&smem.g_panel[tile * kBlockCols + j][thread_row * kThreadRows]),
              *reinterpret_cast<const float4*>(&smem.staging.value_chunk[j][thread_col * kThreadCols]), acc);
        }
        __syncthreads();  // value_chunk (and, after the last chunk, g_panel) may be overwritten
      }

#pragma unroll
      for (int r = 0; r < kThreadRows; ++r) {
        if (!row_valid[r]) continue;
        float* grad_row = grad_x + (first_row + thread_row * kThreadRows + r) * values.width;
#pragma unroll
        for (int e = 0; e < kThreadCols; ++e) {
          const int64_t d = d0 + thread_col * kThreadCols + e;
          if (d < values.width) grad_row[d] = first_panel ? acc[r][e] : grad_row[d] + acc[r][e];
        }
      }
    }
  }

  if (grad_row_sum == nullptr) return;  // block-uniform, and no barrier or shuffle follows otherwise
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
#pragma unroll
    for (int lane_offset = kColThreads / 2; lane_offset > 0; lane_offset /= 2)
      g_row_sum[r] += __shfl_xor_sync(0xffffffffu, g_row_sum[r], lane_offset);
    if (thread_col == 0 && row_valid[r]) grad_row_sum[first_row + thread_row * kThreadRows + r] = g_row_sum[r];
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------

// Checks shared by every launcher (see the header): sizes non-negative, the grid fits, and x / y / scale
// present whenever they will be read.
cudaError_t check_problem(const void* x, const void* y, int64_t rows, int64_t cols, int64_t dim, const float* scale) {
  if (rows < 0 || cols < 0 || dim < 0) return cudaErrorInvalidValue;
  if ((rows + kBlockRows - 1) / kBlockRows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (rows > 0 && scale == nullptr) return cudaErrorInvalidValue;
  if (rows > 0 && cols > 0 && dim > 0 && (x == nullptr || y == nullptr)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

unsigned int row_blocks(int64_t rows) { return static_cast<unsigned int>((rows + kBlockRows - 1) / kBlockRows); }

template <typename T>
PairwiseProblem<T> make_problem(const void* x, const void* y, int64_t rows, int64_t cols, int64_t dim,
                                const float* scale, const float* bias) {
  return PairwiseProblem<T>{static_cast<const T*>(x), static_cast<const T*>(y), rows, cols, dim, scale, bias};
}

template <LossKind kKind>
cudaError_t launch_row_reduction(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                                 const float* scale, const float* bias, float* row_result, void* stream) {
  if (const cudaError_t error = check_problem(x, y, rows, cols, dim, scale)) return error;
  if (rows > 0 && row_result == nullptr) return cudaErrorInvalidValue;
  if (rows > 0 && kKind == LossKind::kSigmoid && bias == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (rows == 0) return cudaSuccess;
    // cols == 0 runs too: no tile is visited, and the neutral statistics (-inf, 0) are written.
    row_reduction_kernel<T, kKind><<<row_blocks(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        make_problem<T>(x, y, rows, cols, dim, scale, bias), row_result);
    return cudaGetLastError();
  });
}

// Zero-fills n floats (n may be 0, and then ptr may be NULL).
cudaError_t zero_floats(float* ptr, int64_t n, cudaStream_t stream) {
  return n > 0 ? cudaMemsetAsync(ptr, 0, static_cast<size_t>(n) * sizeof(float), stream) : cudaSuccess;
}

template <LossKind kKind>
cudaError_t launch_gradient(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                            const void* values, int64_t value_dim, int64_t value_stride, const float* scale,
                            const float* bias, SoftmaxGradientTerms terms, float* grad_x, float* grad_row_sum,
                            void* stream_handle) {
  if (const cudaError_t error = check_problem(x, y, rows, cols, dim, scale)) return error;
  if (value_dim < 0 || value_stride < 0) return cudaErrorInvalidValue;
  if (rows > 0 && cols > 0 && value_dim > 0 && values == nullptr) return cudaErrorInvalidValue;
  if (rows > 0 && value_dim > 0 && grad_x == nullptr) return cudaErrorInvalidValue;
  if (rows > 0 && kKind == LossKind::kSigmoid && bias == nullptr) return cudaErrorInvalidValue;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (rows == 0) return cudaSuccess;
    const bool g_is_zero = kKind == LossKind::kSoftmax && terms.own_lse == nullptr && terms.other_lse == nullptr;
    if (cols == 0 || g_is_zero) {
      // G has no (non-zero) entry: grad_x = 0 and grad_row_sum = 0, without reading x, y or the values.
      if (const cudaError_t error = zero_floats(grad_x, rows * value_dim, stream)) return error;
      return grad_row_sum != nullptr ? zero_floats(grad_row_sum, rows, stream) : cudaSuccess;
    }
    const auto kernel = gradient_kernel<T, kKind>;
    constexpr int kSmemBytes = sizeof(GradientSmem);
    if (const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes))
      return error;
    const ValueMatrix<T> value_matrix{static_cast<const T*>(values), value_dim, value_stride};
    kernel<<<row_blocks(rows), kThreads, kSmemBytes, stream>>>(make_problem<T>(x, y, rows, cols, dim, scale, bias),
                                                               value_matrix, terms, grad_x, grad_row_sum);
    return cudaGetLastError();
  });
}

}  // namespace

extern "C" {

int clipfast_contrastive_lse_cuda(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                                  const float* scale, float* lse, void* stream) {
  return launch_row_reduction<LossKind::kSoftmax>(x, y, dtype, rows, cols, dim, scale, nullptr, lse, stream);
}

int clipfast_contrastive_grad_cuda(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                                   const void* values, int64_t value_dim, int64_t value_stride, const float* scale,
                                   const float* own_lse, const float* other_lse, float own_weight,
                                   float other_weight, float* grad_x, void* stream) {
  // A zero-weight term is dropped here, not multiplied by 0 in the kernel: 0 * exp(S - lse) would be NaN
  // for an lse that does not belong to S (or is absent).
  const SoftmaxGradientTerms terms{own_weight != 0.f ? own_lse : nullptr, other_weight != 0.f ? other_lse : nullptr,
                                   own_weight, other_weight};
  return launch_gradient<LossKind::kSoftmax>(x, y, dtype, rows, cols, dim, values, value_dim, value_stride, scale,
                                             nullptr, terms, grad_x, nullptr, stream);
}

int clipfast_siglip_softplus_cuda(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                                  const float* scale, const float* bias, float* row_sum, void* stream) {
  return launch_row_reduction<LossKind::kSigmoid>(x, y, dtype, rows, cols, dim, scale, bias, row_sum, stream);
}

int clipfast_siglip_grad_cuda(const void* x, const void* y, int dtype, int64_t rows, int64_t cols, int64_t dim,
                              const float* scale, const float* bias, float* grad_x, float* grad_row_sum, void* stream) {
  // SigLIP's gradient is contracted with y itself: values = y (cols, dim), rows dim apart.
  return launch_gradient<LossKind::kSigmoid>(x, y, dtype, rows, cols, dim, y, dim, dim, scale, bias,
                                             SoftmaxGradientTerms{}, grad_x, grad_row_sum, stream);
}

}  // extern "C"
