"""The attentive token removal benchmark (CPU, fp32): ``python -m clipfast.bench --op token_keep``.

1. The keep kernel at A-CLIP / EViT's shape (B = 64, L = 196 patches + [CLS], D = 768, keep 98):
   ``clipfast.attentive_token_keep`` against ``torch.topk`` + ``torch.gather`` with autograd (forward +
   backward of the same upstream gradient), and its forward against a plain copy of the kept bytes.
2. A-CLIP's scores for a ViT-B/16 forward (:mod:`clipfast.bench.attention_scores`): one fused forward
   with [CLS]-row hooks against materialising and averaging every layer's attention maps.
3. The open_clip ViT-B-16 image tower, forward + backward, keeping 50% of the patches by given scores
   (A-CLIP's block rule, 100 of 196) against the same tower with every token.

The cases (:func:`cases`) are shared with ``benchmarks/bench_token_keep.py``; :func:`run` measures them
and prints the table, the targets, ``token_keep.csv`` and the plots.
"""

from __future__ import annotations

import contextlib

import torch

import clipfast
from clipfast.bench import attention_scores
from clipfast.bench import cases as bench_cases
from clipfast.bench import report

BATCH, PATCHES, DIM, KEEP = 64, 196, 768, 98
KEEP_KERNEL, TOWER = "keep_kernel", "vit_b16_tower"  # case groups (the A-CLIP scores: attention_scores.GROUP)
TOWER_BATCH = 8  # the tower target's batch (the quick run measures batch 2 and does not judge it)
# The legacy keys of keep_kernel_rows (the GPU benchmark's rows) by (provider, mode).
KEEP_ROW_NAMES = {("plain_copy", "fwd"): "copy", ("clipfast", "fwd"): "ours_fwd", ("topk_gather", "fwd"): "base_fwd",
                  ("clipfast", "fwd_bwd"): "ours", ("topk_gather", "fwd_bwd"): "base"}


def keep_inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(BATCH, 1 + PATCHES, DIM, generator=g).to(device).requires_grad_()
    scores = torch.rand(BATCH, PATCHES, generator=g).to(device)
    grad = torch.randn(BATCH, 1 + KEEP, DIM, generator=g).to(device)
    return tokens, scores, grad


def topk_gather(tokens, scores, num_keep):
    """The generic path: top-k indices (sorted, to keep the original order), then an autograd gather."""
    index = torch.topk(scores, num_keep, dim=1).indices.sort(dim=1).values
    kept = torch.gather(tokens[:, 1:], 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :1], kept], dim=1)


def clipfast_keep(tokens, scores, num_keep):
    return clipfast.attentive_token_keep(tokens, scores, num_keep)[0]


def plain_copy(tokens, scores, num_keep):
    """The floor of any keep: copying as many bytes as it returns."""
    return tokens.detach()[:, :1 + num_keep].clone()


@contextlib.contextmanager
def keep_step(inputs, keep, backward: bool):
    """``keep(tokens, scores, KEEP)``, and with ``backward`` the backward of the fixed upstream gradient;
    the step returns the kept tokens (and the input gradient)."""
    tokens, scores, grad = inputs

    def forward():
        return keep(tokens, scores, KEEP)

    def forward_backward():
        kept = keep(tokens, scores, KEEP)
        kept.backward(grad)
        tokens_grad, tokens.grad = tokens.grad, None
        return kept, tokens_grad

    yield forward_backward if backward else forward


