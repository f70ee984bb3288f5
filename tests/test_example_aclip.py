"""examples/train_aclip.py end to end: A-CLIP token removal trains a real open_clip model and reports its cost.

One real subprocess of two steps at the example's tiny default model; it runs the comparison without
removal in a subprocess of its own. The losses come from the script's --log-losses file.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import clipfast

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_aclip.py"
STEPS = 2
BATCH = 8
TIMEOUT_S = 180
NUMBER = r"\d+(?:\.\d+)?"
DONE_LINE = re.compile(rf"done: {STEPS} steps, {NUMBER} ms/step, peak memory \d+ MiB, "
                       r"kept (?P<kept>\d+) of (?P<patches>\d+) patches")
COMPARE_LINE = re.compile(rf"without removal: {NUMBER} ms/step, peak memory \d+ MiB, speed-up {NUMBER}x")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    log = tmp_path_factory.mktemp("aclip") / "losses.jsonl"
    # One thread per process: OpenMP threads that spin-wait for a core slow a run down many times over
    # when other jobs share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--steps", str(STEPS), "--batch-size", str(BATCH), "--log-losses", str(log)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {TIMEOUT_S} s: {' '.join(cmd)}\n{(e.stderr or '')[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout.splitlines(), log


def test_prints_done_and_comparison_lines(run):
    lines, _ = run
    assert len(lines) == 2, lines
    assert DONE_LINE.fullmatch(lines[0]), lines
    assert COMPARE_LINE.fullmatch(lines[1]), lines


def test_keeps_a_clip_block_count(run):
    lines, _ = run
    done = DONE_LINE.fullmatch(lines[0])
    patches = int(done["patches"])
    # The tiny default: 64 px images in 8 px patches.
    assert patches == 64
    assert int(done["kept"]) == clipfast.num_keep_for_ratio(patches, 0.5, block=2) < patches


def test_logs_one_finite_loss_per_step(run):
    _, log = run
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(math.isfinite(r["loss"]) for r in records), records
