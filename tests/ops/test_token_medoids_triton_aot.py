"""Ahead-of-time compilation of the Triton token_medoids kernels for sm_80 and sm_90, no GPU needed.

Compiles ``_pairwise_distance_kernel`` (both metrics, both passes: diagonal and off-diagonal tiles) in every
dtype path (fp32 with "ieee" and with "tf32", fp16, bf16) and ``_medoids_kernel`` with the exact launch
configurations ``kernel_configs`` picks for N in {50, 147, 294, 1024} tokens, D = 768, and asserts:

* the distance tiles' ``tl.dot`` on tensor cores on the tf32 / fp16 / bf16 paths (``mma.sync`` on sm_80,
  ``wgmma`` on sm_90), none on the fp32 "ieee" path (exact fp32 on the FMA units); the medoids kernel has
  no matrix instruction;
* from ``cuobjdump --dump-resource-usage`` on the cubin, that nothing spills (STACK and LOCAL are 0) and
  that the shared memory fits the architecture (163 KB on sm_80, 227 KB on sm_90).

Configurations that are identical for several N (or dtypes: the medoids kernel reads fp32 only) compile
once.

Arguments are specialised as the JIT does for contiguous inputs with D % 16 == 0: the unit column stride
becomes constexpr 1, pointers, D and the token / row strides carry 16-divisibility (N, K and the loop
bounds get no hint, as for ragged sizes).

The compilation runs in a subprocess (see :mod:`clipfast.testing.triton_aot`). Run with ``-s`` to see the
REG/STACK/SHARED table.
"""

import pytest

from clipfast.testing.triton_aot import (DOT_PATHS, SM_TARGETS, assert_triton_compile_clean,
                                         nvidia_backend_available, run_triton_aot_worker, triton_aot_compile,
                                         triton_aot_worker_main)

TOKENS = (50, 147, 294, 1024)
WIDTH = 768
METRICS = ("euclidean", "cosine")
PASSES = ("diagonal", "upper")
UNIT_STRIDES = ("stride_xd",)
DIVISIBLE_INTS = ("D", "stride_xn", "stride_xr")


def _jobs():
    """(N, job) for the distance kernel per metric, pass, dtype path and sm, and the medoids kernel per sm
    (path "fp32": it reads fp32 distances whatever the tokens' dtype)."""
    from clipfast.triton_kernels import token_medoids as K

    for path, dot in DOT_PATHS.items():
        for n in TOKENS:
            for name, cfg in K.kernel_configs(n, WIDTH, dot.dtype, dot.precision).items():
                if name == "distance":
                    variants = [(metric, tile_pass, path) for metric in METRICS for tile_pass in PASSES]
                else:
                    variants = [("-", "-", "fp32")]
                for metric, tile_pass, job_path in variants:
                    for sm in SM_TARGETS:
                        yield n, dict(kernel=name, metric=metric, tile_pass=tile_pass, path=job_path, sm=sm, cfg=cfg)


def _compile(job):
    from clipfast.triton_kernels import token_medoids as K

    if job["kernel"] == "medoids":
        return triton_aot_compile(K._medoids_kernel, job["sm"], job["cfg"], {},
                                  {"med_ptr": "*i64", "assign_ptr": "*i64"})
    dot = DOT_PATHS[job["path"]]
    constexprs = dict(METRIC=METRICS.index(job["metric"]), DIAGONAL=job["tile_pass"] == "diagonal",
                      CENTRE=job["metric"] == "euclidean" and dot.element == "fp32", INPUT_PRECISION=dot.precision)
    return triton_aot_compile(K._pairwise_distance_kernel, job["sm"], job["cfg"], constexprs,
                              {"x_ptr": "*" + dot.element}, UNIT_STRIDES, DIVISIBLE_INTS)


@pytest.mark.slow
@pytest.mark.skipif(not nvidia_backend_available(), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    rows = run_triton_aot_worker(__file__, ("kernel", "metric", "tile_pass", "path", "sm", "N"))
    assert {(r["kernel"], r["metric"], r["tile_pass"], r["path"], r["sm"]) for r in rows} == {
        ("distance", m, p, path, sm) for m in METRICS for p in PASSES for path in DOT_PATHS
        for sm in SM_TARGETS} | {("medoids", "-", "-", "fp32", sm) for sm in SM_TARGETS}
    assert {n for r in rows if r["kernel"] == "medoids" for n in r["N"]} == set(TOKENS)
    assert_triton_compile_clean(rows, tensor_cores=lambda r: r["kernel"] == "distance" and r["path"] != "fp32-ieee")


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile, sizes_field="N")
