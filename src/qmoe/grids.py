"""Quantization grids as types, over stacks of expert weights ``[E, rows, cols]``.

A grid is fitted once per output row (from the original, unquantized row, as GPTQ does) and gives each row
a short sorted list of *levels*; quantizing a value means picking the nearest level. Grids:

- ``"ternary"``: QMoE's grid (Frantar & Alistarh, "QMoE: Practical Sub-1-Bit Compression of Trillion-Parameter
  Models", 2023): levels ``{lo, 0, hi}`` with ``lo = min(row_min, 0)``, ``hi = max(row_max, 0)``, so the
  thresholds sit at ``lo/2`` and ``hi/2``; an all-zero row gets ``lo = -1, hi = 1``.
- ``"ternary-opt"``: same ``{lo, 0, hi}`` form, but ``lo`` and ``hi`` minimise the (Hessian-diagonal weighted,
  when a Hessian is given) squared rounding error of the row, by Lloyd-Max iterations started from QMoE's
  min/max levels. Zero stays a level, so codes stay sparse for the codec.
- ``"int2"``, ``"int3"``, ``"int4"``: asymmetric min-max k-bit grids as in GPTQ (Frantar et al., 2022):
  ``scale = (max(row_max, 0) - min(row_min, 0)) / (2^k - 1)`` and an integer zero point, so 0 is a level.

Levels are rounded to fp16 before use because the codec stores fp16 levels; a quantized weight is then
exactly what the decoder reproduces. Codes are int8: ternary codes are ``{-1, 0, 1}`` (level index minus one),
k-bit codes are ``{0 .. 2^k - 1}`` (the level index).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from qmoe.errors import ConfigError, QuantizationError

__all__ = ["Grid", "TernaryGrid", "OptimalTernaryGrid", "MinMaxGrid", "GRIDS", "get_grid"]


def _to_fp16_levels(levels: Tensor, what: str) -> Tensor:
    """Round levels ``[E, rows, L]`` to fp16-representable float32; refuse overflow to inf."""
    rounded = levels.to(torch.float16)
    bad = ~torch.isfinite(rounded).flatten(1).all(1)  # [E]
    if bad.any():
        experts = bad.nonzero().flatten().tolist()
        raise QuantizationError(
            f"{what} levels of expert(s) {experts} overflow fp16 (|weight| > 65504); "
            "rescale those weights before quantizing"
        )
    return rounded.to(torch.float32)


class Grid(ABC):
    """A per-row quantization grid: ``fit`` levels, then map values to the nearest level.

    Subclasses define ``name``, ``n_levels``, ``code_offset`` (code = level index - code_offset) and ``_fit``.
    """

    name: str
    n_levels: int
    code_offset: int

    def fit(self, W: Tensor, hdiag: Tensor | None = None) -> Tensor:
        """Levels ``[E, rows, n_levels]`` float32 (fp16-exact, ascending) for ``W [E, rows, cols]``.

        ``hdiag [E, cols]`` (the Hessian diagonal) may weight columns; grids that ignore it say so.
        """
        assert W.dim() == 3, f"expected W [E, rows, cols], got {tuple(W.shape)}"
        if hdiag is not None:
            assert hdiag.shape == (W.shape[0], W.shape[2]), f"hdiag {tuple(hdiag.shape)}, W {tuple(W.shape)}"
        levels = _to_fp16_levels(self._fit(W.float(), None if hdiag is None else hdiag.float()), self.name)
        # fp16 rounding keeps the order, so the levels stay ascending and midpoints stay valid.
        return levels

    @abstractmethod
    def _fit(self, W: Tensor, hdiag: Tensor | None) -> Tensor:
        """Unrounded levels ``[E, rows, n_levels]``, ascending."""

    def thresholds(self, levels: Tensor) -> Tensor:
        """Decision thresholds ``[E, rows, n_levels - 1]``: midpoints between neighbouring levels.

        Where two neighbouring levels coincide (ternary ``lo == 0`` for a row with no negative weights), the
        threshold moves outward so that such values get the zero code: the codec compresses zeros best.
        """
        mid = 0.5 * (levels[..., 1:] + levels[..., :-1])  # [E, rows, L-1]
        if self.code_offset:
            zero = self.code_offset  # level index of the zero level
            below = torch.arange(mid.shape[-1], device=mid.device) < zero  # thresholds left of zero
            same = levels[..., 1:] == levels[..., :-1]
            mid = torch.where(same & below, -torch.inf, torch.where(same, torch.inf, mid))
        return mid

    def quantize(self, x: Tensor, levels: Tensor, thresholds: Tensor | None = None) -> Tensor:
        """Codes (int8) of ``x [E, rows, c]`` on ``levels [E, rows, L]``: nearest level, ties to the lower."""
        if thresholds is None:
            thresholds = self.thresholds(levels)
        # Level index = number of thresholds strictly below x. (torch.searchsorted is far slower on CPU here.)
        n_thr = thresholds.shape[-1]
        if x.shape[-1] * n_thr <= 64:  # GPTQ's one column at a time: one fused [E, rows, c, L-1] mask
            idx = (x.unsqueeze(-1) > thresholds.unsqueeze(-2)).sum(-1)  # [E, rows, c]
        else:  # whole matrices: one threshold at a time, no [E, rows, cols, L-1] temporary
            idx = torch.zeros(x.shape, dtype=torch.int8, device=x.device)
            for k in range(n_thr):
                idx += x > thresholds[..., k : k + 1]
        return (idx - self.code_offset).to(torch.int8)

    def dequantize(self, codes: Tensor, levels: Tensor) -> Tensor:
        """Float32 values ``[E, rows, c]`` of ``codes [E, rows, c]`` on ``levels [E, rows, L]``."""
        return levels.gather(-1, codes.long() + self.code_offset)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class TernaryGrid(Grid):
    """QMoE's ternary grid: ``{min(row_min, 0), 0, max(row_max, 0)}``; ignores the Hessian."""

    name = "ternary"
    n_levels = 3
    code_offset = 1

    def _fit(self, W: Tensor, hdiag: Tensor | None) -> Tensor:
        lo = W.amin(-1).clamp(max=0)  # [E, rows]
        hi = W.amax(-1).clamp(min=0)
        zero_row = (lo == 0) & (hi == 0)
        lo = torch.where(zero_row, -1.0, lo)
        hi = torch.where(zero_row, 1.0, hi)
        return torch.stack([lo, torch.zeros_like(lo), hi], -1)  # [E, rows, 3]


