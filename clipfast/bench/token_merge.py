"""The token merging benchmark (CPU, fp32): ``python -m clipfast.bench --op token_merge``.

1. The merge op at ToMe's ViT-B/16 shape (B = 32, N = 197 tokens, D = 768, r = 16, the metric a head's
   width of keys, C = 64): ``clipfast.token_merge`` against the plain-PyTorch port of ToMe's procedure
   (:mod:`clipfast.testing.tome`: matching, ``merge_wavg`` with autograd), forward and forward + backward of
   the same upstream gradient.
2. The open_clip ViT-B-16 and timm ViT-B/16 image towers (random init, eval) with ``TokenMerging(16)``
   against the same tower with every token and against the port's patch of it, forward (no grad) and
   forward + backward.

The cases (:func:`cases`) are shared with ``benchmarks/bench_token_merge.py``; :func:`run` measures them and
prints the table, the targets, ``token_merge.csv`` and the plots.
"""

from __future__ import annotations

import contextlib

import torch

import clipfast
from clipfast.bench import cases as bench_cases
from clipfast.bench import report
from clipfast.testing import tome

BATCH, TOKENS, DIM, CHANNELS, R = 32, 197, 768, 64, 16
MERGE_KERNEL = "merge_kernel"
TOWERS = {"open_clip_vit_b16": "open_clip ViT-B-16", "timm_vit_b16": "timm vit_base_patch16_224"}
TOWER_BATCH = 8  # the tower targets' batch (the quick run measures batch 2, forward only, and does not judge)
MODES = ("fwd", "fwd_bwd")


def merge_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, TOKENS, DIM, generator=g).requires_grad_()
    metric = torch.randn(BATCH, TOKENS, CHANNELS, generator=g)
    grad = torch.randn(BATCH, TOKENS - R, DIM, generator=g)
    return x, metric, grad


def clipfast_merge(x, metric):
    return clipfast.token_merge(x, metric, R)[0]


def tome_port_merge(x, metric):
    return tome.tome_merge(x, metric, R)[0]


@contextlib.contextmanager
def merge_step(inputs, merge, backward: bool):
    x, metric, grad = inputs

    def forward():
        return merge(x, metric)

    def forward_backward():
        merged = merge(x, metric)
        merged.backward(grad)
        x_grad, x.grad = x.grad, None
        return merged, x_grad

    yield forward_backward if backward else forward


def merge_cases(quick: bool = False) -> list[bench_cases.OpCase]:
    common = dict(op="token_merge", group=MERGE_KERNEL, x_name="B", x_value=BATCH,
                  shape=(("B", BATCH), ("N", TOKENS), ("D", DIM), ("C", CHANNELS), ("r", R)), inputs=(merge_inputs,),
                  baseline="tome_port", reps=5 if quick else 30)
    return [bench_cases.OpCase(provider=provider, mode=mode, **common, paired=provider == "clipfast",
                               step=lambda inputs, merge=merge, mode=mode: merge_step(inputs, merge, mode == "fwd_bwd"))
            for mode in MODES for provider, merge in (("tome_port", tome_port_merge), ("clipfast", clipfast_merge))]


def tower_inputs(tower: str, batch: int):
    """The tower (random init, eval), ``batch`` random images, its blocks and the port's block function."""
    torch.manual_seed(0)
    if tower == "open_clip_vit_b16":
        import open_clip

        model = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()
        blocks, port_block, patch = model.transformer.resblocks, tome.open_clip_block, clipfast.patch_open_clip
    else:
        import timm

        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
        blocks, port_block, patch = model.blocks, tome.timm_block, clipfast.patch_timm_vit
    return model, torch.randn(batch, 3, 224, 224), blocks, port_block, patch


@contextlib.contextmanager
def tower_step(inputs, provider: str, backward: bool):
    """The tower's forward (no grad) or forward + backward of a fixed loss, merged as ``provider`` says while
    it is measured: ``all_tokens``, ``clipfast_tome`` (``TokenMerging(16)``) or ``tome_port``."""
    model, images, blocks, port_block, patch = inputs

    def forward():
        with torch.no_grad():
            return model(images)

    def forward_backward():
        model(images).square().mean().backward()
        model.zero_grad(set_to_none=True)

    with contextlib.ExitStack() as patches:
        if provider == "clipfast_tome":
            patches.enter_context(patch(model, token_merging=clipfast.TokenMerging(R)))
        elif provider == "tome_port":
            patches.callback(tome.patch_blocks(blocks, tome.parse_r(len(blocks), R), port_block))
        yield forward_backward if backward else forward


