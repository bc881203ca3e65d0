"""Qwen2-MoE (``Qwen2MoeForCausalLM``): Qwen3-MoE's layout and routing plus a shared expert that every token
uses (``mlp.shared_expert``, scaled by ``sigmoid(mlp.shared_expert_gate(x))``). qmoe compresses the routed
experts only; the shared expert and its gate stay as stored, like attention."""

from __future__ import annotations

from qmoe.adapters.qwen3_moe import Qwen3MoeAdapter

_MODELING = "transformers.models.qwen2_moe.modeling_qwen2_moe"


class Qwen2MoeAdapter(Qwen3MoeAdapter):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    architectures = ("Qwen2MoeForCausalLM",)
    layer_class = f"{_MODELING}.Qwen2MoeDecoderLayer"
    rotary_class = f"{_MODELING}.Qwen2MoeRotaryEmbedding"
    shared_experts = "shared_expert"
    keeps = "the shared expert and its gate, attention, routers, embeddings, norms, head as stored (16-bit)"
