"""Per-expert Hessian accumulation and batched GPTQ over a stack of experts ``[E, rows, cols]``.

GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022) quantizes a weight matrix column by column and spreads each column's rounding
error over the columns not yet quantized, through the upper Cholesky factor of ``H^-1``, with lazy block
updates. QMoE (Frantar & Alistarh, "QMoE: Practical Sub-1-Bit Compression of Trillion-Parameter Models", 2023)
runs it over thousands of experts at once. Here every step is batched over an expert dimension, with one
batched Cholesky per batch of experts, and an expert that saw too few tokens or whose Hessian is not
positive definite falls back to round-to-nearest (flagged) instead of stopping the run.

Hessian convention: ``H = 2/n * sum x x^T`` over the ``n`` tokens routed to the expert (GPTQ's running mean).
The scale does not change GPTQ's result (damping is relative to the mean diagonal), only the objective's
units.

Rows are output features, columns are input features (``nn.Linear.weight`` layout): ``H`` is ``[cols, cols]``.
No model knowledge here; the pipeline captures inputs and calls ``HessianAccumulator.add``.

Two refinements beyond GPTQ, both off by default here (the recipes in ``qmoe.recipes`` choose): ``rate``
prices each rounding decision by its coded bits (``qmoe.gptq.rate``), and ``refit`` re-solves each row's
levels for its final codes (``qmoe.gptq.refit``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qmoe.errors import ConfigError, QuantizationError
from qmoe.gptq import rate as qrate
from qmoe.gptq.refit import refit_levels
from qmoe.grids import Grid, get_grid

__all__ = ["QuantizedExperts", "gptq_quantize", "rtn_quantize"]

log = logging.getLogger(__name__)

_MIN_DAMP = 1e-6  # damping floor, relative to the mean diagonal: damp=0 must still be positive definite
_RETRY_FACTOR = 10.0  # damping growth per Cholesky retry
_RETRIES = 3
_BATCH_BYTES = 4 << 30  # working-memory budget that sizes the default expert batch
_CPU_BLOCK_BYTES = 2 << 20  # CPU: the [experts, block_size, rows] column block should stay in cache


@dataclass(frozen=True)
class QuantizedExperts:
    """Quantized stack of experts; ``dequantized == grid.dequantize(codes, levels)`` exactly.

    - ``dequantized``: ``[E, rows, cols]`` float32, values exactly what the codec's decoders return.
    - ``codes``: ``[E, rows, cols]`` int8; ternary ``{-1, 0, 1}`` (``levels[code + 1]``),
      k-bit ``{0..2^k-1}`` (``levels[code]``).
    - ``levels``: ``[E, rows, n_levels]`` float32 on the codec's level grid (``qmoe.codec.levels``: ternary
      and int2; fp16-exact for the other widths), ascending; ternary ``[lo, 0, hi]``.
    - ``objective``: ``[E]`` float64 ``tr((W - Q) H (W - Q)^T)`` with the undamped ``H``;
      ``None`` without ``H``.
    - ``fallback``: ``[E]`` bool, True where the expert was rounded to nearest instead of GPTQ-quantized.
    """

    grid: str
    dequantized: Tensor
    codes: Tensor
    levels: Tensor
    objective: Tensor | None
    fallback: Tensor

    @property
    def lo(self) -> Tensor:
        """Ternary negative level ``[E, rows]``."""
        return self._ternary_level(0)

    @property
    def hi(self) -> Tensor:
        """Ternary positive level ``[E, rows]``."""
        return self._ternary_level(2)

    def _ternary_level(self, i: int) -> Tensor:
        if get_grid(self.grid).code_offset != 1:
            raise AttributeError(f"lo/hi exist only for ternary grids, not {self.grid!r}; use .levels")
        return self.levels[..., i]


def _check_finite(t: Tensor, what: str, first: int) -> None:
    bad = ~torch.isfinite(t).flatten(1).all(1)  # [B]
    if bad.any():
        experts = (bad.nonzero().flatten() + first).tolist()
        raise QuantizationError(
            f"{what} of expert {experts[0]} contain NaN or Inf (experts with non-finite values: {experts}); "
            "check the model weights and the calibration forward pass (fp16 overflow?)"
        )


def _objective(W: Tensor, Q: Tensor, H: Tensor) -> Tensor:
    """``tr((W - Q) H (W - Q)^T)`` per expert ``[E]``, in fp64: GPTQ leaves W - Q in H's weak directions."""
    out = torch.empty(W.shape[0], dtype=torch.float64, device=W.device)
    for s in range(0, W.shape[0], 8):  # bound the fp64 temporaries to 8 experts
        D = W[s : s + 8].double() - Q[s : s + 8].double()  # [b, rows, cols]
        out[s : s + 8] = ((D @ H[s : s + 8].to(W.device, torch.float64)) * D).sum((1, 2))
    return out


