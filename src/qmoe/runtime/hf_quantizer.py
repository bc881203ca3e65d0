"""qmoe as a transformers quantization method: ``from_pretrained`` of a directory whose ``config.json`` has
``quantization_config.quant_method == "qmoe"`` returns the model with compressed experts.

``register()`` adds ``QMoEConfig`` and ``QMoEHfQuantizer`` to transformers' tables (idempotent); importing
this module calls it. ``import qmoe`` arranges for this module to be imported as soon as transformers imports
its quantizer table (``qmoe.runtime.hook``), so users never call it. The quantizer does the one qmoe-specific
step of loading (``qmoe.runtime.load.convert``) in the hook transformers offers for it: after the model is
built on ``meta`` and before the checkpoint's tensors are read. The rest is transformers' ordinary loading.

Only the transformers submodules that ``transformers.quantizers.auto`` itself imports are imported here, so
this module can be imported while ``transformers.quantizers`` is still initialising.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qmoe.errors import ConfigError

QUANT_METHOD = "qmoe"


class QMoEConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` as written by ``qmoe compress``; every field kept as read.

    Fields (docs/pipeline.md): ``format_version`` (of the expert encoding, docs/format.md), ``bits``,
    ``grid``, ``method``, ``qmoe_version`` and the run's settings. Versions are checked against the directory
    when the model loads (``qmoe.runtime.load.check_dir``), where the error can name the directory.
    """

    def __init__(self, format_version: int | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        kwargs.pop("quant_method", None)
        for key, value in kwargs.items():
            setattr(self, key, value)


class QMoEHfQuantizer(HfQuantizer):
    """Loads qmoe-compressed checkpoints (it cannot quantize a dense model: use ``qmoe compress``)."""

    requires_calibration = True  # transformers refuses to "quantize on the fly" with this method

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> Any:
        from qmoe.codec.container import BLOB, SEP
        from qmoe.codec.format import ARRAY_NAMES
        from qmoe.runtime.load import check_dir, convert

        if not checkpoint_files:
            raise ConfigError("a qmoe model loads from a compressed checkpoint directory, not a state dict")
        path, cfg, files = check_dir(Path(checkpoint_files[0]).parent)
        convert(model, path, cfg, files)
        # The encoded matrices (one packed ``#qmoe`` tensor per shard; ``<key>#qmoe`` or ``<key>#stream``, ...
        # in older shards) are in the shards next to the ordinary tensors; convert() has consumed them:
        # transformers should neither load nor report them.
        pattern = rf"{SEP}({'|'.join((BLOB, *ARRAY_NAMES))})$"
        ignored = set(model._keys_to_ignore_on_load_unexpected or ())
        model._keys_to_ignore_on_load_unexpected = ignored | {pattern}
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from qmoe.codec import EncodedMatrix
        from qmoe.kernels import prepare
        from qmoe.runtime.experts import CompressedExperts
        from qmoe.runtime.linear import CompressedLinear

        # Build the CPU kernel's per-matrix handles now rather than during the first token, for the matrices
        # already in memory; mapped experts (qmoe.codec.mapped) are opened and prepared on first use, so that
        # loading reads no expert.
        for module in model.modules():
            if isinstance(module, CompressedExperts) and module.drop_router is not None:
                module.drop_router()  # the router's tensors are loaded now: mask the dropped experts
            if isinstance(module, CompressedExperts):
                for mats in module.matrices.values():
                    for enc in mats:
                        if isinstance(enc, EncodedMatrix):
                            prepare(enc)
            elif isinstance(module, CompressedLinear):
                prepare(module.enc)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return False  # the experts are not parameters; the compressed directory is the serialized form

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make transformers load ``quant_method: "qmoe"`` checkpoints (safe to call any number of times)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QMoEConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QMoEHfQuantizer)


register()  # importing this module is what registers qmoe (qmoe.runtime.hook relies on it)
