"""Stream a random SwitchTransformers checkpoint of any size to disk, one block per shard, without ever
building the model in memory (the writer holds one block at a time), in the on-disk layout of transformers.

    python benchmarks/synthetic_switch.py --out DIR --target-gb 31 [--experts 32] [--d-model 768]
    python benchmarks/synthetic_switch.py --out DIR --layers 4           # 4 encoder + 4 decoder blocks

Every block is sparse (an MoE layer in each), weights ``N(0, 1/fan_in)`` in ``--dtype`` (bf16 by default),
norms 1. ``--target-gb`` picks the number of blocks (encoder = decoder) so the checkpoint has at least that
many GB (10^9 bytes). Resumable: a shard is written under a temporary name and renamed, finished shards are
kept on a rerun, and ``config.json`` is written last, so a directory with one is complete. The tokenizer is
a 8k byte-level BPE trained on the built-in corpus (as the tests' models).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def switch_config(layers: int, experts: int, d_model: int, d_ff: int, vocab: int, dtype: str) -> Any:
    from transformers import SwitchTransformersConfig

    cfg = SwitchTransformersConfig(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=64,
        d_ff=d_ff,
        num_heads=d_model // 64,
        num_layers=layers,
        num_decoder_layers=layers,
        num_sparse_encoder_layers=layers,
        num_sparse_decoder_layers=layers,
        num_experts=experts,
        expert_capacity=128,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=True,
    )
    cfg.dtype = DTYPES[dtype]
    return cfg


def block_bytes(experts: int, d_model: int, d_ff: int, dtype: str) -> int:
    """Bytes of one sparse block's tensors (experts, router, attention, norms): from a 1-block model."""
    shapes = _shapes(switch_config(1, experts, d_model, d_ff, 256, dtype))
    size = 2 if dtype != "fp32" else 4
    return sum(size * _numel(s) for k, s in shapes.items() if k.startswith("encoder.block.0."))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


def _shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import SwitchTransformersForConditionalGeneration

    with torch.device("meta"):
        model = SwitchTransformersForConditionalGeneration(cfg)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def write_checkpoint(
    path: Path, tokenizer_dir: Path | None, cfg: Any, seed: int = 0, log: bool = True
) -> int:
    """Write ``cfg``'s random checkpoint into ``path`` shard by shard; returns its bytes. Resumable."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, cfg.dtype if isinstance(cfg.dtype, str) else str(cfg.dtype).split(".")[-1])
    path.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(cfg)
    groups: dict[str, list[str]] = {}
    for k in shapes:
        parts = k.split(".")
        groups.setdefault(".".join(parts[:3]) if parts[1] == "block" else "rest", []).append(k)
    names = sorted(groups)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for n, group in enumerate(names):
        name = f"model-{n + 1:05d}-of-{len(names):05d}.safetensors"
        keys = groups[group]
        nbytes = sum(_numel(shapes[k]) * dtype.itemsize for k in keys)
        weight_map.update({k: name for k in keys})
        total += nbytes
        if (path / name).is_file():
            continue  # written by an earlier (interrupted) run
        gen = torch.Generator().manual_seed(seed * 100_003 + n)  # per shard: a resumed build is the same
        tensors = {}
        for k in keys:
            if k.endswith("layer_norm.weight"):
                tensors[k] = torch.ones(shapes[k], dtype=dtype)
            else:
                tensors[k] = (torch.randn(shapes[k], generator=gen) * shapes[k][-1] ** -0.5).to(dtype)
        tmp = path / f"{name}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / name)
        del tensors
        if log:
            print(
                f"  {name}: {group}, {nbytes / 1e9:.2f} GB, {total / 1e9:.1f} GB so far, "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
    cfg.save_pretrained(path)  # last: marks a complete checkpoint
    return total


def tokenizer(path: Path, vocab: int) -> Path:
    """A byte-level BPE tokenizer of ``vocab`` entries trained on the built-in corpus (cached in ``path``)."""
    if not (path / "tokenizer.json").is_file():
        from qmoe.calib import bible_split
        from qmoe.calib.tokenizer import train_tokenizer

        train_tokenizer(bible_split("train")[:400], vocab_size=vocab).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--target-gb", type=float, help="at least this many GB (10^9 bytes) on disk")
    size.add_argument("--layers", type=int, help="encoder (= decoder) blocks")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = Path(args.out)
    layers = args.layers
    if layers is None:
        per_block = block_bytes(args.experts, args.d_model, args.d_ff, args.dtype)
        layers = -(-int(args.target_gb * 1e9) // (2 * per_block))  # ceil; the embeddings come on top
    cfg = switch_config(layers, args.experts, args.d_model, args.d_ff, args.vocab, args.dtype)
    tok = tokenizer(out.parent / f"tokenizer-{args.vocab}", args.vocab)
    print(
        f"writing {2 * layers} blocks x {args.experts} experts ({args.d_model}x{args.d_ff}) to {out}",
        flush=True,
    )
    t0 = time.perf_counter()
    total = write_checkpoint(out, tok, cfg, args.seed)
    print(f"done: {total / 1e9:.2f} GB ({total / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
