// Token merging on the CPU (ToMe, arXiv:2210.09461): bipartite soft matching, the size-weighted merge and
// its backward. Specification: clipfast/reference/token_merge.py.
//
// Shapes: metric (B, N, C); x (B, N, D); size (B, N) or none (all ones); dest (B, N) int64, the output
// row of every token; N' = N - r' output rows.
//
// match:    the A x B dot products of every batch row by one batched GEMM on the metric in the computation
//           dtype (B x ceil(N/2) x floor(N/2) x C: about a MB for a ViT, small next to the tokens), scaled to
//           cosines by the inverse norms 1 / max(|m_i|, 1e-12) (no normalised copy of the metric). Then per batch row: every non-prefix A token's best non-prefix B partner
//           (strict >, so ties go to the lower B), the A tokens in a stable descending sort of their best
//           scores, the first r' merged into their partners, and every token's output row in ToMe's order.
// reduce:   per batch row a counting sort of dest gives every output row its sources in ascending order;
//           merged_size[o] = the sum of their sizes and merged[o] = sum size_i x_i / merged_size[o],
//           accumulated in the computation dtype (the division as a product with the reciprocal, once
//           per row). Every output row is written once, by one task: no scatter, no zero fill, no atomics,
//           so results do not depend on the thread count.
// backward: grad_x[i] = size_i / merged_size[dest_i] * grad_merged[dest_i]: each input row reads its one
//           output row.
//
// Work is split into tasks of about kPartBytes of output rows over all batch rows together, so that a small
// batch still occupies every thread. Rows are addressed through their batch and row strides; only a
// non-unit last stride makes a copy.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "clipfast/checks.h"
#include "clipfast/prefetch.h"
#include "clipfast/token_merge_checks.h"

namespace clipfast {
namespace {

constexpr int64_t kPartBytes = 32 * 1024;  // output bytes of one row task
constexpr int64_t kMatchRowsPerTask = 8;   // batch rows matched per task (each ~N^2 C / 4 FLOPs, done)
constexpr double kMetricNormEps = 1e-12;

at::Tensor token_merge_match_cpu(const at::Tensor& metric_in, int64_t r, int64_t num_prefix) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  assert_token_merge_match_args(metric_in, r, num_prefix);
  const int64_t batch = metric_in.size(0), n = metric_in.size(1);
  const int64_t merged = token_merge_count(n, r, num_prefix);
  const auto index_options = metric_in.options().dtype(at::kLong);
  if (merged == 0) return at::arange(n, index_options).expand({batch, n}).contiguous();
  const at::Tensor metric = metric_in.detach().to(compute_dtype(metric_in.scalar_type()));
  const at::Tensor inverse_norm = at::linalg_vector_norm(metric, 2, {-1}).clamp_min(kMetricNormEps).reciprocal();
  const at::Tensor dots = at::bmm(metric.slice(1, 0, n, 2), metric.slice(1, 1, n, 2).transpose(1, 2)).contiguous();
  const int64_t num_a = (n + 1) / 2, num_b = n / 2;
  const int64_t prefix_a = (num_prefix + 1) / 2, prefix_b = num_prefix / 2;  // protected A and B tokens
  const int64_t kept_a = num_a - prefix_a - merged;                          // non-prefix A tokens kept
  at::Tensor dest = at::empty({batch, n}, index_options);
  int64_t* dest_ptr = dest.data_ptr<int64_t>();
  // Output row of B token j: a prefix token keeps its position, the others follow the kept A tokens.
  const auto b_row = [&](int64_t j) { return j < prefix_b ? 2 * j + 1 : num_prefix + kept_a + (j - prefix_b); };
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "token_merge_match_cpu", [&] {
    using T = scalar_t;
    const T* dots_ptr = dots.data_ptr<T>();
    const T* inverse_ptr = inverse_norm.data_ptr<T>();
    at::parallel_for(0, batch, kMatchRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<T> best(num_a), scores(num_b);
      std::vector<int64_t> partner(num_a), order(num_a), rank(num_a);
      for (int64_t b = begin; b < end; ++b) {
        const T* inverse = inverse_ptr + b * n;
        for (int64_t a = 0; a < num_a; ++a) {
          if (a < prefix_a) {  // a protected source ranks last, never merged (r' leaves enough others)
            best[a] = -std::numeric_limits<T>::infinity();
            partner[a] = 0;
            continue;
          }
          const T* row = dots_ptr + (b * num_a + a) * num_b;
          for (int64_t j = prefix_b; j < num_b; ++j) scores[j] = row[j] * inverse[2 * a] * inverse[2 * j + 1];
          int64_t arg = prefix_b;
          for (int64_t j = prefix_b + 1; j < num_b; ++j) arg = scores[j] > scores[arg] ? j : arg;
          best[a] = scores[arg];
          partner[a] = arg;
        }
        std::iota(order.begin(), order.end(), int64_t{0});
        std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return best[i] > best[j]; });
        for (int64_t k = 0; k < num_a; ++k) rank[order[k]] = k;
        int64_t* d = dest_ptr + b * n;
        for (int64_t j = 0; j < num_b; ++j) d[2 * j + 1] = b_row(j);
        int64_t next_kept = num_prefix;  // with prefix tokens ToMe keeps the A tokens in position order
        for (int64_t a = 0; a < num_a; ++a) {
          if (a < prefix_a) {
            d[2 * a] = 2 * a;
          } else if (rank[a] < merged) {
            d[2 * a] = b_row(partner[a]);
          } else {
            d[2 * a] = num_prefix > 0 ? next_kept++ : rank[a] - merged;  // without: in the sorted order
          }
        }
      }
    });
  });
  return dest;
}

