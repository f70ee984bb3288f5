// CUDA kernels for the feature Gram sums behind the Schur-complement kernel covariance of "Dissecting
// CLIP" (arXiv 2412.18645). Image rows x_i and text rows t_i (n pairs, dim columns) are mapped to F
// features each by the features phi of the covariance, and the op needs
//
//   S_tt = sum_i phi(t_i) phi(t_i)^T,   S_tx = sum_i phi(t_i) phi(x_i)^T,   S_xx = sum_i phi(x_i) phi(x_i)^T
//
// with phi the raw rows for column_cosine (z; the columns are normalised afterwards, in Python), the unit
// rows for row_cosine (z / max(||z||, 1e-12)) or random Fourier features of the Gaussian kernel for rff
// (phi(z) = [cos(z W), sin(z W)] / sqrt(m), W: (dim, m); Rahimi & Recht, "Random Features for Large-Scale
// Kernel Machines", NIPS 2007).
//
// Algorithm (driven by csrc/cuda/schur_covariance_binding.cpp, one launcher per step):
//   - The n rows are processed in tiles of kTileRows (1024, in the binding). For each tile the features
//     of both sides are written into fp32 scratch buffers (rows, F): column_cosine converts, row_cosine
//     uses one warp per row (norm by a warp reduction, then scale), RFF is a tiled GEMM u = z W whose
//     epilogue writes cos u and sin u (scaled by 1/sqrt(m)) straight into the two halves.
//   - The three sums then get rank-`rows` updates S += A^T B (a tiled GEMM over the (F, F) output).
//   - Backward: the same tile features are recomputed, dphi = phi M products (the same GEMM with an
//     optional transposed B and beta = 1 accumulation) give
//       dphi_x = phi_x (G_xx + G_xx^T) + phi_t G_tx,   dphi_t = phi_t (G_tt + G_tt^T) + phi_x G_tx^T,
//     and the chain rule through phi runs per row: row_cosine dz = (dphi - phi <phi, dphi>) / r (one
//     warp per row), RFF du = phi_cos * dphi_sin - phi_sin * dphi_cos (elementwise; the 1/sqrt(m) of the
//     derivative cancels the sqrt(m) of cos u = sqrt(m) phi_cos), then dz = du W^T (GEMM).
// Why: the n x F feature matrices never exist (for RFF, F = 2m can be several times dim): memory is
// O(F^2 + kTileRows * F) whatever n, and every step is a plain GEMM or a row-local map.
// GEMM: 256 threads per 64 x 64 output tile, each thread a 4 x 4 register tile; operands staged through
// shared memory kChunkK inner indices at a time, converted to fp32 on load; fp32 FMAs throughout.
// Determinism: every output element is owned by one thread and accumulated in a fixed order (no atomics;
// the row reductions are fixed-shape warp shuffles), so results are bitwise reproducible.
// Cost: forward 3 * n * F^2 FMAs (+ n * dim * m for RFF); backward 4 * n * F^2 (+ 2 * n * dim * m).
//
// References: Dissecting CLIP (arXiv:2412.18645); random Fourier features (Rahimi & Recht, 2007).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "clipfast/cuda_elements.cuh"
#include "clipfast/schur_covariance_cuda.h"

