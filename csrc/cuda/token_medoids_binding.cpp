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
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "clipfast/checks.h"
#include "clipfast/token_medoids_cuda.h"

namespace clipfast {
namespace {

constexpr const char* kOp = "token_medoids";  // message prefix shared with the CPU kernel
constexpr int64_t kDistanceBudget = int64_t{1} << 26;  // floats of distance matrices per tile (256 MiB)

void check_launch(int code) {
  TORCH_CHECK(code == 0, kOp, ": CUDA kernel launch failed: ", clipfast_token_medoids_cuda_error_string(code));
}

int parse_metric(c10::string_view name) {
  if (name == "euclidean") return CLIPFAST_MEDOIDS_EUCLIDEAN;
  if (name == "cosine") return CLIPFAST_MEDOIDS_COSINE;
  TORCH_CHECK(false, kOp, ": metric must be 'euclidean' or 'cosine', got '", std::string(name), "'");
}

std::tuple<at::Tensor, at::Tensor> token_medoids_index_cuda(const at::Tensor& x_in, int64_t num_medoids,
                                                            c10::string_view metric, int64_t max_iters,
                                                            int64_t split_size) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x_in.dim() == 3, kOp, ": expected x of shape (rows, tokens, dim), got ", x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), kOp, ": x must be floating point, got ", x_in.scalar_type());
  const int64_t rows = x_in.size(0), n = x_in.size(1), dim = x_in.size(2);
  TORCH_CHECK(num_medoids >= 1 && num_medoids <= n, kOp, ": num_medoids must be in [1, ", n, "], got ", num_medoids);
  TORCH_CHECK(max_iters >= 0, kOp, ": max_iters must be >= 0, got ", max_iters);
  TORCH_CHECK(split_size >= 0, kOp, ": split_size must be >= 0, got ", split_size);
  const int metric_code = parse_metric(metric);
  TORCH_CHECK(x_in.is_cuda(), kOp, ": expected a CUDA tensor, got x on ", x_in.device());
  const at::ScalarType dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": the CUDA kernel takes float32, float16 or bfloat16 tokens, got ", dtype,
              " (float64 runs on the CPU or reference backends)");
  TORCH_CHECK(n <= 0x7fffffff, kOp, ": at most 2^31 - 1 tokens per row, got ", n);
  const int dtype_code = dtype == at::kFloat ? CLIPFAST_F32 : dtype == at::kHalf ? CLIPFAST_F16 : CLIPFAST_BF16;

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
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t tile = std::min(tile_rows, rows - r0);
    const void* x_tile = x.select(0, r0).const_data_ptr();  // contiguous: the tile's rows follow
    float* dist = distances.mutable_data_ptr<float>();
    check_launch(clipfast_token_medoids_distances_cuda(x_tile, dtype_code, tile, n, dim, metric_code, dist, stream));
    check_launch(clipfast_token_medoids_cuda(dist, x_tile, dtype_code, tile, n, dim, num_medoids, max_iters, split_size,
                                             medoid_index.mutable_data_ptr<int64_t>() + r0 * num_medoids,
                                             assignment.mutable_data_ptr<int64_t>() + r0 * n,
                                             workspace.mutable_data_ptr<int32_t>(), stream));
  }
  return {medoid_index, assignment};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CUDA, m) { m.impl("token_medoids_index", &token_medoids_index_cuda); }

}  // namespace clipfast
