"""Benchmark output of every op: the aligned terminal table (the machine line first), the target checks,
the long-format CSV and the PNG plots."""

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
from typing import Callable, Optional

import torch

import clipfast

MIB = 2.0 ** 20
CONTRASTIVE_BASELINE = "open_clip"  # of the losses open_clip has (clipfast.bench.cases.baseline)


@dataclasses.dataclass
class Row:
    """One measured case of any op: its median time with p20/p80 and the peak memory it added.

    ``group`` holds the rows that are compared and plotted together (the contrastive loss, the Schur
    kernel, ...); ``x_name``/``x_value`` is the size they vary along; ``baseline`` the provider of the same
    group, size, mode and dtype that this row's ratios are taken against (measured in the same run).
    """
    op: str
    group: str
    provider: str
    mode: str  # "fwd" | "fwd_bwd"
    x_name: str
    x_value: int
    shape: dict  # every size of the case, written to the CSV as shape_json
    dtype: str
    p50: float
    p20: float
    p80: float
    peak_extra_bytes: Optional[float]  # None: not measured for this row (e.g. a time extrapolated in n)
    baseline: Optional[str] = None
    throughputs: dict = dataclasses.field(default_factory=dict)  # CSV metric -> (unit, value); the first is the real work
    ceiling: Optional[float] = None  # the machine's own throughput on the same problem (a plain GEMM), same unit
    ceiling_x: Optional[int] = None  # the size the ceiling was measured at
    # The baseline's median time when it was timed in alternation with this row's step (OpCase.paired): the
    # time ratio is then taken against it, under the same machine conditions, rather than the baseline row.
    paired_baseline_p50: Optional[float] = None


def time_ratio(row: Row, base: Optional[Row]) -> Optional[float]:
    """``row``'s time over its baseline's: against the paired timing when there is one, else the baseline row."""
    if row.paired_baseline_p50:
        return row.p50 / row.paired_baseline_p50
    return row.p50 / base.p50 if base else None


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