def _upper_cholesky_of_inverse(H: Tensor, lam: Tensor, todo: Tensor, first: int) -> tuple[Tensor, Tensor]:
    """``U`` with ``(H + lam I)^-1 = U^T U`` (upper), for the experts in ``todo`` ``[B]`` bool.

    Failures are read from ``cholesky_ex``'s ``info`` per expert; those experts are retried with damping
    multiplied by ``_RETRY_FACTOR`` up to ``_RETRIES`` times. Returns ``U [B, cols, cols]`` and ``ok [B]``.
    """
    B = H.shape[0]
    U = torch.zeros_like(H)
    ok = torch.zeros(B, dtype=torch.bool, device=H.device)
    lam = lam.clone()
    idx = todo.nonzero().flatten()  # experts still to factor
    for attempt in range(_RETRIES + 1):
        if idx.numel() == 0:
            break
        Hd = H[idx]  # [b, n, n] copy
        Hd.diagonal(dim1=-2, dim2=-1).add_(lam[idx, None])
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        good = info == 0
        if good.any():
            Hinv = torch.cholesky_inverse(L[good])  # [g, n, n]
            del L
            Ug, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            good2 = (info2 == 0) & torch.isfinite(Ug).flatten(1).all(1)
            done = idx[good][good2]
            U[done] = Ug[good2]
            ok[done] = True
        idx = idx[~ok[idx]]
        if idx.numel():
            verb = (
                f"retrying with x{_RETRY_FACTOR:g} damping" if attempt < _RETRIES else "rounding to nearest"
            )
            log.warning("Cholesky failed for experts %s; %s", (idx + first).tolist(), verb)
            lam[idx] *= _RETRY_FACTOR
    return U, ok


