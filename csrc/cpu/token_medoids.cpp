// Deterministic batched k-medoids over token segments (CenterCLIP, arXiv:2205.00823) on the CPU.
//
// Per row of x (R, N, D): the N x N distance matrix (Euclidean on tokens centred on the row mean, so
// |a|^2 + |b|^2 - 2 a.b does not cancel for large-norm tokens; or cosine), KKZ initialisation with a
// running-min vector (O(K N)), then assignment / medoid-update iterations, each O(N^2) (the in-cluster
// cost sums), until the row's medoids stop changing (or, with split_size = s > 0, until no row of its
// chunk of s rows changed: CenterCLIP's stopping rule), at most max_iters times. Ties go to the lowest
// index everywhere. Rows (or chunks) run in parallel; memory is one N x N matrix per thread. No host
// sync (this is the host), no (K, N, N) temporaries. See clipfast/reference/token_medoids.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "clipfast/checks.h"

namespace clipfast {
namespace {

constexpr double kCosineNormEps = 1e-8;

enum class Metric { kEuclidean, kCosine };

Metric parse_metric(c10::string_view name) {
  if (name == "euclidean") return Metric::kEuclidean;
  if (name == "cosine") return Metric::kCosine;
  TORCH_CHECK(false, "token_medoids: metric must be 'euclidean' or 'cosine', got '", std::string(name), "'");
}

// (N, N) distances of one row's tokens (computation dtype) from one GEMM, the rest in plain loops (the
// per-row ATen calls of a tensor formulation cost more than the arithmetic at CenterCLIP's sizes).
// Euclidean: Gram of the row-mean-centred tokens, d_ij = sqrt(max(0, G_ii + G_jj - 2 G_ij)); cosine:
// Gram of the unit tokens, d_ij = 1 - G_ij. Only i < j is computed and mirrored, so the matrix is
// exactly symmetric (a two-token cluster's equal costs tie to the lower index); zero diagonal.
template <typename T>
std::vector<T> row_distances(const T* x, int64_t n, int64_t dim, Metric metric, const at::TensorOptions& options) {
  std::vector<T> work(x, x + n * dim);
  if (metric == Metric::kEuclidean) {
    std::vector<T> mean(dim, T(0));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = 0; d < dim; ++d) mean[d] += work[i * dim + d];
    for (int64_t d = 0; d < dim; ++d) mean[d] /= static_cast<T>(n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = 0; d < dim; ++d) work[i * dim + d] -= mean[d];
  } else {
    for (int64_t i = 0; i < n; ++i) {
      T sq = 0;
      for (int64_t d = 0; d < dim; ++d) sq += work[i * dim + d] * work[i * dim + d];
      const T inv = T(1) / std::max(std::sqrt(sq), static_cast<T>(kCosineNormEps));
      for (int64_t d = 0; d < dim; ++d) work[i * dim + d] *= inv;
    }
  }
  std::vector<T> gram(n * n);
  const at::Tensor tokens = at::from_blob(work.data(), {n, dim}, options);
  at::Tensor gram_view = at::from_blob(gram.data(), {n, n}, options);
  at::mm_out(gram_view, tokens, tokens.t());
  std::vector<T> dist(n * n, T(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i + 1; j < n; ++j) {
      const T g = gram[i * n + j];
      const T d = metric == Metric::kEuclidean
                      ? std::sqrt(std::max(T(0), gram[i * n + i] + gram[j * n + j] - 2 * g))
                      : T(1) - g;
      dist[i * n + j] = d;
      dist[j * n + i] = d;
    }
  }
  return dist;
}

template <typename T>
int64_t first_argmax(const T* values, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (values[i] > values[best]) best = i;
  return best;
}

// One row's state: its distance matrix and current medoids (in KKZ / update order).
template <typename T>
struct RowMedoids {
  std::vector<T> dist;  // N x N, row-major
  std::vector<int64_t> medoids;
  int64_t n;

  // argmin_k dist[medoids[k], j] for every token j (ties to the lowest k)
  std::vector<int64_t> assign(const std::vector<int64_t>& order) const {
    std::vector<int64_t> assignment(n, 0);
    for (int64_t j = 0; j < n; ++j) {
      T best = dist[order[0] * n + j];
      for (size_t k = 1; k < order.size(); ++k) {
        const T d = dist[order[k] * n + j];
        if (d < best) {
          best = d;
          assignment[j] = static_cast<int64_t>(k);
        }
      }
    }
    return assignment;
  }

