"""Ahead-of-time compilation of the Triton feature-Gram kernels for sm_80 and sm_90, no GPU needed.

Compiles ``_feature_gram_kernel`` and ``_feature_grad_kernel`` for every feature map (linear,
row_normalized, rff) and input type (fp32 with "ieee" and "tf32", fp16, bf16) with the exact
block sizes ``kernel_configs`` picks for F in {512, 1024, 5000} and d = 512, and asserts, from
``cuobjdump --dump-resource-usage`` on the cubin, that nothing spills (STACK and LOCAL are 0) and
that the shared memory fits the architecture (163 KB on sm_80, 227 KB on sm_90). Configurations
that are identical for several F compile once.

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
                              triton_aot_compile, triton_aot_worker_main, triton_cuobjdump)

CUOBJDUMP = triton_cuobjdump()
FEATURES = (512, 1024, 5000)
INPUT_DIM = 512
FEATURE_MAPS = ("linear", "row_normalized", "rff")
# Launch-time specialisation of contiguous (n, d) inputs: column strides equal 1.
UNIT_STRIDES = ("stride_td", "stride_xd")
DIVISIBLE_INTS = ("d", "stride_tn", "stride_xn")


def _signature(fn, elem, constexprs):
    sig = {}
    for p in fn.params:
        if p.is_constexpr or p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name in ("t_ptr", "x_ptr"):
            sig[p.name] = "*" + elem
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32"
        elif p.name == "rff_scale":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def _jobs():
    """One job per distinct (kernel, map, dtype, precision, sm, config); F values merged."""
    import torch

    from clipfast.triton_kernels import schur_covariance as K

    dtypes = {torch.float32: ("fp32", ("ieee", "tf32")), torch.float16: ("fp16", ("ieee",)),
              torch.bfloat16: ("bf16", ("ieee",))}
    jobs = {}
    for dtype, (elem, precisions) in dtypes.items():
        for f in FEATURES:
            for name, cfg in K.kernel_configs(f, INPUT_DIM, dtype).items():
                for fmap in FEATURE_MAPS:
                    for precision in precisions:
                        for cap in SHARED_LIMIT:
                            key = json.dumps([name, fmap, elem, precision, cap, cfg], sort_keys=True)
                            jobs.setdefault(key, dict(kernel=name, fmap=fmap, dtype=elem, precision=precision,
                                                      sm=cap, cfg=cfg, F=[]))["F"].append(f)
    return list(jobs.values())


def _compile(job):
    from clipfast.triton_kernels import schur_covariance as K

    fn = {"gram": K._feature_gram_kernel, "grad": K._feature_grad_kernel}[job["kernel"]]
    cfg = job["cfg"]
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    options = {k: cfg[k] for k in ("num_warps", "num_stages")}
    constexprs = dict(blocks, FEATURE_MAP=FEATURE_MAPS.index(job["fmap"]), INPUT_PRECISION=job["precision"],
                      **{s: 1 for s in UNIT_STRIDES})
    sig = _signature(fn, job["dtype"], constexprs)
    usage = triton_aot_compile(fn, sig, constexprs, DIVISIBLE_INTS, job["sm"], options)
    return dict(kernel=job["kernel"], fmap=job["fmap"], dtype=job["dtype"], precision=job["precision"],
                sm=job["sm"], F=job["F"], config=" ".join(f"{k}={v}" for k, v in cfg.items()),
                **usage)




@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    rows = run_triton_aot_worker(__file__)
    assert {(r["kernel"], r["fmap"]) for r in rows} == {(k, f) for k in ("gram", "grad") for f in FEATURE_MAPS}

    header = (f"{'kernel':6} {'map':14} {'dtype':5} {'prec':4} {'sm':2} {'F':14} {'REG':>3} {'STACK':>5} "
              f"{'SHARED':>6}  config")
    print("\n" + header)
    for r in rows:
        print(f"{r['kernel']:6} {r['fmap']:14} {r['dtype']:5} {r['precision']:4} {r['sm']:2} "
              f"{','.join(map(str, r['F'])):14} {r['reg']:3} {r['stack']:5} {r['shared']:6}  {r['config']}")

    assert_triton_compile_clean(rows)


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile)
