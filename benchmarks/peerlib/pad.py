"""An exactly equivalent copy of a Qwen3-MoE checkpoint whose widths are multiples of ``multiple``.

Why: llama.cpp's sub-3-bit types (IQ1_S, IQ1_M, IQ2_XXS, Q2_K, TQ1_0) work on 256-weight super-blocks along
a row; a row of another length makes ``llama-quantize`` silently substitute a 4-bit type (IQ4_NL, Q4_0).
tiny-qwen3-moe's rows are 192 wide, so the peer comparison gives llama.cpp a copy padded to 256 whose
function is the original's:

- the residual stream gets ``H' - H`` extra channels that stay exactly zero: embeddings, ``o_proj`` rows and
  expert ``down_proj`` rows are zero there, and every matrix that reads the stream has zero columns there;
- RMS norms see ``H'`` channels, of which ``H`` carry the signal, so their mean square shrinks by ``H/H'``;
  norm weights scaled by ``sqrt(H/H')`` (kept in float32) and ``rms_norm_eps`` scaled by ``H/H'`` restore
  the output exactly (embeddings are small here: without the eps change the first layer moved by 2.5e-4
  relative). The per-head q/k norms share that eps; theirs moves from 1e-6 to 0.75e-6, below fp32 noise;
- experts get ``I' - I`` extra intermediate channels with zero gate, up and down weights: silu(0) * 0 = 0.

Zero rows quantize to exact zeros in every llama.cpp type (a zero block has a zero scale), and padded columns
meet only zero activations, so the padded weights cannot change the output after quantization either; only
the real ``[I, H]`` / ``[H, I]`` corner is read back (:func:`crop`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=a.dtype)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


def pad_qwen3_moe(src: Path, out: Path, multiple: int = 256) -> dict[str, int]:
    """Write the padded copy of the Qwen3-MoE directory ``src`` to ``out`` (config, weights, tokenizer).

    Returns the original and padded widths. Refuses families other than Qwen3-MoE and checkpoints with dense
    MLP layers (``mlp_only_layers``), which this construction does not cover."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "qwen3_moe":
        raise ValueError(f"{src}: padding is written for qwen3_moe, not {cfg.get('model_type')!r}")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"{src}: dense MLP layers are not covered by the padding")
    h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
    hp, ip = padded(h, multiple), padded(i, multiple)
    norm_scale = math.sqrt(h / hp)
    files = sorted(src.glob("*.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        sd = load_file(str(f))
        new: dict[str, np.ndarray] = {}
        for k, v in sd.items():
            if (
                k.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))
                or k == "model.norm.weight"
            ):
                # float32: fp16 rounding of the scaled weights costs ~5e-4 relative (as llama.cpp, f32 norms)
                v = _pad(v.astype(np.float32) * np.float32(norm_scale), (hp,))
            elif k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "mlp.gate.weight")):
                v = _pad(v, (v.shape[0], hp))  # [out, H] reads the stream
            elif k.endswith("o_proj.weight"):
                v = _pad(v, (hp, v.shape[1]))  # [H, heads*hd] writes it
            elif k in ("model.embed_tokens.weight", "lm_head.weight"):
                v = _pad(v, (v.shape[0], hp))
            elif ".mlp.experts." in k and k.endswith(("gate_proj.weight", "up_proj.weight")):
                v = _pad(v, (ip, hp))  # [I, H]
            elif ".mlp.experts." in k and k.endswith("down_proj.weight"):
                v = _pad(v, (hp, ip))  # [H, I]
            elif not k.endswith(("q_norm.weight", "k_norm.weight")):  # per-head norms keep head_dim
                raise ValueError(
                    f"{f.name}: no padding rule for {k} {v.shape}; the layout is not Qwen3-MoE's"
                )
            new[k] = np.ascontiguousarray(v)
        save_file(new, str(out / f.name), metadata={"format": "pt"})
    # mean(x'^2) = mean(x^2) * H/H', so eps * H/H' keeps the stream's norms exact (see module docstring)
    cfg.update(hidden_size=hp, moe_intermediate_size=ip, rms_norm_eps=cfg["rms_norm_eps"] * h / hp)
    cfg.setdefault("head_dim", h // cfg["num_attention_heads"])  # keep the real head width explicit
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return {"hidden": h, "hidden_padded": hp, "intermediate": i, "intermediate_padded": ip}


def crop(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The real corner ``[..., rows, cols]`` of a padded (possibly stacked ``[E, R', C']``) matrix."""
    assert w.shape[-2] >= rows and w.shape[-1] >= cols, f"{w.shape} is smaller than ({rows}, {cols})"
    return np.ascontiguousarray(w[..., :rows, :cols])
