"""Bit prices per row in units of the expert's output error (``CompressConfig.row_prices = "output"``).

``qmoe.gptq.rate`` prices a bit of row ``r`` at ``rate * s_r``, ``s_r`` the row's own mean square: every row
of a matrix is treated alike, whatever its error does to the expert's output. Rate-distortion theory wants one
price per bit in the units of the error that matters (equal slopes), and the rows of an expert matrix reach
the expert's output very differently:

- the second projection's rows are output coordinates; their errors add to the output as they are, so the
  right price is one per matrix: ``s_r`` becomes the matrix's mean ``s_bar``;
- a first projection's row ``k`` feeds neuron ``r(k)`` through the GLU; an error ``delta`` in its
  pre-activation reaches the output as ``W_second[:, r] * dh_r/dpre_k * delta``, so its weight is
  ``rho_k = sum_t g_t^2 (||W_second[:, r]|| dh_r/dpre_k(t))^2`` over the expert's routed calibration tokens
  (gate-weighted like its Hessian; measured by ``first_row_sensitivity`` while the Hessian is captured,
  from the original weights). Its price scale is ``s_bar / rho_hat_k``, ``rho_hat`` normalised to a
  geometric mean of 1 over the matrix's rows, so a row of typical sensitivity keeps the typical price.

This assumes the row's squared sensitivity and its weight-space error are uncorrelated over tokens (the
row's error is ``rho_k`` times its Hessian error up to a constant), as GPTQ's Hessian itself ignores the GLU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

RHO_RANGE = (1e-4, 1e4)  # rho_hat is clamped here: a dead neuron's rows get a high, finite price


def first_row_sensitivity(
    x: Tensor,
    gate: Tensor | None,
    w_first: Tensor,
    b_first: Tensor | None,
    w_second: Tensor,
    glu: Callable[[Tensor], Tensor],
) -> Tensor:
    """``[F*I]`` float64: ``sum_t g_t^2 (||w_second[:, r(k)]|| dh_r/dpre_k(t))^2`` for tokens ``x [t, d]``,
    gates ``gate [t]`` (None: 1), ``w_first [F*I, d]``, ``b_first [F*I]``, ``w_second [d, I]``.

    The GLU is elementwise per neuron, so the gradient of ``sum_r ||w_second[:, r]|| h_r`` with respect to
    the pre-activations holds exactly each row's own derivative: one backward pass for all rows, for any
    family's activation."""
    with torch.inference_mode(False), torch.enable_grad():
        pre = x.detach().clone().float() @ w_first.detach().clone().float().T  # [t, F*I]
        if b_first is not None:
            pre = pre + b_first.detach().clone().float()
        pre = pre.detach().requires_grad_(True)
        norms = w_second.detach().clone().float().pow(2).sum(0).sqrt()  # [I]
        (grad,) = torch.autograd.grad((glu(pre) * norms).sum(), pre)
    g2 = grad.detach().double().pow(2)  # [t, F*I]
    if gate is not None:
        g2 = g2 * gate.detach().double().pow(2)[:, None]
    return g2.sum(0)


def row_scales(W: Tensor, sensitivity: Tensor | None) -> Tensor:
    """``[E, rows]`` price scales for ``W [E, rows, cols]``: ``s_bar / rho_hat`` (module docstring);
    ``sensitivity [E, rows]`` None (second projections) or zero for an expert without data: every row of
    the expert at its matrix's mean ``s_bar``."""
    from qmoe.gptq.rate import row_scale

    s_bar = row_scale(W).mean(1, keepdim=True)  # [E, 1]
    if sensitivity is None:
        return s_bar.expand(W.shape[0], W.shape[1]).contiguous()
    rho = sensitivity.to(W.device, torch.float64)
    live = rho > 0
    logs = torch.where(live, rho.clamp_min(1e-300).log(), torch.zeros_like(rho))
    geo = (logs.sum(1, keepdim=True) / live.sum(1, keepdim=True).clamp_min(1)).exp()  # [E, 1]
    rho_hat = torch.where(live.any(1, keepdim=True), (rho / geo).clamp(*RHO_RANGE), torch.ones_like(rho))
    return (s_bar.double() / rho_hat).float()