namespace {

using clipfast::dispatch_dtype;
using clipfast::to_float;

constexpr float kRowNormEps = 1e-12f;


// ---------------------------------------------------------------------------------------------------
// Tiled GEMM. 256 threads form a 16 x 16 grid: thread (thread_row, thread_col) computes the output rows
// thread_row * 4 + [0, 4) and columns thread_col * 4 + [0, 4) of a 64 x 64 tile.
// ---------------------------------------------------------------------------------------------------
constexpr int kThreads = 256;
constexpr int kTileM = 64;     // output rows per block
constexpr int kTileN = 64;     // output columns per block
constexpr int kThreadM = 4;    // output rows per thread
constexpr int kThreadN = 4;    // output columns per thread
constexpr int kChunkK = 32;    // inner indices staged per step
constexpr int kPad = 4;        // keeps staged rows 16-byte aligned (float4 reads), shifts rows by 4 banks
constexpr int kThreadCols = kTileN / kThreadN;  // 16
constexpr int kGemmBlocksPerSm = 2;             // register cap of 128 per thread
// Elementwise and per-row kernels.
constexpr int kWarpsPerBlock = kThreads / 32;   // rows per block of the per-row kernels
constexpr int64_t kMaxElementwiseBlocks = 1 << 20;

static_assert(kTileM == kTileN, "both operands are staged with the same helper");
static_assert((kTileM / kThreadM) * (kTileN / kThreadN) == kThreads, "one thread per 4 x 4 register tile");
static_assert(kThreadM == 4 && kThreadN == 4, "register tiles are read from shared memory as float4");
static_assert(kThreads % kChunkK == 0 && kThreads % kTileM == 0, "staging loops assume whole rows");

enum class Epilogue {
  kStore,  // c[i][j] = acc (+ c[i][j] when accumulating)
  kRff,    // c[i][j] = cos(acc) * scale, c[i][N + j] = sin(acc) * scale
};

// C (M x N, row stride ldc) = op(A) (M x K) @ op(B) (K x N). Element (i, k) of op(A) is
// a[i * lda + k] when kAKContiguous, a[k * lda + i] otherwise; element (k, j) of op(B) is b[j * ldb + k]
// when kBKContiguous, b[k * ldb + j] otherwise.
template <typename TA>
struct GemmProblem {
  const TA* __restrict__ a;
  const float* __restrict__ b;
  float* c;
  int64_t m, n, k;
  int64_t lda, ldb, ldc;
  bool accumulate;   // kStore only
  float rff_scale;   // kRff only
};

struct __align__(16) GemmStaging {
  float a[kChunkK][kTileM + kPad];  // a[k][i] = op(A)[first_row + i][k0 + k]
  float b[kChunkK][kTileN + kPad];  // b[k][j] = op(B)[k0 + k][first_col + j]
};

// staged[k][i] = element (first + i, k0 + k) of an operand with `extent` rows (i) and `inner` inner
// indices (k), zero outside it (ragged edges add nothing). The thread mapping follows the contiguous
// index of the operand, so consecutive threads read consecutive addresses (coalesced).
template <bool kKContiguous, typename T>
__device__ __forceinline__ void stage_chunk(const T* __restrict__ src, int64_t ld, int64_t extent, int64_t inner,
                                            int64_t first, int64_t k0, float (*staged)[kTileM + kPad]) {
  if (kKContiguous) {
    const int k = threadIdx.x % kChunkK;
    const int64_t kk = k0 + k;
#pragma unroll
    for (int i = threadIdx.x / kChunkK; i < kTileM; i += kThreads / kChunkK) {
      const int64_t row = first + i;
      staged[k][i] = (row < extent && kk < inner) ? to_float(src[row * ld + kk]) : 0.f;
    }
  } else {
    const int i = threadIdx.x % kTileM;
    const int64_t row = first + i;
#pragma unroll
    for (int k = threadIdx.x / kTileM; k < kChunkK; k += kThreads / kTileM) {
      const int64_t kk = k0 + k;
      staged[k][i] = (row < extent && kk < inner) ? to_float(src[kk * ld + row]) : 0.f;
    }
  }
}

// acc[r][c] += a[r] * b[c]
__device__ __forceinline__ void accumulate_outer_product(float4 a4, float4 b4, float (&acc)[kThreadM][kThreadN]) {
  const float a[kThreadM] = {a4.x, a4.y, a4.z, a4.w};
  const float b[kThreadN] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
  for (int r = 0; r < kThreadM; ++r)
#pragma unroll
    for (int c = 0; c < kThreadN; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
}

// Grid: x = output row tiles, y = output column tiles. No thread returns before the last barrier.
template <typename TA, bool kAKContiguous, bool kBKContiguous, Epilogue kEpilogue>
__global__ void __launch_bounds__(kThreads, kGemmBlocksPerSm) gemm_kernel(const GemmProblem<TA> p) {
  __shared__ GemmStaging staging;
  const int thread_row = threadIdx.x / kThreadCols;
  const int thread_col = threadIdx.x % kThreadCols;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t first_col = static_cast<int64_t>(blockIdx.y) * kTileN;

  float acc[kThreadM][kThreadN];
#pragma unroll
  for (int r = 0; r < kThreadM; ++r)
#pragma unroll
    for (int c = 0; c < kThreadN; ++c) acc[r][c] = 0.f;

  for (int64_t k0 = 0; k0 < p.k; k0 += kChunkK) {
    stage_chunk<kAKContiguous>(p.a, p.lda, p.m, p.k, first_row, k0, staging.a);
    stage_chunk<kBKContiguous>(p.b, p.ldb, p.n, p.k, first_col, k0, staging.b);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kChunkK; ++k) {
      accumulate_outer_product(*reinterpret_cast<const float4*>(&staging.a[k][thread_row * kThreadM]),
                               *reinterpret_cast<const float4*>(&staging.b[k][thread_col * kThreadN]), acc);
    }
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < kThreadM; ++r) {
    const int64_t i = first_row + thread_row * kThreadM + r;
    if (i >= p.m) continue;
    float* c_row = p.c + i * p.ldc;
#pragma unroll
    for (int c = 0; c < kThreadN; ++c) {
      const int64_t j = first_col + thread_col * kThreadN + c;
      if (j >= p.n) continue;
      if (kEpilogue == Epilogue::kStore) {
        c_row[j] = p.accumulate ? c_row[j] + acc[r][c] : acc[r][c];
      } else {
        float sin_u, cos_u;
        sincosf(acc[r][c], &sin_u, &cos_u);
        c_row[j] = cos_u * p.rff_scale;
        c_row[p.n + j] = sin_u * p.rff_scale;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Row-local kernels
// ---------------------------------------------------------------------------------------------------

// Sum over the 32 lanes (every lane gets the total; fixed order, so deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int lane_offset = 16; lane_offset > 0; lane_offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, lane_offset);
  return v;
}

// sum_k row[k]^2 over the lanes of a warp.
template <typename T>
__device__ __forceinline__ float row_squared_norm(const T* __restrict__ row, int64_t dim, int lane) {
  float sum = 0.f;
  for (int64_t k = lane; k < dim; k += 32) {
    const float v = to_float(row[k]);
    sum = fmaf(v, v, sum);
  }
  return warp_sum(sum);
}

// phi[i] = z[i] as fp32, count = rows * dim elements (z already offset to the tile).
template <typename T>
__global__ void __launch_bounds__(kThreads) convert_kernel(const T* __restrict__ z, int64_t count,
                                                           float* __restrict__ phi) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count; idx += stride)
    phi[idx] = to_float(z[idx]);
}

// One warp per row: phi[i] = z[i] / max(||z[i]||, eps). The row index is warp-uniform, so the early
// return keeps whole warps together for the shuffles.
template <typename T>
__global__ void __launch_bounds__(kThreads) row_normalize_kernel(const T* __restrict__ z, int64_t rows, int64_t dim,
                                                                 float* __restrict__ phi) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const T* z_row = z + row * dim;
  const float inv_norm = 1.f / fmaxf(sqrtf(row_squared_norm(z_row, dim, lane)), kRowNormEps);
  float* phi_row = phi + row * dim;
  for (int64_t k = lane; k < dim; k += 32) phi_row[k] = to_float(z_row[k]) * inv_norm;
}

// One warp per row: dz = (dphi - phi <phi, dphi>) / norm where norm > eps, dphi / eps otherwise.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_cosine_grad_kernel(const T* __restrict__ z, int64_t rows, int64_t dim, const float* __restrict__ phi,
                               const float* __restrict__ dphi, float* __restrict__ dz) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const float norm = sqrtf(row_squared_norm(z + row * dim, dim, lane));
  const float* phi_row = phi + row * dim;
  const float* dphi_row = dphi + row * dim;
  float dot = 0.f;
  for (int64_t k = lane; k < dim; k += 32) dot = fmaf(phi_row[k], dphi_row[k], dot);
  const float dot_sum = warp_sum(dot);  // every lane takes part in the shuffles
  const float radial = norm > kRowNormEps ? dot_sum : 0.f;
  const float inv_r = 1.f / fmaxf(norm, kRowNormEps);
  float* dz_row = dz + row * dim;
  for (int64_t k = lane; k < dim; k += 32) dz_row[k] = (dphi_row[k] - phi_row[k] * radial) * inv_r;
}

