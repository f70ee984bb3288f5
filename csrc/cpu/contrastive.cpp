// Fused contrastive-loss kernels for the CPU: CLIP's InfoNCE (arXiv:2103.00020) and SigLIP's sigmoid
// loss (arXiv:2303.15343) over S = scale * x @ y^T, tile by tile, never materialising S.
//
// Algorithm. Rows of x are split into blocks of kRowBlock; each OpenMP thread owns a contiguous range
// of row blocks (at::parallel_for's static split). For every (row block, column block) tile one BLAS
// GEMM makes the kRowBlock x kColBlock tile of x y^T in a per-thread buffer, and our fused loop then
//   - forward: merges the tile into the row log-sum-exp state (m_i, l_i) and, for the symmetric loss,
//     into a per-thread column state (m_j, l_j) with the online rule
//         m' = max(m, max(tile)),  l' = l * exp(m - m') + sum exp(tile - m')
//     (Milakov & Gimelshein, arXiv:1805.02867), so both directions cost ONE GEMM per tile; the
//     per-thread column states are merged in thread order at the end (deterministic);
//   - gradient: recomputes the tile, turns it into G in place and accumulates grad_x += G y (rows
//     owned by this thread) and grad_y += G^T x (a per-thread partial, summed in thread order).
// Cost: 1 GEMM unit forward, 3 backward (open_clip: 2 + 4). Extra memory: per thread one tile and
// O(cols) state forward, one (cols, dim) partial backward: O((rows + cols) * dim), never rows * cols.
//
// Numerics: fp32 accumulation for fp32/fp16/bf16 inputs (16-bit inputs are upcast once, O(N*D));
// fp64 inputs run entirely in fp64 (used by gradcheck). Results are bitwise reproducible for a given
// thread count (static split, fixed merge order); they may differ in the last bits across counts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "clipfast/checks.h"

// The element-wise loops are compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one at
// run time (GCC function multi-versioning), so one wheel is fast on every x86 machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLIPFAST_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLIPFAST_MULTIVERSION
#endif
#define CLIPFAST_INLINE inline __attribute__((always_inline))

namespace clipfast {
namespace {

constexpr int64_t kRowBlock = 256;
constexpr int64_t kColBlock = 256;

// ---------------------------------------------------------------------------------------------------
// Scalar math. std::exp does not vectorise without -ffast-math, so float uses a branch-free Cephes-style
// exp (range reduction by n = round(x / ln 2), degree-6 polynomial, 2^n by exponent bits; max relative
// error about 2 ulp). Every argument in this file is <= 0 (x - max, -|x|), and exp(-inf) = 0, NaN stays
// NaN. fp64 (testing) uses libm.
// ---------------------------------------------------------------------------------------------------
CLIPFAST_INLINE float exp_approx(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // NaN passes through
  const float round_magic = 12582912.0f;                                 // 1.5 * 2^23: round to nearest
  const float n = (clamped * 1.44269504088896341f + round_magic) - round_magic;
  float r = clamped - n * 0.693359375f;  // ln 2 split in two for an exact reduction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = (static_cast<uint32_t>(static_cast<int32_t>(n)) + 127u) << 23;
  const float result = p * __builtin_bit_cast(float, bits);
  return x < -87.0f ? 0.0f : result;
}

// log(u) for u in [1, 2] (Cephes logf polynomial on the mantissa in [sqrt(1/2), sqrt(2))).
CLIPFAST_INLINE float log_1_to_2(float u) {
  const bool upper = u > 1.41421356f;
  const float k = upper ? 1.0f : 0.0f;
  const float x = (upper ? 0.5f * u : u) - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y += k * -2.12194440e-4f;
  y += -0.5f * z;
  return x + y + k * 0.693359375f;
}

// log1p(e) for e in [0, 1]: log(1 + e) * e / ((1 + e) - 1) cancels the rounding of 1 + e (Goldberg),
// which matters for SigLIP's many tiny softplus terms (softplus(-10) = 4.5e-5).
CLIPFAST_INLINE float log1p_unit(float e) {
  const float u = 1.0f + e;
  const float d = u - 1.0f;
  return d == 0.0f ? e : log_1_to_2(u) * (e / d);
}

CLIPFAST_INLINE float exp_(float x) { return exp_approx(x); }
CLIPFAST_INLINE double exp_(double x) { return std::exp(x); }
CLIPFAST_INLINE float log1p_(float e) { return log1p_unit(e); }
CLIPFAST_INLINE double log1p_(double e) { return std::log1p(e); }

template <typename T>
CLIPFAST_INLINE T max_(T a, T b) {
  return a > b ? a : b;
}

// Online LSE update of one running state with a block maximum and the block's sum of exp(v - m_new)
// still to come: returns the factor that rescales the old sum. -inf states (nothing seen yet) give 0
// instead of exp(-inf - -inf) = NaN.
template <typename T>
CLIPFAST_INLINE T rescale_factor(T old_max, T new_max) {
  return old_max == -std::numeric_limits<T>::infinity() ? T(0) : exp_(old_max - new_max);
}

// ---------------------------------------------------------------------------------------------------
// Tile passes. `tile` is a dense (rows, cols) block of x y^T (unscaled), leading dimension cols.
// ---------------------------------------------------------------------------------------------------

// Forward InfoNCE: merge scale * tile into row states and, if col_max != nullptr, into column states.
template <typename T>
CLIPFAST_INLINE void lse_tile(const T* tile, int64_t rows, int64_t cols, T scale, T* row_max, T* row_sum,
                              T* col_max, T* col_sum, T* col_block_max) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = tile + i * cols;
    T block_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < cols; ++j) block_max = max_(block_max, scale * s[j]);
    const T new_max = max_(row_max[i], block_max);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += exp_(scale * s[j] - new_max);
    row_sum[i] = row_sum[i] * rescale_factor(row_max[i], new_max) + sum;
    row_max[i] = new_max;
  }
  if (col_max == nullptr) return;
  for (int64_t j = 0; j < cols; ++j) col_block_max[j] = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = tile + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) col_block_max[j] = max_(col_block_max[j], scale * s[j]);
  }
  for (int64_t j = 0; j < cols; ++j) {
    const T new_max = max_(col_max[j], col_block_max[j]);
    col_sum[j] *= rescale_factor(col_max[j], new_max);
    col_max[j] = new_max;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = tile + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) col_sum[j] += exp_(scale * s[j] - col_max[j]);
  }
}

