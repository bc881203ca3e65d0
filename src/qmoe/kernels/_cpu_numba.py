"""numba kernels of the fused CPU decode-matmul ``y = x @ W^T`` over entropy-coded matrices (qmoe.codec).

Imported lazily by qmoe.kernels.cpu, never by ``import qmoe``. ``cache=True``: only the first process on a
machine pays the compile time.

One call runs a list of work items ``(matrix, first row, end row)`` over any number of matrices, in parallel
with dynamic scheduling (so a layer's small experts share one thread start-up, and a core busy with other work
does not hold the call up). Each matrix is described by one row of ``meta [E, NMETA] int64``: raw addresses of
its arrays plus sizes. Addresses rather than numba lists of arrays: building a typed list costs ~µs per array
from Python, and a tuple of arrays recompiles for every expert count.

Per matrix row the decoder walks the row's symbols with the single-lookup table of ``build_lut`` and touches x
only at nonzeros (ternary) or non-background codes (int2); work is proportional to the symbols, not the width:

    acc  = sum over coded weights  w[v] * x[col]     (w = per-row level of value v; 0 for an escape)
    y    = acc + base * sum(x)                       (base = background level: 0 for ternary)

Batch 1 decodes four rows interleaved: a symbol's decode is a ~15-cycle dependent chain (load window, table
lookup, advance), so independent rows fill the pipeline. Batch T > 1 reads ``xT [cols + 2, Tp]`` (tokens
contiguous, Tp = T rounded up to 8) so each symbol adds one contiguous token vector.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Kernel decode-table entry (int32), derived from the codec's table by qmoe.kernels.cpu.build_lut:
#   bits 0..3  codeword length (1..12; 0 = no codeword has this prefix)
#   bits 4..5  value v (0 = nothing written: escape, end of row, invalid)
#   bits 6..30 advance: columns passed including the written one; a value lands at column pos + adv - 1
LEN_MASK = 0xF
VAL_SHIFT = 4
ADV_SHIFT = 6
ADV_END = 1 << 23  # end of row and invalid codewords: past any width (format.MAX_COLS = 2**22)
LUT_MASK = (1 << 12) - 1  # format.MAX_CODE_LEN bits index the table

# meta columns, one row per matrix
(M_STREAM, M_BLOCK_OFFSETS, M_ROW_DELTAS, M_LEVELS, M_LUT, M_X, M_OUT, M_ROWS, M_COLS, M_TOKENS, M_TPAD,
 M_BLOCK_LOG2, M_BITS, M_INT2, M_BACKGROUND, M_LEVELS_F16) = range(16)
NMETA = 16

# Row status (0 = ok), reported per work item as row * 4 + status.
ERR_LENGTH = 1  # the row's symbols do not end exactly at its last bit (or hold an invalid codeword)
ERR_WIDTH = 2  # a value lands past the row's width


@intrinsic
def _voidptr(typingctx, addr):
    """int64 address -> void*, for ``numba.carray``."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@njit(inline="always")
def _half(h):  # pragma: no cover - compiled
    """IEEE fp16 bits ``h`` -> float64 (numba has no float16 on CPU)."""
    s = -1.0 if h & 0x8000 else 1.0
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        return s * math.ldexp(float(m), -24)
    if e == 31:
        return s * np.inf if m == 0 else np.nan
    return s * math.ldexp(float(1024 + m), e - 25)


@njit(inline="always")
def _level(lv16, lv32, f16, i):  # pragma: no cover - compiled
    return _half(np.int64(lv16[i])) if f16 else np.float64(lv32[i])


@njit(inline="always")
def _row_levels(m, lv16, lv32, r, tab, k):  # pragma: no cover - compiled
    """Set ``tab[k:k+4]`` = weight added per value v (tab[k] = 0) for row r; return the background level.

    ternary: v=1 -> lo, v=2 -> hi, base 0. int2: v -> level[(bg + v) & 3] - level[bg], base level[bg].
    """
    f16 = m[M_LEVELS_F16] != 0
    tab[k] = 0.0
    if m[M_INT2]:
        bg = m[M_BACKGROUND]
        base = _level(lv16, lv32, f16, 4 * r + bg)
        for v in range(1, 4):
            tab[k + v] = np.float32(_level(lv16, lv32, f16, 4 * r + ((bg + v) & 3)) - base)
        return np.float32(base)
    tab[k + 1] = np.float32(_level(lv16, lv32, f16, 2 * r))
    tab[k + 2] = np.float32(_level(lv16, lv32, f16, 2 * r + 1))
    tab[k + 3] = 0.0
    return np.float32(0.0)


@njit(inline="always")
def _row_bits(bo, rd, g, rows, total, r):  # pragma: no cover - compiled
    """Stream bits [start, end) of row r from the block offsets and row deltas."""
    start = np.int64(bo[r >> g]) + np.int64(rd[r])
    if r + 1 < rows:
        return start, np.int64(bo[(r + 1) >> g]) + np.int64(rd[r + 1])
    return start, total


