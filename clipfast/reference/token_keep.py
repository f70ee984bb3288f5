"""Reference (specification) of attentive token removal (Attentive Mask CLIP arXiv:2212.08653, EViT
arXiv:2202.07800): selection of the highest-scoring patch tokens, the row gather that keeps them, and
EViT's fused token of the dropped ones.

Shapes: ``tokens: (B, P + L, D)`` (P prefix tokens such as [CLS], then L patch tokens), ``scores: (B, L)``,
``keep_index: (B, K)`` int64 patch indices (0-based among the L patches).

Selection, ``keep_index = token_keep_index(scores, K, grid_width, block)``:

- ``block == 1``: the K patches of highest score, by the total order "larger score first, NaN above
  +inf, equal scores (``-0.0 == +0.0``) to the lower index"; returned in ascending index order.
- ``block = b > 1`` (A-CLIP's selection): the L patches form a ``(L / grid_width, grid_width)`` grid cut
  into b x b blocks; a block's score is the sum of its b*b patch scores, added in row-major order
  within the block (the sum ranks blocks exactly as the block mean does); the ``K / (b*b)`` best blocks
  by the same total order (ties to the lower block in row-major block order) keep all their patches.

Scores are compared in the dtype they are given in (the public op passes float32, or float64 for
float64 tokens).

Gather, ``kept = token_keep_gather(tokens, keep_index, fuse_weights, P)``:

    kept[b] = [tokens[b, :P], tokens[b, P + keep_index[b, 0]], ..., tokens[b, P + keep_index[b, K-1]]
               (, fused[b])]
    fused[b] = sum over dropped patches i of fuse_weights[b, i] * tokens[b, P + i]

``fused`` (EViT's extra token, present iff ``fuse_weights`` is given) accumulates in the weights' dtype
(float32, float64 for float64 tokens) and is cast to the tokens' dtype; EViT does not renormalise the
weights. The backward is a row scatter (indices are unique per row, so no accumulation):
``grad_tokens[b, P + keep_index[b, j]] = grad_kept[b, P + j]``, the prefix rows copy, dropped rows get
``fuse_weights[b, i] * grad_fused[b]`` (zero without fusion); ``grad_weights[b, i] = <tokens[b, P + i],
grad_fused[b]>`` for dropped i and 0 for kept i (shape ``(B, 0)`` without fusion).
"""

from __future__ import annotations

import torch


def block_scores(scores: torch.Tensor, grid_width: int, block: int) -> torch.Tensor:
    """``(B, L / block^2)`` block sums in row-major block order, each added in row-major order."""
    batch, length = scores.shape
    grid = scores.reshape(batch, length // grid_width // block, block, grid_width // block, block)
    total = None
    for r in range(block):
        for c in range(block):
            total = grid[:, :, r, :, c] if total is None else total + grid[:, :, r, :, c]
    return total.reshape(batch, length // (block * block))


def _top_ascending(values: torch.Tensor, count: int) -> torch.Tensor:
    # A stable descending sort ranks NaN first and keeps equal values in index order: exactly the total order.
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :count]
    return order.sort(dim=1).values


def token_keep_index_reference(scores: torch.Tensor, num_keep: int, grid_width: int = 0,
                               block: int = 1) -> torch.Tensor:
    """``(B, num_keep)`` int64 ascending patch indices (see the module docstring)."""
    if block == 1:
        return _top_ascending(scores, num_keep)
    width_blocks = grid_width // block
    chosen = _top_ascending(block_scores(scores, grid_width, block), num_keep // (block * block))
    block_row, block_col = chosen // width_blocks, chosen % width_blocks
    offsets = torch.arange(block, device=scores.device)
    rows = (block_row[:, :, None, None] * block + offsets[:, None]) * grid_width
    cols = block_col[:, :, None, None] * block + offsets[None, :]
    return (rows + cols).reshape(scores.shape[0], num_keep).sort(dim=1).values


def _dropped_weights(fuse_weights: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
    return fuse_weights.scatter(1, keep_index, 0)


def token_keep_gather_reference(tokens: torch.Tensor, keep_index: torch.Tensor, fuse_weights, num_prefix: int):
    """``(B, P + K (+1 with fuse_weights), D)``: the prefix, the kept patches in order, the fused token."""
    patches = tokens[:, num_prefix:]
    kept = torch.gather(patches, 1, keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    parts = [tokens[:, :num_prefix], kept]
    if fuse_weights is not None:
        weights = _dropped_weights(fuse_weights, keep_index)
        fused = torch.einsum("bl,bld->bd", weights, patches.to(weights.dtype))
        parts.append(fused.unsqueeze(1).to(tokens.dtype))
    return torch.cat(parts, dim=1)


def token_keep_gather_backward_reference(grad_kept: torch.Tensor, tokens: torch.Tensor, keep_index: torch.Tensor,
                                         fuse_weights, num_prefix: int):
    """``(grad_tokens (B, P + L, D), grad_weights (B, L), or (B, 0) without fusion)``."""
    batch, num_keep = keep_index.shape
    grad_tokens = torch.zeros_like(tokens)
    grad_tokens[:, :num_prefix] = grad_kept[:, :num_prefix]
    grad_patches = grad_tokens[:, num_prefix:]
    grad_weights = tokens.new_zeros((batch, 0), dtype=torch.float32)
    if fuse_weights is not None:
        weights = _dropped_weights(fuse_weights, keep_index)
        grad_fused = grad_kept[:, -1].to(weights.dtype)
        grad_patches.copy_((weights[:, :, None] * grad_fused[:, None, :]).to(tokens.dtype))
        grad_weights = torch.einsum("bld,bd->bl", tokens[:, num_prefix:].to(weights.dtype), grad_fused)
        grad_weights = grad_weights.scatter(1, keep_index, 0)
    grad_patches.scatter_(1, keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]),
                          grad_kept[:, num_prefix:num_prefix + num_keep])
    return grad_tokens, grad_weights
