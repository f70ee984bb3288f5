"""Ahead-of-time compilation of the Triton feature-Gram kernels for sm_80 and sm_90, no GPU needed.

Compiles ``_schur_covariance_gram_kernel`` and ``_schur_covariance_grad_kernel`` for the covariances
whose features they build on the fly (column_cosine: raw rows; row_cosine: rows scaled by their inverse
norms; rff runs them as column_cosine does, on its feature buffer) and
``_schur_covariance_rff_feature_kernel``, in every dtype path (fp32 with "ieee" and with "tf32", fp16,
bf16), with the exact launch configurations ``kernel_configs`` picks for F in {512, 1024, 5000} and
d = 512, and asserts:

* tensor cores on the tf32 / fp16 / bf16 paths: every ``tl.dot`` is ``mma.sync`` on sm_80 and
  ``wgmma`` on sm_90 (none left on ``mma.sync``); the fp32 "ieee" path has no matrix instruction
  (exact fp32 on the FMA units, as PyTorch's "highest" precision asks);
* from ``cuobjdump --dump-resource-usage`` on the cubin, that nothing spills (STACK and LOCAL are 0)
  and that the shared memory fits the architecture (163 KiB on sm_80, 227 KiB on sm_90).

Configurations that are identical for several F compile once.

Arguments are specialised as the JIT does for contiguous inputs with d % 16 == 0: unit column
strides become constexpr 1, and pointers, d and the row strides carry 16-divisibility (n, m and
F get no hint, as for ragged sizes).

The compilation runs in a subprocess (see :mod:`clipfast.testing.triton_aot`). Run with ``-s`` to see the
REG/STACK/SHARED table.
"""

import pytest

from clipfast.testing.triton_aot import (DOT_PATHS, SM_TARGETS, assert_triton_compile_clean,
                                         nvidia_backend_available, run_triton_aot_worker, triton_aot_compile,
                                         triton_aot_worker_main)

FEATURES = (512, 1024, 5000)
INPUT_DIM = 512
KERNEL_COVARIANCES = {"gram": ("column_cosine", "row_cosine"), "features": ("rff",),
                      "grad": ("column_cosine", "row_cosine")}
# Launch-time specialisation of contiguous inputs: column strides equal 1.
UNIT_STRIDES = ("stride_xd", "stride_td")
DIVISIBLE_INTS = ("d", "stride_xn", "stride_tn")


def _jobs():
    """(F, job) for every kernel, covariance, dtype path and sm."""
    from clipfast.triton_kernels import schur_covariance as K

    for path, dot in DOT_PATHS.items():
        for f in FEATURES:
            for name, cfg in K.kernel_configs(f, INPUT_DIM, dot.dtype, dot.precision).items():
                for covariance in KERNEL_COVARIANCES[name]:
                    for sm in SM_TARGETS:
                        yield f, dict(kernel=name, covariance=covariance, path=path, sm=sm, cfg=cfg)


def _compile(job):
    from clipfast.triton_kernels import schur_covariance as K

    fn = {"gram": K._schur_covariance_gram_kernel, "features": K._schur_covariance_rff_feature_kernel,
          "grad": K._schur_covariance_grad_kernel}[job["kernel"]]
    dot = DOT_PATHS[job["path"]]
    arg_types = {**{p: "*" + dot.element for p in ("x_ptr", "t_ptr", "phi_ptr")}, "rff_scale": "fp32"}
    constexprs = dict(INPUT_PRECISION=dot.precision)
    if job["kernel"] != "features":
        constexprs["ROW_SCALE"] = K.ROW_SCALE[job["covariance"]]
    return triton_aot_compile(fn, job["sm"], job["cfg"], constexprs, arg_types, UNIT_STRIDES, DIVISIBLE_INTS)


@pytest.mark.slow
@pytest.mark.skipif(not nvidia_backend_available(), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    rows = run_triton_aot_worker(__file__, ("kernel", "covariance", "path", "sm", "F"))
    assert {(r["kernel"], r["covariance"], r["path"], r["sm"]) for r in rows} == {
        (k, c, p, sm) for k, covariances in KERNEL_COVARIANCES.items() for c in covariances for p in DOT_PATHS
        for sm in SM_TARGETS}
    assert_triton_compile_clean(rows, tensor_cores=lambda r: r["path"] != "fp32-ieee")


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile, sizes_field="F")