@njit(inline="always")
def _entry(words, lut, bit):  # pragma: no cover - compiled
    """Table entry of the codeword at stream ``bit`` (< the row's end, so words[i + 1] exists: guard word)."""
    # unsigned indices: numba then skips its negative-index wraparound (a compare + select per access)
    i = np.uint64(bit >> 5)
    window = np.int64(words[i]) | (np.int64(words[i + np.uint64(1)]) << 32)
    return np.int64(lut[np.uint64((window >> (bit & 31)) & LUT_MASK)])


@njit(inline="always")
def _status(bit, end, pos, e, cols):  # pragma: no cover - compiled
    # A row ends when its symbols reach the width: a value ending exactly there, or an escape / end of row.
    if bit != end:
        return ERR_LENGTH
    if pos < cols or (pos > cols and (e >> VAL_SHIFT) & 3 != 0):
        return ERR_WIDTH
    return 0


@njit(inline="always")
def _dot1(words, lut, x, tab, toff, cols, bit, end, pos, acc, e):  # pragma: no cover - compiled
    """Finish one row at batch 1 from state (bit, pos, acc, last entry e); x is ``[cols + 2]``."""
    while pos < cols and bit < end:
        e = _entry(words, lut, bit)
        bit += e & LEN_MASK
        pos += e >> ADV_SHIFT
        # past the width (end of row, escape, corrupt value) read x[cols] = 0; the status check follows
        acc += tab[np.uint64(toff + ((e >> VAL_SHIFT) & 3))] * x[np.uint64(min(pos - 1, cols))]
    return bit, pos, acc, e


@njit(fastmath={"contract"}, nogil=True)
def _item_t1(m, words, lut, bo, rd, lv16, lv32, x, out, r0, r1):  # pragma: no cover - compiled
    """Rows [r0, r1) at batch 1; returns -1 or (first bad row) * 4 + status."""
    rows, cols, g, total = m[M_ROWS], m[M_COLS], m[M_BLOCK_LOG2], m[M_BITS]
    xsum = x[cols + 1]
    tab = np.zeros(16, dtype=np.float32)  # [4 rows, 4 values]
    r = r0
    while r + 4 <= r1:
        base0 = _row_levels(m, lv16, lv32, r, tab, 0)
        base1 = _row_levels(m, lv16, lv32, r + 1, tab, 4)
        base2 = _row_levels(m, lv16, lv32, r + 2, tab, 8)
        base3 = _row_levels(m, lv16, lv32, r + 3, tab, 12)
        b0, n0 = _row_bits(bo, rd, g, rows, total, r)
        b1, n1 = _row_bits(bo, rd, g, rows, total, r + 1)
        b2, n2 = _row_bits(bo, rd, g, rows, total, r + 2)
        b3, n3 = _row_bits(bo, rd, g, rows, total, r + 3)
        p0 = p1 = p2 = p3 = np.int64(0)
        e0 = e1 = e2 = e3 = np.int64(0)
        a0 = a1 = a2 = a3 = np.float32(0.0)
        # Interleaved while every row has symbols left (OR of values >= 0 is >= 0 iff all are).
        while ((cols - 1 - p0) | (cols - 1 - p1) | (cols - 1 - p2) | (cols - 1 - p3)
               | (n0 - 1 - b0) | (n1 - 1 - b1) | (n2 - 1 - b2) | (n3 - 1 - b3)) >= 0:
            e0 = _entry(words, lut, b0)
            e1 = _entry(words, lut, b1)
            e2 = _entry(words, lut, b2)
            e3 = _entry(words, lut, b3)
            b0 += e0 & LEN_MASK
            b1 += e1 & LEN_MASK
            b2 += e2 & LEN_MASK
            b3 += e3 & LEN_MASK
            p0 += e0 >> ADV_SHIFT
            p1 += e1 >> ADV_SHIFT
            p2 += e2 >> ADV_SHIFT
            p3 += e3 >> ADV_SHIFT
            a0 += tab[np.uint64((e0 >> VAL_SHIFT) & 3)] * x[np.uint64(min(p0 - 1, cols))]
            a1 += tab[np.uint64(4 + ((e1 >> VAL_SHIFT) & 3))] * x[np.uint64(min(p1 - 1, cols))]
            a2 += tab[np.uint64(8 + ((e2 >> VAL_SHIFT) & 3))] * x[np.uint64(min(p2 - 1, cols))]
            a3 += tab[np.uint64(12 + ((e3 >> VAL_SHIFT) & 3))] * x[np.uint64(min(p3 - 1, cols))]
        b0, p0, a0, e0 = _dot1(words, lut, x, tab, 0, cols, b0, n0, p0, a0, e0)
        b1, p1, a1, e1 = _dot1(words, lut, x, tab, 4, cols, b1, n1, p1, a1, e1)
        b2, p2, a2, e2 = _dot1(words, lut, x, tab, 8, cols, b2, n2, p2, a2, e2)
        b3, p3, a3, e3 = _dot1(words, lut, x, tab, 12, cols, b3, n3, p3, a3, e3)
        out[r] = a0 + base0 * xsum
        out[r + 1] = a1 + base1 * xsum
        out[r + 2] = a2 + base2 * xsum
        out[r + 3] = a3 + base3 * xsum
        for k, (b, n, p, e) in enumerate(((b0, n0, p0, e0), (b1, n1, p1, e1), (b2, n2, p2, e2),
                                          (b3, n3, p3, e3))):
            s = _status(b, n, p, e, cols)
            if s:
                return (r + k) * 4 + s
        r += 4
    while r < r1:
        base = _row_levels(m, lv16, lv32, r, tab, 0)
        b, n = _row_bits(bo, rd, g, rows, total, r)
        b, p, a, e = _dot1(words, lut, x, tab, 0, cols, b, n, np.int64(0), np.float32(0.0), np.int64(0))
        out[r] = a + base * xsum
        s = _status(b, n, p, e, cols)
        if s:
            return r * 4 + s
        r += 1
    return -1


