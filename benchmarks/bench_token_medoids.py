"""pytest-benchmark view of the token-medoids op (the cases of `python -m clipfast.bench --op token_medoids`,
at the 3-frame CenterCLIP shape).

    pytest benchmarks/bench_token_medoids.py --benchmark-only
    make test                                  # runs each once (--benchmark-disable)
"""

import pytest

import clipfast
from clipfast.bench import token_medoids as bench_medoids

X = bench_medoids.video_like(16, 12, 49, 3)  # 64 segment rows x 147 tokens x 768
K = 49
CASES = {
    "clipfast": lambda: clipfast.token_medoids(X, K, split_size=bench_medoids.SPLIT)[1],
    "centerclip_style": lambda: bench_medoids.centerclip_style(X, K),
}


@pytest.mark.parametrize("name", list(CASES))
def test_token_medoids(benchmark, name):
    benchmark.group = "token_medoids-64x147-K49"
    benchmark.extra_info.update({"op": "token_medoids", "provider": name, "rows": X.shape[0], "N": X.shape[1]})
    index = benchmark.pedantic(CASES[name], rounds=2, iterations=1, warmup_rounds=1)
    assert index.shape == (X.shape[0], K)
