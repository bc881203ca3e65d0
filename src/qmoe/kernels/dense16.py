"""``y = x @ W^T`` for a 16-bit weight (fp16 or bf16) and float32 activations, without widening the weight.

A compressed model's non-expert weights (attention, the LM head) are the checkpoint's own 16-bit tensors.
Loading them as float32 doubles their memory, and a decode step is bound by the bytes it reads: on the real-
shaped benchmark (Qwen3-30B-A3B's layers, docs/runtime.md) the float32 attention projections took 40% of a
token. Computing in the 16-bit type instead would round every activation. This kernel keeps both: 16-bit
weights in memory, widened in registers (exact: every fp16 and bf16 value is a float32 value), float32
activations and sums, so the result equals ``x @ W.float().T`` up to the order of the additions.

- ``matmul16(W, x)``: tokens ``T <= SMALL_BATCH`` go through the native kernel (dense16.c, built into the
  same library as the lanes kernel by qmoe.kernels._native), row blocks spread over numba's threads; larger
  batches (a prompt) go through torch's float32 GEMM on a widened copy of W, which is compute-bound there
  and fastest; without the native kernel every call does.
- ``reference(W, x)`` is the slow, obviously correct definition the tests hold it to.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SMALL_BATCH = 8  # up to this many tokens per call: the native kernel (it re-reads each row from L1 per token)
ROWS_PER_ITEM = 64  # rows per work item: 2 x 2048 x 64 B = 256 KiB of a 2048-wide fp16 row block
KINDS = {torch.float16: 0, torch.bfloat16: 1}

_driver = None


def reference(W: Tensor, x: Tensor) -> Tensor:
    """``x [T, cols] float32`` times ``W [rows, cols]`` (16-bit) transposed, in float64, as float32."""
    return (x.double() @ W.double().T).float()


def available() -> bool:
    """Whether the native kernel builds and runs here (x86-64 with AVX2, FMA and F16C, a C compiler)."""
    from qmoe.errors import BackendUnavailable
    from qmoe.kernels import _native

    try:
        _native.dense16()
    except BackendUnavailable:
        return False
    return True


def _compiled():  # the numba driver, compiled on first use (cached on disk by numba)
    global _driver
    if _driver is None:
        from numba import njit, prange

        from qmoe.kernels._cpu_numba import _call_native

        @njit(cache=True, parallel=True, nogil=True)
        def drive(fn, meta, x, y, ntok, rows, rpi):  # pragma: no cover - compiled
            items = (rows + rpi - 1) // rpi
            for i in prange(items):
                r0 = i * rpi
                r1 = min(r0 + rpi, rows)
                _call_native(fn, np.int64(meta.ctypes.data), np.int64(x.ctypes.data), np.int64(y.ctypes.data),
                             ntok, np.int64(0), r0, r1)

        _driver = drive
    return _driver


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
        return torch.nn.functional.linear(x.float(), W.float())
    from qmoe.kernels import _native

    W = W.contiguous()
    xs = x.detach().float().contiguous()
    rows, cols = W.shape
    y = torch.empty(T, rows, dtype=torch.float32)
    # W's 16-bit words as the kernel reads them; the tensors stay alive for the call
    meta = np.array([W.data_ptr(), rows, cols, KINDS[W.dtype]], dtype=np.int64)
    _compiled()(_native.dense16(), meta, xs.numpy(), y.numpy(), T, rows, ROWS_PER_ITEM)
    return y
