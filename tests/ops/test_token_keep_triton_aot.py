"""Ahead-of-time compilation of the Triton token_keep kernels for sm_80 and sm_90, no GPU needed.

Compiles ``_keep_index_kernel`` (block 1 and 2), ``_gather_rows_kernel``, ``_gather_fused_kernel`` and
``_gather_backward_kernel`` (with and without fusion) with the exact launch configurations
``kernel_configs`` picks for ViT rows of L in {196, 576} patches (14 x 14 and 24 x 24 grids), D = 768,
fp32 and bf16 tokens (the scores and fusion weights are fp32 for both), and asserts, from ``cuobjdump
--dump-resource-usage`` on the cubin, that nothing spills (STACK and LOCAL are 0) and that the shared memory
fits the architecture (163 KB on sm_80, 227 KB on sm_90). Configurations that are identical for several L
(or dtypes: the index kernel reads fp32 scores only) compile once.

Arguments are specialised as the JIT does for contiguous inputs with D % 16 == 0 and one prefix token (CLIP's
[CLS]): the unit column strides and P become constexpr 1, pointers, D and the token / gradient row and batch
strides carry 16-divisibility (L, K, the grid width and the score / index strides get no hint, as for ragged
sizes).

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
PATCHES = (196, 576)
WIDTH = 768
BLOCKS = (1, 2)
KERNELS = ("index", "gather", "fused", "backward")
# Arguments the JIT turns into constexpr 1 for contiguous inputs with one prefix token.
ONES = ("stride_sl", "stride_td", "stride_kk", "stride_wl", "stride_gd", "P")
DIVISIBLE_INTS = ("D", "stride_tb", "stride_tn", "stride_gb", "stride_gn")
TOKEN_POINTERS = ("tokens_ptr", "grad_ptr", "grad_tokens_ptr")


def _signature(fn, kernel, elem, constexprs):
    sig = {}
    for p in fn.params:
        if p.is_constexpr or p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name in TOKEN_POINTERS or (p.name == "out_ptr" and kernel != "index"):
            sig[p.name] = "*" + elem
        elif p.name in ("keep_ptr", "out_ptr"):
            sig[p.name] = "*i64"
        elif p.name.endswith("_ptr"):  # scores, fusion weights and their gradient
            sig[p.name] = "*fp32"
        else:
            sig[p.name] = "i32"
    return sig


def _jobs():
    """One job per distinct (kernel, variant, dtype, sm, config); L values merged."""
    import torch

    from clipfast.triton_kernels import token_keep as K

    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    jobs = {}
    for elem in dtypes.values():
        for length in PATCHES:
            for block in BLOCKS:
                for name, cfg in K.kernel_configs(length, WIDTH, block).items():
                    variants = {"index": (f"SIDE={block}",), "backward": ("FUSE=0", "FUSE=1")}.get(name, ("-",))
                    for variant in variants:
                        job_elem = "fp32" if name == "index" else elem
                        for cap in SHARED_LIMIT:
                            key = json.dumps([name, variant, job_elem, cap, cfg], sort_keys=True)
                            merged = jobs.setdefault(key, dict(kernel=name, variant=variant, dtype=job_elem, sm=cap,
                                                               cfg=cfg, L=[]))["L"]
                            if length not in merged:
                                merged.append(length)
    return list(jobs.values())


def _compile(job):
    from clipfast.triton_kernels import token_keep as K

    cfg = job["cfg"]
    fn = {"index": K._keep_index_kernel, "gather": K._gather_rows_kernel, "fused": K._gather_fused_kernel,
          "backward": K._gather_backward_kernel}[job["kernel"]]
    options = {k: cfg[k] for k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    if job["variant"] != "-":
        name, value = job["variant"].split("=")
        constexprs[name] = int(value)
    constexprs.update({s: 1 for s in ONES if s in fn.arg_names})
    sig = _signature(fn, job["kernel"], job["dtype"], constexprs)
    usage = triton_aot_compile(fn, sig, constexprs, DIVISIBLE_INTS, job["sm"], options)
    return dict(kernel=job["kernel"], variant=job["variant"], dtype=job["dtype"], sm=job["sm"], L=job["L"],
                config=" ".join(f"{k}={v}" for k, v in cfg.items()), **usage)




@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    rows = run_triton_aot_worker(__file__)
    assert {r["kernel"] for r in rows} == set(KERNELS)
    assert {r["variant"] for r in rows if r["kernel"] == "index"} == {f"SIDE={b}" for b in BLOCKS}
    assert {r["variant"] for r in rows if r["kernel"] == "backward"} == {"FUSE=0", "FUSE=1"}
    assert {(r["dtype"], r["sm"]) for r in rows if r["kernel"] != "index"} == \
        {(e, sm) for e in ("fp32", "bf16") for sm in SHARED_LIMIT}
    for name in KERNELS:
        assert {n for r in rows if r["kernel"] == name for n in r["L"]} == set(PATCHES)

    header = f"{'kernel':8} {'variant':7} {'dtype':5} {'sm':2} {'L':8} {'REG':>3} {'STACK':>5} {'SHARED':>6}  config"
    print("\n" + header)
    for r in rows:
        print(f"{r['kernel']:8} {r['variant']:7} {r['dtype']:5} {r['sm']:2} {','.join(map(str, r['L'])):8} "
              f"{r['reg']:3} {r['stack']:5} {r['shared']:6}  {r['config']}")

    assert_triton_compile_clean(rows)


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile)
