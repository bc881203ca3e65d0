"""One corpus of corrupt encoded matrices, shared by the tests of every decoder, and the expected outcome of
each under the codec's row-status rule (qmoe.codec.decode: the reference decoder, one row at a time).

Each entry is an ``EncodedMatrix`` whose arrays are consistent (so ``to_arrays`` gives it a valid crc32: a
checksum does not protect against a crafted file), or, for the "layout" entries, one built directly with bad
offsets that every decoder must refuse before it reads the stream. Mutations work on the stream's bits, row by
row: truncated rows, extended rows, flipped bits, moved row boundaries, other widths in the header, another
code table in the header. Each kind comes twice: as a format-1 matrix (levels off format 2's grid) and as a
format-2 one, whose every mutation is written as a version-2 blob and parsed back (``rebuild``), so the
decoders read the arrays that version 2's compact row lengths and levels expand to.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qmoe import codec
from qmoe.codec.decode import ROW_OK, row_error, row_status
from qmoe.codec.format import EncodedMatrix
from qmoe.codec.levels import round_levels
from qmoe.errors import FormatError


def bases() -> dict[str, EncodedMatrix]:
    """Small sound matrices with the rows that reach every branch: empty, escapes, full, last column set."""
    rng = np.random.default_rng(24)
    t = rng.choice([-1, 0, 1], size=(7, 45), p=[0.1, 0.8, 0.1]).astype(np.int8)
    t[0, -1] = -1  # a value in the last column: one column less in the header puts it past the width
    t[1] = 0  # all background: one end-of-row symbol (or escapes)
    t[2] = 0
    t[2, -1] = 1  # a long run (escapes), then a value in the last column
    t[3] = rng.choice([-1, 1], size=45)  # no background at all
    ternary = codec.encode_ternary(t, -rng.random(7) - 0.1, rng.random(7) + 0.1)
    q = rng.choice(4, size=(6, 33), p=[0.08, 0.06, 0.8, 0.06]).astype(np.uint8)
    q[1] = 2
    q[4, -1] = 0
    int2 = codec.encode_int2(q, rng.standard_normal((6, 4)).astype(np.float32))
    assert ternary.version == int2.version == 1
    lv2 = round_levels(np.stack([-rng.random(7) - 0.1, rng.random(7) + 0.1], 1), "ternary")
    lv2[5, 0] = 0.0  # a row without negative level: format 2's zero code
    ternary2 = codec.encode_ternary(t, lv2[:, 0], lv2[:, 1], version=2)
    int2_2 = codec.encode_int2(q, round_levels(np.sort(rng.standard_normal((6, 4)), 1), "int2"), version=2)
    return {"ternary": ternary, "int2": int2, "ternary-v2": ternary2, "int2-v2": int2_2}


def row_bits(enc: EncodedMatrix) -> list[np.ndarray]:
    """Each row's stream bits (uint8 0/1), in order."""
    bits = np.unpackbits(enc.stream.astype("<u4").view(np.uint8), bitorder="little")
    s = enc.row_starts()
    return [bits[s[r]: s[r + 1]].copy() for r in range(enc.shape[0])]


