// What every CUDA binding (csrc/cuda/<op>_binding.cpp) shares: the dtype code and device of a tensor handed
// to a C ABI, the current stream, and the check that turns a launcher's return code into an error. Host
// compiler only (torch headers); the kernels' side of the error codes is clipfast/cuda_errors.h.
//
// The CUDA kernels compute float32, float16 and bfloat16 on CUDA tensors; clipfast.backends routes nothing
// else to them and the Python layer puts the tensors of a call on one device, so dtypes and devices are
// invariants here (TORCH_INTERNAL_ASSERT). They are still checked on every call: a wrong dtype or a host
// pointer would make a kernel read memory it does not own.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>  // c10::cuda::CUDAGuard: every binding launches on its inputs' device

#include "clipfast/cuda_errors.h"
#include "clipfast/dtype_codes.h"

namespace clipfast {

// The CLIPFAST_F32 / F16 / BF16 code of `t` (the argument `name` of `op`), asserting it is one of those.
int cuda_dtype_code(const at::Tensor& t, const char* op, const char* name);

// Asserts that `t` lives on a CUDA device. The dispatcher picks a CUDA kernel when any argument does, so
// this holds for the others only because the Python layer keeps the tensors of a call on one device.
void assert_on_cuda(const at::Tensor& t, const char* op, const char* name);

// Asserts that `t` lives on `like`'s device.
void assert_same_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name);

// The current CUDA stream of the current device, as the C ABIs take it (a cudaStream_t as void*).
void* current_stream();

// Raises "<op>: CUDA kernel launch failed: <message>" unless `code`, a launcher's return value, is 0. A user
// error (TORCH_CHECK): it reports the device's state (out of memory, a row too long for shared memory, an
// earlier asynchronous fault), which no check before the launch can foresee.
void check_launch(int code, const char* op);

}  // namespace clipfast
