"""pytest-benchmark view of the token-medoids op: the segment cases of `python -m clipfast.bench --op
token_medoids` (clipfast.bench.token_medoids.cases, quick mode: CenterCLIP's 2-, 3- and 4-frame segment
shapes), clipfast.token_medoids against the CenterCLIP-style port. The video-tower cases take seconds per
step and run in `python -m clipfast.bench` only.

    pytest benchmarks/bench_token_medoids.py --benchmark-only
    make test                                  # runs each once (--benchmark-disable)
"""

import pytest

from clipfast.bench import token_medoids as bench_medoids

CASES = [c for c in bench_medoids.cases(quick=True) if c.group == bench_medoids.SEGMENTS]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_token_medoids(benchmark, case):
    shape = dict(case.shape)
    benchmark.group = f"token_medoids-{shape['rows']}x{shape['N']}-K{shape['K']}"
    benchmark.extra_info.update({"op": case.op, "provider": case.provider, **shape})
    with case.step(case.build_inputs()) as step:
        index = benchmark.pedantic(step, rounds=case.reps, iterations=1, warmup_rounds=case.warmup)
    assert index.shape == (shape["rows"], shape["K"])
    assert bool((index.diff(dim=-1) > 0).all())  # sorted, distinct token indices
    assert 0 <= int(index.min()) and int(index.max()) < shape["N"]
