"""Resume after SIGKILL: a run killed after a block, and again in the middle of one, finishes (rerun with
the same arguments) with byte-identical files to an uninterrupted run; a killed run never looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import make_switch, output_bytes

from qmoe.config import CompressConfig
from qmoe.pipeline.report import stable
from qmoe.pipeline.run import KILL_ENV
from qmoe.pipeline.state import PARTIAL_DIR

CFG = CompressConfig(calib_samples=16, eval_samples=8, batch_size=8)


def killed_run(src: Path, out: Path, at: str) -> None:
    """Run compress in a subprocess that SIGKILLs itself at ``at`` ("after:G" / "during:G")."""
    code = (
        "import sys; from qmoe.pipeline import compress; from qmoe.config import CompressConfig; "
        f"compress(sys.argv[1], sys.argv[2], CompressConfig.from_dict({CFG.to_dict()!r}), device='cpu', "
        "progress=False)"
    )
    env = {**os.environ, KILL_ENV: at}
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (out / "config.json").exists()  # never looks complete


@pytest.mark.slow  # killed and restarted CLI processes
@pytest.mark.timeout(300)
def test_resume_after_kill_is_byte_identical(tmp_path: Path, tokenizer_dir: Path) -> None:
    from qmoe.pipeline import compress

    src = make_switch(tmp_path / "src", tokenizer_dir)  # encoder blocks 0, 1 (MoE), decoder blocks 2, 3 (MoE)
    ref = compress(src, tmp_path / "ref", CFG, device="cpu", progress=False)

    out = tmp_path / "out"
    killed_run(src, out, "after:1")  # the encoder done
    state = json.loads((out / PARTIAL_DIR / "state.json").read_text())
    assert state["done"] == 2 and len(state["layers"]) == 1
    killed_run(src, out, "during:3")  # decoder block 1 (MoE): killed between its quantization passes
    assert json.loads((out / PARTIAL_DIR / "state.json").read_text())["done"] == 3

    rep = compress(src, out, CFG, device="cpu", progress=False)
    assert rep["resumed_from_block"] == 3
    assert output_bytes(out) == output_bytes(tmp_path / "ref")
    assert stable(rep) == stable(ref)
    assert not (out / PARTIAL_DIR).exists()

    # A finished directory of the same run: nothing to do, same report.
    assert compress(src, out, CFG, device="cpu", progress=False) == rep
