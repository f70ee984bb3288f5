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
# (name, torch dtype name, triton element type, fp32 dot precision); tensor cores on all but fp32-ieee.
DTYPE_PATHS = (("fp32-ieee", "float32", "fp32", "ieee"), ("fp32-tf32", "float32", "fp32", "tf32"),
               ("fp16", "float16", "fp16", "ieee"), ("bf16", "bfloat16", "bf16", "ieee"))
PASSES = ("diagonal", "upper")
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
    """One job per distinct (kernel, metric, pass, dtype path, sm, config); N values merged."""
    import torch

    from clipfast.triton_kernels import token_medoids as K

    jobs = {}
    for path, dtype, elem, precision in DTYPE_PATHS:
        for n in TOKENS:
            cfgs = K.kernel_configs(n, WIDTH, getattr(torch, dtype), precision)
            for name, cfg in cfgs.items():
                variants = [(m, p) for m in METRICS for p in PASSES] if name == "distance" else [("-", "-")]
                for metric, tile_pass in variants:
                    job_path = path if name == "distance" else "fp32"
                    job_elem = elem if name == "distance" else "fp32"
                    for cap in SHARED_LIMIT:
                        key = json.dumps([name, metric, tile_pass, job_path, cap, cfg], sort_keys=True)
                        merged = jobs.setdefault(key, dict(kernel=name, metric=metric, tile_pass=tile_pass,
                                                           path=job_path, dtype=job_elem, precision=precision,
                                                           sm=cap, cfg=cfg, N=[]))["N"]
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
        constexprs = dict(blocks, METRIC=METRICS.index(job["metric"]), DIAGONAL=job["tile_pass"] == "diagonal",
                          CENTRE=job["metric"] == "euclidean" and job["dtype"] == "fp32",
                          INPUT_PRECISION=job["precision"], **{s: 1 for s in UNIT_STRIDES})
    else:
        fn = K._medoids_kernel
        constexprs = dict(blocks)
    sig = _signature(fn, job["dtype"], constexprs)
    usage = triton_aot_compile(fn, sig, constexprs, DIVISIBLE_INTS, job["sm"], options)
    return dict(kernel=job["kernel"], metric=job["metric"], tile_pass=job["tile_pass"], path=job["path"],
                sm=job["sm"], N=job["N"], config=" ".join(f"{k}={v}" for k, v in cfg.items()), **usage)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    from clipfast.testing import expected_matrix_instruction

    rows = run_triton_aot_worker(__file__)
    assert {(r["kernel"], r["metric"], r["tile_pass"], r["path"], r["sm"]) for r in rows} == {
        ("distance", m, p, path[0], sm) for m in METRICS for p in PASSES for path in DTYPE_PATHS
        for sm in SHARED_LIMIT} | {("medoids", "-", "-", "fp32", sm) for sm in SHARED_LIMIT}
    assert {n for r in rows if r["kernel"] == "medoids" for n in r["N"]} == set(TOKENS)

    header = (f"{'kernel':8} {'metric':9} {'pass':8} {'path':9} {'sm':2} {'N':16} {'kind':5} {'REG':>3} "
              f"{'STACK':>5} {'SHARED':>6}  config")
    print("\n" + header)
    for r in rows:
        print(f"{r['kernel']:8} {r['metric']:9} {r['tile_pass']:8} {r['path']:9} {r['sm']:2} "
              f"{','.join(map(str, r['N'])):16} {r['kind']:5} {r['reg']:3} {r['stack']:5} {r['shared']:6}  "
              f"{r['config']}")

    assert_triton_compile_clean(rows)
    wrong = [(r["kernel"], r["metric"], r["tile_pass"], r["path"], r["sm"], r["kind"]) for r in rows
             if r["kind"] != expected_matrix_instruction(
                 r["sm"], tensor_cores=r["kernel"] == "distance" and r["path"] != "fp32-ieee")]
    assert not wrong, f"tl.dot not on the expected instructions (mma on sm_80, wgmma on sm_90, fma for ieee): {wrong}"


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile)