// Backward InfoNCE: tile <- row_weight * exp(scale*tile - row_lse_i) + col_weight * exp(scale*tile - col_lse_j).
template <typename T>
CLIPFAST_INLINE void softmax_grad_tile(T* tile, int64_t rows, int64_t cols, T scale, const T* row_lse,
                                       const T* col_lse, T row_weight, T col_weight) {
  for (int64_t i = 0; i < rows; ++i) {
    T* s = tile + i * cols;
    const T r = row_lse[i];
    if (col_lse == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) s[j] = row_weight * exp_(scale * s[j] - r);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const T v = scale * s[j];
        s[j] = row_weight * exp_(v - r) + col_weight * exp_(v - col_lse[j]);
      }
    }
  }
}

// Forward SigLIP: row_acc_i += sum_j softplus(scale * tile_ij + bias),
// softplus(v) = max(v, 0) + log1p(exp(-|v|)).
template <typename T>
CLIPFAST_INLINE void softplus_tile(const T* tile, int64_t rows, int64_t cols, T scale, T bias, T* row_acc) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = tile + i * cols;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      const T v = scale * s[j] + bias;
      sum += max_(v, T(0)) + log1p_(exp_(-std::abs(v)));
    }
    row_acc[i] += sum;
  }
}

// Backward SigLIP: tile <- sigmoid(scale * tile + bias), row_acc_i += sum_j of it. sigmoid through
// exp(-|v|) so neither tail overflows.
template <typename T>
CLIPFAST_INLINE void sigmoid_tile(T* tile, int64_t rows, int64_t cols, T scale, T bias, T* row_acc) {
  for (int64_t i = 0; i < rows; ++i) {
    T* s = tile + i * cols;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      const T v = scale * s[j] + bias;
      const T e = exp_(-std::abs(v));
      const T inv = T(1) / (T(1) + e);
      const T g = v >= T(0) ? inv : e * inv;
      s[j] = g;
      sum += g;
    }
    row_acc[i] += sum;
  }
}

