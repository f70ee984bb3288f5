"""Reference (specification) of token merging (ToMe, Bolya et al., ICLR 2023, arXiv:2210.09461): bipartite
soft matching on a metric (ToMe uses the attention keys averaged over heads), then the size-weighted
average of every merged group.

Shapes: ``x: (B, N, D)`` tokens, ``metric: (B, N, C)``, ``size: (B, N)`` token sizes (how many original
patches each token stands for; None = all ones), P = ``num_prefix`` protected tokens ([CLS], a
distillation token, registers) at the front. ``r' = merge_count(N, r, P) = max(0, min(r, (N - P) // 2))``
tokens are merged away, so N' = N - r' tokens remain (a static shape).

Matching, ``dest = token_merge_match(metric, r, P)``, ``dest: (B, N)`` int64, the output row of every input
token (ToMe's ``unmerge`` is ``merged.gather(1, dest)``):

1. The tokens split alternately: A = positions 0, 2, 4, ..., B = positions 1, 3, 5, ...; the metric is
   normalised, ``m_i / max(||m_i||, 1e-12)`` (the clamp only keeps a zero row from giving NaN), and ``score[a, b] = <m_a, m_b>`` (cosine) for every A x B pair, with
   protected tokens (position < P) neither source (their row is -inf) nor destination (their column).
2. Every A token's best partner: ``partner[a] = argmax_b score[a, b]``, ``best[a]`` its score.
3. The A tokens in a stable descending sort of ``best`` (ties to the lower index): the first r' are
   merged into their partners, the others stay.
4. Output order (ToMe's): with P > 0, the prefix tokens in position order, then the kept A tokens in
   position order, then the B tokens in position order; with P = 0 (ToMe without a class token), the
   kept A tokens in the sorted order of step 3, then the B tokens. A merged A token's row is its
   partner's. With r' = 0 nothing moves: ``dest[i] = i``.

Every argmax and sort breaks ties to the lower index. For P <= 2 this is ToMe's ``bipartite_soft_matching``
with ``class_token = P >= 1`` and ``distill_token = P == 2`` exactly; larger P protects more tokens.

Reduction, ``merged, merged_size = token_merge_reduce(x, dest, size, N')`` (ToMe's ``merge_wavg``), in
the computation dtype (float32, float64 for float64 tokens)::

    merged_size[o] = sum_{i : dest[i] = o} size[i]
    merged[o]      = sum_{i : dest[i] = o} size[i] x[i] / merged_size[o]      (cast to x's dtype)

Backward (sizes and the matching are not differentiable, as in ToMe): every input row reads its one output
row, ``grad_x[i] = size[i] / merged_size[dest[i]] * grad_merged[dest[i]]`` (no scatter).
"""

from __future__ import annotations

from typing import Optional

import torch

from clipfast.dtypes import compute_dtype

METRIC_NORM_EPS = 1e-12


def merge_count(num_tokens: int, r: int, num_prefix: int) -> int:
    """r' = max(0, min(r, (N - P) // 2)): ToMe's cap, which leaves every merged A token a B partner."""
    return max(0, min(r, (num_tokens - num_prefix) // 2))


def _first_argmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    best = scores.max(dim=-1).values
    columns = torch.arange(scores.shape[-1], device=scores.device)
    index = torch.where(scores == best[..., None], columns, scores.shape[-1]).min(dim=-1).values
    return best, index


def token_merge_match_reference(metric: torch.Tensor, r: int, num_prefix: int) -> torch.Tensor:
    """``dest (B, N)`` int64: the output row of every token (see the module docstring)."""
    batch, n, _ = metric.shape
    device = metric.device
    merged = merge_count(n, r, num_prefix)
    if merged == 0:
        return torch.arange(n, device=device).expand(batch, n).clone()
    unit = metric.to(compute_dtype(metric.dtype))
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(METRIC_NORM_EPS)
    positions = torch.arange(n, device=device)
    pos_a, pos_b = positions[0::2], positions[1::2]
    scores = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)
    scores[:, pos_a < num_prefix, :] = -torch.inf
    scores[:, :, pos_b < num_prefix] = -torch.inf
    best, partner = _first_argmax(scores)
    order = torch.sort(best, dim=1, descending=True, stable=True).indices  # (B, nA) A indices
    num_a = pos_a.numel()
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_a, device=device).expand(batch, num_a))
    is_merged = rank < merged

    prefix_a, prefix_b = (pos_a < num_prefix), (pos_b < num_prefix)
    kept_a = num_a - int(prefix_a.sum()) - merged  # kept non-prefix A tokens
    dest_b = torch.where(prefix_b, pos_b, num_prefix + kept_a + torch.cumsum(~prefix_b, 0) - 1).expand(batch, -1)
    if num_prefix > 0:
        kept = ~is_merged & ~prefix_a
        dest_a = torch.where(prefix_a, pos_a, num_prefix + torch.cumsum(kept, dim=1) - 1)
    else:
        dest_a = rank - merged
    dest_a = torch.where(is_merged, dest_b.gather(1, partner), dest_a)
    dest = torch.empty(batch, n, dtype=torch.int64, device=device)
    dest[:, 0::2] = dest_a
    dest[:, 1::2] = dest_b
    return dest


def token_merge_reduce_reference(x: torch.Tensor, dest: torch.Tensor, size: Optional[torch.Tensor],
                                 num_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(merged (B, N', D) in x's dtype, merged_size (B, N') in the computation dtype)``."""
    acc = compute_dtype(x.dtype)
    batch, n, dim = x.shape
    weights = torch.ones(batch, n, dtype=acc, device=x.device) if size is None else size.to(acc)
    merged_size = torch.zeros(batch, num_out, dtype=acc, device=x.device).scatter_add_(1, dest, weights)
    sums = torch.zeros(batch, num_out, dim, dtype=acc, device=x.device)
    sums.scatter_add_(1, dest[..., None].expand(-1, -1, dim), x.to(acc) * weights[..., None])
    return (sums / merged_size[..., None]).to(x.dtype), merged_size


def token_merge_reduce_backward_reference(grad_merged: torch.Tensor, dest: torch.Tensor,
                                          size: Optional[torch.Tensor], merged_size: torch.Tensor) -> torch.Tensor:
    """``grad_x (B, N, D)`` in grad_merged's dtype: ``size[i] / merged_size[dest[i]] * grad_merged[dest[i]]``."""
    acc = merged_size.dtype
    weights = torch.ones(dest.shape, dtype=acc, device=dest.device) if size is None else size.to(acc)
    scale = weights / merged_size.gather(1, dest)
    rows = grad_merged.to(acc).gather(1, dest[..., None].expand(-1, -1, grad_merged.shape[-1]))
    return (rows * scale[..., None]).to(grad_merged.dtype)
