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


def build_lut2(enc: EncodedMatrix) -> tuple[np.ndarray, int]:
    """The kernel's multi-symbol ``[4096] int64`` decode table (layout in _cpu_numba) and the x padding it
    needs (value columns reach up to ``pad - 1`` past pos), shared by matrices with the same code.

    Entry i decodes, in order, every codeword lying wholly in the 12 window bits i (LSB first) while at most
    two of them write values; an escape only moves pos; the end-of-row symbol closes the entry. The first
    codeword is always taken (a lone 12-bit codeword or an invalid prefix still makes an entry).
    """
    nb = _nb()
    t = enc.table
    key = ("pairs", t.kind, t.run_limit, t.background, t.lengths.tobytes())
    got = _luts.get(key)
    if got is not None:
        return got, int(got[-1])
    from qmoe.codec import huffman

    single = t.decode_lut().astype(np.int64)  # codec layout, qmoe.codec.huffman
    nbits = nb.LUT_MASK.bit_length()
    # Later values may land at most `limit` columns past pos, so x needs only limit + 1 zeros of padding.
    limit = max(256, int(t.run_limit)) - 1
    idx = np.arange(nb.LUT_MASK + 1, dtype=np.int64)
    used = np.zeros_like(idx)  # bits taken
    off = np.zeros_like(idx)  # pos advance so far
    nval = np.zeros_like(idx)
    land = np.zeros((2, len(idx)), dtype=np.int64)
    vv = np.zeros_like(idx)
    ended = np.zeros(len(idx), dtype=bool)
    open_ = np.ones(len(idx), dtype=bool)
    for step in range(nbits):
        e = single[(idx >> used) & nb.LUT_MASK]  # bits past the window read as 0: checked via the length
        n = e & huffman.LEN_MASK
        v = (e >> huffman.VAL_SHIFT) & 3
        skip = e >> huffman.SKIP_SHIFT
        eor = (e & huffman.EOR_FLAG) != 0
        if step == 0:
            take = open_.copy()
            ended |= n == 0  # no codeword: the entry ends the row (the kernel's status check rejects it)
        else:
            take = open_ & (n > 0) & (n <= nbits - used) & ~((v > 0) & ((nval == 2) | (off + skip > limit)))
        val = take & (v > 0) & ~eor
        first = val & (nval == 0)
        second = val & (nval == 1)
        land[0] = np.where(first, off + skip, land[0])
        land[1] = np.where(second, off + skip, land[1])
        vv |= np.where(first, v, 0) | np.where(second, v << 2, 0)
        nval += val
        off += np.where(take & ~eor, skip + (v > 0), 0)
        used += np.where(take, n, 0)
        ended |= take & eor
        open_ &= take & ~ended
    adv = np.where(ended, nb.ADV_END, off)
    assert land.max() <= max(limit, int(t.run_limit) - 1) and adv.max() <= nb.ADV_END and used.max() <= nbits
    lut2 = np.empty(len(idx) + 1, dtype=np.int64)  # last slot: the padding (kept with the table)
    lut2[:-1] = used | (vv << 4) | (land[0] << 8) | (land[1] << 24) | (adv << nb.E2_ADV_SHIFT)
    lut2[-1] = limit + 1
    _luts[key] = lut2
    return lut2, limit + 1


class Prepared:
    """Per-matrix handle: the arrays the kernel reads (kept alive here) and a meta-row template."""

    __slots__ = ("enc", "rows", "cols", "int2", "lut", "lut2", "xpad", "_arrays", "meta", "rows_per_item",
                 "__weakref__")

    def __init__(self, enc: EncodedMatrix):
        nb = _nb()
        rows, cols = enc.shape
        self.enc, self.rows, self.cols, self.int2 = enc, rows, cols, enc.kind == "int2"
        self.lut = build_lut(enc)
        self.lut2, self.xpad = build_lut2(enc)
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
        m[nb.M_LUT], m[nb.M_LUT2], m[nb.M_XPAD] = self.lut.ctypes.data, self.lut2.ctypes.data, self.xpad
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
    """x ``[T, cols]`` -> the kernel's layout ``[cols + pad + 1, Tp]``: rows cols..cols+pad-1 = 0, last row =
    sum over cols.

    The zero rows are read by values that land past pos's row end in a corrupt stream, and by escapes and
    ends of row (weight 0), so the kernel needs no per-symbol bounds clamp; the sum feeds int2's background.
    """
    t, cols = x.shape
    tp = 1 if t == 1 else (t + 7) // 8 * 8
    xt = np.empty((cols + h.xpad + 1, tp), dtype=np.float32)
    if t == 1:
        xt[:cols, 0] = x[0]
    else:
        xt[:cols, :t] = x.T
        xt[:cols, t:] = 0.0
    xt[cols:] = 0.0
    if h.int2:
        xt[cols + h.xpad, :t] = x.sum(axis=1, dtype=np.float64)
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
