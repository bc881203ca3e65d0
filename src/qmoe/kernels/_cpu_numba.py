"""numba kernels of the fused CPU decode-matmul ``y = x @ W^T`` over entropy-coded matrices (qmoe.codec).

Imported lazily by qmoe.kernels.cpu, never by ``import qmoe``. ``cache=True``: only the first process on a
machine pays the compile time.

One call (``matmul_call``) runs any number of (matrix, input) pairs: it packs each input, cuts the matrices
into (pair, row block) work items and runs them in parallel with dynamic scheduling (so a layer's small
experts share one thread start-up, and a core busy with other work does not hold the call up). Each matrix is
one row of a registry ``[slots, NMETA] int64`` (raw addresses of its arrays plus sizes) and each pair one row
of ``calls [n, NCALL]``. Addresses rather than numba lists of arrays: building a typed list costs ~µs per
array from Python, and a tuple of arrays recompiles for every expert count.

Per matrix row the decoder walks the row with a multi-symbol table (``lut2``, built per code in
qmoe.kernels.cpu.build_lut2): one lookup of the next 12 stream bits resolves every whole codeword in them,
up to two values (a 1-bit escape is the commonest symbol at P(zero) = 0.885, so a lookup covers ~4-5 symbols).
x is read only at values; work is proportional to the coded bits, not the width:

    acc  = sum over coded weights  w[v] * x[col]     (w = per-row level of value v; 0 for an empty slot)
    y    = acc + base * sum(x)                       (base = background level: 0 for ternary)

The multi-symbol loop runs while the row has a full 12-bit window left and pos < cols; the row's last
codewords go through the single-symbol table (``lut``). An entry that carries pos past the width is re-walked
symbol by symbol, so a corrupt row is rejected exactly where the reference decoder rejects it. x is padded
with zeros past cols, so no per-symbol bounds clamp is needed.

Batch 1 decodes four rows interleaved (a lookup is a ~14-cycle dependent chain: window load, table load,
advance; four independent chains fill the pipeline better than three, ~10% faster despite a few loop
invariants living on the stack; five or six were no better). Batch T > 1 reads
``xT [cols + pad + 1, Tp]`` (tokens contiguous, Tp = T rounded up to 8) so each value adds one contiguous
token vector.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
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

# Multi-symbol table entry (int64), built by qmoe.kernels.cpu.build_lut2: every codeword that lies wholly
# inside the 12-bit window, in order, holding at most two values (escapes fold into the offsets):
#   bits 0..3   total length of those codewords (0 = the window starts with no codeword)
#   bits 4..7   v1 | v2 << 2, the two values written (0 = none; index into a row's weight-pair table)
#   bits 8..23  column of value 1 relative to pos (0 if none: reads x[pos], weight 0)
#   bits 24..39 column of value 2 relative to pos (0 if none)
#   bits 40..62 advance of pos (E2_ADV_END if the entry holds the end-of-row symbol or an invalid codeword)
E2_ADV_SHIFT = 40
E2_ADV_END = 1 << 22  # format.MAX_COLS: from any pos < cols it passes the width; bit 63 stays clear

# meta columns, one row per matrix
(M_STREAM, M_BLOCK_OFFSETS, M_ROW_DELTAS, M_LEVELS, M_LUT, M_LUT2, M_ROWS, M_COLS, M_BLOCK_LOG2, M_BITS,
 M_INT2, M_BACKGROUND, M_LEVELS_F16, M_XPAD, M_RPI, M_LANE_LUT, M_RPI_LANES) = range(17)
NMETA = 20  # the native kernel (cpu_lanes.c) reads the same columns: keep its enum in step

# call columns, one row per (matrix, input) of a call
C_SLOT, C_TOKENS, C_TPAD, C_XADDR, C_XS0, C_XS1, C_XOFF, C_OOFF = range(8)
NCALL = 8

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


@intrinsic
def _call_native(typingctx, fn, m, x, out, ntok, tp, r0, r1):
    """Call the native kernel ``int64 fn(meta*, x*, out*, ntok, tp, r0, r1)`` (cpu_lanes.c) at address fn;
    every argument an int64 (addresses included), so the caller stays cacheable."""
    sig = types.int64(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
                      types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        f = builder.inttoptr(args[0], ir.FunctionType(i64, [i64] * 7).as_pointer())
        return builder.call(f, args[1:])

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
def _row_pairs(m, lv16, lv32, r, tab, k):  # pragma: no cover - compiled
    """Fill row r's weight-pair table ``tab[k:k+32] = [16 (v1 | v2 << 2), 2]``; return the background level.

    Weight of value v: ternary v=1 -> lo, v=2 -> hi, v=0 -> 0, base 0; int2: level[(bg + v) & 3] - level[bg],
    base level[bg]. ``tab[k + 2 v]`` is then the weight of a lone value v.
    """
    f16 = m[M_LEVELS_F16] != 0
    w0 = w1 = w2 = w3 = np.float32(0.0)
    base = np.float32(0.0)
    if m[M_INT2]:
        bg = m[M_BACKGROUND]
        lb = _level(lv16, lv32, f16, 4 * r + bg)
        w1 = np.float32(_level(lv16, lv32, f16, 4 * r + ((bg + 1) & 3)) - lb)
        w2 = np.float32(_level(lv16, lv32, f16, 4 * r + ((bg + 2) & 3)) - lb)
        w3 = np.float32(_level(lv16, lv32, f16, 4 * r + ((bg + 3) & 3)) - lb)
        base = np.float32(lb)
    else:
        w1 = np.float32(_level(lv16, lv32, f16, 2 * r))
        w2 = np.float32(_level(lv16, lv32, f16, 2 * r + 1))
    ws = (w0, w1, w2, w3)
    for i in range(4):
        for j in range(4):
            tab[k + 2 * (i | (j << 2))] = ws[i]
            tab[k + 2 * (i | (j << 2)) + 1] = ws[j]
    return base


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
def _entry2(words, lut2, bit):  # pragma: no cover - compiled
    """Multi-symbol table entry at stream ``bit`` (<= the row's end - 12)."""
    i = np.uint64(bit >> 5)
    window = np.int64(words[i]) | (np.int64(words[i + np.uint64(1)]) << 32)
    return lut2[np.uint64((window >> (bit & 31)) & LUT_MASK)]


@njit(inline="always")
def _dot1(words, lut, x, tab, toff, cols, bit, end, pos, acc, e):  # pragma: no cover - compiled
    """Finish one row at batch 1 symbol by symbol from state (bit, pos, acc, last entry e).

    Weight of value v is ``tab[toff + 2 v]`` (the pair table's single-value slots); x[cols] is 0.
    """
    while pos < cols and bit < end:
        e = _entry(words, lut, bit)
        bit += e & LEN_MASK
        pos += e >> ADV_SHIFT
        # past the width (end of row, escape, corrupt value) read x[cols] = 0; the status check follows
        acc += tab[np.uint64(toff + 2 * ((e >> VAL_SHIFT) & 3))] * x[np.uint64(min(pos - 1, cols))]
    return bit, pos, acc, e


@njit(inline="always")
def _walk(words, lut, cols, bit, end, pos):  # pragma: no cover - compiled
    """Re-decode symbol by symbol, writing nothing, from (bit, pos) until the row ends; its status.

    Runs after a multi-symbol entry carried pos past the width, to stop exactly where the reference decoder
    stops (a corrupt row may cross the width before the entry's last symbol).
    """
    e = np.int64(0)
    while pos < cols and bit < end:
        e = _entry(words, lut, bit)
        bit += e & LEN_MASK
        pos += e >> ADV_SHIFT
    return _status(bit, end, pos, e, cols)


@njit(inline="always")
def _finish1(words, lut, x, tab, toff, cols, bit, end, pos, acc, e):  # pragma: no cover - compiled
    """After a row's multi-symbol loop: (acc, status)."""
    if pos >= cols:  # the last entry crossed the width
        return acc, _walk(words, lut, cols, bit - (e & 15), end, pos - (e >> E2_ADV_SHIFT))
    bit, pos, acc, e = _dot1(words, lut, x, tab, toff, cols, bit, end, pos, acc, e)
    return acc, _status(bit, end, pos, e, cols)


@njit(inline="always")
def _zone1(words, lut2, x, tab, toff, cols, bit, end12, pos, acc, e):  # pragma: no cover - compiled
    """One row's multi-symbol loop (batch 1) while its next 12 bits lie inside the row and pos < cols."""
    acc2 = np.float32(0.0)
    while (cols - 1 - pos) | (end12 - bit) >= 0:
        e = _entry2(words, lut2, bit)
        bit += e & 15
        k = np.uint64(toff + 2 * ((e >> 4) & 15))
        acc += tab[k] * x[np.uint64(pos + ((e >> 8) & 0xFFFF))]
        acc2 += tab[k + np.uint64(1)] * x[np.uint64(pos + ((e >> 24) & 0xFFFF))]
        pos += e >> E2_ADV_SHIFT
    return bit, pos, acc + acc2, e


@njit(fastmath={"contract"}, nogil=True)
def _item_t1(m, words, lut, lut2, bo, rd, lv16, lv32, x, out, r0, r1):  # pragma: no cover - compiled
    """Rows [r0, r1) at batch 1; returns -1 or (first bad row) * 4 + status. x is ``[cols + pad + 1]``."""
    rows, cols, g, total = m[M_ROWS], m[M_COLS], m[M_BLOCK_LOG2], m[M_BITS]
    xsum = x[cols + m[M_XPAD]]
    tab = np.zeros(4 * 32, dtype=np.float32)  # [4 rows, 16 value pairs, 2]
    r = r0
    while r + 4 <= r1:
        base0 = _row_pairs(m, lv16, lv32, r + 0, tab, 0)
        base1 = _row_pairs(m, lv16, lv32, r + 1, tab, 32)
        base2 = _row_pairs(m, lv16, lv32, r + 2, tab, 64)
        base3 = _row_pairs(m, lv16, lv32, r + 3, tab, 96)
        b0, n0 = _row_bits(bo, rd, g, rows, total, r + 0)
        b1, n1 = _row_bits(bo, rd, g, rows, total, r + 1)
        b2, n2 = _row_bits(bo, rd, g, rows, total, r + 2)
        b3, n3 = _row_bits(bo, rd, g, rows, total, r + 3)
        z0 = n0 - 12
        p0 = np.int64(0)
        e0 = np.int64(0)
        a0 = np.float32(0.0)
        c0 = np.float32(0.0)
        z1 = n1 - 12
        p1 = np.int64(0)
        e1 = np.int64(0)
        a1 = np.float32(0.0)
        c1 = np.float32(0.0)
        z2 = n2 - 12
        p2 = np.int64(0)
        e2 = np.int64(0)
        a2 = np.float32(0.0)
        c2 = np.float32(0.0)
        z3 = n3 - 12
        p3 = np.int64(0)
        e3 = np.int64(0)
        a3 = np.float32(0.0)
        c3 = np.float32(0.0)
        while ((cols - 1 - p0) | (cols - 1 - p1) | (cols - 1 - p2) | (cols - 1 - p3)
               | (z0 - b0) | (z1 - b1) | (z2 - b2) | (z3 - b3)) >= 0:
            e0 = _entry2(words, lut2, b0)
            e1 = _entry2(words, lut2, b1)
            e2 = _entry2(words, lut2, b2)
            e3 = _entry2(words, lut2, b3)
            b0 += e0 & 15
            b1 += e1 & 15
            b2 += e2 & 15
            b3 += e3 & 15
            k0 = np.uint64(0 + 2 * ((e0 >> 4) & 15))
            k1 = np.uint64(32 + 2 * ((e1 >> 4) & 15))
            k2 = np.uint64(64 + 2 * ((e2 >> 4) & 15))
            k3 = np.uint64(96 + 2 * ((e3 >> 4) & 15))
            a0 += tab[k0] * x[np.uint64(p0 + ((e0 >> 8) & 0xFFFF))]
            c0 += tab[k0 + np.uint64(1)] * x[np.uint64(p0 + ((e0 >> 24) & 0xFFFF))]
            a1 += tab[k1] * x[np.uint64(p1 + ((e1 >> 8) & 0xFFFF))]
            c1 += tab[k1 + np.uint64(1)] * x[np.uint64(p1 + ((e1 >> 24) & 0xFFFF))]
            a2 += tab[k2] * x[np.uint64(p2 + ((e2 >> 8) & 0xFFFF))]
            c2 += tab[k2 + np.uint64(1)] * x[np.uint64(p2 + ((e2 >> 24) & 0xFFFF))]
            a3 += tab[k3] * x[np.uint64(p3 + ((e3 >> 8) & 0xFFFF))]
            c3 += tab[k3 + np.uint64(1)] * x[np.uint64(p3 + ((e3 >> 24) & 0xFFFF))]
            p0 += e0 >> E2_ADV_SHIFT
            p1 += e1 >> E2_ADV_SHIFT
            p2 += e2 >> E2_ADV_SHIFT
            p3 += e3 >> E2_ADV_SHIFT
        b0, p0, a0, e0 = _zone1(words, lut2, x, tab, 0, cols, b0, z0, p0, a0 + c0, e0)
        b1, p1, a1, e1 = _zone1(words, lut2, x, tab, 32, cols, b1, z1, p1, a1 + c1, e1)
        b2, p2, a2, e2 = _zone1(words, lut2, x, tab, 64, cols, b2, z2, p2, a2 + c2, e2)
        b3, p3, a3, e3 = _zone1(words, lut2, x, tab, 96, cols, b3, z3, p3, a3 + c3, e3)
        a0, s0 = _finish1(words, lut, x, tab, 0, cols, b0, n0, p0, a0, e0)
        a1, s1 = _finish1(words, lut, x, tab, 32, cols, b1, n1, p1, a1, e1)
        a2, s2 = _finish1(words, lut, x, tab, 64, cols, b2, n2, p2, a2, e2)
        a3, s3 = _finish1(words, lut, x, tab, 96, cols, b3, n3, p3, a3, e3)
        out[r + 0] = a0 + base0 * xsum
        out[r + 1] = a1 + base1 * xsum
        out[r + 2] = a2 + base2 * xsum
        out[r + 3] = a3 + base3 * xsum
        if s0:
            return (r + 0) * 4 + s0
        if s1:
            return (r + 1) * 4 + s1
        if s2:
            return (r + 2) * 4 + s2
        if s3:
            return (r + 3) * 4 + s3
        r += 4
    while r < r1:
        base = _row_pairs(m, lv16, lv32, r, tab, 0)
        b, n = _row_bits(bo, rd, g, rows, total, r)
        b, p, a, e = _zone1(words, lut2, x, tab, 0, cols, b, n - 12, np.int64(0), np.float32(0), np.int64(0))
        a, s = _finish1(words, lut, x, tab, 0, cols, b, n, p, a, e)
        out[r] = a + base * xsum
        if s:
            return r * 4 + s
        r += 1
    return -1


@njit(fastmath={"contract"}, nogil=True)
def _item_tn(m, words, lut, lut2, bo, rd, lv16, lv32, xt, out, ntok, tp, r0, r1):  # pragma: no cover
    """Rows [r0, r1) at batch T: ``xt [cols + pad + 1, Tp]``, ``out [T * rows]``; -1 or bad row*4 + status."""
    rows, cols, g, total = m[M_ROWS], m[M_COLS], m[M_BLOCK_LOG2], m[M_BITS]
    xpad = m[M_XPAD]
    tab = np.zeros(32, dtype=np.float32)
    acc = np.empty(tp, dtype=np.float32)
    for r in range(r0, r1):
        base = _row_pairs(m, lv16, lv32, r, tab, 0)
        bit, end = _row_bits(bo, rd, g, rows, total, r)
        end12 = end - 12
        for t in range(tp):
            acc[t] = 0.0
        pos = np.int64(0)
        e = np.int64(0)
        while (cols - 1 - pos) | (end12 - bit) >= 0:
            e = _entry2(words, lut2, bit)
            bit += e & 15
            k = np.uint64(2 * ((e >> 4) & 15))
            wa, wb = tab[k], tab[k + np.uint64(1)]
            xa = xt[np.uint64(pos + ((e >> 8) & 0xFFFF))]  # [tp]: row views, so the token loop vectorizes
            xb = xt[np.uint64(pos + ((e >> 24) & 0xFFFF))]
            for t in range(tp):
                acc[t] += wa * xa[t] + wb * xb[t]
            pos += e >> E2_ADV_SHIFT
        if pos >= cols:
            s = _walk(words, lut, cols, bit - (e & 15), end, pos - (e >> E2_ADV_SHIFT))
        else:
            while pos < cols and bit < end:
                e = _entry(words, lut, bit)
                bit += e & LEN_MASK
                pos += e >> ADV_SHIFT
                w = tab[np.uint64(2 * ((e >> VAL_SHIFT) & 3))]
                xr = xt[np.uint64(min(pos - 1, cols))]
                for t in range(tp):
                    acc[t] += w * xr[t]
            s = _status(bit, end, pos, e, cols)
        for t in range(ntok):
            out[t * rows + r] = acc[t] + base * xt[cols + xpad, t]
        if s:
            return r * 4 + s
    return -1


@njit(fastmath={"contract"}, nogil=True)
def _item(m, x, out, ntok, tp, r0, r1):  # pragma: no cover - compiled
    """Rows [r0, r1) of matrix ``m`` (a registry row) for the packed input x into ``out [ntok * rows]``."""
    rows, cols = m[M_ROWS], m[M_COLS]
    nlev = rows * (4 if m[M_INT2] else 2)
    words = numba.carray(_voidptr(m[M_STREAM]), (m[M_BITS] + 31) // 32 + 1, np.uint32)
    lut = numba.carray(_voidptr(m[M_LUT]), LUT_MASK + 1, np.int32)
    lut2 = numba.carray(_voidptr(m[M_LUT2]), LUT_MASK + 1, np.int64)
    g = m[M_BLOCK_LOG2]
    bo = numba.carray(_voidptr(m[M_BLOCK_OFFSETS]), ((rows + (1 << g) - 1) >> g) + 1, np.uint32)
    rd = numba.carray(_voidptr(m[M_ROW_DELTAS]), rows, np.uint16)
    lv16 = numba.carray(_voidptr(m[M_LEVELS]), nlev, np.uint16)
    lv32 = numba.carray(_voidptr(m[M_LEVELS]), nlev if m[M_LEVELS_F16] == 0 else 0, np.float32)
    if ntok == 1:
        return _item_t1(m, words, lut, lut2, bo, rd, lv16, lv32, x, out, r0, r1)
    xt = x.reshape((cols + m[M_XPAD] + 1, tp))
    return _item_tn(m, words, lut, lut2, bo, rd, lv16, lv32, xt, out, ntok, tp, r0, r1)


@njit(inline="always")
def _pack(m, c, xbuf):  # pragma: no cover - compiled
    """Copy call c's input ``[t, cols]`` (any element strides) into ``xbuf`` as ``[cols + pad + 1, Tp]``:
    tokens minor, zero rows cols..cols+pad-1 (read by escapes and corrupt values: no bounds clamp per
    symbol), last row = the token's sum over cols (int2's background level)."""
    cols, pad = m[M_COLS], m[M_XPAD]
    t, tp, s0, s1, off = c[C_TOKENS], c[C_TPAD], c[C_XS0], c[C_XS1], c[C_XOFF]
    src = numba.carray(_voidptr(c[C_XADDR]), (t - 1) * s0 + (cols - 1) * s1 + 1, np.float32)
    n = (cols + pad + 1) * tp
    for k in range(off, off + n):
        xbuf[k] = 0.0
    for i in range(t):
        xsum = 0.0
        for j in range(cols):
            v = src[np.uint64(i * s0 + j * s1)]
            xbuf[np.uint64(off + j * tp + i)] = v
            xsum += v
        if m[M_INT2]:  # (ternary: left 0, so an overflowing sum cannot turn 0 * inf into nan)
            xbuf[off + (cols + pad) * tp + i] = xsum


@njit(cache=True, parallel=True, nogil=True)
def matmul_call(reg, calls, xbuf, out, native, native_min_tokens):  # pragma: no cover - compiled
    """``out[c] = x_c @ W_c^T`` for each row of ``calls [n, NCALL]`` (registry slot, tokens, input address
    and element strides, offsets into ``xbuf`` and ``out``) over the matrices of ``reg [slots, NMETA]``.

    Work items are (call, block of the matrix's M_RPI rows), run with dynamic scheduling when called under
    ``numba.parallel_chunksize(1)`` (set from Python: setting it in here would make the function
    uncacheable), so uneven rows and busy cores balance out. ``native``: 0, or the address of the native
    kernel (cpu_lanes.c), which then computes the items of every call with at least ``native_min_tokens``
    tokens, in blocks of M_RPI_LANES rows. Returns (call, row * 4 + status) of the first bad row, or (-1, -1).
    """
    n = calls.shape[0]
    first = np.empty(n + 1, dtype=np.int64)  # first work item of each call
    first[0] = 0
    for c in range(n):
        m = reg[calls[c, C_SLOT]]
        t = calls[c, C_TOKENS]
        if t > 0:
            _pack(m, calls[c], xbuf)
        rpi = m[M_RPI_LANES] if native != 0 and t >= native_min_tokens else m[M_RPI]
        first[c + 1] = first[c] + (0 if t == 0 else (m[M_ROWS] + rpi - 1) // rpi)
    total = first[n]
    status = np.empty(total, dtype=np.int64)
    for i in prange(total):
        c = np.searchsorted(first, i, side="right") - 1
        m = reg[calls[c, C_SLOT]]
        t, tp = calls[c, C_TOKENS], calls[c, C_TPAD]
        lanes = native != 0 and t >= native_min_tokens
        rows, rpi = m[M_ROWS], m[M_RPI_LANES] if lanes else m[M_RPI]
        r0 = (i - first[c]) * rpi
        xo = calls[c, C_XOFF]
        oo = calls[c, C_OOFF]
        r1 = min(r0 + rpi, rows)
        if lanes:
            status[i] = _call_native(native, np.int64(m.ctypes.data), np.int64(xbuf.ctypes.data + 4 * xo),
                                     np.int64(out.ctypes.data + 4 * oo), t, tp, r0, r1)
        else:
            x = xbuf[xo: xo + (m[M_COLS] + m[M_XPAD] + 1) * tp]
            status[i] = _item(m, x, out[oo: oo + t * rows], t, tp, r0, r1)
    for c in range(n):
        for i in range(first[c], first[c + 1]):
            if status[i] >= 0:
                return c, status[i]
    return -1, -1


@njit(cache=True, parallel=True, nogil=True)
def lanes_call(reg, calls, xbuf, out, native):  # pragma: no cover - compiled
    """``matmul_call`` with every item computed by the native kernel at address ``native`` (nonzero).

    The same packing, items and result; but it leaves out the numba item kernels, whose compile takes ~30 s
    on a 2-core machine where this one takes a few (the first ``qmoe generate`` would wait for it)."""
    n = calls.shape[0]
    first = np.empty(n + 1, dtype=np.int64)  # first work item of each call
    first[0] = 0
    for c in range(n):
        m = reg[calls[c, C_SLOT]]
        t = calls[c, C_TOKENS]
        if t > 0:
            _pack(m, calls[c], xbuf)
        first[c + 1] = first[c] + (0 if t == 0 else (m[M_ROWS] + m[M_RPI_LANES] - 1) // m[M_RPI_LANES])
    total = first[n]
    status = np.empty(total, dtype=np.int64)
    for i in prange(total):
        c = np.searchsorted(first, i, side="right") - 1
        m = reg[calls[c, C_SLOT]]
        r0 = (i - first[c]) * m[M_RPI_LANES]
        r1 = min(r0 + m[M_RPI_LANES], m[M_ROWS])
        xa = np.int64(xbuf.ctypes.data + 4 * calls[c, C_XOFF])
        oa = np.int64(out.ctypes.data + 4 * calls[c, C_OOFF])
        t, tp = calls[c, C_TOKENS], calls[c, C_TPAD]
        status[i] = _call_native(native, np.int64(m.ctypes.data), xa, oa, t, tp, r0, r1)
    for c in range(n):
        for i in range(first[c], first[c + 1]):
            if status[i] >= 0:
                return c, status[i]
    return -1, -1
