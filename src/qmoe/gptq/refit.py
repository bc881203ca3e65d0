"""Refit each row's levels to its final codes: Hessian-weighted least squares, then the row's output energy
restored.

GPTQ fixes every code against levels fitted to the *original* row, then moves the later weights to absorb
earlier errors; once all codes are known, the levels that minimise GPTQ's own objective
``(w - q) H (w - q)^T`` for the row are the solution of a small linear system. With one-hot masks ``M_k``
(``[cols]``, 1 where the row's code is level k) and ``q = sum_k l_k M_k``:

    sum_l (M_k H M_l^T) l_l = M_k H (w - fixed part)^T        for every free level k

For a ternary row that is a 2x2 system in ``(lo, hi)`` (zero stays zero: the codec's background), for a
2-bit row 4x4. ``H`` is GPTQ's damped Hessian, so an expert with few tokens is not fitted to noise.

Least squares alone shrinks: the best multiple of a crude sign pattern is smaller than the weights it stands
for (on tiny-qwen3-moe the refitted levels were ~7% below QMoE's), so every expert's output shrinks a little,
in every layer, and the model's loss rose although each layer's objective fell (docs/results.md). With
``preserve_energy`` (the default) the solved levels are then scaled per row so that the row's output energy on
the calibration tokens is the original one, ``q H q^T = w H w^T``: least squares picks the shape (the ratio of
the levels), the energy picks the size -- the same correction as norm tweaking (Li et al., 2023) applies to
normalisation layers. A row whose result is not finite or breaks the ternary sign order keeps its levels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_EXPERTS_PER_STEP = 8  # bound the [b, rows, cols] float64 temporaries


def _row_objective(D: Tensor, H: Tensor) -> Tensor:
    """``d H d^T`` per row ``[b, rows]`` for ``D [b, rows, cols]``."""
    return ((D @ H) * D).sum(-1)


def refit_levels(
    W: Tensor,
    codes: Tensor,
    levels: Tensor,
    H: Tensor,
    offset: int,
    free: Tensor,
    preserve_energy: bool = True,
    store: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Refitted levels ``[E, rows, L]`` float32 for ``W [E, rows, cols]``, ``codes`` (int8, level index =
    code + offset), ``levels [E, rows, L]`` and a positive definite ``H [E, cols, cols]``.

    ``free [L]`` bool: the levels that may change. ``store``: rounds levels ``[b, rows, L]`` float32 to what
    the codec stores (the solver passes the codec's grid); default fp16.
    """
    out = levels.clone()
    L = levels.shape[-1]
    free_idx = [k for k in range(L) if bool(free[k])]
    fixed_idx = [k for k in range(L) if not bool(free[k])]
    n = len(free_idx)
    for s in range(0, W.shape[0], _EXPERTS_PER_STEP):
        e = min(s + _EXPERTS_PER_STEP, W.shape[0])
        Hb = H[s:e].to(W.device, torch.float64)  # [b, cols, cols]
        Wb = W[s:e].double()
        idx = codes[s:e].long() + offset  # [b, rows, cols]
        old = levels[s:e].double()  # [b, rows, L]
        resid = Wb.clone()  # w minus the fixed levels' part
        for k in fixed_idx:
            resid -= (idx == k).double() * old[..., k : k + 1]
        masks = [(idx == k).double() for k in free_idx]  # n x [b, rows, cols]
        HM = [m @ Hb for m in masks]  # H symmetric: (M H)[r] = H M_r
        A = torch.stack(  # [b, rows, n, n]
            [torch.stack([(HM[i] * masks[j]).sum(-1) for j in range(n)], -1) for i in range(n)], -2
        )
        rhs = torch.stack([(HM[i] * resid).sum(-1) for i in range(n)], -1)  # [b, rows, n]
        # An unused level (empty mask) keeps its value: replace its equation by l_k = old_k.
        for i, k in enumerate(free_idx):
            empty = A[..., i, i] <= 0
            A[..., i, :] = torch.where(empty[..., None], 0.0, A[..., i, :])
            A[..., :, i] = torch.where(empty[..., None], 0.0, A[..., :, i])
            A[..., i, i] = torch.where(empty, 1.0, A[..., i, i])
            rhs[..., i] = torch.where(empty, old[..., k], rhs[..., i])
        sol, info = torch.linalg.solve_ex(A, rhs.unsqueeze(-1))  # [b, rows, n, 1]
        new = old.clone()
        for i, k in enumerate(free_idx):
            new[..., k] = sol[..., i, 0]
        if preserve_energy:  # alpha^2 q H q^T = w H w^T per row
            alpha = (_row_objective(Wb, Hb) / _row_objective(new.gather(-1, idx), Hb)).sqrt()  # [b, rows]
            new = new * torch.where(torch.isfinite(alpha), alpha, 1.0)[..., None]
        new = new.float()
        new = store(new) if store is not None else new.to(torch.float16).float()  # as the codec stores them
        ok = torch.isfinite(new).all(-1) & (info == 0)  # [b, rows]
        if offset:  # ternary order: lo <= 0 <= hi
            ok &= (new[..., 0] <= 0) & (new[..., -1] >= 0)
        if not preserve_energy:  # pure least squares: never worse than before (level rounding aside)
            q_new, q_old = new.double().gather(-1, idx), old.gather(-1, idx)
            ok &= _row_objective(Wb - q_new, Hb) <= _row_objective(Wb - q_old, Hb)
        keep = ~ok
        out[s:e] = torch.where(keep[..., None], levels[s:e], new.to(levels.dtype))
    return out
