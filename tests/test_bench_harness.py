"""The benchmark harness itself (clipfast.bench.report, .cases, and the op modules' case lists), on
synthetic rows and tiny cases: nothing here times a real problem."""

import csv
import importlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from clipfast.bench import cases as bench_cases
from clipfast.bench import distributed
from clipfast.bench import measure as bench_measure
from clipfast.bench import report
from clipfast.bench.__main__ import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = report.MIB


def op_row(provider, x_value=1000, p50=1.0, peak=10 * MIB, group="cosine", mode="fwd", baseline="base",
           throughputs=None):
    return report.Row("toy_op", group, provider, mode, "n", x_value, {"n": x_value, "d": 8}, "float32", p50,
                      0.9 * p50, 1.1 * p50, peak, baseline, throughputs or {})


def synthetic_rows():
    """A baseline and two providers at n=1000, the same providers at n=2000 where the baseline did not run,
    and a second group whose baseline has another time (must not be picked for the first group)."""
    return [op_row("base", p50=2.0, peak=40 * MIB),
            op_row("fast", p50=1.0, peak=10 * MIB, throughputs={"throughput": ("GB/s", 6.0)}),
            op_row("tiny", p50=0.05, peak=None),
            op_row("fast", x_value=2000, p50=3.0, peak=20 * MIB),
            op_row("base", group="rff", p50=100.0, peak=80 * MIB),
            op_row("fast", group="rff", p50=50.0, peak=8 * MIB)]


# ----------------------------------------------------------------------------------------------- table
def test_table_starts_with_the_machine_line_then_header_and_a_block_per_group_and_size():
    lines = report.table(synthetic_rows(), report.op_columns()).split("\n")
    assert lines[0].startswith("machine: ") and f"threads: {torch.get_num_threads()} |" in lines[0]
    assert lines[1].split()[:3] == ["case", "shape", "provider"]
    assert set(lines[2]) == {"-"}
    assert lines[3:].count("") == 2  # (cosine, 1000) | (cosine, 2000) | (rff, 1000)


def test_machine_line_names_the_threads_of_worker_processes_when_given():
    assert "| threads: 2 processes x 1 |" in report.table(synthetic_rows(), report.op_columns(),
                                                          threads="2 processes x 1").split("\n")[0]


def test_table_ratios_are_against_the_same_run_baseline_of_the_same_group_and_size():
    lines = report.table(synthetic_rows(), report.op_columns()).split("\n")
    fast, tiny, fast_2000, fast_rff = (lines[i].split() for i in (4, 5, 7, 10))
    assert fast[-3:] == ["base", "0.50x", "0.25x"]  # 1.0 / 2.0 s, 10 / 40 MiB
    assert tiny[-3:] == ["base", "1/40", "-"]  # below 0.1 as a fraction; no peak measured
    assert fast_2000[-3:] == ["-", "-", "-"]  # no baseline at this size in this run
    assert fast_rff[-3:] == ["base", "0.50x", "0.10x"]  # rff's own baseline, not cosine's


# ------------------------------------------------------------------------------------------------- CSV
def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_a_step_measured_alongside_another_alternates_with_it_so_their_ratio_shares_the_conditions():
    calls = []
    timing, other = bench_measure.measure_alongside(lambda: calls.append("step"), lambda: calls.append("mm"),
                                                    reps=3, warmup=1)
    # warm-up (the alongside step once, untimed), then mm after every timed step
    assert calls == ["step", "mm", "step", "mm", "step", "mm", "step", "mm"]
    assert (timing.reps, other.reps) == (3, 3)
    assert bench_measure.measure_alongside(lambda: None, None, reps=2)[1] is None


