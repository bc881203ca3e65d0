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
    W: Tensor,
    H: Tensor | None,
    counts: Tensor | None,
    config: CompressConfig,
    rate: float | Tensor | None = None,
    level_scale: float | None = None,
) -> QuantizedExperts:
    """``W [E, rows, cols]`` quantized on ``config.grid`` by ``config.method`` at ``rate`` (a number, or
    one per expert ``[E]``) and ``level_scale`` (default: the config's)."""
    rate = config.rate if rate is None else rate
    scale = config.level_scale if level_scale is None else level_scale
    if config.method == "rtn" or H is None:
        return rtn_quantize(
            W, grid=config.grid, H=H, rate=rate, refit=config.refit, damp=config.damp, level_scale=scale
        )
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
        level_scale=scale,
    )


_SEARCH_TOL = 0.01  # relative bits/weight error at which the search stops
_SEARCH_EVALS = 10  # GPTQ runs per regime, at most
_RATE_RANGE = (1e-4, 1e4)  # beyond 1e4 every weight of a normal row is zero
_SCALE_MIN = 0.25  # smallest level scale tried when the target is above the grid's own size


MAX_RATE = 1e6  # per-expert rates are clamped here: beyond it every weight of any row is zero anyway


def expert_rates(rate: float, weights: Tensor | None) -> float | Tensor:
    """``rate`` for every expert, or ``rate * weights [E]`` (a budget's relative prices), clamped."""
    return rate if weights is None else (rate * weights).clamp(max=MAX_RATE)


def _rtn_guess(
    W: Tensor,
    H: Tensor,
    config: CompressConfig,
    bits_of: Callable[[QuantizedExperts], float],
    target: float,
    weights: Tensor | None = None,
) -> float:
    """A starting rate for the GPTQ search: where priced round-to-nearest (cheap: no column loop) has the
    target size. GPTQ at the same rate lands close, so the search needs two or three GPTQ runs, not six."""
    lo, hi = 1e-3, 1e3  # log-space bisection over this range: 12 halvings reach a factor of ~1.3
    for _ in range(12):
        mid = float(np.sqrt(lo * hi))
        q = rtn_quantize(
            W, grid=config.grid, H=H, rate=expert_rates(mid, weights), level_scale=config.level_scale
        )
        if bits_of(q) > target:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def _solve_decreasing(
    g: Callable[[float], float],
    x: float,
    step: float,
    x_min: float,
    x_max: float,
    tol: float,
    known: tuple[float, float] | None = None,
) -> None:
    """Drive a decreasing ``g`` to within ``tol`` of 0: step by ``step`` until the root is bracketed
    (within ``[x_min, x_max]``), then regula falsi with the Illinois correction. ``known``: a point
    ``(x, g(x))`` already evaluated. The caller's ``g`` records what it sees; nothing is returned."""
    lo = hi = None  # (x, g) with g > 0 (x too small) and g < 0 (x too large)
    if known is not None:
        lo, hi = (known, None) if known[1] > 0 else (None, known)
    side_prev = None
    for _ in range(_SEARCH_EVALS):
        v = g(x)
        if abs(v) <= tol:
            return
        side = "lo" if v > 0 else "hi"
        if side == "lo":
            lo = (x, v)
        else:
            hi = (x, v)
        if lo is not None and hi is not None and side == side_prev:  # Illinois: damp the stale end
            hi, lo = ((hi[0], hi[1] / 2), lo) if side == "lo" else (hi, (lo[0], lo[1] / 2))
        side_prev = side
        if lo is None:
            if x <= x_min:
                return
            x = max(x - step, x_min)
        elif hi is None:
            if x >= x_max:
                return
            x = min(x + step, x_max)
        else:
            (x0, g0), (x1, g1) = lo, hi
            x = x0 - g0 * (x1 - x0) / (g1 - g0)
            x = min(max(x, x0 + 0.02 * (x1 - x0)), x1 - 0.02 * (x1 - x0))  # stay strictly inside