@njit(fastmath={"contract"}, nogil=True)
def _item_tn(m, words, lut, bo, rd, lv16, lv32, xt, out, r0, r1):  # pragma: no cover - compiled
    """Rows [r0, r1) at batch T: ``xt [cols + 2, Tp]``, ``out [T * rows]``; -1 or bad row * 4 + status."""
    rows, cols, g, total = m[M_ROWS], m[M_COLS], m[M_BLOCK_LOG2], m[M_BITS]
    ntok, tp = m[M_TOKENS], m[M_TPAD]
    tab = np.zeros(4, dtype=np.float32)
    acc = np.empty(tp, dtype=np.float32)
    for r in range(r0, r1):
        base = _row_levels(m, lv16, lv32, r, tab, 0)
        bit, end = _row_bits(bo, rd, g, rows, total, r)
        for t in range(tp):
            acc[t] = 0.0
        pos = np.int64(0)
        e = np.int64(0)
        while pos < cols and bit < end:
            e = _entry(words, lut, bit)
            bit += e & LEN_MASK
            pos += e >> ADV_SHIFT
            w = tab[np.uint64((e >> VAL_SHIFT) & 3)]
            xr = xt[np.uint64(min(pos - 1, cols))]  # [tp]: a row view, so the token loop vectorizes
            for t in range(tp):
                acc[t] += w * xr[t]
        for t in range(ntok):
            out[t * rows + r] = acc[t] + base * xt[cols + 1, t]
        s = _status(bit, end, pos, e, cols)
        if s:
            return r * 4 + s
    return -1


@njit(fastmath={"contract"}, nogil=True)
def _item(m, r0, r1):  # pragma: no cover - compiled
    rows, cols, ntok, tp = m[M_ROWS], m[M_COLS], m[M_TOKENS], m[M_TPAD]
    nlev = rows * (4 if m[M_INT2] else 2)
    words = numba.carray(_voidptr(m[M_STREAM]), (m[M_BITS] + 31) // 32 + 1, np.uint32)
    lut = numba.carray(_voidptr(m[M_LUT]), LUT_MASK + 1, np.int32)
    g = m[M_BLOCK_LOG2]
    bo = numba.carray(_voidptr(m[M_BLOCK_OFFSETS]), ((rows + (1 << g) - 1) >> g) + 1, np.uint32)
    rd = numba.carray(_voidptr(m[M_ROW_DELTAS]), rows, np.uint16)
    lv16 = numba.carray(_voidptr(m[M_LEVELS]), nlev, np.uint16)
    lv32 = numba.carray(_voidptr(m[M_LEVELS]), nlev if m[M_LEVELS_F16] == 0 else 0, np.float32)
    out = numba.carray(_voidptr(m[M_OUT]), ntok * rows, np.float32)
    if ntok == 1:
        x = numba.carray(_voidptr(m[M_X]), cols + 2, np.float32)
        return _item_t1(m, words, lut, bo, rd, lv16, lv32, x, out, r0, r1)
    xt = numba.carray(_voidptr(m[M_X]), (cols + 2, tp), np.float32)
    return _item_tn(m, words, lut, bo, rd, lv16, lv32, xt, out, r0, r1)


@njit(cache=True, parallel=True, nogil=True)
def matmul_items(meta, items, status):  # pragma: no cover - compiled
    """Run work items ``items [n, 3] (matrix, row0, row1)`` over matrices ``meta [E, NMETA]``.

    ``status [n]`` gets -1 per good item, else (first bad row) * 4 + status code.
    Call under ``numba.parallel_chunksize(1)``: dynamic scheduling, so uneven rows and busy cores balance out
    (set from Python: setting it in here would make the function uncacheable).
    """
    for i in prange(items.shape[0]):
        status[i] = _item(meta[items[i, 0]], items[i, 1], items[i, 2])
