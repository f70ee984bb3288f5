"""The GPU check: build, test and benchmark clipfast on a GPU machine, as that machine is.

Usage, from the repository root (``tools/gpu_check.sh`` picks the interpreter and runs this file)::

    bash tools/gpu_check.sh build-and-test   # wheelhouse, in-place build, GPU tests per backend (<= 5 min)
    bash tools/gpu_check.sh bench            # the GPU benchmark, clipfast.bench.gpu_check (<= 5 min)
    bash tools/gpu_check.sh all              # both, one after the other (`make gpu-check`)
    bash tools/gpu_check.sh setup            # the wheelhouse step alone; needs no GPU (`make test` rehearses it)

Design notes
------------
- The machine is taken as it is: offline, its own ``python3`` with a CUDA build of torch and triton,
  nvcc, many cores, and nothing else from us but the git working tree (tens of MiB; a venv stays
  behind). So the check never creates a venv, never asks a package index, and uses ``python3`` (or
  ``$PYTHON``) and the torch it finds. Supported there: torch >= 2.11, triton >= 3.6.
- What that machine lacks (open_clip and its text-cleaning dependencies ftfy and wcwidth; inf-cl, a
  peer in the benchmark) is carried in ``tools/wheelhouse/``: pure-Python wheels, a few MiB, each listed
  with its sha256 in ``tools/wheelhouse/SHA256SUMS``. They are checked against that list, installed with
  ``pip install --isolated --no-index --no-deps --target .gpu-deps/site`` and put first on
  ``PYTHONPATH``. Their declared requirements must be carried too or be in ``MACHINE_PROVIDES`` (what the
  machine image is known to hold); a probe then imports them with every socket refused and the Hugging
  Face hub offline, and checks the requirement versions actually found. ``make test`` runs this same
  step on a CPU machine (tests/test_gpu_check.py), so a missing wheel or an import that needs the
  network fails there, not on the GPU machine.
- The extension is built in place (``setup.py build_ext --inplace``, ``MAX_JOBS`` = all cores,
  ``TORCH_CUDA_ARCH_LIST`` 8.0;9.0 unless ``CLIPFAST_CUDA_ARCHS`` says otherwise) with
  ``CLIPFAST_BUILD_CUDA=1``: no toolkit, no CUDA kernels, no silent CPU-only library. A check after the
  build asserts that every native op has a CUDA kernel. ``clipfast/triton_kernels`` is linked to
  ``triton_kernels/`` (what an install maps), so the tree runs without being installed.
- The GPU tests (tests/gpu) run once per backend (``CLIPFAST_GPU_BACKENDS=triton``, then ``=cuda``),
  each in its own process: a kernel fault poisons its CUDA context, not the other backend's run.
- Every step is a subprocess with a timeout taken from the command's budget (``GPU_CHECK_BUDGET_S``,
  default 285 s), its output streamed to the terminal and the log; a failed or timed-out step is
  recorded and the next one still runs, and the summary is always written and printed last.
- Results: ``$OUT`` when set (on a machine that hands back only that folder), else
  ``bench-results/gpu``: ``<command>.log``, ``<command>.json`` (every step), ``<command>.md`` (a short
  summary), ``tests-<backend>.xml``; the benchmark's rows in ``gpu-bench.json`` and its table in
  ``gpu-bench.md``. State between the two commands (the build and test outcome, which decides whether
  the opt-in CUDA backend is benchmarked) is kept in ``.gpu-deps/state.json``: ``$OUT`` starts empty
  on every call, the ignored build outputs stay while the machine stays warm. On a fresh machine
  ``bench`` installs the wheelhouse again, does not build, and benchmarks the Triton backend only.
- Without a GPU (no torch, a CPU build of torch, or no visible device) ``build-and-test`` and ``bench``
  say so, write that one-line result, and stop with exit code 2 before building anything.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "tools" / "wheelhouse"
MANIFEST = WHEELHOUSE / "SHA256SUMS"
DEPS = Path(os.environ.get("GPU_CHECK_DEPS") or ROOT / ".gpu-deps")
SITE = DEPS / "site"
STATE = DEPS / "state.json"
OUT = Path(os.environ.get("OUT") or ROOT / "bench-results" / "gpu")
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "285"))
NO_GPU = 2

# Distributions the GPU machine's image holds (its package list) that the carried wheels require.
MACHINE_PROVIDES = {"torch", "torchvision", "triton", "numpy", "regex", "tqdm", "huggingface-hub", "safetensors",
                    "timm", "transformers", "pytest", "pytest-benchmark", "hypothesis", "ninja", "setuptools",
                    "packaging", "filelock", "fsspec", "pyyaml", "pillow", "matplotlib"}

# Run in a subprocess with the carried packages first on the path: sockets refused, hub offline.
PROBE = r"""
import importlib, importlib.metadata as md, json, os, socket, sys
def refuse(*args, **kwargs):
    raise OSError("gpu_check probe: network access attempted (the GPU machine is offline)")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
