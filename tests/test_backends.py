"""Backend selection, forced backends, refusal messages and the info CLI."""

import os
import subprocess
import sys

import pytest
import torch

import clipfast
from clipfast import backends


def test_default_cpu_backend():
    expected = "cpu" if backends.native_available() else "reference"
    assert backends.select("contrastive", torch.device("cpu"), torch.float32) == expected


def test_use_backend_as_call_and_context():
    handle = clipfast.use_backend("reference")
    try:
        assert backends.select("contrastive", torch.device("cpu")) == "reference"
    finally:
        handle.restore()
    with clipfast.use_backend("reference"):
        assert backends.forced_backend() == "reference"
    assert backends.forced_backend() is None


def test_forced_backend_that_cannot_run_lists_every_reason():
    with clipfast.use_backend("cuda"):
        with pytest.raises(clipfast.BackendUnavailableError) as info:
            clipfast.clip_loss(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(1.0))
    message = str(info.value)
    for backend in backends.BACKENDS:
        assert f"{backend}:" in message
    assert "needs CUDA tensors" in message


def test_env_variable_forces_backend_from_import():
    """CLIPFAST_BACKEND is read once, when clipfast is imported; an unknown name raises on the first op call."""
    code = ("import torch, clipfast\n"
            "print(clipfast.backends.select('contrastive', torch.device('cpu')))\n"
            "with clipfast.use_backend(None):\n"
            "    print(clipfast.backends.select('token_keep', torch.device('cpu')))\n")
    for name, expected in (("reference", "reference\nreference"), ("nonsense", None)):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=dict(os.environ, CLIPFAST_BACKEND=name))
        if expected is None:
            assert result.returncode != 0 and "CLIPFAST_BACKEND='nonsense' is not a backend" in result.stderr
        else:
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == expected


def test_selection_is_cached_and_follows_use_backend():
    cpu = torch.device("cpu")
    first = backends.select("contrastive", cpu, torch.float32)
    assert backends.select("contrastive", cpu, torch.float32) == first
    with clipfast.use_backend("reference"):
        assert backends.select("contrastive", cpu, torch.float32) == "reference"
    assert backends.select("contrastive", cpu, torch.float32) == first
    ops = backends.registered_ops()
    assert set(ops) == set(backends.OPS)
    assert ops["contrastive"].for_inputs(torch.zeros(1)) is ops["contrastive"].kernels(first)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown backend"):
        clipfast.use_backend("tpu")
    with pytest.raises(ValueError, match="unknown op"):
        backends.refusal_reason("conv", "cpu", torch.device("cpu"))


def test_dtype_refusal():
    assert "does not compute torch.float64" in backends.refusal_reason(
        "contrastive", "triton", torch.device("cpu"), torch.float64)


def test_info_cli_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "clipfast.info"], capture_output=True, text=True, check=True).stdout
    assert "native library" in out
    rows = [line.split() for line in out.splitlines()[out.splitlines().index("Every backend:") + 2:]]
    assert {(r[0], r[1]) for r in rows} == {(op, b) for op in backends.OPS for b in backends.BACKENDS}
    table = out.splitlines()[out.splitlines().index("Every backend:") + 1:]
    assert len({line.index(line.split()[1]) for line in table}) == 1  # one column for every op, Schur's included


