"""Test helpers: the tolerance table and comparisons against the float64 reference.

Rules (DESIGN.md section 5):

- float64 and float32 kernels are compared with the reference run in float64 on the same inputs, with
  the tolerances of :data:`TOLERANCES`. Triton's fp32 path runs its dots with ``input_precision="ieee"``
  in tests, so fp32 tolerances apply to it too.
- bfloat16 / float16: the kernel's error against the float64 reference must be at most
  ``2 * error(plain PyTorch in the same dtype) + floor`` (flash-attention's rule): the tolerance scales
  with what the dtype can do on that problem.
"""

from __future__ import annotations

import torch

# (rtol, atol) per dtype and kind of quantity. Any looser value is an override in the test, with a reason.
TOLERANCES = {
    torch.float64: {"output": (1e-9, 1e-10), "grad": (1e-9, 1e-10)},
    torch.float32: {"output": (1e-5, 1e-5), "grad": (1e-4, 1e-5)},
}

# The explicit floor of the low-precision rule, relative to the reference's largest magnitude.
LOW_PRECISION_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


def assert_close_to_reference(actual: torch.Tensor, reference64: torch.Tensor, dtype: torch.dtype,
                              kind: str = "output", name: str = "value") -> None:
    """``actual`` (from inputs of ``dtype``) against the float64 reference, with :data:`TOLERANCES`."""
    rtol, atol = TOLERANCES[dtype][kind]
    torch.testing.assert_close(actual.to(torch.float64), reference64.to(torch.float64), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name} ({dtype}, {kind}): {m}")


def assert_within_low_precision_bound(actual: torch.Tensor, plain_same_dtype: torch.Tensor,
                                      reference64: torch.Tensor, dtype: torch.dtype, name: str = "value",
                                      floor: float | None = None) -> None:
    """``max|actual - ref64| <= 2 * max|plain - ref64| + floor * max|ref64|``; ``floor`` defaults to
    :data:`LOW_PRECISION_FLOOR` (kernel tests that round an intermediate to the input dtype, as tensor
    cores require, pass that dtype's epsilon and say so)."""
    ref = reference64.detach().cpu().to(torch.float64)
    error = (actual.detach().cpu().to(torch.float64) - ref).abs().max().item()
    plain_error = (plain_same_dtype.detach().cpu().to(torch.float64) - ref).abs().max().item()
    floor = LOW_PRECISION_FLOOR[dtype] if floor is None else floor
    bound = 2 * plain_error + floor * max(ref.abs().max().item(), 1e-30)
    assert error <= bound, (f"{name} ({dtype}): error {error:.3e} vs float64 exceeds 2 x PyTorch's "
                            f"{plain_error:.3e} + floor = {bound:.3e}")


def assert_close_relative(actual: torch.Tensor, reference: torch.Tensor, rtol: float, atol_rel: float) -> None:
    """assert_close in float64 on the CPU with ``atol = atol_rel * max|reference|`` (sums over many samples
    have no natural absolute scale)."""
    ref = reference.detach().cpu().double()
    atol = atol_rel * max(ref.abs().max().item(), 1e-30) if ref.numel() else 0.0
    torch.testing.assert_close(actual.detach().cpu().double(), ref, rtol=rtol, atol=atol)


# Ahead-of-time Triton compilation checks (no GPU needed): shared memory per block and cubin resources.
TRITON_SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def triton_cuobjdump() -> str:
    """The cuobjdump that ships with triton's NVIDIA backend."""
    import os

    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cubin_resource_usage(cubin: bytes) -> dict:
    """``{"reg", "stack", "static_shared", "local"}`` of a compiled kernel, from cuobjdump."""
    import re
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert usage, f"unexpected cuobjdump output:\n{out}"
    return dict(zip(("reg", "stack", "static_shared", "local"), map(int, usage.groups())))


def unit_features(n: int, d: int, *, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """Rows of unit norm (what CLIP towers emit), so logits lie in [-scale, scale]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1).to(device=device, dtype=dtype)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(worker, world_size: int, args: tuple = (), timeout: float = 180.0) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` fresh processes that share a gloo process
    group on 127.0.0.1 (a free port), and wait at most ``timeout`` seconds. The group is created before
    and destroyed after ``worker``. Any failure or the timeout raises here; processes are always
    terminated. ``worker`` must be importable by module name (spawned processes unpickle it)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_gloo_entry, args=(worker, world_size, free_port(), args), nprocs=world_size,
                                 join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} gloo processes did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def _gloo_entry(rank, worker, world_size, port, args):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def triton_aot_compile(fn, sig: dict, constexprs: dict, divisible_ints, sm: int, options: dict) -> dict:
    """Compile one Triton kernel for ``sm`` without a GPU, specialised as the JIT specialises contiguous,
    16-aligned inputs: every pointer and the i32 arguments named in ``divisible_ints`` carry 16-divisibility.
    Returns the shared memory, the cubin's resource usage (:func:`cubin_resource_usage`) and ``kind``, the
    matrix instructions in the PTX (:func:`ptx_matrix_instruction`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not triton.knobs.runtime.interpret, "the AOT worker must run without TRITON_INTERPRET"
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items()
             if ty.startswith("*") or (ty == "i32" and n in divisible_ints)}
    compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", sm, 32), options=options)
    return dict(shared=compiled.metadata.shared, kind=ptx_matrix_instruction(compiled.asm["ptx"]),
                **cubin_resource_usage(compiled.asm["cubin"]))


def ptx_matrix_instruction(ptx: str) -> str:
    """The matrix instructions in ``ptx``: ``"wgmma"`` (sm_90 warp-group MMA), ``"mma"`` (``mma.sync``,
    sm_80 style), ``"mma+wgmma"`` when both occur, or ``"fma"`` when neither does (dots on CUDA cores)."""
    import re

    kinds = [k for k, pattern in (("mma", r"\bmma\.sync\."), ("wgmma", r"\bwgmma\.mma_async\."))
             if re.search(pattern, ptx)]
    return "+".join(kinds) or "fma"


def expected_matrix_instruction(sm: int, tensor_cores: bool) -> str:
    """What a kernel whose every ``tl.dot`` runs on tensor cores (or none does) must show for ``sm``."""
    if not tensor_cores:
        return "fma"
    return "wgmma" if sm >= 90 else "mma"


def triton_aot_worker_main(jobs: list, compile_job) -> None:
    """The AOT worker's body: ``compile_job`` over ``jobs`` in a process pool, one JSON list printed last
    (what :func:`run_triton_aot_worker` reads)."""
    import json
    import os
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        print(json.dumps(list(pool.map(compile_job, jobs))))


def run_triton_aot_worker(script: str, timeout: float = 900) -> list:
    """Run ``script``'s AOT compile worker (``python script``, printing one JSON list of per-kernel rows
    last) in a process without TRITON_INTERPRET, where ``@triton.jit`` yields compilable kernels."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"AOT worker failed:\n{proc.stderr[-5000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows, "nothing was compiled"
    return rows


def assert_triton_compile_clean(rows: list) -> None:
    """No register spills (STACK, LOCAL) and shared memory within each architecture's limit."""
    bad = [r for r in rows if r["stack"] or r["local"] or r["shared"] > TRITON_SHARED_MEMORY_LIMIT[r["sm"]]]
    assert not bad, f"register spills or shared memory over the limit: {bad}"