def keep_cases(quick: bool = False, device: str = "cpu") -> list[bench_cases.OpCase]:
    """The keep kernel at B=64, L=196, D=768, keep 98: forward against a plain copy of the kept bytes,
    forward + backward against topk + gather."""
    common = dict(op="token_keep", group=KEEP_KERNEL, x_name="B", x_value=BATCH,
                  shape=(("B", BATCH), ("L", PATCHES), ("D", DIM), ("keep", KEEP)), inputs=(keep_inputs, device),
                  reps=5 if quick else 50, device=device)
    steps = (("plain_copy", "fwd", plain_copy), ("clipfast", "fwd", clipfast_keep), ("topk_gather", "fwd", topk_gather),
             ("clipfast", "fwd_bwd", clipfast_keep), ("topk_gather", "fwd_bwd", topk_gather))
    return [bench_cases.OpCase(provider=provider, mode=mode, **common,
                               baseline="plain_copy" if mode == "fwd" else "topk_gather",
                               paired=(provider, mode) == ("clipfast", "fwd"),
                               step=lambda inputs, keep=keep, mode=mode: keep_step(inputs, keep, mode == "fwd_bwd"))
            for provider, mode, keep in steps]


def keep_kernel_rows(quick: bool, device: str = "cpu") -> dict:
    """The keep cases' timings (``measure.Timing``-like rows with ``p50``) under the GPU benchmark's names:
    ``copy``, ``ours_fwd``, ``base_fwd``, ``ours``, ``base``."""
    rows = bench_cases.measure_cases(keep_cases(quick, device), log=lambda message: None)
    return {KEEP_ROW_NAMES[(r.provider, r.mode)]: r for r in rows}


def tower_inputs(batch: int):
    """open_clip ViT-B-16 image tower (random init, train mode), ``batch`` random images and patch scores."""
    import open_clip

    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.train()
    return visual, torch.randn(batch, 3, 224, 224), torch.rand(batch, PATCHES)


@contextlib.contextmanager
def tower_step(inputs, keep_half: bool):
    """Forward + backward of a fixed loss; with ``keep_half``, patched to keep 50% of the patches by the given
    scores (A-CLIP's block rule) while it is measured."""
    visual, images, scores = inputs

    def step():
        visual(images).square().mean().backward()
        visual.zero_grad(set_to_none=True)

    with contextlib.ExitStack() as patches:
        if keep_half:
            removal = clipfast.TokenRemoval.given_scores(0.5, block=2)
            handle = patches.enter_context(clipfast.patch_open_clip(visual, token_removal=removal))
            patches.enter_context(handle.keep_scores(scores))
        yield step


def cases(quick: bool = False, device: str = "cpu") -> list[bench_cases.OpCase]:
    """The keep kernel, A-CLIP's scores (:mod:`clipfast.bench.attention_scores`) and the ViT-B-16 tower."""
    batch = 2 if quick else TOWER_BATCH
    tower = dict(op="token_keep", group=TOWER, mode="fwd_bwd", x_name="batch", x_value=batch,
                 shape=(("batch", batch), ("image", 224)), inputs=(tower_inputs, batch), baseline="all_tokens",
                 reps=1 if quick else 3)
    return (keep_cases(quick, device) + attention_scores.cases(batch=4 if quick else 32, quick=quick, device=device)
            + [bench_cases.OpCase(provider="all_tokens", step=lambda i: tower_step(i, keep_half=False), **tower),
               bench_cases.OpCase(provider="clipfast_keep_50", step=lambda i: tower_step(i, keep_half=True), **tower)])


