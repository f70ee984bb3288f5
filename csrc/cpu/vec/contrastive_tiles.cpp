// The contrastive losses' tile passes (see csrc/cpu/contrastive.cpp for the algorithm), written once on
// at::vec::Vectorized<T> and compiled once per instruction-set level (clipfast/cpu_kernels.h).
//
// Every pass streams the tile row by row; the tile was just written by the tile GEMM and is sized to stay
// in the core's L2 (contrastive.cpp), so these passes run at vector-unit speed, not memory speed. The
// InfoNCE forward reads the tile twice: once for the row and column maxima together, once for both
// directions' exp sums (2 exp per element, the minimum for a symmetric loss with one GEMM per tile).
// Vector lanes hold partial sums that are reduced in one fixed order: a given level and thread count
// gives bitwise reproducible results; levels differ in the last bits.
#include <algorithm>
#include <cmath>
#include <limits>

#include "clipfast/cpu_kernels.h"
#include "clipfast/vec_helpers.h"

namespace clipfast::cpu {
namespace CPU_CAPABILITY {
namespace {

using vec::exp_fast;
using vec::head;

// exp(old_max - new_max), the factor that rescales a running sum; a state that has seen nothing yet
// (-inf) gives 0 instead of exp(-inf + inf) = NaN.
template <typename T>
inline T rescale_factor(T old_max, T new_max) {
  return old_max == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(old_max - new_max);
}

template <typename T>
inline T max_nan(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <typename T>
void lse_tile(const T* tile, int64_t rows, int64_t cols, T scale, T* row_max, T* row_sum, T* col_max, T* col_sum,
              T* col_block_max) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const V vscale(scale), neg_inf(kNegInf), zero(T(0));
  const int64_t body = cols - cols % W, tail = cols - body;
  const bool with_cols = col_max != nullptr;
  if (with_cols) std::fill(col_block_max, col_block_max + cols, kNegInf);
  // Pass 1: the tile's row maxima and column maxima together.
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = tile + i * cols;
    V m = neg_inf;
    for (int64_t j = 0; j < body; j += W) {
      const V v = V::loadu(s + j) * vscale;
      m = at::vec::maximum(m, v);
      if (with_cols) at::vec::maximum(V::loadu(col_block_max + j), v).store(col_block_max + j);
    }
    if (tail > 0) {
      const V v = head(V::loadu(s + body, tail) * vscale, tail, kNegInf);
      m = at::vec::maximum(m, v);
      if (with_cols) at::vec::maximum(V::loadu(col_block_max + body, tail), v).store(col_block_max + body, tail);
    }
    const T new_max = max_nan(row_max[i], vec::max_lanes(m));
    row_sum[i] *= rescale_factor(row_max[i], new_max);
    row_max[i] = new_max;
  }
  if (with_cols) {
    for (int64_t j = 0; j < cols; ++j) {
      const T new_max = max_nan(col_max[j], col_block_max[j]);
      col_sum[j] *= rescale_factor(col_max[j], new_max);
      col_max[j] = new_max;
    }
  }
  // Pass 2: sum exp(v - max) in both directions.
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = tile + i * cols;
    const V r(row_max[i]);
    V acc = zero;
    for (int64_t j = 0; j < body; j += W) {
      const V v = V::loadu(s + j) * vscale;
      acc += exp_fast(v - r);
      if (with_cols) (V::loadu(col_sum + j) + exp_fast(v - V::loadu(col_max + j))).store(col_sum + j);
    }
    if (tail > 0) {
      const V v = V::loadu(s + body, tail) * vscale;
      acc += head(exp_fast(v - r), tail, T(0));
      if (with_cols)
        (V::loadu(col_sum + body, tail) + exp_fast(v - V::loadu(col_max + body, tail))).store(col_sum + body, tail);
    }
    row_sum[i] += vec::sum_lanes(acc);
  }
}

template <typename T>
void softmax_grad_tile(T* tile, int64_t rows, int64_t cols, T scale, const T* row_lse, const T* col_lse,
                       T row_weight, T col_weight) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vscale(scale), rw(row_weight), cw(col_weight);
  for (int64_t i = 0; i < rows; ++i) {
    T* s = tile + i * cols;
    const V r(row_lse[i]);
    for (int64_t j = 0; j < cols; j += W) {
      const int64_t count = std::min<int64_t>(W, cols - j);
      const V v = V::loadu(s + j, count) * vscale;
      V g = rw * exp_fast(v - r);
      if (col_lse != nullptr) g = at::vec::fmadd(cw, exp_fast(v - V::loadu(col_lse + j, count)), g);
      g.store(s + j, count);
    }
  }
}

// softplus(v) = max(v, 0) + log1p(exp(-|v|)): no overflow in either tail, and Sleef's log1p keeps the
// many tiny terms of SigLIP's negatives (softplus(-10) = 4.5e-5) accurate.
template <typename T>
void softplus_tile(const T* tile, int64_t rows, int64_t cols, T scale, T bias, T* row_acc) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vscale(scale), vbias(bias), zero(T(0));
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = tile + i * cols;
    V acc = zero;
    for (int64_t j = 0; j < cols; j += W) {
      const int64_t count = std::min<int64_t>(W, cols - j);
      const V v = at::vec::fmadd(V::loadu(s + j, count), vscale, vbias);
      const V sp = at::vec::maximum(v, zero) + exp_fast(zero - v.abs()).log1p();
      acc += count == W ? sp : head(sp, count, T(0));
    }
    row_acc[i] += vec::sum_lanes(acc);
  }
}

// sigmoid(v) through e = exp(-|v|): 1 / (1 + e) for v >= 0, e / (1 + e) below, so neither tail overflows.
template <typename T>
void sigmoid_tile(T* tile, int64_t rows, int64_t cols, T scale, T bias, T* row_acc) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vscale(scale), vbias(bias), zero(T(0)), one(T(1));
  for (int64_t i = 0; i < rows; ++i) {
    T* s = tile + i * cols;
    V acc = zero;
    for (int64_t j = 0; j < cols; j += W) {
      const int64_t count = std::min<int64_t>(W, cols - j);
      const V v = at::vec::fmadd(V::loadu(s + j, count), vscale, vbias);
      const V e = exp_fast(zero - v.abs());
      const V inv = one / (one + e);
      const V g = V::blendv(e * inv, inv, v >= zero);
      g.store(s + j, count);
      acc += count == W ? g : head(g, count, T(0));
    }
    row_acc[i] += vec::sum_lanes(acc);
  }
}

template <typename T>
ContrastiveTiles<T> table() {
  return {&lse_tile<T>, &softmax_grad_tile<T>, &softplus_tile<T>, &sigmoid_tile<T>};
}

}  // namespace

void register_contrastive(Kernels& k) {
  k.contrastive_f32 = table<float>();
  k.contrastive_f64 = table<double>();
}

}  // namespace CPU_CAPABILITY
}  // namespace clipfast::cpu
