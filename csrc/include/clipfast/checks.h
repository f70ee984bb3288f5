// Argument checks shared by the native kernels. User errors are TORCH_CHECKs (they surface in Python
// as RuntimeError/ValueError with the message); invariants are TORCH_INTERNAL_ASSERTs.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace clipfast {

// x: (rows, dim) and y: (cols, dim), same floating dtype, same device.
inline void check_feature_pair(const at::Tensor& x, const at::Tensor& y, const char* op) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, op, ": expected 2-D features, got x of shape ", x.sizes(),
              " and y of shape ", y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), op, ": feature dimensions differ: x ", x.sizes(), ", y ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": x and y dtypes differ (", x.scalar_type(), " vs ",
              y.scalar_type(), ")");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": features must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device() == y.device(), op, ": x on ", x.device(), " but y on ", y.device());
}

inline void check_scalar(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold exactly one value, got shape ", t.sizes());
}

inline void check_vector(const at::Tensor& t, int64_t length, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must have shape (", length, "), got ",
              t.sizes());
}

// token_keep_index: scores (batch, patches) float32/float64; num_keep in [1, patches]; with block > 1 the
// patches form a (patches / grid_width, grid_width) grid cut into block x block blocks, kept whole.
inline void check_token_keep_index_args(const at::Tensor& scores, int64_t num_keep, int64_t grid_width,
                                        int64_t block) {
  constexpr const char* op = "token_keep_index";
  TORCH_CHECK(scores.dim() == 2, op, ": expected scores of shape (batch, patches), got ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
              ": scores must be float32 or float64, got ", scores.scalar_type());
  const int64_t length = scores.size(1);
  TORCH_CHECK(num_keep >= 1 && num_keep <= length, op, ": num_keep must be in [1, ", length, "], got ", num_keep);
  TORCH_CHECK(block >= 1, op, ": block must be >= 1, got ", block);
  if (block > 1) {
    TORCH_CHECK(grid_width > 0 && length % grid_width == 0, op, ": grid_width must divide the ", length,
                " patches, got ", grid_width);
    TORCH_CHECK(grid_width % block == 0 && (length / grid_width) % block == 0, op, ": block ", block,
                " must divide the grid's width ", grid_width, " and height ", length / grid_width);
    TORCH_CHECK(num_keep % (block * block) == 0, op, ": num_keep ", num_keep, " must be a multiple of block^2 = ",
                block * block);
  }
}

// The dtype of token_keep's fuse weights and score gradients: float64 for float64 tokens, else float32.
inline at::ScalarType token_keep_weights_dtype(at::ScalarType tokens_dtype) {
  return tokens_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// token_keep_gather and its backward, after the backend has checked the tokens' dtype and device: tokens
// (batch, prefix + patches, dim), only by shape; keep_index (batch, K <= patches) int64; fuse_weights
// (batch, patches) in token_keep_weights_dtype.
inline void check_token_keep_gather_args(const char* op, const at::Tensor& tokens, const at::Tensor& keep_index,
                                         const std::optional<at::Tensor>& fuse_weights, int64_t num_prefix) {
  TORCH_CHECK(num_prefix >= 0 && num_prefix <= tokens.size(1), op, ": num_prefix must be in [0, ", tokens.size(1),
              "], got ", num_prefix);
  const int64_t batch = tokens.size(0), length = tokens.size(1) - num_prefix;
  TORCH_CHECK(keep_index.dim() == 2 && keep_index.size(0) == batch && keep_index.size(1) <= length, op,
              ": keep_index must have shape (", batch, ", K) with K <= ", length, ", got ", keep_index.sizes());
  TORCH_CHECK(keep_index.scalar_type() == at::kLong, op, ": keep_index must be int64, got ",
              keep_index.scalar_type());
  TORCH_CHECK(keep_index.device() == tokens.device(), op, ": keep_index on ", keep_index.device(),
              " but tokens on ", tokens.device());
  if (!fuse_weights.has_value()) return;
  const at::Tensor& w = *fuse_weights;
  const at::ScalarType weights_dtype = token_keep_weights_dtype(tokens.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == batch && w.size(1) == length, op, ": fuse_weights must have shape (",
              batch, ", ", length, "), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == weights_dtype, op, ": fuse_weights must be ", weights_dtype, " for ",
              tokens.scalar_type(), " tokens, got ", w.scalar_type());
  TORCH_CHECK(w.device() == tokens.device(), op, ": fuse_weights on ", w.device(), " but tokens on ",
              tokens.device());
}

// token_keep_gather_backward: grad_kept has the gather output's shape (kept_rows rows), dtype and device.
inline void check_token_keep_grad(const char* op, const at::Tensor& grad_kept, const at::Tensor& tokens,
                                  int64_t kept_rows) {
  const int64_t batch = tokens.size(0), dim = tokens.size(2);
  TORCH_CHECK(grad_kept.dim() == 3 && grad_kept.size(0) == batch && grad_kept.size(1) == kept_rows &&
                  grad_kept.size(2) == dim,
              op, ": grad_kept must have shape (", batch, ", ", kept_rows, ", ", dim, "), got ", grad_kept.sizes());
  TORCH_CHECK(grad_kept.scalar_type() == tokens.scalar_type(), op, ": grad_kept must be ", tokens.scalar_type(),
              " like tokens, got ", grad_kept.scalar_type());
  TORCH_CHECK(grad_kept.device() == tokens.device(), op, ": grad_kept on ", grad_kept.device(), " but tokens on ",
              tokens.device());
}

}  // namespace clipfast