class OptimalTernaryGrid(TernaryGrid):
    """Ternary ``{lo, 0, hi}`` with levels minimising the weighted squared rounding error per row.

    With zero fixed as a level, positive weights only ever round to ``0`` or ``hi`` and negative ones to
    ``0`` or ``lo``, so each side is a one-level Lloyd-Max problem: assign ``x > hi/2`` to ``hi``, set
    ``hi`` to the weighted mean of that set, repeat. No step increases the error, so starting from QMoE's
    levels the result is never worse than QMoE's grid on the row (up to fp16 rounding of the levels).
    Weights are ``H_jj`` (the diagonal of the GPTQ objective) when ``hdiag`` is given, else uniform.
    """

    name = "ternary-opt"
    iterations = 16

    def _fit(self, W: Tensor, hdiag: Tensor | None) -> Tensor:
        levels = super()._fit(W, hdiag)  # [E, rows, 3] QMoE's start
        lo, hi = levels[..., 0].clone(), levels[..., 2].clone()  # [E, rows]
        d = torch.ones_like(W[:, :1, :]) if hdiag is None else hdiag.clamp(min=0).unsqueeze(1)  # [E, 1, cols]
        dw = d * W  # [E, rows, cols]
        for _ in range(self.iterations):
            pos = W > (0.5 * hi).unsqueeze(-1)  # [E, rows, cols]
            neg = W < (0.5 * lo).unsqueeze(-1)
            hi_num, hi_den = (dw * pos).sum(-1), (d * pos).sum(-1)  # [E, rows]
            lo_num, lo_den = (dw * neg).sum(-1), (d * neg).sum(-1)
            # An empty or zero-weight side keeps its level: any value is equally good there.
            hi = torch.where(hi_den > 0, hi_num / hi_den.clamp(min=1e-30), hi)
            lo = torch.where(lo_den > 0, lo_num / lo_den.clamp(min=1e-30), lo)
        return torch.stack([lo, torch.zeros_like(lo), hi], -1)


class MinMaxGrid(Grid):
    """Asymmetric min-max k-bit grid (GPTQ's ``Quantizer`` with ``sym=False``); ignores the Hessian.

    ``scale = (hi - lo) / (2^k - 1)`` with ``lo = min(row_min, 0)``, ``hi = max(row_max, 0)``; the zero point
    is rounded to an integer so that 0 is exactly a level (dead columns and pruned weights stay exact).
    """

    code_offset = 0

    def __init__(self, bits: int) -> None:
        assert 1 <= bits <= 7, f"bits must fit an int8 code, got {bits}"
        self.bits = bits
        self.name = f"int{bits}"
        self.n_levels = 2**bits

    def _fit(self, W: Tensor, hdiag: Tensor | None) -> Tensor:
        maxq = self.n_levels - 1
        lo = W.amin(-1).clamp(max=0)  # [E, rows]
        hi = W.amax(-1).clamp(min=0)
        zero_row = (lo == 0) & (hi == 0)
        lo = torch.where(zero_row, -1.0, lo)
        hi = torch.where(zero_row, 1.0, hi)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale)  # [E, rows], in [0, maxq]
        q = torch.arange(self.n_levels, device=W.device, dtype=W.dtype)  # [L]
        return scale.unsqueeze(-1) * (q - zero.unsqueeze(-1))  # [E, rows, L]


GRIDS: dict[str, Grid] = {
    g.name: g for g in (TernaryGrid(), OptimalTernaryGrid(), MinMaxGrid(2), MinMaxGrid(3), MinMaxGrid(4))
}


def get_grid(grid: str | Grid) -> Grid:
    """The grid registered under ``grid`` (or ``grid`` itself if it already is a ``Grid``)."""
    if isinstance(grid, Grid):
        return grid
    try:
        return GRIDS[grid]
    except KeyError:
        raise ConfigError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}") from None
