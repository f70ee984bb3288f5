// Argument checks shared by the native kernels of several ops. User errors are TORCH_CHECKs (they surface
// in Python as RuntimeError with the message); invariants, what the Python layer already guarantees
// (clipfast/functional.py validates user input once), are TORCH_INTERNAL_ASSERTs, kept wherever a violation
// would make a kernel read or write memory it does not own. Checks of one op live in <op>_checks.h.
#pragma once
#include <ATen/ATen.h>

namespace clipfast {

// x: (rows, dim) and y: (cols, dim), same floating dtype, same device. A user-facing check: the contrastive
// kernels are also reached from clipfast.distributed.ring_clip_loss, which does not run functional.py's
// feature checks, and the Schur-covariance kernels use it too.
inline void check_feature_pair(const at::Tensor& x, const at::Tensor& y, const char* op) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, op, ": expected 2-D features, got x of shape ", x.sizes(),
              " and y of shape ", y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), op, ": feature dimensions differ: x ", x.sizes(), ", y ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": x and y dtypes differ (", x.scalar_type(), " vs ",
              y.scalar_type(), ")");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": features must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device() == y.device(), op, ": x on ", x.device(), " but y on ", y.device());
}

// A one-value tensor such as a logit scale or bias (the kernels read exactly one element).
inline void assert_one_value(const at::Tensor& t, const char* op, const char* name) {
  TORCH_INTERNAL_ASSERT(t.numel() == 1, op, ": ", name, " must hold one value, got shape ", t.sizes());
}

// The computation dtype of every op (clipfast/dtypes.py): float64 for float64 inputs, else float32.
inline at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A (batch, rows, dim) tensor whose rows the kernels address through their batch and row strides: a copy only
// when the features themselves are strided.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(2) <= 1 || t.stride(2) == 1 ? t : t.contiguous();
}

// A vector of `length` values, such as a per-row statistic computed by an earlier kernel.
inline void assert_vector(const at::Tensor& t, int64_t length, const char* op, const char* name) {
  TORCH_INTERNAL_ASSERT(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must have shape (", length,
                        "), got ", t.sizes());
}

}  // namespace clipfast
