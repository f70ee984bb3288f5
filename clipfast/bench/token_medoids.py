"""The token-medoids benchmark (CPU, fp32): ``python -m clipfast.bench --op token_medoids``.

Baseline ``centerclip_style``: a faithful plain-PyTorch port of CenterCLIP's procedure
(``batch_fast_kmedoids_with_split``): a Python loop over chunks of 16 rows, ``torch.cdist`` distances,
a K-step KKZ initialisation loop gathering ``[chunk, i, N]``, then iterations that build
``[chunk, K, N, N]`` temporaries for the in-cluster sums and stop on a chunk-mean medoid shift read
on the host (one sync per iteration). clipfast's ``token_medoids(split_size=16)`` is compared with
it on CenterCLIP's shapes: 16 videos x 12 frames x 49 patch tokens x 768, segments of 2, 3 and 4
frames, K = 49; and ViT-B/16 shapes (196 patches per frame, 3-frame segments, K = 160; 4 videos to
keep the baseline's 3.5 GB temporaries tolerable). Medoids must be identical on margin inputs.
Last, the end-to-end forward time of an open_clip ViT-B-32 video tower (12 frames) with and without
the medoid step (``clipfast.patch_open_clip(visual, token_medoids=...)``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from clipfast.bench import measure as bench_measure

SPLIT = 16
DIM = 768


def centerclip_style(x: torch.Tensor, k: int, split_size: int = SPLIT, max_iters: int = 100,
                     threshold: float = 1e-6) -> torch.Tensor:
    """Sorted medoid indices (R, K), computed the way CenterCLIP does (see the module docstring)."""
    results = []
    for chunk in x.split(split_size):
        rows, n, _ = chunk.shape
        dist = torch.cdist(chunk, chunk)
        chosen = [chunk.norm(dim=-1).argmax(-1)]
        for i in range(1, k):  # KKZ: farthest from the chosen set, re-gathered at every step
            picked = torch.stack(chosen, 1)
            gathered = dist.gather(1, picked[..., None].expand(rows, i, n))
            chosen.append(gathered.min(1).values.argmax(-1))
        medoids = torch.stack(chosen, 1)
        for _ in range(max_iters):
            to_medoids = dist.gather(1, medoids[..., None].expand(rows, k, n))
            members = F.one_hot(to_medoids.argmin(1), k).permute(0, 2, 1).to(chunk.dtype)  # (rows, K, N)
            in_cluster = dist[:, None] * members[:, :, None, :] * members[:, :, :, None]  # (rows, K, N, N)
            cost = in_cluster.sum(-1).masked_fill(members == 0, float("inf"))
            updated = cost.argmin(-1)
            old = chunk.gather(1, medoids[..., None].expand(-1, -1, chunk.shape[-1]))
            new = chunk.gather(1, updated[..., None].expand(-1, -1, chunk.shape[-1]))
            shift = (new - old).norm(dim=-1).sum(-1).mean().item()  # the host sync per iteration
            medoids = updated
            if shift < threshold:
                break
        results.append(medoids.sort(-1).values)
    return torch.cat(results)


def video_like(videos: int, frames: int, patches: int, frames_per_segment: int, seed: int = 0) -> torch.Tensor:
    """Per-video base tokens plus per-frame noise, regrouped into segment rows (R, fd * patches, D)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(videos, 1, patches, DIM, generator=g)
    tokens = base + 0.3 * torch.randn(videos, frames, patches, DIM, generator=g)
    return tokens.reshape(videos * frames // frames_per_segment, frames_per_segment * patches, DIM)


def margin_rows(rows: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k well-separated centres with 2 members each per row, permuted: (x (rows, 3k, D), truth (rows, k))."""
    g = torch.Generator().manual_seed(seed)
    xs, truths = [], []
    for _ in range(rows):
        centres = 5.0 * torch.randn(k, DIM, generator=g)
        parts = [centres] + [centres + F.normalize(torch.randn(k, DIM, generator=g), dim=-1)
                             * (1 + torch.rand(k, 1, generator=g)) for _ in range(2)]
        perm = torch.randperm(3 * k, generator=g)
        xs.append(torch.cat(parts)[perm])
        truths.append(torch.argsort(perm)[:k].sort().values)
    return torch.stack(xs), torch.stack(truths)


def video_tower(quick: bool):
    """open_clip ViT-B-32 on 12-frame videos with and without CenterCLIP's medoid step (MSR-VTT setting:
    before block 7 of 12, 4 segments of 3 frames, 49 medoids per segment)."""
    import open_clip

    import clipfast

    videos = 1 if quick else 4
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    frames = torch.randn(videos * 12, 3, 224, 224)
    reps = 1 if quick else 3
    with torch.no_grad():
        full = bench_measure.measure(lambda: visual(frames), reps=reps)
        config = clipfast.TokenMedoids(block=6, num_frames=12, num_segments=4, num_medoids=49)
        with clipfast.patch_open_clip(visual, token_medoids=config):
            reduced = bench_measure.measure(lambda: visual(frames), reps=reps)
    return videos, full, reduced


def run(quick: bool = False, log=print) -> tuple[str, bool]:
    import clipfast

    cases = [("CenterCLIP ViT-B/32, 2-frame segments", 16, 12, 49, 2, 49),
             ("CenterCLIP ViT-B/32, 3-frame segments", 16, 12, 49, 3, 49),
             ("CenterCLIP ViT-B/32, 4-frame segments", 16, 12, 49, 4, 49)]
    if not quick:
        cases.append(("ViT-B/16, 3-frame segments, 4 videos", 4, 12, 196, 3, 160))
    lines = [f"token medoids, CPU x{torch.get_num_threads()} threads, fp32, D={DIM}, split_size={SPLIT}",
             f"{'case':<40}{'rows x N':>11}{'K':>5}  {'centerclip_style':>18}{'clipfast':>12}{'speed-up':>10}"
             f"{'peak mem (base / ours)':>26}"]
    checks = []
    for name, videos, frames, patches, fd, k in cases:
        x = video_like(videos, frames, patches, fd)
        base = bench_measure.measure(lambda: centerclip_style(x, k), "cpu", reps=1, warmup=1)
        ours = bench_measure.measure(lambda: clipfast.token_medoids(x, k, split_size=SPLIT), "cpu", reps=3, warmup=1)
        speedup, memory = base.p50 / ours.p50, ours.peak_extra_bytes / max(base.peak_extra_bytes, 1)
        lines.append(f"{name:<40}{f'{x.shape[0]} x {x.shape[1]}':>11}{k:>5}  {base.p50:>16.3f} s{ours.p50:>10.3f} s"
                     f"{speedup:>9.0f}x{base.peak_extra_bytes / 2**20:>14.0f} / {ours.peak_extra_bytes / 2**20:.0f} MiB")
        log(f"  {name}: {base.p50:.3f} s vs {ours.p50:.3f} s")
        checks.append((speedup >= 20, f"{name}: {speedup:.0f}x faster (target >= 20x)"))
        checks.append((memory <= 0.1, f"{name}: peak extra memory {memory:.3f} of the baseline's (target <= 1/10)"))
    x, truth = margin_rows(32, 49)
    start = time.perf_counter()
    base_index = centerclip_style(x, 49)
    _, ours_index, _ = clipfast.token_medoids(x, 49, split_size=SPLIT)
    same = torch.equal(base_index, ours_index) and torch.equal(ours_index, truth)
    checks.append((same, f"identical medoids on margin inputs (32 rows x 147 tokens, K=49), and equal to the "
                         f"true centres ({time.perf_counter() - start:.1f} s)"))
    videos, full, reduced = video_tower(quick)
    lines.append(f"open_clip ViT-B-32 video tower forward, {videos} videos x 12 frames (random init, eval, no_grad):")
    lines.append(f"{'':4}{'all 50 tokens per frame':<44}{full.p50:>8.2f} s")
    lines.append(f"{'':4}{'medoids before block 7 (4 segments, K=49)':<44}{reduced.p50:>8.2f} s"
                 f"   ({full.p50 / reduced.p50:.2f}x)")
    lines.append("Targets (from this run):")
    lines += [f"  [{'PASS' if ok else 'FAIL'}] {text}" for ok, text in checks]
    return "\n".join(lines), all(ok for ok, _ in checks)
