"""Ahead-of-time compilation checks of Triton kernels for sm_80 and sm_90, no GPU needed (DESIGN.md section 8).

An AOT test file lists its op's kernels, launch configurations and argument types; this module compiles them
with ``triton.compile`` as the JIT would specialise a launch on contiguous, 16-aligned inputs, reads the
matrix instructions from the PTX and the resources from the cubin (``cuobjdump --dump-resource-usage``), and
asserts no register spills (STACK and LOCAL are 0), shared memory within the architecture's limit and the
instruction kind of every path (tensor cores: ``mma.sync`` on sm_80, ``wgmma`` on sm_90; ``fma`` otherwise).

The compilation runs in a subprocess, the test file run as a script: pytest's process may have
``TRITON_INTERPRET=1`` set, under which ``@triton.jit`` yields interpreter objects that cannot be compiled.
The file's ``__main__`` calls :func:`triton_aot_worker_main`; its test calls :func:`run_triton_aot_worker`
(which prints the table of results: run pytest with ``-s`` to see it) and :func:`assert_triton_compile_clean`.

triton is imported inside the functions, so that this module imports where triton is missing and the tests
can skip (:func:`nvidia_backend_available`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, NamedTuple

import torch

# Shared memory per block, in bytes, of each architecture compiled for.
TRITON_SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SM_TARGETS = tuple(TRITON_SHARED_MEMORY_LIMIT)


class DotPath(NamedTuple):
    """How a kernel's ``tl.dot`` runs: on inputs of ``dtype`` (Triton element type ``element``), fp32 with
    ``INPUT_PRECISION`` = ``precision``."""

    dtype: torch.dtype
    element: str
    precision: str


# Every dtype path of a kernel with ``tl.dot``, by name; all but "fp32-ieee" (exact fp32, PyTorch's "highest"
# float32 matmul precision) run on tensor cores.
DOT_PATHS = {"fp32-ieee": DotPath(torch.float32, "fp32", "ieee"), "fp32-tf32": DotPath(torch.float32, "fp32", "tf32"),
             "fp16": DotPath(torch.float16, "fp16", "ieee"), "bf16": DotPath(torch.bfloat16, "bf16", "ieee")}

# The columns of every results table, after the test's own.
_RESULT_COLUMNS = ("kind", "reg", "stack", "shared", "cfg")


def triton_cuobjdump() -> str:
    """The cuobjdump that ships with triton's NVIDIA backend."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def nvidia_backend_available() -> bool:
    """Whether triton and its NVIDIA backend (with cuobjdump) are installed: what AOT compilation needs."""
    try:
        return os.path.exists(triton_cuobjdump())
    except ImportError:
        return False


def cubin_resource_usage(cubin: bytes) -> dict:
    """``{"reg", "stack", "static_shared", "local"}`` of a compiled kernel, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert usage, f"unexpected cuobjdump output:\n{out}"
    return dict(zip(("reg", "stack", "static_shared", "local"), map(int, usage.groups())))


def kernel_signature(fn, constexprs: dict, arg_types: dict) -> dict:
    """Triton's signature of ``fn``: "constexpr" for its constexpr parameters and those named in ``constexprs``,
    ``arg_types[name]`` where given, else "*fp32" for a pointer (a name ending in ``_ptr``) and "i32"."""
    def arg_type(name):
        return arg_types.get(name, "*fp32" if name.endswith("_ptr") else "i32")

    return {p.name: "constexpr" if p.is_constexpr or p.name in constexprs else arg_type(p.name) for p in fn.params}


def triton_aot_compile(fn, sm: int, launch_config: dict, constexprs: dict, arg_types: dict,
                       unit_ints: Iterable[str] = (), divisible_ints: Iterable[str] = ()) -> dict:
    """Compile one Triton kernel for ``sm`` without a GPU, specialised as the JIT specialises a launch on
    contiguous, 16-aligned inputs.

    ``launch_config``: what the op's ``kernel_configs`` picks for the kernel (``BLOCK_*`` constexprs,
    ``num_warps``, ``num_stages``). ``constexprs``: the other constexpr arguments (flags, ``INPUT_PRECISION``).
    ``arg_types``: argument types other than :func:`kernel_signature`'s defaults. ``unit_ints``: the integer
    arguments the JIT turns into constexpr 1 (unit strides), where ``fn`` takes them. ``divisible_ints``: the
    i32 arguments that carry 16-divisibility, as every pointer does.

    Returns the shared memory, the cubin's resource usage (:func:`cubin_resource_usage`) and ``kind``, the
    matrix instructions in the PTX (:func:`ptx_matrix_instruction`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not triton.knobs.runtime.interpret, "the AOT worker must run without TRITON_INTERPRET"
    constexprs = dict(constexprs, **{k: v for k, v in launch_config.items() if k.startswith("BLOCK_")},
                      **{name: 1 for name in unit_ints if name in fn.arg_names})
    sig = kernel_signature(fn, constexprs, arg_types)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items()
             if ty.startswith("*") or (ty == "i32" and n in divisible_ints)}
    options = {k: launch_config[k] for k in ("num_warps", "num_stages")}
    compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", sm, 32), options=options)
    return dict(shared=compiled.metadata.shared, kind=ptx_matrix_instruction(compiled.asm["ptx"]),
                **cubin_resource_usage(compiled.asm["cubin"]))


