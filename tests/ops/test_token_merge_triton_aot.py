"""Ahead-of-time compilation of the Triton token_merge kernels for sm_80 and sm_90, no GPU needed.

Compiles ``_best_partner_kernel``, ``_dest_kernel``, ``_sources_kernel``, ``_reduce_kernel`` (with and without
sizes) and ``_reduce_backward_kernel`` (with and without sizes) with the exact launch configurations
``kernel_configs`` picks for ViT-B/16 (N = 197, a 64-wide head's keys as the metric, D = 768) and ViT-L/14 at
336 px (N = 577, 64, 1024), fp32 and bf16 tokens and metrics, and asserts, from ``cuobjdump
--dump-resource-usage`` on the cubin, that nothing spills (STACK and LOCAL are 0) and that the shared memory
fits the architecture, and, from the PTX, that the partner kernel's ``tl.dot`` runs on tensor cores for bf16
(``mma.sync`` on sm_80, ``wgmma`` on sm_90) and on FMA units for fp32 at the default "ieee" precision, and that
the other kernels have no matrix instruction.

Arguments are specialised as the JIT does for contiguous inputs: unit column strides become constexpr 1,
pointers and D carry 16-divisibility. The compilation runs in a subprocess (see
:mod:`clipfast.testing.triton_aot`). Run with ``-s`` to see the REG/STACK/SHARED table.
"""

import pytest

from clipfast.testing.triton_aot import (SM_TARGETS, assert_triton_compile_clean, nvidia_backend_available,
                                         run_triton_aot_worker, triton_aot_compile, triton_aot_worker_main)

SHAPES = ((197, 64, 768), (577, 64, 1024))  # (N, C, D)
DTYPES = ("fp32", "bf16")
KERNELS = ("partner", "dest", "sources", "reduce", "backward")
ONES = ("stride_mc", "stride_xd", "stride_gd", "stride_dn", "stride_sn")
DIVISIBLE_INTS = ("D",)
TOKEN_POINTERS = ("metric_ptr", "x_ptr", "merged_ptr", "grad_ptr", "grad_x_ptr")
INDEX_POINTERS = ("dest_ptr", "offsets_ptr", "sources_ptr")


def _jobs():
    """(N, job) for every kernel, variant, dtype and sm."""
    from clipfast.triton_kernels import token_merge as K

    for elem in DTYPES:
        for n, channels, dim in SHAPES:
            for name, cfg in K.kernel_configs(n, channels, dim).items():
                if name in ("dest", "sources") and elem != "fp32":
                    continue  # no token or metric operand
                for variant in {"reduce": ("HAS_SIZE=0", "HAS_SIZE=1"), "backward": ("HAS_SIZE=0", "HAS_SIZE=1")}.get(
                        name, ("-",)):
                    for sm in SM_TARGETS:
                        yield n, dict(kernel=name, variant=variant, dtype=elem, sm=sm, cfg=cfg)


def _compile(job):
    from clipfast.triton_kernels import token_merge as K

    fn = {"partner": K._best_partner_kernel, "dest": K._dest_kernel, "sources": K._sources_kernel,
          "reduce": K._reduce_kernel, "backward": K._reduce_backward_kernel}[job["kernel"]]
    arg_types = {**{p: "*" + job["dtype"] for p in TOKEN_POINTERS}, **{p: "*i64" for p in INDEX_POINTERS},
                 "partner_ptr": "*i32", "eps": "fp32"}
    constexprs = {}
    if job["kernel"] == "partner":
        constexprs["INPUT_PRECISION"] = "ieee"
    if job["variant"] != "-":
        name, value = job["variant"].split("=")
        constexprs[name] = bool(int(value))
    return triton_aot_compile(fn, job["sm"], job["cfg"], constexprs, arg_types, ONES, DIVISIBLE_INTS)


@pytest.mark.slow
@pytest.mark.skipif(not nvidia_backend_available(), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    rows = run_triton_aot_worker(__file__, ("kernel", "variant", "dtype", "sm", "N"))
    assert {r["kernel"] for r in rows} == set(KERNELS)
    assert {(r["dtype"], r["sm"]) for r in rows if r["kernel"] == "partner"} == \
        {(e, sm) for e in DTYPES for sm in SM_TARGETS}
    for name in KERNELS:
        assert {n for r in rows if r["kernel"] == name for n in r["N"]} == {n for n, _, _ in SHAPES}
    assert_triton_compile_clean(rows, tensor_cores=lambda r: r["kernel"] == "partner" and r["dtype"] == "bf16")


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile, sizes_field="N")
