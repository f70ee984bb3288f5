"""Ahead-of-time compilation of the Triton token_keep kernels for sm_80 and sm_90, no GPU needed.

Compiles ``_keep_index_kernel`` (block 1 and 2), ``_gather_rows_kernel``, ``_gather_fused_kernel`` and
``_gather_backward_kernel`` (with and without fusion) with the exact launch configurations
``kernel_configs`` picks for ViT rows of L in {196, 576} patches (14 x 14 and 24 x 24 grids), D = 768,
fp32 and bf16 tokens (the scores and fusion weights are fp32 for both), and asserts, from ``cuobjdump
--dump-resource-usage`` on the cubin, that nothing spills (STACK and LOCAL are 0) and that the shared memory
fits the architecture (163 KB on sm_80, 227 KB on sm_90), and, from the PTX, that no kernel has a matrix
instruction (they select and move tokens: no ``tl.dot``). Configurations that are identical for several L
(or dtypes: the index kernel reads fp32 scores only) compile once.

Arguments are specialised as the JIT does for contiguous inputs with D % 16 == 0 and one prefix token (CLIP's
[CLS]): the unit column strides and P become constexpr 1, pointers, D and the token / gradient row and batch
strides carry 16-divisibility (L, K, the grid width and the score / index strides get no hint, as for ragged
sizes).

The compilation runs in a subprocess (see :mod:`clipfast.testing.triton_aot`). Run with ``-s`` to see the
REG/STACK/SHARED table.
"""

import pytest

from clipfast.testing.triton_aot import (SM_TARGETS, assert_triton_compile_clean, nvidia_backend_available,
                                         run_triton_aot_worker, triton_aot_compile, triton_aot_worker_main)

PATCHES = (196, 576)
WIDTH = 768
BLOCKS = (1, 2)
TOKEN_DTYPES = ("fp32", "bf16")
KERNELS = ("index", "gather", "fused", "backward")
# Arguments the JIT turns into constexpr 1 for contiguous inputs with one prefix token.
ONES = ("stride_sl", "stride_td", "stride_kk", "stride_wl", "stride_gd", "P")
DIVISIBLE_INTS = ("D", "stride_tb", "stride_tn", "stride_gb", "stride_gn")
TOKEN_POINTERS = ("tokens_ptr", "grad_ptr", "grad_tokens_ptr")


def _jobs():
    """(L, job) for every kernel, variant, token dtype and sm."""
    from clipfast.triton_kernels import token_keep as K

    for elem in TOKEN_DTYPES:
        for length in PATCHES:
            for block in BLOCKS:
                for name, cfg in K.kernel_configs(length, WIDTH, block).items():
                    variants = {"index": (f"SIDE={block}",), "backward": ("FUSE=0", "FUSE=1")}.get(name, ("-",))
                    for variant in variants:
                        for sm in SM_TARGETS:
                            yield length, dict(kernel=name, variant=variant, dtype="fp32" if name == "index" else elem,
                                               sm=sm, cfg=cfg)


def _compile(job):
    from clipfast.triton_kernels import token_keep as K

    fn = {"index": K._keep_index_kernel, "gather": K._gather_rows_kernel, "fused": K._gather_fused_kernel,
          "backward": K._gather_backward_kernel}[job["kernel"]]
    tokens = "*" + job["dtype"]
    # out_ptr holds the kept indices for the index kernel, the gathered tokens for the others.
    arg_types = {**{p: tokens for p in TOKEN_POINTERS}, "keep_ptr": "*i64",
                 "out_ptr": "*i64" if job["kernel"] == "index" else tokens}
    constexprs = {}
    if job["variant"] != "-":
        name, value = job["variant"].split("=")
        constexprs[name] = int(value)
    return triton_aot_compile(fn, job["sm"], job["cfg"], constexprs, arg_types, ONES, DIVISIBLE_INTS)


@pytest.mark.slow
@pytest.mark.skipif(not nvidia_backend_available(), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    rows = run_triton_aot_worker(__file__, ("kernel", "variant", "dtype", "sm", "L"))
    assert {r["kernel"] for r in rows} == set(KERNELS)
    assert {r["variant"] for r in rows if r["kernel"] == "index"} == {f"SIDE={b}" for b in BLOCKS}
    assert {r["variant"] for r in rows if r["kernel"] == "backward"} == {"FUSE=0", "FUSE=1"}
    assert {(r["dtype"], r["sm"]) for r in rows if r["kernel"] != "index"} == \
        {(e, sm) for e in TOKEN_DTYPES for sm in SM_TARGETS}
    for name in KERNELS:
        assert {n for r in rows if r["kernel"] == name for n in r["L"]} == set(PATCHES)
    assert_triton_compile_clean(rows, tensor_cores=lambda r: False)


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile, sizes_field="L")