// du[i][k] = phi[i][k] * dphi[i][m + k] - phi[i][m + k] * dphi[i][k]; phi, dphi: (rows, 2m), du: (rows, m).
__global__ void __launch_bounds__(kThreads) rff_du_kernel(const float* __restrict__ phi, const float* __restrict__ dphi,
                                                          int64_t rows, int64_t m, float* __restrict__ du) {
  const int64_t count = rows * m;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count; idx += stride) {
    const int64_t i = idx / m, k = idx % m;
    const int64_t cos_at = i * 2 * m + k, sin_at = cos_at + m;
    du[idx] = phi[cos_at] * dphi[sin_at] - phi[sin_at] * dphi[cos_at];
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------

unsigned int elementwise_blocks(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxElementwiseBlocks ? blocks : kMaxElementwiseBlocks);
}

cudaError_t check_row_blocks(int64_t rows) {
  return (rows + kWarpsPerBlock - 1) / kWarpsPerBlock > 0x7fffffff ? cudaErrorInvalidConfiguration : cudaSuccess;
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// Launches gemm_kernel over the (p.m, p.n) output; nothing when it is empty.
template <typename TA, bool kAKContiguous, bool kBKContiguous, Epilogue kEpilogue>
cudaError_t launch_gemm(const GemmProblem<TA>& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  const int64_t row_tiles = (p.m + kTileM - 1) / kTileM, col_tiles = (p.n + kTileN - 1) / kTileN;
  if (row_tiles > 0x7fffffff || col_tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(row_tiles), static_cast<unsigned int>(col_tiles));
  gemm_kernel<TA, kAKContiguous, kBKContiguous, kEpilogue><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t features(const void* z_handle, int dtype, int64_t r0, int64_t rows, int64_t dim, int covariance,
                     const float* omegas, int64_t m, float* phi, cudaStream_t stream) {
  if (r0 < 0 || rows < 0 || dim < 0) return cudaErrorInvalidValue;
  const bool rff = covariance == CLIPFAST_SCHUR_COVARIANCE_RFF;
  if (covariance != CLIPFAST_SCHUR_COVARIANCE_COLUMN_COSINE && covariance != CLIPFAST_SCHUR_COVARIANCE_ROW_COSINE &&
      !rff)
    return cudaErrorInvalidValue;
  if (rff && m <= 0) return cudaErrorInvalidValue;
  const int64_t features = rff ? 2 * m : dim;
  const bool reads_z = rows > 0 && dim > 0;
  if (reads_z && z_handle == nullptr) return cudaErrorInvalidValue;
  if (rows > 0 && features > 0 && phi == nullptr) return cudaErrorInvalidValue;
  if (rff && reads_z && omegas == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (rows == 0 || features == 0) return cudaSuccess;
    const T* z = static_cast<const T*>(z_handle) + (reads_z ? r0 * dim : 0);
    switch (covariance) {
      case CLIPFAST_SCHUR_COVARIANCE_COLUMN_COSINE:
        convert_kernel<T><<<elementwise_blocks(rows * dim), kThreads, 0, stream>>>(z, rows * dim, phi);
        return cudaGetLastError();
      case CLIPFAST_SCHUR_COVARIANCE_ROW_COSINE:
        if (const cudaError_t error = check_row_blocks(rows)) return error;
        row_normalize_kernel<T><<<row_blocks(rows), kThreads, 0, stream>>>(z, rows, dim, phi);
        return cudaGetLastError();
      default: {
        // u = z W (rows x m, inner dim); the epilogue writes cos u / sqrt(m) and sin u / sqrt(m).
        const GemmProblem<T> p{z, omegas, phi, rows, m, dim, /*lda=*/dim, /*ldb=*/m, /*ldc=*/2 * m, false,
                               static_cast<float>(1.0 / sqrt(static_cast<double>(m)))};
        return launch_gemm<T, true, false, Epilogue::kRff>(p, stream);
      }
    }
  });
}

}  // namespace

