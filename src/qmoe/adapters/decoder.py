"""What decoder-only MoE families share in transformers 5: one stack of decoder layers, rotary positions,
a causal mask, next-token loss, and experts called as ``experts(hidden_states [T, d], top_k_index [T, k],
top_k_weights [T, k])`` with fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` in memory and
per-expert 2-D ``{gate,up,down}_proj`` keys on disk.

A family subclasses :class:`DecoderMoEAdapter` and declares its names: ``layer_class`` and ``rotary_class``
(import paths), ``experts`` (the layout), and overrides ``is_moe_layer`` where some layers are dense.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qmoe.adapters.base import Adapter, ExpertLayout, Routing, StackSpec, bind


def _import(path: str) -> Any:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def swiglu_experts(intermediate: str) -> ExpertLayout:
    """The experts of these families: ``mlp.experts.{e}.{gate,up,down}_proj`` on disk, SwiGLU, width from the
    config field ``intermediate`` (``moe_intermediate_size``, or OLMoE's ``intermediate_size``)."""
    return ExpertLayout(
        container="experts",
        key="experts.{e}.{proj}.weight",
        first=("gate_proj", "up_proj"),
        second="down_proj",
        gated=True,
        activation_field="hidden_act",
        dims={
            "gate_proj": (intermediate, "hidden_size"),
            "up_proj": (intermediate, "hidden_size"),
            "down_proj": ("hidden_size", intermediate),
        },
    )


class DecoderMoEAdapter(Adapter):
    is_encoder_decoder = False
    layer_class: str  # e.g. "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeDecoderLayer"
    rotary_class: str

    def num_experts(self, cfg: dict[str, Any]) -> int:
        # transformers 5 saves ``num_experts`` under its attribute-map name ``num_local_experts``.
        return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)

    def top_k(self, cfg: dict[str, Any]) -> int:
        return int(cfg["num_experts_per_tok"])

    def is_moe_layer(self, cfg: dict[str, Any], i: int) -> bool:
        return self.num_experts(cfg) > 0

    def stacks(self, cfg: dict[str, Any]) -> tuple[StackSpec, ...]:
        n = cfg["num_hidden_layers"]
        moe = tuple("mlp" if self.is_moe_layer(cfg, i) else None for i in range(n))
        return (
            StackSpec(
                "decoder",
                "model.layers",
                n,
                moe,
                inputs="input_ids",
                embed_key="model.embed_tokens.weight",
                final_norm_key="model.norm.weight",
            ),
        )

    def head_keys(self, cfg: dict[str, Any]) -> dict[str, str]:
        return {
            "lm_head": "model.embed_tokens.weight" if cfg.get("tie_word_embeddings") else "lm_head.weight"
        }

    def build_block(self, hf_config: Any, stack: StackSpec, i: int) -> torch.nn.Module:
        return _import(self.layer_class)(hf_config, layer_idx=i).eval()

    def prepare_stack(self, hf_config: Any, stack: StackSpec, get: Callable[[str], Tensor]) -> dict[str, Any]:
        with torch.device("cpu"):  # no weights, only the inv_freq buffer computed from the config
            rotary = _import(self.rotary_class)(hf_config)
        # Windowed layers see only the last ``sliding_window`` positions (transformers'
        # sliding_window_causal_mask_function). With ``layer_types`` (gpt-oss alternates sliding and full
        # attention) only "sliding_attention" layers are; without it (Mixtral, Qwen3-MoE) transformers windows
        # every layer whenever ``sliding_window`` is set.
        types = getattr(hf_config, "layer_types", None)
        window = getattr(hf_config, "sliding_window", None) or None
        if types:
            windows = [window if t == "sliding_attention" else None for t in types]
        else:
            windows = [window] * int(hf_config.num_hidden_layers)
        return {"rotary": rotary, "windows": windows, "cache": {}}

    def _context(
        self, state: dict[str, Any], i: int, S: int, device: torch.device
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        window = state["windows"][i] if i < len(state["windows"]) else None
        key = (S, str(device), window)
        if key not in state["cache"]:
            x = torch.zeros(1, S, 1)
            cos, sin = state["rotary"](x, torch.arange(S)[None])  # [1, S, head_dim] each
            q, k = torch.arange(S)[:, None], torch.arange(S)[None, :]
            allowed = k <= q if window is None else (k <= q) & (k > q - window)  # [S, S]
            mask = torch.zeros(S, S).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            state["cache"][key] = (mask.to(device), (cos.to(device), sin.to(device)))  # mask [1, 1, S, S]
        return state["cache"][key]

    def block_forward(
        self, block: torch.nn.Module, i: int, hidden: Tensor, memory: Tensor | None, state: dict[str, Any]
    ) -> Tensor:
        mask, pos = self._context(state, i, hidden.shape[1], hidden.device)
        out = block(hidden, attention_mask=mask, position_embeddings=pos)
        return out[0] if isinstance(out, tuple) else out

    routing_args = (
        "hidden_states",
        "top_k_index",
        "top_k_weights",
    )  # names of the experts' forward arguments

    def routing(self, args: tuple, kwargs: dict[str, Any]) -> Routing:
        # experts.forward(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k])
        x, index, weights = bind(args, kwargs, self.routing_args)
        T, k = index.shape
        token = torch.arange(T, device=x.device).repeat_interleave(k)  # token-major, as the router ranked
        return Routing(x, token, index.reshape(-1).long(), weights.reshape(-1))

    def samples(
        self, tokenizer: Any, texts: Sequence[str], n: int, seed: int, seq_len: int
    ) -> dict[str, np.ndarray]:
        from qmoe.calib import lm_samples

        ids = lm_samples(tokenizer, texts, n, seed, length=seq_len)
        return {"input_ids": ids, "labels": ids}

    def loss(
        self, hf_config: Any, head: dict[str, Tensor], hidden: Tensor, labels: Tensor
    ) -> tuple[float, int]:
        logits = hidden[:, :-1] @ head["lm_head"].T  # [B, S-1, vocab]: position t predicts token t+1
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        return float(loss), target.numel()
