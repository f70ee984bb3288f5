"""The attentive token removal benchmark (CPU, fp32): ``python -m clipfast.bench --op token_keep``.

1. The keep kernel at A-CLIP / EViT's shape (B = 64, L = 196 patches + [CLS], D = 768, keep 98):
   ``clipfast.attentive_token_keep`` against ``torch.topk`` + ``torch.gather`` with autograd (forward +
   backward of the same upstream gradient), and its forward against a plain copy of the kept bytes.
2. A-CLIP's scores for a ViT-B/16 forward (:mod:`clipfast.bench.attention_scores`): one fused forward
   with [CLS]-row hooks against materialising and averaging every layer's attention maps.
3. The open_clip ViT-B-16 image tower, forward + backward, keeping 50% of the patches by given scores
   (A-CLIP's block rule, 100 of 196) against the same tower with every token.
"""

from __future__ import annotations

import torch

from clipfast.bench import measure as bench_measure

BATCH, PATCHES, DIM, KEEP = 64, 196, 768, 98


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


def keep_kernel_rows(quick: bool, device: str = "cpu"):
    """Median timings (``measure.Timing``) of the keep kernel, the topk + gather path and a plain copy."""
    import clipfast

    tokens, scores, grad = keep_inputs(device)
    reps = 5 if quick else 50

    def ours_forward():
        return clipfast.attentive_token_keep(tokens, scores, KEEP)[0]

    def ours_step():
        ours_forward().backward(grad)
        tokens.grad = None

    def base_step():
        topk_gather(tokens, scores, KEEP).backward(grad)
        tokens.grad = None

    plain_copy = bench_measure.measure(lambda: tokens.detach()[:, :1 + KEEP].clone(), device, reps=reps)
    ours_fwd = bench_measure.measure(ours_forward, device, reps=reps)
    base_fwd = bench_measure.measure(lambda: topk_gather(tokens, scores, KEEP), device, reps=reps)
    ours = bench_measure.measure(ours_step, device, reps=reps)
    base = bench_measure.measure(base_step, device, reps=reps)
    return {"copy": plain_copy, "ours_fwd": ours_fwd, "base_fwd": base_fwd, "ours": ours, "base": base}


def tower_rows(quick: bool):
    """open_clip ViT-B-16 image tower (random init, train mode), forward + backward of a fixed loss."""
    import open_clip

    import clipfast

    batch = 2 if quick else 8
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.train()
    images = torch.randn(batch, 3, 224, 224)
    scores = torch.rand(batch, PATCHES)

    def step():
        visual(images).square().mean().backward()
        visual.zero_grad(set_to_none=True)

    reps = 1 if quick else 3
    full = bench_measure.measure(step, reps=reps)
    with clipfast.patch_open_clip(visual, token_removal=clipfast.TokenRemoval.given_scores(0.5, block=2)) as handle:
        with handle.keep_scores(scores):
            kept = bench_measure.measure(step, reps=reps)
    return batch, full, kept


def run(quick: bool = False, log=print) -> tuple[str, bool]:
    from clipfast.bench import attention_scores

    ms = 1e3
    keep = keep_kernel_rows(quick)
    log(f"  keep kernel: {keep['ours'].p50 * ms:.2f} ms fwd+bwd vs {keep['base'].p50 * ms:.2f} ms")
    lines = [f"attentive token removal, CPU x{torch.get_num_threads()} threads, fp32",
             f"keep kernel, B={BATCH}, L={PATCHES} (+[CLS]), D={DIM}, keep {KEEP}:",
             f"{'':4}{'step':<36}{'clipfast':>12}{'topk+gather':>14}{'plain copy':>13}",
             f"{'':4}{'forward':<36}{keep['ours_fwd'].p50 * ms:>9.2f} ms{keep['base_fwd'].p50 * ms:>11.2f} ms"
             f"{keep['copy'].p50 * ms:>10.2f} ms",
             f"{'':4}{'forward + backward':<36}{keep['ours'].p50 * ms:>9.2f} ms{keep['base'].p50 * ms:>11.2f} ms"]
    fwd_bwd_speedup = keep["base"].p50 / keep["ours"].p50
    copy_ratio = keep["ours_fwd"].p50 / keep["copy"].p50
    checks = [(fwd_bwd_speedup >= 5, f"keep kernel forward+backward {fwd_bwd_speedup:.1f}x faster than topk+gather "
                                     f"(target >= 5x)"),
              (copy_ratio <= 2, f"keep kernel forward {copy_ratio:.2f}x the time of a plain copy of the kept bytes "
                                f"(target <= 2x)")]

    score_rows = attention_scores.run(batch=4 if quick else 32, quick=quick)
    by_method = {row["method"]: row for row in score_rows}
    plain, ours, base = (by_method[m] for m in ("plain forward", "clipfast.attention_scores", "materialised maps"))
    lines.append(f"A-CLIP scores, {score_rows[0]['case']}:")
    for row in score_rows:
        added = row["peak_extra_mb"] - plain["peak_extra_mb"]
        lines.append(f"{'':4}{row['method']:<36}{row['ms']:>9.0f} ms{row['peak_extra_mb']:>10.0f} MiB peak"
                     + ("" if row is plain else f", {added:+.0f} MiB over the plain forward"))
    # What scoring adds to the forward it rides on (the forward's own activations are the same for both).
    added_ours = max(ours["peak_extra_mb"] - plain["peak_extra_mb"], 1.0)
    added_base = base["peak_extra_mb"] - plain["peak_extra_mb"]
    time_ratio = base["ms"] / ours["ms"]
    log(f"  scores: {ours['ms']:.0f} ms vs {base['ms']:.0f} ms")
    checks.append((added_base / added_ours >= 10,
                   f"scores: memory added to a plain forward {added_ours:.0f} MiB (at least 1 counted) vs "
                   f"{added_base:.0f} MiB materialising all maps, {added_base / added_ours:.0f}x less (target >= 10x); "
                   f"whole peaks {base['peak_extra_mb'] / ours['peak_extra_mb']:.1f}x"))
    checks.append((time_ratio >= 2, f"scores: {time_ratio:.2f}x less time than materialising all attention maps "
                                    f"(target >= 2x; on a CPU both are a ViT forward, {ours['ms'] / plain['ms']:.2f}x "
                                    f"and {base['ms'] / plain['ms']:.2f}x the plain forward's time)"))

    batch, full, kept = tower_rows(quick)
    tower_speedup = full.p50 / kept.p50
    log(f"  tower: {full.p50:.2f} s vs {kept.p50:.2f} s")
    lines.append(f"open_clip ViT-B-16 image tower, batch {batch}, forward + backward:")
    lines.append(f"{'':4}{'all 197 tokens':<36}{full.p50:>10.2f} s")
    lines.append(f"{'':4}{'given scores, keep 100 of 196 (+[CLS])':<36}{kept.p50:>10.2f} s")
    checks.append((tower_speedup >= 1.8, f"ViT-B-16 tower forward+backward at keep 50%: {tower_speedup:.2f}x faster "
                                         f"than with all tokens (target >= 1.8x)"))
    lines.append("Targets (from this run):")
    lines += [f"  [{'PASS' if ok else 'FAIL'}] {text}" for ok, text in checks]
    return "\n".join(lines), all(ok for ok, _ in checks)