try:
    from pip._vendor.packaging.requirements import Requirement
except ImportError:
    from packaging.requirements import Requirement
site, spec = os.path.realpath(sys.argv[1]), json.loads(sys.argv[2])
problems = []
for module in spec["modules"]:
    try:
        loaded = importlib.import_module(module)
    except Exception as error:
        problems.append(f"import {module}: {type(error).__name__}: {error}")
        continue
    where = os.path.realpath(getattr(loaded, "__file__", "") or "")
    if not where.startswith(site + os.sep):
        problems.append(f"{module} was imported from {where}, not from the carried wheels")
for owner, lines in spec["requires"].items():
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{owner} requires {req} and nothing here provides it")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{owner} requires {req}, found {req.name} {version}")
if not problems:
    import open_clip
    from open_clip.loss import ClipLoss, SigLipLoss  # what the benchmark uses
    tokens = open_clip.get_tokenizer("ViT-B-16")(["a photo of a cat"])  # runs ftfy and wcwidth
    assert tuple(tokens.shape) == (1, 77), tokens.shape
print(json.dumps(problems))
"""


def _now() -> float:
    return time.monotonic()


class Run:
    """One command's log, steps and summary, all under OUT."""

    def __init__(self, command: str):
        self.command = command
        self.started = _now()
        self.deadline = self.started + BUDGET_S
        self.steps: list[dict] = []
        self.info: dict = {}
        OUT.mkdir(parents=True, exist_ok=True)
        self.log_path = OUT / f"{command}.log"
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self._log.write(text + "\n")
        self._log.flush()

    def remaining(self) -> float:
        return self.deadline - _now()

    def record(self, name: str, status: str, seconds: float, detail: str = "") -> dict:
        step = {"name": name, "status": status, "seconds": round(seconds, 1), "detail": detail}
        self.steps.append(step)
        self.say(f"gpu_check: {name}: {status} ({seconds:.0f} s){': ' + detail if detail else ''}")
        return step

    def sub(self, name: str, argv: list[str], timeout: float, env: dict | None = None) -> tuple[int, list[str]]:
        """Run ``argv``, its output streamed to the terminal and the log; (exit code, output lines).
        Past ``timeout`` seconds its whole process group is killed and the code is 124."""
        shown = " ".join(a if len(a) < 120 and "\n" not in a else "<script>" for a in argv)
        self.say(f"\n=== {name}: {shown} (timeout {timeout:.0f} s)")
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(max(timeout, 1.0), kill)
        timer.start()
        lines = []
        try:
            for line in process.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                self.say(line)
            code = process.wait()
        finally:
            timer.cancel()
        return (124 if timed_out.is_set() else code), lines

    def finish(self, headline: str, extra_markdown: str = "") -> None:
        took = _now() - self.started
        result = {"command": self.command, "headline": headline, "seconds": round(took, 1), "environment": self.info,
                  "steps": self.steps}
        (OUT / f"{self.command}.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [f"# gpu_check {self.command}", "", headline, "", "| step | status | time | detail |",
                 "| --- | --- | --- | --- |"]
        lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} s | {s['detail']} |" for s in self.steps]
        if extra_markdown:
            lines += ["", extra_markdown.rstrip()]
        (OUT / f"{self.command}.md").write_text("\n".join(lines) + "\n")
        self.say("")
        self.say(f"gpu_check {self.command} summary: {headline} ({took:.0f} s)")
        for s in self.steps:
            self.say(f"  {s['name']:<14} {s['status']:<9} {s['seconds']:>5.0f} s  {s['detail']}")
        produced = [f"{self.command}.{ext}" for ext in ("md", "json", "log")]
        produced += [p.name for p in sorted(OUT.glob("gpu-bench.*")) + sorted(OUT.glob("tests-*.xml"))]
        self.say(f"Results in {OUT}: {', '.join(produced)}")
        self._log.close()


