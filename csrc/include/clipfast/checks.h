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

}  // namespace clipfast