def device_name(device: str = "cpu") -> str:
    """The CSV's device_name: the GPU's name, or the CPU and the threads this process uses."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def machine_line(threads: Optional[str] = None) -> str:
    """One line for the top of every table; the load average is read now (CPU timings on a shared machine
    are only comparable within one run). ``threads`` says how the measured steps ran when not on this
    process's torch threads (the distributed benchmark's worker processes)."""
    m = machine()
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"machine: {m['cpu']} ({m['arch']}, {m['cpus']} CPUs) | ISA: {m['isa']} (ATen: {m['aten_isa']}) | "
            f"threads: {threads or torch.get_num_threads()} | BLAS: {m['blas']} | torch {m['torch']} | "
            f"load avg {load}")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def baseline_of(rows: list[Row], row: Row) -> Optional[Row]:
    """The row ``row`` is compared with: its ``baseline`` provider at the same op, group, size, mode and dtype."""
    if row.baseline is None:
        return None
    for other in rows:
        if (other.provider == row.baseline and other.op == row.op and other.group == row.group
                and other.x_value == row.x_value and other.mode == row.mode and other.dtype == row.dtype):
            return other
    return None


# ------------------------------------------------------------------------------------------------ table
@dataclasses.dataclass(frozen=True)
class Column:
    """One table column: ``cell(row, baseline_row)`` gives the text, aligned in ``width`` characters after
    ``gap`` spaces."""
    title: str
    width: int
    cell: Callable[[Row, Optional[Row]], str]
    left: bool = False
    gap: int = 0

    def render(self, text: str) -> str:
        return " " * self.gap + (f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}")


def format_time(row: Row, unit: str = "s") -> str:
    """``p50 [p20, p80]`` in seconds (3 decimals) or milliseconds (2 decimals)."""
    scale, digits = (1e3, 2) if unit == "ms" else (1.0, 3)
    return (f"{row.p50 * scale:.{digits}f} {unit} "
            f"[{row.p20 * scale:.{digits}f}, {row.p80 * scale:.{digits}f}]")


def _peak_cell(row: Row, base: Optional[Row]) -> str:
    return "-" if row.peak_extra_bytes is None else f"{row.peak_extra_bytes / MIB:.1f} MiB"


def _time_ratio_cell(row: Row, base: Optional[Row]) -> str:
    return f"{row.p50 / base.p50:.2f}x" if base else "-"


def _memory_ratio_cell(row: Row, base: Optional[Row]) -> str:
    if base is None or row.peak_extra_bytes is None or not base.peak_extra_bytes:
        return "-"
    return f"{row.peak_extra_bytes / base.peak_extra_bytes:.3f}x"


def _fraction(ratio: float) -> str:
    """A ratio as ``0.53x``, or ``1/34`` below 0.1 (where two decimals would hide it)."""
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"1/{1 / ratio:.0f}"


def _op_time_ratio_cell(row: Row, base: Optional[Row]) -> str:
    ratio = time_ratio(row, base)
    if ratio is None:
        return "-"
    return _fraction(ratio) + ("*" if row.paired_baseline_p50 else "")


def _op_memory_ratio_cell(row: Row, base: Optional[Row]) -> str:
    # A baseline that allocates nothing (a GEMM into preallocated outputs) gives no meaningful ratio.
    if base is None or row.peak_extra_bytes is None or base.peak_extra_bytes is None or base.peak_extra_bytes < MIB:
        return "-"
    if row.peak_extra_bytes <= 0:
        return "-"
    return _fraction(row.peak_extra_bytes / base.peak_extra_bytes)


def _of_ceiling_cell(row: Row, base: Optional[Row]) -> str:
    return f"{100 * row.throughputs['throughput'][1] / row.ceiling:.0f}%" if row.ceiling else "-"


# Contrastive: ratios against the loss's baseline (open_clip's module; the materialised reference for
# multi-positive), throughput on the provider's own work and its share of torch.mm's, and throughput on
# the fused cost model ("useful").
CONTRASTIVE_COLUMNS = (
    Column("loss", 7, lambda r, b: r.group, left=True),
    Column("N", 7, lambda r, b: str(r.x_value)),
    Column("provider", 19, lambda r, b: r.provider, left=True, gap=2),
    Column("time p50 [p20, p80]", 28, lambda r, b: format_time(r)),
    Column("peak extra", 13, _peak_cell),
    Column("time/base", 10, _time_ratio_cell),
    Column("mem/base", 10, _memory_ratio_cell),
    Column("GFLOP/s", 9, lambda r, b: f"{r.throughputs['throughput'][1]:.1f}"),
    Column("of mm", 7, _of_ceiling_cell),
    Column("useful", 9, lambda r, b: f"{r.throughputs['useful_throughput'][1]:.1f}"),
)


def op_columns(time_unit: str = "s", group_width: int = 14, shape_width: int = 24,
               provider_width: int = 20) -> tuple[Column, ...]:
    """The columns of every other op: the case (group and every size), the provider and mode, time and
    peak memory, and both as a ratio to the row's baseline (named in the ``baseline`` column)."""
    return (
        Column("case", group_width, lambda r, b: r.group, left=True),
        Column("shape", shape_width, lambda r, b: " ".join(f"{k}={v}" for k, v in r.shape.items()), left=True),
        Column("provider", provider_width, lambda r, b: r.provider, left=True),
        Column("mode", 8, lambda r, b: r.mode, left=True),
        Column("time p50 [p20, p80]", 33, lambda r, b: format_time(r, time_unit)),
        Column("peak extra", 13, _peak_cell),
        Column("baseline", provider_width, lambda r, b: r.baseline if b else "-", left=True, gap=2),
        Column("time/base", 10, _op_time_ratio_cell),
        Column("mem/base", 10, _op_memory_ratio_cell),
    )


def table(rows: list[Row], columns=CONTRASTIVE_COLUMNS, threads: Optional[str] = None) -> str:
    """The machine line (``threads``: see :func:`machine_line`), a header and one aligned line per row; a
    blank line between (group, size) blocks."""
    header = "".join(column.render(column.title) for column in columns)
    lines = [machine_line(threads), header, "-" * len(header)]
    previous = None
    for row in rows:
        if previous is not None and (row.group, row.x_value) != previous:
            lines.append("")
        previous = (row.group, row.x_value)
        base = baseline_of(rows, row)
        lines.append("".join(column.render(column.cell(row, base)) for column in columns))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- targets
