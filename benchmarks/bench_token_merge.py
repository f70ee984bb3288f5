"""pytest-benchmark view of the merge op: the merge_kernel cases of `python -m clipfast.bench --op token_merge`
(clipfast.bench.token_merge.merge_cases, quick mode): clipfast.token_merge and the port of ToMe's procedure,
forward and forward + backward, B=32, N=197, D=768, r=16. The tower cases take seconds per step and run in
`python -m clipfast.bench` only.

    pytest benchmarks/bench_token_merge.py --benchmark-only
    make test                                  # runs each once (--benchmark-disable)
"""

import pytest

from clipfast.bench import token_merge as bench_merge

CASES = bench_merge.merge_cases(quick=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_token_merge(benchmark, case):
    benchmark.group = f"token_merge-{case.mode}-B{bench_merge.BATCH}xN{bench_merge.TOKENS}xD{bench_merge.DIM}-r{bench_merge.R}"
    benchmark.extra_info.update({"op": case.op, "provider": case.provider, "mode": case.mode, **dict(case.shape)})
    with case.step(case.build_inputs()) as step:
        out = benchmark.pedantic(step, rounds=case.reps, iterations=1, warmup_rounds=case.warmup)
    merged, grad = out if case.mode == "fwd_bwd" else (out, None)
    assert merged.shape == (bench_merge.BATCH, bench_merge.TOKENS - bench_merge.R, bench_merge.DIM)
    if grad is not None:  # every token lands in one output row: every input row gets a gradient
        assert grad.abs().sum(-1).ne(0).all()
