"""Qwen3-MoE (``Qwen3MoeForCausalLM``): decoder-only, top-k softmax routing, SwiGLU experts; layers listed
in ``mlp_only_layers`` or off the ``decoder_sparse_step`` grid are dense and stay as they are."""

from __future__ import annotations

from typing import Any

from qmoe.adapters.decoder import DecoderMoEAdapter, swiglu_experts

_MODELING = "transformers.models.qwen3_moe.modeling_qwen3_moe"


class Qwen3MoeAdapter(DecoderMoEAdapter):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architectures = ("Qwen3MoeForCausalLM",)
    layer_class = f"{_MODELING}.Qwen3MoeDecoderLayer"
    rotary_class = f"{_MODELING}.Qwen3MoeRotaryEmbedding"
    experts = swiglu_experts("moe_intermediate_size")

    def is_moe_layer(self, cfg: dict[str, Any], i: int) -> bool:
        step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
        return i not in dense and self.num_experts(cfg) > 0 and (i + 1) % step == 0
