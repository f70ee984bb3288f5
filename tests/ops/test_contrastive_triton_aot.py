"""Ahead-of-time compilation of the Triton contrastive kernels for sm_80 and sm_90, no GPU needed.

Compiles both kernels (SIGMOID False/True) in every dtype path (fp32 with "ieee" and with "tf32", fp16,
bf16) with the exact block sizes ``kernel_configs`` picks for D in {512, 768, 1152, 1280} (values of width
E = D), and for teacher / student pairs whose value width E differs from D, and asserts, from
``cuobjdump --dump-resource-usage`` on the cubin, that nothing spills (STACK and LOCAL are 0) and that the
shared memory fits the architecture (163 KB on sm_80, 227 KB on sm_90), and, from the PTX, that the 16-bit
and tf32 paths multiply on tensor cores (``mma.sync`` on sm_80, ``wgmma`` on sm_90) while exact fp32
("ieee") stays on FMA units. Configurations that are identical for several (D, E) compile once.

Arguments are specialised as the JIT does for contiguous inputs with D % 16 == 0 and E % 16 == 0: unit
feature strides become constexpr 1, and pointers, D, E and the row strides carry 16-divisibility (N and M
get no hint, as for ragged batches). Every flag combination the launchers use is compiled (softmax: both
terms, row term only, column term only; sigmoid with and without the row sum).

The compilation runs in a subprocess (see :mod:`clipfast.testing.triton_aot`). Run with ``-s`` to see the
REG/STACK/SHARED table.
"""

import pytest

from clipfast.testing.triton_aot import (DOT_PATHS, SM_TARGETS, assert_triton_compile_clean,
                                         nvidia_backend_available, run_triton_aot_worker, triton_aot_compile,
                                         triton_aot_worker_main)

FEATURE_DIMS = (512, 768, 1152, 1280)
# (D, E) teacher / student pairs for distillation, where the softmax gradient contracts G (from width-D
# features) with values of width E: ViT-B / ViT-S widths (BLOCK_D as at E = D, so it compiles once with D = 768)
# and narrow students, whose smaller BLOCK_D under the full BLOCK_K is where sm_80 spilled before kernel_configs
# avoided it (see its docstring). Only the softmax ("lse:") gradient launches take values, and the row
# reduction does not depend on E.
VALUE_SHAPES = ((768, 384), (1280, 64), (1024, 16))
# Every flag combination the launchers launch, by a short label: 'lse'/'sig' for the mode, then r/c (the
# softmax terms) or s (the sigmoid row sum).
FLAGS = {
    "row_reduce": {"lse": dict(SIGMOID=False), "sig": dict(SIGMOID=True)},
    "grad": {"lse:rc": dict(SIGMOID=False, ROW_TERM=True, COL_TERM=True, WRITE_ROW_SUM=False),
             "lse:r": dict(SIGMOID=False, ROW_TERM=True, COL_TERM=False, WRITE_ROW_SUM=False),
             "lse:c": dict(SIGMOID=False, ROW_TERM=False, COL_TERM=True, WRITE_ROW_SUM=False),
             "sig:s": dict(SIGMOID=True, ROW_TERM=False, COL_TERM=False, WRITE_ROW_SUM=True),
             "sig": dict(SIGMOID=True, ROW_TERM=False, COL_TERM=False, WRITE_ROW_SUM=False)},
}
# Launch-time specialisation of contiguous (rows, D) features and (rows, E) values and gradients: feature
# strides equal 1.
UNIT_STRIDES = ("stride_xd", "stride_yd", "stride_ve", "stride_ge")
DIVISIBLE_INTS = ("D", "E", "stride_xn", "stride_yn", "stride_vn", "stride_gn")


def _jobs():
    """("DxE", job) for every kernel, flag combination, dtype path and sm."""
    from clipfast.triton_kernels import contrastive as K

    for path, dot in DOT_PATHS.items():
        for d, e in tuple((d, d) for d in FEATURE_DIMS) + VALUE_SHAPES:
            for name, cfg in K.kernel_configs(d, dot.dtype, dot.precision, E=e).items():
                for flags in FLAGS[name]:
                    if (d, e) in VALUE_SHAPES and not flags.startswith("lse:"):
                        continue
                    for sm in SM_TARGETS:
                        yield f"{d}x{e}", dict(kernel=name, flags=flags, path=path, sm=sm, cfg=cfg)


def _compile(job):
    from clipfast.triton_kernels import contrastive as K

    fn = {"row_reduce": K._contrastive_row_reduce_kernel, "grad": K._contrastive_grad_kernel}[job["kernel"]]
    dot = DOT_PATHS[job["path"]]
    arg_types = {"x_ptr": "*" + dot.element, "y_ptr": "*" + dot.element, "v_ptr": "*" + dot.element,
                 "row_weight": "fp32", "col_weight": "fp32"}
    constexprs = dict(FLAGS[job["kernel"]][job["flags"]], INPUT_PRECISION=dot.precision)
    return triton_aot_compile(fn, job["sm"], job["cfg"], constexprs, arg_types, UNIT_STRIDES, DIVISIBLE_INTS)


@pytest.mark.slow
@pytest.mark.skipif(not nvidia_backend_available(), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    rows = run_triton_aot_worker(__file__, ("kernel", "flags", "path", "sm", "DxE"))
    assert {(r["kernel"], r["flags"], r["path"], r["sm"]) for r in rows} == {
        (k, f, p, sm) for k, flags in FLAGS.items() for f in flags for p in DOT_PATHS for sm in SM_TARGETS}
    assert_triton_compile_clean(rows, tensor_cores=lambda r: r["path"] != "fp32-ieee")


if __name__ == "__main__":
    triton_aot_worker_main(_jobs(), _compile, sizes_field="DxE")