def test_memory_of_the_alongside_step_is_not_counted_in_the_step_peak():
    buffer = torch.empty(64 * 2 ** 20 // 4)  # 64 MiB, untouched until the alongside step fills it
    timing, _ = bench_measure.measure_alongside(lambda: None, lambda: buffer.fill_(1.0), reps=2)
    assert timing.peak_extra_bytes < 16 * 2 ** 20


def test_a_paired_case_times_its_baseline_in_alternation_and_its_ratio_uses_those_timings():
    calls = []

    def step(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return bench_cases.plain_step(run)

    common = dict(op="demo", group="g", mode="fwd", x_name="n", x_value=1, shape=(("n", 1),), inputs=(dict,),
                  reps=3, warmup=0, baseline="copy")
    cases = [bench_cases.OpCase(provider="copy", step=lambda _: step("copy", 0.002), **common),
             bench_cases.OpCase(provider="ours", step=lambda _: step("ours", 0.004), paired=True, **common)]
    rows = bench_cases.measure_cases(cases, log=lambda message: None)
    assert calls[3:] == ["copy", "ours", "copy", "ours", "copy", "ours", "copy"]  # after copy's own 3
    ours = rows[1]
    assert rows[0].paired_baseline_p50 is None and ours.paired_baseline_p50 is not None
    assert report.time_ratio(ours, rows[0]) == pytest.approx(ours.p50 / ours.paired_baseline_p50)
    assert report.table(rows, report.op_columns()).splitlines()[-1].split()[-2].endswith("x*")
    assert ours.peak_extra_bytes is not None  # measured on ours' first run, before any paired copy


def test_csv_is_long_format_with_one_line_per_case_provider_and_metric(tmp_path):
    rows = synthetic_rows()
    path = tmp_path / "toy_op.csv"
    report.write_csv(rows, str(path), "toy machine")
    fields, lines = read_csv(path)
    assert fields == report.CSV_FIELDS
    expected = sum(1 + (r.peak_extra_bytes is not None) + len(r.throughputs) for r in rows)
    assert len(lines) == expected == 12
    keys = [(line["provider"], line["x_value"], line["mode"], line["metric"]) for line in lines]
    assert len(set(keys)) == len(keys)
    assert {line["metric"] for line in lines} == {"time", "peak_memory", "throughput"}
    fast = {line["metric"]: line for line in lines if line["provider"] == "cosine:fast" and line["x_value"] == "1000"}
    assert (fast["time"]["unit"], float(fast["time"]["p20"]), float(fast["time"]["p80"])) == ("s", 0.9, 1.1)
    assert (fast["peak_memory"]["unit"], float(fast["peak_memory"]["p50"])) == ("MiB", 10.0)
    assert json.loads(fast["time"]["shape_json"]) == {"n": 1000, "d": 8}
    assert all(line["device_name"] == "toy machine" and line["op"] == "toy_op" for line in lines)
    assert all(line["machine"].startswith(report.machine()["cpu"]) for line in lines)


def test_csv_ratios_are_against_the_same_run_baseline(tmp_path):
    path = tmp_path / "toy_op.csv"
    report.write_csv(synthetic_rows(), str(path), "toy machine")
    ratios = {(line["provider"], line["x_value"], line["metric"]): line["ratio_vs_baseline"]
              for line in read_csv(path)[1]}
    assert float(ratios[("cosine:fast", "1000", "time")]) == pytest.approx(0.5)
    assert float(ratios[("cosine:fast", "1000", "peak_memory")]) == pytest.approx(0.25)
    assert float(ratios[("cosine:base", "1000", "time")]) == pytest.approx(1.0)
    assert float(ratios[("rff:fast", "1000", "time")]) == pytest.approx(0.5)
    assert ratios[("cosine:fast", "2000", "time")] == ""  # the baseline did not run at n=2000
    assert ("cosine:tiny", "1000", "peak_memory") not in ratios  # not measured: no line
    assert ratios[("cosine:fast", "1000", "throughput")] == ""  # the baseline has no throughput


def test_publish_writes_the_op_csv_and_a_time_and_memory_plot_per_group(tmp_path):
    rows = synthetic_rows()
    targets = report.Targets()
    targets.check(True, "toy target")
    text = report.publish("toy_op", "toy title", rows, targets, str(tmp_path), "toy machine",
                          report.op_columns(), notes=["a note"], plot_options={"x_label": "n"})
    lines = text.split("\n")
    assert lines[0] == "toy title" and lines[1].startswith("machine: ")
    assert "a note" in lines and "Targets (from this run):" in lines and "  [PASS] toy target" in lines
    assert sorted(os.listdir(tmp_path)) == ["toy_op.csv", "toy_op_cosine_memory.png", "toy_op_cosine_time.png",
                                            "toy_op_rff_memory.png", "toy_op_rff_time.png"]


# --------------------------------------------------------------------------------------------- targets
def test_targets_print_pass_fail_and_not_run_and_only_a_failure_misses():
    targets = report.Targets()
    targets.heading("toy:")
    targets.check(True, "met")
    targets.not_run("at n=10^6", "quick mode")
    assert targets.met
    targets.check(False, "missed")
    assert not targets.met
    assert targets.text().split("\n") == ["toy:", "  [PASS] met", "  [ -- ] at n=10^6: not run (quick mode)",
                                          "  [FAIL] missed"]


def distributed_rows(n, gather_ratio, ring_over_gather):
    """The distributed benchmark's rows as two ranks report them: open_clip 400 MiB per rank at every n."""
    base = 400 * MIB
    gather = base * gather_ratio
    per_provider = {"open_clip": base, "clipfast-gather": gather, "clipfast-ring": gather * ring_over_gather}
    per_rank = [[{"provider": provider, "n": size, "p50": 1.0 + rank, "p20": 0.9 + rank, "p80": 1.1 + rank,
                  "peak": peak * (1 - 0.1 * rank)}
                 for size in sorted({1024, n}) for provider, peak in per_provider.items()]
                for rank in range(2)]
    return distributed.worst_rank_rows(per_rank, world_size=2)


def test_distributed_rows_hold_the_slowest_rank_time_and_the_largest_peak_against_open_clip():
    rows = distributed_rows(4096, 1 / 10, 1.0)
    assert [(r.provider, r.x_value) for r in rows] == [(p, n) for n in (1024, 4096) for p in distributed.PROVIDERS]
    assert all((r.p50, r.p20, r.p80) == (2.0, 1.9, 2.1) for r in rows)  # rank 1 is the slower one
    assert rows[0].peak_extra_bytes == 400 * MIB  # rank 0 has the larger peak
    assert all(r.baseline == "open_clip" and r.shape == {"ranks": 2, "n": r.x_value, "D": 512} for r in rows)


def verdict(line):
    return "PASS" if "[PASS]" in line else "FAIL" if "[FAIL]" in line else "not run" if ": not run (" in line else None


@pytest.mark.parametrize("n, gather_ratio, ring_over_gather, expected", [
    (4096, 1 / 10, 1.0, ["PASS", "PASS"]),
    (4096, 1 / 7, 0.9, ["FAIL", "PASS"]),
    (4096, 1 / 10, 1.1, ["PASS", "FAIL"]),
    (1024, 1 / 2, 1.0, ["not run", "PASS"]),  # the memory target applies from n = 4096 per rank on
])
def test_distributed_targets(n, gather_ratio, ring_over_gather, expected):
    targets = distributed.judge(distributed_rows(n, gather_ratio, ring_over_gather))
    assert [verdict(line) for line in targets.lines] == expected
    assert targets.met == ("FAIL" not in expected)
    assert "1/8" in targets.lines[0] and "clipfast-ring" in targets.lines[1]


# ---------------------------------------------------------------------------------- the ops' case lists
def test_every_op_benchmark_is_named_by_its_op_stem_with_a_pytest_view():
    for op in OPS:
        assert importlib.util.find_spec(f"clipfast.ops.{op}") is not None, op
        assert os.path.exists(os.path.join(ROOT, "benchmarks", f"bench_{op}.py")), op


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("quick", [True, False])
def test_case_lists_are_op_cases_whose_inputs_are_built_only_on_demand(op, quick):
    cases = importlib.import_module(f"clipfast.bench.{op}").cases(quick)
    assert cases and all(isinstance(case, bench_cases.OpCase) for case in cases)
    for case in cases:
        assert case.op == op, case.id
        function, *args = case.inputs
        assert callable(function), case.id
        assert not any(isinstance(a, (torch.Tensor, torch.nn.Module)) for a in args), case.id
        assert case.baseline is None or any(c.provider == case.baseline and c.group == case.group
                                            and c.x_value == case.x_value and c.mode == case.mode
                                            for c in cases), case.id
    assert len({case.id for case in cases}) == len(cases)


# Imports every module of clipfast.bench and lists every op's cases (the op stems in argv) under a mode that
# records each tensor torch makes, then builds one small case's inputs to show that the recording sees
# them; prints both records.
RECORD_TENSORS = """
import importlib, json, pkgutil, sys
import torch
from torch.overrides import TorchFunctionMode

class RecordTensors(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.made.append([getattr(func, "__name__", str(func)), out.numel()])
        return out

import clipfast.bench
with RecordTensors() as at_import:
    for module in pkgutil.iter_modules(clipfast.bench.__path__):
        importlib.import_module(f"clipfast.bench.{module.name}")
    listed = [importlib.import_module(f"clipfast.bench.{op}").cases(quick) for op in sys.argv[1:]
              for quick in (True, False)]
with RecordTensors() as building:
    next(case for case in listed[0] if case.provider == "clipfast").build_inputs()
print(json.dumps([at_import.made, building.made]))
"""


def test_importing_the_benchmarks_and_listing_their_cases_allocates_no_tensor():
    """In a fresh process, so that the modules are imported under the recording mode."""
    ops = ["schur_covariance", *(op for op in OPS if op != "schur_covariance")]  # the control's case list first
    result = subprocess.run([sys.executable, "-c", RECORD_TENSORS, *ops], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    at_import, building = json.loads(result.stdout.strip().split("\n")[-1])
    assert at_import == []
    assert sum(numel for _, numel in building) >= 2 * 1000 * 512  # the control: pairs(1000) is seen
