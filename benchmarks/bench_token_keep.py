"""pytest-benchmark view of the keep kernel: the keep_kernel cases of `python -m clipfast.bench --op token_keep`
(clipfast.bench.token_keep.keep_cases, quick mode): clipfast.attentive_token_keep, topk + gather and a plain
copy, forward and forward + backward, B=64, L=196, D=768, keep 98. The ViT-level cases of that op (A-CLIP
scores, the ViT-B-16 tower) take seconds per step and run in `python -m clipfast.bench` only.

    pytest benchmarks/bench_token_keep.py --benchmark-only
    make test                                  # runs each once (--benchmark-disable)
"""

import pytest

from clipfast.bench import token_keep as bench_keep

CASES = bench_keep.keep_cases(quick=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_token_keep(benchmark, case):
    benchmark.group = f"token_keep-{case.mode}-B{bench_keep.BATCH}xL{bench_keep.PATCHES}xD{bench_keep.DIM}-keep{bench_keep.KEEP}"
    benchmark.extra_info.update({"op": case.op, "provider": case.provider, "mode": case.mode, **dict(case.shape)})
    with case.step(case.build_inputs()) as step:
        out = benchmark.pedantic(step, rounds=case.reps, iterations=1, warmup_rounds=case.warmup)
    kept, grad = out if case.mode == "fwd_bwd" else (out, None)
    assert kept.shape == (bench_keep.BATCH, 1 + bench_keep.KEEP, bench_keep.DIM)
    if grad is not None:  # exactly the kept rows ([CLS] included) receive gradient
        assert grad.abs().sum(-1).ne(0).sum() == bench_keep.BATCH * (1 + bench_keep.KEEP)