def _python_env(extra: dict | None = None) -> dict:
    """The environment of every child: carried packages first, the tree next, the interpreter's own bin
    (its ninja) first on PATH, no network for pip or the hub."""
    env = dict(os.environ)
    path = [str(SITE), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update({"PYTHONPATH": os.pathsep.join(path), "PYTHONNOUSERSITE": "1", "PIP_NO_INDEX": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PATH": os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])})
    env.pop("TRITON_INTERPRET", None)
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------------- wheels


def _manifest() -> dict[str, str]:
    entries = {}
    for line in MANIFEST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split()
            entries[name.lstrip("*")] = digest
    return entries


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_metadata(path: Path) -> tuple[str, list[str], list[str]]:
    """(distribution name, Requires-Dist lines, top-level importable modules) of a wheel."""
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = wheel.read(metadata).decode()
    fields = [line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line]
    dist = next(v.strip() for k, v in fields if k == "Name")
    requires = [v.strip() for k, v in fields if k == "Requires-Dist"]
    modules = sorted({n.split("/")[0].removesuffix(".py") for n in names
                      if not n.split("/")[0].endswith((".dist-info", ".data"))
                      and (n.endswith("/__init__.py") and n.count("/") == 1 or "/" not in n and n.endswith(".py"))})
    return dist, requires, modules


def _requirement_name(line: str) -> str:
    return _normalise(re.match(r"[A-Za-z0-9._-]+", line).group(0))


def check_wheelhouse() -> tuple[list[Path], dict, list[str]]:
    """The carried wheels after their hashes are checked, the probe's spec, and every problem found."""
    problems, wheels = [], []
    manifest = _manifest()
    present = {p.name for p in WHEELHOUSE.glob("*.whl")}
    for name in sorted(present - set(manifest)):
        problems.append(f"{name} is in the wheelhouse but not in SHA256SUMS")
    for name, digest in sorted(manifest.items()):
        path = WHEELHOUSE / name
        if not path.exists():
            problems.append(f"{name} is listed in SHA256SUMS but missing")
        elif _sha256(path) != digest:
            problems.append(f"{name}: sha256 {_sha256(path)} does not match SHA256SUMS ({digest})")
        elif not name.endswith("-none-any.whl"):
            problems.append(f"{name} is not a pure-Python wheel (the GPU machine's Python may differ from this one's)")
        else:
            wheels.append(path)
    carried, requires, modules = set(), {}, []
    for path in wheels:
        dist, lines, top = _wheel_metadata(path)
        carried.add(_normalise(dist))
        requires[dist] = [line for line in lines if "extra ==" not in line]
        modules += top
    for dist, lines in requires.items():
        for line in lines:
            name = _requirement_name(line)
            if name not in carried and name not in MACHINE_PROVIDES:
                problems.append(f"{dist} requires {line!r}: neither carried nor known on the GPU machine "
                                f"(add its wheel to tools/wheelhouse and SHA256SUMS)")
    return wheels, {"modules": modules, "requires": requires}, problems


def setup_wheels(run: Run) -> bool:
    started = _now()
    wheels, spec, problems = check_wheelhouse()
    if problems:
        run.record("wheelhouse", "FAILED", _now() - started, "; ".join(problems))
        return False
    digest = hashlib.sha256(MANIFEST.read_bytes()).hexdigest()
    stamp = DEPS / "installed.sha256"
    if not (stamp.exists() and stamp.read_text().strip() == digest and SITE.is_dir()):
        shutil.rmtree(SITE, ignore_errors=True)
        SITE.mkdir(parents=True)
        if importlib.util.find_spec("pip") is None:  # pure wheels (checked above) unpack as they are
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(SITE)
            run.say(f"gpu_check: no pip here; {len(wheels)} pure-Python wheels unpacked into {SITE}")
        else:
            pip = [sys.executable, "-m", "pip", "install", "--isolated", "--no-index", "--no-deps",
                   "--no-warn-script-location", "--quiet", "--target", str(SITE)]
            code, lines = run.sub("wheelhouse", pip + [str(w) for w in wheels],
                                  timeout=min(120, max(run.remaining(), 30)), env=_python_env())
            if code != 0:
                run.record("wheelhouse", "FAILED", _now() - started, f"pip exit {code}: {lines[-1] if lines else ''}")
                return False
        stamp.write_text(digest + "\n")
    code, lines = run.sub("offline import probe", [sys.executable, "-c", PROBE, str(SITE), json.dumps(spec)],
                          timeout=min(120, max(run.remaining(), 30)), env=_python_env())
    try:
        problems = json.loads(lines[-1]) if code == 0 else [f"probe exit {code}: {lines[-1] if lines else ''}"]
    except (json.JSONDecodeError, IndexError):
        problems = [f"probe printed no result (exit {code})"]
    if problems:
        run.record("wheelhouse", "FAILED", _now() - started, "; ".join(problems))
        return False
    names = ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1] for w in wheels)
    where = SITE.relative_to(ROOT) if SITE.is_relative_to(ROOT) else SITE
    run.record("wheelhouse", "passed", _now() - started, f"{names} into {where}, imported offline")
    return True


# -------------------------------------------------------------------------------------------- preflight

PREFLIGHT = r"""
import json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable, "cores": os.cpu_count()}
try:
    import torch
    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, gpu=torch.cuda.is_available())
    if info["gpu"]:
        info.update(device=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
except Exception as error:
    info.update(torch=None, error=f"{type(error).__name__}: {error}", gpu=False)
try:
    import triton
    info["triton"] = triton.__version__
except Exception:
    info["triton"] = None
print(json.dumps(info))
"""


def _version_tuple(version: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:2])