// Multi-versioned entry points: the always-inline templates are compiled once per target here.
CLIPFAST_MULTIVERSION void lse_tile_f32(const float* t, int64_t r, int64_t c, float s, float* rm, float* rs,
                                        float* cm, float* cs, float* cbm) {
  lse_tile(t, r, c, s, rm, rs, cm, cs, cbm);
}
void lse_tile_dispatch(const double* t, int64_t r, int64_t c, double s, double* rm, double* rs, double* cm,
                       double* cs, double* cbm) {
  lse_tile(t, r, c, s, rm, rs, cm, cs, cbm);
}
void lse_tile_dispatch(const float* t, int64_t r, int64_t c, float s, float* rm, float* rs, float* cm, float* cs,
                       float* cbm) {
  lse_tile_f32(t, r, c, s, rm, rs, cm, cs, cbm);
}

CLIPFAST_MULTIVERSION void softmax_grad_tile_f32(float* t, int64_t r, int64_t c, float s, const float* rl,
                                                 const float* cl, float rw, float cw) {
  softmax_grad_tile(t, r, c, s, rl, cl, rw, cw);
}
void softmax_grad_tile_dispatch(double* t, int64_t r, int64_t c, double s, const double* rl, const double* cl,
                                double rw, double cw) {
  softmax_grad_tile(t, r, c, s, rl, cl, rw, cw);
}
void softmax_grad_tile_dispatch(float* t, int64_t r, int64_t c, float s, const float* rl, const float* cl, float rw,
                                float cw) {
  softmax_grad_tile_f32(t, r, c, s, rl, cl, rw, cw);
}

CLIPFAST_MULTIVERSION void softplus_tile_f32(const float* t, int64_t r, int64_t c, float s, float b, float* acc) {
  softplus_tile(t, r, c, s, b, acc);
}
void softplus_tile_dispatch(const double* t, int64_t r, int64_t c, double s, double b, double* acc) {
  softplus_tile(t, r, c, s, b, acc);
}
void softplus_tile_dispatch(const float* t, int64_t r, int64_t c, float s, float b, float* acc) {
  softplus_tile_f32(t, r, c, s, b, acc);
}

CLIPFAST_MULTIVERSION void sigmoid_tile_f32(float* t, int64_t r, int64_t c, float s, float b, float* acc) {
  sigmoid_tile(t, r, c, s, b, acc);
}
void sigmoid_tile_dispatch(double* t, int64_t r, int64_t c, double s, double b, double* acc) {
  sigmoid_tile(t, r, c, s, b, acc);
}
void sigmoid_tile_dispatch(float* t, int64_t r, int64_t c, float s, float b, float* acc) {
  sigmoid_tile_f32(t, r, c, s, b, acc);
}

// ---------------------------------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------------------------------

// fp64 stays fp64; everything else computes in fp32 (16-bit inputs upcast once, O(N*D)).
// Inputs may require grad (the kernels are called from inside the autograd-aware clipfast ops): work
// on detached tensors so that the tile GEMMs into our buffers are plain computations.
at::Tensor to_compute_dtype(const at::Tensor& t) {
  const auto dtype = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.detach().to(dtype).contiguous();
}

// Runs body(thread, r0, rows) for every block of kRowBlock rows; each thread gets a contiguous range
// of blocks (at::parallel_for's static split), which makes the thread-ordered merges deterministic.
template <typename Body>
void parallel_row_blocks(int64_t n_rows, const Body& body) {
  const int64_t n_blocks = (n_rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    const int thread = at::get_thread_num();
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t r0 = b * kRowBlock;
      body(thread, r0, std::min(kRowBlock, n_rows - r0));
    }
  });
}

// One thread's tile buffer: product() writes x_block @ y_block^T densely (leading dimension = cols)
// through ATen's BLAS, which runs single-threaded inside the parallel region.
template <typename T>
class TileBuffer {
 public:
  explicit TileBuffer(const at::TensorOptions& options) : data_(kRowBlock * kColBlock), options_(options) {}
  at::Tensor product(const at::Tensor& x_block, const at::Tensor& y_block) {
    at::Tensor tile = at::from_blob(data_.data(), {x_block.size(0), y_block.size(0)}, options_);
    at::mm_out(tile, x_block, y_block.t());
    return tile;
  }
  T* data() { return data_.data(); }

 private:
  std::vector<T> data_;
  at::TensorOptions options_;
};

