"""Ahead-of-time compilation of the Triton contrastive kernels for sm_80 and sm_90, no GPU needed.

Compiles both kernels (SIGMOID False/True; fp32 with "ieee" and "tf32", fp16, bf16) with the
exact block sizes ``kernel_configs`` picks for D in {512, 768, 1152, 1280} and asserts, from
``cuobjdump --dump-resource-usage`` on the cubin, that nothing spills (STACK and LOCAL are 0)
and that the shared memory fits the architecture (163 KB on sm_80, 227 KB on sm_90), and, from
the PTX, that the 16-bit and tf32 paths multiply on tensor cores (``mma.sync`` on sm_80,
``wgmma`` on sm_90) while exact fp32 ("ieee") stays on FMA units.

Arguments are specialised as the JIT does for contiguous inputs with D % 16 == 0: unit
feature strides become constexpr 1, and pointers, D and the row strides carry 16-divisibility
(N and M get no hint, as for ragged batches). Every flag combination the launchers use is
compiled (softmax: both terms, row term only, column term only; sigmoid with and without the
row sum).

The compilation runs in a subprocess because pytest's process may have TRITON_INTERPRET=1
set, under which ``@triton.jit`` yields interpreter objects that cannot be compiled. Run
with ``-s`` to see the REG/STACK/SHARED table.
"""

import json
import os

import pytest

try:
    import triton  # noqa: F401  (only the gate: the compilation runs in clipfast.testing)
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from clipfast.testing import TRITON_SHARED_MEMORY_LIMIT as SHARED_LIMIT  # noqa: E402
from clipfast.testing import (assert_triton_compile_clean, expected_matrix_instruction,  # noqa: E402
                              run_triton_aot_worker, triton_aot_compile, triton_cuobjdump)

CUOBJDUMP = triton_cuobjdump()
FEATURE_DIMS = (512, 768, 1152, 1280)
# Launch-time specialisation of a contiguous (rows, D) input: feature strides equal 1.
UNIT_STRIDES = ("stride_xd", "stride_yd", "stride_gd")
DIVISIBLE_INTS = ("D", "stride_xn", "stride_yn", "stride_gn")


def _variants(kernel_name):
    """Every flag combination the launchers can launch."""
    if kernel_name == "row_reduce":
        return [{"SIGMOID": False}, {"SIGMOID": True}]
    softmax = [{"SIGMOID": False, "ROW_TERM": r, "COL_TERM": c, "WRITE_ROW_SUM": False}
               for r, c in ((True, True), (True, False), (False, True))]
    sigmoid = [{"SIGMOID": True, "ROW_TERM": False, "COL_TERM": False, "WRITE_ROW_SUM": w} for w in (True, False)]
    return softmax + sigmoid


def _label(flags):
    """Short flag label: 'lse'/'sig' for the mode, then r/c (softmax terms) or s (row sum)."""
    mode = "sig" if flags["SIGMOID"] else "lse"
    extra = "".join(ch for ch, key in (("r", "ROW_TERM"), ("c", "COL_TERM"), ("s", "WRITE_ROW_SUM")) if flags.get(key))
    return f"{mode}:{extra}" if extra else mode


def _signature(fn, elem, constexprs):
    sig = {}
    for p in fn.params:
        if p.is_constexpr or p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name in ("x_ptr", "y_ptr"):
            sig[p.name] = "*" + elem
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32"
        elif p.name.endswith("_weight"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def _worker():
    """Compile every distinct configuration; print one JSON list on stdout."""
    import torch

    from clipfast.triton_kernels import contrastive as K

    kernels = {"row_reduce": K._contrastive_row_reduce_kernel, "grad": K._contrastive_grad_kernel}
    dtypes = {torch.float32: ("fp32", ("ieee", "tf32")), torch.float16: ("fp16", ("ieee",)),
              torch.bfloat16: ("bf16", ("ieee",))}
    results = {}
    for dtype, (elem, precisions) in dtypes.items():
        for d in FEATURE_DIMS:
            for precision in precisions:
                for name, cfg in K.kernel_configs(d, dtype, precision).items():
                    fn = kernels[name]
                    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
                    options = {k: cfg[k] for k in ("num_warps", "num_stages")}
                    for flags in _variants(name):
                        for cap in SHARED_LIMIT:
                            key = json.dumps([name, elem, precision, flags, cap, cfg], sort_keys=True)
                            if key in results:  # identical constexprs: same binary for another D
                                results[key]["D"].append(d)
                                continue
                            constexprs = dict(flags, **blocks, INPUT_PRECISION=precision,
                                              **{s: 1 for s in UNIT_STRIDES if s in fn.arg_names})
                            sig = _signature(fn, elem, constexprs)
                            results[key] = dict(kernel=name, dtype=elem, precision=precision,
                                                flags=_label(flags), sm=cap, D=[d],
                                                config=" ".join(f"{k}={v}" for k, v in cfg.items()),
                                                **triton_aot_compile(fn, sig, constexprs, DIVISIBLE_INTS, cap,
                                                                     options))
    print(json.dumps(list(results.values())))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_without_spills_for_sm80_sm90():
    rows = run_triton_aot_worker(__file__)

    header = (f"{'kernel':10} {'dtype':5} {'prec':4} {'flags':6} {'sm':2} {'D':19} {'MMA':5} {'REG':>3} "
              f"{'STACK':>5} {'SHARED':>6}  config")
    print("\n" + header)
    for r in rows:
        print(f"{r['kernel']:10} {r['dtype']:5} {r['precision']:4} {r['flags']:6} {r['sm']:2} "
              f"{','.join(map(str, r['D'])):19} {r['kind']:5} {r['reg']:3} {r['stack']:5} {r['shared']:6}  "
              f"{r['config']}")

    assert_triton_compile_clean(rows)
    wrong = [r for r in rows if r["kind"] != expected_matrix_instruction(
        r["sm"], tensor_cores=(r["dtype"], r["precision"]) != ("fp32", "ieee"))]
    assert not wrong, f"kernels not on the expected matrix instructions: {wrong}"


if __name__ == "__main__":
    _worker()