def _gptq_columns(
    WT: Tensor,
    U: Tensor,
    grid: Grid,
    levels: Tensor,
    block_size: int,
    pricing: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """GPTQ's blocked column loop on transposed weights ``WT [B, cols, rows]`` (modified in place).

    Transposed so that a column is a contiguous ``[B, rows]`` slice. Returns codes ``[B, cols, rows]`` int8
    and dequantized ``[B, cols, rows]``. ``U = I`` for an expert makes this round-to-nearest for it.
    ``pricing = (rate * s_r [B, rows], relative bits [B, L], 1 / c_j [B, cols])`` switches nearest rounding
    to entropy-constrained rounding (``qmoe.gptq.rate``).
    """
    B, cols, rows = WT.shape
    thr = grid.thresholds(levels)  # [B, rows, L-1]
    if pricing is not None:
        scale, rel, inv_c = pricing
        # Price of each level before the column factor, with forbidden levels (qrate.zero_locks) at +inf.
        base = (scale[:, :, None] * rel[:, None, :]).masked_fill(
            qrate.zero_locks(levels, grid.code_offset), torch.inf
        )
    codes = torch.empty(B, cols, rows, dtype=torch.int8, device=WT.device)
    Q = torch.empty_like(WT)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = WT[:, i1:i2].clone()  # [B, c, rows] the block, updated column by column
        Err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]  # [B, c, c]
        for i in range(i2 - i1):
            w = W1[:, i].unsqueeze(-1)  # [B, rows, 1]
            if pricing is None:
                code = grid.quantize(w, levels, thr)  # [B, rows, 1]
            else:  # qrate.rd_codes for one column, inlined: this loop is GPTQ's hot path on CPU
                cost = (w - levels).square_().add_(base * inv_c[:, i1 + i, None, None])  # [B, rows, L]
                code = (cost.argmin(-1, keepdim=True) - grid.code_offset).to(torch.int8)
            q = grid.dequantize(code, levels)
            err = (w - q) / U1[:, i, i, None, None]  # [B, rows, 1]
            # Spread the error over the rest of the block: W1[:, j] -= err * U[i, j] for j > i.
            W1[:, i + 1 :].addcmul_(U1[:, i, i + 1 :, None], err.transpose(1, 2), value=-1)
            codes[:, i1 + i] = code[..., 0]
            Q[:, i1 + i] = q[..., 0]
            Err1[:, i] = err[..., 0]
        # Lazy update of all later columns at once: [B, cols - i2, c] @ [B, c, rows].
        WT[:, i2:].baddbmm_(U[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1)
    return codes, Q


def _free_levels(grid: Grid) -> Tensor:
    """``[L]`` bool: levels a refit may move (all but a ternary grid's zero, the codec's background)."""
    free = torch.ones(grid.n_levels, dtype=torch.bool)
    if grid.code_offset:
        free[grid.code_offset] = False
    return free


def _stored(levels: Tensor, grid: Grid) -> Tensor:
    """Levels ``[B, rows, L]`` moved onto the grid the codec stores (format 2, ``qmoe.codec.levels``), so
    GPTQ quantizes against exactly what the decoders return; grids the codec does not store (int3, int4)
    keep their fp16 levels."""
    from qmoe.codec.levels import round_levels

    if grid.n_levels == 3 and grid.code_offset == 1:  # ternary [lo, 0, hi]: lo and hi are stored
        kind, cols = "ternary", [0, 2]
    elif grid.n_levels == 4 and grid.code_offset == 0:
        kind, cols = "int2", [0, 1, 2, 3]
    else:
        return levels
    lv = levels[..., cols].cpu().numpy()  # [B, rows, 2|4]
    # Rows a refit got wrong (not finite, or lo > 0 / hi < 0) stay as they are: refit_levels rejects them.
    ok = np.isfinite(lv).all(-1)
    if kind == "ternary":
        ok &= (lv[..., 0] <= 0) & (lv[..., 1] >= 0)
    rounded = np.where(ok[..., None], round_levels(np.where(ok[..., None], lv, 0.0), kind), lv)
    out = levels.clone()
    out[..., cols] = torch.from_numpy(rounded.astype(np.float32)).to(out)
    return out


def _scaled(levels: Tensor, level_scale: float, grid: Grid) -> Tensor:
    """Levels ``[B, rows, L]`` times ``level_scale``, rounded as the codec stores them (``_stored``)."""
    if level_scale != 1.0:
        levels = (levels * level_scale).to(torch.float16).float()
    return _stored(levels, grid)


def _prices(
    W: Tensor, levels: Tensor, d: Tensor, grid: Grid, rate: qrate.Rate, scale: Tensor | None
) -> Tensor:
    """Relative bit prices ``[B, L]`` (cheapest level 0) for ``W [B, rows, cols]``, column weights ``d``,
    row price scales ``scale [B, rows]``."""
    bits = qrate.fit_prices(W, levels, qrate.column_weights(d), rate, grid.code_offset, scale=scale)
    return bits - bits.amin(-1, keepdim=True)


def _gptq_batch(
    W: Tensor,
    H: Tensor,
    grid: Grid,
    damp: float,
    block_size: int,
    act_order: bool,
    fallback: Tensor,
    first: int,
    rate: qrate.Rate = 0.0,
    refit: bool = False,
    level_scale: float = 1.0,
    row_scales: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GPTQ for one batch of experts ``W [B, rows, cols]`` float32, ``H [B, cols, cols]`` on W's device."""
    B, rows, cols = W.shape
    scale = qrate.row_scale(W) if row_scales is None else row_scales.to(W.device, torch.float32)  # [B, rows]
    hdiag = H.diagonal(dim1=-2, dim2=-1)  # [B, cols]
    fallback = fallback | (H == 0).flatten(1).all(1)
    levels = _scaled(grid.fit(W, hdiag), level_scale, grid)  # [B, rows, L] from the original rows

    # Dead inputs (H_ii == 0, the feature was always zero): weight irrelevant, set to zero as in GPTQ.
    # Not for experts without data, whose every column would look dead.
    dead = (hdiag == 0) & ~fallback[:, None]  # [B, cols]
    Hw = H.clone()
    Hw.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    WT = W.transpose(1, 2).masked_fill(dead[:, :, None], 0.0)  # [B, cols, rows] copy
    priced = qrate.is_priced(rate)
    if priced:  # bit prices consistent with the decisions, on H's diagonal (no feedback yet)
        # (default scales: of the dead-masked rows here, as the prices were always fitted)
        rel_bits = _prices(WT.transpose(1, 2), levels, hdiag.masked_fill(dead, 0.0), grid, rate,
                           None if row_scales is None else scale)

    if act_order:  # quantize the columns with the largest H_ii first
        perm = torch.argsort(Hw.diagonal(dim1=-2, dim2=-1), dim=1, descending=True, stable=True)  # [B, cols]
        WT = WT.gather(1, perm[:, :, None].expand(B, cols, rows))
        Hw = Hw.gather(1, perm[:, :, None].expand(B, cols, cols))
        Hw = Hw.gather(2, perm[:, None, :].expand(B, cols, cols))

    mean_diag = Hw.diagonal(dim1=-2, dim2=-1).mean(-1)  # [B]
    lam = mean_diag * max(damp, _MIN_DAMP)
    lam = lam.clamp(min=torch.finfo(Hw.dtype).tiny)
    U, ok = _upper_cholesky_of_inverse(Hw, lam, ~fallback, first)
    del Hw
    fallback = fallback | ~ok
    U[fallback] = torch.eye(cols, dtype=U.dtype, device=U.device)  # U = I: round to nearest
    U = U.to(torch.float32)
    pricing = None
    if priced:  # GPTQ's per-column cost of a unit error is 1 / U_jj^2
        d = U.diagonal(dim1=-2, dim2=-1).pow(-2)  # [B, cols] (in the order the columns are quantized)
        c = qrate.column_weights(d)
        inv_c = 1.0 / c.clamp(min=torch.finfo(c.dtype).tiny)
        pricing = (qrate.per_row(rate, scale), rel_bits, inv_c)
    codes, Q = _gptq_columns(WT, U, grid, levels, block_size, pricing)
    del U, WT

    if act_order:  # back to storage order
        inv = torch.argsort(perm, dim=1)[:, :, None].expand(B, cols, rows)
        codes, Q = codes.gather(1, inv), Q.gather(1, inv)
    codes = codes.transpose(1, 2).contiguous()  # [B, rows, cols]
    Q = Q.transpose(1, 2).contiguous()
    if refit:
        has_data = ~(H == 0).flatten(1).all(1)  # [B]: experts without tokens have nothing to fit to
        if has_data.any():
            Hd = H[has_data].double()
            Hd.diagonal(dim1=-2, dim2=-1).add_(lam[has_data, None].double())  # GPTQ's damping
            Hd.diagonal(dim1=-2, dim2=-1)[dead[has_data]] = 1.0
            Wm = W[has_data].masked_fill(dead[has_data][:, None, :], 0.0)
            levels[has_data] = refit_levels(
                Wm, codes[has_data], levels[has_data], Hd, grid.code_offset, _free_levels(grid),
                store=lambda lv: _stored(lv, grid),
            )
            Q = grid.dequantize(codes, levels)
    return Q, codes, levels, _objective(W, Q, H), fallback


def _check_stack(W: Tensor, H: Tensor | None) -> None:
    if W.dim() != 3 or not W.is_floating_point():
        raise ConfigError(f"W must be a float tensor [E, rows, cols], got {W.dtype} {tuple(W.shape)}")
    E, _, cols = W.shape
    if H is not None and (H.shape != (E, cols, cols) or not H.is_floating_point()):
        raise ConfigError(
            f"H must be a float tensor [{E}, {cols}, {cols}] for W {tuple(W.shape)}, got {tuple(H.shape)}"
        )


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    grid: str | Grid = "ternary",
    damp: float = 0.1,
    block_size: int = 128,
    act_order: bool = False,
    counts: Tensor | None = None,
    min_tokens: int = 1,
    expert_batch: int | None = None,
    rate: qrate.Rate = 0.0,
    refit: bool = False,
    level_scale: float = 1.0,
    row_scales: Tensor | None = None,
) -> QuantizedExperts:
    """GPTQ-quantize every expert of ``W [E, rows, cols]`` against its Hessian ``H [E, cols, cols]``.

    - ``damp``: ``H + damp * mean(diag H) * I`` before inverting (floored at a tiny relative value).
    - ``block_size``: columns per lazy-update block. ``act_order``: quantize columns by descending ``H_ii``;
      codes and levels are returned in storage order regardless.
    - ``counts [E]`` / ``min_tokens``: experts with fewer tokens (or an all-zero ``H``) are rounded to
      nearest; so are experts whose damped Hessian stays non-positive-definite after retries. Both set
      ``fallback``.
    - ``rate``: price of a coded bit in entropy-constrained rounding (``qmoe.gptq.rate``; 0: nearest); a
      tensor ``[E]`` gives each expert its own (a model-wide budget prices important experts' bits lower).
    - ``refit``: re-solve each row's levels for its final codes (``qmoe.gptq.refit``).
    - ``level_scale``: multiply the grid's levels by this before quantizing (< 1: more, smaller nonzeros).
    - ``row_scales [E, rows]``: each row's bit price scale (default: its mean squared weight, ``qrate``).
    - ``expert_batch``: experts per batched Cholesky/GPTQ pass; default sized to ~4 GiB of working
      memory, and on CPU so that a column block stays in cache (batching only pays off on GPUs).

    Runs on ``W``'s device (``H`` is moved there one batch at a time). NaN/Inf in ``W`` or ``H`` raises
    ``QuantizationError`` naming the expert.
    """
    _check_stack(W, H)
    g = get_grid(grid)
    if (
        damp < 0
        or block_size < 1
        or min_tokens < 0
        or (expert_batch is not None and expert_batch < 1)
        or not 0 < level_scale <= 4
    ):
        raise ConfigError(
            f"need damp >= 0, block_size >= 1, min_tokens >= 0, expert_batch >= 1, "
            f"0 < level_scale <= 4; got {damp}, {block_size}, {min_tokens}, {expert_batch}, {level_scale}"
        )
    E, rows, cols = W.shape
    qrate.check_rate(rate, E)
    if counts is not None and counts.shape != (E,):
        raise ConfigError(f"counts must be [{E}], got {tuple(counts.shape)}")
    _check_finite(W, "weights", 0)
    starved = torch.zeros(E, dtype=torch.bool) if counts is None else counts.cpu() < min_tokens  # [E]
    if expert_batch is None:  # H, damped copy, L, H^-1, U + W's copies and the fp64 objective temporaries
        per_expert = 4 * (5 * cols * cols + 6 * rows * cols)
        expert_batch = max(1, min(E, _BATCH_BYTES // per_expert))
        if W.device.type == "cpu":
            # Batching only saves per-op overhead (GPU kernel launches); on CPU a column block of many large
            # experts falls out of cache and runs slower than one expert at a time, so cap it by cache size.
            expert_batch = max(1, min(expert_batch, _CPU_BLOCK_BYTES // (4 * block_size * rows)))

    parts = []
    for s in range(0, E, expert_batch):
        e = min(s + expert_batch, E)
        Hb = H[s:e].to(W.device)
        _check_finite(Hb, "Hessian entries", s)
        Hb = Hb if Hb.dtype == torch.float64 else Hb.float()
        parts.append(
            _gptq_batch(
                W[s:e].float(),
                Hb,
                g,
                damp,
                block_size,
                act_order,
                starved[s:e].to(W.device),
                s,
                rate[s:e] if isinstance(rate, Tensor) else rate,
                refit,
                level_scale,
                None if row_scales is None else row_scales[s:e],
            )
        )
    Q, codes, levels, objective, fallback = (torch.cat(p) for p in zip(*parts, strict=True))
    if fallback.any():
        fell = fallback.nonzero().flatten().tolist()
        log.info("%d of %d experts rounded to nearest: %s", len(fell), E, fell)
    return QuantizedExperts(g.name, Q, codes, levels, objective, fallback)


def rtn_quantize(
    W: Tensor,
    grid: str | Grid = "ternary",
    H: Tensor | None = None,
    rate: qrate.Rate = 0.0,
    refit: bool = False,
    damp: float = 0.1,
    level_scale: float = 1.0,
    row_scales: Tensor | None = None,
) -> QuantizedExperts:
    """Round every weight of ``W [E, rows, cols]`` to its row's nearest level (``fallback`` all False).

    With ``H [E, cols, cols]`` the objective is computed, and ``H``'s diagonal weights grids that use it.
    ``rate > 0`` prices each decision by its coded bits (column weights ``H_jj``, or uniform without ``H``);
    ``refit`` (needs ``H``) re-solves the levels for the codes against ``H`` damped by ``damp``.
    """
    _check_stack(W, H)
    g = get_grid(grid)
    qrate.check_rate(rate, W.shape[0])
    _check_finite(W, "weights", 0)
    if H is not None:
        _check_finite(H, "Hessian entries", 0)
    Wf = W.float()
    hdiag = None if H is None else H.diagonal(dim1=-2, dim2=-1).to(W.device).float()
    levels = _scaled(g.fit(Wf, hdiag), level_scale, g)
    if qrate.is_priced(rate):
        d = torch.ones(W.shape[0], W.shape[2], device=W.device) if hdiag is None else hdiag
        scale = qrate.row_scale(Wf) if row_scales is None else row_scales.to(Wf.device, torch.float32)
        rel_bits = _prices(Wf, levels, d, g, rate, scale)
        price = qrate.price_of(rate, scale, rel_bits, qrate.column_weights(d))
        codes = qrate.rd_codes(Wf, levels, price, g.code_offset, qrate.zero_locks(levels, g.code_offset))
    else:
        codes = g.quantize(Wf, levels)
    if refit and H is not None:
        Hd = H.to(W.device, torch.float64)
        mean_diag = Hd.diagonal(dim1=-2, dim2=-1).mean(-1)  # [E]
        has_data = mean_diag > 0
        if has_data.any():
            Hd = Hd[has_data]
            Hd.diagonal(dim1=-2, dim2=-1).add_((mean_diag[has_data] * max(damp, _MIN_DAMP))[:, None])
            levels[has_data] = refit_levels(
                Wf[has_data], codes[has_data], levels[has_data], Hd, g.code_offset, _free_levels(g),
                store=lambda lv: _stored(lv, g),
            )
    Q = g.dequantize(codes, levels)
    objective = None if H is None else _objective(Wf, Q, H)
    fallback = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
    return QuantizedExperts(g.name, Q, codes, levels, objective, fallback)
