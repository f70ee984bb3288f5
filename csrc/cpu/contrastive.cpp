// Fused contrastive-loss kernels for the CPU: CLIP's InfoNCE (arXiv:2103.00020) and SigLIP's sigmoid
// loss (arXiv:2303.15343) over S = scale * x @ y^T, tile by tile, never materialising S.
//
// Algorithm. Rows of x are split into row blocks; each OpenMP thread owns a contiguous range of row
// blocks (at::parallel_for's static split). For every (row block, column block) tile one BLAS GEMM
// makes the tile of x y^T in a per-thread buffer sized from the core's L2 (tile_shape), and the fused
// pass (csrc/cpu/vec/contrastive_tiles.cpp: at::vec code compiled per instruction-set level, chosen at
// run time) then
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
// machine, instruction-set level and thread count (static split, fixed merge order); they may differ in
// the last bits across those.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "clipfast/checks.h"
#include "clipfast/cpu_kernels.h"

namespace clipfast {
namespace {

// Tile shape from the core's caches. A tile (rows x cols of x y^T) fills half of the core's L2, so the
// tile GEMM's output is still there for the fused pass and the rest of L2 holds the GEMM's packed
// panels; cols = 256 keeps the pass's per-tile column state (3 x cols values) in L1. rows is capped so
// that small problems still give every thread a row block (the loss is one parallel sweep over them).
struct TileShape {
  int64_t rows, cols;
};

template <typename T>
TileShape tile_shape(int64_t n_rows, int n_threads) {
  constexpr int64_t kCols = 256, kMinRows = 32, kMaxRows = 1024, kRowQuantum = 16;
  int64_t rows = cpu::cache_sizes().l2 / 2 / (kCols * static_cast<int64_t>(sizeof(T)));
  rows = std::clamp(rows, kMinRows, kMaxRows) / kRowQuantum * kRowQuantum;
  const int64_t per_thread = (n_rows + n_threads - 1) / n_threads;
  rows = std::min(rows, std::max(kRowQuantum, (per_thread + kRowQuantum - 1) / kRowQuantum * kRowQuantum));
  return {rows, kCols};
}

template <typename T>
const cpu::ContrastiveTiles<T>& tiles() {
  if constexpr (std::is_same_v<T, double>) {
    return cpu::kernels().contrastive_f64;
  } else {
    return cpu::kernels().contrastive_f32;
  }
}

template <typename T>
T rescale_factor(T old_max, T new_max) {
  return old_max == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(old_max - new_max);
}

template <typename T>
T max_(T a, T b) {
  return a > b ? a : b;
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

// Runs body(thread, r0, rows) for every block of shape.rows rows; each thread gets a contiguous range
// of blocks (at::parallel_for's static split), which makes the thread-ordered merges deterministic.
template <typename Body>
void parallel_row_blocks(int64_t n_rows, const TileShape& shape, const Body& body) {
  const int64_t n_blocks = (n_rows + shape.rows - 1) / shape.rows;
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    const int thread = at::get_thread_num();
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t r0 = b * shape.rows;
      body(thread, r0, std::min(shape.rows, n_rows - r0));
    }
  });
}

