"""Input conventions shared by every clipfast entry point: integer-like arguments and non-finite values.

Kept free of clipfast imports so that the op modules and the user API can both use it.
"""

from __future__ import annotations

import operator

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
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int (or an integer-valued NumPy scalar / 0-d tensor), got "
                        f"{type(value).__name__} {value!r}") from None


def is_int_like(value) -> bool:
    """True for what :func:`as_int` accepts."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_no_nan(t: torch.Tensor, name: str, *, allow_inf: bool = False) -> None:
    """Enforce :data:`clipfast.inputs.NON_FINITE_RULE` on an input whose NaN (or Inf, unless ``allow_inf``) would be decided
    away: ValueError on CPU in eager mode, ``torch._assert_async`` on other devices and under torch.compile."""
    what = "NaN" if allow_inf else "NaN or Inf"
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = bool(torch.isnan(t).any()) if allow_inf else not bool(torch.isfinite(t).all())
        if bad:
            raise ValueError(f"{name} contains {what}; clipfast raises instead of returning an answer that would "
                             "hide it (see clipfast.inputs.NON_FINITE_RULE)")
    else:
        ok = ~torch.isnan(t).any() if allow_inf else torch.isfinite(t).all()
        torch._assert_async(ok, f"clipfast: {name} contains {what}")
