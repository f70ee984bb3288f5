"""examples/train_clip.py end to end: clipfast.nn.ClipLoss trains open_clip's model as open_clip's loss does.

Each run is a real subprocess (a plain run, or torchrun with two gloo processes) of a few steps; the
losses come from the script's --log-losses file. Runs are cached per module so that several tests share
them.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_clip.py"
STEPS = 2
PER_RANK = 8
NPROC = 2
TIMEOUT_S = 180
DONE_LINE = re.compile(rf"done: {STEPS} steps, \d+(\.\d+)? images/s, peak memory \d+ MiB")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env) -> str:
    # A session of its own, so that cleanup reaches torchrun's workers too, not only the launcher.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT_S} s: {' '.join(cmd)}\n{err[-4000:]}")
    finally:
        try:  # a worker that outlived its launcher
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-2000:]}\n{err[-4000:]}"
    return out


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """train(loss, nproc, dist_impl="gather") -> {(step, rank): loss}; each configuration runs once."""
    cache = {}

    def run(loss: str, nproc: int, dist_impl: str = "gather"):
        key = (loss, nproc, dist_impl)
        if key not in cache:
            log = tmp_path_factory.mktemp("train") / "losses.jsonl"
            # One thread per process, as torchrun sets (with a warning) for its workers: OpenMP threads that
            # spin-wait for a core slow a run down many times over when other jobs share the two cores.
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            # Single-process runs get the global batch of the torchrun runs, so the two can be compared.
            args = [str(SCRIPT), "--loss", loss, "--steps", str(STEPS), "--batch-size", str(PER_RANK * NPROC // nproc),
                    "--dist-impl", dist_impl, "--log-losses", str(log)]
            if nproc == 1:
                cmd = [sys.executable, *args]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                       "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
            out = _run(cmd, env)
            done = [line for line in out.splitlines() if line.startswith("done:")]
            assert len(done) == 1 and DONE_LINE.fullmatch(done[0]), out
            records = [json.loads(line) for line in log.read_text().splitlines()]
            losses = {(r["step"], r["rank"]): r["loss"] for r in records}
            assert len(records) == len(losses) and set(losses) == {
                (step, rank) for step in range(STEPS) for rank in range(nproc)}, records
            cache[key] = losses
        return cache[key]

    return run


def _assert_same_losses(actual, expected):
    assert actual.keys() == expected.keys()
    for key in sorted(expected):
        assert actual[key] == pytest.approx(expected[key], rel=1e-5), f"(step, rank) = {key}"


def test_single_process_clipfast_matches_open_clip(train):
    _assert_same_losses(train("clipfast", 1), train("open_clip", 1))


@pytest.mark.slow
@pytest.mark.parametrize("dist_impl", ["gather", "ring"])
def test_torchrun_clipfast_matches_open_clip(train, dist_impl):
    _assert_same_losses(train("clipfast", NPROC, dist_impl), train("open_clip", NPROC))


@pytest.mark.slow
def test_global_batch_does_not_depend_on_world_size(train):
    # With local_loss each process's loss covers its rows of the global batch, so their mean is the
    # single-process loss; DDP's gradient average keeps the trajectories together after the first step.
    # Looser than rtol 1e-5: the summation order differs (two halves and an all-reduce against one sum).
    single, multi = train("open_clip", 1), train("open_clip", NPROC)
    for step in range(STEPS):
        mean = sum(multi[step, rank] for rank in range(NPROC)) / NPROC
        assert mean == pytest.approx(single[step, 0], rel=1e-4), f"step {step}"
