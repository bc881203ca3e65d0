"""GLM-4-MoE (``Glm4MoeForCausalLM``: GLM-4.5, GLM-4.6): DeepSeek-V3's MoE layer (dense first layers,
group-limited sigmoid routing with a correction bias, shared experts) under grouped-query attention with
partial rotary embeddings and optional q/k norms, which transformers' layer handles."""

from __future__ import annotations

from qmoe.adapters.deepseek_v3 import DeepseekV3Adapter

_MODELING = "transformers.models.glm4_moe.modeling_glm4_moe"


class Glm4MoeAdapter(DeepseekV3Adapter):
    name = "glm4_moe"
    model_types = ("glm4_moe",)
    architectures = ("Glm4MoeForCausalLM",)
    layer_class = f"{_MODELING}.Glm4MoeDecoderLayer"
    rotary_class = f"{_MODELING}.Glm4MoeRotaryEmbedding"