def tower_cases(quick: bool = False) -> list[bench_cases.OpCase]:
    batch = 2 if quick else TOWER_BATCH
    out = []
    for tower in TOWERS:
        for mode in MODES[:1] if quick else MODES:
            common = dict(op="token_merge", group=tower, mode=mode, x_name="batch", x_value=batch,
                          shape=(("batch", batch), ("image", 224), ("r", R)), inputs=(tower_inputs, tower, batch),
                          baseline="all_tokens", reps=1 if quick else 3)
            out += [bench_cases.OpCase(provider=p, step=lambda i, p=p, mode=mode: tower_step(i, p, mode == "fwd_bwd"),
                                       **common) for p in ("all_tokens", "clipfast_tome", "tome_port")]
    return out


def cases(quick: bool = False) -> list[bench_cases.OpCase]:
    """The merge op against the ToMe port, then the two ViT-B/16 towers with and without merging."""
    return merge_cases(quick) + tower_cases(quick)


def judge(rows: list[report.Row]) -> report.Targets:
    """The targets of this run's rows."""
    targets = report.Targets()
    ours, port = (bench_cases.find_row(rows, MERGE_KERNEL, p, "fwd_bwd") for p in ("clipfast", "tome_port"))
    speedup, memory = 1 / report.time_ratio(ours, port), ours.peak_extra_bytes / max(port.peak_extra_bytes, 1)
    targets.check(speedup >= 5, f"merge op forward+backward {speedup:.1f}x faster than the ToMe port "
                                f"(B={BATCH}, N={TOKENS}, D={DIM}, r={R}; target >= 5x)")
    targets.check(memory <= 0.25, f"merge op forward+backward peak extra memory {memory:.2f} of the port's "
                                  f"(target <= 1/4)")
    for tower, name in TOWERS.items():
        for mode in MODES:
            full, merged, port = (bench_cases.find_row(rows, tower, p, mode)
                                  for p in ("all_tokens", "clipfast_tome", "tome_port"))
            label = f"{name} {'forward' if mode == 'fwd' else 'forward+backward'} with r={R}, batch {TOWER_BATCH}"
            if full is None or full.x_value != TOWER_BATCH:  # quick mode: batch 2, forward only, one timed run
                measured = f"measured {full.p50 / merged.p50:.2f}x at batch {full.x_value}" if full else "not measured"
                targets.not_run(f"{label} (target >= 1.7x, not slower than the ToMe port)", f"{measured} in quick mode")
                continue
            targets.check(full.p50 / merged.p50 >= 1.7, f"{label}: {full.p50 / merged.p50:.2f}x faster than every "
                                                        f"token (target >= 1.7x)")
            targets.check(merged.p50 <= port.p50, f"{label}: {merged.p50:.3f} s vs the ToMe port's {port.p50:.3f} s "
                                                  f"(target: not slower)")
    return targets


def run(quick: bool = False, out_dir: str = "bench-results", log=print) -> tuple[str, bool]:
    """Measures :func:`cases`, checks the targets, writes the CSV and plots; returns (report, all met)."""
    rows = bench_cases.measure_cases(cases(quick), log)
    targets = judge(rows)
    notes = [f"{MERGE_KERNEL}: clipfast.token_merge against the plain-PyTorch port of ToMe's bipartite_soft_matching + "
             "merge_wavg (clipfast.testing.tome), metric = a head's width of keys (*: the port timed in alternation "
             "with clipfast).",
             "towers: random-init image towers in eval mode, forward under no_grad or forward + backward of a fixed "
             f"loss: all_tokens (197), clipfast_tome (TokenMerging({R}): SDPA with a log-size key bias, "
             "clipfast.token_merge) and tome_port (the port's explicit-softmax blocks)."]
    title = f"token merging (ToMe), CPU x{torch.get_num_threads()} threads, fp32"
    text = report.publish("token_merge", title, rows, targets, out_dir, report.device_name(),
                          report.op_columns("ms", group_width=18, shape_width=27, provider_width=15), notes,
                          {"x_label": "fp32", "time_label": "time [s]"})
    return text, targets.met