std::tuple<at::Tensor, at::Tensor> contrastive_lse_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                       const at::Tensor& scale_in, bool with_cols) {
  check_feature_pair(x_in, y_in, "contrastive_lse");
  check_scalar(scale_in, "contrastive_lse", "scale");
  const at::Tensor x = to_compute_dtype(x_in), y = to_compute_dtype(y_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_rows = x.size(0), n_cols = y.size(0);
  at::Tensor row_lse = at::empty({n_rows}, x.options());
  at::Tensor col_lse = at::empty({with_cols ? n_cols : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_lse_cpu", [&] {
    using T = scalar_t;
    const T scale = scale_in.item<double>();
    const T neg_inf = -std::numeric_limits<T>::infinity();
    const int n_threads = at::get_num_threads();
    // Per-thread column states (running max, running sum), merged in thread order below.
    std::vector<T> col_max(with_cols ? n_threads * n_cols : 0, neg_inf);
    std::vector<T> col_sum(with_cols ? n_threads * n_cols : 0, T(0));
    T* row_lse_ptr = row_lse.data_ptr<T>();
    parallel_row_blocks(n_rows, [&](int thread, int64_t r0, int64_t rows) {
      TileBuffer<T> tile(x.options());
      std::vector<T> row_max(rows, neg_inf), row_sum(rows, T(0)), col_block_max(kColBlock);
      const at::Tensor x_block = x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n_cols; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, n_cols - c0);
        tile.product(x_block, y.narrow(0, c0, cols));
        T* cm = with_cols ? col_max.data() + thread * n_cols + c0 : nullptr;
        T* cs = with_cols ? col_sum.data() + thread * n_cols + c0 : nullptr;
        lse_tile_dispatch(tile.data(), rows, cols, scale, row_max.data(), row_sum.data(), cm, cs,
                          col_block_max.data());
      }
      for (int64_t i = 0; i < rows; ++i) row_lse_ptr[r0 + i] = row_max[i] + std::log(row_sum[i]);
    });
    if (!with_cols) return;
    T* col_lse_ptr = col_lse.data_ptr<T>();
    for (int64_t j = 0; j < n_cols; ++j) {
      T m = neg_inf, l = 0;
      for (int t = 0; t < n_threads; ++t) {
        const T tm = col_max[t * n_cols + j], tl = col_sum[t * n_cols + j];
        const T new_max = max_(m, tm);
        l = l * rescale_factor(m, new_max) + tl * rescale_factor(tm, new_max);
        m = new_max;
      }
      col_lse_ptr[j] = m + std::log(l);
    }
  });
  return {row_lse, col_lse};
}

// grad_x = G y and grad_y = G^T x for the InfoNCE G (see softmax_grad_tile); col_lse may be empty.
std::tuple<at::Tensor, at::Tensor> contrastive_grad_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                        const at::Tensor& scale_in, const at::Tensor& row_lse_in,
                                                        const at::Tensor& col_lse_in, double row_weight,
                                                        double col_weight) {
  check_feature_pair(x_in, y_in, "contrastive_grad");
  check_scalar(scale_in, "contrastive_grad", "scale");
  const at::Tensor x = to_compute_dtype(x_in), y = to_compute_dtype(y_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_rows = x.size(0), n_cols = y.size(0), dim = x.size(1);
  const bool use_cols = col_lse_in.numel() > 0 && col_weight != 0.0;
  check_vector(row_lse_in, n_rows, "contrastive_grad", "row_lse");
  if (use_cols) check_vector(col_lse_in, n_cols, "contrastive_grad", "col_lse");
  const at::Tensor row_lse = row_lse_in.to(x.scalar_type()).contiguous();
  const at::Tensor col_lse = use_cols ? col_lse_in.to(x.scalar_type()).contiguous() : at::Tensor();
  at::Tensor grad_x = at::zeros({n_rows, dim}, x.options());
  // One (cols, dim) partial of grad_y per thread; partial 0 is the result, the others are added to it
  // in thread order.
  const int n_threads = at::get_num_threads();
  std::vector<at::Tensor> grad_y_parts;
  for (int t = 0; t < n_threads; ++t) grad_y_parts.push_back(at::zeros({n_cols, dim}, x.options()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_grad_cpu", [&] {
    using T = scalar_t;
    const T scale = scale_in.item<double>();
    const T* row_lse_ptr = row_lse.data_ptr<T>();
    const T* col_lse_ptr = use_cols ? col_lse.data_ptr<T>() : nullptr;
    parallel_row_blocks(n_rows, [&](int thread, int64_t r0, int64_t rows) {
      TileBuffer<T> tile(x.options());
      const at::Tensor x_block = x.narrow(0, r0, rows);
      at::Tensor grad_x_block = grad_x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n_cols; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, n_cols - c0);
        const at::Tensor y_block = y.narrow(0, c0, cols);
        at::Tensor g = tile.product(x_block, y_block);
        softmax_grad_tile_dispatch(tile.data(), rows, cols, scale, row_lse_ptr + r0,
                                   use_cols ? col_lse_ptr + c0 : nullptr, T(row_weight), T(col_weight));
        grad_x_block.addmm_(g, y_block);
        grad_y_parts[thread].narrow(0, c0, cols).addmm_(g.t(), x_block);
      }
    });
  });
  for (int t = 1; t < n_threads; ++t) grad_y_parts[0].add_(grad_y_parts[t]);
  return {grad_x, grad_y_parts[0]};
}

