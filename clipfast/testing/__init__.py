"""Test helpers: the tolerance table, comparisons against the float64 reference and sample inputs.

The process-group launcher lives in :mod:`clipfast.testing.gloo`, the ahead-of-time Triton compilation
checks in :mod:`clipfast.testing.triton_aot`.

Rules (DESIGN.md section 5):

- float64 and float32 kernels are compared with the reference run in float64 on the same inputs, with
  the tolerances of :data:`TOLERANCES`. Triton's fp32 path runs its dots with ``input_precision="ieee"``
  in tests, so fp32 tolerances apply to it too.
- bfloat16 / float16: the kernel's error against the float64 reference must be at most
  ``2 * error(plain PyTorch in the same dtype) + floor`` (flash-attention's rule): the tolerance scales
  with what the dtype can do on that problem.
"""

from __future__ import annotations

import torch

# (rtol, atol) per dtype and kind of quantity. Any looser value is an override in the test, with a reason.
TOLERANCES = {
    torch.float64: {"output": (1e-9, 1e-10), "grad": (1e-9, 1e-10)},
    torch.float32: {"output": (1e-5, 1e-5), "grad": (1e-4, 1e-5)},
}

# The explicit floor of the low-precision rule, relative to the reference's largest magnitude.
LOW_PRECISION_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


def assert_close_to_reference(actual: torch.Tensor, reference64: torch.Tensor, dtype: torch.dtype,
                              kind: str = "output", name: str = "value") -> None:
    """``actual`` (from inputs of ``dtype``) against the float64 reference, with :data:`TOLERANCES`."""
    rtol, atol = TOLERANCES[dtype][kind]
    torch.testing.assert_close(actual.to(torch.float64), reference64.to(torch.float64), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name} ({dtype}, {kind}): {m}")


def assert_within_low_precision_bound(actual: torch.Tensor, plain_same_dtype: torch.Tensor,
                                      reference64: torch.Tensor, dtype: torch.dtype, name: str = "value",
                                      floor: float | None = None) -> None:
    """``max|actual - ref64| <= 2 * max|plain - ref64| + floor * max|ref64|``; ``floor`` defaults to
    :data:`LOW_PRECISION_FLOOR` (kernel tests that round an intermediate to the input dtype, as tensor
    cores require, pass that dtype's epsilon and say so)."""
    ref = reference64.detach().cpu().to(torch.float64)
    error = (actual.detach().cpu().to(torch.float64) - ref).abs().max().item()
    plain_error = (plain_same_dtype.detach().cpu().to(torch.float64) - ref).abs().max().item()
    floor = LOW_PRECISION_FLOOR[dtype] if floor is None else floor
    bound = 2 * plain_error + floor * max(ref.abs().max().item(), 1e-30)
    assert error <= bound, (f"{name} ({dtype}): error {error:.3e} vs float64 exceeds 2 x PyTorch's "
                            f"{plain_error:.3e} + floor = {bound:.3e}")


def assert_close_relative(actual: torch.Tensor, reference: torch.Tensor, rtol: float, atol_rel: float) -> None:
    """assert_close in float64 on the CPU with ``atol = atol_rel * max|reference|`` (sums over many samples
    have no natural absolute scale)."""
    ref = reference.detach().cpu().double()
    atol = atol_rel * max(ref.abs().max().item(), 1e-30) if ref.numel() else 0.0
    torch.testing.assert_close(actual.detach().cpu().double(), ref, rtol=rtol, atol=atol)


def unit_features(n: int, d: int, *, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """Rows of unit norm (what CLIP towers emit), so logits lie in [-scale, scale]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1).to(device=device, dtype=dtype)
