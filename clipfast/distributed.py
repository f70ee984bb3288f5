"""Multi-process contrastive losses over ``torch.distributed`` (gloo, NCCL): gathers and rings.

Every rank holds ``n`` image and ``n`` text features of dimension ``D``; the global batch is
``N = W * n`` (W = world size). Semantics follow open_clip 3.3.0 exactly (see ``clipfast.nn``):

- gathers (``ClipLoss(local_loss, gather_with_grad)``): the features of all ranks are all-gathered,
  with autograd (the backward sums each rank's gradient into the owner, a reduce-scatter) or without;
  the loss over the gathered block then runs through the fused single-device ops, so no rank ever
  holds an n x N or N x N logits block;
- the ring (``ClipLoss(dist_impl="ring")``, :func:`ring_clip_loss`): image and text blocks travel
  around the ring with point-to-point ops while each rank merges block log-sum-exps; the backward
  sends the blocks around again with gradient accumulators that end at their owners. No rank holds
  the gathered features: O(n * D) memory per rank;
- SigLIP (``SigLipLoss(dist_impl=...)``): the local block with positives plus every remote text block
  as negatives, the blocks arriving by all-gather, broadcast-by-all-reduce or neighbour exchange.

Shapes are checked collectively first (one tiny all-gather of ``(n, D)``), so a mismatch raises the
same ``ValueError`` on every rank instead of hanging in a collective. Supported: the same ``n`` and
``D`` and dtype on every rank (open_clip's requirement too).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from clipfast.dtypes import compute_dtype
from clipfast.ops import contrastive as _ops

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def world_info(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``, or (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_consistent_features(image: torch.Tensor, text: torch.Tensor, group=None) -> None:
    """Raise the same ValueError on every rank unless all ranks hold (n, D) image and text features
    with the same n, D and dtype. One all-gather of four integers per rank."""
    rank, world = world_info(group)
    device = image.device if dist.get_backend(group) == dist.Backend.NCCL else torch.device("cpu")
    mine = torch.tensor([image.shape[0], text.shape[0], image.shape[-1], text.shape[-1],
                         _DTYPE_CODES.get(image.dtype, -1)], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    rows = [t.tolist() for t in everyone]
    problems = []
    if any(r[0] != r[1] for r in rows):
        problems.append("each rank needs as many images as texts")
    if len({r[0] for r in rows}) > 1:
        problems.append("the per-rank batch size differs between ranks")
    if len({r[2] for r in rows} | {r[3] for r in rows}) > 1:
        problems.append("the feature dimension differs between ranks or towers")
    if len({r[4] for r in rows}) > 1:
        problems.append("the feature dtype differs between ranks")
    if problems:
        table = ", ".join(f"rank {i}: image ({r[0]}, {r[2]}), text ({r[1]}, {r[3]})" for i, r in enumerate(rows))
        raise ValueError(f"distributed contrastive loss: {'; '.join(problems)} ({table}). "
                         "Every rank must hold (n, D) image and text features with the same n, D and dtype.")


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _all_gather_into(tensor: torch.Tensor, group) -> torch.Tensor:
    """(n, ...) from every rank -> (W * n, ...) in rank order, written straight into one output (no
    per-rank list and concatenation: at the sizes that matter every copy of the gathered block counts)."""
    _, world = world_info(group)
    tensor = tensor.detach().contiguous()
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor, group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient into the owner's slice
    (reduce-scatter), as open_clip's gather_with_grad."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group, ctx.rank, ctx.rows = group, world_info(group)[0], tensor.shape[0]
        return _all_gather_into(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        # gloo has no reduce-scatter: sum everything in place (the incoming gradient is this node's own
        # buffer), keep this rank's slice.
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows].clone(), None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """(n, ...) on every rank -> (W * n, ...) in rank order, differentiable."""
    return _AllGatherWithGrad.apply(tensor, group)


def gather_features(image: torch.Tensor, text: torch.Tensor, *, local_loss: bool, gather_with_grad: bool,
                    group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``gather_features``: (N, D) image and text features of all ranks. Without
    ``gather_with_grad`` the gathered copies carry no gradient, except that the global loss
    (``local_loss=False``) puts this rank's live tensors back in its own slot."""
    if gather_with_grad:
        return all_gather_with_grad(image, group), all_gather_with_grad(text, group)
    all_image, all_text = _all_gather_into(image, group), _all_gather_into(text, group)
    if local_loss:
        return all_image, all_text
    rank, _ = world_info(group)
    rows = slice(rank * image.shape[0], (rank + 1) * image.shape[0])
    return (torch.cat([all_image[:rows.start], image, all_image[rows.stop:]]),
            torch.cat([all_text[:rows.start], text, all_text[rows.stop:]]))


# ---------------------------------------------------------------------------------------------------
# Ring InfoNCE
# ---------------------------------------------------------------------------------------------------

