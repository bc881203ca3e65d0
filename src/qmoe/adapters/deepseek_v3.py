"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; also DeepSeek-R1, and Kimi-K2, which shares the architecture but
whose config.json names the remote-code ``model_type`` "kimi_k2": set it to "deepseek_v3"):
decoder-only with multi-head latent attention; the first ``first_k_dense_replace`` layers have a dense MLP,
the rest an MoE layer of ``n_routed_experts`` SwiGLU experts chosen by group-limited sigmoid routing with a
score-correction bias (``mlp.gate``, ``mlp.gate.e_score_correction_bias``), plus shared experts that every
token uses (``mlp.shared_experts``, one MLP of width ``n_shared_experts x moe_intermediate_size``).

The router runs as transformers defines it; qmoe reads its decision (indices and the already scaled weights)
from the experts' call, so nothing of the routing is re-implemented here. Dense layers and shared experts
stay as stored unless ``--shared-experts`` says otherwise."""

from __future__ import annotations

from typing import Any

from qmoe.adapters.decoder import DecoderMoEAdapter, swiglu_experts

_MODELING = "transformers.models.deepseek_v3.modeling_deepseek_v3"


class DeepseekV3Adapter(DecoderMoEAdapter):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    architectures = ("DeepseekV3ForCausalLM",)
    layer_class = f"{_MODELING}.DeepseekV3DecoderLayer"
    rotary_class = f"{_MODELING}.DeepseekV3RotaryEmbedding"
    experts = swiglu_experts("moe_intermediate_size")
    shared_experts = "shared_experts"
    router_drop_bias = "e_score_correction_bias"  # sigmoid scores: a -inf logit would still be chosen
    keeps = (
        "the shared experts, the first_k_dense_replace dense MLPs, attention, routers (with their correction "
        "bias), embeddings, norms, head as stored (16-bit)"
    )

    def num_experts(self, cfg: dict[str, Any]) -> int:
        return int(cfg.get("n_routed_experts") or 0)

    def is_moe_layer(self, cfg: dict[str, Any], i: int) -> bool:
        return self.num_experts(cfg) > 0 and i >= int(cfg.get("first_k_dense_replace") or 0)
