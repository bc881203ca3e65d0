"""A Qwen3-MoE checkpoint with Qwen3-30B-A3B's layer shapes and random weights, for speed benchmarks.

    python benchmarks/realshape.py [--layers 6] [--out DIR]     # prints the directory

Every layer is Qwen3-30B-A3B's (its published config.json): hidden 2048, 32 query heads and 4 key/value
heads of head_dim 128 with per-head q/k RMSNorm, 128 experts of moe_intermediate 768, top-8 with normalised
gate weights, SwiGLU. What differs: ``--layers`` layers instead of 48, and the vocabulary, which is the
built-in tiny-qwen3-moe's tokenizer (8,192 tokens instead of 151,936), so that every tool tokenizes the
same text the same way. Per layer that is 604M expert weights (1.21 GB in bf16) and 18.9M attention
weights; the default 6 layers hold 3.62B expert weights (7.25 GB bf16) and 3.67B in all.

Weights are normal with std 0.02 (Qwen3's ``initializer_range``), norms 1: with RMS-normalised hidden states
the router's logits then have std ~0.9, so routing spreads over the experts as in a trained model rather
than collapsing on a few. Quality is meaningless; speed and memory are not.

Written in the on-disk layout of the published checkpoints (one ``experts.{e}.{gate,up,down}_proj.weight``
per expert, bf16), one safetensors shard per layer plus one for the embeddings and head, each written under
a temporary name and renamed: an interrupted run resumes at the first missing shard, and a finished
directory (``config.json`` is written last) is reused. Default directory:
``~/.cache/qmoe-bench/qwen3-30b-a3b-shapes-L{layers}`` (``$QMOE_BENCH_CACHE`` moves the root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

CONFIG = {  # Qwen3-30B-A3B's config.json, but for num_hidden_layers, vocab_size and the token ids
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "decoder_sparse_step": 1,
    "dtype": "bfloat16",
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 4096,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
}
STD = 0.02
TOKENIZER_FROM = "tiny-qwen3-moe"


def default_dir(layers: int) -> Path:
    root = Path(os.environ.get("QMOE_BENCH_CACHE", Path.home() / ".cache" / "qmoe-bench"))
    return root / f"qwen3-30b-a3b-shapes-L{layers}"


def config(layers: int, vocab: int, tok_cfg: dict) -> dict:
    return {
        **CONFIG,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "bos_token_id": tok_cfg.get("bos_token_id"),
        "eos_token_id": tok_cfg.get("eos_token_id"),
        "pad_token_id": tok_cfg.get("pad_token_id"),
    }


def _randn(gen, *shape: int):
    import torch

    return (torch.randn(*shape, generator=gen) * STD).to(torch.bfloat16)


def layer_tensors(cfg: dict, i: int, seed: int) -> dict:
    """Layer ``i``'s tensors under their published names, bf16 ([out, in] as nn.Linear)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["moe_intermediate_size"]
    p = f"model.layers.{i}."
    one = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731
    t = {
        p + "input_layernorm.weight": one(h),
        p + "post_attention_layernorm.weight": one(h),
        p + "self_attn.q_proj.weight": _randn(gen, nq * hd, h),
        p + "self_attn.k_proj.weight": _randn(gen, nkv * hd, h),
        p + "self_attn.v_proj.weight": _randn(gen, nkv * hd, h),
        p + "self_attn.o_proj.weight": _randn(gen, h, nq * hd),
        p + "self_attn.q_norm.weight": one(hd),
        p + "self_attn.k_norm.weight": one(hd),
        p + "mlp.gate.weight": _randn(gen, cfg["num_experts"], h),
    }
    for e in range(cfg["num_experts"]):
        q = f"{p}mlp.experts.{e}."
        t[q + "gate_proj.weight"] = _randn(gen, inter, h)
        t[q + "up_proj.weight"] = _randn(gen, inter, h)
        t[q + "down_proj.weight"] = _randn(gen, h, inter)
    return t


def head_tensors(cfg: dict, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
    v, h = cfg["vocab_size"], cfg["hidden_size"]
    return {
        "model.embed_tokens.weight": _randn(gen, v, h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": _randn(gen, v, h),
    }


def build(out: Path, layers: int = 6, seed: int = 0, log=print) -> Path:
    """Write (or finish writing) the checkpoint into ``out``; returns ``out``. Reused when complete."""
    from safetensors.torch import save_file

    from qmoe.sources import TOKENIZER_FILES, resolve_source

    if (out / "config.json").is_file():
        return out
    if layers < 1:
        raise SystemExit(f"--layers {layers}: need at least 1")
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = resolve_source(TOKENIZER_FROM)
    src_cfg = json.loads((tok_dir / "config.json").read_text())
    cfg = config(layers, src_cfg["vocab_size"], src_cfg)
    total = layers + 1
    names = [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)]
    weight_map: dict[str, str] = {}
    for k, name in enumerate(names):
        path = out / name
        if k == 0:
            make = lambda: head_tensors(cfg, seed)  # noqa: E731
        else:
            make = lambda i=k - 1: layer_tensors(cfg, i, seed)  # noqa: E731
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                weight_map.update({key: name for key in f.keys()})  # noqa: SIM118
            continue
        t0 = time.perf_counter()
        tensors = make()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        weight_map.update({key: name for key in tensors})
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        del tensors
        log(f"  {name}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    for f in TOKENIZER_FILES:
        if (tok_dir / f).is_file():
            shutil.copy(tok_dir / f, out / f)
    gen_cfg = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=1) + "\n")
    index = {
        "metadata": {"total_size": sum((out / n).stat().st_size for n in names)},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out / "config.json")  # last: marks the directory complete
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, default=None, help="default: ~/.cache/qmoe-bench/qwen3-30b-a3b-shapes-L<layers>"
    )
    args = ap.parse_args()
    out = args.out or default_dir(args.layers)
    t0 = time.perf_counter()
    build(out, args.layers, args.seed, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"{out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