def judge(rows: list[report.Row]) -> report.Targets:
    """The targets of this run's rows."""
    targets = report.Targets()
    ours, base = (bench_cases.find_row(rows, KEEP_KERNEL, p, "fwd_bwd") for p in ("clipfast", "topk_gather"))
    ours_fwd, copy = (bench_cases.find_row(rows, KEEP_KERNEL, p, "fwd") for p in ("clipfast", "plain_copy"))
    fwd_bwd_speedup, copy_ratio = base.p50 / ours.p50, report.time_ratio(ours_fwd, copy)
    targets.check(fwd_bwd_speedup >= 5, f"keep kernel forward+backward {fwd_bwd_speedup:.1f}x faster than topk+gather "
                                        f"(target >= 5x)")
    copy_time = ours_fwd.paired_baseline_p50 or copy.p50
    targets.check(copy_ratio <= 2, f"keep kernel forward {ours_fwd.p50 * 1e3:.2f} ms = {copy_ratio:.2f}x a plain copy "
                                   f"of the kept bytes timed in alternation with it ({copy_time * 1e3:.2f} ms) "
                                   f"(target <= 2x)")

    plain, ours, base = (bench_cases.find_row(rows, attention_scores.GROUP, p)
                         for p in (attention_scores.PLAIN, attention_scores.OURS, attention_scores.BASELINE))
    # What scoring adds to the forward it rides on (the forward's own activations are the same for both).
    added_ours = max((ours.peak_extra_bytes - plain.peak_extra_bytes) / report.MIB, 1.0)
    added_base = (base.peak_extra_bytes - plain.peak_extra_bytes) / report.MIB
    time_ratio = base.p50 / ours.p50
    targets.check(added_base / added_ours >= 10,
                  f"scores: memory added to a plain forward {added_ours:.0f} MiB (at least 1 counted) vs "
                  f"{added_base:.0f} MiB materialising all maps, {added_base / added_ours:.0f}x less (target >= 10x); "
                  f"whole peaks {base.peak_extra_bytes / ours.peak_extra_bytes:.1f}x")
    targets.check(time_ratio >= 2, f"scores: {time_ratio:.2f}x less time than materialising all attention maps "
                                   f"(target >= 2x; on a CPU both are a ViT forward, {ours.p50 / plain.p50:.2f}x "
                                   f"and {base.p50 / plain.p50:.2f}x the plain forward's time)")

    full, kept = (bench_cases.find_row(rows, TOWER, p) for p in ("all_tokens", "clipfast_keep_50"))
    tower_speedup = full.p50 / kept.p50
    tower_target = f"ViT-B-16 tower forward+backward at keep 50%, batch {TOWER_BATCH} (target >= 1.8x)"
    if full.x_value != TOWER_BATCH:  # quick mode: batch 2, one timed run, fixed costs weigh more
        targets.not_run(tower_target, f"measured {tower_speedup:.2f}x at batch {full.x_value} in quick mode")
    else:
        targets.check(tower_speedup >= 1.8, f"ViT-B-16 tower forward+backward at keep 50%, batch {TOWER_BATCH}: "
                                            f"{tower_speedup:.2f}x faster than with all tokens (target >= 1.8x)")
    return targets


def run(quick: bool = False, out_dir: str = "bench-results", log=print) -> tuple[str, bool]:
    """Measures :func:`cases`, checks the targets, writes the CSV and plots; returns (report, all met)."""
    rows = bench_cases.measure_cases(cases(quick), log)
    targets = judge(rows)
    notes = [f"{KEEP_KERNEL}: clipfast.attentive_token_keep against topk (sorted) + autograd gather, and its "
             "forward against a plain copy of the kept bytes (*: the copy timed in alternation with the forward, "
             "under the same conditions: both are memory-bound, and a copy measured apart drifted by 2x between "
             "runs on a shared machine).",
             f"{attention_scores.GROUP}: A-CLIP's [CLS]-attention scores during a no-grad open_clip ViT-B/16 forward: "
             f"{attention_scores.OURS} (fused attention + hooks) vs {attention_scores.BASELINE} (every layer's "
             f"maps kept), {attention_scores.PLAIN} the floor.",
             f"{TOWER}: open_clip ViT-B-16 image tower (random init, train), forward + backward, all 197 tokens vs "
             "clipfast_keep_50 (given scores, keep 100 of 196 patches + [CLS])."]
    title = f"attentive token removal, CPU x{torch.get_num_threads()} threads, fp32"
    text = report.publish("token_keep", title, rows, targets, out_dir, report.device_name(),
                          report.op_columns("ms", group_width=15, shape_width=27, provider_width=27), notes,
                          {"x_label": "fp32", "time_label": "time [s]"})
    return text, targets.met