def quantize_to_size(
    W: Tensor,
    H: Tensor | None,
    counts: Tensor | None,
    config: CompressConfig,
    bits_of: Callable[[QuantizedExperts], float],
    target: float | None = None,
    rate_weights: Tensor | None = None,
) -> tuple[QuantizedExperts, float, float, float]:
    """Quantize so that the stored size ``bits_of(q)`` (bits/weight) is closest to ``target`` (default
    ``config.target_bits``); ``rate_weights [E]``: each expert's rate is the searched rate times its weight
    (a model-wide budget's relative prices, ``qmoe.pipeline.budget``).

    Nearest rounding on the grid (rate 0, the configured level scale) is the first try. Smaller than that:
    search the bit price ``rate`` (more zeros as it rises), in log space from where priced round-to-nearest
    has the target size. Larger than that: keep rate 0 and shrink the grid's levels (``level_scale`` below
    the configured one: more weights take a nonzero code, each smaller). Measured on tiny-qwen3-moe, large
    levels with a price win below the grid's own size and smaller levels above it (docs/recipes.md).

    Returns ``(q, rate, level_scale, bits/weight)`` of the closest result seen. A target out of reach
    returns the nearest end. Deterministic.
    """
    target = float(config.target_bits if target is None else target)  # type: ignore[arg-type]
    tol = _SEARCH_TOL * target
    best: list[tuple[float, float, float, float, QuantizedExperts]] = []  # (|miss|, rate, scale, bits, q)

    def run(rate: float, scale: float) -> float:
        q = quantize(W, H, counts, config, rate=expert_rates(rate, rate_weights), level_scale=scale)
        b = bits_of(q)
        best.append((abs(b - target), rate, scale, b, q))
        best.sort(key=lambda t: t[:3])
        del best[1:]  # keep only the closest (bounded memory)
        return b - target

    scale0 = config.level_scale
    g0 = run(0.0, scale0)
    if g0 > tol:  # too big at nearest rounding: price the bits
        start = (
            _rtn_guess(W, H, config, bits_of, target, rate_weights)
            if config.method == "gptq" and H is not None
            else 1.0
        )
        lo, hi = np.log(_RATE_RANGE[0]), np.log(_RATE_RANGE[1])
        _solve_decreasing(
            lambda x: run(float(np.exp(x)), scale0),
            float(np.clip(np.log(start), lo, hi)),
            np.log(4.0),
            lo,
            hi,
            tol,
        )
    elif g0 < -tol:  # too small even so: shrink the levels
        _solve_decreasing(
            lambda s: run(0.0, s),
            0.85 * scale0,
            0.15 * scale0,
            _SCALE_MIN * scale0,
            scale0,
            tol,
            known=(scale0, g0),
        )
    _, rate, scale, bits, q = best[0]
    return q, rate, scale, bits


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
    first: int = 0,
    total: Callable[[list[int]], list[int]] = list,
    dropped: frozenset[int] = frozenset(),
) -> float:
    """Stored bits/weight of a quantized group (the fused first projections, or the second): encoded
    arrays plus each matrix's estimated share of the shard header (``codec.matrix_header_bytes``).

    ``q`` holds experts ``first, first + 1, ...``; ``total`` sums integer counts over the ranks that hold
    the rest of the group (``Dist.sum_ints``; one process: the identity). ``dropped`` experts store nothing
    but their weights still count: bits/weight is always over the whole group."""
    stored = expert_bits(layout, moe_path, q, projections, bits, first, total, dropped)
    nbits, weights = total([int(stored.sum()), q.codes.numel()])  # one collective for both sums
    return nbits / weights


def expert_bits(
    layout: ExpertLayout,
    moe_path: str,
    q: QuantizedExperts,
    projections: list[str],
    bits: str,
    first: int = 0,
    total: Callable[[list[int]], list[int]] = list,
    dropped: frozenset[int] = frozenset(),
) -> np.ndarray:
    """``[E_r]`` int64 stored bits of each expert of ``q`` in this group (arrays and header estimate; 0 for
    a ``dropped`` one). The header estimate's offset width comes from the whole group (``total``)."""
    from qmoe.codec.container import matrix_header_bytes

    rows = q.codes.shape[1] // len(projections)
    encoded: list[list[tuple[str, Any]]] = []
    for e in range(q.codes.shape[0]):
        mats = []
        if first + e not in dropped:
            for j, proj in enumerate(projections):
                sl = slice(j * rows, (j + 1) * rows)
                enc = _encode(q.codes[e, sl].cpu().numpy(), q.levels[e, sl].cpu().numpy(), bits)
                mats.append((layout.expert_key(moe_path, first + e, proj), enc))
        encoded.append(mats)
    (arrays,) = total([sum(enc.nbytes for mats in encoded for _, enc in mats)])
    digits = len(str(2 * arrays))  # data offsets in the shard run up to about the layer's size
    return np.array(
        [8 * sum(enc.nbytes + matrix_header_bytes(k, enc, digits) for k, enc in mats) for mats in encoded],
        dtype=np.int64,
    )


def encode_experts(
    layout: ExpertLayout,
    moe_path: str,
    first: QuantizedExperts,
    second: QuantizedExperts,
    bits: str,
    first_expert: int = 0,
    dropped: frozenset[int] = frozenset(),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Encoded matrices under their on-disk keys, and per-expert size statistics.

    ``first`` holds the fused first projections ``[E, F*I, d]`` (in ``layout.first`` order), ``second``
    the second projection ``[E, d, I]``, of experts ``first_expert, first_expert + 1, ...``; each expert
    projection becomes one encoded ``[rows, cols]`` matrix; a ``dropped`` expert (global index) none.
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
        if first_expert + e in dropped:
            weights = sum(q.codes[e, sl].numel() for _, q, sl in parts)
            stats.append({"expert": first_expert + e, "bytes": 0, "weights": weights, "bits_per_weight": 0.0,
                          "zero_fraction": 1.0, "dropped": True})
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


def stack_experts(
    tensors: dict[str, Tensor], layout: ExpertLayout, moe_path: str, experts: range, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(w_first [E_r, F*I, d], w_second [E_r, d, I])`` float32 on ``device`` of ``experts`` (``E_r`` of
    them) from the on-disk expert tensors."""
    first = torch.cat([layout.weights(tensors, moe_path, p, experts) for p in layout.first], dim=1)
    second = layout.weights(tensors, moe_path, layout.second, experts)
    return first.to(device, torch.float32), second.to(device, torch.float32)