def rebuild(enc: EncodedMatrix, rows: list[np.ndarray], **changes) -> EncodedMatrix:
    """A consistent matrix holding these row bits (each >= 1 bit), with fresh offsets; ``changes`` replace
    fields (shape, table, ...)."""
    assert all(len(r) >= 1 for r in rows), "every row holds at least one bit"
    lens = np.array([len(r) for r in rows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    total = int(starts[-1])
    bits = np.zeros(((total + 31) // 32 + 1) * 32, dtype=np.uint8)  # one zero guard word
    bits[:total] = np.concatenate(rows)
    stream = np.packbits(bits, bitorder="little").view("<u4").copy()
    g = enc.block_log2
    block_starts = starts[:-1][:: 1 << g]
    block_offsets = np.concatenate([block_starts, [total]]).astype("<u4")
    row_deltas = (starts[:-1] - np.repeat(block_starts, 1 << g)[: len(rows)]).astype("<u2")
    fields = dict(stream=stream, block_offsets=block_offsets, row_deltas=row_deltas, total_bits=total,
                  _lut=None, _blob=None)
    out = dataclasses.replace(enc, **{**fields, **changes})
    if out.version == 2:  # through the version-2 blob: row lengths and levels as that format stores them
        out = EncodedMatrix.from_blob(out.to_blob())
    return out


def _mutations(enc: EncodedMatrix, label: str) -> dict[str, EncodedMatrix]:
    out: dict[str, EncodedMatrix] = {}
    rows = row_bits(enc)
    n = len(rows)
    rng = np.random.default_rng(len(label))
    for r in sorted({0, n // 2, n - 1}):
        def with_row(new: np.ndarray, r: int = r) -> EncodedMatrix:
            return rebuild(enc, [new if i == r else b for i, b in enumerate(rows)])

        for k in (1, 3):  # truncated: bits end before the width (or inside a codeword)
            if len(rows[r]) > k:
                out[f"{label}/truncate row {r} by {k}"] = with_row(rows[r][:-k])
        for tail in ([0], [1], list(rng.integers(0, 2, 5))):  # extended
            longer = np.concatenate([rows[r], tail]).astype(np.uint8)
            out[f"{label}/extend row {r} by {tail}"] = with_row(longer)
        for j in sorted({0, len(rows[r]) // 2, len(rows[r]) - 1}):  # flipped bits
            flipped = rows[r].copy()
            flipped[j] ^= 1
            out[f"{label}/flip row {r} bit {j}"] = with_row(flipped)
        if r + 1 < n:  # crafted offsets: one bit moved across the boundary of rows r and r + 1
            a, b = rows[r], rows[r + 1]
            if len(a) > 1:
                moved = [*rows[:r], a[:-1], np.concatenate([a[-1:], b]), *rows[r + 2:]]
                out[f"{label}/boundary {r}|{r + 1} one bit earlier"] = rebuild(enc, moved)
            if len(b) > 1:
                moved = [*rows[:r], np.concatenate([a, b[:1]]), b[1:], *rows[r + 2:]]
                out[f"{label}/boundary {r}|{r + 1} one bit later"] = rebuild(enc, moved)
    rows_, cols = enc.shape
    for d in (-1, 1, 7):  # crafted headers: another width for the same stream
        out[f"{label}/header cols {cols + d}"] = rebuild(enc, rows, shape=(rows_, cols + d))
    # crafted header: another (valid) code table for the same stream
    other = codec.build_table([np.zeros((1, cols), np.int8 if enc.kind == "ternary" else np.uint8)], enc.kind)
    if other.nsym == enc.table.nsym:
        out[f"{label}/header other table"] = rebuild(enc, rows, table=other)
    lengths = enc.table.lengths.copy()
    order = np.argsort(lengths)
    lengths[order[-1]], lengths[order[-2]] = lengths[order[-2]], lengths[order[-1]]  # still a prefix code
    out[f"{label}/header swapped code lengths"] = rebuild(
        enc, rows, table=dataclasses.replace(enc.table, lengths=lengths))
    lengths = enc.table.lengths.copy()
    lengths[np.argmax(lengths)] = 0  # a codeword removed: the code is incomplete, some prefixes are invalid
    out[f"{label}/header codeword removed"] = rebuild(
        enc, rows, table=dataclasses.replace(enc.table, lengths=lengths))
    lengths = enc.table.lengths.copy()
    lengths[np.argmin(np.where(lengths > 0, lengths, 99))] = 0  # the shortest (most used) codeword removed
    out[f"{label}/header shortest codeword removed"] = rebuild(
        enc, rows, table=dataclasses.replace(enc.table, lengths=lengths))
    # crafted offsets that do not fit the stream: built directly, never through from_arrays
    good = rebuild(enc, rows)
    rd = good.row_deltas.copy()
    rd[1] = rd[1] + 2 * len(rows[1]) + 40 if good.block_log2 else rd[1]
    bo = good.block_offsets.copy()
    bo[-1] += 64
    out[f"{label}/layout stream shorter than the offsets"] = dataclasses.replace(good, block_offsets=bo)
    bo = good.block_offsets.copy()
    bo[len(bo) // 2] = 2**31
    out[f"{label}/layout block offset far past the stream"] = dataclasses.replace(good, block_offsets=bo)
    if good.block_log2:
        out[f"{label}/layout row delta past the next row"] = dataclasses.replace(good, row_deltas=rd)
    out[f"{label}/layout stream words missing"] = dataclasses.replace(good, stream=good.stream[:1].copy())
    return out


def corpus() -> dict[str, EncodedMatrix]:
    """label -> matrix; new objects on every call (decoders cache per matrix object)."""
    out: dict[str, EncodedMatrix] = {}
    for label, enc in bases().items():
        out[f"{label}/sound"] = rebuild(enc, row_bits(enc))
        out.update(_mutations(enc, label))
    return out


def expected(enc: EncodedMatrix) -> tuple[str, str]:
    """The rule's outcome: ("ok", "") or ("error", the exact message every decoder must raise)."""
    try:
        enc.validate()
    except FormatError as err:
        return "error", str(err)
    for r in range(enc.shape[0]):
        status = row_status(enc, r)
        if status != ROW_OK:
            return "error", str(row_error(enc, r, status))
    return "ok", ""


def outcome(fn) -> tuple[str, object]:
    """("ok", the result) or ("error", the FormatError's message)."""
    try:
        return "ok", fn()
    except FormatError as err:
        return "error", str(err)
