"""`python -m clipfast.bench [--op OP] [--quick] [--device DEVICE] [--losses LOSS ...] [--sizes N ...] [--out DIR] [--fail-on-miss]`

contrastive: every case of the op (losses x providers x N, fp32, D = 512, forward + backward: CLIP and
SigLIP up to N = 65536, distillation and multi-positive InfoNCE up to 16384), the table and the targets,
bench-results/contrastive.csv and PNG plots; about 12 minutes on 2 cores (open_clip at N = 16384 and
clipfast at N = 65536 dominate); --quick stops at N = 4096 (about a minute).
distributed: open_clip's production distributed ClipLoss against clipfast's gather and ring variants
on 2 gloo processes (see clipfast.bench.distributed), with its table, targets, distributed.csv and PNG
plots; about a minute.
schur_covariance, token_medoids, token_keep: the cases of clipfast.bench.<op> (the same lists as
benchmarks/bench_<op>.py), each with its table, targets, <op>.csv and PNG plots.
Every time is a median of repetitions after a warm-up run; targets that apply only at sizes a run does
not reach are printed as "not run".
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from clipfast.bench import cases as bench_cases
from clipfast.bench import measure as bench_measure
from clipfast.bench import report

# The ceiling matmul at N = 65536 would need a 16 GiB output; larger N reuse the largest measured one.
CEILING_MAX_N = 16384
# The ops whose benchmark is the module clipfast.bench.<op stem> with cases(quick) and run(quick, out_dir, log).
OPS = ("schur_covariance", "token_medoids", "token_keep", "token_merge")


def run(device: str, sizes, losses, out_dir: str, log=print, exclude=()) -> tuple[list[report.Row], bool]:
    # Every case's ceiling, torch.mm of the same shape, is timed in alternation with the case itself
    # (measure.measure_alongside), so the "of mm" shares compare the two under the same conditions.
    ceiling_sizes = [n for n in sizes if n <= CEILING_MAX_N]
    rows = []
    for case in bench_cases.contrastive_cases(device, sizes, losses):
        if case.provider in exclude:
            continue
        warmup = 0 if case.n >= 16384 and case.provider != "reference_compiled" else 1
        ceiling_n = max((n for n in ceiling_sizes if n <= case.n), default=None)
        matmul = bench_cases.matmul_step(ceiling_n, device=device) if ceiling_n else None
        timing, mm = bench_measure.measure_alongside(bench_cases.make_step(case), matmul, device,
                                                     bench_measure.reps_for(case.n), warmup)
        del matmul
        ceiling = 2.0 * ceiling_n * ceiling_n * bench_cases.DIM / mm.p50 / 1e9 if mm else None
        throughputs = {"throughput": ("GFLOP/s", case.flops / timing.p50 / 1e9),
                       "useful_throughput": ("GFLOP/s", case.useful_flops / timing.p50 / 1e9)}
        rows.append(report.Row("contrastive", case.loss, case.provider, case.mode, "N", case.n,
                               {"loss": case.loss, "N": case.n, "D": case.d}, str(case.dtype)[6:],
                               timing.p50, timing.p20, timing.p80, timing.peak_extra_bytes,
                               bench_cases.baseline(case.loss), throughputs, ceiling, ceiling_n))
        ceiling_text = f", torch.mm at N={ceiling_n} alongside: {ceiling:.0f} GFLOP/s" if mm else ""
        log(f"  {case.id}: {timing.p50:.3f} s, {timing.peak_extra_bytes / report.MIB:.0f} MiB extra{ceiling_text}")
    rows.sort(key=lambda r: (r.group, r.x_value))
    clipfast_provider = next((p for p in bench_cases.providers(device) if p.startswith("clipfast-")), None)
    targets = report.contrastive_targets(rows, clipfast_provider) if clipfast_provider else report.Targets()
    targets.met &= clipfast_provider is not None
    print()
    title = f"clipfast contrastive benchmark, {report.device_name(device)}, torch {torch.__version__}"
    plot_options = {"x_label": f"N (batch), D = {bench_cases.DIM}, fp32", "title": lambda loss: f"{loss} loss"}
    print(report.publish("contrastive", title, rows, targets, out_dir, report.device_name(device),
                         plot_options=plot_options))
    return rows, targets.met


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipfast.bench",
        description="clipfast benchmarks: tables, targets (PASS / FAIL / not run), CSV and plots. Every time is "
                    "the median of repetitions after a warm-up run.")
    parser.add_argument("--op", default="contrastive",
                        choices=["contrastive", "distributed", *OPS, "all"],
                        help="contrastive (single process), distributed (2 gloo processes), "
                             f"{', '.join(OPS)}, or all (default: contrastive)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes only (contrastive N in {list(bench_cases.QUICK_SIZES)}, distributed n = "
                             "1024, no published-procedure ports); targets needing larger sizes show 'not run'")
    parser.add_argument("--device", default="cpu", help="device of the contrastive benchmark, e.g. cuda "
                                                        "(default: cpu; the other ops run on the CPU)")
    parser.add_argument("--losses", nargs="+", default=list(bench_cases.LOSSES), choices=bench_cases.LOSSES,
                        help=f"contrastive losses to run (default: {' '.join(bench_cases.LOSSES)})")
    parser.add_argument("--sizes", nargs="+", type=int, metavar="N",
                        help="override the N values of the contrastive benchmark (n per rank for distributed)")
    parser.add_argument("--out", default="bench-results", metavar="DIR",
                        help="directory of each op's CSV (<op>.csv) and PNG plots (default: bench-results)")
    parser.add_argument("--fail-on-miss", action="store_true",
                        help="exit with status 1 when a target is missed (default: always exit 0)")
    args = parser.parse_args(argv)
    met = True
    if args.op in ("contrastive", "all"):
        sizes = args.sizes or (bench_cases.QUICK_SIZES if args.quick else bench_cases.SIZES)
        print(f"clipfast.bench: op=contrastive device={args.device} N={list(sizes)} losses={args.losses}", flush=True)
        _, met = run(args.device, sizes, args.losses, args.out, log=lambda m: print(m, flush=True))
    if args.op in ("distributed", "all"):
        from clipfast.bench import distributed

        sizes = args.sizes or (distributed.QUICK_SIZES if args.quick else distributed.SIZES)
        print(f"\nclipfast.bench: op=distributed n/rank={list(sizes)}", flush=True)
        text, distributed_met = distributed.run(sizes, args.out)
        print()
        print(text)
        met &= distributed_met
    for op in OPS:  # each module's run(quick, out_dir, log) -> (text, met)
        if args.op in (op, "all"):
            module = importlib.import_module(f"clipfast.bench.{op}")
            print(f"\nclipfast.bench: op={op} quick={args.quick}", flush=True)
            text, op_met = module.run(args.quick, args.out, log=lambda m: print(m, flush=True))
            print()
            print(text)
            met &= op_met
    return 1 if args.fail_on_miss and not met else 0


if __name__ == "__main__":
    sys.exit(main())