// One thread's tile buffer: product() writes x_block @ y_block^T densely (leading dimension = cols)
// through ATen's BLAS, which runs single-threaded inside the parallel region.
template <typename T>
class TileBuffer {
 public:
  TileBuffer(const TileShape& shape, const at::TensorOptions& options)
      : data_(shape.rows * shape.cols), options_(options) {}
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
  assert_one_value(scale_in, "contrastive_lse", "scale");
  const at::Tensor x = to_compute_dtype(x_in), y = to_compute_dtype(y_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_rows = x.size(0), n_cols = y.size(0);
  at::Tensor row_lse = at::empty({n_rows}, x.options());
  at::Tensor col_lse = at::empty({with_cols ? n_cols : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_lse_cpu", [&] {
    using T = scalar_t;
    const TileShape shape = tile_shape<T>(n_rows, at::get_num_threads());
    const T scale = scale_in.item<double>();
    const T neg_inf = -std::numeric_limits<T>::infinity();
    const int n_threads = at::get_num_threads();
    // Per-thread column states (running max, running sum), merged in thread order below.
    std::vector<T> col_max(with_cols ? n_threads * n_cols : 0, neg_inf);
    std::vector<T> col_sum(with_cols ? n_threads * n_cols : 0, T(0));
    T* row_lse_ptr = row_lse.data_ptr<T>();
    parallel_row_blocks(n_rows, shape, [&](int thread, int64_t r0, int64_t rows) {
      TileBuffer<T> tile(shape, x.options());
      std::vector<T> row_max(rows, neg_inf), row_sum(rows, T(0)), col_block_max(shape.cols);
      const at::Tensor x_block = x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n_cols; c0 += shape.cols) {
        const int64_t cols = std::min(shape.cols, n_cols - c0);
        tile.product(x_block, y.narrow(0, c0, cols));
        T* cm = with_cols ? col_max.data() + thread * n_cols + c0 : nullptr;
        T* cs = with_cols ? col_sum.data() + thread * n_cols + c0 : nullptr;
        tiles<T>().lse(tile.data(), rows, cols, scale, row_max.data(), row_sum.data(), cm, cs,
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

// grad_x = G y_values and grad_y = G^T x_values for the InfoNCE G (see softmax_grad_tile); col_lse may be
// empty. The values default to y and x (the loss's own gradient); distillation passes the student's
// features (any width E) to contract the teacher's softmax, whose tiles come from x and y.
std::tuple<at::Tensor, at::Tensor> contrastive_grad_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                        const at::Tensor& scale_in, const at::Tensor& row_lse_in,
                                                        const at::Tensor& col_lse_in, double row_weight,
                                                        double col_weight,
                                                        const std::optional<at::Tensor>& x_values_in,
                                                        const std::optional<at::Tensor>& y_values_in) {
  check_feature_pair(x_in, y_in, "contrastive_grad");
  assert_one_value(scale_in, "contrastive_grad", "scale");
  const at::Tensor x = to_compute_dtype(x_in), y = to_compute_dtype(y_in);
  TORCH_INTERNAL_ASSERT(x_values_in.has_value() == y_values_in.has_value(),
                        "contrastive_grad: x_values and y_values are given together");
  at::Tensor x_values = x, y_values = y;
  if (x_values_in.has_value()) {
    check_feature_pair(*x_values_in, *y_values_in, "contrastive_grad");
    TORCH_INTERNAL_ASSERT(x_values_in->size(0) == x.size(0) && y_values_in->size(0) == y.size(0),
                          "contrastive_grad: the values need the rows of x and y");
    x_values = to_compute_dtype(*x_values_in);
    y_values = to_compute_dtype(*y_values_in);
    TORCH_INTERNAL_ASSERT(x_values.scalar_type() == x.scalar_type(), "contrastive_grad: values and features differ in dtype");
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_rows = x.size(0), n_cols = y.size(0), width = y_values.size(1);
  const bool use_cols = col_lse_in.numel() > 0 && col_weight != 0.0;
  assert_vector(row_lse_in, n_rows, "contrastive_grad", "row_lse");
  if (use_cols) assert_vector(col_lse_in, n_cols, "contrastive_grad", "col_lse");
  const at::Tensor row_lse = row_lse_in.to(x.scalar_type()).contiguous();
  const at::Tensor col_lse = use_cols ? col_lse_in.to(x.scalar_type()).contiguous() : at::Tensor();
  at::Tensor grad_x = at::zeros({n_rows, width}, x.options());
  // One (cols, width) partial of grad_y per thread; partial 0 is the result, the others are added to it
  // in thread order.
  const int n_threads = at::get_num_threads();
  std::vector<at::Tensor> grad_y_parts;
  for (int t = 0; t < n_threads; ++t) grad_y_parts.push_back(at::zeros({n_cols, width}, x.options()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_grad_cpu", [&] {
    using T = scalar_t;
    const TileShape shape = tile_shape<T>(n_rows, at::get_num_threads());
    const T scale = scale_in.item<double>();
    const T* row_lse_ptr = row_lse.data_ptr<T>();
    const T* col_lse_ptr = use_cols ? col_lse.data_ptr<T>() : nullptr;
    parallel_row_blocks(n_rows, shape, [&](int thread, int64_t r0, int64_t rows) {
      TileBuffer<T> tile(shape, x.options());
      const at::Tensor x_block = x.narrow(0, r0, rows), x_values_block = x_values.narrow(0, r0, rows);
      at::Tensor grad_x_block = grad_x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n_cols; c0 += shape.cols) {
        const int64_t cols = std::min(shape.cols, n_cols - c0);
        at::Tensor g = tile.product(x_block, y.narrow(0, c0, cols));
        tiles<T>().softmax_grad(tile.data(), rows, cols, scale, row_lse_ptr + r0,
                                   use_cols ? col_lse_ptr + c0 : nullptr, T(row_weight), T(col_weight));
        grad_x_block.addmm_(g, y_values.narrow(0, c0, cols));
        grad_y_parts[thread].narrow(0, c0, cols).addmm_(g.t(), x_values_block);
      }
    });
  });
  for (int t = 1; t < n_threads; ++t) grad_y_parts[0].add_(grad_y_parts[t]);
  return {grad_x, grad_y_parts[0]};
}

at::Tensor siglip_softplus_cpu(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale_in,
                               const at::Tensor& bias_in) {
  check_feature_pair(x_in, y_in, "siglip_softplus");
  assert_one_value(scale_in, "siglip_softplus", "scale");
  assert_one_value(bias_in, "siglip_softplus", "bias");
  const at::Tensor x = to_compute_dtype(x_in), y = to_compute_dtype(y_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_rows = x.size(0), n_cols = y.size(0);
  at::Tensor row_sum = at::zeros({n_rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "siglip_softplus_cpu", [&] {
    using T = scalar_t;
    const TileShape shape = tile_shape<T>(n_rows, at::get_num_threads());
    const T scale = scale_in.item<double>(), bias = bias_in.item<double>();
    T* row_sum_ptr = row_sum.data_ptr<T>();
    parallel_row_blocks(n_rows, shape, [&](int, int64_t r0, int64_t rows) {
      TileBuffer<T> tile(shape, x.options());
      const at::Tensor x_block = x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n_cols; c0 += shape.cols) {
        const int64_t cols = std::min(shape.cols, n_cols - c0);
        tile.product(x_block, y.narrow(0, c0, cols));
        tiles<T>().softplus(tile.data(), rows, cols, scale, bias, row_sum_ptr + r0);
      }
    });
  });
  return row_sum;
}

// G = sigmoid(scale * x y^T + bias): grad_x = G y, grad_y = G^T x, grad_row_sum = G 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> siglip_grad_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                               const at::Tensor& scale_in, const at::Tensor& bias_in) {
  check_feature_pair(x_in, y_in, "siglip_grad");
  assert_one_value(scale_in, "siglip_grad", "scale");
  assert_one_value(bias_in, "siglip_grad", "bias");
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
    const TileShape shape = tile_shape<T>(n_rows, at::get_num_threads());
    const T scale = scale_in.item<double>(), bias = bias_in.item<double>();
    T* grad_row_sum_ptr = grad_row_sum.data_ptr<T>();
    parallel_row_blocks(n_rows, shape, [&](int thread, int64_t r0, int64_t rows) {
      TileBuffer<T> tile(shape, x.options());
      const at::Tensor x_block = x.narrow(0, r0, rows);
      at::Tensor grad_x_block = grad_x.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n_cols; c0 += shape.cols) {
        const int64_t cols = std::min(shape.cols, n_cols - c0);
        const at::Tensor y_block = y.narrow(0, c0, cols);
        at::Tensor g = tile.product(x_block, y_block);
        tiles<T>().sigmoid(tile.data(), rows, cols, scale, bias, grad_row_sum_ptr + r0);
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
