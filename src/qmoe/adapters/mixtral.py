"""Mixtral (``MixtralForCausalLM``): decoder-only, every layer MoE, top-k softmax routing renormalised over
the chosen experts, SwiGLU experts. Its published checkpoints keep the original names: the MoE layer is
``block_sparse_moe`` (``mlp`` in transformers 5's modules) and expert ``e`` is ``experts.{e}.w1`` (gate),
``w3`` (up) and ``w2`` (down)."""

from __future__ import annotations

from qmoe.adapters.base import ExpertLayout
from qmoe.adapters.decoder import DecoderMoEAdapter

_MODELING = "transformers.models.mixtral.modeling_mixtral"


class MixtralAdapter(DecoderMoEAdapter):
    name = "mixtral"
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)
    layer_class = f"{_MODELING}.MixtralDecoderLayer"
    rotary_class = f"{_MODELING}.MixtralRotaryEmbedding"
    renames = (("block_sparse_moe", "mlp"),)
    experts = ExpertLayout(
        container="experts",
        key="experts.{e}.{proj}.weight",
        first=("w1", "w3"),
        second="w2",
        gated=True,
        activation_field="hidden_act",
        dims={
            "w1": ("intermediate_size", "hidden_size"),
            "w3": ("intermediate_size", "hidden_size"),
            "w2": ("hidden_size", "intermediate_size"),
        },
    )
