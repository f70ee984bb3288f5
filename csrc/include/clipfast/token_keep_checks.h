// Argument invariants of the token_keep kernels (csrc/cpu/token_keep.cpp, csrc/cuda/token_keep_binding.cpp).
// clipfast.attentive_token_keep (clipfast/functional.py) validates the user's tokens, scores, num_keep, grid
// and block, and the ops it calls build every other argument (keep_index by the index op, fuse_weights from
// the scores, grad_kept by autograd), so these are TORCH_INTERNAL_ASSERTs: they stay because the kernels
// index memory with these shapes, and they name the broken invariant if an internal caller gets one wrong.
#pragma once
#include <ATen/ATen.h>

#include "clipfast/checks.h"

#include <optional>

namespace clipfast {

// token_keep_index: scores (batch, patches) float32/float64; num_keep in [1, patches]; with block > 1 the
// patches form a (patches / grid_width, grid_width) grid cut into block x block blocks, kept whole.
inline void assert_token_keep_index_args(const at::Tensor& scores, int64_t num_keep, int64_t grid_width,
                                         int64_t block) {
  constexpr const char* op = "token_keep_index";
  TORCH_INTERNAL_ASSERT(scores.dim() == 2, op, ": scores must be (batch, patches), got ", scores.sizes());
  TORCH_INTERNAL_ASSERT(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
                        ": scores must be float32 or float64, got ", scores.scalar_type());
  const int64_t length = scores.size(1);
  TORCH_INTERNAL_ASSERT(num_keep >= 1 && num_keep <= length, op, ": num_keep ", num_keep, " outside [1, ", length,
                        "]");
  TORCH_INTERNAL_ASSERT(block >= 1, op, ": block ", block, " < 1");
  if (block > 1) {
    TORCH_INTERNAL_ASSERT(grid_width > 0 && length % grid_width == 0, op, ": grid_width ", grid_width,
                          " does not divide the ", length, " patches");
    TORCH_INTERNAL_ASSERT(grid_width % block == 0 && (length / grid_width) % block == 0, op, ": block ", block,
                          " does not divide the grid's width ", grid_width, " and height ", length / grid_width);
    TORCH_INTERNAL_ASSERT(num_keep % (block * block) == 0, op, ": num_keep ", num_keep,
                          " is not a multiple of block^2 = ", block * block);
  }
}

// token_keep_gather and its backward: tokens (batch, prefix + patches, dim), only by shape (each backend
// checks the dtypes it computes); keep_index (batch, K <= patches) int64; fuse_weights (batch, patches) in
// compute_dtype (checks.h); all on the tokens' device.
inline void assert_token_keep_gather_args(const char* op, const at::Tensor& tokens, const at::Tensor& keep_index,
                                          const std::optional<at::Tensor>& fuse_weights, int64_t num_prefix) {
  TORCH_INTERNAL_ASSERT(tokens.dim() == 3, op, ": tokens must be (batch, prefix + patches, dim), got ",
                        tokens.sizes());
  TORCH_INTERNAL_ASSERT(num_prefix >= 0 && num_prefix <= tokens.size(1), op, ": num_prefix ", num_prefix,
                        " outside [0, ", tokens.size(1), "]");
  const int64_t batch = tokens.size(0), length = tokens.size(1) - num_prefix;
  TORCH_INTERNAL_ASSERT(keep_index.dim() == 2 && keep_index.size(0) == batch && keep_index.size(1) <= length, op,
                        ": keep_index must be (", batch, ", K <= ", length, "), got ", keep_index.sizes());
  TORCH_INTERNAL_ASSERT(keep_index.scalar_type() == at::kLong, op, ": keep_index must be int64, got ",
                        keep_index.scalar_type());
  TORCH_INTERNAL_ASSERT(keep_index.device() == tokens.device(), op, ": keep_index on ", keep_index.device(),
                        " but tokens on ", tokens.device());
  if (!fuse_weights.has_value()) return;
  const at::Tensor& w = *fuse_weights;
  const at::ScalarType weights_dtype = compute_dtype(tokens.scalar_type());
  TORCH_INTERNAL_ASSERT(w.dim() == 2 && w.size(0) == batch && w.size(1) == length, op, ": fuse_weights must be (",
                        batch, ", ", length, "), got ", w.sizes());
  TORCH_INTERNAL_ASSERT(w.scalar_type() == weights_dtype, op, ": fuse_weights must be ", weights_dtype, " for ",
                        tokens.scalar_type(), " tokens, got ", w.scalar_type());
  TORCH_INTERNAL_ASSERT(w.device() == tokens.device(), op, ": fuse_weights on ", w.device(), " but tokens on ",
                        tokens.device());
}

// token_keep_gather_backward: grad_kept has the gather output's shape (kept_rows rows), dtype and device.
inline void assert_token_keep_grad(const char* op, const at::Tensor& grad_kept, const at::Tensor& tokens,
                                   int64_t kept_rows) {
  const int64_t batch = tokens.size(0), dim = tokens.size(2);
  TORCH_INTERNAL_ASSERT(grad_kept.dim() == 3 && grad_kept.size(0) == batch && grad_kept.size(1) == kept_rows &&
                            grad_kept.size(2) == dim,
                        op, ": grad_kept must be (", batch, ", ", kept_rows, ", ", dim, "), got ", grad_kept.sizes());
  TORCH_INTERNAL_ASSERT(grad_kept.scalar_type() == tokens.scalar_type(), op, ": grad_kept must be ",
                        tokens.scalar_type(), " like tokens, got ", grad_kept.scalar_type());
  TORCH_INTERNAL_ASSERT(grad_kept.device() == tokens.device(), op, ": grad_kept on ", grad_kept.device(),
                        " but tokens on ", tokens.device());
}

}  // namespace clipfast
