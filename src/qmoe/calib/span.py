"""T5 span corruption, the pre-training objective of Switch Transformers and the loss QMoE reports.

Follows ``random_spans_noise_mask`` of the T5 codebase: noise density 0.15, mean noise span length 3. Each
noise span is replaced by one sentinel in the encoder input; the decoder target lists the sentinels, each
followed by the tokens it replaced, then EOS. Sentinel ``<extra_id_k>`` has id ``sentinel_ids[k]``.
"""

from __future__ import annotations

import numpy as np


def noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
               mean_span: float = 3.0) -> np.ndarray:
    """Boolean mask [length] of noise tokens: alternating non-noise / noise spans, starting non-noise."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    num_nonnoise = length - num_noise

    def segment(n_items: int, n_segments: int) -> np.ndarray:
        # n_segments positive lengths summing to n_items, uniformly at random.
        first = np.zeros(n_items, dtype=bool)
        first[1:][rng.permutation(n_items - 1) < n_segments - 1] = True
        seg_id = np.cumsum(first)
        return np.bincount(seg_id, minlength=n_segments)

    noise_len = segment(num_noise, num_spans)
    plain_len = segment(num_nonnoise, num_spans)
    spans = np.stack([plain_len, noise_len], axis=1).reshape(-1)  # [2 * num_spans]
    span_starts = np.cumsum(spans)[:-1]
    start_flag = np.zeros(length, dtype=np.int64)
    start_flag[span_starts] = 1
    return np.cumsum(start_flag) % 2 == 1


def span_corrupt(tokens: np.ndarray, rng: np.random.Generator, sentinel_ids: np.ndarray, eos_id: int,
                 noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, decoder target) int64 arrays for one token segment [n] (n >= 2)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    mask = noise_mask(len(tokens), rng, noise_density, mean_span)
    span_start = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    span_index = np.cumsum(span_start) - 1  # which span each token belongs to
    if span_start.sum() > len(sentinel_ids):
        raise ValueError(f"{int(span_start.sum())} noise spans but only {len(sentinel_ids)} sentinels")
    sent = np.asarray(sentinel_ids, dtype=np.int64)
    # Input: keep non-noise tokens, put the span's sentinel at each span start, drop the rest of the span.
    inp = np.where(span_start, sent[np.maximum(span_index, 0)], tokens)[~mask | span_start]
    # Target: each span's sentinel followed by the tokens it replaced.
    starts_in_noise = np.flatnonzero(span_start[mask])
    tgt = np.insert(tokens[mask], starts_in_noise, sent[: len(starts_in_noise)])
    return np.append(inp, eos_id), np.append(np.asarray(tgt, dtype=np.int64), eos_id)


def reconstruct(inp: np.ndarray, tgt: np.ndarray, sentinel_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Inverse of :func:`span_corrupt`: the original token segment from input and target."""
    sentinels = {int(s): k for k, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current = None
    for t in tgt.tolist():
        if t == eos_id:
            break
        if t in sentinels:
            current = sentinels[t]
            spans[current] = []
        else:
            spans[current].append(t)
    out: list[int] = []
    for t in inp.tolist():
        if t == eos_id:
            break
        out.extend(spans[sentinels[t]] if t in sentinels else [t])
    return np.asarray(out, dtype=np.int64)