def ptx_matrix_instruction(ptx: str) -> str:
    """The matrix instructions in ``ptx``: ``"wgmma"`` (sm_90 warp-group MMA), ``"mma"`` (``mma.sync``,
    sm_80 style), ``"mma+wgmma"`` when both occur, or ``"fma"`` when neither does (dots on CUDA cores)."""
    kinds = [k for k, pattern in (("mma", r"\bmma\.sync\."), ("wgmma", r"\bwgmma\.mma_async\."))
             if re.search(pattern, ptx)]
    return "+".join(kinds) or "fma"


def expected_matrix_instruction(sm: int, tensor_cores: bool) -> str:
    """What a kernel whose every ``tl.dot`` runs on tensor cores (or none does) must show for ``sm``."""
    if not tensor_cores:
        return "fma"
    return "wgmma" if sm >= 90 else "mma"


def triton_aot_worker_main(jobs: Iterable[tuple], compile_job: Callable[[dict], dict], sizes_field: str) -> None:
    """The AOT worker's body. ``jobs`` yields ``(size, job)``: a problem size and a JSON-able job (kernel,
    variant, dtype path, ``sm``, ``cfg``: the launch configuration the op picks for that size). Jobs equal but
    for their size compile once, in a process pool, by ``compile_job(job)`` (which returns
    :func:`triton_aot_compile`'s result). Prints last one JSON list of rows, each a job with its sizes under
    ``sizes_field`` and its result: what :func:`run_triton_aot_worker` reads."""
    merged = {}
    for size, job in jobs:
        sizes = merged.setdefault(json.dumps(job, sort_keys=True), (job, []))[1]
        if size not in sizes:
            sizes.append(size)
    unique = list(merged.values())
    with ProcessPoolExecutor(max_workers=max(1, min(len(unique), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_job, [job for job, _ in unique]))
    print(json.dumps([dict(job, **{sizes_field: sizes}, **result) for (job, sizes), result in zip(unique, results)]))


def run_triton_aot_worker(script: str, columns: Iterable[str], timeout: float = 900) -> list:
    """Run ``script``'s AOT compile worker (``python script``: :func:`triton_aot_worker_main`) in a process
    without TRITON_INTERPRET, where ``@triton.jit`` yields compilable kernels, print its rows as a table (the
    ``columns`` that name a row, then the results) and return them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"AOT worker failed:\n{proc.stderr[-5000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows, "nothing was compiled"
    print("\n" + _table(rows, (*columns, *_RESULT_COLUMNS)))
    return rows


def _table(rows: list, columns: tuple) -> str:
    """``rows`` as aligned text: lists joined by commas, dicts (launch configurations) as ``key=value``."""
    def text(value):
        if isinstance(value, list):
            return ",".join(map(str, value))
        if isinstance(value, dict):
            return " ".join(f"{k}={v}" for k, v in value.items())
        return str(value)

    cells = [list(columns)] + [[text(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(" ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def assert_triton_compile_clean(rows: list, tensor_cores: Callable[[dict], bool]) -> None:
    """No register spills (STACK, LOCAL), shared memory within each architecture's limit, and each row's
    matrix instructions as :func:`expected_matrix_instruction` says for ``tensor_cores(row)``: whether every
    ``tl.dot`` of that row's kernel runs on tensor cores (``False`` for a kernel without ``tl.dot``)."""
    bad = [r for r in rows if r["stack"] or r["local"] or r["shared"] > TRITON_SHARED_MEMORY_LIMIT[r["sm"]]]
    assert not bad, f"register spills or shared memory over the limit: {bad}"
    wrong = [r for r in rows if r["kind"] != expected_matrix_instruction(r["sm"], tensor_cores(r))]
    assert not wrong, f"not on the expected matrix instructions (mma on sm_80, wgmma on sm_90, fma without): {wrong}"
