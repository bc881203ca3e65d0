"""Input checks and torch/numpy conversion shared by the backends (numpy only; torch only if given torch)."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(x: Any, cols: int, what: str) -> tuple[np.ndarray, bool]:
    """``x [tokens, cols]`` float32 as a numpy array (no copy when possible), and whether it was torch.

    Raises ValueError / TypeError saying what is wrong with ``x`` (named ``what`` in the message).
    """
    is_torch = type(x).__module__.split(".")[0] == "torch"
    if is_torch:
        if x.device.type != "cpu":
            raise ValueError(f"{what} is on {x.device}; this backend needs a CPU tensor (or 'triton')")
        arr = x.detach().numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        raise TypeError(f"{what} must be a torch tensor or numpy array, got {type(x).__name__}")
    if arr.dtype != np.float32:
        raise ValueError(f"{what} must be float32, got {arr.dtype}; convert it (.float() / .astype)")
    if arr.ndim != 2 or arr.shape[1] != cols:
        raise ValueError(f"{what} must have shape [tokens, {cols}] to multiply a [rows, {cols}] matrix, got "
                         f"{list(arr.shape)}")
    return arr, is_torch


def as_source(x: Any, cols: int, what: str) -> tuple[int, int, int, int, bool, Any]:
    """``x [tokens, cols]`` float32 as (address, tokens, element stride 0, element stride 1, is_torch, owner)
    for a kernel that reads it in place (``owner`` keeps the memory alive); same checks as ``as_numpy``.

    A few hundred ns for a torch tensor (no numpy view is made); numpy arrays with negative or unaligned
    strides are copied.
    """
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        if x.dtype is not torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != cols:
            as_numpy(x, cols, what)  # raises the specific error
        s0, s1 = x.stride()
        return x.data_ptr(), x.shape[0], s0, s1, True, x
    arr, _ = as_numpy(x, cols, what)
    b0, b1 = arr.strides
    if b0 < 0 or b1 < 0 or b0 % 4 or b1 % 4:
        arr = np.ascontiguousarray(arr)
        b0, b1 = arr.strides
    return arr.__array_interface__["data"][0], arr.shape[0], b0 // 4, b1 // 4, False, arr


def wrap(out: np.ndarray, is_torch: bool) -> Any:
    """Return ``out`` as the caller's type: torch in -> torch out (sharing memory), numpy in -> numpy out."""
    if is_torch:
        import torch

        return torch.from_numpy(out)
    return out
