"""A compressed directory that cannot be loaded is one clear line: newer format, missing or corrupt shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qmoe
from qmoe.cli import main
from qmoe.codec import FORMAT_VERSION
from qmoe.errors import FormatError, SourceError


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _bump_version(path: Path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (path / "config.json").write_text(json.dumps(cfg))


def _expert_shard(path: Path) -> Path:
    return path / "model-00002-of-00003.safetensors"  # the first MoE layer's encoded experts


def test_newer_format_version(switch_compressed, copy_dir, capsys) -> None:
    from transformers import AutoModelForSeq2SeqLM

    path = copy_dir(switch_compressed)
    _bump_version(path)
    with pytest.raises(FormatError, match=f"newer qmoe \\(format version {FORMAT_VERSION + 1}.*upgrade qmoe"):
        qmoe.load(path)
    with pytest.raises(FormatError, match="upgrade qmoe"):  # the transformers way stops at the same check
        AutoModelForSeq2SeqLM.from_pretrained(path)
    assert "upgrade qmoe" in _cli_error(["generate", str(path), "--prompt", "x"], capsys)


def test_missing_shard(switch_compressed, copy_dir, capsys) -> None:
    path = copy_dir(switch_compressed)
    _expert_shard(path).unlink()
    with pytest.raises(FormatError, match="shard model-00002-of-00003.safetensors is missing"):
        qmoe.load(path)
    assert "model-00002-of-00003.safetensors is missing" in _cli_error(["eval", str(path)], capsys)


@pytest.mark.parametrize("where", ["header", "data"])
def test_corrupt_shard(switch_compressed, copy_dir, capsys, where) -> None:
    path = copy_dir(switch_compressed)
    shard = _expert_shard(path)
    raw = bytearray(shard.read_bytes())
    # safetensors: 8-byte header length, JSON header, then the tensor bytes (here: the last expert's)
    at = 12 if where == "header" else len(raw) - 100
    raw[at] ^= 0x5A
    shard.write_bytes(bytes(raw))
    if where == "data":  # a damaged expert: found when read (mapped: on first use, test_mapped.py)
        with pytest.raises(FormatError, match="model-00002-of-00003.safetensors"):
            qmoe.load(path, mapped=False)
        assert main(["verify", str(path), "--quiet"]) == 1
        assert "model-00002-of-00003.safetensors" in capsys.readouterr().out
        return
    with pytest.raises(FormatError, match="model-00002-of-00003.safetensors"):
        qmoe.load(path)
    assert "model-00002-of-00003.safetensors" in _cli_error(["generate", str(path), "--prompt", "x"], capsys)


def test_truncated_shard(switch_compressed, copy_dir) -> None:
    path = copy_dir(switch_compressed)
    shard = _expert_shard(path)
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(FormatError, match="model-00002-of-00003.safetensors"):
        qmoe.load(path)


def test_dense_directory_is_not_compressed(tiny_switch_dir) -> None:
    with pytest.raises(SourceError, match="not a qmoe-compressed model"):
        qmoe.load(tiny_switch_dir)


def test_wrong_expert_shape(switch_compressed, copy_dir) -> None:
    path = copy_dir(switch_compressed)
    cfg = json.loads((path / "config.json").read_text())
    cfg["d_ff"] = 48  # the stored experts are 64 wide
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="does not match its config.json"):
        qmoe.load(path)
