// CUDA implementation of the clipfast_C token_merge ops (schemas in csrc/clipfast.cpp), on top of the C ABI of
// csrc/cuda/token_merge.cu (csrc/include/clipfast/token_merge_cuda.h).
//
// Same contract as the CPU kernels (csrc/cpu/token_merge.cpp), for float32, bfloat16 and float16 tokens and
// metrics (float64 runs on the cpu or reference backends), with sizes in float32. Tokens are read through their
// batch and row strides (only a non-unit feature stride makes a copy). dest values are not validated on the
// device, since that would synchronise with the host; the kernels stay in bounds whatever they hold. Everything
// runs on the current stream.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "clipfast/checks.h"
#include "clipfast/cuda_binding.h"
#include "clipfast/token_merge_checks.h"
#include "clipfast/token_merge_cuda.h"

namespace clipfast {
namespace {

at::Tensor sizes_of(const std::optional<at::Tensor>& size, const at::Tensor& like, const char* op) {
  if (!size.has_value()) return at::Tensor();
  assert_same_device(*size, like, op, "size");
  return size->detach().to(at::kFloat).contiguous();
}

at::Tensor token_merge_match_cuda(const at::Tensor& metric_in, int64_t r, int64_t num_prefix) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* kOp = "token_merge_match";
  assert_token_merge_match_args(metric_in, r, num_prefix);
  assert_on_cuda(metric_in, kOp, "metric");
  const int dtype_code = cuda_dtype_code(metric_in, kOp, "metric");
  const int64_t batch = metric_in.size(0), n = metric_in.size(1);
  const int64_t merged = token_merge_count(n, r, num_prefix);
  const c10::cuda::CUDAGuard device_guard(metric_in.device());
  if (merged == 0) return at::arange(n, metric_in.options().dtype(at::kLong)).expand({batch, n}).contiguous();
  const at::Tensor metric = last_dim_contiguous(metric_in.detach());
  at::Tensor dest = at::empty({batch, n}, metric.options().dtype(at::kLong));
  check_launch(clipfast_token_merge_match_cuda(metric.const_data_ptr(), dtype_code, batch, n, metric.size(2),
                                               metric.stride(0), metric.stride(1), merged, num_prefix,
                                               dest.mutable_data_ptr<int64_t>(), current_stream()),
               kOp);
  return dest;
}

std::tuple<at::Tensor, at::Tensor> token_merge_reduce_cuda(const at::Tensor& x_in, const at::Tensor& dest_in,
                                                           const std::optional<at::Tensor>& size_in, int64_t num_out) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* kOp = "token_merge_reduce";
  assert_token_merge_reduce_args(kOp, x_in, dest_in, size_in, num_out);
  TORCH_INTERNAL_ASSERT(dest_in.size(1) == x_in.size(1), kOp, ": dest ", dest_in.sizes(), " does not match the tokens ",
                        x_in.sizes());
  assert_on_cuda(x_in, kOp, "x");
  const int dtype_code = cuda_dtype_code(x_in, kOp, "x");
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = last_dim_contiguous(x_in.detach());
  const at::Tensor dest = dest_in.contiguous();
  const at::Tensor size = sizes_of(size_in, x_in, kOp);
  const int64_t batch = x.size(0), n = x.size(1), dim = x.size(2);
  at::Tensor merged = at::empty({batch, num_out, dim}, x.options());
  at::Tensor merged_size = at::empty({batch, num_out}, x.options().dtype(at::kFloat));
  check_launch(clipfast_token_merge_reduce_cuda(x.const_data_ptr(), dtype_code, batch, n, dim, x.stride(0),
                                                x.stride(1), dest.const_data_ptr<int64_t>(),
                                                size.defined() ? size.const_data_ptr<float>() : nullptr, num_out,
                                                merged.mutable_data_ptr(), merged_size.mutable_data_ptr<float>(),
                                                current_stream()),
               kOp);
  return {merged, merged_size};
}

at::Tensor token_merge_reduce_backward_cuda(const at::Tensor& grad_in, const at::Tensor& dest_in,
                                            const std::optional<at::Tensor>& size_in, const at::Tensor& merged_size_in) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* kOp = "token_merge_reduce_backward";
  const int64_t num_out = grad_in.size(1);
  assert_token_merge_reduce_args(kOp, grad_in, dest_in, size_in, num_out);
  assert_on_cuda(grad_in, kOp, "grad_merged");
  assert_same_device(merged_size_in, grad_in, kOp, "merged_size");
  TORCH_INTERNAL_ASSERT(merged_size_in.sizes() == at::IntArrayRef({grad_in.size(0), num_out}) &&
                            merged_size_in.scalar_type() == at::kFloat,
                        kOp, ": merged_size must be float32 (", grad_in.size(0), ", ", num_out, "), got ",
                        merged_size_in.scalar_type(), " ", merged_size_in.sizes());
  const int dtype_code = cuda_dtype_code(grad_in, kOp, "grad_merged");
  const c10::cuda::CUDAGuard device_guard(grad_in.device());
  const at::Tensor grad = last_dim_contiguous(grad_in.detach());
  const at::Tensor dest = dest_in.contiguous();
  const at::Tensor size = sizes_of(size_in, grad_in, kOp);
  const at::Tensor merged_size = merged_size_in.detach().contiguous();
  const int64_t batch = grad.size(0), n = dest.size(1), dim = grad.size(2);
  at::Tensor grad_x = at::empty({batch, n, dim}, grad.options());
  check_launch(clipfast_token_merge_reduce_backward_cuda(
                   grad.const_data_ptr(), dtype_code, batch, num_out, dim, grad.stride(0), grad.stride(1),
                   dest.const_data_ptr<int64_t>(), n, size.defined() ? size.const_data_ptr<float>() : nullptr,
                   merged_size.const_data_ptr<float>(), grad_x.mutable_data_ptr(), current_stream()),
               kOp);
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CUDA, m) {
  m.impl("token_merge_match", &token_merge_match_cuda);
  m.impl("token_merge_reduce", &token_merge_reduce_cuda);
  m.impl("token_merge_reduce_backward", &token_merge_reduce_backward_cuda);
}

}  // namespace clipfast
