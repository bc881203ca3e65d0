"""OLMoE (``OlmoeForCausalLM``): decoder-only, every layer MoE, top-k softmax routing (renormalised only if
``norm_topk_prob``), SwiGLU experts of width ``intermediate_size``; q/k norms over the full projection width
(inside transformers' layer, nothing for qmoe to do)."""

from __future__ import annotations

from qmoe.adapters.base import ExpertLayout
from qmoe.adapters.decoder import DecoderMoEAdapter

_MODELING = "transformers.models.olmoe.modeling_olmoe"


class OlmoeAdapter(DecoderMoEAdapter):
    name = "olmoe"
    model_types = ("olmoe",)
    architectures = ("OlmoeForCausalLM",)
    layer_class = f"{_MODELING}.OlmoeDecoderLayer"
    rotary_class = f"{_MODELING}.OlmoeRotaryEmbedding"
    experts = ExpertLayout(
        container="experts",
        key="experts.{e}.{proj}.weight",
        first=("gate_proj", "up_proj"),
        second="down_proj",
        gated=True,
        activation_field="hidden_act",
        dims={
            "gate_proj": ("intermediate_size", "hidden_size"),
            "up_proj": ("intermediate_size", "hidden_size"),
            "down_proj": ("hidden_size", "intermediate_size"),
        },
    )
