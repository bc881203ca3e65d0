"""OLMoE (``OlmoeForCausalLM``): decoder-only, every layer MoE, top-k softmax routing (renormalised only if
``norm_topk_prob``), SwiGLU experts of width ``intermediate_size``; q/k norms over the full projection width
(inside transformers' layer, nothing for qmoe to do)."""

from __future__ import annotations

from qmoe.adapters.decoder import DecoderMoEAdapter, swiglu_experts

_MODELING = "transformers.models.olmoe.modeling_olmoe"


class OlmoeAdapter(DecoderMoEAdapter):
    name = "olmoe"
    model_types = ("olmoe",)
    architectures = ("OlmoeForCausalLM",)
    layer_class = f"{_MODELING}.OlmoeDecoderLayer"
    rotary_class = f"{_MODELING}.OlmoeRotaryEmbedding"
    experts = swiglu_experts("intermediate_size")
