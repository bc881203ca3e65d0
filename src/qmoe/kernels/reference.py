"""The oracle: decode with the codec's bit-by-bit reference decoder, multiply densely in float64.

Slow and obviously correct; every fast backend is tested against it. It materialises W, which the real
backends never do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qmoe.codec.decode import dequantize
from qmoe.codec.format import EncodedMatrix
from qmoe.kernels._io import as_numpy, wrap


def probe() -> None:
    """Always available (numpy only)."""


def matmul(enc: EncodedMatrix, x: Any) -> Any:
    """``x @ W^T`` in float64 from the reference decode, returned as float32 (torch in: torch out)."""
    arr, is_torch = as_numpy(x, enc.shape[1], "x")
    w = dequantize(enc, backend="reference").astype(np.float64)  # [rows, cols], exact: levels are fp16/fp32
    y = arr.astype(np.float64) @ w.T  # [tokens, rows]
    return wrap(y.astype(np.float32), is_torch)


def matmul_experts(encs: Sequence[EncodedMatrix], xs: Sequence[Any]) -> list[Any]:
    if len(encs) != len(xs):
        raise ValueError(f"got {len(encs)} matrices but {len(xs)} inputs")
    return [matmul(enc, x) for enc, x in zip(encs, xs, strict=True)]
