// Deterministic batched k-medoids over token segments (CenterCLIP, arXiv:2205.00823) on the CPU: the op's
// entry. One row's solve (working copy, Gram distances, KKZ, iterations; the algorithm and its tie rules)
// is in csrc/cpu/vec/token_medoids_rows.cpp, compiled once per instruction-set level and chosen at run
// time (clipfast/cpu_kernels.h).
//
// split_size = s > 0 (CenterCLIP's stopping rule: a chunk of s rows steps until none of its rows changed)
// needs no chunks: a step depends on the row's own medoids only, so once a row's step changes nothing the
// row is at a fixed point and the further steps its chunk would give it change nothing. Each row stopping
// on its own gives exactly the chunked result (max_iters caps both alike), and rows are independent.
//
// Rows go to the threads one at a time from a shared counter (each thread holds one MedoidScratch): rows
// differ in their iteration counts, and on a shared machine a core can stall, so a fixed split would leave
// one thread waiting on the other. A row's result does not depend on the thread that solves it.
//
// Non-finite tokens raise here, not in a separate pass over x before the op: the row solve checks them in
// the pass that reads the row from memory anyway (clipfast.inputs.NON_FINITE_RULE).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "clipfast/cpu_kernels.h"

namespace clipfast {
namespace {

bool is_cosine(c10::string_view name) {
  if (name == "cosine") return true;
  TORCH_INTERNAL_ASSERT(name == "euclidean", "token_medoids: unknown metric '", std::string(name), "'");
  return false;
}

template <typename T>
const cpu::MedoidRows<T>& medoid_rows() {
  if constexpr (std::is_same_v<T, double>) {
    return cpu::kernels().medoids_f64;
  } else {
    return cpu::kernels().medoids_f32;
  }
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
  const bool cosine = is_cosine(metric_name);
  const auto dtype = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.detach().to(dtype).contiguous();
  at::Tensor index = at::empty({rows, k_count}, x.options().dtype(at::kLong));
  at::Tensor assignment = at::empty({rows, n}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(dtype, "token_medoids_index_cpu", [&] {
    using T = scalar_t;
    const cpu::MedoidRows<T>& solver = medoid_rows<T>();
    const T* x_ptr = x.data_ptr<T>();
    int64_t* index_ptr = index.data_ptr<int64_t>();
    int64_t* assignment_ptr = assignment.data_ptr<int64_t>();
    std::atomic<int64_t> next_row{0};
    std::atomic<bool> non_finite{false};
    at::parallel_for(0, rows, 1, [&](int64_t, int64_t) {
      cpu::MedoidScratch<T> scratch(n, dim, k_count);
      for (int64_t r = next_row++; r < rows && !non_finite; r = next_row++)
        if (!solver.solve(x_ptr + r * n * dim, n, dim, cosine, k_count, max_iters, scratch, index_ptr + r * k_count,
                          assignment_ptr + r * n))
          non_finite = true;
    });
    TORCH_CHECK_VALUE(!non_finite, "x (token_medoids) contains NaN or Inf; clipfast raises instead of returning an "
                      "answer that would hide it (see clipfast.inputs.NON_FINITE_RULE)");
  });
  return {index, assignment};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CPU, m) { m.impl("token_medoids_index", &token_medoids_index_cpu); }

}  // namespace clipfast
