"""Weight-only int8 for dense (non-expert) weights: ``y = (x @ Q^T) * s``, one float32 scale per output row.

Once the experts of a decode step run from column lists (qmoe.kernels.lists), the largest part of a token on
the real-shaped benchmark (Qwen3-30B-A3B's layers, docs/runtime.md) is reading the 16-bit attention and head
weights. Weight-only int8 with a scale per output channel (symmetric, round to nearest: the usual
"W8A16") halves those bytes; activations stay float32, so the only rounding is the weights' own, at most
half a step (``absmax(row) / 254``) per weight.

- ``quantize(W)``: ``W [rows, cols]`` (any float dtype) -> ``(Q int8 [rows, cols], s float32 [rows])`` with
  ``s = absmax(row) / 127`` and ``Q = round(W / s)`` (an all-zero row: ``s = 0``, ``Q = 0``);
- ``matmul8(Q, s, x)``: tokens ``T <= SMALL_BATCH`` through the native kernel (dense8.c, in the library of
  qmoe.kernels._native; row blocks spread over numba's threads by dense16's driver); larger batches (a
  prompt) through torch's float32 GEMM on widened blocks of Q (``dense16.widened_linear``), which is
  compute-bound there;
- ``reference(Q, s, x)``: the slow, obviously correct definition the tests hold both to.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SMALL_BATCH = 8  # up to this many tokens per call: the native kernel (dense16's reasoning)
ROWS_PER_ITEM = 64  # rows per work item: 2048 x 64 B = 128 KiB of a 2048-wide int8 row block


def quantize(W: Tensor) -> tuple[Tensor, Tensor]:
    """``W [rows, cols]`` -> ``(Q int8 [rows, cols], s float32 [rows])``, ``Q * s[:, None]`` nearest to W per
    row on the symmetric grid of 255 levels. Computed a block of rows at a time, so that a large matrix (an
    LM head) needs no float32 copy of itself."""
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"quantize takes a floating W [rows, cols]; got {W.dtype}{tuple(W.shape)}")
    rows, cols = W.shape
    Q = torch.empty(rows, cols, dtype=torch.int8)
    s = torch.empty(rows, dtype=torch.float32)
    for r0 in range(0, rows, 1024):
        w = W[r0:r0 + 1024].detach().float()  # [<=1024, cols]
        sc = w.abs().amax(dim=1) / 127.0  # [<=1024]
        s[r0:r0 + 1024] = sc
        safe = torch.where(sc > 0, sc, torch.ones_like(sc))
        Q[r0:r0 + 1024] = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return Q, s


def reference(Q: Tensor, s: Tensor, x: Tensor) -> Tensor:
    """``x [T, cols] float32`` times ``(Q * s[:, None])^T`` in float64, as float32: ``[T, rows]``."""
    return ((x.double() @ Q.double().T) * s.double()).float()


def available() -> bool:
    """Whether the native kernel builds and runs here (the library of qmoe.kernels._native)."""
    from qmoe.errors import BackendUnavailable
    from qmoe.kernels import _native

    try:
        _native.dense8()
    except BackendUnavailable:
        return False
    return True


def matmul8(Q: Tensor, s: Tensor, x: Tensor, native: bool | None = None) -> Tensor:
    """``(x [T, cols] float32 @ Q [rows, cols]^T) * s [rows]`` on the CPU: ``[T, rows]`` float32.

    ``native``: force the native kernel (True) or torch (False); default: native for ``T <= SMALL_BATCH``
    when it is available."""
    if (Q.dtype != torch.int8 or Q.dim() != 2 or s.dtype != torch.float32 or s.shape != (Q.shape[0],)
            or x.dim() != 2 or x.shape[1] != Q.shape[1]):
        raise ValueError(f"matmul8 takes Q [rows, cols] int8, s [rows] float32 and x [T, cols]; got Q "
                         f"{Q.dtype}{tuple(Q.shape)}, s {s.dtype}{tuple(s.shape)}, "
                         f"x {x.dtype}{tuple(x.shape)}")
    T = x.shape[0]
    if native is None:
        native = T <= SMALL_BATCH and Q.device.type == "cpu" and available()
    from qmoe.kernels.dense16 import widened_linear

    if not native or T == 0:
        return widened_linear(x, Q, s)
    from qmoe.kernels import _native
    from qmoe.kernels._drivers import dense_rows  # dense16's driver: the same row blocks

    Q, s = Q.contiguous(), s.contiguous()
    xs = x.detach().float().contiguous()
    rows, cols = Q.shape
    y = torch.empty(T, rows, dtype=torch.float32)
    meta = np.array([Q.data_ptr(), rows, cols, s.data_ptr()], dtype=np.int64)  # the tensors outlive the call
    dense_rows(_native.dense8(), meta, xs.numpy(), y.numpy(), T, rows, ROWS_PER_ITEM)
    return y
