// CUDA implementation of the clipfast_C token_keep ops (schemas in csrc/clipfast.cpp), on top of the C ABI of
// csrc/cuda/token_keep.cu (csrc/include/clipfast/token_keep_cuda.h).
//
// Same contract as the CPU kernels (csrc/cpu/token_keep.cpp), for float32, bfloat16 and float16 tokens
// (float64 tokens run on the cpu or reference backends; float64 scores are ranked here). Scores are read
// through their strides, tokens through their batch and row strides (only a non-unit feature stride makes a
// copy), and the backward without fuse_weights reads only the shape, dtype and device of `tokens` (it may be
// an expanded stand-in). keep_index values are not validated on the device, since that would synchronise
// with the host; the kernels stay in bounds whatever they hold. Everything runs on the current stream.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "clipfast/checks.h"
#include "clipfast/cuda_binding.h"
#include "clipfast/token_keep_checks.h"
#include "clipfast/token_keep_cuda.h"

namespace clipfast {
namespace {

at::Tensor token_keep_index_cuda(const at::Tensor& scores_in, int64_t num_keep, int64_t grid_width, int64_t block) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* kOp = "token_keep_index";
  assert_token_keep_index_args(scores_in, num_keep, grid_width, block);
  assert_on_cuda(scores_in, kOp, "scores");
  const int64_t batch = scores_in.size(0), length = scores_in.size(1);
  TORCH_CHECK(length <= 0x7fffffff, kOp, ": at most 2^31 - 1 patches per row, got ", length);
  const c10::cuda::CUDAGuard device_guard(scores_in.device());
  const at::Tensor scores = scores_in.detach();
  at::Tensor keep_index = at::empty({batch, num_keep}, scores.options().dtype(at::kLong));
  if (batch == 0) return keep_index;
  check_launch(clipfast_token_keep_index_cuda(scores.const_data_ptr(), scores.scalar_type() == at::kDouble ? 1 : 0,
                                              batch, length, scores.stride(0), scores.stride(1), num_keep, grid_width,
                                              block, keep_index.mutable_data_ptr<int64_t>(), current_stream()),
               kOp);
  return keep_index;
}

// Invariants shared by the gather and its backward (`tokens` only by shape, dtype and device); returns the
// dtype code of the tokens.
int assert_gather_args(const char* op, const at::Tensor& tokens, const at::Tensor& keep_index,
                       const std::optional<at::Tensor>& fuse_weights, int64_t num_prefix) {
  assert_token_keep_gather_args(op, tokens, keep_index, fuse_weights, num_prefix);
  assert_on_cuda(tokens, op, "tokens");
  return cuda_dtype_code(tokens, op, "tokens");
}

at::Tensor token_keep_gather_cuda(const at::Tensor& tokens_in, const at::Tensor& keep_index_in,
                                  const std::optional<at::Tensor>& fuse_weights_in, int64_t num_prefix) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* kOp = "token_keep_gather";
  const int dtype_code = assert_gather_args(kOp, tokens_in, keep_index_in, fuse_weights_in, num_prefix);
  const c10::cuda::CUDAGuard device_guard(tokens_in.device());
  const at::Tensor tokens = last_dim_contiguous(tokens_in.detach());
  const at::Tensor keep_index = keep_index_in.detach().contiguous();
  const bool fused = fuse_weights_in.has_value();
  const at::Tensor weights = fused ? fuse_weights_in->detach().contiguous() : at::Tensor();
  const int64_t batch = tokens.size(0), dim = tokens.size(2);
  const int64_t length = tokens.size(1) - num_prefix, num_keep = keep_index.size(1);
  at::Tensor kept = at::empty({batch, num_prefix + num_keep + (fused ? 1 : 0), dim}, tokens.options());
  if (kept.numel() == 0) return kept;
  check_launch(clipfast_token_keep_gather_cuda(tokens.const_data_ptr(), dtype_code, batch, num_prefix, length, dim,
                                               tokens.stride(0), tokens.stride(1), keep_index.const_data_ptr<int64_t>(),
                                               num_keep, fused ? 1 : 0,
                                               fused ? weights.const_data_ptr<float>() : nullptr,
                                               kept.mutable_data_ptr(), current_stream()),
               kOp);
  return kept;
}

std::tuple<at::Tensor, at::Tensor> token_keep_gather_backward_cuda(const at::Tensor& grad_kept_in,
                                                                   const at::Tensor& tokens_in,
                                                                   const at::Tensor& keep_index_in,
                                                                   const std::optional<at::Tensor>& fuse_weights_in,
                                                                   int64_t num_prefix) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  constexpr const char* kOp = "token_keep_gather_backward";
  const int dtype_code = assert_gather_args(kOp, tokens_in, keep_index_in, fuse_weights_in, num_prefix);
  const bool fused = fuse_weights_in.has_value();
  const int64_t batch = tokens_in.size(0), dim = tokens_in.size(2);
  const int64_t length = tokens_in.size(1) - num_prefix, num_keep = keep_index_in.size(1);
  const int64_t kept_rows = num_prefix + num_keep + (fused ? 1 : 0);
  assert_token_keep_grad(kOp, grad_kept_in, tokens_in, kept_rows);
  const c10::cuda::CUDAGuard device_guard(tokens_in.device());
  const at::Tensor grad_kept = grad_kept_in.detach().contiguous();
  const at::Tensor keep_index = keep_index_in.detach().contiguous();
  // Only the fused gradient needs the tokens' values.
  const at::Tensor tokens = fused ? last_dim_contiguous(tokens_in.detach()) : at::Tensor();
  const at::Tensor weights = fused ? fuse_weights_in->detach().contiguous() : at::Tensor();
  at::Tensor grad_tokens = at::empty({batch, num_prefix + length, dim}, tokens_in.options());
  at::Tensor grad_weights = at::empty({batch, fused ? length : 0}, tokens_in.options().dtype(at::kFloat));
  if (grad_tokens.numel() == 0 && grad_weights.numel() == 0) return {grad_tokens, grad_weights};
  check_launch(clipfast_token_keep_gather_backward_cuda(
                   grad_kept.const_data_ptr(), fused ? tokens.const_data_ptr() : nullptr, dtype_code, batch,
                   num_prefix, length, dim, fused ? tokens.stride(0) : 0, fused ? tokens.stride(1) : 0,
                   keep_index.const_data_ptr<int64_t>(), num_keep, fused ? 1 : 0,
                   fused ? weights.const_data_ptr<float>() : nullptr, grad_tokens.mutable_data_ptr(),
                   fused ? grad_weights.mutable_data_ptr<float>() : nullptr, current_stream()),
               kOp);
  return {grad_tokens, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CUDA, m) {
  m.impl("token_keep_index", &token_keep_index_cuda);
  m.impl("token_keep_gather", &token_keep_gather_cuda);
  m.impl("token_keep_gather_backward", &token_keep_gather_backward_cuda);
}

}  // namespace clipfast