def test_info_cli_says_which_backend_runs_each_op_here():
    env = dict(os.environ, CLIPFAST_BACKEND="reference")
    for extra, expected in (({}, backends.select("token_medoids", torch.device("cpu"))), (env, "reference")):
        out = subprocess.run([sys.executable, "-m", "clipfast.info"], capture_output=True, text=True, check=True,
                             env=extra or None).stdout
        lines = out.splitlines()
        here = lines[lines.index("What runs here (float32 inputs):") + 2:lines.index("Every backend:") - 1]
        cpu_rows = {line.split()[0]: line.split()[2] for line in here if line.split()[1] == "cpu"}
        assert set(cpu_rows) == set(backends.OPS) and cpu_rows["token_medoids"] == expected
        assert ("forced (CLIPFAST_BACKEND=reference)" in out) == bool(extra)
    help_text = subprocess.run([sys.executable, "-m", "clipfast.info", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert help_text.startswith("usage: python -m clipfast.info") and "clipfast " not in help_text.splitlines()[0]


def test_bench_cli_help_documents_every_flag():
    from clipfast.bench.__main__ import main

    out = subprocess.run([sys.executable, "-m", "clipfast.bench", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("usage: python -m clipfast.bench")
    for flag in ("--op", "--quick", "--device", "--losses", "--sizes", "--out", "--fail-on-miss"):
        block = out[out.index("\n  " + flag) + 1:].split("\n  -")[0]
        assert len(block.split()) > 3, flag  # the flag and a help text
    assert main.__module__ == "clipfast.bench.__main__"


def test_import_without_native_library_falls_back_with_a_warning(tmp_path):
    """CLIPFAST's pure-Python path: hide _C and check the reference serves CPU tensors."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'clipfast._C': raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, clipfast\n"
        "assert not clipfast.backends.native_available()\n"
        "assert clipfast.backends.select('contrastive', torch.device('cpu')) == 'reference'\n"
        "print(float(clipfast.clip_loss(torch.eye(3), torch.eye(3), 1.0)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "native kernels could not be looked up (hidden for the test)" in result.stderr
    assert abs(float(result.stdout) - 0.5514) < 1e-3


def test_import_of_a_build_without_native_library_logs_one_clear_line():
    """A CLIPFAST_BUILD_NATIVE=0 install has no clipfast._C at all: one warning line that says so, and
    nothing about a circular import."""
    code = ("import sys\n"
            "sys.modules['clipfast._C'] = None  # what a build without native code looks like to the import system\n"
            "import torch, clipfast\n"
            "assert not clipfast.backends.native_available()\n"
            "print(clipfast.backends.select('token_medoids', torch.device('cpu')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["clipfast: native kernels not built (installed with CLIPFAST_BUILD_NATIVE=0, or without a C++ "
                     "compiler); using the PyTorch reference"], result.stderr


@pytest.fixture
def fp32_matmul_setting(monkeypatch):
    """Restores PyTorch's fp32 matmul precision (new per-backend and generic settings) afterwards."""
    monkeypatch.delenv("CLIPFAST_TRITON_PRECISION", raising=False)
    cuda_matmul, generic = torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = cuda_matmul
    torch.backends.fp32_precision = generic


@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_triton_precision_follows_float32_matmul_precision(fp32_matmul_setting, setting, expected):
    torch.set_float32_matmul_precision(setting)
    assert backends.triton_input_precision() == expected


@pytest.mark.parametrize("setting", ["ieee", "tf32"])
def test_triton_precision_follows_cuda_matmul_fp32_precision(fp32_matmul_setting, setting):
    torch.backends.cuda.matmul.fp32_precision = setting
    assert backends.triton_input_precision() == setting
    torch.backends.cuda.matmul.fp32_precision = "none"  # defers to the generic setting
    torch.backends.fp32_precision = setting
    assert backends.triton_input_precision() == setting


def test_triton_precision_environment_override(fp32_matmul_setting, monkeypatch):
    torch.set_float32_matmul_precision("high")
    monkeypatch.setenv("CLIPFAST_TRITON_PRECISION", "ieee")
    assert backends.triton_input_precision() == "ieee"
    monkeypatch.setenv("CLIPFAST_TRITON_PRECISION", "fp8")
    with pytest.raises(ValueError, match="CLIPFAST_TRITON_PRECISION"):
        backends.triton_input_precision()


@pytest.mark.skipif("triton" not in backends.available_backends("contrastive", "cpu"),
                    reason="Triton unavailable on CPU tensors here (needs triton and TRITON_INTERPRET=1)")
def test_triton_kernels_follow_the_setting_of_each_call_under_compile(fp32_matmul_setting, monkeypatch):
    """Read at run time inside the registered op: a compiled graph never bakes in a stale precision."""
    from clipfast.triton_kernels import contrastive as triton_contrastive

    seen = []
    resolve = triton_contrastive.resolve_input_precision

    def spy(input_precision, dtype):
        seen.append(resolve(input_precision, dtype))
        return seen[-1]

    monkeypatch.setattr(triton_contrastive, "resolve_input_precision", spy)
    img, txt = torch.randn(8, 16), torch.randn(8, 16)
    loss = torch.compile(clipfast.clip_loss, backend="aot_eager", fullgraph=True)
    with clipfast.use_backend("triton"):
        torch.set_float32_matmul_precision("highest")
        exact = loss(img, txt, torch.tensor(10.0))
        torch.set_float32_matmul_precision("high")
        tf32 = loss(img, txt, torch.tensor(10.0))
    assert seen == ["ieee", "tf32"]  # one forward launch per call, each reading the setting of its call
    torch.testing.assert_close(tf32, exact, rtol=1e-2, atol=0)
