// CUDA implementations of the clipfast_C contrastive ops (schemas in csrc/clipfast.cpp), on top of the
// C ABI of csrc/cuda/contrastive.cu (csrc/include/clipfast/contrastive_cuda.h).
//
// The kernels reduce over columns only: row statistics and grad_x = G @ y_values. The column direction is
// the same launch with x and y swapped, since S^T = scale * y @ x^T:
//   col_lse = lse over rows of S = row lse of S^T;      grad_y = G^T @ x_values with G^T built from S^T.
// Nothing here synchronises with the host: scale and bias stay on the device and are read by the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "clipfast/checks.h"
#include "clipfast/contrastive_cuda.h"
#include "clipfast/cuda_binding.h"

namespace clipfast {
namespace {

// Checks x (rows, dim) and y (cols, dim) and returns the dtype code the launchers take.
int check_cuda_features(const at::Tensor& x, const at::Tensor& y, const char* op) {
  check_feature_pair(x, y, op);
  assert_on_cuda(x, op, "x");
  return cuda_dtype_code(x, op, "x");
}

// A one-value tensor (scale, bias) as a contiguous fp32 tensor on x's device, so the kernels can read it
// through a pointer (no .item(), hence no host synchronisation).
at::Tensor device_scalar(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  assert_one_value(t, op, name);
  assert_same_device(t, x, op, name);
  return t.to(at::kFloat).contiguous();
}

// A per-row or per-column statistic (lse) of `length` values as a contiguous fp32 tensor on x's device.
at::Tensor device_vector(const at::Tensor& t, int64_t length, const at::Tensor& x, const char* op, const char* name) {
  assert_vector(t, length, op, name);
  assert_same_device(t, x, op, name);
  return t.to(at::kFloat).contiguous();
}

at::TensorOptions fp32_like(const at::Tensor& x) { return x.options().dtype(at::kFloat); }

// contrastive_grad's value matrices: x_values (rows, E) and y_values (cols, E), x's dtype and device. The
// Python layer guarantees it; asserted anyway, because a wrong shape, dtype or device would make the kernels
// read memory they do not own.
void assert_value_pair(const at::Tensor& x_values, const at::Tensor& y_values, const at::Tensor& x,
                       const at::Tensor& y, const char* op) {
  TORCH_INTERNAL_ASSERT(x_values.dim() == 2 && y_values.dim() == 2 && x_values.size(0) == x.size(0) &&
                            y_values.size(0) == y.size(0) && x_values.size(1) == y_values.size(1),
                        op, ": x_values and y_values must be (", x.size(0), ", E) and (", y.size(0),
                        ", E), got ", x_values.sizes(), " and ", y_values.sizes());
  TORCH_INTERNAL_ASSERT(x_values.scalar_type() == x.scalar_type() && y_values.scalar_type() == x.scalar_type(), op,
                        ": x_values and y_values must have x's dtype ", x.scalar_type(), ", got ",
                        x_values.scalar_type(), " and ", y_values.scalar_type());
  assert_same_device(x_values, x, op, "x_values");
  assert_same_device(y_values, x, op, "y_values");
}

// A value matrix as the launcher reads it: column stride 1, rows stride(0) apart. A view that already has
// unit column stride (such as a column slice of wider features) is read in place instead of copied.
at::Tensor with_unit_column_stride(const at::Tensor& values) {
  return values.size(1) <= 1 || values.stride(1) == 1 ? values : values.contiguous();
}

std::tuple<at::Tensor, at::Tensor> contrastive_lse_cuda(const at::Tensor& x_in, const at::Tensor& y_in,
                                                        const at::Tensor& scale_in, bool with_cols) {
  constexpr const char* op = "contrastive_lse";
  const int dtype = check_cuda_features(x_in, y_in, op);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor scale = device_scalar(scale_in, x_in, op, "scale");
  const int64_t rows = x_in.size(0), cols = y_in.size(0), dim = x_in.size(1);
  at::Tensor row_lse = at::empty({rows}, fp32_like(x_in));
  at::Tensor col_lse = at::empty({with_cols ? cols : 0}, fp32_like(x_in));
  if (rows == 0 || cols == 0) {
    // log of an empty sum: every entry (if any) is -inf, and there is nothing to launch.
    row_lse.fill_(-std::numeric_limits<float>::infinity());
    col_lse.fill_(-std::numeric_limits<float>::infinity());
    return {row_lse, col_lse};
  }
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  void* stream = current_stream();
  check_launch(clipfast_contrastive_lse_cuda(x.const_data_ptr(), y.const_data_ptr(), dtype, rows, cols, dim,
                                             scale.const_data_ptr<float>(), row_lse.mutable_data_ptr<float>(), stream),
               op);
  if (with_cols) {
    check_launch(clipfast_contrastive_lse_cuda(y.const_data_ptr(), x.const_data_ptr(), dtype, cols, rows, dim,
                                               scale.const_data_ptr<float>(), col_lse.mutable_data_ptr<float>(),
                                               stream),
                 op);
  }
  return {row_lse, col_lse};
}

// G_ij = row_weight * exp(S_ij - row_lse_i) + col_weight * exp(S_ij - col_lse_j), the column term only when
// col_lse is non-empty and col_weight != 0. grad_x = G @ y_values (rows, E) is the launch with own = rows;
// grad_y = G^T @ x_values (cols, E) is the swapped launch, where the column term is "own" and the row term
// "other". The values default to y and x (E = dim, the loss's own gradient); distillation passes a
// student's features so that the teacher's G (from x, y) is contracted with them.
std::tuple<at::Tensor, at::Tensor> contrastive_grad_cuda(const at::Tensor& x_in, const at::Tensor& y_in,
                                                         const at::Tensor& scale_in, const at::Tensor& row_lse_in,
                                                         const at::Tensor& col_lse_in, double row_weight,
                                                         double col_weight,
                                                         const std::optional<at::Tensor>& x_values_in,
                                                         const std::optional<at::Tensor>& y_values_in) {
  constexpr const char* op = "contrastive_grad";
  const int dtype = check_cuda_features(x_in, y_in, op);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor scale = device_scalar(scale_in, x_in, op, "scale");
  const int64_t rows = x_in.size(0), cols = y_in.size(0), dim = x_in.size(1);
  TORCH_INTERNAL_ASSERT(x_values_in.has_value() == y_values_in.has_value(), op,
                        ": x_values and y_values must be given together");
  const bool values_given = x_values_in.has_value();
  if (values_given) assert_value_pair(*x_values_in, *y_values_in, x_in, y_in, op);
  const int64_t width = values_given ? x_values_in->size(1) : dim;
  const at::Tensor row_lse = device_vector(row_lse_in, rows, x_in, op, "row_lse");
  const bool use_col_term = col_lse_in.numel() > 0 && col_weight != 0.0;
  const at::Tensor col_lse = use_col_term ? device_vector(col_lse_in, cols, x_in, op, "col_lse") : at::Tensor();
  if (rows == 0 || cols == 0 || width == 0) {  // G has no entry, or the gradients no element
    return {at::zeros({rows, width}, fp32_like(x_in)), at::zeros({cols, width}, fp32_like(x_in))};
  }
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const at::Tensor x_values = values_given ? with_unit_column_stride(*x_values_in) : x;
  const at::Tensor y_values = values_given ? with_unit_column_stride(*y_values_in) : y;
  at::Tensor grad_x = at::empty({rows, width}, fp32_like(x));
  at::Tensor grad_y = at::empty({cols, width}, fp32_like(x));
  const float* row_lse_ptr = row_lse.const_data_ptr<float>();
  const float* col_lse_ptr = use_col_term ? col_lse.const_data_ptr<float>() : nullptr;
  const float row_term_weight = static_cast<float>(row_weight);
  const float col_term_weight = use_col_term ? static_cast<float>(col_weight) : 0.f;
  void* stream = current_stream();
  check_launch(clipfast_contrastive_grad_cuda(x.const_data_ptr(), y.const_data_ptr(), dtype, rows, cols, dim,
                                              y_values.const_data_ptr(), width, y_values.stride(0),
                                              scale.const_data_ptr<float>(), row_lse_ptr, col_lse_ptr, row_term_weight,
                                              col_term_weight, grad_x.mutable_data_ptr<float>(), stream),
               op);
  check_launch(clipfast_contrastive_grad_cuda(y.const_data_ptr(), x.const_data_ptr(), dtype, cols, rows, dim,
                                              x_values.const_data_ptr(), width, x_values.stride(0),
                                              scale.const_data_ptr<float>(), col_lse_ptr, row_lse_ptr, col_term_weight,
                                              row_term_weight, grad_y.mutable_data_ptr<float>(), stream),
               op);
  return {grad_x, grad_y};
}

at::Tensor siglip_softplus_cuda(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale_in,
                                const at::Tensor& bias_in) {
  constexpr const char* op = "siglip_softplus";
  const int dtype = check_cuda_features(x_in, y_in, op);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor scale = device_scalar(scale_in, x_in, op, "scale");
  const at::Tensor bias = device_scalar(bias_in, x_in, op, "bias");
  const int64_t rows = x_in.size(0), cols = y_in.size(0), dim = x_in.size(1);
  if (rows == 0 || cols == 0) return at::zeros({rows}, fp32_like(x_in));  // empty sums
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  at::Tensor row_sum = at::empty({rows}, fp32_like(x));
  check_launch(clipfast_siglip_softplus_cuda(x.const_data_ptr(), y.const_data_ptr(), dtype, rows, cols, dim,
                                             scale.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                                             row_sum.mutable_data_ptr<float>(), current_stream()),
               op);
  return row_sum;
}

// G = sigmoid(S + bias), so G^T = sigmoid(S^T + bias): grad_y = G^T @ x is the swapped launch. Only the
// row direction asks for grad_row_sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor> siglip_grad_cuda(const at::Tensor& x_in, const at::Tensor& y_in,
                                                                const at::Tensor& scale_in, const at::Tensor& bias_in) {
  constexpr const char* op = "siglip_grad";
  const int dtype = check_cuda_features(x_in, y_in, op);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor scale = device_scalar(scale_in, x_in, op, "scale");
  const at::Tensor bias = device_scalar(bias_in, x_in, op, "bias");
  const int64_t rows = x_in.size(0), cols = y_in.size(0), dim = x_in.size(1);
  if (rows == 0 || cols == 0) {  // G has no entry
    return {at::zeros({rows, dim}, fp32_like(x_in)), at::zeros({cols, dim}, fp32_like(x_in)),
            at::zeros({rows}, fp32_like(x_in))};
  }
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  at::Tensor grad_x = at::empty({rows, dim}, fp32_like(x));
  at::Tensor grad_y = at::empty({cols, dim}, fp32_like(x));
  at::Tensor grad_row_sum = at::empty({rows}, fp32_like(x));
  void* stream = current_stream();
  check_launch(clipfast_siglip_grad_cuda(x.const_data_ptr(), y.const_data_ptr(), dtype, rows, cols, dim,
                                         scale.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                                         grad_x.mutable_data_ptr<float>(), grad_row_sum.mutable_data_ptr<float>(),
                                         stream),
               op);
  check_launch(clipfast_siglip_grad_cuda(y.const_data_ptr(), x.const_data_ptr(), dtype, cols, rows, dim,
                                         scale.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                                         grad_y.mutable_data_ptr<float>(), nullptr, stream),
               op);
  return {grad_x, grad_y, grad_row_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CUDA, m) {
  m.impl("contrastive_lse", &contrastive_lse_cuda);
  m.impl("contrastive_grad", &contrastive_grad_cuda);
  m.impl("siglip_softplus", &siglip_softplus_cuda);
  m.impl("siglip_grad", &siglip_grad_cuda);
}

}  // namespace clipfast
