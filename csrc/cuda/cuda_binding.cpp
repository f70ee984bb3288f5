// The plumbing shared by the CUDA bindings (csrc/include/clipfast/cuda_binding.h).
#include "clipfast/cuda_binding.h"

#include <c10/cuda/CUDAStream.h>

namespace clipfast {

int cuda_dtype_code(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return CLIPFAST_F32;
    case at::kHalf:
      return CLIPFAST_F16;
    case at::kBFloat16:
      return CLIPFAST_BF16;
    default:
      TORCH_INTERNAL_ASSERT(false, op, ": the CUDA kernels take float32, float16 or bfloat16, got ", name, " of ",
                            t.scalar_type());
  }
}

void assert_on_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_INTERNAL_ASSERT(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

void assert_same_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_INTERNAL_ASSERT(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ",
                        t.device());
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, op, ": CUDA kernel launch failed: ", clipfast_cuda_error_string(code));
}

}  // namespace clipfast
