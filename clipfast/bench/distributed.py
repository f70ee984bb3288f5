"""The distributed contrastive benchmark: W gloo processes on this machine, per-rank batch n, D = 512.

Providers, each in open_clip's production setting (local loss, gather with grad):
``open_clip`` (``ClipLoss(local_loss=True, gather_with_grad=True)``), ``clipfast-gather`` (the same
semantics, fused), ``clipfast-ring`` (``dist_impl="ring"``). Each rank measures the peak resident memory
its loss step (forward + backward) adds above its inputs, and the step time; the table shows the
largest over ranks. Run with ``python -m clipfast.bench --op distributed``: the shared report
(:mod:`clipfast.bench.report`) prints the table (the machine line first) and the targets, and writes
``distributed.csv`` and the plots.

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
import platform
import tempfile
import time

import torch

from clipfast.bench import cases as bench_cases
from clipfast.bench import measure as bench_measure
from clipfast.bench import report

PROVIDERS = ("open_clip", "clipfast-gather", "clipfast-ring")
BASELINE = "open_clip"
GROUP = "clip"  # the report's case group: CLIP's InfoNCE loss
SIZES = (1024, 4096)
QUICK_SIZES = (1024,)
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
            results.append({"provider": provider, "n": n, "p50": timing.p50, "p20": timing.p20, "p80": timing.p80,
                            "peak": timing.peak_extra_bytes})
            torch.distributed.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def worst_rank_rows(per_rank: list[list[dict]], world_size: int) -> list[report.Row]:
    """One report row per (n, provider) from every rank's results: the time of the slowest rank (its median,
    p20 and p80) and the largest peak extra memory of any rank, compared with open_clip at the same n."""
    rows = []
    for n in sorted({r["n"] for results in per_rank for r in results}):
        for provider in PROVIDERS:
            measured = [r for results in per_rank for r in results if (r["provider"], r["n"]) == (provider, n)]
            slowest = max(measured, key=lambda r: r["p50"])
            rows.append(report.Row("distributed", GROUP, provider, "fwd_bwd", "n", n,
                                   {"ranks": world_size, "n": n, "D": DIM}, "float32", slowest["p50"],
                                   slowest["p20"], slowest["p80"], max(r["peak"] for r in measured), BASELINE))
    return rows


def judge(rows: list[report.Row]) -> report.Targets:
    """The targets at this run's largest n per rank; the memory ratio only from :data:`MEMORY_TARGET_MIN_N`
    on (below it the fixed per-process buffers dominate both providers' memory), else "not run"."""
    n = max(r.x_value for r in rows)
    base, gather, ring = (bench_cases.find_row(rows, GROUP, p, x_value=n).peak_extra_bytes for p in PROVIDERS)
    targets = report.Targets()
    if n >= MEMORY_TARGET_MIN_N:
        targets.check(gather <= base / 8, f"clipfast-gather per-rank peak extra memory at n={n}: "
                                          f"{gather / 2**20:.0f} MiB = 1/{base / max(gather, 1):.1f} of open_clip's "
                                          f"{base / 2**20:.0f} MiB (target <= 1/8)")
    else:
        targets.not_run("clipfast-gather per-rank peak extra memory <= 1/8 of open_clip's",
                        f"applies at n/rank >= {MEMORY_TARGET_MIN_N}, this run's largest is {n}")
    targets.check(ring <= gather, f"clipfast-ring {ring / 2**20:.0f} MiB <= clipfast-gather {gather / 2**20:.0f} MiB")
    return targets


def run(sizes=SIZES, out_dir: str = "bench-results", world_size: int = WORLD_SIZE) -> tuple[str, bool]:
    """Runs the benchmark, checks the targets, writes ``<out_dir>/distributed.csv`` and the plots; returns
    (printable report, all targets met)."""
    from clipfast.testing.gloo import run_gloo

    started = time.perf_counter()
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)  # read by glibc when each worker starts
    try:
        with tempfile.TemporaryDirectory() as results_dir:  # each rank's results, as JSON
            run_gloo(_worker, world_size, (tuple(sizes), results_dir), timeout=1800)
            per_rank = [json.load(open(os.path.join(results_dir, f"rank{r}.json"))) for r in range(world_size)]
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    rows = worst_rank_rows(per_rank, world_size)
    targets = judge(rows)
    threads = f"{world_size} processes x 1"  # the gloo launcher pins each worker to one thread
    title = (f"distributed ClipLoss (local loss, gather with grad), {world_size} gloo processes x 1 thread, "
             f"D={DIM}, fp32, fwd+bwd; worst rank ({time.perf_counter() - started:.0f} s)")
    notes = ["open_clip: ClipLoss(local_loss=True, gather_with_grad=True); clipfast-gather: clipfast.nn.ClipLoss with "
             "the same arguments; clipfast-ring: the same with dist_impl='ring'.",
             "time: the slowest rank's median [p20, p80]; peak extra: the largest over ranks, each worker with glibc's "
             "mmap threshold at 1 MiB (see clipfast.bench.distributed)."]
    text = report.publish("distributed", title, rows, targets, out_dir,
                          f"{platform.processor() or platform.machine()} {world_size} gloo processes x 1 thread",
                          report.op_columns("s", group_width=6, shape_width=24, provider_width=17), notes,
                          {"x_label": f"n per rank ({world_size} ranks, D = {DIM})",
                           "title": lambda group: "distributed ClipLoss"}, threads)
    return text, targets.met
