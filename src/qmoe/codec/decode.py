"""Decoders: the slow, obviously correct reference (numpy + Python) and the fast numba decode-to-dense.

Every fast kernel (here and in qmoe.kernels) is tested against ``decode_reference``: it reads the stream one
bit at a time and matches canonical codewords from the code lengths alone, sharing no code with the fast
path beyond ``EncodedMatrix`` validation.
"""

from __future__ import annotations

import numpy as np

from qmoe.codec import huffman
from qmoe.codec.format import MAX_CODE_LEN, EncodedMatrix
from qmoe.errors import FormatError

Decoded = tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray]


def _levels_out(enc: EncodedMatrix, codes: np.ndarray) -> Decoded:
    lv = enc.levels.astype(np.float32)
    if enc.kind == "ternary":
        return codes, lv[:, 0].copy(), lv[:, 1].copy()
    return codes, lv


def _row_error(enc: EncodedMatrix, row: int, what: str) -> FormatError:
    return FormatError(f"encoded {enc.kind} matrix {enc.shape} is corrupt: row {row} {what}")


def decode_reference(enc: EncodedMatrix) -> np.ndarray:
    """Codes ``[rows, cols]`` (int8 ternary / uint8 int2), decoded bit by bit. Slow: for tests and oracles."""
    rows, cols = enc.shape
    table = enc.table
    k, run_limit, bg = table.n_values, table.run_limit, table.background
    # canonical codeword (length, MSB-first value) -> symbol
    codewords = huffman.canonical_codes(table.lengths)
    book = {(int(table.lengths[s]), int(codewords[s])): s for s in np.flatnonzero(table.lengths).tolist()}
    bits = np.unpackbits(enc.stream.astype("<u4").view(np.uint8), bitorder="little")  # stream bit i = bits[i]
    if enc.kind == "ternary":
        out = np.zeros((rows, cols), dtype=np.int8)
        value_code = {1: -1, 2: 1}
    else:
        out = np.full((rows, cols), bg, dtype=np.uint8)
        value_code = {v: (bg + v) & 3 for v in (1, 2, 3)}
    starts = enc.row_starts()
    for r in range(rows):
        b, end, pos = int(starts[r]), int(starts[r + 1]), 0
        while pos < cols:
            code, length = 0, 0
            while (length, code) not in book:
                if length == MAX_CODE_LEN:
                    raise _row_error(enc, r, "holds an invalid codeword")
                if b >= end:
                    raise _row_error(enc, r, "runs past its bits")
                code, length, b = (code << 1) | int(bits[b]), length + 1, b + 1
            sym = book[(length, code)]
            if sym == k * run_limit + 1:  # end of row: the rest is background
                break
            if sym == k * run_limit:  # escape: run_limit background codes; past the row's end it ends the row
                pos += run_limit
                continue
            pos += sym // k
            if pos >= cols:
                raise _row_error(enc, r, "runs past the row width")
            out[r, pos] = value_code[sym % k + 1]
            pos += 1
        if b != end:
            raise _row_error(enc, r, "does not end where the next row starts")
    return out


def _fast(enc: EncodedMatrix, rowtab: np.ndarray, out: np.ndarray) -> np.ndarray:
    from qmoe.codec import _numba

    with _numba.threads_for(out.size):
        bad, status = _numba.decode_rows(enc.stream, enc.row_starts(), enc.lut, rowtab, out)
    if bad >= 0:
        raise _row_error(enc, int(bad), _numba.STATUS_TEXT[int(status)])
    return out


def decode_dense(enc: EncodedMatrix) -> np.ndarray:
    """Codes ``[rows, cols]`` (int8 ternary / uint8 int2) with the parallel numba decoder."""
    if enc.kind == "ternary":
        rowtab = np.array([[0, -1, 1, 0]], dtype=np.int8)
    else:
        rowtab = np.array([[(enc.table.background + v) & 3 for v in range(4)]], dtype=np.uint8)
    return _fast(enc, rowtab, np.empty(enc.shape, dtype=rowtab.dtype))


def _dequant_table(enc: EncodedMatrix) -> np.ndarray:
    """``[rows, 4] float32``: the level written for symbol value v (v = 0: background)."""
    lv = enc.levels.astype(np.float32)
    rows = enc.shape[0]
    if enc.kind == "ternary":
        return np.concatenate([np.zeros((rows, 1), np.float32), lv, np.zeros((rows, 1), np.float32)], axis=1)
    order = [(enc.table.background + v) & 3 for v in range(4)]
    return np.ascontiguousarray(lv[:, order])


def dequantize_fast(enc: EncodedMatrix) -> np.ndarray:
    """Float32 weights ``[rows, cols]`` with the parallel numba decoder."""
    return _fast(enc, _dequant_table(enc), np.empty(enc.shape, dtype=np.float32))


def decode(enc: EncodedMatrix, backend: str = "numba") -> Decoded:
    """``(codes, lo, hi)`` for ternary or ``(codes, levels)`` for int2, equal to the encoder's input.

    ``backend`` is "numba" (fast) or "reference". Levels come back as float32. Raises FormatError if the
    stream is corrupt.
    """
    if backend == "reference":
        return _levels_out(enc, decode_reference(enc))
    if backend != "numba":
        raise ValueError(f"backend must be 'numba' or 'reference', got {backend!r}")
    return _levels_out(enc, decode_dense(enc))


def dequantize(enc: EncodedMatrix, backend: str = "numba") -> np.ndarray:
    """Float32 weights ``[rows, cols]``: level of each code (0 for a ternary zero)."""
    if backend == "reference":
        codes = decode_reference(enc)
        lv = enc.levels.astype(np.float32)
        if enc.kind == "ternary":
            lo, hi = lv[:, :1], lv[:, 1:]
            return np.where(codes == -1, lo, np.where(codes == 1, hi, np.float32(0))).astype(np.float32)
        return np.take_along_axis(lv, codes.astype(np.int64), axis=1)
    if backend != "numba":
        raise ValueError(f"backend must be 'numba' or 'reference', got {backend!r}")
    return dequantize_fast(enc)
