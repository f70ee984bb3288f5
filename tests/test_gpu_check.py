"""The GPU check's rehearsal on a machine without a GPU (tools/gpu_check.py, clipfast.bench.gpu_check).

The GPU machine the check is written for is offline and has only what the working tree carries: here, the wheelhouse is
checked, installed with --no-index and imported with every socket refused, exactly as the check's
set-up step does there; both commands must stop cleanly without a GPU; the benchmark's code runs on
the CPU at a tiny size. Packaging facts the check relies on are pinned as well.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_check_tool", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, tmp_path, timeout=300, **env):
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
                   "GPU_CHECK_DEPS": str(tmp_path / "deps"), **env}
    environment.pop("TRITON_INTERPRET", None)
    return subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def test_wheelhouse_is_small_pure_and_complete():
    tool = _tool()
    wheels, spec, problems = tool.check_wheelhouse()
    assert problems == []
    assert {w.name.split("-")[0] for w in wheels} >= {"open_clip_torch", "ftfy", "wcwidth"}
    assert all(re.search(r"-py(2\.py)?3-none-any\.whl$", w.name) for w in wheels), "pure-Python wheels only"
    assert sum(w.stat().st_size for w in wheels) < 4 * 2 ** 20
    assert "open_clip" in spec["modules"]


def test_wheelhouse_check_catches_a_missing_wheel_and_a_bad_hash(tmp_path, monkeypatch):
    tool = _tool()
    house = tmp_path / "wheelhouse"
    shutil.copytree(tool.WHEELHOUSE, house)
    (house / next(house.glob("wcwidth-*.whl")).name).unlink()
    lines = [line for line in (house / "SHA256SUMS").read_text().splitlines() if "wcwidth" not in line]
    inf_cl = next(i for i, line in enumerate(lines) if "inf_cl" in line)
    lines[inf_cl] = "0" * 64 + "  " + lines[inf_cl].split()[1]
    (house / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(tool, "WHEELHOUSE", house)
    monkeypatch.setattr(tool, "MANIFEST", house / "SHA256SUMS")
    _, _, problems = tool.check_wheelhouse()
    text = "\n".join(problems)
    assert "ftfy requires 'wcwidth'" in text and "neither carried nor known" in text
    assert re.search(r"inf_cl-.*sha256 .* does not match", text)


def test_setup_rehearsal_installs_the_wheelhouse_offline(tmp_path):
    """The check's set-up step: hashes, `pip install --no-index --no-deps --target`, then an import of
    every carried module from that target with sockets refused and the hub offline."""
    result = _run(["bash", str(SCRIPT), "setup"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported offline" in result.stdout
    summary = json.loads((tmp_path / "out" / "setup.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["passed"]
    assert (tmp_path / "deps" / "site" / "open_clip" / "__init__.py").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
@pytest.mark.parametrize("command", ["build-and-test", "bench"])
def test_commands_without_a_gpu_say_so_and_stop(tmp_path, command):
    result = _run(["bash", str(SCRIPT), command], tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "NO GPU HERE" in result.stdout and "Nothing was built, tested or benchmarked" in result.stdout
    summary = json.loads((tmp_path / "out" / f"{command}.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["no GPU"]
    assert not (tmp_path / "deps").exists(), "nothing may be installed or built without a GPU"


def test_benchmark_code_runs_on_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "bench"
    result = _run([sys.executable, "-m", "clipfast.bench.gpu_check", "--device", "cpu", "--sizes", "32",
                   "--modes", "bf16", "--reps", "1", "--no-extras", "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((out / "gpu-bench.json").read_text())
    rows = {(r["mode"], r["loss"], r["provider"]): r for r in data["rows"]}
    for mode in ("bf16",):
        assert rows[(mode, "-", "torch.mm")]["status"] == "ok"
        for loss in ("clip", "siglip"):
            assert rows[(mode, loss, "clipfast-cpu")]["status"] == "ok"
            assert rows[(mode, loss, "open_clip")]["status"] == "ok"
    assert data["targets"] and all(t["status"] == "not run" for t in data["targets"])
    assert "Targets" in (out / "gpu-bench.md").read_text()


def test_gpu_check_target_needs_no_venv():
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^gpu-check:(.*)$", makefile, re.M).group(1)
    assert ".stamp" not in rule and "VENV" not in rule


def test_no_compiler_build_names_the_pure_pytorch_build(tmp_path):
    result = _run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                   "--build-temp", str(tmp_path / "tmp")], tmp_path, timeout=120,
                  CXX="clipfast-no-such-compiler", CLIPFAST_BUILD_CUDA="0")
    assert result.returncode != 0
    assert "No C++ compiler found" in result.stderr and "CLIPFAST_BUILD_NATIVE=0 pip install ." in result.stderr


def test_pure_wheel_ships_typing_marker_license_and_metadata(tmp_path):
    result = _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "build", "--build-base",
                   str(tmp_path / "build"), "bdist_wheel", "--bdist-dir", str(tmp_path / "bdist"), "-d",
                   str(tmp_path / "dist")], tmp_path, timeout=120, CLIPFAST_BUILD_NATIVE="0")
    assert result.returncode == 0, result.stderr
    import zipfile

    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("clipfast-*.whl")))
    names = wheel.namelist()
    assert "clipfast/py.typed" in names and "clipfast/triton_kernels/__init__.py" in names
    assert any(re.search(r"\.dist-info/(licenses/)?LICENSE$", n) for n in names)  # setuptools >= 77: licenses/
    metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    header = metadata.split("\n\n", 1)[0]
    for field in ("License: Apache-2.0", "Requires-Python: >=3.11", "Requires-Dist: torch>=2.11",
                  'Requires-Dist: triton>=3.6; extra == "triton"'):
        assert field in header
    assert "Project-URL" not in header and "Home-page" not in header
