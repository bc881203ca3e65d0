"""The token samples a compression run streams: calibration windows and each evaluation set's samples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qmoe.config import CompressConfig
from qmoe.errors import SourceError
from qmoe.pipeline.preflight import Plan

EVAL_SEED = 1234  # evaluation samples: as qmoe eval and the built-in models' training logs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def load_samples(p: Plan, config: CompressConfig) -> dict[str, dict[str, np.ndarray]]:
    """``"calib"`` and each evaluation set -> the adapter's sample arrays (``input_ids``, ``labels``, ...;
    ``mask:<inputs>`` where span-corruption sentinels stay out of the Hessians)."""
    from transformers import AutoTokenizer

    from qmoe.calib import load_texts

    # transformers 5 builds an empty tokenizer (special tokens only) for a directory without tokenizer files.
    if not any((p.source / f).is_file() for f in TOKENIZER_FILES):
        raise SourceError(
            f"{p.source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); copy the "
            "model's tokenizer into it"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p.source))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
        raise SourceError(
            f"{p.source} has no usable tokenizer ({type(exc).__name__}); copy the tokenizer files "
            "(tokenizer.json, tokenizer_config.json) into it"
        ) from exc
    make: Callable[..., dict[str, np.ndarray]] = p.adapter.samples
    out = {
        "calib": make(
            tokenizer, load_texts(config.calib_data), config.calib_samples, config.seed, config.seq_len
        )
    }
    if config.skip_sentinels:
        for stack in p.stacks:
            mask = p.adapter.hessian_mask(tokenizer, out["calib"][stack.inputs])
            if mask is not None:
                out["calib"][f"mask:{stack.inputs}"] = mask
    if config.eval:
        for name in config.eval_data:
            out[name] = make(tokenizer, load_texts(name), config.eval_samples, EVAL_SEED, config.seq_len)
    return out
