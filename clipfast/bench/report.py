"""Benchmark output: the aligned terminal table, the target checks, the long CSV and the PNG plots."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import ctypes
import functools
import json
import os
import platform
import re
import subprocess
from typing import Optional

import torch

import clipfast

MIB = 2.0 ** 20
BASELINE = "open_clip"


@dataclasses.dataclass
class Row:
    loss: str
    provider: str
    n: int
    d: int
    dtype: str
    mode: str
    p50: float
    p20: float
    p80: float
    peak_extra_bytes: float
    gflops: float  # achieved on the provider's real work (its GEMM-equivalents)
    useful_gflops: float  # achieved under the fused cost model (4 GEMMs fwd+bwd for every provider)
    ceiling_gflops: Optional[float]  # torch.mm on N x D @ D x N in the same run (None: not measured)
    ceiling_n: Optional[int]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _clipfast_cpu_level() -> str:
    """The instruction-set level of the CPU kernels clipfast chose in this process (csrc/cpu/dispatch.cpp),
    read from the native library's C symbol; ATen's own capability when the library did not load."""
    try:
        from clipfast import _C  # noqa: PLC0415 (the native library, when it was built)

        lib = ctypes.CDLL(_C.__file__)
        lib.clipfast_cpu_level.restype = ctypes.c_char_p
        return lib.clipfast_cpu_level().decode()
    except (ImportError, OSError, AttributeError):
        return f"no native kernels; ATen {torch.backends.cpu.get_cpu_capability()}"


def _blas() -> str:
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    name = blas.group(1) if blas else "unknown"
    return f"{name} {mkl.group(1)}" if name == "mkl" and mkl else name


@functools.lru_cache(maxsize=None)
def machine() -> dict:
    """What a CPU number depends on besides the thread count: CPU model, the kernels' ISA level, BLAS."""
    return {"cpu": _cpu_model(), "arch": platform.machine(), "cpus": os.cpu_count(), "isa": _clipfast_cpu_level(),
            "aten_isa": torch.backends.cpu.get_cpu_capability(), "blas": _blas(), "torch": torch.__version__}


def machine_line() -> str:
    """One line for the top of every table; the load average is read now (CPU timings on a shared machine
    are only comparable within one run)."""
    m = machine()
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"machine: {m['cpu']} ({m['arch']}, {m['cpus']} CPUs) | ISA: {m['isa']} (ATen: {m['aten_isa']}) | "
            f"threads: {torch.get_num_threads()} | BLAS: {m['blas']} | torch {m['torch']} | load avg {load}")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _baseline(rows: list[Row], row: Row) -> Optional[Row]:
    for other in rows:
        if (other.provider == BASELINE and other.loss == row.loss and other.n == row.n
                and other.mode == row.mode and other.dtype == row.dtype):
            return other
    return None


def table(rows: list[Row]) -> str:
    header = (f"{'loss':<7}{'N':>7}  {'provider':<19}{'time p50 [p20, p80]':>28}{'peak extra':>13}"
              f"{'time/oc':>9}{'mem/oc':>9}{'GFLOP/s':>9}{'of mm':>7}{'useful':>9}")
    lines = [machine_line(), header, "-" * len(header)]
    previous = None
    for row in rows:
        if previous is not None and (row.loss, row.n) != previous:
            lines.append("")
        previous = (row.loss, row.n)
        base = _baseline(rows, row)
        time_ratio = f"{row.p50 / base.p50:.2f}x" if base else "-"
        mem_ratio = (f"{row.peak_extra_bytes / base.peak_extra_bytes:.3f}x"
                     if base and base.peak_extra_bytes > 0 else "-")
        of_mm = f"{100 * row.gflops / row.ceiling_gflops:.0f}%" if row.ceiling_gflops else "-"
        timing = f"{row.p50:.3f} s [{row.p20:.3f}, {row.p80:.3f}]"
        lines.append(f"{row.loss:<7}{row.n:>7}  {row.provider:<19}{timing:>28}"
                     f"{row.peak_extra_bytes / MIB:>9.1f} MiB{time_ratio:>9}{mem_ratio:>9}{row.gflops:>9.1f}{of_mm:>7}"
                     f"{row.useful_gflops:>9.1f}")
    return "\n".join(lines)