class Targets:
    """Target lines judged from one run's rows: ``[PASS]``, ``[FAIL]``, ``[ -- ] ...: not run (why)``, and
    headings; ``met`` is False as soon as one check fails (a target not run does not fail)."""

    def __init__(self):
        self.lines: list[str] = []
        self.met = True

    def heading(self, text: str) -> None:
        self.lines.append(text)

    def check(self, ok: bool, text: str) -> None:
        self.met &= bool(ok)
        self.lines.append(f"  [{'PASS' if ok else 'FAIL'}] {text}")

    def not_run(self, text: str, why: str) -> None:
        self.lines.append(f"  [ -- ] {text}: not run ({why})")

    def text(self) -> str:
        return "\n".join(self.lines)


def contrastive_targets(rows: list[Row], provider: str) -> Targets:
    """The contrastive-loss targets, each evaluated from this run's rows (against each row's baseline)."""
    targets = Targets()
    for loss in sorted({r.group for r in rows}):
        ours = {r.x_value: r for r in rows if r.group == loss and r.provider == provider}
        baseline = next((r.baseline for r in ours.values()), CONTRASTIVE_BASELINE)
        base = {r.x_value: r for r in rows if r.group == loss and r.provider == baseline}
        dim = next(iter(ours.values())).shape["D"] if ours else "-"
        targets.heading(f"{loss} ({provider} vs {baseline}, fp32, D={dim}):")
        if 16384 in ours and 16384 in base:
            ratio = ours[16384].peak_extra_bytes / base[16384].peak_extra_bytes
            targets.check(ratio <= 1 / 20, f"peak extra memory at N=16384: {ours[16384].peak_extra_bytes / MIB:.0f} MiB "
                                           f"vs {base[16384].peak_extra_bytes / MIB:.0f} MiB = 1/{1 / ratio:.0f} "
                                           f"(target <= 1/20)")
        else:
            targets.not_run("peak extra memory at N=16384", "use the full benchmark")
        for n in sorted(ours):
            if n >= 4096 and n in base:
                ratio = ours[n].p50 / base[n].p50
                targets.check(ratio <= 0.8, f"fwd+bwd time at N={n}: {ours[n].p50:.3f} s vs {base[n].p50:.3f} s = "
                                            f"{ratio:.2f}x (target <= 0.8x)")
        for n, row in sorted(ours.items()):
            if row.ceiling:  # on the fused cost model: credit for the result, not for extra work
                useful = row.throughputs["useful_throughput"][1]
                share = useful / row.ceiling
                ceiling_note = "" if row.ceiling_x == n else f" (mm measured at N={row.ceiling_x})"
                measured = f"{useful:.0f} useful GFLOP/s = {100 * share:.0f}% of torch.mm's {row.ceiling:.0f}{ceiling_note}"
                targets.check(share >= 0.7, f"throughput at N={n}: {measured} (target >= 70%)")
                # Large tiles leave no excuse: close to the GEMM the loss is built on. For CLIP and SigLIP,
                # whose kernels every other loss reuses; distillation's and multi-positive's targets are
                # their memory and time against the baseline (their throughput is in the table).
                if n >= 4096 and loss in ("clip", "siglip"):
                    targets.check(share >= 0.85, f"throughput at N={n}: {measured} (target >= 85% at N >= 4096)")
        if 65536 in ours:
            extra = ours[65536].peak_extra_bytes
            targets.check(extra < 2 ** 30, f"N=65536 fwd+bwd completes with {extra / MIB:.0f} MiB extra (target < "
                                           f"1024 MiB; open_clip would need ~64 GiB)")
        elif loss in ("clip", "siglip"):  # the other losses stop at N = 16384 (clipfast.bench.cases.LOSS_MAX_N)
            targets.not_run("N=65536", "use the full benchmark")
    return targets


# ------------------------------------------------------------------------------------------- CSV, plots
CSV_FIELDS = ["op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
              "baseline_provider", "ratio_vs_baseline", "dtype", "shape_json", "device_name",
              "machine", "clipfast_version", "git_sha", "torch_version", "timestamp"]


