"""Ternary experts as column lists, for decoding one token at a time on the CPU.

At batch 1 the coded-stream kernel (``qmoe.kernels.cpu``) decodes every row of every routed expert inside the
product, a serial chain of table lookups (~6 G weights/s on two cores, docs/kernels.md), and a decoding model
runs the same experts token after token. This module decodes a ternary matrix once, on its first use, into
the columns of each row that hold +1 and -1 (byte gaps, ~0.85 bits/weight at 90% zeros; ``cpu_lists.c``
documents the layout), and computes ``y[r] = hi[r] sum(x[P_r]) + lo[r] sum(x[N_r])`` with AVX2 gathers.
``benchmarks/sparse_probe.py`` measured the product 4-4.5x faster per thread than the stream kernel on the
real-shaped model's expert shapes.

- ``build(enc)`` -> ``Lists`` (native); ``build_reference(enc)``: the same bytes in plain Python, and
  ``columns(lists)`` reads them back, both for the tests.
- ``matvec(lists, x, which)``: one parallel call for several (matrix, token) pairs.
- ``moe_step(...)``: one MoE layer's routed experts for one token in one call: every first projection,
  the activation, every second projection and the gate-weighted sum (``qmoe.runtime.experts`` uses it
  for a decode step whose experts all have lists; tested against float64 products of the reference
  decoder's matrices).
- ``cache()``: the process's ``ListCache``, which builds a matrix's lists on first use while the bytes it
  holds stay under its budget (``QMOE_EXPERT_LISTS``: MiB, ``0`` or ``off`` to disable; default a quarter
  of the machine's RAM) and otherwise leaves the matrix to the stream kernel, so a model larger than memory
  never fills RAM with lists. Lists are freed with their matrix. None without the native library.

Only ternary matrices (the default recipe's); int2 stays on the stream kernel, whose background-level trick
already skips its commonest code.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qmoe.codec import EncodedMatrix

ROWS_PER_ITEM = 128  # rows per work item: ~26 KB of gaps for a 2048-wide row block at 90% zeros


@dataclass(eq=False)
class Lists:
    """One matrix's lists: ``start [2 rows + 1] int64``, ``gaps [start[-1]] uint8``, ``coef [rows, 2]
    float32`` (hi, lo), and the kernel's ``meta [5] int64`` (their addresses, rows, cols)."""

    start: np.ndarray
    gaps: np.ndarray
    coef: np.ndarray
    rows: int
    cols: int

    def __post_init__(self) -> None:
        self.meta = np.array([self.start.ctypes.data, self.gaps.ctypes.data, self.coef.ctypes.data,
                              self.rows, self.cols], dtype=np.int64)
        self.address = self.meta.ctypes.data  # what a call passes, read once (numpy's ctypes is slow)

    @property
    def nbytes(self) -> int:
        return self.start.nbytes + self.gaps.nbytes + self.coef.nbytes


def _coef(enc: EncodedMatrix) -> np.ndarray:
    lv = enc.levels.astype(np.float32)  # [rows, 2]: lo (code -1), hi (code +1)
    return np.ascontiguousarray(lv[:, ::-1])


def build(enc: EncodedMatrix) -> Lists:
    """``enc``'s lists, decoded once with the parallel decoder (FormatError for a corrupt stream, as the
    codec says it)."""
    from qmoe.codec.decode import decode_dense
    from qmoe.kernels import _native

    if enc.kind != "ternary":
        raise ValueError(f"column lists hold ternary matrices, not {enc.kind}")
    codes = np.ascontiguousarray(decode_dense(enc))  # [rows, cols] int8
    rows, cols = enc.shape
    _, lib = _native.lists()
    start = np.empty(2 * rows + 1, dtype=np.int64)
    total = lib.qmoe_lists_size(codes.ctypes.data, rows, cols, start.ctypes.data)
    gaps = np.empty(total, dtype=np.uint8)
    lib.qmoe_lists_fill(codes.ctypes.data, rows, cols, start.ctypes.data, gaps.ctypes.data)
    return Lists(start, gaps, _coef(enc), rows, cols)


