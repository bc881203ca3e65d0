"""``qmoe decompress``: a compressed directory back to a plain Hugging Face checkpoint.

For runtimes that do not know qmoe's format: every encoded expert matrix is decoded (``codec.dequantize``,
float32 ``[out, in]``) and written under its own on-disk key, which is the family's original layout (the
compressed shards keep the source's key names; a stacked layout's ``[E, ...]`` tensors, gpt-oss's, are
reassembled from the per-expert matrices ``<key>.<e>``), next to the non-expert tensors, all cast to one
``dtype``.
``config.json`` loses its ``quantization_config``, so transformers loads the result without qmoe installed.

Streaming: one shard is read, decoded and written at a time, so peak memory is about one decoded shard. The
output is written into ``OUT.partial`` and renamed at the end: an interrupted run leaves no half checkpoint
under the requested name (rerunning starts over). An ``OUT.partial`` without qmoe's marker file is someone
else's and is refused, never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from qmoe.errors import ConfigError, FormatError

PARTIAL_MARKER = ".qmoe-decompress-partial"  # in OUT.partial: a later run may delete the folder
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
         "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def _dropped_by_bias_key(adapter: Any, cfg: dict[str, Any], path: Path) -> dict[str, tuple[str, list[int]]]:
    """``{router tensor's on-disk key: (MoE layer, dropped experts)}``; ConfigError where the family's
    router has no tensor that can exclude an expert (transformers could not reproduce the model)."""
    dropped = {k: v for k, v in ((cfg.get("quantization_config") or {}).get("dropped_experts") or {}).items()
               if v}
    if not dropped:
        return {}
    if adapter.router_drop_bias is None:
        n = sum(len(v) for v in dropped.values())
        raise ConfigError(f"{path} has {n} dropped experts (quantization_config.dropped_experts), and a "
                          f"dense {cfg.get('model_type')} router has no tensor that excludes an expert, so"
                          " no dense checkpoint reproduces this model: run it with qmoe (qmoe.load, qmoe "
                          "generate), or compress with --no-drop-experts")
    return {f"{layer}.{adapter.router}.{adapter.router_drop_bias}": (layer, sorted(v))
            for layer, v in dropped.items()}


def decompress(src: str | Path, out: str | Path, dtype: str | None = None) -> dict[str, Any]:
    """Write the dense checkpoint of the compressed directory ``src`` to ``out``; returns a summary.

    ``dtype``: ``bf16``, ``fp16`` or ``fp32`` for every floating tensor (default: the dtype recorded in the
    source's config, else bf16). Refuses an existing non-empty ``out``."""
    import torch
    from safetensors.torch import save_file

    from qmoe.adapters import get_adapter
    from qmoe.codec import dequantize, load_shard
    from qmoe.runtime.load import INDEX_FILE, check_dir

    path, cfg, files = check_dir(src)
    adapter = get_adapter(cfg)
    layout, n_experts = adapter.experts, adapter.num_experts(cfg)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out directory")
    recorded = str(cfg.get("dtype") or cfg.get("torch_dtype"))
    name = dtype or {v: k for k, v in DTYPES.items()}.get(recorded, "bf16")
    if name not in DTYPES:
        raise ConfigError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, DTYPES[name])
    dropped = _dropped_by_bias_key(adapter, cfg, path)  # router tensor key -> (MoE layer, dropped experts)
    tmp = out.with_name(out.name + ".partial")
    if tmp.is_symlink() or tmp.exists():  # ours (an interrupted run) only if it holds our marker
        if tmp.is_symlink() or not tmp.is_dir() or not (tmp / PARTIAL_MARKER).is_file():
            raise ConfigError(f"{tmp} exists and was not left by qmoe decompress; move it away or choose "
                              "another --out")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARKER).write_text("an unfinished qmoe decompress; safe to delete\n")

    weight_map: dict[str, str] = {}
    total = experts = 0
    for f in files:
        shard = load_shard(f, verify=True)  # crc32 of every tensor checked
        dense = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in shard.tensors.items()}
        stacks: dict[str, dict[int, Any]] = {}  # stacked layouts: on-disk key -> {expert: [out, in]}
        for bias_key, (layer, gone) in dropped.items():
            if bias_key not in dense:
                continue
            # the router never chooses them (-inf added to their choice score); their weights are zeros
            dense[bias_key] = dense[bias_key].clone()
            dense[bias_key][list(gone)] = float("-inf")
            for e in gone:
                for proj in layout.projections:
                    w = torch.zeros(layout.shape(cfg, proj), dtype=torch_dtype)
                    key = layout.expert_key(layer, e, proj)
                    if layout.stacked:
                        stacks.setdefault(key.rsplit(".", 1)[0], {})[e] = w
                    else:
                        dense[key] = w
        for key, enc in shard.encoded.items():
            w = torch.from_numpy(dequantize(enc)).to(torch_dtype)  # [out, in], nn.Linear layout
            experts += 1
            if layout.stacked:  # "<on-disk key>.<e>"
                disk, e = key.rsplit(".", 1)
                stacks.setdefault(disk, {})[int(e)] = w
            else:
                dense[key] = w
        for disk, mats in stacks.items():
            if sorted(mats) != list(range(n_experts)):
                raise FormatError(f"{f}: {disk} has {len(mats)} of {n_experts} experts; re-run qmoe compress")
            w = torch.stack([mats[e] for e in range(n_experts)])  # [E, out, in]
            dense[disk] = w.transpose(1, 2) if layout.transposed else w
        save_file({k: v.contiguous() for k, v in dense.items()}, str(tmp / f.name), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in dense.values())
        weight_map.update({k: f.name for k in dense})
        del shard, dense
    if len(files) > 1 or (path / INDEX_FILE).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    plain["dtype"] = DTYPES[name]
    (tmp / "config.json").write_text(json.dumps(plain, indent=2) + "\n")
    for fname in _COPY:
        if (path / fname).is_file():
            shutil.copy2(path / fname, tmp / fname)
    (tmp / PARTIAL_MARKER).unlink()
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return {"source": str(path), "out": str(out), "dtype": name, "shards": len(files),
            "expert_matrices": experts, "tensors": len(weight_map), "bytes": total}