// Every output row's sources, ascending: sources[b, offsets[b, o] .. offsets[b, o + 1]). Raises on a dest
// value outside [0, num_out) and on an output row without a source.
std::tuple<at::Tensor, at::Tensor> sources_by_row(const at::Tensor& dest, int64_t num_out) {
  const int64_t batch = dest.size(0), n = dest.size(1);
  at::Tensor offsets = at::empty({batch, num_out + 1}, dest.options());
  at::Tensor sources = at::empty({batch, n}, dest.options());
  const int64_t* dest_ptr = dest.data_ptr<int64_t>();
  int64_t* offsets_ptr = offsets.data_ptr<int64_t>();
  int64_t* sources_ptr = sources.data_ptr<int64_t>();
  at::parallel_for(0, batch, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cursor(num_out);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* d = dest_ptr + b * n;
      int64_t* start = offsets_ptr + b * (num_out + 1);
      std::fill(start, start + num_out + 1, int64_t{0});
      for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK(d[i] >= 0 && d[i] < num_out, "token_merge: dest value ", d[i], " out of range [0, ", num_out, ")");
        ++start[d[i] + 1];
      }
      for (int64_t o = 0; o < num_out; ++o) {
        TORCH_CHECK_VALUE(start[o + 1] > 0, "token_merge: output row ", o, " of batch row ", b, " has no source");
        start[o + 1] += start[o];
      }
      std::copy(start, start + num_out, cursor.begin());
      for (int64_t i = 0; i < n; ++i) sources_ptr[b * n + cursor[d[i]]++] = i;
    }
  });
  return {offsets, sources};
}

std::tuple<at::Tensor, at::Tensor> token_merge_reduce_cpu(const at::Tensor& x_in, const at::Tensor& dest_in,
                                                          const std::optional<at::Tensor>& size_in, int64_t num_out) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  assert_token_merge_reduce_args("token_merge_reduce", x_in, dest_in, size_in, num_out);
  TORCH_INTERNAL_ASSERT(dest_in.size(1) == x_in.size(1), "token_merge_reduce: dest ", dest_in.sizes(),
                        " does not match the tokens ", x_in.sizes());
  const at::Tensor x = last_dim_contiguous(x_in.detach());
  const at::Tensor dest = dest_in.contiguous();
  const auto acc_dtype = compute_dtype(x.scalar_type());
  const int64_t batch = x.size(0), n = x.size(1), dim = x.size(2);
  const at::Tensor size = size_in.has_value() ? size_in->detach().to(acc_dtype).contiguous() : at::Tensor();
  at::Tensor merged = at::empty({batch, num_out, dim}, x.options());
  at::Tensor merged_size = at::empty({batch, num_out}, x.options().dtype(acc_dtype));
  if (merged.numel() == 0 && merged_size.numel() == 0) return {merged, merged_size};
  const auto [offsets, sources] = sources_by_row(dest, num_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "token_merge_reduce_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    static_assert(std::is_same_v<Acc, float> || std::is_same_v<Acc, double>);
    const T* x_ptr = x.data_ptr<T>();
    const int64_t x_batch = x.stride(0), x_row = x.stride(1);
    const Acc* size_ptr = size.defined() ? size.data_ptr<Acc>() : nullptr;
    const int64_t* offsets_ptr = offsets.data_ptr<int64_t>();
    const int64_t* sources_ptr = sources.data_ptr<int64_t>();
    T* out_ptr = merged.data_ptr<T>();
    Acc* out_size_ptr = merged_size.data_ptr<Acc>();
    const int64_t grain = std::max<int64_t>(1, kPartBytes / std::max<int64_t>(1, dim * int64_t(sizeof(T))));
    at::parallel_for(0, batch * num_out, grain, [&](int64_t begin, int64_t end) {
      std::vector<Acc> sum(dim);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / num_out, o = row % num_out;
        const int64_t* start = offsets_ptr + b * (num_out + 1) + o;
        const int64_t* src = sources_ptr + b * n;
        const Acc* s = size_ptr ? size_ptr + b * n : nullptr;
        const auto weight = [&](int64_t k) { return s ? s[src[k]] : Acc(1); };
        const auto token = [&](int64_t k) { return x_ptr + b * x_batch + src[k] * x_row; };
        Acc total = 0;
        for (int64_t k = start[0]; k < start[1]; ++k) total += weight(k);
        // The mean times the reciprocal of the summed sizes (one division per row, not per element).
        const Acc inverse = Acc(1) / total;
        T* out = out_ptr + row * dim;
        // A and B tokens alternate, so sources are scattered rows: fetch the next row's first one now.
        if (o + 1 < num_out) prefetch_row(token(start[1]), dim * int64_t(sizeof(T)));
        if (start[1] - start[0] == 1) {  // most rows: one source, one pass
          const Acc w = weight(start[0]);
          const T* xi = token(start[0]);
          for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(w * static_cast<Acc>(xi[d]) * inverse);
        } else {
          for (int64_t k = start[0]; k < start[1]; ++k) {
            const Acc w = weight(k);
            const T* xi = token(k);
            if (k == start[0]) {
              for (int64_t d = 0; d < dim; ++d) sum[d] = w * static_cast<Acc>(xi[d]);
            } else {
              for (int64_t d = 0; d < dim; ++d) sum[d] += w * static_cast<Acc>(xi[d]);
            }
          }
          for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(sum[d] * inverse);
        }
        out_size_ptr[row] = total;
      }
    });
  });
  return {merged, merged_size};
}