def preflight(run: Run) -> bool:
    """Environment facts into the summary; False (after saying so) when there is no GPU to check on."""
    started = _now()
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    try:
        result = subprocess.run([sys.executable, "-c", PREFLIGHT], capture_output=True, text=True, timeout=120)
        info = json.loads(result.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        info = {"python": platform.python_version(), "executable": sys.executable, "torch": None, "gpu": False,
                "error": f"preflight failed: {error}"}
    info["nvcc"] = nvcc
    run.info = info
    build_kind = f"CUDA {info['cuda_build']} build" if info.get("cuda_build") else "CPU build"
    torch_text = (f"torch {info['torch']} ({build_kind})" if info.get("torch")
                  else f"no torch ({info.get('error', 'not importable')})")
    run.say(f"gpu_check {run.command}: python {info['python']} ({info['executable']}), {torch_text}, "
            f"triton {info.get('triton')}, nvcc {nvcc or 'not found'}, {info.get('cores')} cores")
    if not info.get("gpu"):
        why = ("torch is not importable" if not info.get("torch") else
               "torch is a CPU build" if not info.get("cuda_build") else "torch.cuda.is_available() is False")
        run.say("")
        run.say(f"gpu_check: NO GPU HERE ({why}). Nothing was built, tested or benchmarked: this command needs a "
                f"machine with an NVIDIA GPU and a CUDA build of torch (README, 'Verifying on a GPU').")
        run.record("preflight", "no GPU", _now() - started, why)
        return False
    detail = f"{info['device']} (sm_{info['capability'].replace('.', '')})"
    if _version_tuple(info["torch"]) < (2, 11) or (info.get("triton") and _version_tuple(info["triton"]) < (3, 6)):
        detail += "; below the supported torch >= 2.11 / triton >= 3.6"
    run.record("preflight", "passed", _now() - started, detail)
    return True


# ---------------------------------------------------------------------------------------- build, tests

VERIFY_BUILD = r"""
import torch, clipfast
from clipfast import backends
import clipfast.triton_kernels
assert backends.native_available(), backends.native_load_error
missing = [f"clipfast_C::{name}" for names in backends.native_op_names().values() for name in names
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"clipfast_C::{name}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("native library with CUDA kernels for", sum(map(len, backends.native_op_names().values())), "ops")
"""


def link_triton_kernels() -> None:
    """clipfast.triton_kernels lives in triton_kernels/ (mapped there by an install): link it for a tree
    that runs uninstalled."""
    link = ROOT / "clipfast" / "triton_kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "triton_kernels")


def build(run: Run) -> bool:
    started = _now()
    link_triton_kernels()
    archs = os.environ.get("CLIPFAST_CUDA_ARCHS", "8.0;9.0")
    env = _python_env({"MAX_JOBS": str(os.cpu_count() or 1), "CLIPFAST_BUILD_CUDA": "1", "CLIPFAST_BUILD_NATIVE": "1",
                       "TORCH_CUDA_ARCH_LIST": archs})
    timeout = min(240, max(run.remaining() - 60, 30))
    code, lines = run.sub("build", [sys.executable, "setup.py", "build_ext", "--inplace"], timeout=timeout, env=env)
    if code != 0:
        errors = [line for line in lines if "error" in line.lower()] or lines or [""]
        run.record("build", "timeout" if code == 124 else "FAILED", _now() - started,
                   f"killed after {timeout:.0f} s" if code == 124 else f"exit {code}: {errors[0][:300]}")
        return False
    code, lines = run.sub("verify build", [sys.executable, "-c", VERIFY_BUILD], timeout=120, env=env)
    if code != 0:
        run.record("build", "FAILED", _now() - started,
                   f"the CUDA part did not build or load: {lines[-1] if lines else f'exit {code}'}")
        return False
    run.record("build", "passed", _now() - started, f"clipfast._C in place, {lines[-1]}, TORCH_CUDA_ARCH_LIST={archs}")
    return True


def _pytest_summary(lines: list[str]) -> str:
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error|skipped)|no tests ran", line):
            return line.strip("= ")
    return lines[-1] if lines else "no output"


