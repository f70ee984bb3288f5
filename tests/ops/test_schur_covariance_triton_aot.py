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

The compilation runs in a subprocess because pytest's process may have TRITON_INTERPRET=1 set,
under which ``@triton.jit`` yields interpreter objects that cannot be compiled. Run with ``-s``
to see the REG/STACK/SHARED table.
"""

import json
import os

import pytest

try:
    import triton  # noqa: F401  (only the gate: the compilation runs in clipfast.testing)
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from clipfast.testing import TRITON_SHARED_MEMORY_LIMIT as SHARED_LIMIT  # noqa: E402
from clipfast.testing import (assert_triton_compile_clean, run_triton_aot_worker,  # noqa: E402
                              triton_aot_worker_main, triton_cuobjdump)

CUOBJDUMP = triton_cuobjdump()
FEATURES = (512, 1024, 5000)
INPUT_DIM = 512
KERNEL_COVARIANCES = {"gram": ("column_cosine", "row_cosine"), "features": ("rff",),
                      "grad": ("column_cosine", "row_cosine")}
# (name, torch dtype name, triton element type, fp32 dot precision); tensor cores on all but fp32-ieee.
DTYPE_PATHS = (("fp32-ieee", "float32", "fp32", "ieee"), ("fp32-tf32", "float32", "fp32", "tf32"),
               ("fp16", "float16", "fp16", "ieee"), ("bf16", "bfloat16", "bf16", "ieee"))
# Launch-time specialisation of contiguous inputs: column strides equal 1.
UNIT_STRIDES = ("stride_xd", "stride_td")
DIVISIBLE_INTS = ("d", "stride_xn", "stride_tn")


def _signature(fn, elem, constexprs):
    sig = {}
    for p in fn.params:
        if p.is_constexpr or p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name in ("x_ptr", "t_ptr", "phi_ptr"):
            sig[p.name] = "*" + elem
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32"
        elif p.name == "rff_scale":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def _jobs():
    """One job per distinct (kernel, map, dtype path, sm, config); F values merged."""
    import torch

    from clipfast.triton_kernels import schur_covariance as K

    jobs = {}
    for path, dtype, elem, precision in DTYPE_PATHS:
        for f in FEATURES:
            for name, cfg in K.kernel_configs(f, INPUT_DIM, getattr(torch, dtype), precision).items():
                for covariance in KERNEL_COVARIANCES[name]:
                    for cap in SHARED_LIMIT:
                        key = json.dumps([name, covariance, path, cap, cfg], sort_keys=True)
                        jobs.setdefault(key, dict(kernel=name, covariance=covariance, path=path, dtype=elem,
                                                  precision=precision, sm=cap, cfg=cfg, F=[]))["F"].append(f)
    return list(jobs.values())


def _compile(job):
    from clipfast.testing import triton_aot_compile

    from clipfast.triton_kernels import schur_covariance as K

    fn = {"gram": K._schur_covariance_gram_kernel, "features": K._schur_covariance_rff_feature_kernel,
          "grad": K._schur_covariance_grad_kernel}[job["kernel"]]
    cfg = job["cfg"]
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    options = {k: cfg[k] for k in ("num_warps", "num_stages")}
    constexprs = dict(blocks, INPUT_PRECISION=job["precision"], **{s: 1 for s in UNIT_STRIDES})
    if job["kernel"] != "features":
        constexprs["ROW_SCALE"] = K.ROW_SCALE[job["covariance"]]
    sig = _signature(fn, job["dtype"], constexprs)
    usage = triton_aot_compile(fn, sig, constexprs, DIVISIBLE_INTS, job["sm"], options)
    return dict(kernel=job["kernel"], covariance=job["covariance"], path=job["path"], sm=job["sm"], F=job["F"],
                config=" ".join(f"{k}={v}" for k, v in cfg.items()), **usage)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    from clipfast.testing import expected_matrix_instruction

    rows = run_triton_aot_worker(__file__)
    assert {(r["kernel"], r["covariance"], r["path"], r["sm"]) for r in rows} == {
        (k, c, p[0], sm) for k, covariances in KERNEL_COVARIANCES.items() for c in covariances for p in DTYPE_PATHS
        for sm in SHARED_LIMIT}

    header = (f"{'kernel':8} {'covariance':14} {'path':9} {'sm':2} {'F':14} {'kind':5} {'REG':>3} {'STACK':>5} "
              f"{'SHARED':>6}  config")
    print("\n" + header)
    for r in rows:
        print(f"{r['kernel']:8} {r['covariance']:14} {r['path']:9} {r['sm']:2} {','.join(map(str, r['F'])):14} "
              f"{r['kind']:5} {r['reg']:3} {r['stack']:5} {r['shared']:6}  {r['config']}")

    assert_triton_compile_clean(rows)
    wrong = [(r["kernel"], r["covariance"], r["path"], r["sm"], r["kind"]) for r in rows
             if r["kind"] != expected_matrix_instruction(r["sm"], tensor_cores=r["path"] != "fp32-ieee")]
    assert not wrong, f"tl.dot not on the expected instructions (mma on sm_80, wgmma on sm_90, fma for ieee): {wrong}"


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile)
