"""pytest-benchmark view of the contrastive cases (the same cases as `python -m clipfast.bench`).

    pytest benchmarks/bench_contrastive.py --benchmark-only      # time every provider at N = 1024, 4096
    make test                                                   # runs each once (--benchmark-disable)

The full table, memory, ratios and targets come from `python -m clipfast.bench`.
"""

import pytest

from clipfast.bench import cases as bench_cases

CASES = bench_cases.contrastive_cases("cpu", sizes=bench_cases.QUICK_SIZES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_contrastive(benchmark, case):
    step = bench_cases.make_step(case)
    benchmark.group = f"{case.loss}-N{case.n}"
    benchmark.extra_info.update({"op": case.op, "provider": case.provider, "N": case.n, "D": case.d,
                                 "mode": case.mode, "gflop": case.flops / 1e9, "useful_gflop": case.useful_flops / 1e9})
    loss = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    assert loss.isfinite()
