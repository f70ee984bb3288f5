"""A plain-PyTorch port of ToMe's published procedure (Bolya et al., ICLR 2023, arXiv:2210.09461, and its
reference repository's description), the baseline that :func:`clipfast.token_merge` is tested and
benchmarked against.

ToMe's step, per transformer block: ``bipartite_soft_matching`` on the metric (cosine scores between the
alternating token sets A = even and B = odd positions, [CLS] and a distillation token protected with -inf,
row max and argmax, an argsort of the row maxima, the first r merged), then ``merge_wavg``: the tokens
scaled by their sizes, merged with ``scatter_reduce(..., "sum")``, divided by the merged sizes. Written
here from that description, with ToMe's non-stable ``argsort`` (the ops break ties to the lower index;
random inputs have no ties). Also the port's patch of a whole tower (:func:`patch_blocks` with
:func:`open_clip_block`, :func:`timm_block` or :func:`hf_layer`), and :func:`margin_metric`, matching inputs
whose result no rounding can change.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False,
                            distill_token: bool = False) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """ToMe's matching: returns ``merge(x, mode)`` that merges r tokens of any (B, N, *) tensor."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """ToMe's size-weighted average; ``size`` is (B, N, 1) as in ToMe (None: all ones)."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_merge(x: torch.Tensor, metric: torch.Tensor, r: int, size: Optional[torch.Tensor] = None,
               num_prefix_tokens: int = 1):
    """One ToMe step, ``(merged, merged_size (B, N'))``, with :func:`clipfast.token_merge`'s arguments
    (``num_prefix_tokens`` 0, 1 = [CLS] or 2 = [CLS] + distillation token, as ToMe supports)."""
    if num_prefix_tokens not in (0, 1, 2):
        raise ValueError("ToMe protects at most a class and a distillation token")
    merge = bipartite_soft_matching(metric, r, num_prefix_tokens >= 1, num_prefix_tokens == 2)
    merged, merged_size = merge_wavg(merge, x, None if size is None else size[..., None])
    return merged, merged_size[..., 0]


def parse_r(num_layers: int, r) -> list[int]:
    """ToMe's schedule: an int (constant), ``(r, inflection)`` (a linear ramp around r), or a list per block
    (padded with zeros)."""
    inflect = 0.0
    if isinstance(r, list):
        return list(r) + [0] * (num_layers - len(r))
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def margin_metric(batch, n, channels=64, num_prefix=1, seed=0, dtype=torch.float32):
    """(batch, n, channels) metrics whose matching no rounding can change: every A token is a B token (from
    the upper half, so never a prefix token) plus an orthogonal offset of its own length in [0.05, 0.45], so
    its best cosine, at least 0.9, stands well above its other pairs and the best cosines of a row differ by
    about 0.1 / n at least; the row norms vary."""
    g = torch.Generator().manual_seed(seed)
    num_a, num_b = (n + 1) // 2, n // 2
    rows = []
    for _ in range(batch):
        basis = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))[0]
        b_tokens = basis[:num_b] if num_b <= channels // 2 else torch.randn(num_b, channels, generator=g,
                                                                            dtype=torch.float64)
        metric = torch.empty(n, channels, dtype=torch.float64)
        metric[1::2] = b_tokens
        lengths = 0.05 + 0.4 * torch.randperm(num_a, generator=g, dtype=torch.float64) / num_a
        partners = torch.randint(num_b // 2, num_b, (num_a,), generator=g)  # non-prefix B tokens
        offsets = torch.randn(num_a, channels, generator=g, dtype=torch.float64)
        chosen = metric[1::2][partners]
        offsets -= (offsets * chosen).sum(-1, keepdim=True) / (chosen * chosen).sum(-1, keepdim=True) * chosen
        offsets = offsets / offsets.norm(dim=-1, keepdim=True) * chosen.norm(dim=-1, keepdim=True)
        metric[0::2] = chosen + lengths[:, None] * offsets
        rows.append(metric * (1 + torch.rand(n, 1, generator=g, dtype=torch.float64)))  # any norms
    return torch.stack(rows).to(dtype)


# ---------------------------------------------------------------------------------------------- towers
# ToMe's patch of a vision tower, as its repository describes it for timm (and written here alike for open_clip's
# and transformers' blocks): every block's forward replaced by attention with an explicit softmax plus log(size)
# on the keys (proportional attention), then the matching on the keys averaged over heads and merge_wavg, then
# the MLP; the sizes live in a dict that the first block resets on every forward; r per block from the schedule.


def _attention(q, k, v, scale, size):
    logits = (q * scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    return torch.softmax(logits, dim=-1) @ v


def _merge(x, k, r, info, num_prefix_tokens=1):
    if r > 0:
        x, info["size"] = tome_merge(x, k.mean(1), r, info["size"], num_prefix_tokens)
    return x


def _heads(t, heads):
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def open_clip_block(block, x, r, info):
    """open_clip's ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) with ToMe."""
    attn, h = block.attn, block.ln_1(x)
    q, k, v = (_heads(t, attn.num_heads) for t in torch.nn.functional.linear(h, attn.in_proj_weight,
                                                                              attn.in_proj_bias).chunk(3, -1))
    out = _attention(q, k, v, attn.head_dim ** -0.5, info["size"])
    x = _merge(x + block.ls_1(attn.out_proj(out.transpose(1, 2).flatten(2))), k, r, info)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def timm_block(block, x, r, info):
    """timm's ``Block`` (q/k norms, LayerScale, drop path) with ToMe."""
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(x)).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attn.proj(attn.norm(_attention(q, k, v, attn.scale, info["size"]).transpose(1, 2).flatten(2)))
    x = _merge(x + block.drop_path1(block.ls1(out)), k, r, info)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def hf_layer(layer, x, r, info):
    """transformers' ``CLIPEncoderLayer`` with ToMe."""
    attn, h = layer.self_attn, layer.layer_norm1(x)
    q, k, v = (_heads(proj(h), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = attn.out_proj(_attention(q, k, v, attn.scale, info["size"]).transpose(1, 2).flatten(2))
    x = _merge(x + out, k, r, info)
    return x + layer.mlp(layer.layer_norm2(x))


def patch_blocks(blocks, schedule, port_block) -> Callable[[], None]:
    """Replace every block's forward by ``port_block(block, x, r_i, info)``; returns the undo."""
    info = {"size": None}

    def block_forward(i, blk):
        def forward(x, *args, **kwargs):
            if i == 0:
                info["size"] = None
            return port_block(blk, x, schedule[i], info)
        return forward

    for i, blk in enumerate(blocks):
        blk.forward = block_forward(i, blk)
    return lambda: [delattr(blk, "forward") for blk in blocks]
