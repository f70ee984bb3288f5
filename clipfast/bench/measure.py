"""Timing and peak-memory measurement of one step.

Time: wall clock per step (CUDA-synchronised on a GPU), reported as median with p20/p80.
Memory, CPU: the peak resident set size during the first timed step above the resident size just
before it (Linux: freed heap memory is trimmed, the high-water mark reset through /proc/self/clear_refs,
then read as VmHWM), i.e. every byte the step touched beyond its inputs: logits, softmax buffers,
gradients, allocator slack.
Memory, GPU: ``torch.cuda.max_memory_allocated`` above the allocation before the step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import statistics
import time
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class Timing:
    p50: float
    p20: float
    p80: float
    peak_extra_bytes: float
    reps: int


def _quantile(values, q):
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def _rss_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    # Hand freed heap pages back to the OS first (glibc keeps them resident): otherwise a step that
    # reuses what the warm-up freed would show no growth at all.
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def reps_for(n: int) -> int:
    """Repetitions by size: enough for a stable median at small N, two runs when a step takes seconds (a
    single run's share of a drifting machine's GEMM ceiling varied by 10%), one when it takes minutes."""
    return 7 if n <= 1024 else 3 if n <= 4096 else 2 if n <= 16384 else 1


def measure(step: Callable, device: str = "cpu", reps: int = 3, warmup: int = 1) -> Timing:
    """Run ``warmup`` untimed steps, then ``reps`` timed ones; peak extra memory is that of the first
    timed step."""
    return measure_alongside(step, None, device, reps, warmup)[0]


def measure_alongside(step: Callable, alongside: Optional[Callable], device: str = "cpu", reps: int = 3,
                      warmup: int = 1) -> tuple[Timing, Optional[Timing]]:
    """:func:`measure` of ``step``, with a second step ``alongside`` timed in alternation with it: after
    every timed ``step`` (``reps`` times; one untimed run with the warm-up).

    A ratio of the two Timings compares them under the same machine conditions: on a shared 2-core VM
    the same GEMM's throughput drifts by 10% or more over minutes, more than a target's margin.
    ``step``'s peak is that of its first timed run, before any timed ``alongside`` run, so the other
    step's allocations are not counted (its own Timing reports no peak).
    """
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
        sync()
    if alongside is not None:
        alongside()
        sync()
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _rss_status("VmRSS")
    times, alongside_times, peak = [], [], 0.0
    for i in range(reps):
        if alongside is not None and i > 0:  # not before the first step, whose peak is measured alone
            alongside_times.append(timed(alongside))
        times.append(timed(step))
        if i == 0:
            peak = float((torch.cuda.max_memory_allocated() if cuda else _rss_status("VmHWM")) - before)
    if alongside is None:
        return _timing(times, peak), None
    alongside_times.append(timed(alongside))
    return _timing(times, peak), _timing(alongside_times, 0.0)


def _timing(times: list[float], peak: float) -> Timing:
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), peak, len(times))
