// Argument invariants of the token_merge kernels (csrc/cpu/token_merge.cpp, csrc/cuda/token_merge_binding.cpp).
// clipfast.token_merge (clipfast/functional.py) validates the user's tokens, metric, sizes, r and prefix, and
// the ops it calls build every other argument (dest by the match op, num_out from the shapes, merged_size by
// the reduction, grad_merged by autograd), so shapes are TORCH_INTERNAL_ASSERTs. The values of dest index
// memory, so the kernels check them where they read them (a TORCH_CHECK on the CPU).
#pragma once
#include <ATen/ATen.h>

#include "clipfast/checks.h"

#include <algorithm>
#include <optional>

namespace clipfast {

// r' = max(0, min(r, (N - P) // 2)): ToMe's cap (clipfast/reference/token_merge.py: merge_count).
inline int64_t token_merge_count(int64_t num_tokens, int64_t r, int64_t num_prefix) {
  return std::max<int64_t>(0, std::min<int64_t>(r, (num_tokens - num_prefix) / 2));
}

inline bool is_token_merge_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// token_merge_match: metric (batch, tokens, channels) float; r >= 0; num_prefix in [0, tokens].
inline void assert_token_merge_match_args(const at::Tensor& metric, int64_t r, int64_t num_prefix) {
  constexpr const char* op = "token_merge_match";
  TORCH_INTERNAL_ASSERT(metric.dim() == 3, op, ": metric must be (batch, tokens, channels), got ", metric.sizes());
  TORCH_INTERNAL_ASSERT(is_token_merge_dtype(metric.scalar_type()), op, ": metric must be floating point, got ",
                        metric.scalar_type());
  TORCH_INTERNAL_ASSERT(r >= 0, op, ": r ", r, " < 0");
  TORCH_INTERNAL_ASSERT(num_prefix >= 0 && num_prefix <= metric.size(1), op, ": num_prefix ", num_prefix,
                        " outside [0, ", metric.size(1), "]");
}

// token_merge_reduce (x = the tokens) and its backward (x = grad_merged, with rows = num_out): dest
// (batch, tokens) int64; size None or (batch, tokens); merged_size (batch, num_out) in the computation dtype.
inline void assert_token_merge_reduce_args(const char* op, const at::Tensor& x, const at::Tensor& dest,
                                           const std::optional<at::Tensor>& size, int64_t num_out) {
  TORCH_INTERNAL_ASSERT(x.dim() == 3, op, ": tokens must be (batch, rows, dim), got ", x.sizes());
  TORCH_INTERNAL_ASSERT(is_token_merge_dtype(x.scalar_type()), op, ": tokens must be float64, float32, bfloat16 "
                        "or float16, got ", x.scalar_type());
  TORCH_INTERNAL_ASSERT(dest.dim() == 2 && dest.size(0) == x.size(0) && dest.scalar_type() == at::kLong, op,
                        ": dest must be int64 (", x.size(0), ", tokens), got ", dest.scalar_type(), " ", dest.sizes());
  TORCH_INTERNAL_ASSERT(num_out >= 0 && num_out <= dest.size(1), op, ": num_out ", num_out, " outside [0, ",
                        dest.size(1), "]");
  TORCH_INTERNAL_ASSERT(dest.device() == x.device(), op, ": dest on ", dest.device(), " but tokens on ", x.device());
  if (size.has_value())
    TORCH_INTERNAL_ASSERT(size->sizes() == dest.sizes() && size->device() == x.device() &&
                              at::isFloatingType(size->scalar_type()),
                          op, ": size must be float ", dest.sizes(), " on ", x.device(), ", got ", size->sizes());
}

}  // namespace clipfast
