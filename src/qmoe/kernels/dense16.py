"""``y = x @ W^T`` for a 16-bit weight (fp16 or bf16) and float32 activations, without widening the weight.

A compressed model's non-expert weights (attention, the LM head) are the checkpoint's own 16-bit tensors.
Loading them as float32 doubles their memory, and a decode step is bound by the bytes it reads: on the real-
shaped benchmark (Qwen3-30B-A3B's layers, docs/runtime.md) the float32 attention projections took 40% of a
token. Computing in the 16-bit type instead would round every activation. This kernel keeps both: 16-bit
weights in memory, widened in registers (exact: every fp16 and bf16 value is a float32 value), float32
activations and sums, so the result equals ``x @ W.float().T`` up to the order of the additions.

- ``matmul16(W, x)``: tokens ``T <= SMALL_BATCH`` go through the native kernel (dense16.c, built into the
  same library as the lanes kernel by qmoe.kernels._native), row blocks spread over numba's threads; larger
  batches (a prompt) go through torch's float32 GEMM on widened copies of W, which is compute-bound there
  and fastest; without the native kernel every call does. ``widened_linear`` widens ``WIDEN_BYTES`` of rows
  at a time, so a prompt's extra memory is one block, not a float32 copy of the whole matrix (32 MiB for a
  4096x2048 projection).
- ``reference(W, x)`` is the slow, obviously correct definition the tests hold it to.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SMALL_BATCH = 8  # up to this many tokens per call: the native kernel (it re-reads each row from L1 per token)
ROWS_PER_ITEM = 64  # rows per work item: 2 x 2048 x 64 B = 256 KiB of a 2048-wide fp16 row block
WIDEN_BYTES = 4 << 20  # float32 bytes of W widened at a time for torch's GEMM (a prompt)
KINDS = {torch.float16: 0, torch.bfloat16: 1}


def reference(W: Tensor, x: Tensor) -> Tensor:
    """``x [T, cols] float32`` times ``W [rows, cols]`` (16-bit) transposed, in float64, as float32."""
    return (x.double() @ W.double().T).float()


def widened_linear(x: Tensor, W: Tensor, scale: Tensor | None = None,
                   block_bytes: int = WIDEN_BYTES) -> Tensor:
    """``x [T, cols] @ W [rows, cols]^T`` (times ``scale [rows]`` when given) in float32 through torch's
    GEMM, ``W`` (any dtype) widened to float32 a block of rows (about ``block_bytes``) at a time:
    ``[T, rows]``.
    Every output element is one dot product either way; only the peak memory differs from
    ``F.linear(x, W.float())``."""
    x = x.float()
    rows, cols = W.shape
    step = max(1, block_bytes // (4 * max(cols, 1)))
    if step >= rows:  # one block: no copy into the output
        y = torch.nn.functional.linear(x, W.float())
        return y * scale if scale is not None else y
    y = torch.empty(*x.shape[:-1], rows, dtype=torch.float32, device=x.device)
    for r0 in range(0, rows, step):
        blk = torch.nn.functional.linear(x, W[r0:r0 + step].float())  # [T, <=step]
        y[..., r0:r0 + step] = blk * scale[r0:r0 + step] if scale is not None else blk
    return y


def available() -> bool:
    """Whether the native kernel builds and runs here (x86-64 with AVX2, FMA and F16C, a C compiler)."""
    from qmoe.errors import BackendUnavailable
    from qmoe.kernels import _native

    try:
        _native.dense16()
    except BackendUnavailable:
        return False
    return True


def matmul16(W: Tensor, x: Tensor, native: bool | None = None) -> Tensor:
    """``x [T, cols] float32 @ W [rows, cols]^T`` for a 16-bit ``W`` on the CPU: ``[T, rows]`` float32.

    ``native``: force the native kernel (True) or torch (False); default: native for ``T <= SMALL_BATCH``
    when it is available."""
    if W.dtype not in KINDS or W.dim() != 2 or x.dim() != 2 or x.shape[1] != W.shape[1]:
        raise ValueError(f"matmul16 takes W [rows, cols] fp16/bf16 and x [T, cols]; got W {W.dtype}"
                         f"{tuple(W.shape)}, x {x.dtype}{tuple(x.shape)}")
    T = x.shape[0]
    if native is None:
        native = T <= SMALL_BATCH and W.device.type == "cpu" and available()
    if not native or T == 0:
        return widened_linear(x, W)
    from qmoe.kernels import _native
    from qmoe.kernels._drivers import dense_rows  # numba, imported on the first native call

    W = W.contiguous()
    xs = x.detach().float().contiguous()
    rows, cols = W.shape
    y = torch.empty(T, rows, dtype=torch.float32)
    # W's 16-bit words as the kernel reads them; the tensors stay alive for the call
    meta = np.array([W.data_ptr(), rows, cols, KINDS[W.dtype]], dtype=np.int64)
    dense_rows(_native.dense16(), meta, xs.numpy(), y.numpy(), T, rows, ROWS_PER_ITEM)
    return y