class _Ring:
    """Sends to the right neighbour and receives from the left one, asynchronously."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = world_info(group)
        self.right = _global_rank(group, (self.rank + 1) % self.world)
        self.left = _global_rank(group, (self.rank - 1) % self.world)

    def start(self, tensor: torch.Tensor):
        """Begin passing ``tensor`` right; returns (receive buffer, pending requests)."""
        received = torch.empty_like(tensor)
        requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, self.right, self.group),
                                           dist.P2POp(dist.irecv, received, self.left, self.group)])
        return received, requests

    @staticmethod
    def finish(pending):
        received, requests = pending
        for request in requests:
            request.wait()
        return received


class _RingInfoNCE(torch.autograd.Function):
    """open_clip's local loss with gathered-with-grad features, computed on a ring.

    Rank r's loss: L_r = (1/2n) [sum_i (lse_j(s a_i . B_all) - s a_i . b_i)
                                + sum_j (lse_i(s b_j . A_all) - s a_j . b_j)],
    with a, b this rank's rows. Forward: the (image, text) block pair of each rank visits every rank
    once; row log-sum-exps are merged block by block. Backward: G = P / (2n) per direction (minus the
    local positives, applied after accumulation); the blocks visit every rank again, each carrying the
    gradient accumulators of its rows, which after W hops are back at their owner holding
    sum over ranks q of dL_q / d(block), the gradient open_clip's gather_with_grad produces.
    """

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, group):
        ring = _Ring(group)
        kernels = _ops.KERNELS.for_inputs(image)
        a, b = image.detach().contiguous(), text.detach().contiguous()
        n = a.shape[0]
        pair = torch.cat([a, b])  # the travelling block: (2n, D), images then texts
        image_lse = text_lse = None
        for step in range(ring.world):
            pending = ring.start(pair) if step < ring.world - 1 else None  # overlap with the kernels
            block_images, block_texts = pair[:n], pair[n:]
            r_img, _ = kernels.lse(a, block_texts, logit_scale, False)
            r_txt, _ = kernels.lse(b, block_images, logit_scale, False)
            image_lse = r_img if image_lse is None else torch.logaddexp(image_lse, r_img)
            text_lse = r_txt if text_lse is None else torch.logaddexp(text_lse, r_txt)
            if pending is not None:
                pair = ring.finish(pending)
        positives = _ops.positive_logit_sum(a, b, logit_scale, 0)
        loss = (_ops.infonce_from_lse(image_lse, positives, 0.0, 0.0)
                + _ops.infonce_from_lse(text_lse, positives, 0.0, 0.0)) / 2
        ctx.save_for_backward(image, text, logit_scale, image_lse, text_lse)
        ctx.group = group
        ctx.bias_like = None if logit_bias is None else torch.zeros_like(logit_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        image, text, logit_scale, image_lse, text_lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        kernels = _ops.KERNELS.for_inputs(image)
        a, b = image.detach().contiguous(), text.detach().contiguous()
        n = a.shape[0]
        dtype = compute_dtype(a.dtype)
        weight = 0.5 / n
        # Pass 1: text blocks travel for the image loss; pass 2: image blocks for the text loss. Two
        # passes instead of one with (image, text) pairs halve what travels and is double-buffered.
        own_a, texts_home = _ring_gradient_pass(ring, kernels, a, b, logit_scale, image_lse, weight)
        own_b, images_home = _ring_gradient_pass(ring, kernels, b, a, logit_scale, text_lse, weight)
        a_c, b_c = a.to(dtype), b.to(dtype)
        # The local positives (i, i) of each direction: into this rank's own loss terms (own_*) and into
        # the parts its own loss sends to its own key rows (*_home holds every rank's sum for them).
        _ops.subtract_positive_pairs(own_a, texts_home, a_c, b_c, weight, 0)
        _ops.subtract_positive_pairs(own_b, images_home, b_c, a_c, weight, 0)
        # ds of this rank's loss only: its queries against every key (DDP averages the ranks' ds).
        grad_scale = _ops.logit_scale_gradient(grad_loss, logit_scale, (a_c, own_a), (b_c, own_b))
        # d(own image rows) = own image-loss part + what every rank's text loss sent home (and
        # symmetrically for texts).
        grad_image = _ops.feature_gradient(grad_loss, logit_scale, own_a.add_(images_home), image.dtype)
        grad_text = _ops.feature_gradient(grad_loss, logit_scale, own_b.add_(texts_home), text.dtype)
        # The loss is invariant to a bias on the logits (softmax is shift-invariant): exact zero gradient.
        return grad_image, grad_text, grad_scale, ctx.bias_like, None


def _ring_gradient_pass(ring: _Ring, kernels, queries, keys, logit_scale, query_lse, weight):
    """One direction's gradient on the ring: G = weight * exp(s q k^T - lse_q) over all key blocks.

    Returns (G @ K_all for this rank's queries, sum over ranks of G^T @ q for this rank's keys), both
    unscaled, in the computation dtype. Each key block travels with the accumulator of its rows; after
    W steps and W hops the accumulator is back home."""
    empty = query_lse.new_empty(0)
    block, own, travelling = keys, None, None
    for step in range(ring.world):
        pending = ring.start(block) if step < ring.world - 1 else None  # overlaps the kernel below
        g_own, g_block = kernels.grad(queries, block, logit_scale, query_lse, empty, weight, 0.0)
        own = g_own if own is None else own.add_(g_own)
        travelling = g_block if travelling is None else travelling.add_(g_block)
        del g_own, g_block
        travelling = ring.finish(ring.start(travelling))
        if pending is not None:
            block = ring.finish(pending)
    return own, travelling


def ring_clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                   logit_bias: Optional[torch.Tensor] = None, group=None) -> torch.Tensor:
    """This rank's open_clip local loss (``local_loss=True, gather_with_grad=True``) on a ring.

    Args:
        image, text: (n, D) this rank's features, same n, D and dtype on every rank.
        logit_scale: 0-d or [1], already exponentiated; receives the rank-local gradient (DDP averages).
        logit_bias: optional, accepted as open_clip does; the loss does not depend on it.

    Returns:
        0-d fp32 loss; feature gradients are summed over ranks exactly as with gather_with_grad.
    """
    from clipfast import functional

    functional.check_feature_pair(image, text)  # this rank's pair, then the same (n, D, dtype) on every rank
    check_consistent_features(image, text, group)
    logit_scale = functional.as_scalar_tensor(logit_scale, "logit_scale", image)
    logit_bias = functional.as_scalar_tensor(logit_bias, "logit_bias", image)
    _ops._check_scalar_values(logit_scale, logit_bias)
    return _RingInfoNCE.apply(image, text, logit_scale, logit_bias, group)


# ---------------------------------------------------------------------------------------------------
# SigLIP block exchanges
# ---------------------------------------------------------------------------------------------------

def _exchange(to_right: Optional[torch.Tensor], to_left: Optional[torch.Tensor], group):
    """Send ``to_right`` right and ``to_left`` left (either may be None, the same on every rank);
    returns (from_left, from_right), what the neighbours sent this way."""
    ring = _Ring(group)
    ops, from_left, from_right = [], None, None
    if to_right is not None:
        from_left = torch.empty_like(to_right)
        ops += [dist.P2POp(dist.isend, to_right.contiguous(), ring.right, group),
                dist.P2POp(dist.irecv, from_left, ring.left, group)]
    if to_left is not None:
        from_right = torch.empty_like(to_left)
        ops += [dist.P2POp(dist.isend, to_left.contiguous(), ring.left, group),
                dist.P2POp(dist.irecv, from_right, ring.right, group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return from_left, from_right


class _NeighbourExchange(torch.autograd.Function):
    """Differentiable :func:`_exchange`: the gradients travel back the way the tensors came."""

    @staticmethod
    def forward(ctx, to_right, to_left, group):
        ctx.group = group
        return _exchange(to_right, to_left, group)

    @staticmethod
    def backward(ctx, grad_from_left, grad_from_right):
        # from_left was the left neighbour's to_right: its gradient goes back left, and vice versa.
        # What arrives from the right is the gradient of our to_right (and from the left, of to_left).
        back_from_left, back_from_right = _exchange(grad_from_right, grad_from_left, ctx.group)
        return back_from_right, back_from_left, None


def siglip_distributed_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                            logit_bias: torch.Tensor, dist_impl: str = "bidir", group=None) -> torch.Tensor:
    """open_clip's distributed SigLIP loss on this rank: the local block with its positives plus every
    other rank's text block as negatives, each block through the fused op (each divided by n)."""
    from clipfast import functional

    check_consistent_features(image, text, group)
    rank, world = world_info(group)
    n = image.shape[0]
    if dist_impl in ("gather", "reduce"):
        # Both deliver every text block with a gradient path back to its owner; one fused call covers
        # the whole row of blocks, positives at this rank's offset.
        all_text = all_gather_with_grad(text, group)
        return functional.siglip_loss(image, all_text, logit_scale, logit_bias, label_offset=rank * n)
    loss = functional.siglip_loss(image, text, logit_scale, logit_bias)
    if dist_impl == "shift":
        block = text
        for _ in range(world - 1):
            block, _ = _NeighbourExchange.apply(block, None, group)
            loss = loss + functional.siglip_loss(image, block, logit_scale, logit_bias, negative_only=True)
        return loss
    if dist_impl == "bidir":
        to_right = to_left = text
        pairs, remainder = divmod(world - 1, 2)
        for _ in range(pairs):
            from_left, from_right = _NeighbourExchange.apply(to_right, to_left, group)
            for block in (from_left, from_right):
                loss = loss + functional.siglip_loss(image, block, logit_scale, logit_bias, negative_only=True)
            to_right, to_left = from_left, from_right
        if remainder:
            from_left, _ = _NeighbourExchange.apply(to_right, None, group)
            loss = loss + functional.siglip_loss(image, from_left, logit_scale, logit_bias, negative_only=True)
        return loss
    raise ValueError(f"dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather', got {dist_impl!r}")
