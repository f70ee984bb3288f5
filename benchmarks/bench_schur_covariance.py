"""pytest-benchmark view of the Schur-complement op: the cases of `python -m clipfast.bench --op
schur_covariance` (clipfast.bench.schur_covariance.cases, quick mode): cosine SCE at n = 1,000 and 10,000 and
RFF covariance at n = 1,000, m = 2,500, each with its torch.mm ceiling and the plain-PyTorch formulation.

    pytest benchmarks/bench_schur_covariance.py --benchmark-only
    make test                                  # runs each once (--benchmark-disable)
"""

import pytest
import torch

from clipfast.bench import schur_covariance as bench_schur_covariance

CASES = bench_schur_covariance.cases(quick=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_schur_covariance(benchmark, case):
    benchmark.group = f"schur_covariance-{case.group}-n{case.x_value}"
    benchmark.extra_info.update({"op": case.op, "provider": case.provider, **dict(case.shape)})
    with case.step(case.build_inputs()) as step:
        out = benchmark.pedantic(step, rounds=case.reps, iterations=1, warmup_rounds=case.warmup)
    tensors = out if isinstance(out, tuple) else (out,)
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors)
