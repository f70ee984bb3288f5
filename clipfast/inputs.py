"""Input conventions shared by every clipfast entry point: integer-like arguments and non-finite values.

Kept free of clipfast imports so that the op modules and the user API can both use it.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch

NON_FINITE_RULE = """Non-finite inputs (one rule for every clipfast op): a NaN never becomes a finite-looking answer.
A float result computed from the values (losses and their gradients, attention scores, kept tokens, EViT's
fused token) carries it: NaN in, NaN out. A result that cannot carry one (medoid and kept-token indices)
or would be decided by it (the SCE scores and Schur split, whose eigendecompositions it corrupts) is not
produced: the call raises. Raises means ValueError on CPU tensors in eager mode; on CUDA tensors, and
under ``torch.compile``, the check is ``torch._assert_async`` (no host sync): a RuntimeError naming the
input, on CUDA at the next synchronisation. Inf counts as NaN wherever it makes the result undefined
(token features of the medoid distances, SCE embeddings); scores may be +-inf (ordered values)."""


def as_int(value, name: str) -> int:
    """``value`` as a Python int: ints, NumPy integers and one-element integer tensors (``operator.index``);
    TypeError for anything else, bools included."""
    if not is_int_like(value):
        raise TypeError(f"{name} must be an int (or an integer-valued NumPy scalar / 0-d tensor), got "
                        f"{type(value).__name__} {value!r}")
    return operator.index(value)


def is_int_like(value) -> bool:
    """True for what :func:`as_int` accepts. Decided from types alone, without catching an exception of
    ``operator.index``: torch.compile (torch 2.11) cannot trace that try/except."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) or hasattr(type(value), "__index__")


def int_in_range(value, low: int, high: Optional[int] = None) -> Optional[int]:
    """``value`` as an int when it is integer-like (:func:`is_int_like`) and ``low <= value`` (``<= high``
    when given); None otherwise, for the caller to raise with its own message."""
    if not is_int_like(value):
        return None
    value = operator.index(value)
    return value if low <= value and (high is None or value <= high) else None


def check_no_nan(t: torch.Tensor, name: str, *, allow_inf: bool = False) -> None:
    """Enforce :data:`clipfast.inputs.NON_FINITE_RULE` on an input whose NaN (or Inf, unless ``allow_inf``) would be decided
    away: ValueError on CPU in eager mode, ``torch._assert_async`` on other devices and under torch.compile."""
    what = "NaN" if allow_inf else "NaN or Inf"
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        # One reduction decides the common case without a full-size mask: a NaN (or an Inf) element makes
        # the sum NaN (non-finite). Only a suspicious sum, which finite values can also give by overflow
        # or inf - inf, pays for the element-wise check.
        total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).item()
        suspicious = math.isnan(total) if allow_inf else not math.isfinite(total)
        bad = suspicious and (bool(torch.isnan(t).any()) if allow_inf else not bool(torch.isfinite(t).all()))
        if bad:
            raise ValueError(f"{name} contains {what}; clipfast raises instead of returning an answer that would "
                             "hide it (see clipfast.inputs.NON_FINITE_RULE)")
    else:
        ok = ~torch.isnan(t).any() if allow_inf else torch.isfinite(t).all()
        torch._assert_async(ok, f"clipfast: {name} contains {what}")