def write_csv(rows: list[Row], path: str, device_name: str, threads: Optional[str] = None) -> None:
    """Long format: one line per row and metric (time, peak_memory when measured, each throughput), the
    metric's ratio to the row's baseline in the same run; provider is ``group:provider``."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {"device_name": device_name, "machine": machine_line(threads).removeprefix("machine: "),
              "clipfast_version": clipfast.__version__, "git_sha": _git_sha(), "torch_version": torch.__version__,
              "timestamp": stamp}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            base = baseline_of(rows, row)
            base_time = row.paired_baseline_p50 or (base.p50 if base else None)
            values = {"time": ("s", row.p50, row.p20, row.p80, base_time)}
            if row.peak_extra_bytes is not None:
                base_peak = base.peak_extra_bytes if base and base.peak_extra_bytes is not None else None
                values["peak_memory"] = ("MiB", row.peak_extra_bytes / MIB, None, None,
                                         base_peak / MIB if base_peak is not None else None)
            for metric, (unit, value) in row.throughputs.items():
                base_value = base.throughputs[metric][1] if base and metric in base.throughputs else None
                values[metric] = (unit, value, None, None, base_value)
            for metric, (unit, p50, p20, p80, base_value) in values.items():
                writer.writerow({**common, "op": row.op, "provider": f"{row.group}:{row.provider}",
                                 "mode": row.mode, "metric": metric, "unit": unit, "x_name": row.x_name,
                                 "x_value": row.x_value, "p50": p50, "p20": p20, "p80": p80,
                                 "baseline_provider": row.baseline or "",
                                 "ratio_vs_baseline": p50 / base_value if base_value else "",
                                 "dtype": row.dtype, "shape_json": json.dumps(row.shape)})


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def plot(rows: list[Row], directory: str, x_label: str, title: Callable[[str], str] = str,
         time_label: str = "fwd+bwd time [s]") -> list[str]:
    """Time and peak memory per provider, one PNG per group and metric (``<op>_<group>_<metric>.png``):
    against the size on log axes where the group has several sizes, as bars where it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for group in dict.fromkeys(r.group for r in rows):
        group_rows = [r for r in rows if r.group == group]
        several_modes = len({r.mode for r in group_rows}) > 1
        several_sizes = len({r.x_value for r in group_rows}) > 1
        for metric, label, value in (("time", time_label, lambda r: r.p50),
                                     ("memory", "peak extra memory [MiB]", lambda r: r.peak_extra_bytes / MIB)):
            measured = [r for r in group_rows if metric == "time" or r.peak_extra_bytes is not None]
            if not measured:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            series = dict.fromkeys((r.provider, r.mode) for r in measured)
            names = [f"{p} ({m})" if several_modes else p for p, m in series]
            if several_sizes:
                for key, name in zip(series, names):
                    points = sorted((r.x_value, value(r)) for r in measured if (r.provider, r.mode) == key)
                    ax.plot([p[0] for p in points], [max(p[1], 1e-3) for p in points], marker="o", label=name)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(x_label)
                ax.set_ylabel(label)
                ax.set_title(f"{title(group)}: {metric} vs {group_rows[0].x_name}")
                ax.legend()
            else:  # one size: a bar per provider (log scale: baselines can be 100x slower)
                ax.barh(names, [max(value(next(r for r in measured if (r.provider, r.mode) == key)), 1e-3)
                                for key in series])
                ax.set_xscale("log")
                ax.set_xlabel(label)
                ax.set_title(f"{title(group)}: {metric}\n{x_label}; {group_rows[0].x_name} = {group_rows[0].x_value}",
                             fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            path = os.path.join(directory, f"{group_rows[0].op}_{_file_stem(group)}_{metric}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


def publish(op: str, title: str, rows: list[Row], targets: Targets, out_dir: str, device_name: str,
            columns=CONTRASTIVE_COLUMNS, notes=(), plot_options=None, threads: Optional[str] = None) -> str:
    """Writes ``<out_dir>/<op>.csv`` and the plots; returns the printable report: the title, the table (the
    machine line first; ``threads``: see :func:`machine_line`), notes, the targets and where the files are."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{op}.csv")
    write_csv(rows, csv_path, device_name, threads)
    plots = plot(rows, out_dir, **(plot_options or {}))
    parts = [title, table(rows, columns, threads), *([""] + list(notes) if notes else []), "", "Targets (from this run):", targets.text(),
             f"\nCSV and plots: {csv_path}, " + ", ".join(os.path.basename(p) for p in plots)]
    return "\n".join(parts)
