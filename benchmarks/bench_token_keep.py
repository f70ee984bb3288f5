"""pytest-benchmark view of the keep kernel (the first case of `python -m clipfast.bench --op token_keep`):
forward + backward of clipfast.attentive_token_keep against topk + gather, B=64, L=196, D=768, keep 98.

    pytest benchmarks/bench_token_keep.py --benchmark-only
    make test                                  # runs each once (--benchmark-disable)
"""

import pytest

import clipfast
from clipfast.bench import token_keep as bench_keep

TOKENS, SCORES, GRAD = bench_keep.keep_inputs()
CASES = {
    "clipfast": lambda: clipfast.attentive_token_keep(TOKENS, SCORES, bench_keep.KEEP)[0],
    "topk_gather": lambda: bench_keep.topk_gather(TOKENS, SCORES, bench_keep.KEEP),
}


@pytest.mark.parametrize("name", list(CASES))
def test_token_keep_forward_backward(benchmark, name):
    benchmark.group = "token_keep-64x196x768-keep98"
    benchmark.extra_info.update({"op": "token_keep", "provider": name})

    def step():
        kept = CASES[name]()
        kept.backward(GRAD)
        grad, TOKENS.grad = TOKENS.grad, None
        return kept, grad

    kept, grad = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert kept.shape == (TOKENS.shape[0], 1 + bench_keep.KEEP, TOKENS.shape[2])
    assert grad.abs().sum(-1).ne(0).sum() == TOKENS.shape[0] * (1 + bench_keep.KEEP)
