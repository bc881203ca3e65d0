"""Entropy-constrained rounding: each weight's code is chosen by squared error *plus a price per stored bit*.

qmoe entropy-codes its codes, so a code's cost in bits is known: about ``-log2 p(code)`` for the code's
frequency ``p`` in its matrix (the codec stays within a few percent of that zeroth-order entropy). Nearest
rounding ignores that cost; entropy-constrained scalar quantization (Chou, Lookabaugh & Gray, 1989) minimises
``error + lambda * bits`` instead. For a ternary grid this widens the band of weights rounded to the zero code
where zeros are cheap, and ``lambda`` (``rate``) becomes a knob that trades size against error per weight.

The price is made dimensionless so that one ``rate`` means the same on any model and any matrix: the decision
for weight ``w`` of row ``r`` in column ``j`` is

    code = argmin_l  c_j * (w - level_l)^2  +  rate * s_r * bits_l

- ``c_j``: the column's weight in the objective, divided by its mean over the matrix's live columns.
  Inside GPTQ it is ``1 / U_jj^2`` (the increase of ``tr((W-Q) H (W-Q)^T)`` per unit squared error of
  column j, GPTQ's own per-column cost); for round-to-nearest it is ``H_jj``; without a Hessian, 1.
- ``s_r``: the row's mean squared weight, so the price scales with the weights' own size.
- ``bits_l = -log2 p_l`` per expert matrix, from its current codes (add-half smoothed).

``rate = 0`` is nearest rounding. The grid's levels are kept (QMoE's row extremes): moving them to the
centroids of their weights, as a full ECSQ design would (Lloyd iterations), lowered each layer's error but
raised the model's loss at every size measured on tiny-qwen3-moe (docs/results.md). The bit prices are fitted
on the unquantized weights (``fit_prices``), then held fixed while GPTQ runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_ELEMS = 1 << 24  # bound on the [B, rows, c, L] cost temporary of whole-matrix decisions


def bit_costs(codes: Tensor, n_levels: int, offset: int) -> Tensor:
    """``-log2 p`` of each level per expert ``[B, L]`` from ``codes [B, rows, cols]`` (add-half smoothing)."""
    B = codes.shape[0]
    idx = (codes.long() + offset).flatten(1)  # [B, rows*cols]
    counts = torch.zeros(B, n_levels, dtype=torch.float64, device=codes.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    p = (counts + 0.5) / (counts.sum(1, keepdim=True) + 0.5 * n_levels)
    return (-torch.log2(p)).float()


def column_weights(d: Tensor) -> Tensor:
    """``d [B, cols]`` (non-negative per-column objective weights) over its mean on live columns (d > 0).

    A matrix without any live column (no data) gets uniform weights.
    """
    live = d > 0
    n = live.sum(1, keepdim=True)  # [B, 1]
    mean = torch.where(live, d, 0).sum(1, keepdim=True) / n.clamp(min=1)
    c = d / mean.clamp(min=torch.finfo(d.dtype).tiny)
    return torch.where(n > 0, c, torch.ones_like(c))


def row_scale(W: Tensor) -> Tensor:
    """Mean squared weight per row ``[B, rows]``; rows of zeros get 1 (any positive scale will do)."""
    s = W.float().pow(2).mean(-1)
    return torch.where(s > 0, s, torch.ones_like(s))


def zero_locks(levels: Tensor, offset: int) -> Tensor:
    """``[B, rows, L]`` bool: non-zero codes whose level equals the zero level (ternary lo or hi == 0).

    Such a code stores a zero at the price of a non-zero symbol; it must never be chosen.
    """
    lock = torch.zeros_like(levels, dtype=torch.bool)
    if offset:
        lock = levels == levels[..., offset : offset + 1]
        lock[..., offset] = False
    return lock


def rd_codes(x: Tensor, levels: Tensor, price: Tensor, offset: int, lock: Tensor | None = None) -> Tensor:
    """Codes of ``x [B, rows, c]`` minimising ``(x - level)^2 + price``.

    ``price`` broadcasts to ``[B, rows, c, L]`` (already divided by the column weight); ``lock [B, rows, L]``
    forbids levels. Ties go to the lower level index, as nearest rounding's do.
    """
    B, rows, c = x.shape
    L = levels.shape[-1]
    out = torch.empty(B, rows, c, dtype=torch.int8, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(1, B * rows * L))
    price = price.expand(B, rows, c, L)
    for j0 in range(0, c, step):
        j1 = min(c, j0 + step)
        cost = (x[:, :, j0:j1, None] - levels[:, :, None, :]).pow(2) + price[:, :, j0:j1]  # [B, rows, c, L]
        if lock is not None:
            cost = cost.masked_fill(lock[:, :, None, :], torch.inf)
        out[:, :, j0:j1] = (cost.argmin(-1) - offset).to(torch.int8)
    return out


Rate = float | Tensor  # one price for every expert, or one per expert ``[B]`` (a model-wide budget)


def is_priced(rate: Rate) -> bool:
    """Whether any expert's decisions carry a bit price (else: nearest rounding throughout)."""
    return bool((rate > 0).any()) if isinstance(rate, Tensor) else rate > 0


