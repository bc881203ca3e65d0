"""Token segments and span-corruption / language-modelling batches from text, deterministic by seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmoe.calib.span import span_corrupt
from qmoe.calib.tokenizer import sentinel_ids
from qmoe.errors import DataError

# 140 raw tokens -> 21 noise tokens in 7 spans -> encoder input 127 (+EOS), decoder target 29 (+EOS).
DEFAULT_RAW_LENGTH = 140


def token_stream(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """All documents tokenized and concatenated, each followed by EOS: int64 [n_tokens]."""
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return np.fromiter((t for doc in enc for t in (*doc, eos)), dtype=np.int64)


def segments(stream: np.ndarray, length: int, n: int | None, seed: int, shuffle: bool = True) -> np.ndarray:
    """int64 [n, length]: non-overlapping windows of the stream, a seeded random choice of them."""
    total = len(stream) // length
    if total == 0:
        raise DataError(f"the text holds {len(stream)} tokens, fewer than one segment of {length}")
    windows = stream[: total * length].reshape(total, length)
    order = np.random.default_rng(seed).permutation(total) if shuffle else np.arange(total)
    if n is not None:
        if n > total:
            n = total  # a small user file: use everything it has
        order = order[:n]
    return windows[np.sort(order)] if not shuffle else windows[order]


@dataclass(frozen=True)
class SpanBatch:
    """Encoder inputs [B, S_in] and decoder labels [B, S_out] (int64, fixed lengths, no padding)."""

    input_ids: np.ndarray
    labels: np.ndarray


def span_corruption_samples(tokenizer: Any, texts: Sequence[str], n_samples: int | None, seed: int,
                            raw_length: int = DEFAULT_RAW_LENGTH, noise_density: float = 0.15,
                            mean_span: float = 3.0) -> SpanBatch:
    """``n_samples`` span-corrupted segments of ``texts`` (all of them if None)."""
    stream = token_stream(tokenizer, texts)
    segs = segments(stream, raw_length, n_samples, seed)
    rng = np.random.default_rng(seed + 1)
    sent = sentinel_ids(tokenizer)
    pairs = [span_corrupt(s, rng, sent, tokenizer.eos_token_id, noise_density, mean_span) for s in segs]
    # Fixed raw length => fixed input/target lengths, so samples stack without padding.
    return SpanBatch(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


def lm_samples(tokenizer: Any, texts: Sequence[str], n_samples: int | None, seed: int,
               length: int = 128) -> np.ndarray:
    """int64 [n, length] plain token windows for causal language models."""
    return segments(token_stream(tokenizer, texts), length, n_samples, seed)
