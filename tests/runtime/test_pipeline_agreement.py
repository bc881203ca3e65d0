"""A directory written by ``qmoe compress`` loads; ``qmoe eval`` reproduces the pipeline's in-pass loss."""

from __future__ import annotations

import json

import pytest

from qmoe.cli import main


def test_eval_reproduces_loss_compressed(tiny_switch_dir, tmp_path, capsys) -> None:
    from qmoe.config import CompressConfig
    from qmoe.pipeline import compress

    out = tmp_path / "compressed"
    config = CompressConfig(method="gptq", calib_samples=24, eval_samples=12, batch_size=8)
    report = compress(tiny_switch_dir, out, config, device="cpu", progress=False)
    want = report["eval"]
    argv = ["eval", str(out), "--split", want["split"], "--samples", str(want["samples"]), "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss_compressed"], rel=1e-3)
