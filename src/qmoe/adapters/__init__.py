"""Model-family adapters: all the transformers knowledge qmoe has, one small declarative file per family.

``get_adapter(cfg)`` picks the adapter for a model's ``config.json`` (by ``model_type``, then
``architectures``); an unsupported family is a one-line ``SourceError`` naming the supported ones.
The interface is documented in ``qmoe.adapters.base`` and docs/pipeline.md.
"""

from __future__ import annotations

from typing import Any

from qmoe.adapters.base import Adapter, ExpertLayout, Routing, StackSpec, expert_forward, expert_hidden
from qmoe.adapters.deepseek_v3 import DeepseekV3Adapter
from qmoe.adapters.glm4_moe import Glm4MoeAdapter
from qmoe.adapters.gpt_oss import GptOssAdapter
from qmoe.adapters.mixtral import MixtralAdapter
from qmoe.adapters.olmoe import OlmoeAdapter
from qmoe.adapters.qwen2_moe import Qwen2MoeAdapter
from qmoe.adapters.qwen3_moe import Qwen3MoeAdapter
from qmoe.adapters.switch import SwitchAdapter
from qmoe.errors import SourceError

__all__ = [
    "ADAPTERS",
    "Adapter",
    "ExpertLayout",
    "Routing",
    "StackSpec",
    "expert_forward",
    "expert_hidden",
    "family_table",
    "get_adapter",
    "supported",
]

ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        SwitchAdapter(),
        Qwen3MoeAdapter(),
        Qwen2MoeAdapter(),
        OlmoeAdapter(),
        MixtralAdapter(),
        DeepseekV3Adapter(),
        Glm4MoeAdapter(),
        GptOssAdapter(),
    )
}


def supported() -> list[str]:
    """Human-readable list of the supported families (architecture names)."""
    return [arch for a in ADAPTERS.values() for arch in a.architectures]


def family_table() -> list[dict[str, Any]]:
    """One row per supported family: its transformers classes and which weights qmoe compresses."""
    return [
        {
            "family": a.name,
            "architectures": list(a.architectures),
            "compresses": f"the routed experts' {'/'.join(a.experts.projections)}",
            "keeps": a.keeps,
        }
        for a in ADAPTERS.values()
    ]


def get_adapter(cfg: dict[str, Any]) -> Adapter:
    """The adapter for a model config dict (``config.json``)."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types or any(a in adapter.architectures for a in archs):
            return adapter
    what = f"model_type={model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
    raise SourceError(f"unsupported model family {what}; qmoe supports {', '.join(supported())}")