def targets(rows: list[Row], provider: str) -> tuple[str, bool]:
    """The contrastive-loss targets, each evaluated from this run's rows; returns (text, all_met)."""
    lines, all_met = [], True

    def check(ok: bool, text: str):
        nonlocal all_met
        all_met &= ok
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {text}")

    for loss in sorted({r.loss for r in rows}):
        ours = {r.n: r for r in rows if r.loss == loss and r.provider == provider}
        base = {r.n: r for r in rows if r.loss == loss and r.provider == BASELINE}
        lines.append(f"{loss} ({provider} vs {BASELINE}, fp32, D={next(iter(ours.values())).d if ours else '-'}):")
        if 16384 in ours and 16384 in base:
            ratio = ours[16384].peak_extra_bytes / base[16384].peak_extra_bytes
            check(ratio <= 1 / 20, f"peak extra memory at N=16384: {ours[16384].peak_extra_bytes / MIB:.0f} MiB vs "
                                   f"{base[16384].peak_extra_bytes / MIB:.0f} MiB = 1/{1 / ratio:.0f} (target <= 1/20)")
        else:
            lines.append("  [ -- ] peak extra memory at N=16384: not run (use the full benchmark)")
        for n in sorted(ours):
            if n >= 4096 and n in base:
                ratio = ours[n].p50 / base[n].p50
                check(ratio <= 0.8, f"fwd+bwd time at N={n}: {ours[n].p50:.3f} s vs {base[n].p50:.3f} s = "
                                    f"{ratio:.2f}x (target <= 0.8x)")
        for n, row in sorted(ours.items()):
            if row.ceiling_gflops:  # on the fused cost model: credit for the result, not for extra work
                share = row.useful_gflops / row.ceiling_gflops
                ceiling_note = "" if row.ceiling_n == n else f" (mm measured at N={row.ceiling_n})"
                check(share >= 0.7, f"throughput at N={n}: {row.useful_gflops:.0f} useful GFLOP/s = {100 * share:.0f}% "
                                    f"of torch.mm's {row.ceiling_gflops:.0f}{ceiling_note} (target >= 70%)")
        if 65536 in ours:
            extra = ours[65536].peak_extra_bytes
            check(extra < 2 ** 30, f"N=65536 fwd+bwd completes with {extra / MIB:.0f} MiB extra (target < 1024 MiB; "
                                   f"open_clip would need ~64 GiB)")
        else:
            lines.append("  [ -- ] N=65536: not run (use the full benchmark)")
    return "\n".join(lines), all_met


def write_csv(rows: list[Row], path: str, device_name: str) -> None:
    fields = ["op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
              "baseline_provider", "ratio_vs_baseline", "dtype", "shape_json", "device_name",
              "machine", "clipfast_version", "git_sha", "torch_version", "timestamp"]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {"op": "contrastive", "x_name": "N", "device_name": device_name, "machine": machine_line().removeprefix("machine: "),
              "clipfast_version": clipfast.__version__,
              "git_sha": _git_sha(), "torch_version": torch.__version__, "timestamp": stamp,
              "baseline_provider": BASELINE}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            base = _baseline(rows, row)
            shape = json.dumps({"loss": row.loss, "N": row.n, "D": row.d})
            values = {
                "time": ("s", row.p50, row.p20, row.p80, base.p50 if base else None),
                "peak_memory": ("MiB", row.peak_extra_bytes / MIB, None, None,
                                base.peak_extra_bytes / MIB if base else None),
                "throughput": ("GFLOP/s", row.gflops, None, None, base.gflops if base else None),
                "useful_throughput": ("GFLOP/s", row.useful_gflops, None, None, base.useful_gflops if base else None),
            }
            for metric, (unit, p50, p20, p80, base_value) in values.items():
                writer.writerow({**common, "provider": f"{row.loss}:{row.provider}", "mode": row.mode,
                                 "metric": metric, "unit": unit, "x_value": row.n, "p50": p50, "p20": p20,
                                 "p80": p80, "ratio_vs_baseline": p50 / base_value if base_value else "",
                                 "dtype": row.dtype, "shape_json": shape})


def plot(rows: list[Row], directory: str) -> list[str]:
    """time and peak memory vs N per provider, one PNG per loss and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for loss in sorted({r.loss for r in rows}):
        for metric, label, value in (("time", "fwd+bwd time [s]", lambda r: r.p50),
                                     ("memory", "peak extra memory [MiB]", lambda r: r.peak_extra_bytes / MIB)):
            fig, ax = plt.subplots(figsize=(6, 4))
            for provider in dict.fromkeys(r.provider for r in rows if r.loss == loss):
                points = sorted((r.n, value(r)) for r in rows if r.loss == loss and r.provider == provider)
                ax.plot([p[0] for p in points], [max(p[1], 1e-3) for p in points], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (batch), D = 512, fp32")
            ax.set_ylabel(label)
            ax.set_title(f"{loss} loss: {metric} vs N")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            path = os.path.join(directory, f"contrastive_{loss}_{metric}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths
