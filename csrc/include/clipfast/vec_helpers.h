// Helpers on at::vec::Vectorized<T> shared by the per-level kernel files in csrc/cpu/vec/ (and only by
// them: this header must be compiled with the level's flags, see clipfast/cpu_kernels.h).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>

#ifndef CPU_CAPABILITY
#error "csrc/cpu/vec/ files are compiled once per level with -DCPU_CAPABILITY=<LEVEL> (see setup.py)"
#endif

namespace clipfast::cpu {
namespace CPU_CAPABILITY {
namespace vec {

using at::vec::Vectorized;

// Lane sums in one fixed order (lane 0 first): the same add tree for every vector, so equal inputs give
// bitwise equal sums wherever they sit, and a result depends only on the level, not on the data layout.
template <typename T>
inline T sum_lanes(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T total = lanes[0];
  for (int l = 1; l < Vectorized<T>::size(); ++l) total += lanes[l];
  return total;
}

// The largest lane; NaN if any lane is NaN (as at::vec::maximum).
template <typename T>
inline T max_lanes(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T top = lanes[0];
  for (int l = 1; l < Vectorized<T>::size(); ++l) top = (lanes[l] > top || lanes[l] != lanes[l]) ? lanes[l] : top;
  return top;
}

// exp for the loss tiles: at::vec's fast polynomial exp (exp_u20, within 20 ulp, about twice as fast as
// Sleef's 1-ulp exp; double and levels without it fall back to .exp()), with NaN kept NaN (exp_u20's
// clamping would turn it into a large finite value) so non-finite features propagate.
template <typename T>
inline Vectorized<T> exp_fast(const Vectorized<T>& v) {
  return Vectorized<T>::blendv(v.exp_u20(), v, v != v);
}

// The first `count` lanes of v, the others `fill`.
template <typename T>
inline Vectorized<T> head(const Vectorized<T>& v, int64_t count, T fill) {
  return Vectorized<T>::set(Vectorized<T>(fill), v, count);
}

}  // namespace vec
}  // namespace CPU_CAPABILITY
}  // namespace clipfast::cpu