def build_reference(enc: EncodedMatrix) -> Lists:
    """``build`` in plain Python from the bit-by-bit decoder: the format's definition."""
    from qmoe.codec.decode import decode_reference

    codes = decode_reference(enc)
    rows, cols = enc.shape
    start, gaps = [0], []
    for r in range(rows):
        for sign in (1, -1):
            g, prev = [], -1
            for c in np.flatnonzero(codes[r] == sign).tolist():
                gap = c - prev
                while gap > 255:  # escape: 255 columns further, no value
                    g.append(0)
                    gap -= 255
                g.append(gap)
                prev = c
            g += [0] * (-len(g) % 8)
            gaps += g
            start.append(len(gaps))
    return Lists(np.array(start, np.int64), np.array(gaps, np.uint8), _coef(enc), rows, cols)


def columns(lists: Lists, r: int, sign: int) -> list[int]:
    """The columns of row ``r`` holding ``sign`` (+1 or -1), read back from the gaps."""
    k = 2 * r + (0 if sign == 1 else 1)
    out, c = [], -1
    for g in lists.gaps[lists.start[k]: lists.start[k + 1]].tolist():
        c += g if g else 255
        if g:
            out.append(c)
    return out


def matvec(lists: Sequence[Lists], x: Tensor, which: Sequence[int] | None = None,
           out: Tensor | None = None) -> Tensor:
    """``out[i] = x[which[i]] @ W_i^T`` for one token per matrix, in one parallel call: ``x [m, cols]``
    float32 (every matrix has ``cols`` columns and the same ``rows``), ``which`` the row of ``x`` each matrix
    takes (default ``0, 1, ...``); ``out [len(lists), rows]`` float32, allocated when not given."""
    import numba

    from qmoe.kernels import _native
    from qmoe.kernels._drivers import list_rows  # numba's driver, cached on disk

    which = list(range(len(lists))) if which is None else list(which)
    if len(lists) != len(which):
        raise ValueError(f"got {len(lists)} matrices but {len(which)} inputs")
    if not lists:
        return torch.empty(0, 0) if out is None else out
    rows, cols = lists[0].rows, lists[0].cols
    if any((m.rows, m.cols) != (rows, cols) for m in lists):
        raise ValueError("every matrix of one call must have the same shape")
    if x.dim() != 2 or x.shape[1] != cols or not 0 <= min(which) <= max(which) < x.shape[0]:
        raise ValueError(f"x must be [m, {cols}] with every index of which below m; got {tuple(x.shape)}")
    fn, _ = _native.lists()
    xc = x.detach().float().contiguous()  # kept alive for the call
    if out is None:
        out = torch.empty(len(lists), rows, dtype=torch.float32)
    if out.shape != (len(lists), rows) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [{len(lists)}, {rows}]")
    calls = np.empty((len(lists), 4), dtype=np.int64)
    calls[:, 0] = [m.address for m in lists]
    calls[:, 1] = xc.data_ptr() + 4 * cols * np.asarray(which, dtype=np.int64)
    calls[:, 2] = out.data_ptr() + 4 * rows * np.arange(len(lists), dtype=np.int64)
    calls[:, 3] = rows
    # dynamic scheduling: a core taken by another process does not hold the call up
    old = numba.set_parallel_chunksize(1)
    try:
        list_rows(fn, calls, ROWS_PER_ITEM)
    finally:
        numba.set_parallel_chunksize(old)
    return out


ACTIVATIONS = {"silu": 1, "swish": 1, "relu": 2}  # the experts' activations moe_step computes, by config name


