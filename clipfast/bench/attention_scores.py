"""The A-CLIP [CLS]-attention score benchmark (CPU, fp32): one no-grad forward of an open_clip ViT-B/16
image tower (random init, eval mode) on a batch of 224 x 224 images, three ways:

- ``plain forward``: the tower alone, no scores (the floor for the other two);
- ``clipfast.attention_scores``: the same forward with fused attention in every block, plus the
  [CLS] row of each layer's attention from hooks;
- ``materialised maps``: the baseline, A-CLIP's way: a plain-PyTorch forward where every block
  computes its explicit ``softmax(q k^T * scale)`` map [B, H, N, N], all maps are stacked
  [L, B, H, N, N], averaged over layers, row 0 sliced from column 1, averaged over heads.

Time is the wall-clock median; memory the peak resident size above that before the step, inputs
and weights excluded (:mod:`clipfast.bench.measure`). The three are cases of
``python -m clipfast.bench --op token_keep`` (:func:`cases`); :func:`run` serves the GPU benchmark.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.nn.functional as F

from clipfast.attention_scores import attention_scores
from clipfast.bench import cases as bench_cases

GROUP = "aclip_scores"
PLAIN, OURS, BASELINE = "plain_forward", "clipfast_attention_scores", "materialised_maps"


def materialised_scores(visual, images: torch.Tensor):
    """(pooled image features, scores (B, N - 1)) of an open_clip ViT with every attention map kept.

    Written for open_clip's default ViT configuration: ``ResidualAttentionBlock`` blocks (packed
    ``in_proj_weight``), [CLS] token pooling, no patch dropout.
    """
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        batch, n, dim = x.shape
        maps = []
        for block in visual.transformer.resblocks:
            attn = block.attn
            heads = attn.num_heads
            qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.reshape(batch, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            probs = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1)  # [B, H, N, N]
            maps.append(probs)
            out = (probs @ v).transpose(1, 2).reshape(batch, n, dim)
            x = x + block.ls_1(attn.out_proj(out))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        pooled = visual.ln_post(x)[:, 0] @ visual.proj
        scores = torch.stack(maps).mean(0)[:, :, 0, 1:].mean(1)
    return pooled, scores


def vit_b16_inputs(batch: int, device: str = "cpu"):
    """open_clip ViT-B/16 (random init, eval) on ``device`` and ``batch`` random 224 x 224 images."""
    import open_clip

    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval().to(device)
    return visual, torch.randn(batch, 3, 224, 224).to(device)


def _plain_forward(visual, images):
    with torch.no_grad():
        return visual(images)


METHODS = {PLAIN: _plain_forward, OURS: attention_scores, BASELINE: materialised_scores}


def cases(batch: int = 32, quick: bool = False, device: str = "cpu") -> List[bench_cases.OpCase]:
    """The three methods on one ViT-B/16 (quick: at most 4 images, one timed repetition)."""
    if quick:
        batch = min(batch, 4)
    common = dict(op="token_keep", group=GROUP, mode="fwd", x_name="batch", x_value=batch,
                  shape=(("batch", batch), ("image", 224)), inputs=(vit_b16_inputs, batch, device),
                  baseline=BASELINE, reps=1 if quick else 2, device=device)
    return [bench_cases.OpCase(provider=name, **common,
                               step=lambda inputs, method=method: contextlib.nullcontext(lambda: method(*inputs)))
            for name, method in METHODS.items()]


def run(batch: int = 32, quick: bool = False, device: str = "cpu") -> List[Dict]:
    """Measure the three methods of :func:`cases`; quick mode uses at most 4 images and one timed repetition.

    Returns one dict per method: ``case``, ``method`` (``plain forward``, ``clipfast.attention_scores``,
    ``materialised maps``), ``ms`` (median wall-clock), ``peak_extra_mb`` (MiB above the inputs),
    ``time_ratio`` and ``memory_ratio`` (this method's time and peak extra memory divided by clipfast's:
    the baseline's row holds time(baseline) / time(clipfast) and extra_memory(baseline) /
    extra_memory(clipfast)), and ``max_abs_diff`` (scores against the baseline's; None for the plain
    forward).
    """
    op_cases = cases(batch, quick, device)
    visual, images = op_cases[0].build_inputs()  # one tower for every method and the score check
    rows = [bench_cases.measure_case(case, (visual, images)) for case in op_cases]
    reference = materialised_scores(visual, images)[1]
    diffs = {OURS: (attention_scores(visual, images) - reference).abs().max().item(), BASELINE: 0.0}
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU x{torch.get_num_threads()}"
    case = f"open_clip ViT-B/16 image tower, random init, eval, fp32, batch {op_cases[0].x_value}, {where}"
    ours = next(r for r in rows if r.provider == OURS)
    names = {PLAIN: "plain forward", OURS: "clipfast.attention_scores", BASELINE: "materialised maps"}
    return [{"case": case, "method": names[r.provider], "ms": r.p50 * 1e3, "peak_extra_mb": r.peak_extra_bytes / 2 ** 20,
             "time_ratio": r.p50 / ours.p50,
             "memory_ratio": r.peak_extra_bytes / max(ours.peak_extra_bytes, 1.0),
             "max_abs_diff": diffs.get(r.provider)}
            for r in rows]
