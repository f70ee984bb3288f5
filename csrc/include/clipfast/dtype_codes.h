// Element-type codes of the C ABIs of the CUDA kernels (plain C: included by nvcc and g++ alike).
#pragma once

enum { CLIPFAST_F32 = 0, CLIPFAST_F16 = 1, CLIPFAST_BF16 = 2 };