def check_rate(rate: Rate, n: int) -> None:
    """``rate`` is a number >= 0 or a finite ``[n]`` tensor of them; raises ``ConfigError`` otherwise."""
    from qmoe.errors import ConfigError

    if isinstance(rate, Tensor):
        if rate.shape != (n,) or not bool(torch.isfinite(rate).all()) or not bool((rate >= 0).all()):
            raise ConfigError(f"per-expert rates must be a finite [{n}] tensor >= 0, got {tuple(rate.shape)}")
    elif not rate >= 0:
        raise ConfigError(f"rate must be >= 0, got {rate}")


def per_row(rate: Rate, scale: Tensor) -> Tensor:
    """``rate * s_r`` as ``[B, rows]`` for ``scale [B, rows]`` (``rate`` a number or ``[B]``)."""
    if isinstance(rate, Tensor):
        return rate.to(scale.device, scale.dtype)[:, None] * scale
    return rate * scale


def price_of(rate: Rate, scale: Tensor, bits: Tensor, c: Tensor) -> Tensor:
    """``rate * s_r * bits_l / c_j`` as ``[B, rows, cols, L]``-broadcastable ``[B, rows|1, cols, L]``.

    ``rate`` a number or per expert ``[B]``, ``scale [B, rows]``, ``bits [B, L]``, ``c [B, cols]``; a column
    of weight 0 gets an infinite price on every level whose bit cost exceeds the cheapest one (its weights
    cost nothing to zero).
    """
    inv_c = torch.where(c > 0, 1.0 / c.clamp(min=torch.finfo(c.dtype).tiny), torch.inf)  # [B, cols]
    rel = bits - bits.amin(-1, keepdim=True)  # [B, L]: only differences between levels matter
    p = per_row(rate, scale)[:, :, None, None] * rel[:, None, None, :] * inv_c[:, None, :, None]
    return torch.nan_to_num(
        p, nan=0.0, posinf=torch.inf
    )  # inf * 0 (the cheapest level of a dead column) costs nothing


def fit_prices(
    W: Tensor, levels: Tensor, c: Tensor, rate: Rate, offset: int, iterations: int = 8,
    scale: Tensor | None = None,
) -> Tensor:
    """Bit prices ``[B, L]`` consistent with the decisions they cause, on unquantized ``W [B, rows, cols]``.

    Starts from nearest rounding's code frequencies and alternates decision and re-estimate (the code
    frequencies of a priced decision are what the codec will see); ``levels [B, rows, L]`` stay as the grid
    fitted them. Column weights ``c [B, cols]`` as in ``column_weights``; ``scale [B, rows]`` the rows'
    price scales (default ``row_scale(W)``).
    """
    scale = row_scale(W) if scale is None else scale
    L = levels.shape[-1]
    lock = zero_locks(levels, offset)
    bits = bit_costs(rd_codes(W, levels, torch.zeros(1, 1, 1, 1, device=W.device), offset, lock), L, offset)
    for _ in range(iterations):
        bits = bit_costs(rd_codes(W, levels, price_of(rate, scale, bits, c), offset, lock), L, offset)
    return bits