def moe_step(addr: np.ndarray, experts: np.ndarray, weights: np.ndarray, x: Tensor, out: Tensor, inner: int,
             act: str, gated: bool) -> Tensor:
    """``out += sum_j weights[j] * second_j(act(first_j(x)))`` for one token ``x [cols]`` and its ``k``
    experts ``experts [k]`` (int64, ascending, distinct) with gate weights ``weights [k]`` float32, all in one
    parallel call. ``addr [E, F + 1]`` int64 holds ``Lists.address`` of every expert's ``F`` first
    projections (``R`` rows each, fused in that order) and of its second one (``d`` rows); the caller keeps
    those Lists alive. ``inner``: the second projection's columns (``R`` or, gated, ``F*R/2``); ``act`` a key
    of ``ACTIVATIONS``; ``out [d]`` float32, contiguous."""
    import numba

    from qmoe.kernels import _native
    from qmoe.kernels._drivers import moe_step as step  # numba's driver, cached on disk

    if act not in ACTIVATIONS:
        raise ValueError(f"moe_step computes {sorted(ACTIVATIONS)}, not {act!r}")
    fn, _ = _native.lists()
    k, nf = len(experts), addr.shape[1] - 1
    rows = inner * (2 if gated else 1) // nf  # of each first projection
    d = out.shape[-1]
    h = np.empty((k, nf * rows), dtype=np.float32)
    g = np.empty((k, inner), dtype=np.float32)
    y = np.empty((k, d), dtype=np.float32)
    xs = x.detach().float().contiguous().view(-1)  # [cols], kept alive for the call
    old = numba.set_parallel_chunksize(1)  # dynamic scheduling, as matvec
    try:
        step(fn, addr, experts, weights, xs.numpy(), h, g, y, out.view(-1).numpy(),
                         ACTIVATIONS[act], gated, ROWS_PER_ITEM)
    finally:
        numba.set_parallel_chunksize(old)
    return out


class ListCache:
    """Lists of the matrices used so far, built on first use while they hold less than ``budget`` bytes
    (the last one built may pass it by its own size); a matrix met after that gets none, for good, and
    keeps the stream kernel. An entry lives as long as its matrix."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._lists: weakref.WeakKeyDictionary[EncodedMatrix, Lists] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, enc: EncodedMatrix) -> Lists | None:
        got = self._lists.get(enc)
        if got is not None or enc.kind != "ternary" or self.used >= self.budget:
            return got
        lists = build(enc)
        with self._lock:
            self._lists[enc] = lists
            self.used += lists.nbytes
        weakref.finalize(enc, self._release, lists.nbytes)
        return lists

    def _release(self, n: int) -> None:
        with self._lock:
            self.used -= n

    def __len__(self) -> int:
        return len(self._lists)


_cache: dict[str, ListCache | None] = {}


def budget_bytes() -> int:
    """``QMOE_EXPERT_LISTS`` in bytes (MiB in the variable; ``0``/``off``: none); default a quarter of the
    machine's RAM. ConfigError for anything else."""
    from qmoe.errors import ConfigError

    raw = os.environ.get("QMOE_EXPERT_LISTS", "").strip().lower()
    if raw in ("", "auto"):
        import psutil

        return psutil.virtual_memory().total // 4
    if raw == "off":
        return 0
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if mib < 0:
        raise ConfigError(f"QMOE_EXPERT_LISTS={raw!r}: give a size in MiB, 0 or off (default: a quarter of "
                          "the machine's RAM)")
    return int(mib * 2**20)


def cache() -> ListCache | None:
    """The process's cache (its budget read once, on first use); None when the budget is 0 or the native
    library cannot be loaded here (the stream kernel then does every product)."""
    if "cache" not in _cache:
        from qmoe.errors import BackendUnavailable
        from qmoe.kernels import _native
        from qmoe.kernels.cpu import kernel

        budget = budget_bytes()
        ok = budget > 0 and kernel() != "numba"
        if ok:
            try:
                _native.lists()
            except BackendUnavailable:
                ok = False
        _cache["cache"] = ListCache(budget) if ok else None
    return _cache["cache"]


def reset() -> None:
    """Forget the process's cache (tests; a changed ``QMOE_EXPERT_LISTS``)."""
    _cache.clear()