extern "C" {

int clipfast_schur_covariance_features_cuda(const void* z, int dtype, int64_t r0, int64_t rows, int64_t dim,
                                            int covariance, const float* omegas, int64_t m, float* phi, void* stream) {
  return features(z, dtype, r0, rows, dim, covariance, omegas, m, phi, static_cast<cudaStream_t>(stream));
}

int clipfast_schur_covariance_gram_accumulate_cuda(const float* a, const float* b, int64_t rows, int64_t features,
                                                   float* s, void* stream) {
  if (rows < 0 || features < 0) return cudaErrorInvalidValue;
  if (rows == 0 || features == 0) return cudaSuccess;  // S unchanged
  if (a == nullptr || b == nullptr || s == nullptr) return cudaErrorInvalidValue;
  // op(A) = A^T: element (i, k) = a[k * features + i]; op(B) = B: element (k, j) = b[k * features + j].
  const GemmProblem<float> p{a, b, s, features, features, rows, features, features, features, true, 0.f};
  return launch_gemm<float, false, false, Epilogue::kStore>(p, static_cast<cudaStream_t>(stream));
}

int clipfast_schur_covariance_matmul_cuda(const float* a, const float* b, int transpose_b, int64_t rows, int64_t inner,
                                          int64_t cols, int accumulate, float* c, void* stream) {
  if (rows < 0 || inner < 0 || cols < 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (c == nullptr || (inner > 0 && (a == nullptr || b == nullptr))) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (transpose_b != 0) {  // B stored (cols x inner): element (k, j) = b[j * inner + k]
    const GemmProblem<float> p{a, b, c, rows, cols, inner, inner, inner, cols, accumulate != 0, 0.f};
    return launch_gemm<float, true, true, Epilogue::kStore>(p, s);
  }
  const GemmProblem<float> p{a, b, c, rows, cols, inner, inner, cols, cols, accumulate != 0, 0.f};
  return launch_gemm<float, true, false, Epilogue::kStore>(p, s);
}

int clipfast_schur_covariance_row_cosine_grad_cuda(const void* z_handle, int dtype, int64_t r0, int64_t rows,
                                                   int64_t dim, const float* phi, const float* dphi, float* dz,
                                                   void* stream) {
  if (r0 < 0 || rows < 0 || dim < 0) return cudaErrorInvalidValue;
  if (rows > 0 && dim > 0 && (z_handle == nullptr || phi == nullptr || dphi == nullptr || dz == nullptr))
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (rows == 0 || dim == 0) return cudaSuccess;
    if (const cudaError_t error = check_row_blocks(rows)) return error;
    row_cosine_grad_kernel<T><<<row_blocks(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(z_handle) + r0 * dim, rows, dim, phi, dphi, dz);
    return cudaGetLastError();
  });
}

int clipfast_schur_covariance_rff_du_cuda(const float* phi, const float* dphi, int64_t rows, int64_t m, float* du,
                                          void* stream) {
  if (rows < 0 || m < 0) return cudaErrorInvalidValue;
  if (rows == 0 || m == 0) return cudaSuccess;
  if (phi == nullptr || dphi == nullptr || du == nullptr) return cudaErrorInvalidValue;
  rff_du_kernel<<<elementwise_blocks(rows * m), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(phi, dphi, rows, m,
                                                                                                   du);
  return cudaGetLastError();
}

}  // extern "C"
