"""Quantize a stack of experts (GPTQ or round-to-nearest) and encode each expert matrix with the codec.

Every expert is quantized: one that saw fewer than ``min_tokens`` calibration tokens (or whose Hessian is
not positive definite) is rounded to nearest instead of GPTQ-quantized, and flagged (``fallback``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from qmoe.adapters import ExpertLayout
from qmoe.config import CompressConfig
from qmoe.gptq import QuantizedExperts, gptq_quantize, rtn_quantize


def quantize(W: Tensor, H: Tensor | None, counts: Tensor | None, config: CompressConfig) -> QuantizedExperts:
    """``W [E, rows, cols]`` quantized on ``config.grid`` by ``config.method``."""
    if config.method == "rtn" or H is None:
        return rtn_quantize(W, grid=config.grid, H=H)
    return gptq_quantize(
        W,
        H,
        grid=config.grid,
        damp=config.damp,
        block_size=config.block_size,
        act_order=config.act_order,
        counts=counts,
        min_tokens=config.min_tokens,
    )


def _encode(codes: np.ndarray, levels: np.ndarray, bits: str) -> Any:
    """One ``[rows, cols]`` matrix: ternary codes {-1,0,1} with levels [rows, 3], or 2-bit codes [rows, 4]."""
    from qmoe.codec import encode_int2, encode_ternary

    if bits == "ternary":
        return encode_ternary(codes, levels[:, 0], levels[:, 2])
    return encode_int2(codes.astype(np.uint8), levels)


def encode_experts(
    layout: ExpertLayout, moe_path: str, first: QuantizedExperts, second: QuantizedExperts, bits: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Encoded matrices under their on-disk keys, and per-expert size statistics.

    ``first`` holds the fused first projections ``[E, F*I, d]`` (in ``layout.first`` order), ``second``
    the second projection ``[E, d, I]``; each expert projection becomes one encoded ``[rows, cols]`` matrix.
    """
    E = first.codes.shape[0]
    F = len(layout.first)
    rows = first.codes.shape[1] // F
    encoded: dict[str, Any] = {}
    stats = []
    parts = [(p, first, slice(j * rows, (j + 1) * rows)) for j, p in enumerate(layout.first)]
    parts.append((layout.second, second, slice(None)))
    for e in range(E):
        nbytes = weights = zeros = 0
        for proj, q, sl in parts:
            codes = q.codes[e, sl].cpu().numpy()  # [rows, cols] int8
            levels = q.levels[e, sl].cpu().numpy()  # [rows, n_levels] fp16-exact float32
            enc = _encode(codes, levels, bits)
            encoded[layout.expert_key(moe_path, e, proj)] = enc
            nbytes += enc.nbytes
            weights += codes.size
            zeros += int((q.dequantized[e, sl] == 0).sum())
        stats.append(
            {
                "expert": e,
                "bytes": nbytes,
                "weights": weights,
                "bits_per_weight": 8 * nbytes / weights,
                "zero_fraction": zeros / weights,
            }
        )
    return encoded, stats


def objective_list(q: QuantizedExperts) -> list[float | None]:
    if q.objective is None:
        return [None] * q.codes.shape[0]
    return [float(v) for v in q.objective.cpu().tolist()]


def fallback_list(q: QuantizedExperts) -> list[bool]:
    return [bool(v) for v in q.fallback.cpu().tolist()]


def stack_experts(
    tensors: dict[str, Tensor], layout: ExpertLayout, moe_path: str, n_experts: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(w_first [E, F*I, d], w_second [E, d, I])`` float32 on ``device`` from per-expert 2-D weights."""
    first = torch.stack(
        [
            torch.cat([tensors[layout.expert_key(moe_path, e, p)] for p in layout.first])
            for e in range(n_experts)
        ]
    ).to(device, torch.float32)
    second = torch.stack(
        [tensors[layout.expert_key(moe_path, e, layout.second)] for e in range(n_experts)]
    ).to(device, torch.float32)
    return first, second
