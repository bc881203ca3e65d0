"""The encoded-matrix format: alphabet, code table, arrays, validation. Spec: docs/format.md.

Two versions share the in-memory form below (what every decoder reads). Version 1 stores these arrays as
they are; version 2 (``qmoe.codec.format2``, the default) stores the same stream with compact per-row
metadata (row lengths and levels as small integers) and expands it into these arrays when read.

A matrix ``[rows, cols]`` of small codes is written row by row as symbols (run of background codes, value),
each symbol a canonical prefix codeword of a code fitted to the matrix. Arrays (all little-endian):

    header        uint32 [16]                   fields below, with a crc32 over everything
    stream        uint32 [ceil(bits/32) + 1]    codewords, LSB-first; one zero guard word at the end
    lengths       uint8  [K * run_limit + 2]    code length of each symbol (the code table)
    block_offsets uint32 [ceil(rows/G) + 1]     stream bit where each block of G rows starts; last = bits
    row_deltas    uint16 [rows]                 row start minus its block start, in bits
    levels        float16|float32 [rows, 2|4]   ternary: (lo, hi); int2: the 4 levels

(version 1's layout; the arrays of a version-2 matrix are the same, levels float32.)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from qmoe.codec import format2, huffman
from qmoe.codec import levels as lv
from qmoe.errors import FormatError

FORMAT_VERSION = 2  # what the encoder writes (when the levels lie on version 2's grid); 1 is still read
VERSIONS = (1, 2)
MAGIC = 0x31434D51  # b"QMC1" read as a little-endian uint32
HEADER_WORDS = 16
MAX_CODE_LEN = 12  # decode table = 4096 int32 = 16 KiB: fits L1 and GPU shared memory
MAX_COLS = 1 << 22  # keeps every legal `pos + skip` below huffman.EOR_SKIP
MAX_BLOCK_LOG2 = 8

KINDS = ("ternary", "int2")
N_VALUES = {"ternary": 2, "int2": 3}  # nonzero values per kind (K)
N_LEVELS = {"ternary": 2, "int2": 4}
LEVEL_DTYPES = (np.dtype("<f2"), np.dtype("<f4"))

# header field -> index into the uint32 [16] header
H_MAGIC, H_VERSION, H_KIND, H_ROWS, H_COLS, H_RUN_LIMIT, H_BACKGROUND, H_MAX_LEN = range(8)
H_LEVEL_DTYPE, H_BLOCK_LOG2, H_BITS, H_NSYM, H_CRC = range(8, 13)

ARRAY_NAMES = ("header", "stream", "lengths", "block_offsets", "row_deltas", "levels")
# Order of the arrays in ``to_blob``: widest elements first, so each array starts aligned to its element size.
BLOB_ORDER = ("header", "stream", "block_offsets", "levels", "row_deltas", "lengths")


@dataclass(frozen=True, eq=False)
class CodeTable:
    """The alphabet and code of one matrix (or of several, when shared).

    Symbol ``s < K * run_limit``: ``s // K`` background codes, then nonzero value ``s % K + 1``.
    Symbol ``K * run_limit`` (escape): ``run_limit`` background codes, nothing written.
    Symbol ``K * run_limit + 1`` (end of row): the rest of the row is background.
    Value ``v`` means code ``(background + v) & 3`` for int2, and -1 (v=1) / +1 (v=2) for ternary.
    """

    kind: str
    run_limit: int
    background: int
    lengths: np.ndarray  # [nsym] uint8

    @property
    def n_values(self) -> int:
        return N_VALUES[self.kind]

    @property
    def nsym(self) -> int:
        return self.n_values * self.run_limit + 2

    def symbol_meaning(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(skip, value, end_of_row) per symbol, each ``[nsym]``."""
        k, r = self.n_values, self.run_limit
        s = np.arange(k * r)
        skips = np.concatenate([s // k, [r, huffman.EOR_SKIP]])
        vals = np.concatenate([s % k + 1, [0, 0]])
        eor = np.zeros(self.nsym, dtype=bool)
        eor[-1] = True
        return skips, vals, eor

    def decode_lut(self) -> np.ndarray:
        """``[2**MAX_CODE_LEN] int32`` single-lookup decode table (layout in qmoe.codec.huffman)."""
        return huffman.decode_lut(self.lengths, *self.symbol_meaning(), MAX_CODE_LEN)

    def encoder_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(bit-reversed codewords ``[nsym] uint32``, lengths ``[nsym] uint8``) for the LSB-first writer."""
        return huffman.reverse_bits(huffman.canonical_codes(self.lengths), self.lengths), self.lengths


@dataclass(eq=False)
class EncodedMatrix:
    """An entropy-coded ``[rows, cols]`` ternary or 2-bit matrix with its levels. See docs/format.md."""

    kind: str
    shape: tuple[int, int]
    table: CodeTable
    stream: np.ndarray  # [nwords] uint32
    block_log2: int
    block_offsets: np.ndarray  # [nblocks + 1] uint32
    row_deltas: np.ndarray  # [rows] uint16
    levels: np.ndarray  # [rows, 2|4] float16 or float32
    total_bits: int
    table_shared: bool = False  # encoded with a table built for several matrices (each still stores it)
    _lut: np.ndarray | None = field(default=None, repr=False)
    name: str = ""  # the tensor name it was read under (load_shard), for messages; not serialized
    version: int = 1  # the layout ``to_blob`` writes: 1 (arrays as they are) or 2 (compact row metadata)
    level_steps: int = lv.LEVEL_STEPS  # version 2: the level grid's steps per octave
    _blob: np.ndarray | None = field(default=None, repr=False)  # version 2: the blob, built once

    @property
    def nbytes(self) -> int:
        """Serialized bytes of the matrix (``to_blob``), its code table included (stored even when shared)."""
        if self.version == 2:
            return int(self.to_blob().size)
        return sum(a.nbytes for a in self.to_arrays().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def lut(self) -> np.ndarray:
        if self._lut is None:
            self._lut = self.table.decode_lut()
        return self._lut

    def row_starts(self) -> np.ndarray:
        """``[rows + 1] int64`` stream bit where each row starts; the last entry is the total bit count."""
        rows = self.shape[0]
        starts = np.empty(rows + 1, dtype=np.int64)
        starts[:rows] = self.block_offsets[np.arange(rows) >> self.block_log2].astype(np.int64)
        starts[:rows] += self.row_deltas
        starts[rows] = self.total_bits
        return starts

    def validate(self) -> None:
        """FormatError unless the arrays are consistent (``check_layout``); decoders call it first."""
        check_layout(self)

    def _header(self, crc: int) -> np.ndarray:
        h = np.zeros(HEADER_WORDS, dtype="<u4")
        h[H_MAGIC], h[H_VERSION], h[H_KIND] = MAGIC, 1, KINDS.index(self.kind)
        h[H_ROWS], h[H_COLS] = self.shape
        h[H_RUN_LIMIT], h[H_BACKGROUND] = self.table.run_limit, self.table.background
        h[H_MAX_LEN], h[H_LEVEL_DTYPE] = MAX_CODE_LEN, LEVEL_DTYPES.index(self.levels.dtype)
        h[H_BLOCK_LOG2], h[H_BITS], h[H_NSYM] = self.block_log2, self.total_bits, self.table.nsym
        h[H_CRC] = crc
        return h

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The matrix as version 1's flat little-endian arrays (names in ARRAY_NAMES); ``from_arrays``
        inverts it. Version-2 matrices have the blob form only (``to_blob``)."""
        if self.version != 1:
            raise ValueError(f"a version-{self.version} matrix is stored as one blob: use to_blob()")
        body = {"stream": self.stream, "lengths": self.table.lengths, "block_offsets": self.block_offsets,
                "row_deltas": self.row_deltas, "levels": self.levels}
        return {"header": self._header(_crc(self._header(0), body)), **body}

    def to_blob(self) -> np.ndarray:
        """The matrix as one ``uint8`` array: the arrays of ``to_arrays`` back to back in ``BLOB_ORDER``
        (each starts at a multiple of its element size); ``from_blob`` inverts it. Version 2: the compact
        layout of ``qmoe.codec.format2``."""
        if self.version == 2:
            if self._blob is None:
                check_layout(self)
                if not lv.on_grid(self.levels, self.kind, self.level_steps):
                    raise ValueError("levels are not on the version-2 grid; round them with "
                                     "qmoe.codec.levels.round_levels or write version 1")
                t = self.table
                self._blob = format2.build(
                    KINDS.index(self.kind), self.kind, self.shape, t.background, t.run_limit, self.total_bits,
                    self.stream, np.diff(self.row_starts()), self.levels, t.lengths, self.level_steps)
            return self._blob
        arrays = self.to_arrays()
        parts = [np.ascontiguousarray(arrays[n]).view(np.uint8).reshape(-1) for n in BLOB_ORDER]
        return np.concatenate(parts)

    @classmethod
    def from_blob(cls, blob: np.ndarray, verify: bool = True, copy: bool = True,
                  padded: bool = False) -> EncodedMatrix:
        """Rebuild from ``to_blob`` bytes; FormatError if the sizes its header implies do not add up.

        ``copy=False``: the arrays are views of ``blob`` (a memory-mapped file stays mapped, not read), so
        ``blob`` must outlive the matrix. ``padded``: up to 7 zero bytes may follow the blob (shard versions
        3 and 4 pad each blob to whole 8-byte words).
        """
        b = np.asarray(blob) if not copy else np.ascontiguousarray(np.asarray(blob))
        if b.dtype != np.uint8 or b.ndim != 1 or b.size < format2.HEADER2_BYTES:
            raise FormatError(
                f"encoded-matrix blob must be uint8[>= {format2.HEADER2_BYTES}], got {b.dtype}{b.shape}"
            )
        if int(b[:4].view("<u4")[0]) != MAGIC:
            raise FormatError("encoded-matrix header has a wrong magic number: not a qmoe matrix, or corrupt")
        _check_version(int(b[4]))  # the version's low byte: version 2 packs other fields next to it
        if int(b[4]) == 2:
            return cls._from_v2(format2.parse(b, verify, copy, padded))
        if b.size < 4 * HEADER_WORDS:
            raise _bad(f"a version-1 blob holds at least {4 * HEADER_WORDS} bytes, got {b.size}")
        h = b[: 4 * HEADER_WORDS].view("<u4")
        _check_version(int(h[H_VERSION]))
        layout = _blob_layout(h)
        need = sum(dt.itemsize * int(np.prod(shape)) for dt, shape in layout.values())
        if need != b.size and not (padded and need < b.size < need + 8 and not b[need:].any()):
            raise _bad(f"blob holds {b.size} bytes, its header implies {need}")
        arrays, at = {}, 0
        for name in BLOB_ORDER:
            dt, shape = layout[name]
            n = dt.itemsize * int(np.prod(shape))
            part = b[at : at + n]
            arrays[name] = (part.copy() if copy else part).view(dt).reshape(shape)
            at += n
        return cls.from_arrays(arrays, verify=verify)

    @classmethod
    def _from_v2(cls, f: dict) -> EncodedMatrix:
        kind = KINDS[f["kind_id"]]
        table = CodeTable(kind, f["run_limit"], f["background"], f["lengths"])
        enc = cls(kind, f["shape"], table, f["stream"], f["block_log2"], f["block_offsets"], f["row_deltas"],
                  f["levels"], f["total_bits"], version=2, level_steps=f["level_steps"], _blob=f["blob"])
        enc.validate()
        return enc

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], verify: bool = True) -> EncodedMatrix:
        """Rebuild and validate; FormatError on any inconsistency (and on a crc mismatch if ``verify``).

        Validation makes decoding safe: every offset, length and table is checked here, so decoders only
        have to guard the stream contents (bounds of each row's bits and of its width).
        """
        missing = [n for n in ARRAY_NAMES if n not in arrays]
        if missing:
            raise FormatError(f"encoded matrix lacks arrays {missing}; it was not written by qmoe.codec")
        a = {n: np.ascontiguousarray(np.asarray(arrays[n])) for n in ARRAY_NAMES}
        h = a["header"]
        if h.dtype != np.dtype("<u4") or h.shape != (HEADER_WORDS,):
            raise FormatError(f"encoded-matrix header must be uint32[{HEADER_WORDS}], got {h.dtype}{h.shape}")
        if int(h[H_MAGIC]) != MAGIC:
            raise FormatError("encoded-matrix header has a wrong magic number: not a qmoe matrix, or corrupt")
        _check_version(int(h[H_VERSION]))
        if int(h[H_VERSION]) != 1:
            raise FormatError(f"encoded matrix of format version {int(h[H_VERSION])} has one blob form, not "
                              "six arrays: read it with EncodedMatrix.from_blob")
        if verify:
            want = int(h[H_CRC])
            h0 = h.copy()
            h0[H_CRC] = 0
            if _crc(h0, {n: a[n] for n in ARRAY_NAMES[1:]}) != want:
                raise FormatError("encoded matrix fails its crc32 check: the data is corrupt")
        enc = _validate(h, a)
        return enc