  // One assignment + update step; returns whether any medoid changed.
  bool step() {
    const std::vector<int64_t> assignment = assign(medoids);
    const int64_t k_count = static_cast<int64_t>(medoids.size());
    std::vector<std::vector<int64_t>> members(k_count);
    for (int64_t j = 0; j < n; ++j) members[assignment[j]].push_back(j);  // ascending within a cluster
    bool changed = false;
    for (int64_t k = 0; k < k_count; ++k) {
      if (members[k].empty()) continue;  // cannot happen after KKZ (a medoid is nearest to itself)
      int64_t best = members[k][0];
      T best_cost = 0;
      for (size_t a = 0; a < members[k].size(); ++a) {
        const T* row = dist.data() + members[k][a] * n;
        T cost = 0;
        for (const int64_t j : members[k]) cost += row[j];
        if (a == 0 || cost < best_cost) {
          best_cost = cost;
          best = members[k][a];
        }
      }
      changed |= best != medoids[k];
      medoids[k] = best;
    }
    return changed;
  }
};

// KKZ initialisation of one row: the largest RAW norm first, then the farthest from the chosen set.
template <typename T>
RowMedoids<T> initialise(const T* x, int64_t n, int64_t dim, Metric metric, int64_t k_count,
                         const at::TensorOptions& options) {
  RowMedoids<T> row;
  row.n = n;
  row.dist = row_distances(x, n, dim, metric, options);
  std::vector<T> norms(n, T(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t d = 0; d < dim; ++d) norms[i] += x[i * dim + d] * x[i * dim + d];
  }
  row.medoids.push_back(first_argmax(norms.data(), n));  // the square preserves the argmax
  std::vector<T> nearest(row.dist.begin() + row.medoids[0] * n, row.dist.begin() + (row.medoids[0] + 1) * n);
  for (int64_t i = 1; i < k_count; ++i) {
    const int64_t next = first_argmax(nearest.data(), n);
    row.medoids.push_back(next);
    const T* d = row.dist.data() + next * n;
    for (int64_t j = 0; j < n; ++j) nearest[j] = std::min(nearest[j], d[j]);
  }
  return row;
}

std::tuple<at::Tensor, at::Tensor> token_medoids_index_cpu(const at::Tensor& x_in, int64_t k_count,
                                                           c10::string_view metric_name, int64_t max_iters,
                                                           int64_t split_size) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x_in.dim() == 3, "token_medoids: expected x of shape (rows, tokens, dim), got ", x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "token_medoids: x must be floating point, got ",
              x_in.scalar_type());
  const int64_t rows = x_in.size(0), n = x_in.size(1), dim = x_in.size(2);
  TORCH_CHECK(k_count >= 1 && k_count <= n, "token_medoids: num_medoids must be in [1, ", n, "], got ", k_count);
  TORCH_CHECK(max_iters >= 0, "token_medoids: max_iters must be >= 0, got ", max_iters);
  TORCH_CHECK(split_size >= 0, "token_medoids: split_size must be >= 0, got ", split_size);
  const Metric metric = parse_metric(metric_name);
  const auto dtype = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.detach().to(dtype).contiguous();
  at::Tensor index = at::empty({rows, k_count}, x.options().dtype(at::kLong));
  at::Tensor assignment = at::empty({rows, n}, x.options().dtype(at::kLong));
  const int64_t chunk = split_size > 0 ? split_size : 1;  // per-row stopping = chunks of one row
  const int64_t n_chunks = (rows + chunk - 1) / chunk;
  AT_DISPATCH_FLOATING_TYPES(dtype, "token_medoids_index_cpu", [&] {
    using T = scalar_t;
    const T* x_ptr = x.data_ptr<T>();
    int64_t* index_ptr = index.data_ptr<int64_t>();
    int64_t* assignment_ptr = assignment.data_ptr<int64_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const int64_t r0 = c * chunk, r1 = std::min(rows, r0 + chunk);
        std::vector<RowMedoids<T>> states;
        for (int64_t r = r0; r < r1; ++r) {
          states.push_back(initialise<T>(x_ptr + r * n * dim, n, dim, metric, k_count, x.options()));
        }
        for (int64_t it = 0; it < max_iters; ++it) {
          bool changed = false;
          for (auto& state : states) changed |= state.step();  // every row of the chunk steps together
          if (!changed) break;
        }
        for (int64_t r = r0; r < r1; ++r) {
          RowMedoids<T>& state = states[r - r0];
          std::vector<int64_t> sorted = state.medoids;
          std::sort(sorted.begin(), sorted.end());
          std::copy(sorted.begin(), sorted.end(), index_ptr + r * k_count);
          const std::vector<int64_t> final_assignment = state.assign(sorted);
          std::copy(final_assignment.begin(), final_assignment.end(), assignment_ptr + r * n);
        }
      }
    });
  });
  return {index, assignment};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CPU, m) { m.impl("token_medoids_index", &token_medoids_index_cpu); }

}  // namespace clipfast
