// Deterministic batched k-medoids over token segments (CenterCLIP, arXiv:2205.00823) on the CPU.
//
// Per row of x (R, N, D), in the computation dtype (fp64 for fp64, fp32 otherwise):
//   distances  Euclidean: c_i = x_i - mean_n x_n (centred, so |a|^2 + |b|^2 - 2 a.b does not cancel for
//              large-norm tokens), G = C C^T, d_ij = sqrt(max(0, G_ii + G_jj - 2 G_ij));
//              cosine: u_i = x_i / max(|x_i|, 1e-8), d_ij = 1 - u_i.u_j.
//              Each pair i < j is computed once and mirrored (exactly symmetric, so a two-token cluster's
//              equal costs tie to the lower index); d_ii = 0.
//   KKZ        m_0 = argmax_i |x_i| (RAW norms), m_k = argmax_j min_{l<k} d(m_l, j) over the tokens not
//              chosen yet, with a running-min vector (O(K N)); the K medoids are distinct tokens.
//   iterations m <- step(m): assign every token to argmin_k d(m_k, j) (a medoid to its own cluster: only
//              zero-distance ties such as duplicate tokens are decided by it); each medoid becomes its cluster's
//              member of least in-cluster distance sum (O(K N) + O(sum of squared cluster sizes)); until a
//              step changes nothing, at most max_iters times.
// Ties go to the lowest index everywhere. See clipfast/reference/token_medoids.py.
//
// split_size = s > 0 (CenterCLIP's stopping rule: a chunk of s rows steps until none of its rows changed)
// needs no chunks: a step depends on the row's own medoids only, so once a row's step changes nothing the
// row is at a fixed point and the further steps its chunk would give it change nothing. Each row stopping
// on its own gives exactly the chunked result (max_iters caps both alike), and rows are independent.
//
// Work: the O(N^2 D) Gram dominates. Rows are spread over the threads one by one (balanced whatever the
// split_size); a thread holds one row's working copy and N x N distances, which stay in L2 from the Gram
// to the last iteration. The Gram kernel (csrc/cpu/vec/token_medoids_tiles.cpp) covers the upper triangle
// only (half the FLOPs of a GEMM, no GEMM dispatch per row), written once on at::vec and compiled for
// every instruction-set level (AVX-512, AVX2, baseline x86, NEON), chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>

#include "clipfast/cpu_kernels.h"

