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


# -- the row-status rule ------------------------------------------------------------------------------------
# Every decoder (this reference, the numba decoder, the CPU kernels, the Triton preparation, decompress)
# classifies a corrupt row by this rule and reports the first bad row with ``row_error``. A row is decoded
# symbol by symbol from its first bit while fewer than ``cols`` columns are filled (docs/format.md):
ROW_OK = 0
ROW_PAST_BITS = 1  # the next codeword needs a bit at or past the row's end (its bits end before its width)
ROW_ENDS_SHORT = 2  # the row is complete (width filled, or end-of-row symbol) before its last bit
ROW_PAST_WIDTH = 3  # a symbol writes a value at a column >= cols
ROW_BAD_SYMBOL = 4  # the row's next 12 bits start no codeword of the table
ROW_STATUS_TEXT = {
    ROW_PAST_BITS: "runs past its bits (they end before its width)",
    ROW_ENDS_SHORT: "does not end where the next row starts (bits left over)",
    ROW_PAST_WIDTH: "writes a value past the row width",
    ROW_BAD_SYMBOL: "holds an invalid codeword",
}


def matrix_label(enc: EncodedMatrix) -> str:
    """How messages name a matrix: its tensor name when it was read from a shard, and kind and shape."""
    name = f"{enc.name!r} " if enc.name else ""
    return f"encoded matrix {name}({enc.kind} {enc.shape[0]}x{enc.shape[1]})"


def row_error(enc: EncodedMatrix, row: int, status: int) -> FormatError:
    """The one message for a corrupt row: matrix, row and what is wrong with it."""
    return FormatError(f"{matrix_label(enc)} is corrupt: row {row} {ROW_STATUS_TEXT[status]}; the file is "
                       "damaged or was not written by qmoe: re-run qmoe compress")


class _Book:
    """The reference decoder's view of a code: canonical codeword (length, MSB-first value) -> symbol."""

    def __init__(self, enc: EncodedMatrix):
        lengths = enc.table.lengths
        codewords = huffman.canonical_codes(lengths)
        self.map = {(int(lengths[s]), int(codewords[s])): s for s in np.flatnonzero(lengths).tolist()}
        # stream bit i = bits[i]
        self.bits = np.unpackbits(enc.stream.astype("<u4").view(np.uint8), bitorder="little")
        self.starts = enc.row_starts()


def _decode_row(enc: EncodedMatrix, book: _Book, r: int, out_row: np.ndarray | None, value_code: dict) -> int:
    """Decode row ``r`` bit by bit into ``out_row [cols]`` (if given); its status under the rule above."""
    cols = enc.shape[1]
    k, run_limit = enc.table.n_values, enc.table.run_limit
    b, end, pos = int(book.starts[r]), int(book.starts[r + 1]), 0
    while pos < cols:
        code, length = 0, 0
        while (length, code) not in book.map:
            if length == MAX_CODE_LEN:  # 12 bits inside the row and no codeword
                return ROW_BAD_SYMBOL
            if b >= end:
                return ROW_PAST_BITS
            code, length, b = (code << 1) | int(book.bits[b]), length + 1, b + 1
        sym = book.map[(length, code)]
        if sym == k * run_limit + 1:  # end of row: the rest is background
            break
        if sym == k * run_limit:  # escape: run_limit background codes; past the row's end it ends the row
            pos += run_limit
            continue
        pos += sym // k
        if pos >= cols:
            return ROW_PAST_WIDTH
        if out_row is not None:
            out_row[pos] = value_code[sym % k + 1]
        pos += 1
    return ROW_OK if b == end else ROW_ENDS_SHORT


def row_status(enc: EncodedMatrix, row: int) -> int:
    """Status of one row under the rule (the reference decoder on that row alone); ROW_OK if it decodes."""
    return _decode_row(enc, _Book(enc), row, None, {})


def raise_row_error(enc: EncodedMatrix, row: int) -> None:
    """For fast decoders that detect a bad row but do not classify it: the rule's message for ``row``.

    AssertionError if the reference finds the row sound (the fast decoder is then wrong, not the file)."""
    status = row_status(enc, row)
    assert status != ROW_OK, f"a fast decoder rejected row {row} of {matrix_label(enc)}, which decodes"
    raise row_error(enc, row, status)


def decode_reference(enc: EncodedMatrix) -> np.ndarray:
    """Codes ``[rows, cols]`` (int8 ternary / uint8 int2), decoded bit by bit. Slow: for tests and oracles.

    Raises ``row_error`` for the first row whose status is not ROW_OK."""
    enc.validate()
    rows, cols = enc.shape
    bg = enc.table.background
    if enc.kind == "ternary":
        out = np.zeros((rows, cols), dtype=np.int8)
        value_code = {1: -1, 2: 1}
    else:
        out = np.full((rows, cols), bg, dtype=np.uint8)
        value_code = {v: (bg + v) & 3 for v in (1, 2, 3)}
    book = _Book(enc)
    for r in range(rows):
        status = _decode_row(enc, book, r, out[r], value_code)
        if status != ROW_OK:
            raise row_error(enc, r, status)
    return out


def _fast(enc: EncodedMatrix, rowtab: np.ndarray, out: np.ndarray) -> np.ndarray:
    from qmoe.codec import _numba

    enc.validate()  # offsets and arrays inside their bounds: numba does not check them
    with _numba.threads_for(out.size):
        bad, status = _numba.decode_rows(enc.stream, enc.row_starts(), enc.lut, rowtab, out)
    if bad >= 0:
        raise row_error(enc, int(bad), int(status))
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
