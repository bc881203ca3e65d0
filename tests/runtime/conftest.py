"""Compressed checkpoint directories built quickly for runtime tests (no calibration, no pipeline run).

``write_compressed`` rounds every expert weight of a dense Hugging Face directory to QMoE's ternary grid
(``qmoe.gptq.rtn_quantize``), encodes it with ``qmoe.codec.encode_ternary`` and writes the layout that
``qmoe compress`` writes (docs/pipeline.md): one shard of non-block tensors, then one shard per MoE layer
holding that layer's encoded experts, an index, ``config.json`` with ``quantization_config`` last. It also
writes ``dequantized/``: an ordinary dense directory whose expert weights are the decoded ones, the reference
that the compressed model must reproduce.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

N_SHARD_FILES_PATTERN = "model-{k:05d}-of-{n:05d}.safetensors"


def write_compressed(dense: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qmoe.adapters import get_adapter
    from qmoe.codec import FORMAT_VERSION, dequantize, encode_ternary, save_shard
    from qmoe.gptq import rtn_quantize

    cfg = json.loads((dense / "config.json").read_text())
    adapter = get_adapter(cfg)
    layout = adapter.experts
    with safe_open(str(dense / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    out.mkdir(parents=True, exist_ok=True)
    layers = adapter.moe_layers(cfg)
    n = len(layers) + 1
    weight_map: dict[str, str] = {}
    dequantized = dict(tensors)
    for k, layer in enumerate(layers, start=1):
        encoded = {}
        for proj in layout.projections:
            keys = [layout.expert_key(layer, e, proj) for e in range(adapter.num_experts(cfg))]
            q = rtn_quantize(torch.stack([tensors.pop(key) for key in keys]).float(), grid="ternary")
            for e, key in enumerate(keys):
                levels = q.levels[e].numpy()  # [rows, 3]: lo, 0, hi
                enc = encode_ternary(q.codes[e].numpy(), levels[:, 0], levels[:, 2])
                encoded[key] = enc
                dequantized[key] = torch.from_numpy(dequantize(enc)).to(dequantized[key].dtype)
        name = N_SHARD_FILES_PATTERN.format(k=k + 1, n=n)
        save_shard(out / name, {}, encoded, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(encoded, name))
    name = N_SHARD_FILES_PATTERN.format(k=1, n=n)
    save_shard(out / name, tensors, {}, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"format": "qmoe"}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    for f in dense.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, out / f.name)
    qc = {"quant_method": "qmoe", "format_version": FORMAT_VERSION, "bits": "ternary", "grid": "ternary",
          "method": "rtn", "qmoe_version": "test"}
    (out / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}, indent=2))

    ref = out.parent / f"{out.name}-dequantized"
    ref.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in dequantized.items()}, str(ref / "model.safetensors"),
              metadata={"format": "pt"})
    for f in dense.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, ref / f.name)
    return out


def dequantized_dir(compressed: Path) -> Path:
    """The dense reference written next to a ``write_compressed`` directory."""
    return compressed.parent / f"{compressed.name}-dequantized"


@pytest.fixture(scope="session")
def switch_compressed(tmp_path_factory: pytest.TempPathFactory, tiny_switch_dir: Path) -> Path:
    return write_compressed(tiny_switch_dir, tmp_path_factory.mktemp("switch") / "compressed")


@pytest.fixture(scope="session")
def qwen3_dense(tiny_qwen3_moe_dir: Path) -> Path:
    return tiny_qwen3_moe_dir


@pytest.fixture(scope="session")
def qwen3_compressed(tmp_path_factory: pytest.TempPathFactory, qwen3_dense: Path) -> Path:
    return write_compressed(qwen3_dense, tmp_path_factory.mktemp("qwen3") / "compressed")


def sixteen_bit_copy(src: Path, dst: Path, dtype) -> Path:
    """``src`` with its non-expert tensors stored as ``dtype`` (as published checkpoints store them)."""
    from qmoe.codec import load_shard, save_shard

    shutil.copytree(src, dst)
    for shard in sorted(dst.glob("*.safetensors")):
        got = load_shard(shard)
        if got.tensors:
            save_shard(shard, {k: v.to(dtype) for k, v in got.tensors.items()}, got.encoded,
                       metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def sixteen_bit():
    """``sixteen_bit(src, dst, dtype)``: a copy of a compressed directory with 16-bit non-expert tensors."""
    return sixteen_bit_copy


@pytest.fixture(scope="session")
def reference_of():
    """``reference_of(compressed_dir)``: the dense directory holding its dequantized expert weights."""
    return dequantized_dir


@pytest.fixture
def copy_dir(tmp_path: Path):
    """A writable copy of a directory, for tests that damage it."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return _copy