namespace clipfast {
namespace {

constexpr double kCosineNormEps = 1e-8;
// Row length of the working copy: a multiple of cpu::kMedoidPad elements (whole vectors at every level),
// zero-padded, so the Gram kernel has no tail (the zeros add nothing to a dot product).
constexpr int64_t kPadFloats = cpu::kMedoidPad;

enum class Metric { kEuclidean, kCosine };

Metric parse_metric(c10::string_view name) {
  if (name == "euclidean") return Metric::kEuclidean;
  if (name == "cosine") return Metric::kCosine;
  TORCH_INTERNAL_ASSERT(false, "token_medoids: unknown metric '", std::string(name), "'");
}

// Sum of v[i]^2 in 16 interleaved partial sums: the compiler vectorises independent lanes (it may not
// reorder one float sum), and the serial dependency through one accumulator is gone.
template <typename T>
[[gnu::always_inline]] inline T squared_norm(const T* v, int64_t dim) {
  constexpr int kLanes = 16;
  T lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += v[d + l] * v[d + l];
  T total = 0;
  for (; d < dim; ++d) total += v[d] * v[d];
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// One row's working copy work (n x ld, columns >= dim zero): tokens centred on the row mean (Euclidean)
// or scaled to unit norm (cosine); norms = the RAW squared norms (KKZ's first pick: the square keeps the
// argmax; cosine's scale). Two passes over x: the mean needs every token before the first can be centred.
// The centred squared norms are not taken here but from the Gram's own diagonal (see csrc/cpu/vec/token_medoids_tiles.cpp).
template <typename T>
[[gnu::always_inline]] inline void prepare(const T* x, int64_t n, int64_t dim, int64_t ld, Metric metric, T* mean,
                                           T* norms, T* work) {
  if (metric == Metric::kEuclidean) std::fill(mean, mean + dim, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * dim;
    norms[i] = squared_norm(xi, dim);
    if (metric == Metric::kEuclidean)
      for (int64_t d = 0; d < dim; ++d) mean[d] += xi[d];
  }
  if (metric == Metric::kEuclidean)
    for (int64_t d = 0; d < dim; ++d) mean[d] /= static_cast<T>(n);
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * dim;
    T* wi = work + i * ld;
    if (metric == Metric::kEuclidean) {
      for (int64_t d = 0; d < dim; ++d) wi[d] = xi[d] - mean[d];
    } else {
      const T inv = T(1) / std::max(std::sqrt(norms[i]), static_cast<T>(kCosineNormEps));
      for (int64_t d = 0; d < dim; ++d) wi[d] = xi[d] * inv;
    }
    std::fill(wi + dim, wi + ld, T(0));
  }
}

// First index of the maximum (NaNs never win, as in a strict-> scan; index 0 if values[0] is NaN). The
// maximum comes from 16 interleaved running maxima (vectorisable, and exact in any order), then one scan
// finds its first occurrence.
template <typename T>
[[gnu::always_inline]] inline int64_t first_argmax(const T* values, int64_t n) {
  constexpr int kLanes = 16;
  T lanes[kLanes];
  std::fill(lanes, lanes + kLanes, values[0]);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = values[i + l] > lanes[l] ? values[i + l] : lanes[l];
  T top = values[0];
  for (; i < n; ++i) top = values[i] > top ? values[i] : top;
  for (int l = 0; l < kLanes; ++l) top = lanes[l] > top ? lanes[l] : top;
  for (i = 0; i < n; ++i)
    if (values[i] == top) return i;
  return 0;
}

// One thread's buffers, allocated once per parallel_for task (not per row): the row's working copy and
// its distance matrix stay in L2 from the Gram kernel through the last iteration.
template <typename T>
struct RowScratch {
  int64_t ld;
  std::unique_ptr<T[]> work, mean, norms, sq, dist, best;
  std::unique_ptr<int32_t[]> cluster, members;
  std::unique_ptr<int64_t[]> start, cursor;
  RowScratch(int64_t n, int64_t dim, int64_t k_count)
      : ld((dim + kPadFloats - 1) / kPadFloats * kPadFloats),
        work(new T[n * ld]),
        mean(new T[dim]),
        norms(new T[n]),
        sq(new T[n + kPadFloats]),
        dist(new T[n * n]),
        best(new T[n]),
        cluster(new int32_t[n]),
        members(new int32_t[n]),
        start(new int64_t[k_count + 1]),
        cursor(new int64_t[k_count]) {}
};

// KKZ: the largest RAW norm first, then repeatedly the token farthest from the chosen set (nearest[j]:
// the distance from token j to its nearest chosen medoid).
template <typename T>
[[gnu::always_inline]] inline void kkz(const T* dist, const T* norms, int64_t n, int64_t k_count, T* nearest,
                                       int64_t* medoids) {
  medoids[0] = first_argmax(norms, n);
  std::copy(dist + medoids[0] * n, dist + (medoids[0] + 1) * n, nearest);
  // A chosen token leaves the running for good (distances are >= 0, and min(-inf, d) stays -inf): the
  // medoids are distinct tokens even when fewer than K tokens differ.
  nearest[medoids[0]] = -std::numeric_limits<T>::infinity();
  for (int64_t k = 1; k < k_count; ++k) {
    medoids[k] = first_argmax(nearest, n);
    const T* row = dist + medoids[k] * n;
    for (int64_t j = 0; j < n; ++j) nearest[j] = row[j] < nearest[j] ? row[j] : nearest[j];  // std::min
    nearest[medoids[k]] = -std::numeric_limits<T>::infinity();
  }
}

// cluster[j] = argmin_k dist[order[k], j] (ties to the lowest k), and cluster[order[k]] = k. Medoid rows are scanned one after the
// other (contiguous) with a running minimum; a strict < keeps the lower k. The select is written as a
// mask because the compiler turns a ternary on an int into a branch and then does not vectorise.
template <typename T>
[[gnu::always_inline]] inline void assign(const T* dist, int64_t n, const int64_t* order, int64_t k_count,
                                          RowScratch<T>& s) {
  T* best = s.best.get();
  int32_t* cluster = s.cluster.get();
  std::copy(dist + order[0] * n, dist + (order[0] + 1) * n, best);
  std::fill(cluster, cluster + n, 0);
  for (int64_t k = 1; k < k_count; ++k) {
    const T* row = dist + order[k] * n;
    const int32_t kk = static_cast<int32_t>(k);
    for (int64_t j = 0; j < n; ++j) {
      const int32_t closer = -static_cast<int32_t>(row[j] < best[j]);  // all ones or zero: a select mask
      best[j] = row[j] < best[j] ? row[j] : best[j];
      cluster[j] = (kk & closer) | (cluster[j] & ~closer);
    }
  }
  // A medoid token belongs to its own cluster (CenterCLIP's diagonal shift): this only decides exact
  // zero-distance ties (duplicate tokens), and keeps the clusters' medoids distinct through the updates.
  for (int64_t k = 0; k < k_count; ++k) cluster[order[k]] = static_cast<int32_t>(k);
}

// One assignment + update step of a row; returns whether any medoid changed.
template <typename T>
[[gnu::always_inline]] inline bool step(const T* dist, int64_t n, int64_t k_count, int64_t* medoids,
                                        RowScratch<T>& s) {
  assign(dist, n, medoids, k_count, s);
  // Counting sort by cluster: cluster k's members are members[start[k] .. start[k + 1]), ascending.
  int64_t* start = s.start.get();
  int64_t* cursor = s.cursor.get();
  int32_t* members = s.members.get();
  std::fill(start, start + k_count + 1, 0);
  for (int64_t j = 0; j < n; ++j) ++start[s.cluster[j] + 1];
  for (int64_t k = 0; k < k_count; ++k) start[k + 1] += start[k];
  std::copy(start, start + k_count, cursor);
  for (int64_t j = 0; j < n; ++j) members[cursor[s.cluster[j]]++] = static_cast<int32_t>(j);
  bool changed = false;
  for (int64_t k = 0; k < k_count; ++k) {
    const int32_t* first = members + start[k];
    const int64_t size = start[k + 1] - start[k];
    if (size == 0) continue;  // cannot happen after KKZ (a medoid is nearest to itself)
    int64_t best = first[0];
    T best_cost = 0;
    for (int64_t a = 0; a < size; ++a) {
      const T* row = dist + static_cast<int64_t>(first[a]) * n;
      T cost = 0;
      for (int64_t b = 0; b < size; ++b) cost += row[first[b]];
      if (a == 0 || cost < best_cost) {
        best_cost = cost;
        best = first[a];
      }
    }
    changed |= best != medoids[k];
    medoids[k] = best;
  }
  return changed;
}

// Everything for one row: working copy, distances (into s.dist), KKZ, iterations until a step changes
// nothing (or max_iters), then the sorted medoids and the assignment against them.
template <typename T, typename Distances>
[[gnu::always_inline]] inline void solve_row(const T* x, int64_t n, int64_t dim, Metric metric, int64_t k_count,
                                             int64_t max_iters, RowScratch<T>& s, const Distances& distances,
                                             int64_t* medoids, int64_t* assignment) {
  prepare(x, n, dim, s.ld, metric, s.mean.get(), s.norms.get(), s.work.get());
  distances();
  kkz(s.dist.get(), s.norms.get(), n, k_count, s.best.get(), medoids);
  for (int64_t it = 0; it < max_iters; ++it)
    if (!step(s.dist.get(), n, k_count, medoids, s)) break;
  std::sort(medoids, medoids + k_count);
  assign(s.dist.get(), n, medoids, k_count, s);
  std::copy(s.cluster.get(), s.cluster.get() + n, assignment);
}

// One row: the distances come from the per-level Gram kernel (clipfast/cpu_kernels.h). medoids: the row's
// (R, K) output, in KKZ / cluster order until the final sort.
template <typename T>
void solve_row_any(const T* x, int64_t n, int64_t dim, Metric metric, int64_t k_count, int64_t max_iters,
                   RowScratch<T>& s, int64_t* medoids, int64_t* assignment) {
  const cpu::MedoidTiles<T>* gram;
  if constexpr (std::is_same_v<T, double>) {
    gram = &cpu::kernels().medoids_f64;
  } else {
    gram = &cpu::kernels().medoids_f32;
  }
  const auto distances = [&] {
    gram->distances(s.work.get(), n, s.ld, metric == Metric::kCosine, s.sq.get(), s.dist.get());
  };
  solve_row(x, n, dim, metric, k_count, max_iters, s, distances, medoids, assignment);
}

std::tuple<at::Tensor, at::Tensor> token_medoids_index_cpu(const at::Tensor& x_in, int64_t k_count,
                                                           c10::string_view metric_name, int64_t max_iters,
                                                           int64_t split_size) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // clipfast.token_medoids (clipfast/functional.py) validates every argument; these are invariants.
  TORCH_INTERNAL_ASSERT(x_in.dim() == 3, "token_medoids: x must be (rows, tokens, dim), got ", x_in.sizes());
  TORCH_INTERNAL_ASSERT(at::isFloatingType(x_in.scalar_type()), "token_medoids: x must be floating point, got ",
                        x_in.scalar_type());
  const int64_t rows = x_in.size(0), n = x_in.size(1), dim = x_in.size(2);
  TORCH_INTERNAL_ASSERT(k_count >= 1 && k_count <= n, "token_medoids: num_medoids ", k_count, " outside [1, ", n,
                        "]");
  TORCH_INTERNAL_ASSERT(max_iters >= 0 && split_size >= 0, "token_medoids: negative max_iters ", max_iters,
                        " or split_size ", split_size);
  const Metric metric = parse_metric(metric_name);
  const auto dtype = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.detach().to(dtype).contiguous();
  at::Tensor index = at::empty({rows, k_count}, x.options().dtype(at::kLong));
  at::Tensor assignment = at::empty({rows, n}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(dtype, "token_medoids_index_cpu", [&] {
    using T = scalar_t;
    const T* x_ptr = x.data_ptr<T>();
    int64_t* index_ptr = index.data_ptr<int64_t>();
    int64_t* assignment_ptr = assignment.data_ptr<int64_t>();
    at::parallel_for(0, rows, 1, [&](int64_t r_begin, int64_t r_end) {
      RowScratch<T> s(n, dim, k_count);
      for (int64_t r = r_begin; r < r_end; ++r) {
        solve_row_any<T>(x_ptr + r * n * dim, n, dim, metric, k_count, max_iters, s,
                         index_ptr + r * k_count, assignment_ptr + r * n);
      }
    });
  });
  return {index, assignment};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CPU, m) { m.impl("token_medoids_index", &token_medoids_index_cpu); }

}  // namespace clipfast
