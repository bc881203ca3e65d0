"""gpt-oss (``GptOssForCausalLM``): decoder-only, every layer MoE, top-k routing with a router bias and a
softmax over the chosen logits; attention with per-head sinks, alternating sliding-window and full layers.

What is new about its experts, all as transformers' ``GptOssExperts`` computes them:

- stored stacked and transposed: ``mlp.experts.gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]``
  (``y = x @ W[e]``); qmoe encodes one ``[2I, H]`` / ``[H, I]`` matrix per expert, and ``qmoe decompress``
  writes the stacked tensors back;
- biases ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]``, kept as stored;
- a clamped SwiGLU over *interleaved* columns: gate = even rows of the fused projection, up = odd rows,
  ``(clamp(up, -L, L) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=L)``.

The published checkpoints hold the experts in MXFP4 (``*_blocks``, ``*_scales``); qmoe reads the bf16 form,
which transformers writes when it loads them with ``Mxfp4Config(dequantize=True)`` and saves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from qmoe.adapters.base import ExpertLayout
from qmoe.adapters.decoder import DecoderMoEAdapter

_MODELING = "transformers.models.gpt_oss.modeling_gpt_oss"


class ClampedSwiGLU:
    """gpt-oss's activation of the fused, interleaved ``h [t, 2I]`` -> ``[t, I]``."""

    def __init__(self, alpha: float, limit: float) -> None:
        self.alpha, self.limit = alpha, limit

    def __call__(self, h: Tensor) -> Tensor:
        gate = h[..., ::2].clamp(max=self.limit)
        up = h[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class GptOssAdapter(DecoderMoEAdapter):
    name = "gpt_oss"
    router = "router"
    router_drop_bias = "bias"
    model_types = ("gpt_oss",)
    architectures = ("GptOssForCausalLM",)
    layer_class = f"{_MODELING}.GptOssDecoderLayer"
    rotary_class = f"{_MODELING}.GptOssRotaryEmbedding"
    routing_args = ("hidden_states", "router_indices", "routing_weights")
    keeps = (
        "the experts' biases, attention (with its sinks), routers, embeddings, norms, head as stored (16-bit)"
    )
    experts = ExpertLayout(
        container="experts",
        key="experts.{proj}",
        first=("gate_up_proj",),
        second="down_proj",
        gated=True,
        activation_field="hidden_act",
        dims={
            "gate_up_proj": ("2*intermediate_size", "hidden_size"),
            "down_proj": ("hidden_size", "intermediate_size"),
        },
        stacked=True,
        transposed=True,
        bias="experts.{proj}_bias",
    )

    def activation(self, cfg: dict[str, Any]) -> str:
        return "clamped_swiglu"

    def expert_glu(self, cfg: dict[str, Any]) -> Callable[[Tensor], Tensor]:
        return ClampedSwiGLU(float(cfg.get("swiglu_alpha", 1.702)), float(cfg.get("swiglu_limit", 7.0)))
