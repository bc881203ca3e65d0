"""Format version 2 of an encoded matrix: the same stream, with per-row metadata a small expert can afford.

Version 1 spends about 49 bits per ternary row besides its codewords (fp16 lo/hi, a uint16 row delta, a
share of uint32 block offsets); on 192-wide experts that is a quarter bit per weight. Version 2 stores, per
row, three small unsigned integers at a fixed width chosen per matrix (docs/format.md section 4b):

    field 0  row length in bits minus the matrix's shortest row          -> row starts (prefix sum)
    field 1  ternary: lo's exponent - base + 1 (0: lo = 0); int2: scale exponent - base
    field 2  ternary: hi's exponent - base + 1 (0: hi = 0); int2: zero point - base

Blob (little-endian, each part starting at a multiple of 4 bytes except the last two)::

    header   40 bytes (HEADER2 below)
    stream   uint32 [ceil(bits / 32) + 1]      exactly as in version 1 (codewords, one zero guard word)
    rowmeta  uint8  [ceil(rows * sum(widths) / 8)]   field 0 of every row, then field 1, then field 2;
                                                     each value LSB-first, bit i of the part = bit i & 7
                                                     of byte i >> 3; padding bits zero
    lengths  uint8  [ceil(nsym / 2)]           code length of symbol s in the low (s even) or high nibble

Parsing (``parse``) expands these into the arrays every decoder reads (``block_offsets``, ``row_deltas``,
float32 ``levels``; ``EncodedMatrix`` of version 1's in-memory form); the stream stays a view of the blob.
"""

from __future__ import annotations

import zlib

import numpy as np

from qmoe.codec import levels as lv
from qmoe.errors import FormatError

VERSION = 2
HEADER2 = np.dtype([
    ("magic", "<u4"), ("version", "u1"), ("kind", "u1"), ("background", "u1"), ("level_steps", "u1"),
    ("rows", "<u4"), ("cols", "<u4"), ("bits", "<u4"), ("crc", "<u4"), ("run_limit", "<u2"),
    ("widths", "u1", (3,)), ("reserved", "u1"), ("len_base", "<u4"), ("level_base", "<i2", (2,)),
    ("reserved2", "<u2"),
])
HEADER2_BYTES = HEADER2.itemsize  # 40
_CRC = slice(HEADER2.fields["crc"][1], HEADER2.fields["crc"][1] + 4)  # its bytes in the header
MAX_WIDTHS = (32, 16, 16)  # a row length fits 32 bits; a level field never needs more than 16


def _bad(msg: str) -> FormatError:
    return FormatError(f"encoded matrix is corrupt: {msg}")


def _pack(fields: list[np.ndarray], widths: list[int]) -> np.ndarray:
    """Fields ``[rows] int64`` (each ``< 2**width``) packed field after field, LSB-first: ``uint8 [n]``."""
    parts = [((f[:, None] >> np.arange(w)) & 1).astype(np.uint8).reshape(-1)
             for f, w in zip(fields, widths, strict=True)]
    return np.packbits(np.concatenate(parts) if parts else np.zeros(0, np.uint8), bitorder="little")


def _unpack(raw: np.ndarray, rows: int, widths: list[int]) -> list[np.ndarray]:
    bits = np.unpackbits(raw, bitorder="little")
    out, at = [], 0
    for w in widths:
        b = bits[at : at + rows * w].reshape(rows, w).astype(np.int64)
        out.append(b @ (np.int64(1) << np.arange(w, dtype=np.int64)))
        at += rows * w
    if bits[at:].any():
        raise _bad("row-metadata padding bits are not zero")
    return out


def _width(v: np.ndarray) -> int:
    return int(v.max(initial=0)).bit_length()


