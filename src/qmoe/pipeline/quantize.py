"""Quantize a stack of experts (GPTQ or round-to-nearest), at a given bit price or to a stored size.

Every expert is quantized: one that saw fewer than ``min_tokens`` calibration tokens (or whose Hessian is
not positive definite) is rounded to nearest instead of GPTQ-quantized, and flagged (``fallback``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qmoe.adapters import ExpertLayout
from qmoe.config import CompressConfig
from qmoe.gptq import QuantizedExperts, gptq_quantize, rtn_quantize
from qmoe.pipeline.comm import LOCAL, Local
from qmoe.pipeline.encode import GroupSize


@dataclass(frozen=True)
class Quantized:
    """One quantized group and the settings that made it."""

    q: QuantizedExperts
    rate: float  # the bit price (times each expert's multiplier under a budget)
    level_scale: float
    bits: float | None  # stored bits/weight of the whole group; None: no size target (not measured)


def quantize(
    W: Tensor,
    H: Tensor | None,
    counts: Tensor | None,
    config: CompressConfig,
    rate: float | Tensor | None = None,
    level_scale: float | None = None,
    row_scales: Tensor | None = None,
) -> QuantizedExperts:
    """``W [E, rows, cols]`` quantized on ``config.grid`` by ``config.method`` at ``rate`` (a number, or
    one per expert ``[E]``) and ``level_scale`` (default: the config's); ``row_scales [E, rows]``: the rows'
    bit price scales (``qmoe.pipeline.rows``; default each row's mean square)."""
    rate = config.rate if rate is None else rate
    scale = config.level_scale if level_scale is None else level_scale
    if config.method == "rtn" or H is None:
        return rtn_quantize(
            W, grid=config.grid, H=H, rate=rate, refit=config.refit, damp=config.damp, level_scale=scale,
            row_scales=row_scales,
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
        row_scales=row_scales,
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
    size: GroupSize,
    comm: Local,
    target: float,
    weights: Tensor | None = None,
    row_scales: Tensor | None = None,
) -> float:
    """A starting rate for the GPTQ search: where priced round-to-nearest (cheap: no column loop) has the
    target size. GPTQ at the same rate lands close, so the search needs two or three GPTQ runs, not six."""
    lo, hi = 1e-3, 1e3  # log-space bisection over this range: 12 halvings reach a factor of ~1.3
    for _ in range(12):
        mid = float(np.sqrt(lo * hi))
        q = rtn_quantize(
            W, grid=config.grid, H=H, rate=expert_rates(mid, weights), level_scale=config.level_scale,
            row_scales=row_scales,
        )
        if size.bits_per_weight(q, comm) > target:
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
    size: GroupSize,
    comm: Local = LOCAL,
    target: float | None = None,
    rate_weights: Tensor | None = None,
    row_scales: Tensor | None = None,
) -> Quantized:
    """Quantize so that the stored size (bits/weight of the whole group, ``size.bits_per_weight(q, comm)``:
    summed over the ranks, so every rank takes the same steps) is closest to ``target`` (default
    ``config.target_bits``); ``rate_weights [E]``: each expert's rate is the searched rate times its weight
    (a model-wide budget's relative prices, ``qmoe.pipeline.budget``).

    Nearest rounding on the grid (rate 0, the configured level scale) is the first try. Smaller than that:
    search the bit price ``rate`` (more zeros as it rises), in log space from where priced round-to-nearest
    has the target size. Larger than that: keep rate 0 and shrink the grid's levels (``level_scale`` below
    the configured one: more weights take a nonzero code, each smaller). Measured on tiny-qwen3-moe, large
    levels with a price win below the grid's own size and smaller levels above it (docs/recipes.md).

    Returns the closest result seen. A target out of reach returns the nearest end. Deterministic.
    """
    target = float(config.target_bits if target is None else target)  # type: ignore[arg-type]
    tol = _SEARCH_TOL * target
    best: list[tuple[float, float, float, float, QuantizedExperts]] = []  # (|miss|, rate, scale, bits, q)

    def run(rate: float, scale: float) -> float:
        q = quantize(W, H, counts, config, rate=expert_rates(rate, rate_weights), level_scale=scale,
                     row_scales=row_scales)
        b = size.bits_per_weight(q, comm)  # a collective in a distributed run
        best.append((abs(b - target), rate, scale, b, q))
        best.sort(key=lambda t: t[:3])
        del best[1:]  # keep only the closest (bounded memory)
        return b - target

    scale0 = config.level_scale
    g0 = run(0.0, scale0)
    if g0 > tol:  # too big at nearest rounding: price the bits
        gptq = config.method == "gptq" and H is not None
        start = _rtn_guess(W, H, config, size, comm, target, rate_weights, row_scales) if gptq else 1.0
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
        shrink = (0.85 * scale0, 0.15 * scale0, _SCALE_MIN * scale0, scale0, tol)
        _solve_decreasing(lambda s: run(0.0, s), *shrink, known=(scale0, g0))
    _, rate, scale, bits, q = best[0]
    return Quantized(q, rate, scale, bits)


def stack_experts(
    tensors: dict[str, Tensor], layout: ExpertLayout, moe_path: str, experts: range, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(w_first [E_r, F*I, d], w_second [E_r, d, I])`` float32 on ``device`` of ``experts`` (``E_r`` of
    them) from the on-disk expert tensors."""
    first = torch.cat([layout.weights(tensors, moe_path, p, experts) for p in layout.first], dim=1)
    second = layout.weights(tensors, moe_path, layout.second, experts)
    return first.to(device, torch.float32), second.to(device, torch.float32)
