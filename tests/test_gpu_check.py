"""``benchmarks/gpu_check.sh --dry-run``: every step of the GPU check on the CPU under Triton's interpreter,
so that the script a GPU window runs has run before (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_every_step(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    r = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--dry-run",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert list(res["steps"]) == ["environment", "tests", "compress", "runtime", "kernels", "end_to_end"]
    rt = res["steps"]["runtime"]
    assert rt["prepare_counts"] == [1]
    assert rt["logits_max_abs_diff"] <= 1e-3 * rt["logits_scale"]
    assert res["steps"]["compress"]["loss_difference"] == 0.0  # both sides ran on the CPU: the same bytes


def test_gpu_check_stops_at_the_first_failure_with_one_line(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    # without --dry-run on a machine with no GPU, the environment step fails and nothing else runs
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert r.returncode == 1
    assert (
        r.stderr.strip().splitlines()[-1].startswith("gpu_check: step 'environment' failed: no CUDA device")
    )
    res = json.loads(out.read_text())
    assert res["failed"]["step"] == "environment" and res["steps"] == {}
