"""``benchmarks/gpu_check.sh --dry-run``: every step of the GPU check on the CPU under Triton's interpreter,
so that the script a GPU window runs has run before (issue 15)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# find_spec, not import: triton reads TRITON_INTERPRET at its first import, which the interpreter tests own
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path: Path, *cmd: str, timeout: int) -> subprocess.CompletedProcess:
    """Run a gpu_check entry point with ``--out``/``--work`` under ``tmp_path``; the script itself sets
    TRITON_INTERPRET (for the dry run), so the suite's own value is not passed on."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    argv = [*cmd, "--out", str(tmp_path / "gpu_check.json"), "--work", str(tmp_path / "work")]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow  # the whole check script: two compressions, evaluations, kernels (the slow tier)
def test_gpu_check_dry_run_passes_every_step(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    r = _check(tmp_path, "bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert list(res["steps"]) == ["environment", "tests", "compress", "runtime", "kernels", "end_to_end"]
    rt = res["steps"]["runtime"]
    assert rt["prepare_counts"] == [1]
    assert rt["logits_max_abs_diff"] <= 1e-3 * rt["logits_scale"]
    # On the dry run both sides run on the CPU, so their difference is zero by construction and says
    # nothing; what can fail is that each side compressed its experts to a finite, changed loss.
    c = res["steps"]["compress"]
    for side in ("device", "cpu"):
        # below 8 bits/weight: encoded, not stored at 16 bits (the check's tiny model has rows a few dozen
        # weights wide, so per-row metadata alone puts it near 3.7 bits/weight)
        assert 0 < c[side]["expert_bits_per_weight"] < 8, c[side]
        loss, ref = c[side]["loss_compressed"], c[side]["loss_reference"]
        assert math.isfinite(loss) and loss != ref, c[side]


def test_gpu_check_stops_at_the_first_failure_with_one_line(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    # without --dry-run on a machine with no GPU, the environment step fails and nothing else runs
    r = _check(tmp_path, sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), timeout=300)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert r.returncode == 1
    assert (
        r.stderr.strip().splitlines()[-1].startswith("gpu_check: step 'environment' failed: no CUDA device")
    )
    res = json.loads(out.read_text())
    assert res["failed"]["step"] == "environment" and res["steps"] == {}