def level_fields(kind: str, levels: np.ndarray, steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Per-row level fields ``[rows] int64`` (>= 0) and their bases, for levels on the grid."""
    if kind == "ternary":
        e = lv.ternary_exponents(levels, steps)  # [rows, 2]
        nz = e[e != lv.ZERO]
        base = int(nz.min()) if nz.size else 0
        f = np.where(e == lv.ZERO, 0, e - base + 1)
        return [f[:, 0], f[:, 1]], [base, base]
    e, z = lv.int2_params(levels, steps)
    return [e - int(e.min()), z - int(z.min())], [int(e.min()), int(z.min())]


def blob_size(rows: int, bits: int, nsym: int, widths: tuple[int, ...]) -> int:
    return HEADER2_BYTES + 4 * ((bits + 31) // 32 + 1) + (rows * sum(widths) + 7) // 8 + (nsym + 1) // 2


def build(kind_id: int, kind: str, shape: tuple[int, int], background: int, run_limit: int, bits: int,
          stream: np.ndarray, row_lengths: np.ndarray, levels: np.ndarray, lengths: np.ndarray,
          steps: int) -> np.ndarray:
    """The version-2 blob ``uint8 [n]`` of a matrix (levels must be on the grid: ``levels.on_grid``)."""
    rows = shape[0]
    len_base = int(row_lengths.min())
    fields, bases = level_fields(kind, levels, steps)
    fields = [row_lengths.astype(np.int64) - len_base, *fields]
    widths = [_width(f) for f in fields]
    assert all(w <= m for w, m in zip(widths, MAX_WIDTHS, strict=True)), f"widths {widths} > {MAX_WIDTHS}"
    h = np.zeros((), dtype=HEADER2)
    h["magic"], h["version"], h["kind"], h["background"] = 0x31434D51, VERSION, kind_id, background
    h["level_steps"], h["rows"], h["cols"], h["bits"] = steps, rows, shape[1], bits
    h["run_limit"], h["widths"], h["len_base"], h["level_base"] = run_limit, widths, len_base, bases
    nib = np.zeros(2 * ((len(lengths) + 1) // 2), dtype=np.uint8)
    nib[: len(lengths)] = lengths
    parts = [np.ascontiguousarray(stream, dtype="<u4").view(np.uint8), _pack(fields, widths),
             (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)]
    blob = np.concatenate([np.frombuffer(h.tobytes(), np.uint8), *parts])
    assert blob.size == blob_size(rows, bits, len(lengths), tuple(widths))
    crc = zlib.crc32(blob)
    blob[_CRC] = np.frombuffer(np.uint32(crc).astype("<u4").tobytes(), np.uint8)
    return blob


def header_of(b: np.ndarray) -> np.void:
    """The parsed header of blob ``b`` (``uint8 [>= 40]``)."""
    return np.frombuffer(b[:HEADER2_BYTES].tobytes(), dtype=HEADER2)[0]


def nbytes_of(h: np.void) -> int:
    nsym = (2 if int(h["kind"]) == 0 else 3) * int(h["run_limit"]) + 2
    return blob_size(int(h["rows"]), int(h["bits"]), nsym, tuple(int(w) for w in h["widths"]))


def parse(b: np.ndarray, verify: bool, copy: bool, padded: bool) -> dict:
    """The fields of version-2 blob ``b`` expanded to version 1's in-memory arrays, as keyword arguments
    for ``EncodedMatrix`` (plus ``kind_id``, ``run_limit`` and ``blob``, the blob without padding: a view
    of ``b`` unless ``copy``); FormatError naming the field or row that is wrong. ``EncodedMatrix.validate``
    checks the rest (prefix code, stream padding). The stream is a view of ``blob``: a mapped shard's
    pages are read by the kernels in place, and ``nbytes`` needs no rebuild."""
    from qmoe.codec.format import KINDS, MAX_BLOCK_LOG2, MAX_COLS, block_log2_for

    if b.size < HEADER2_BYTES:
        raise _bad(f"a version-2 blob holds at least {HEADER2_BYTES} bytes, got {b.size}")
    h = header_of(b)
    kind_id, rows, cols, bits = int(h["kind"]), int(h["rows"]), int(h["cols"]), int(h["bits"])
    steps, run_limit, widths = int(h["level_steps"]), int(h["run_limit"]), [int(w) for w in h["widths"]]
    if kind_id >= len(KINDS):
        raise _bad(f"unknown kind id {kind_id}")
    kind = KINDS[kind_id]
    if not (1 <= rows and 1 <= cols <= MAX_COLS):
        raise _bad(f"shape ({rows}, {cols}) out of range")
    if not 1 <= run_limit <= 4096 or not 1 <= steps <= lv.MAX_STEPS:
        raise _bad(f"run limit {run_limit} or level steps {steps} out of range")
    if int(h["background"]) > (3 if kind == "int2" else 0):
        raise _bad(f"background code {int(h['background'])} invalid for {kind}")
    wide = any(w > m for w, m in zip(widths, MAX_WIDTHS, strict=True))
    if wide or int(h["reserved"]) or int(h["reserved2"]):
        raise _bad(f"row-metadata field widths {widths} out of range (at most {list(MAX_WIDTHS)})")
    need = nbytes_of(h)
    if need != b.size and not (padded and need < b.size < need + 8 and not b[need:].any()):
        raise _bad(f"blob holds {b.size} bytes, its header implies {need}")
    if verify:
        h0 = b[:need].copy()
        h0[_CRC] = 0
        if zlib.crc32(h0) != int(h["crc"]):
            raise FormatError("encoded matrix fails its crc32 check: the data is corrupt")
    # One copy of the blob (or none): the stream is a view of it, and so is the matrix's to_blob().
    b = b[:need].copy() if copy else b[:need]
    at = HEADER2_BYTES
    nwords = (bits + 31) // 32 + 1
    stream = b[at : at + 4 * nwords].view("<u4")
    at += 4 * nwords
    nmeta = (rows * sum(widths) + 7) // 8
    f_len, f1, f2 = _unpack(b[at : at + nmeta], rows, widths)
    at += nmeta
    nib = b[at:need]
    nsym = (2 if kind == "ternary" else 3) * run_limit + 2
    lengths = np.empty(2 * nib.size, dtype=np.uint8)
    lengths[0::2], lengths[1::2] = nib & 15, nib >> 4
    if lengths[nsym:].any():
        raise _bad("code-length padding nibble is not zero")
    lengths = lengths[:nsym].copy()

    # Row locations: lengths -> starts; every row holds at least one bit and they add up to the stream.
    len_base = int(h["len_base"])
    row_len = f_len + len_base
    if len_base < 1:
        raise _bad("row-length base is 0: every row holds at least one codeword bit")
    starts = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(row_len, out=starts[1:])
    if int(starts[-1]) != bits:
        raise _bad(f"row lengths add up to {int(starts[-1])} bits, the stream holds {bits}")
    g = block_log2_for(starts)
    assert g <= MAX_BLOCK_LOG2
    block_starts = starts[:-1][:: 1 << g]
    block_offsets = np.concatenate([block_starts, [bits]]).astype("<u4")
    row_deltas = (starts[:-1] - np.repeat(block_starts, 1 << g)[:rows]).astype("<u2")

    # Levels: fields -> exponents -> float32.
    lo_e, hi_e = lv.exponent_range(steps)
    base1, base2 = int(h["level_base"][0]), int(h["level_base"][1])
    if kind == "ternary":
        exps = np.stack([np.where(f1 == 0, lv.ZERO, f1 + base1 - 1),
                         np.where(f2 == 0, lv.ZERO, f2 + base2 - 1)], -1)  # [rows, 2]
        bad = (exps != lv.ZERO) & ((exps < lo_e) | (exps > hi_e))
        if bad.any():
            r, j = np.argwhere(bad)[0]
            raise _bad(f"row {int(r)}: {('lo', 'hi')[int(j)]} level exponent {int(exps[r, j])} out of range "
                       f"[{lo_e}, {hi_e}]")
        levels = lv.ternary_values(exps, steps)
    else:
        e, z = f1 + base1, f2 + base2
        bad_e, bad_z = (e < lo_e) | (e > hi_e), (z < 0) | (z > 3)
        if bad_e.any():
            r = int(np.argmax(bad_e))
            raise _bad(f"row {r}: level scale exponent {int(e[r])} out of range [{lo_e}, {hi_e}]")
        if bad_z.any():
            r = int(np.argmax(bad_z))
            raise _bad(f"row {r}: level zero point {int(z[r])} out of range [0, 3]")
        levels = lv.int2_values(e, z, steps)
    return {"kind_id": kind_id, "shape": (rows, cols), "background": int(h["background"]),
            "run_limit": run_limit, "lengths": lengths, "stream": stream, "block_log2": g,
            "block_offsets": block_offsets, "row_deltas": row_deltas, "levels": levels, "total_bits": bits,
            "level_steps": steps, "blob": b}
