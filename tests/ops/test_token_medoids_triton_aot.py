"""Ahead-of-time compilation of the Triton token_medoids kernels for sm_80 and sm_90, no GPU needed.

Compiles ``_pairwise_distance_kernel`` (both metrics) and ``_medoids_kernel`` with the exact launch
configurations ``kernel_configs`` picks for N in {50, 147, 294, 1024} tokens, D = 768, fp32 and bf16 inputs,
and asserts, from ``cuobjdump --dump-resource-usage`` on the cubin, that nothing spills (STACK and LOCAL
are 0) and that the shared memory fits the architecture (163 KB on sm_80, 227 KB on sm_90).
Configurations that are identical for several N (or dtypes: the medoids kernel reads fp32 only) compile
once.

Arguments are specialised as the JIT does for contiguous inputs with D % 16 == 0: the unit column stride
becomes constexpr 1, pointers, D and the token / row strides carry 16-divisibility (N, K and the loop
bounds get no hint, as for ragged sizes).

The compilation runs in a subprocess because pytest's process may have TRITON_INTERPRET=1 set, under which
``@triton.jit`` yields interpreter objects that cannot be compiled. Run with ``-s`` to see the
REG/STACK/SHARED table.
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
TOKENS = (50, 147, 294, 1024)
WIDTH = 768
METRICS = ("euclidean", "cosine")
UNIT_STRIDES = ("stride_xd",)
DIVISIBLE_INTS = ("D", "stride_xn", "stride_xr")


def _signature(fn, elem, constexprs):
    sig = {}
    for p in fn.params:
        if p.is_constexpr or p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name == "x_ptr":
            sig[p.name] = "*" + elem
        elif p.name in ("med_ptr", "assign_ptr"):
            sig[p.name] = "*i64"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32"
        else:
            sig[p.name] = "i32"
    return sig


def _jobs():
    """One job per distinct (kernel, metric, dtype, sm, config); N values merged."""
    import torch

    from clipfast.triton_kernels import token_medoids as K

    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    jobs = {}
    for dtype, elem in dtypes.items():
        for n in TOKENS:
            cfgs = K.kernel_configs(n, WIDTH, dtype)
            for name, cfg in cfgs.items():
                for metric in METRICS if name == "distance" else ("-",):
                    job_elem = elem if name == "distance" else "fp32"
                    for cap in SHARED_LIMIT:
                        key = json.dumps([name, metric, job_elem, cap, cfg], sort_keys=True)
                        merged = jobs.setdefault(key, dict(kernel=name, metric=metric, dtype=job_elem, sm=cap,
                                                           cfg=cfg, N=[]))["N"]
                        if n not in merged:
                            merged.append(n)
    return list(jobs.values())


def _compile(job):
    from clipfast.triton_kernels import token_medoids as K

    cfg = job["cfg"]
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    options = {k: cfg[k] for k in ("num_warps", "num_stages")}
    if job["kernel"] == "distance":
        fn = K._pairwise_distance_kernel
        constexprs = dict(blocks, METRIC=METRICS.index(job["metric"]), **{s: 1 for s in UNIT_STRIDES})
    else:
        fn = K._medoids_kernel
        constexprs = dict(blocks)
    sig = _signature(fn, job["dtype"], constexprs)
    usage = triton_aot_compile(fn, sig, constexprs, DIVISIBLE_INTS, job["sm"], options)
    return dict(kernel=job["kernel"], metric=job["metric"], dtype=job["dtype"], sm=job["sm"], N=job["N"],
                config=" ".join(f"{k}={v}" for k, v in cfg.items()), **usage)




@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    rows = run_triton_aot_worker(__file__)
    assert {(r["kernel"], r["metric"]) for r in rows} == {("distance", m) for m in METRICS} | {("medoids", "-")}
    assert {n for r in rows if r["kernel"] == "medoids" for n in r["N"]} == set(TOKENS)

    header = f"{'kernel':8} {'metric':9} {'dtype':5} {'sm':2} {'N':16} {'REG':>3} {'STACK':>5} {'SHARED':>6}  config"
    print("\n" + header)
    for r in rows:
        print(f"{r['kernel']:8} {r['metric']:9} {r['dtype']:5} {r['sm']:2} {','.join(map(str, r['N'])):16} "
              f"{r['reg']:3} {r['stack']:5} {r['shared']:6}  {r['config']}")

    assert_triton_compile_clean(rows)


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile)
