"""pytest-benchmark view of the Schur-complement op (the providers of `python -m clipfast.bench --op schur`,
at sizes that suit a test run).

    pytest benchmarks/bench_schur_covariance.py --benchmark-only
    make test                                  # runs each once (--benchmark-disable)
"""

import pytest
import torch

import clipfast
from clipfast.bench import schur as bench_schur
from clipfast.ops.schur_covariance import kernel_covariance
from clipfast.schur import sce_score

N = 4096
TEXT, IMAGE = bench_schur._pairs(N)
OMEGAS = torch.randn(bench_schur.DIM, 256, generator=torch.Generator().manual_seed(7)) / bench_schur.SIGMA

CASES = {
    "cosine-sce-clipfast": lambda: sce_score(IMAGE, TEXT, kernel="cosine", convention="clip-dissection")[0],
    "cosine-ceiling-three-gemms": bench_schur._ceiling_three_gemms(TEXT, IMAGE),
    "rff-covariance-clipfast": lambda: kernel_covariance(TEXT, IMAGE, "rff", OMEGAS)[1],
    "rff-covariance-reference": lambda: _with_reference(lambda: kernel_covariance(TEXT, IMAGE, "rff", OMEGAS)[1]),
}


def _with_reference(fn):
    with clipfast.use_backend("reference"):
        return fn()


@pytest.mark.parametrize("name", list(CASES))
def test_schur_covariance(benchmark, name):
    benchmark.group = f"schur-n{N}"
    benchmark.extra_info.update({"op": "schur_covariance", "case": name, "n": N, "d": bench_schur.DIM})
    out = benchmark.pedantic(CASES[name], rounds=3, iterations=1, warmup_rounds=1)
    assert out is None or bool(torch.isfinite(out).all())
