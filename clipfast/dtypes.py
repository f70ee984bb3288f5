"""The dtype policy of every clipfast op, in one place: float64 inputs compute (and return statistics) in
float64, every other float dtype accumulates and returns statistics in float32."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The computation dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32
