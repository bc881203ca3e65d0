"""The fused CPU backend: ``y = x @ W^T`` straight from the entropy-coded stream, multi-threaded with numba.

``prepare(enc)`` builds a small per-matrix handle once (kernel decode table, array addresses; cached per
EncodedMatrix), so a call costs a few µs of Python before the kernel runs. ``matmul_experts`` runs a whole MoE
layer's experts as one parallel call over (expert, row block) work items. Kernels: qmoe.kernels._cpu_numba.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from qmoe.codec.format import EncodedMatrix
from qmoe.errors import BackendUnavailable, FormatError
from qmoe.kernels._io import as_numpy, wrap

# Work-item size: about this many weights per (matrix, row block), so a 2-core call has tens of items to
# balance yet each item's fixed cost (row levels, scheduling) stays small.
ITEM_WEIGHTS = 1 << 16

_handles: weakref.WeakKeyDictionary[EncodedMatrix, Prepared] = weakref.WeakKeyDictionary()
_luts: weakref.WeakValueDictionary[tuple, np.ndarray] = weakref.WeakValueDictionary()
_STATUS_TEXT = {1: "does not end where the next row starts (or holds an invalid codeword)",
                2: "writes a weight past the row width"}


def probe() -> None:
    """Raise BackendUnavailable unless numba imports."""
    try:
        import numba  # noqa: F401
    except ImportError as err:  # pragma: no cover - numba is a dependency
        raise BackendUnavailable(f"the 'cpu' kernel backend needs numba ({err}); pip install numba") from err


def _nb():
    from qmoe.kernels import _cpu_numba

    return _cpu_numba


def build_lut(enc: EncodedMatrix) -> np.ndarray:
    """The kernel's ``[4096] int32`` decode table for ``enc``'s code (layout in _cpu_numba), shared by
    matrices with the same code."""
    nb = _nb()
    t = enc.table
    key = (t.kind, t.run_limit, t.background, t.lengths.tobytes())
    lut = _luts.get(key)
    if lut is None:
        from qmoe.codec import huffman

        e = t.decode_lut().astype(np.int64)  # codec layout, qmoe.codec.huffman
        n = e & huffman.LEN_MASK
        v = (e >> huffman.VAL_SHIFT) & 3
        end = ((e & huffman.EOR_FLAG) != 0) | (n == 0)
        adv = np.where(end, nb.ADV_END, (e >> huffman.SKIP_SHIFT) + (v != 0))
        lut = (n | (v << nb.VAL_SHIFT) | (adv << nb.ADV_SHIFT)).astype(np.int32)
        assert lut.shape == (nb.LUT_MASK + 1,), f"decode table has {lut.shape} entries"
        _luts[key] = lut
    return lut


class Prepared:
    """Per-matrix handle: the arrays the kernel reads (kept alive here) and a meta-row template."""

    __slots__ = ("enc", "rows", "cols", "int2", "lut", "_arrays", "meta", "rows_per_item", "__weakref__")

    def __init__(self, enc: EncodedMatrix):
        nb = _nb()
        rows, cols = enc.shape
        self.enc, self.rows, self.cols, self.int2 = enc, rows, cols, enc.kind == "int2"
        self.lut = build_lut(enc)
        stream = np.ascontiguousarray(enc.stream, dtype="<u4")
        bo = np.ascontiguousarray(enc.block_offsets, dtype="<u4")
        rd = np.ascontiguousarray(enc.row_deltas, dtype="<u2")
        levels = np.ascontiguousarray(enc.levels)
        if levels.dtype not in (np.dtype("<f2"), np.dtype("<f4")):
            raise FormatError(f"levels must be float16 or float32, got {levels.dtype}")
        if stream.shape[0] != (enc.total_bits + 31) // 32 + 1:
            raise FormatError(f"stream has {stream.shape[0]} words for {enc.total_bits} bits; re-validate it "
                              "with EncodedMatrix.from_arrays")
        self._arrays = (stream, bo, rd, levels)
        m = np.zeros(nb.NMETA, dtype=np.int64)
        m[nb.M_STREAM], m[nb.M_BLOCK_OFFSETS] = stream.ctypes.data, bo.ctypes.data
        m[nb.M_ROW_DELTAS], m[nb.M_LEVELS] = rd.ctypes.data, levels.ctypes.data
        m[nb.M_LUT] = self.lut.ctypes.data
        m[nb.M_ROWS], m[nb.M_COLS] = rows, cols
        m[nb.M_BLOCK_LOG2], m[nb.M_BITS] = enc.block_log2, enc.total_bits
        m[nb.M_INT2], m[nb.M_BACKGROUND] = self.int2, enc.table.background
        m[nb.M_LEVELS_F16] = levels.dtype == np.dtype("<f2")
        self.meta = m
        self.rows_per_item = int(max(4, min(256, (ITEM_WEIGHTS // cols) // 4 * 4)))

    def items(self, e: int) -> np.ndarray:
        """Work items ``[n, 3] int64`` (matrix index e, row0, row1) covering all rows."""
        r0 = np.arange(0, self.rows, self.rows_per_item, dtype=np.int64)
        return np.stack([np.full_like(r0, e), r0, np.minimum(r0 + self.rows_per_item, self.rows)], axis=1)


def prepare(enc: EncodedMatrix) -> Prepared:
    """The cached handle of ``enc`` (built on first use)."""
    h = _handles.get(enc)
    if h is None:
        if not isinstance(enc, EncodedMatrix):
            raise TypeError(f"expected a qmoe.codec.EncodedMatrix, got {type(enc).__name__}")
        h = Prepared(enc)
        _handles[enc] = h
    return h


def _pack(h: Prepared, x: np.ndarray) -> tuple[np.ndarray, int]:
    """x ``[T, cols]`` -> the kernel's layout ``[cols + 2, Tp]`` (row cols = 0, row cols+1 = sum over cols).

    Row ``cols`` is read for escapes and ends of row (weight 0); the sum feeds int2's background level.
    """
    t, cols = x.shape
    tp = 1 if t == 1 else (t + 7) // 8 * 8
    xt = np.zeros((cols + 2, tp), dtype=np.float32)
    xt[:cols, :t] = x.T
    if h.int2:
        xt[cols + 1, :t] = x.sum(axis=1, dtype=np.float64)
    return xt, tp


def _run(handles: Sequence[Prepared], xs: Sequence[np.ndarray]) -> list[np.ndarray]:
    import numba

    nb = _nb()
    meta = np.empty((len(handles), nb.NMETA), dtype=np.int64)
    keep, outs, items = [], [], []
    for e, (h, x) in enumerate(zip(handles, xs, strict=True)):
        t = x.shape[0]
        out = np.empty((t, h.rows), dtype=np.float32)
        outs.append(out)
        if t == 0:
            meta[e] = h.meta
            continue
        xt, tp = _pack(h, x)
        keep.append(xt)
        meta[e] = h.meta
        meta[e, nb.M_X], meta[e, nb.M_OUT] = xt.ctypes.data, out.ctypes.data
        meta[e, nb.M_TOKENS], meta[e, nb.M_TPAD] = t, tp
        items.append(h.items(e))
    if items:
        work = np.concatenate(items) if len(items) > 1 else items[0]
        status = np.empty(len(work), dtype=np.int64)
        with numba.parallel_chunksize(1):
            nb.matmul_items(meta, work, status)
        bad = np.flatnonzero(status >= 0)
        if len(bad):
            i = bad[0]
            h = handles[int(work[i, 0])]
            row, code = divmod(int(status[i]), 4)
            raise FormatError(f"encoded {h.enc.kind} matrix {h.enc.shape} is corrupt: row {row} "
                              f"{_STATUS_TEXT[code]}")
    del keep  # the kernel has returned: the packed inputs may go
    return outs


def matmul(enc: EncodedMatrix, x: Any) -> Any:
    """``x @ W^T`` for ``x [tokens, cols]`` float32 (torch CPU tensor or numpy) -> ``[tokens, rows]``."""
    h = prepare(enc)
    arr, is_torch = as_numpy(x, h.cols, "x")
    return wrap(_run([h], [arr])[0], is_torch)


def matmul_experts(encs: Sequence[EncodedMatrix], xs: Sequence[Any]) -> list[Any]:
    """``[xs[e] @ W_e^T]`` for each expert, in one parallel call; each ``xs[e]`` is ``[t_e, cols_e]``."""
    if len(encs) != len(xs):
        raise ValueError(f"got {len(encs)} matrices but {len(xs)} inputs")
    handles = [prepare(enc) for enc in encs]
    arrs = [as_numpy(x, h.cols, f"xs[{e}]") for e, (h, x) in enumerate(zip(handles, xs, strict=True))]
    outs = _run(handles, [a for a, _ in arrs])
    return [wrap(o, t) for o, (_, t) in zip(outs, arrs, strict=True)]
