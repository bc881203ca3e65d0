"""The codec side of a quantized group: each expert matrix encoded (``qmoe.codec``), and its stored size.

A group is the fused first projections ``[E, F*I, d]`` (in ``layout.first`` order) or the second projection
``[E, d, I]`` of one MoE layer's experts; each expert projection is one encoded ``[rows, cols]`` matrix.
Sizes count every stored byte: encoded arrays plus each matrix's estimated share of the shard header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qmoe.adapters import ExpertLayout
from qmoe.gptq import QuantizedExperts
from qmoe.pipeline.comm import LOCAL, Local


@dataclass(frozen=True)
class GroupSize:
    """How to measure one group's stored size: which layer and projections, at which width, holding which
    experts (``first_expert, first_expert + 1, ...``: a distributed run's share), which are not stored."""

    layout: ExpertLayout
    moe_path: str
    projections: list[str]
    bits: str  # "ternary" or "2"
    first_expert: int = 0
    dropped: frozenset[int] = frozenset()

    def bits_per_weight(self, q: QuantizedExperts, comm: Local = LOCAL) -> float:
        """Stored bits/weight of the whole group (``group_bits``): collectives over ``comm``'s ranks."""
        return group_bits(
            self.layout, self.moe_path, q, self.projections, self.bits, self.first_expert, comm, self.dropped
        )


def _encode(codes: np.ndarray, levels: np.ndarray, bits: str) -> Any:
    """One ``[rows, cols]`` matrix: ternary codes {-1,0,1} with levels [rows, 3], or 2-bit codes [rows, 4]."""
    from qmoe.codec import encode_int2, encode_ternary

    if bits == "ternary":
        return encode_ternary(codes, levels[:, 0], levels[:, 2])
    return encode_int2(codes.astype(np.uint8), levels)


def group_bits(
    layout: ExpertLayout,
    moe_path: str,
    q: QuantizedExperts,
    projections: list[str],
    bits: str,
    first_expert: int = 0,
    comm: Local = LOCAL,
    dropped: frozenset[int] = frozenset(),
) -> float:
    """Stored bits/weight of a quantized group (the fused first projections, or the second): encoded
    arrays plus each matrix's estimated share of the shard header (``codec.matrix_header_bytes``).

    ``q`` holds experts ``first_expert, first_expert + 1, ...``; ``comm`` sums integer counts over the
    ranks that hold the rest of the group (two collectives; one process: none). ``dropped`` experts store
    nothing but their weights still count: bits/weight is always over the whole group."""
    stored = expert_bits(layout, moe_path, q, projections, bits, first_expert, comm, dropped)
    nbits, weights = comm.sum_ints([int(stored.sum()), q.codes.numel()])  # one collective for both sums
    return nbits / weights


def expert_bits(
    layout: ExpertLayout,
    moe_path: str,
    q: QuantizedExperts,
    projections: list[str],
    bits: str,
    first_expert: int = 0,
    comm: Local = LOCAL,
    dropped: frozenset[int] = frozenset(),
) -> np.ndarray:
    """``[E_r]`` int64 stored bits of each expert of ``q`` in this group (arrays and header estimate; 0 for
    a ``dropped`` one). The header estimate's offset width comes from the whole group (summed by ``comm``)."""
    from qmoe.codec.container import SHARD_FIXED_BYTES, matrix_header_bytes

    rows = q.codes.shape[1] // len(projections)
    encoded: list[list[tuple[str, Any]]] = []
    for e in range(q.codes.shape[0]):
        mats = []
        if first_expert + e not in dropped:
            for j, proj in enumerate(projections):
                sl = slice(j * rows, (j + 1) * rows)
                enc = _encode(q.codes[e, sl].cpu().numpy(), q.levels[e, sl].cpu().numpy(), bits)
                mats.append((layout.expert_key(moe_path, first_expert + e, proj), enc))
        encoded.append(mats)
    arrays, n_mats = comm.sum_ints([sum(enc.nbytes for mats in encoded for _, enc in mats),
                                    sum(len(mats) for mats in encoded)])
    digits = len(str(2 * arrays))  # data offsets in the shard run up to about the layer's size
    # The shard's fixed index cost, shared out by matrix count (as header_share measures it): the layer's
    # shard holds every projection, this group len(projections) of them.
    fixed = SHARD_FIXED_BYTES * len(projections) / (len(layout.first) + 1) / max(n_mats, 1)
    return np.array(
        [8 * sum(enc.nbytes + matrix_header_bytes(k, enc, digits) + fixed for k, enc in mats)
         for mats in encoded],
        dtype=np.int64,
    )


def encode_experts(
    layout: ExpertLayout,
    moe_path: str,
    q_first: QuantizedExperts,
    q_second: QuantizedExperts,
    bits: str,
    first_expert: int = 0,
    dropped: frozenset[int] = frozenset(),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Encoded matrices under their on-disk keys, and per-expert size statistics.

    ``q_first`` holds the fused first projections ``[E, F*I, d]`` (in ``layout.first`` order), ``q_second``
    the second projection ``[E, d, I]``, of experts ``first_expert, first_expert + 1, ...``; each expert
    projection becomes one encoded ``[rows, cols]`` matrix; a ``dropped`` expert (global index) none.
    """
    E = q_first.codes.shape[0]
    F = len(layout.first)
    rows = q_first.codes.shape[1] // F
    encoded: dict[str, Any] = {}
    stats = []
    parts = [(p, q_first, slice(j * rows, (j + 1) * rows)) for j, p in enumerate(layout.first)]
    parts.append((layout.second, q_second, slice(None)))
    for e in range(E):
        nbytes = weights = zeros = 0
        if first_expert + e in dropped:
            weights = sum(q.codes[e, sl].numel() for _, q, sl in parts)
            stats.append(
                {
                    "expert": first_expert + e,
                    "bytes": 0,
                    "weights": weights,
                    "bits_per_weight": 0.0,
                    "zero_fraction": 1.0,
                    "dropped": True,
                }
            )
            continue
        for proj, q, sl in parts:
            codes = q.codes[e, sl].cpu().numpy()  # [rows, cols] int8
            levels = q.levels[e, sl].cpu().numpy()  # [rows, n_levels] float32 on the codec's level grid
            enc = _encode(codes, levels, bits)
            encoded[layout.expert_key(moe_path, first_expert + e, proj)] = enc
            nbytes += enc.nbytes
            weights += codes.size
            zeros += int((q.dequantized[e, sl] == 0).sum())
        stats.append(
            {
                "expert": first_expert + e,
                "bytes": nbytes,
                "weights": weights,
                "bits_per_weight": 8 * nbytes / weights,
                "zero_fraction": zeros / weights,
            }
        )
    return encoded, stats


def encode_fused(names: list[str], q: QuantizedExperts, bits: str) -> dict[str, Any]:
    """One quantized matrix ``q [1, F*rows, cols]`` (fused projections, rows in ``names`` order) as ``F``
    encoded ``[rows, cols]`` matrices under ``names`` (the shared experts' on-disk keys)."""
    rows = q.codes.shape[1] // len(names)
    return {
        name: _encode(
            q.codes[0, j * rows : (j + 1) * rows].cpu().numpy(),
            q.levels[0, j * rows : (j + 1) * rows].cpu().numpy(),
            bits,
        )
        for j, name in enumerate(names)
    }
