// Element types of the CUDA kernels: conversion to fp32 on load and back on store, and dispatch from a dtype code of
// dtype_codes.h to the launch templated on the element type. CUDA headers only (no torch).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "clipfast/dtype_codes.h"

namespace clipfast {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounding an fp32 result once to the element type (round to nearest even).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<element type>{}) for a CLIPFAST_* dtype code; unknown codes are invalid values.
template <typename Launch>
cudaError_t dispatch_dtype(int dtype, Launch&& launch) {
  switch (dtype) {
    case CLIPFAST_F32:
      return launch(TypeTag<float>{});
    case CLIPFAST_F16:
      return launch(TypeTag<__half>{});
    case CLIPFAST_BF16:
      return launch(TypeTag<__nv_bfloat16>{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace clipfast