def _check_version(version: int) -> None:
    if version not in VERSIONS:
        raise FormatError(f"encoded matrix has format version {version}; this qmoe reads versions "
                          f"{', '.join(map(str, VERSIONS))}. Upgrade qmoe (or re-encode).")


def _blob_layout(h: np.ndarray) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """``{array: (dtype, shape)}`` of a blob with header words ``h [16]``; FormatError for a bad field."""
    kind_id, level_id = int(h[H_KIND]), int(h[H_LEVEL_DTYPE])
    if level_id >= len(LEVEL_DTYPES) or kind_id >= len(KINDS) or int(h[H_BLOCK_LOG2]) > 31:
        raise _bad("header field out of range (kind, level dtype or block size)")
    rows, bits, g = int(h[H_ROWS]), int(h[H_BITS]), int(h[H_BLOCK_LOG2])
    n_levels = 2 if KINDS[kind_id] == "ternary" else 4
    return {
        "header": (np.dtype("<u4"), (HEADER_WORDS,)),
        "stream": (np.dtype("<u4"), ((bits + 31) // 32 + 1,)),
        "block_offsets": (np.dtype("<u4"), (((rows + (1 << g) - 1) >> g) + 1,)),
        "levels": (LEVEL_DTYPES[level_id], (rows, n_levels)),
        "row_deltas": (np.dtype("<u2"), (rows,)),
        "lengths": (np.dtype("u1"), (int(h[H_NSYM]),)),
    }


def blob_nbytes(head: np.ndarray) -> int:
    """Bytes of the ``to_blob`` form of the matrix whose blob starts with ``head`` (``uint8``, at least
    the 64 bytes of a version-1 header or the 40 of a version-2 one)."""
    if int(head[4]) == 2:
        return format2.nbytes_of(format2.header_of(head))
    h = head[: 4 * HEADER_WORDS].view("<u4")
    return sum(dt.itemsize * int(np.prod(shape)) for dt, shape in _blob_layout(h).values())


def block_log2_for(starts: np.ndarray) -> int:
    """Largest block of 2**g rows (g <= 8) whose rows all start within 65535 bits of the block's start, for
    row starts ``[rows + 1]``: the in-memory row index (``block_offsets``, ``row_deltas``)."""
    rows = len(starts) - 1
    for g in range(MAX_BLOCK_LOG2, 0, -1):
        s = starts[:rows]
        block = s[:: 1 << g]
        if int((s - np.repeat(block, 1 << g)[:rows]).max()) < 1 << 16:
            return g
    return 0


def _crc(header: np.ndarray, body: dict[str, np.ndarray]) -> int:
    crc = zlib.crc32(header.tobytes())
    for n in ARRAY_NAMES[1:]:
        arr = body[n]
        crc = zlib.crc32(str(arr.dtype.str).encode() + str(arr.shape).encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).reshape(-1), crc)
    return crc


def _bad(msg: str) -> FormatError:
    return FormatError(f"encoded matrix is corrupt: {msg}")


def _validate(h: np.ndarray, a: dict[str, np.ndarray]) -> EncodedMatrix:
    kind_id, rows, cols = int(h[H_KIND]), int(h[H_ROWS]), int(h[H_COLS])
    run_limit, background, max_len = int(h[H_RUN_LIMIT]), int(h[H_BACKGROUND]), int(h[H_MAX_LEN])
    level_dt, g, bits, nsym = int(h[H_LEVEL_DTYPE]), int(h[H_BLOCK_LOG2]), int(h[H_BITS]), int(h[H_NSYM])
    if kind_id >= len(KINDS):
        raise _bad(f"unknown kind id {kind_id}")
    kind = KINDS[kind_id]
    if not (1 <= rows and 1 <= cols <= MAX_COLS):
        raise _bad(f"shape ({rows}, {cols}) out of range")
    if not 1 <= run_limit <= 4096 or max_len != MAX_CODE_LEN or g > MAX_BLOCK_LOG2 or level_dt > 1:
        raise _bad("header field out of range (run limit, code length, block size or level dtype)")
    if background > (3 if kind == "int2" else 0):
        raise _bad(f"background code {background} invalid for {kind}")
    if nsym != N_VALUES[kind] * run_limit + 2:
        raise _bad(f"header says {nsym} symbols, the alphabet has {N_VALUES[kind] * run_limit + 2}")
    if a["levels"].dtype != LEVEL_DTYPES[level_dt]:
        raise _bad(f"array 'levels' is {a['levels'].dtype}, the header says {LEVEL_DTYPES[level_dt]}")
    table = CodeTable(kind, run_limit, background, a["lengths"])
    enc = EncodedMatrix(kind, (rows, cols), table, a["stream"], g, a["block_offsets"], a["row_deltas"],
                        a["levels"], bits)
    enc.validate()
    return enc


def check_layout(enc: EncodedMatrix) -> None:
    """FormatError unless every array of ``enc`` has its dtype and shape, the code is a prefix code and the
    offsets lie inside the stream in increasing order: what a decoder needs to read only inside ``stream``.

    ``from_arrays`` runs it on every file; the decoders run it again because an EncodedMatrix may also be
    built directly (a public dataclass), and the numba and C kernels do not check bounds."""
    kind, (rows, cols), table = enc.kind, enc.shape, enc.table
    bits, g = int(enc.total_bits), int(enc.block_log2)
    if kind not in KINDS or table.kind != kind:
        raise _bad(f"kind {kind!r} with a {table.kind!r} code table")
    if enc.version not in VERSIONS or (enc.version == 2 and not 1 <= enc.level_steps <= lv.MAX_STEPS):
        raise _bad(f"format version {enc.version} (level steps {enc.level_steps}) unknown")
    if not (1 <= rows and 1 <= cols <= MAX_COLS) or not 0 <= g <= MAX_BLOCK_LOG2 or not 0 <= bits < 1 << 32:
        raise _bad(f"shape ({rows}, {cols}), block size 2**{g} or bit count {bits} out of range")
    if not 1 <= table.run_limit <= 4096 or not 0 <= table.background <= (3 if kind == "int2" else 0):
        raise _bad(f"run limit {table.run_limit} or background code {table.background} out of range")
    nblocks = (rows + (1 << g) - 1) >> g
    expect = {
        "stream": (enc.stream, np.dtype("<u4"), ((bits + 31) // 32 + 1,)),
        "lengths": (table.lengths, np.dtype("u1"), (table.nsym,)),
        "block_offsets": (enc.block_offsets, np.dtype("<u4"), (nblocks + 1,)),
        "row_deltas": (enc.row_deltas, np.dtype("<u2"), (rows,)),
        "levels": (enc.levels, None, (rows, N_LEVELS[kind])),
    }
    for name, (arr, dt, shape) in expect.items():
        if not isinstance(arr, np.ndarray) or (arr.dtype != dt if dt else arr.dtype not in LEVEL_DTYPES) \
                or arr.shape != shape:
            got = f"{arr.dtype}{arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise _bad(f"array '{name}' is {got}, expected {dt or 'float16|float32'}{shape}")
    if enc._lut is not None and (enc._lut.dtype != np.int32 or enc._lut.shape != (1 << MAX_CODE_LEN,)):
        raise _bad(f"decode table is {enc._lut.dtype}{enc._lut.shape}, expected int32[{1 << MAX_CODE_LEN}]")
    if not huffman.kraft_ok(table.lengths, MAX_CODE_LEN):
        raise _bad("code lengths do not form a prefix code of at most 12 bits")
    bo = enc.block_offsets.astype(np.int64)
    if bo[0] != 0 or bo[-1] != bits:
        raise _bad("block offsets must start at 0 and end at the stream's bit count")
    # Each row holds at least one codeword (>= 1 bit), so starts must strictly increase.
    if np.any(np.diff(enc.row_starts()) < 1) or np.any(enc.row_deltas[:: 1 << g] != 0):
        raise _bad("row offsets are not strictly increasing within the stream")
    tail = bits % 32
    if int(enc.stream[-1]) != 0 or (tail and int(enc.stream[-2]) >> tail):
        raise _bad("stream padding bits are not zero")
