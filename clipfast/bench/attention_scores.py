"""The A-CLIP [CLS]-attention score benchmark (CPU, fp32): one no-grad forward of an open_clip ViT-B/16
image tower (random init, eval mode) on a batch of 224 x 224 images, three ways:

- ``plain forward``: the tower alone, no scores (the floor for the other two);
- ``clipfast.attention_scores``: the same forward with fused attention in every block, plus the
  [CLS] row of each layer's attention from hooks;
- ``materialised maps``: the baseline, A-CLIP's way: a plain-PyTorch forward where every block
  computes its explicit ``softmax(q k^T * scale)`` map [B, H, N, N], all maps are stacked
  [L, B, H, N, N], averaged over layers, row 0 sliced from column 1, averaged over heads.

Time is the wall-clock median; memory the peak resident size above that before the step, inputs
and weights excluded (:mod:`clipfast.bench.measure`).
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from clipfast.attention_scores import attention_scores
from clipfast.bench import measure as bench_measure


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


def _vit_b16():
    import open_clip

    return open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()


def run(batch: int = 32, quick: bool = False, device: str = "cpu") -> List[Dict]:
    """Measure the three methods; quick mode uses at most 4 images and one timed repetition.

    Returns one dict per method: ``case``, ``method``, ``ms`` (median wall-clock), ``peak_extra_mb``
    (MiB above the inputs), ``time_ratio`` and ``memory_ratio`` (this method's time and peak extra
    memory divided by clipfast's: the baseline's row holds time(baseline) / time(clipfast) and
    extra_memory(baseline) / extra_memory(clipfast)), and ``max_abs_diff`` (scores against the
    baseline's; None for the plain forward).
    """
    if quick:
        batch = min(batch, 4)
    torch.manual_seed(0)
    visual = _vit_b16().to(device)
    images = torch.randn(batch, 3, 224, 224).to(device)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU x{torch.get_num_threads()}"
    case = f"open_clip ViT-B/16 image tower, random init, eval, fp32, batch {batch}, {where}"

    def plain():
        with torch.no_grad():
            visual(images)

    methods = [("plain forward", plain),
               ("clipfast.attention_scores", lambda: attention_scores(visual, images)),
               ("materialised maps", lambda: materialised_scores(visual, images))]
    reps = 1 if quick else 2
    timings = {name: bench_measure.measure(step, device, reps=reps, warmup=1) for name, step in methods}

    reference = materialised_scores(visual, images)[1]
    diffs = {"clipfast.attention_scores": (attention_scores(visual, images) - reference).abs().max().item(),
             "materialised maps": 0.0}
    ours = timings["clipfast.attention_scores"]
    return [{"case": case, "method": name, "ms": t.p50 * 1e3, "peak_extra_mb": t.peak_extra_bytes / 2 ** 20,
             "time_ratio": t.p50 / ours.p50,
             "memory_ratio": t.peak_extra_bytes / max(ours.peak_extra_bytes, 1.0),
             "max_abs_diff": diffs.get(name)}
            for name, t in timings.items()]
