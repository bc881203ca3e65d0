"""Checks before compute: each problem is a one-line QMoEError, raised before any output is written."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from test_pipeline import make_switch

from qmoe.config import CompressConfig
from qmoe.errors import ConfigError, QMoEError, SourceError

CFG = CompressConfig(calib_samples=8, eval_samples=4)


@pytest.fixture(scope="module")
def sharded_switch(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from transformers import SwitchTransformersForConditionalGeneration

    path = make_switch(tmp_path_factory.mktemp("sw"), tokenizer_dir)
    model = SwitchTransformersForConditionalGeneration.from_pretrained(path)
    shutil.rmtree(path / "model.safetensors", ignore_errors=True)
    (path / "model.safetensors").unlink()
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def fails(src: Path, out: Path, error: type[QMoEError], match: str, **kw) -> str:
    from qmoe.pipeline import compress

    with pytest.raises(error, match=match) as info:
        compress(src, out, CFG, **{"device": "cpu", "progress": False, **kw})
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_family_names_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    cfg = {"model_type": "jamba", "architectures": ["JambaForCausalLM"], "num_experts": 16}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")  # a weights file: the family is what fails
    fails(
        tmp_path / "m",
        tmp_path / "out",
        SourceError,
        r"unsupported model family model_type='jamba' \(JambaForCausalLM\); qmoe supports "
        ".*MixtralForCausalLM.*DeepseekV3ForCausalLM.*GptOssForCausalLM",
    )
    assert not (tmp_path / "out").exists()


def test_missing_shard(sharded_switch: Path, tmp_path: Path) -> None:
    src = copy_model(sharded_switch, tmp_path / "m")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[-1].unlink()
    fails(src, tmp_path / "out", SourceError, f"lacks 1 of the {len(shards)} weight shards")
    assert not (tmp_path / "out").exists()


def test_sharded_source_compresses(sharded_switch: Path, tmp_path: Path) -> None:
    from qmoe.pipeline import compress

    rep = compress(
        sharded_switch, tmp_path / "out", CFG.replace(method="rtn", eval=False), device="cpu", progress=False
    )
    assert rep["totals"]["experts"] == 8


def test_shapes_disagree_with_config(sharded_switch: Path, tmp_path: Path) -> None:
    src = copy_model(sharded_switch, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg["d_ff"] = 40
    (src / "config.json").write_text(json.dumps(cfg))
    fails(src, tmp_path / "out", SourceError, r"has shape \[48, 32\] but config.json implies \[40, 32\]")

    cfg["d_ff"], cfg["num_experts"] = 48, 5
    (src / "config.json").write_text(json.dumps(cfg))
    fails(src, tmp_path / "out", SourceError, "lacks 2 tensor.*expert_4")
    assert not (tmp_path / "out").exists()


def test_output_directory_of_another_run(sharded_switch: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails(sharded_switch, out, ConfigError, "not empty and holds no qmoe run")

    other = tmp_path / "other"
    (other / ".qmoe-partial").mkdir(parents=True)
    (other / ".qmoe-partial" / "state.json").write_text(json.dumps({"fingerprint": "0" * 32, "done": 1}))
    fails(sharded_switch, other, ConfigError, "unfinished qmoe run with different settings")
    assert sorted(p.name for p in other.iterdir()) == [".qmoe-partial"]


def test_too_little_disk(sharded_switch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qmoe.pipeline.preflight as preflight

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    fails(sharded_switch, tmp_path / "out", QMoEError, "not enough disk space")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_and_bad_device(sharded_switch: Path, tmp_path: Path) -> None:
    src = copy_model(sharded_switch, tmp_path / "m")
    for f in src.glob("tokenizer*"):
        f.unlink()
    fails(src, tmp_path / "out", SourceError, "no tokenizer files")
    assert not (tmp_path / "out").exists()
    fails(sharded_switch, tmp_path / "out", ConfigError, "invalid --device", device="tpu:9")


def test_pytorch_bin_source(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A ``pytorch_model.bin`` checkpoint is read with weights_only=True and gives the same output."""
    import torch
    from safetensors import safe_open
    from test_pipeline import output_bytes

    from qmoe.pipeline import compress

    st = make_switch(tmp_path / "st", tokenizer_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    with safe_open(str(st / "model.safetensors"), "pt") as f:  # transformers 5 writes no .bin itself
        torch.save({k: f.get_tensor(k) for k in f.keys()}, bin_dir / "pytorch_model.bin")
    for f in st.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bin_dir / f.name)
    assert (bin_dir / "pytorch_model.bin").is_file() and not (bin_dir / "model.safetensors").exists()
    cfg = CFG.replace(method="rtn", eval=False)
    compress(st, tmp_path / "a", cfg, device="cpu", progress=False)
    compress(bin_dir, tmp_path / "b", cfg, device="cpu", progress=False)
    a, b = output_bytes(tmp_path / "a"), output_bytes(tmp_path / "b")
    assert {k: v for k, v in a.items() if k != "config.json"} == {
        k: v for k, v in b.items() if k != "config.json"
    }
