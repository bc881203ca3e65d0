"""The compressed checkpoint directory: looks like any Hugging Face model directory.

::

    config.json                        source config + "quantization_config" (written last: marks completion)
    model-00001-of-000NN.safetensors   tensors outside the blocks (embeddings, final norms, head)
    model-000KK-of-000NN.safetensors   block K-2: its non-expert tensors as in the source, its experts encoded
    model.safetensors.index.json       "weight_map": every tensor name and encoded-matrix name -> shard file
    qmoe_report.json                   statistics (qmoe.pipeline.report)
    tokenizer files, generation_config.json   copied unchanged

Shards are written with ``qmoe.codec.save_shard`` (safetensors, crc32 per tensor, atomic). An expert weight
is one encoded matrix named by its on-disk Hugging Face key, in ``nn.Linear`` orientation ``[out, in]``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from qmoe.pipeline.state import atomic_write_text

INDEX_FILE = "model.safetensors.index.json"
# Files copied from the source directory unchanged (tokenizer and generation settings).
COPY_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "chat_template*",
    "preprocessor_config.json",
)


def shard_name(k: int, n: int) -> str:
    """File of shard ``k`` (0-based) of ``n``: shard 0 holds non-block tensors, shard ``g + 1`` block g."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_shard(out: Path, k: int, n: int, tensors: dict[str, Any], encoded: dict[str, Any]) -> str:
    from qmoe.codec import save_shard

    name = shard_name(k, n)
    # No extra metadata keys: safetensors writes its metadata map in hash order, so a second key would make
    # the file bytes vary from run to run.
    save_shard(out / name, tensors, encoded)
    return name


def write_index(out: Path, n: int, names_per_shard: dict[int, list[str]], encoded: list[str]) -> int:
    """Index of all shards; returns their total size in bytes."""
    weight_map = {}
    for k, names in names_per_shard.items():
        for name in names:
            weight_map[name] = shard_name(k, n)
    total = sum((out / shard_name(k, n)).stat().st_size for k in range(n))
    index = {
        "metadata": {"total_size": total, "format": "qmoe"},
        "qmoe_encoded": sorted(encoded),
        "weight_map": dict(sorted(weight_map.items())),
    }
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    return total


def copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for pattern in COPY_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (out / f.name).exists():
                tmp = out / (f.name + ".tmp")
                shutil.copyfile(f, tmp)
                tmp.replace(out / f.name)
                copied.append(f.name)
    return copied


def write_config(out: Path, source_cfg: dict[str, Any], quantization_config: dict[str, Any]) -> None:
    cfg = {**source_cfg, "quantization_config": quantization_config}
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
