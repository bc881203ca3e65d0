"""Expert weights as every tool's output is compared: dense ``[out, in]`` matrices under the on-disk keys of
Qwen3-MoE checkpoints (``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``), written with the
bytes each tool stores for them. Imports numpy and safetensors only, so the workers can use it in the peers'
own environments."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
# llama.cpp's stacked expert tensors [E, out, in] and the HF projection each holds
GGUF_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")


def expert_keys(names) -> list[str]:
    return sorted(n for n in names if EXPERT_KEY.fullmatch(n))


def unstack_gguf(name: str, stacked: np.ndarray) -> dict[str, np.ndarray]:
    """``blk.L.ffn_P_exps.weight`` ``[E, out, in]`` -> one HF key per expert."""
    m = GGUF_EXPERTS.fullmatch(name)
    assert m is not None, f"{name} is not a stacked expert tensor"
    layer, proj = m.group(1), m.group(2)
    assert stacked.ndim == 3, f"{name}: expected [E, out, in], got {stacked.shape}"
    return {
        f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight": np.ascontiguousarray(stacked[e])
        for e in range(stacked.shape[0])
    }


def write_variant(out: Path, weights: dict[str, np.ndarray], info: dict) -> None:
    """``out/experts.safetensors`` (float32) and ``out/info.json``; ``info.json`` is written last, through a
    temporary name, so a directory with it is complete."""
    from safetensors.numpy import save_file

    assert {"expert_bytes", "expert_weights"} <= set(info), f"info lacks the byte accounting: {sorted(info)}"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "experts.safetensors.tmp"
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}, str(tmp))
    os.replace(tmp, out / "experts.safetensors")
    info = {**info, "expert_bits_per_weight": 8 * info["expert_bytes"] / info["expert_weights"]}
    (out / "info.json.tmp").write_text(json.dumps(info, indent=1) + "\n")
    os.replace(out / "info.json.tmp", out / "info.json")


def done(out: Path) -> bool:
    return (out / "info.json").is_file() and (out / "experts.safetensors").is_file()


def run_variants(variants: list[dict], one) -> None:
    """``one(v, out)`` for every variant whose output is not complete yet. A variant that fails leaves its
    error in ``out/error.txt`` (reported in the table in place of its numbers) and the others still run."""
    import sys

    for v in variants:
        out = Path(v["out"])
        if done(out):
            continue
        (out / "error.txt").unlink(missing_ok=True)
        try:
            one(v, out)
        except Exception as exc:  # noqa: BLE001 - reported per variant in the table, not fatal to the rest
            out.mkdir(parents=True, exist_ok=True)
            first = " ".join(str(exc).strip().splitlines()[:2])
            (out / "error.txt").write_text(f"{type(exc).__name__}: {first}\n")
            print(f"{v.get('name', v.get('type'))} seed {v.get('seed')}: {exc}", file=sys.stderr)
