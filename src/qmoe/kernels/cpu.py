"""The fused CPU backend: ``y = x @ W^T`` straight from the entropy-coded stream, multi-threaded with numba.

``prepare(enc)`` builds a small per-matrix handle once (kernel decode tables, shared per code; array
addresses in a registry slot; cached per EncodedMatrix), so a call costs ~10 µs of Python before the kernel
runs. ``matmul_experts`` runs a whole MoE layer's experts as one parallel call over (expert, row block) work
items; inputs are read in place (torch or numpy, any strides).

Two kernels compute the items: ``native``, rows decoded 8 at a time across AVX2 lanes (cpu_lanes.c, compiled
on first use by qmoe.kernels._native), and ``numba``, the portable one (qmoe.kernels._cpu_numba, which also
packs the inputs and schedules the items for both). The mode is chosen once per process (``kernel()``) from
``QMOE_CPU_KERNEL``:

    auto    (default) native when it builds and the CPU has AVX2, numba where native is unavailable
    native  native for every call (BackendUnavailable if it cannot be built)
    numba   numba for every call

Native runs single tokens too, though numba's four interleaved rows are up to 1.6x faster there on small
matrices (docs/kernels.md): the numba item kernels take ~30 s to compile on first use on a 2-core machine,
the native kernel ~2 s, and a first ``qmoe generate`` should not wait half a minute. Which kernel runs
depends on the mode and the machine only, never on what happens to be compiled, so outputs do not change
from one run to the next.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from qmoe.codec.format import EncodedMatrix
from qmoe.errors import BackendUnavailable
from qmoe.kernels._io import as_source, wrap

# Work-item size: about this many weights per (matrix, row block), so a 2-core call has tens of items to
# balance yet each item's fixed cost (row levels, scheduling) stays small.
ITEM_WEIGHTS = 1 << 16
# The native kernel's items: at least LANE_ROWS rows, so its 16 lanes rarely idle while an item drains.
LANE_ITEM_WEIGHTS, LANE_ROWS = 1 << 18, 64
KERNELS = ("auto", "native", "numba")
_kernel: str | None = None  # resolved on first use
_log = logging.getLogger(__name__)

_handles: weakref.WeakKeyDictionary[EncodedMatrix, Prepared] = weakref.WeakKeyDictionary()
_luts: weakref.WeakValueDictionary[tuple, np.ndarray] = weakref.WeakValueDictionary()


def probe() -> None:
    """Raise BackendUnavailable unless numba imports."""
    try:
        import numba  # noqa: F401
    except ImportError as err:  # pragma: no cover - numba is a dependency
        raise BackendUnavailable(f"the 'cpu' kernel backend needs numba ({err}); pip install numba") from err


def kernel() -> str:
    """The mode this process uses (``auto`` only when the native kernel is available, else ``numba``),
    resolved on first call from ``QMOE_CPU_KERNEL`` (auto, native, numba)."""
    if _kernel is None:
        want = os.environ.get("QMOE_CPU_KERNEL", "auto").strip().lower() or "auto"
        if want not in KERNELS:
            raise BackendUnavailable(f"QMOE_CPU_KERNEL={want!r}: choose one of {', '.join(KERNELS)}")
        set_kernel(want)
    return _kernel  # type: ignore[return-value]


def set_kernel(name: str) -> str:
    """Use mode ``name`` (auto, native, numba) from now on; returns the mode in force, which is ``numba`` when
    ``auto`` finds the native kernel unavailable. ``native`` raises BackendUnavailable (with the compiler's
    message) when it cannot be built or run."""
    global _kernel
    from qmoe.kernels import _native

    if name not in KERNELS:
        raise ValueError(f"unknown CPU kernel {name!r}; choose one of {KERNELS}")
    if name != "numba":
        try:
            _native.load()
            _kernel = name
            return _kernel
        except BackendUnavailable as err:
            if name == "native":
                raise
            _log.info("qmoe: using the numba CPU kernel: %s", err)
    _kernel = "numba"
    return _kernel


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
    adv = np.where(ended, nb.E2_ADV_END, off)
    assert land.max() <= max(limit, int(t.run_limit) - 1) and off.max() < nb.E2_ADV_END, "field overflow"
    lut2 = np.empty(len(idx) + 1, dtype=np.int64)  # last slot: the padding (kept with the table)
    lut2[:-1] = used | (vv << 4) | (land[0] << 8) | (land[1] << 24) | (adv << nb.E2_ADV_SHIFT)
    lut2[-1] = limit + 1
    _luts[key] = lut2
    return lut2, limit + 1


def build_lane_tables(enc: EncodedMatrix) -> np.ndarray:
    """The native kernel's tables ``[2, 8193] int32`` (TA, TB; layout in cpu_lanes.c): entries 0..4095 the
    multi-symbol table ``build_lut2``, 4096..8191 the single-symbol table ``build_lut``, split into 32-bit
    fields a gather can fetch; entry 8192 is all zero (parked lanes)."""
    t = enc.table
    key = ("lanes", t.kind, t.run_limit, t.background, t.lengths.tobytes())
    got = _luts.get(key)
    if got is not None:
        return got
    nb = _nb()
    e = build_lut2(enc)[0][:-1]
    n, vv = e & 15, (e >> 4) & 15
    c1, c2, adv = (e >> 8) & 0xFFFF, (e >> 24) & 0xFFFF, e >> nb.E2_ADV_SHIFT
    s = build_lut(enc).astype(np.int64)
    sv = (s >> nb.VAL_SHIFT) & 3
    sadv = np.minimum(s >> nb.ADV_SHIFT, nb.E2_ADV_END)  # end of row: 2**22 is past any width too
    assert c1.max() < 1 << 15 and c2.max() < 1 << 15 and adv.max() <= nb.E2_ADV_END, "lane field overflow"
    tabs = np.zeros((2, 2 * len(e) + 1), dtype=np.int64)
    tabs[0, :len(e)] = n | (vv << 4) | (adv << 8)
    tabs[1, :len(e)] = c1 | (((vv & 3) != 0) << 15) | (c2 << 16) | (((vv >> 2) != 0).astype(np.int64) << 31)
    tabs[0, len(e):-1] = (s & nb.LEN_MASK) | (sv << 4) | (sadv << 8)
    tabs[1, len(e):-1] = np.where(sv != 0, (sadv - 1) | (1 << 15), 0)  # the value's column: skip
    tabs = tabs.astype(np.uint32).view(np.int32)
    _luts[key] = tabs
    return tabs


class _Registry:
    """Registry rows ``[slots, NMETA] int64``, one per live Prepared handle, so a call passes the kernel
    slot numbers instead of building per-matrix rows (each costs ~µs of numpy from Python)."""

    def __init__(self) -> None:
        self.rows = np.zeros((0, _nb().NMETA), dtype=np.int64)
        self.free: list[int] = []

    def add(self, row: np.ndarray) -> int:
        if not self.free:
            n = len(self.rows)
            grown = np.zeros((max(16, 2 * n), self.rows.shape[1]), dtype=np.int64)
            grown[:n] = self.rows
            self.rows = grown  # calls in flight hold the old array: its rows stay valid
            self.free = list(range(len(grown) - 1, n - 1, -1))
        slot = self.free.pop()
        self.rows[slot] = row
        return slot

    def release(self, slot: int) -> None:
        self.rows[slot] = 0
        self.free.append(slot)


_registry: _Registry | None = None


class Prepared:
    """Per-matrix handle: the arrays the kernel reads (kept alive here) and its registry slot."""

    __slots__ = ("enc", "rows", "cols", "int2", "lut", "lut2", "lanes", "xpad", "_arrays", "meta", "slot",
                 "__weakref__")

    def __init__(self, enc: EncodedMatrix):
        global _registry
        nb = _nb()
        # The kernels read only inside `stream` when the offsets are sound; an EncodedMatrix built directly
        # (not by from_arrays) has not been checked yet.
        enc.validate()
        rows, cols = enc.shape
        self.enc, self.rows, self.cols, self.int2 = enc, rows, cols, enc.kind == "int2"
        self.lut = build_lut(enc)
        self.lut2, self.xpad = build_lut2(enc)
        self.lanes = build_lane_tables(enc)
        stream = np.ascontiguousarray(enc.stream)  # dtypes and shapes checked by validate()
        bo = np.ascontiguousarray(enc.block_offsets)
        row_deltas = np.ascontiguousarray(enc.row_deltas)
        levels = np.ascontiguousarray(enc.levels)
        self._arrays = (stream, bo, row_deltas, levels)
        m = np.zeros(nb.NMETA, dtype=np.int64)
        m[nb.M_STREAM], m[nb.M_BLOCK_OFFSETS] = stream.ctypes.data, bo.ctypes.data
        m[nb.M_ROW_DELTAS], m[nb.M_LEVELS] = row_deltas.ctypes.data, levels.ctypes.data
        m[nb.M_LUT], m[nb.M_LUT2], m[nb.M_XPAD] = self.lut.ctypes.data, self.lut2.ctypes.data, self.xpad
        m[nb.M_ROWS], m[nb.M_COLS] = rows, cols
        m[nb.M_BLOCK_LOG2], m[nb.M_BITS] = enc.block_log2, enc.total_bits
        m[nb.M_INT2], m[nb.M_BACKGROUND] = self.int2, enc.table.background
        m[nb.M_LEVELS_F16] = levels.dtype == np.dtype("<f2")
        m[nb.M_RPI] = max(4, min(252, (ITEM_WEIGHTS // cols) // 4 * 4))  # whole 4-row groups
        m[nb.M_LANE_LUT] = self.lanes.ctypes.data
        m[nb.M_RPI_LANES] = max(LANE_ROWS, LANE_ITEM_WEIGHTS // cols)
        self.meta = m
        if _registry is None:
            _registry = _Registry()
        self.slot = _registry.add(m)
        weakref.finalize(self, _registry.release, self.slot)


def prepare(enc: EncodedMatrix) -> Prepared:
    """The cached handle of ``enc`` (built on first use)."""
    h = _handles.get(enc)
    if h is None:
        if not isinstance(enc, EncodedMatrix):
            raise TypeError(f"expected a qmoe.codec.EncodedMatrix, got {type(enc).__name__}")
        h = Prepared(enc)
        _handles[enc] = h
    return h


def _run(handles: Sequence[Prepared], srcs: Sequence[tuple]) -> list[np.ndarray]:
    """One kernel call for all (matrix, input) pairs; ``srcs`` from ``_io.as_source``. Returns ``[t, rows]``
    arrays (views of one buffer)."""
    import numba

    nb = _nb()
    calls: list[int] = []
    xoff = ooff = 0
    for h, (addr, t, s0, s1, _, _) in zip(handles, srcs, strict=True):
        tp = 1 if t == 1 else (t + 7) // 8 * 8
        calls += (h.slot, t, tp, addr, s0, s1, xoff, ooff)
        if t:
            xoff += (h.cols + h.xpad + 1) * tp
        ooff += t * h.rows
    call = np.array(calls, dtype=np.int64).reshape(len(handles), nb.NCALL)
    xbuf = np.empty(xoff, dtype=np.float32)
    out = np.empty(ooff, dtype=np.float32)
    with numba.parallel_chunksize(1):
        if kernel() == "numba":
            bad, status = nb.matmul_call(_registry.rows, call, xbuf, out, 0, 2)
        else:  # a driver without the numba item kernels: compiles in seconds, not half a minute
            bad, status = nb.lanes_call(_registry.rows, call, xbuf, out, _native_addr())
    if bad >= 0:  # the kernels find the first bad row; the codec's rule says what is wrong with it
        from qmoe.codec.decode import raise_row_error

        raise_row_error(handles[bad].enc, int(status) // 4)
    return _split(out, handles, srcs)


def _native_addr() -> int:
    from qmoe.kernels import _native

    return _native.load()


def _split(out: np.ndarray, handles: Sequence[Prepared], srcs: Sequence[tuple]) -> list[np.ndarray]:
    res, o = [], 0
    for h, src in zip(handles, srcs, strict=True):
        n = src[1] * h.rows
        res.append(out[o:o + n].reshape(src[1], h.rows))
        o += n
    return res


def matmul(enc: EncodedMatrix, x: Any) -> Any:
    """``x @ W^T`` for ``x [tokens, cols]`` float32 (torch CPU tensor or numpy) -> ``[tokens, rows]``."""
    h = prepare(enc)
    src = as_source(x, h.cols, "x")
    return wrap(_run([h], [src])[0], src[4])


def matmul_experts(encs: Sequence[EncodedMatrix], xs: Sequence[Any]) -> list[Any]:
    """``[xs[e] @ W_e^T]`` for each expert, in one parallel call; each ``xs[e]`` is ``[t_e, cols_e]``."""
    if len(encs) != len(xs):
        raise ValueError(f"got {len(encs)} matrices but {len(xs)} inputs")
    handles = [prepare(enc) for enc in encs]
    srcs = [as_source(x, h.cols, f"xs[{e}]") for e, (h, x) in enumerate(zip(handles, xs, strict=True))]
    outs = _run(handles, srcs)
    return [wrap(o, s[4]) for o, s in zip(outs, srcs, strict=True)]