at::Tensor token_merge_reduce_backward_cpu(const at::Tensor& grad_in, const at::Tensor& dest_in,
                                           const std::optional<at::Tensor>& size_in, const at::Tensor& merged_size_in) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t num_out = grad_in.size(1);
  assert_token_merge_reduce_args("token_merge_reduce_backward", grad_in, dest_in, size_in, num_out);
  const auto acc_dtype = compute_dtype(grad_in.scalar_type());
  TORCH_INTERNAL_ASSERT(merged_size_in.sizes() == at::IntArrayRef({grad_in.size(0), num_out}) &&
                            merged_size_in.scalar_type() == acc_dtype,
                        "token_merge_reduce_backward: merged_size must be ", acc_dtype, " (", grad_in.size(0), ", ",
                        num_out, "), got ", merged_size_in.scalar_type(), " ", merged_size_in.sizes());
  const at::Tensor grad = last_dim_contiguous(grad_in.detach());
  const at::Tensor dest = dest_in.contiguous();
  const at::Tensor merged_size = merged_size_in.detach().contiguous();
  const at::Tensor size = size_in.has_value() ? size_in->detach().to(acc_dtype).contiguous() : at::Tensor();
  const int64_t batch = grad.size(0), n = dest.size(1), dim = grad.size(2);
  at::Tensor grad_x = at::empty({batch, n, dim}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "token_merge_reduce_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const T* g_ptr = grad.data_ptr<T>();
    const int64_t g_batch = grad.stride(0), g_row = grad.stride(1);
    const int64_t* dest_ptr = dest.data_ptr<int64_t>();
    const Acc* size_ptr = size.defined() ? size.data_ptr<Acc>() : nullptr;
    const Acc* total_ptr = merged_size.data_ptr<Acc>();
    T* out_ptr = grad_x.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kPartBytes / std::max<int64_t>(1, dim * int64_t(sizeof(T))));
    at::parallel_for(0, batch * n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / n, o = dest_ptr[row];
        TORCH_CHECK(o >= 0 && o < num_out, "token_merge: dest value ", o, " out of range [0, ", num_out, ")");
        const Acc w = (size_ptr ? size_ptr[row] : Acc(1)) / total_ptr[b * num_out + o];
        const T* g = g_ptr + b * g_batch + o * g_row;
        if (row + 1 < end && (row + 1) % n != 0) {  // the next input row's output row (scattered, as above)
          const int64_t next = dest_ptr[row + 1];
          if (next >= 0 && next < num_out) prefetch_row(g_ptr + b * g_batch + next * g_row, dim * int64_t(sizeof(T)));
        }
        T* out = out_ptr + row * dim;
        for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(static_cast<Acc>(g[d]) * w);
      }
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CPU, m) {
  m.impl("token_merge_match", &token_merge_match_cpu);
  m.impl("token_merge_reduce", &token_merge_reduce_cpu);
  m.impl("token_merge_reduce_backward", &token_merge_reduce_backward_cpu);
}

}  // namespace clipfast
