"""Quantize a stack of experts (GPTQ or round-to-nearest) and encode each expert matrix with the codec.

Every expert is quantized: one that saw fewer than ``min_tokens`` calibration tokens (or whose Hessian is
not positive definite) is rounded to nearest instead of GPTQ-quantized, and flagged (``fallback``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qmoe.adapters import ExpertLayout
from qmoe.config import CompressConfig
from qmoe.gptq import QuantizedExperts, gptq_quantize, rtn_quantize


def quantize(
    W: Tensor, H: Tensor | None, counts: Tensor | None, config: CompressConfig, rate: float | None = None
) -> QuantizedExperts:
    """``W [E, rows, cols]`` quantized on ``config.grid`` by ``config.method`` at ``rate`` (default
    ``config.rate``)."""
    rate = config.rate if rate is None else rate
    if config.method == "rtn" or H is None:
        return rtn_quantize(W, grid=config.grid, H=H, rate=rate, refit=config.refit, damp=config.damp)
    return gptq_quantize(
        W,
        H,
        grid=config.grid,
        damp=config.damp,
        block_size=config.block_size,
        act_order=config.act_order,
        counts=counts,
        min_tokens=config.min_tokens,
        rate=rate,
        refit=config.refit,
    )


_SEARCH_START = 1.0  # first rate tried by the size search (any positive value works; it only sets the path)
_SEARCH_STEP = 4.0  # bracketing factor
_SEARCH_TOL = 0.01  # relative bits/weight error at which the search stops
_SEARCH_EVALS = 12
_RATE_MAX = 1e4  # beyond this every weight of a normal row is zero


def _rtn_guess(
    W: Tensor, H: Tensor, config: CompressConfig, bits_of: Callable[[QuantizedExperts], float], target: float
) -> float:
    """A starting rate for the GPTQ search: where priced round-to-nearest (cheap: no column loop) has the
    target size. GPTQ at the same rate lands close, so the search needs two or three GPTQ runs, not six."""
    lo, hi = 1e-3, 1e3  # log-space bisection over this range: 12 halvings reach a factor of ~1.3
    for _ in range(12):
        mid = float(np.sqrt(lo * hi))
        q = rtn_quantize(W, grid=config.grid, H=H, rate=mid)
        if bits_of(q) > target:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def quantize_to_size(
    W: Tensor,
    H: Tensor | None,
    counts: Tensor | None,
    config: CompressConfig,
    bits_of: Callable[[QuantizedExperts], float],
) -> tuple[QuantizedExperts, float, float]:
    """Quantize at the rate whose stored size ``bits_of(q)`` (bits/weight) is closest to
    ``config.target_bits``: bracket the rate by factors of 4, then regula falsi on (log rate, bits) with the
    Illinois correction. Size falls as the rate rises (more zeros); the search is deterministic.

    Returns ``(q, rate, bits/weight)`` of the closest result seen. A target outside what the grid can
    reach returns the nearest end (rate 0, or the largest rate tried).
    """
    target = float(config.target_bits)  # type: ignore[arg-type]
    seen: list[tuple[float, float, QuantizedExperts]] = []

    def f(r: float) -> float:
        q = quantize(W, H, counts, config, rate=r)
        b = bits_of(q)
        seen.append((abs(b - target), r, q))
        seen.sort(key=lambda t: (t[0], t[1]))
        del seen[1:]  # keep only the best (bounded memory)
        return b - target

    r = (
        _rtn_guess(W, H, config, bits_of, target)
        if config.method == "gptq" and H is not None
        else _SEARCH_START
    )
    g, evals = f(r), 1
    lo = hi = None  # (log rate, residual) ends of the bracket: residual > 0 (too big) and < 0 (too small)
    side_prev = None
    while abs(g) > _SEARCH_TOL * target and evals < _SEARCH_EVALS:
        side = "lo" if g > 0 else "hi"
        if side == "lo":
            lo = (float(np.log(r)), g)
        else:
            hi = (float(np.log(r)), g)
        if lo is not None and hi is not None and side == side_prev:  # Illinois: damp the stale end
            if side == "lo":
                hi = (hi[0], hi[1] / 2)
            else:
                lo = (lo[0], lo[1] / 2)
        side_prev = side
        if lo is None:  # smaller than the target: lower the rate, down to nearest rounding
            r /= _SEARCH_STEP
            if r < 1e-4:
                f(0.0)
                break
        elif hi is None:
            r *= _SEARCH_STEP
            if r > _RATE_MAX:
                break
        else:
            (x0, g0), (x1, g1) = lo, hi
            x = x0 - g0 * (x1 - x0) / (g1 - g0)
            r = float(np.exp(min(max(x, x0 + 0.02 * (x1 - x0)), x1 - 0.02 * (x1 - x0))))
        g, evals = f(r), evals + 1
    _, best_rate, best = seen[0]
    return best, best_rate, bits_of(best)


def _encode(codes: np.ndarray, levels: np.ndarray, bits: str) -> Any:
    """One ``[rows, cols]`` matrix: ternary codes {-1,0,1} with levels [rows, 3], or 2-bit codes [rows, 4]."""
    from qmoe.codec import encode_int2, encode_ternary

    if bits == "ternary":
        return encode_ternary(codes, levels[:, 0], levels[:, 2])
    return encode_int2(codes.astype(np.uint8), levels)


def group_bits(
    layout: ExpertLayout, moe_path: str, q: QuantizedExperts, projections: list[str], bits: str
) -> float:
    """Stored bits/weight of a quantized group (the fused first projections, or the second): encoded
    arrays plus each matrix's estimated share of the shard header (``codec.matrix_header_bytes``)."""
    from qmoe.codec.container import matrix_header_bytes

    rows = q.codes.shape[1] // len(projections)
    encoded = []
    for e in range(q.codes.shape[0]):
        for j, proj in enumerate(projections):
            sl = slice(j * rows, (j + 1) * rows)
            enc = _encode(q.codes[e, sl].cpu().numpy(), q.levels[e, sl].cpu().numpy(), bits)
            encoded.append((layout.expert_key(moe_path, e, proj), enc))
    arrays = sum(enc.nbytes for _, enc in encoded)
    digits = len(str(2 * arrays))  # data offsets in the shard run up to about the layer's size
    nbytes = arrays + sum(matrix_header_bytes(k, enc, digits) for k, enc in encoded)
    return 8 * nbytes / q.codes.numel()


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
