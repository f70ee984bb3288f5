// CUDA implementation of the clipfast_C::token_medoids_index op (schema in csrc/clipfast.cpp), on top of the
// C ABI of csrc/cuda/token_medoids.cu (csrc/include/clipfast/token_medoids_cuda.h).
//
// Same contract as the CPU kernel (csrc/cpu/token_medoids.cpp): for every row of x (R, N, D), KKZ seeding,
// up to max_iters k-medoids iterations (per row, or per chunk of split_size rows), medoids sorted ascending
// and the final assignment. The rows are processed in tiles of whole chunks so that the fp32 distance
// matrices of a tile stay under kDistanceBudget floats; each tile is two launches (distances, medoids)
// writing straight into slices of the int64 outputs. Scratch comes from ATen once per call (the caching
// allocator makes this cheap); everything runs on the current stream and nothing synchronises with the host.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "clipfast/cuda_binding.h"
#include "clipfast/token_medoids_cuda.h"

namespace clipfast {
namespace {

constexpr const char* kOp = "token_medoids";  // message prefix shared with the CPU kernel
constexpr int64_t kDistanceBudget = int64_t{1} << 26;  // floats of distance matrices per tile (256 MiB)

int parse_metric(c10::string_view name) {
  if (name == "euclidean") return CLIPFAST_MEDOIDS_EUCLIDEAN;
  if (name == "cosine") return CLIPFAST_MEDOIDS_COSINE;
  TORCH_INTERNAL_ASSERT(false, kOp, ": unknown metric '", std::string(name), "'");
}

std::tuple<at::Tensor, at::Tensor> token_medoids_index_cuda(const at::Tensor& x_in, int64_t num_medoids,
                                                            c10::string_view metric, int64_t max_iters,
                                                            int64_t split_size) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // clipfast.token_medoids validates every argument (hence asserts); the kernel's own limit is a check.
  TORCH_INTERNAL_ASSERT(x_in.dim() == 3, kOp, ": x must be (rows, tokens, dim), got ", x_in.sizes());
  const int64_t rows = x_in.size(0), n = x_in.size(1), dim = x_in.size(2);
  TORCH_INTERNAL_ASSERT(num_medoids >= 1 && num_medoids <= n, kOp, ": num_medoids ", num_medoids, " outside [1, ", n,
                        "]");
  TORCH_INTERNAL_ASSERT(max_iters >= 0 && split_size >= 0, kOp, ": negative max_iters ", max_iters,
                        " or split_size ", split_size);
  const int metric_code = parse_metric(metric);
  assert_on_cuda(x_in, kOp, "x");
  const int dtype_code = cuda_dtype_code(x_in, kOp, "x");
  TORCH_CHECK(n <= 0x7fffffff, kOp, ": at most 2^31 - 1 tokens per row, got ", n);

  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.detach().contiguous();
  const at::TensorOptions index_options = x.options().dtype(at::kLong);
  at::Tensor medoid_index = at::empty({rows, num_medoids}, index_options);
  at::Tensor assignment = at::empty({rows, n}, index_options);
  if (rows == 0) return {medoid_index, assignment};

  // Tiles of whole chunks (chunks are counted from row 0, so every tile starts on a chunk boundary).
  const int64_t chunk = split_size > 0 ? std::min(split_size, rows) : 1;
  const int64_t per_row = n * n;
  const int64_t chunks_per_tile = std::max<int64_t>(1, kDistanceBudget / std::max<int64_t>(1, per_row * chunk));
  const int64_t tile_rows = std::min(rows, chunks_per_tile * chunk);
  at::Tensor distances = at::empty({tile_rows, n, n}, x.options().dtype(at::kFloat));
  const int64_t workspace_elements = clipfast_token_medoids_workspace_elements(tile_rows, n, num_medoids);
  TORCH_INTERNAL_ASSERT(workspace_elements >= 0);
  at::Tensor workspace = at::empty({workspace_elements}, x.options().dtype(at::kInt));
  void* stream = current_stream();
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t tile = std::min(tile_rows, rows - r0);
    const void* x_tile = x.select(0, r0).const_data_ptr();  // contiguous: the tile's rows follow
    float* dist = distances.mutable_data_ptr<float>();
    check_launch(clipfast_token_medoids_distances_cuda(x_tile, dtype_code, tile, n, dim, metric_code, dist, stream),
                 kOp);
    check_launch(clipfast_token_medoids_cuda(dist, x_tile, dtype_code, tile, n, dim, num_medoids, max_iters, split_size,
                                             medoid_index.mutable_data_ptr<int64_t>() + r0 * num_medoids,
                                             assignment.mutable_data_ptr<int64_t>() + r0 * n,
                                             workspace.mutable_data_ptr<int32_t>(), stream),
                 kOp);
  }
  return {medoid_index, assignment};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CUDA, m) { m.impl("token_medoids_index", &token_medoids_index_cuda); }

}  // namespace clipfast