def gpu_tests(run: Run, backend: str, share: float) -> str:
    started = _now()
    timeout = max(run.remaining() * share - 5, 20)
    argv = [sys.executable, "-m", "pytest", "-q", "-rfEs", "--durations=15", "-p", "no:cacheprovider", "tests/gpu",
            f"--junitxml={OUT / f'tests-{backend}.xml'}"]
    if importlib.util.find_spec("pytest_timeout") is not None:  # one hung test must not eat the whole budget
        argv += ["--timeout", "120"]
    code, lines = run.sub(f"tests {backend}", argv, timeout=timeout,
                          env=_python_env({"CLIPFAST_GPU_BACKENDS": backend}))
    status = "passed" if code == 0 else "timeout" if code == 124 else "FAILED"
    detail = _pytest_summary(lines) if code != 124 else f"killed after {timeout:.0f} s; last: {_pytest_summary(lines)}"
    run.record(f"tests {backend}", status, _now() - started, detail)
    return status


def _save_state(state: dict) -> None:
    DEPS.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state, indent=2) + "\n")


def build_and_test() -> int:
    run = Run("build-and-test")
    if not preflight(run):
        run.finish("no GPU: nothing run")
        return NO_GPU
    wheels_ok = setup_wheels(run)
    built = build(run)
    results = {"triton": gpu_tests(run, "triton", 0.5)}
    if built:
        results["cuda"] = gpu_tests(run, "cuda", 1.0)
    else:
        results["cuda"] = "not run"
        run.record("tests cuda", "not run", 0.0, "the CUDA kernels did not build")
    _save_state({"built": built, "wheels": wheels_ok, "tests": results, "torch": run.info.get("torch")})
    ok = wheels_ok and built and all(v == "passed" for v in results.values())
    run.finish(f"{'PASSED' if ok else 'FAILED'} on {run.info.get('device')}, torch {run.info.get('torch')}, "
               f"triton {run.info.get('triton')}")
    return 0 if ok else 1


def bench() -> int:
    run = Run("bench")
    if not preflight(run):
        run.finish("no GPU: nothing run")
        return NO_GPU
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    setup_wheels(run)
    link_triton_kernels()
    args = [sys.executable, "-m", "clipfast.bench.gpu_check", "--out", str(OUT)]
    if state.get("tests", {}).get("cuda") == "passed":
        args.append("--cuda-backend")
        note = "CUDA backend included (its GPU tests passed in build-and-test)"
    else:
        note = ("CUDA backend not benchmarked: " + (f"its GPU tests: {state['tests']['cuda']}" if state else
                                                     "build-and-test has not run on this machine"))
    run.say(f"gpu_check bench: {note}")
    started = _now()
    timeout = max(run.remaining() - 10, 30)
    args += ["--budget-s", f"{timeout - 15:.0f}"]
    code, lines = run.sub("benchmark", args, timeout=timeout, env=_python_env())
    status = "passed" if code == 0 else "timeout" if code == 124 else "FAILED"
    targets = [line.strip() for line in lines if line.strip().startswith(("PASS ", "FAIL ", "not run "))]
    detail = f"{sum(t.startswith('PASS') for t in targets)} targets met of {len(targets)}; {note}"
    if code == 124:
        detail = f"killed after {timeout:.0f} s; {note}"
    run.record("benchmark", status, _now() - started, detail)
    bench_md = OUT / "gpu-bench.md"
    if state:
        run.info["build_and_test"] = state
    run.finish(f"benchmark {status} on {run.info.get('device')}, torch {run.info.get('torch')}, "
               f"triton {run.info.get('triton')}", bench_md.read_text() if bench_md.exists() else "")
    return 0 if code == 0 else 1


def setup_only() -> int:
    run = Run("setup")
    run.info = {"python": platform.python_version(), "executable": sys.executable}
    ok = setup_wheels(run)
    run.finish("wheelhouse installed and imported offline" if ok else "wheelhouse FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bash tools/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build-and-test", "bench", "all", "setup"])
    command = parser.parse_args(argv).command
    if command == "setup":
        return setup_only()
    if command == "build-and-test":
        return build_and_test()
    if command == "bench":
        return bench()
    first = build_and_test()
    return first if first == NO_GPU else max(first, bench())


if __name__ == "__main__":
    sys.exit(main())
