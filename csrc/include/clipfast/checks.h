// Argument checks shared by the native kernels. User errors are TORCH_CHECKs (they surface in Python
// as RuntimeError/ValueError with the message); invariants are TORCH_INTERNAL_ASSERTs.
#pragma once
#include <ATen/ATen.h>

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

}  // namespace clipfast
