"""The distributed contrastive benchmark: W gloo processes on this machine, per-rank batch n, D = 512.

Providers, each in open_clip's production setting (local loss, gather with grad):
``open_clip`` (``ClipLoss(local_loss=True, gather_with_grad=True)``), ``clipfast-gather`` (the same
semantics, fused), ``clipfast-ring`` (``dist_impl="ring"``). Each rank measures the peak resident memory
its loss step (forward + backward) adds above its inputs, and the step time; the table shows the
largest over ranks. Run with ``python -m clipfast.bench --op distributed``.

The workers run with glibc's mmap threshold pinned at 1 MiB (``MALLOC_MMAP_THRESHOLD_``): every
buffer of 1 MiB or more is then mapped on allocation and unmapped on free, so resident memory follows
the live buffers. With the default, adaptive threshold, the feature-sized blocks (4-16 MiB here) that
a step frees are kept in the heap or not depending on allocation history, which shifts the per-rank
peaks by tens of MiB between providers and runs. Every provider runs under the same setting.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch

from clipfast.bench import measure as bench_measure

PROVIDERS = ("open_clip", "clipfast-gather", "clipfast-ring")
SIZES = (1024, 4096)
# The memory target (1/8 of open_clip's) is judged from this n per rank on (README: met at 4096, not at 1024).
MEMORY_TARGET_MIN_N = 4096
DIM = 512
WORLD_SIZE = 2


def _loss_module(provider: str, rank: int, world_size: int):
    kwargs = dict(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    if provider == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss(**kwargs)
    import clipfast

    return clipfast.nn.ClipLoss(**kwargs, dist_impl="ring" if provider == "clipfast-ring" else None)


def _worker(rank: int, world_size: int, sizes, out_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's deprecated gather API
    results = []
    for n in sizes:
        g = torch.Generator().manual_seed(1000 + rank)
        image = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=-1).requires_grad_()
        text = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=-1).requires_grad_()
        log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        for provider in PROVIDERS:
            module = _loss_module(provider, rank, world_size)

            def step():
                loss = module(image, text, log_scale.exp())
                loss.backward()
                image.grad = text.grad = log_scale.grad = None
                return loss

            timing = bench_measure.measure(step, "cpu", reps=3 if n <= 1024 else 2, warmup=1)
            results.append({"provider": provider, "n": n, "time": timing.p50, "peak": timing.peak_extra_bytes})
            torch.distributed.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def run(sizes=SIZES, world_size: int = WORLD_SIZE) -> tuple[str, bool]:
    """Runs the benchmark; returns (printable report, all targets met)."""
    from clipfast.testing import run_gloo

    started = time.perf_counter()
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)  # read by glibc when each worker starts
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            run_gloo(_worker, world_size, (tuple(sizes), out_dir), timeout=1800)
            per_rank = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world_size)]
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    rows = {}
    for results in per_rank:
        for r in results:
            key = (r["provider"], r["n"])
            best = rows.setdefault(key, {"time": 0.0, "peak": 0.0})
            best["time"], best["peak"] = max(best["time"], r["time"]), max(best["peak"], r["peak"])
    lines = [f"distributed ClipLoss (local loss, gather with grad), {world_size} gloo processes x 1 thread, "
             f"D={DIM}, fp32, fwd+bwd; worst rank ({time.perf_counter() - started:.0f} s)",
             f"{'n/rank':>7}  {'provider':<17}{'time':>10}{'peak extra':>14}{'mem/open_clip':>15}"]
    for n in sizes:
        base = rows[("open_clip", n)]["peak"]
        for provider in PROVIDERS:
            row = rows[(provider, n)]
            lines.append(f"{n:>7}  {provider:<17}{row['time']:>8.3f} s{row['peak'] / 2**20:>10.1f} MiB"
                         f"{row['peak'] / base:>14.3f}x")
    n = max(sizes)
    base, gather, ring = (rows[(p, n)]["peak"] for p in PROVIDERS)
    if n >= MEMORY_TARGET_MIN_N:
        memory = (gather <= base / 8, f"clipfast-gather per-rank peak extra memory at n={n}: "
                                      f"{gather / 2**20:.0f} MiB = 1/{base / max(gather, 1):.1f} of open_clip's "
                                      f"{base / 2**20:.0f} MiB (target <= 1/8)")
    else:  # at small n the fixed per-process buffers dominate both providers' memory
        memory = (None, f"clipfast-gather per-rank peak extra memory <= 1/8 of open_clip's: applies at "
                        f"n/rank >= {MEMORY_TARGET_MIN_N}, this run's largest is {n}")
    checks = [memory,
              (ring <= gather, f"clipfast-ring {ring / 2**20:.0f} MiB <= clipfast-gather {gather / 2**20:.0f} MiB")]
    lines.append("Targets (from this run):")
    lines += [f"  [{'not run' if ok is None else 'PASS' if ok else 'FAIL'}] {text}" for ok, text in checks]
    return "\n".join(lines), all(ok is not False for ok, _ in checks)