at::Tensor siglip_softplus_cpu(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale_in,
                               const at::Tensor& bias_in) {
  check_feature_pair(x_in, y_in, "siglip_softplus");
  check_scalar(scale_in, "siglip_softplus", "scale");
  check_scalar(bias_in, "siglip_softplus", "bias");
  const at::Tensor x = to_compute_dtype(x_in), y = to_compute_dtype(y_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_rows = x.size(0), n_cols = y.size(0);
  at::Tensor row_sum = at::zeros({n_rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "siglip_softplus_cpu", [&] {
    using T = scalar_t;
    const T scale = scale_in.item<double>(), bias = bias_in.item<double>();
    T* row_sum_ptr = row_sum.data_ptr<T>();
    parallel_row_blocks(n_rows, [&](int, int64_t r0, int64_t rows) {
      TileBuffer<T> tile(x.options());
      const at::Tensor x_block = x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n_cols; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, n_cols - c0);
        tile.product(x_block, y.narrow(0, c0, cols));
        softplus_tile_dispatch(tile.data(), rows, cols, scale, bias, row_sum_ptr + r0);
      }
    });
  });
  return row_sum;
}

// G = sigmoid(scale * x y^T + bias): grad_x = G y, grad_y = G^T x, grad_row_sum = G 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> siglip_grad_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                               const at::Tensor& scale_in, const at::Tensor& bias_in) {
  check_feature_pair(x_in, y_in, "siglip_grad");
  check_scalar(scale_in, "siglip_grad", "scale");
  check_scalar(bias_in, "siglip_grad", "bias");
  const at::Tensor x = to_compute_dtype(x_in), y = to_compute_dtype(y_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_rows = x.size(0), n_cols = y.size(0), dim = x.size(1);
  at::Tensor grad_x = at::zeros({n_rows, dim}, x.options());
  at::Tensor grad_row_sum = at::zeros({n_rows}, x.options());
  const int n_threads = at::get_num_threads();
  std::vector<at::Tensor> grad_y_parts;
  for (int t = 0; t < n_threads; ++t) grad_y_parts.push_back(at::zeros({n_cols, dim}, x.options()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "siglip_grad_cpu", [&] {
    using T = scalar_t;
    const T scale = scale_in.item<double>(), bias = bias_in.item<double>();
    T* grad_row_sum_ptr = grad_row_sum.data_ptr<T>();
    parallel_row_blocks(n_rows, [&](int thread, int64_t r0, int64_t rows) {
      TileBuffer<T> tile(x.options());
      const at::Tensor x_block = x.narrow(0, r0, rows);
      at::Tensor grad_x_block = grad_x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n_cols; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, n_cols - c0);
        const at::Tensor y_block = y.narrow(0, c0, cols);
        at::Tensor g = tile.product(x_block, y_block);
        sigmoid_tile_dispatch(tile.data(), rows, cols, scale, bias, grad_row_sum_ptr + r0);
        grad_x_block.addmm_(g, y_block);
        grad_y_parts[thread].narrow(0, c0, cols).addmm_(g.t(), x_block);
      }
    });
  });
  for (int t = 1; t < n_threads; ++t) grad_y_parts[0].add_(grad_y_parts[t]);
  return {grad_x, grad_y_parts[0], grad_row_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CPU, m) {
  m.impl("contrastive_lse", &contrastive_lse_cpu);
  m.impl("contrastive_grad", &contrastive_grad_cpu);
  m.impl("siglip_softplus", &siglip_softplus_cpu);
  m.impl("siglip_grad", &siglip_grad_cpu);
}

}  // namespace clipfast
