"""Shards used in place: the header parsed, the file memory-mapped, each matrix checked on its first use.

``open_shard(path)`` reads a shard's header only (the safetensors JSON with the qmoe header in it, and the
offsets of every tensor) and maps the file read-only. Nothing else is read, so opening the shards of a model
larger than memory costs milliseconds per file. Its encoded matrices are ``MappedMatrix`` handles:

- ``MappedMatrix.get()`` checks the matrix the first time it is called (crc32 of its bytes as recorded in the
  shard, then the structural validation of ``EncodedMatrix.from_blob``) and returns an ``EncodedMatrix``
  whose arrays are views of the mapping. The kernels read the stream from the page cache; the process's
  resident memory grows by the pages a matrix touches, which the kernel may drop again under memory pressure
  (clean file pages), not by a copy. A failed check raises a one-line FormatError naming file, matrix and,
  where the stream shows it, the first row that does not decode.
- ``check_tensor(name)`` / ``check_all()`` verify ordinary tensors / everything by reading the file (``pread``
  in chunks, not through the mapping, so a check adds nothing to the resident set).

Blobs in shard versions 3 and 4 are 8-byte aligned in the file (``qmoe.codec.container``); an unaligned
blob (a version-2 shard) is copied into process memory on first use instead, so the kernels never read an
unaligned word. Version-1 shards (six tensors per matrix) map the same way, each part checked by its crc.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmoe.codec.container import ARRAY_NAMES, BLOB, PACKED, SEP, _check_tensor_list, _header, matrix_index
from qmoe.codec.format import EncodedMatrix
from qmoe.errors import FormatError

# safetensors dtype -> bytes per element (the ones a checkpoint may hold)
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_NUMPY = {"U8": np.uint8, "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"),
          "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
CHUNK = 16 << 20  # bytes read per step when checking a tensor


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: dtype, shape, and its byte range in the file (absolute offsets)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class MappedMatrix:
    """An encoded matrix still in its shard file; ``get()`` checks it once and returns it."""

    path: str
    name: str
    kind: str
    parts: dict[str, Entry]  # blob suffix -> entry: {"qmoe": ...} (v2-v4; v4: a slice of the packed tensor)
    #                          or the six arrays (v1)
    checksums: dict[str, str]  # blob suffix -> crc32 hex as recorded in the shard
    version: int
    _map: Any = field(default=None, repr=False)  # the shard's mmap
    _enc: EncodedMatrix | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the matrix in the file (its blob, padding included)."""
        return sum(e.end - e.begin for e in self.parts.values())

    @property
    def checked(self) -> bool:
        return self._enc is not None

    def get(self) -> EncodedMatrix:
        """The matrix, its arrays views of the mapped file; checked (crc32, structure) on the first call."""
        if self._enc is None:
            if hasattr(self._map, "madvise"):  # one read-ahead for the whole matrix, not a fault per page
                b = min(e.begin for e in self.parts.values()) // mmap.PAGESIZE * mmap.PAGESIZE
                self._map.madvise(mmap.MADV_WILLNEED, b, max(e.end for e in self.parts.values()) - b)
            self._enc = self._open(self._map, check=True)
        return self._enc

    def verify(self, buf: Any = None, base: int = 0) -> EncodedMatrix:
        """Check crc32 and structure (``qmoe verify``); ``buf``: bytes-like holding the file from offset
        ``base`` on, read instead of the mapping. The result's arrays are views of ``buf``."""
        return self._open(self._map if buf is None else buf, check=True, base=base)

    def _open(self, buf: Any, check: bool, base: int = 0) -> EncodedMatrix:
        views = {}
        for suffix, e in self.parts.items():
            raw = np.frombuffer(buf, dtype=np.uint8, count=e.end - e.begin, offset=e.begin - base)  # no copy
            if check and f"{zlib.crc32(raw):08x}" != self.checksums[suffix]:
                raise self._corrupt(suffix, raw)
            if e.begin % 8:  # an unaligned (version-2) blob: the kernels read whole words, so copy it
                raw = raw.copy()
            views[suffix] = raw
        try:
            if self.version >= 2:
                enc = EncodedMatrix.from_blob(views[BLOB], verify=False, copy=False, padded=self.version >= 3)
            else:
                arrays = {a: views[a].view(_NUMPY[self.parts[a].dtype]).reshape(self.parts[a].shape)
                          for a in ARRAY_NAMES}
                enc = EncodedMatrix.from_arrays(arrays, verify=False)
        except FormatError as err:
            raise FormatError(f"{self.path}: encoded matrix {self.name!r}: {err}; the file is corrupt: copy "
                              "it again or re-run qmoe compress") from None
        if enc.kind != self.kind:
            raise FormatError(f"{self.path}: encoded matrix {self.name!r} is {enc.kind}, header says "
                              f"{self.kind}")
        return enc

    def _corrupt(self, suffix: str, raw: np.ndarray) -> FormatError:
        """The crc32 failed: name the first row that does not decode, where the damage shows in the stream."""
        where = _first_bad_row(raw, suffix, self)
        return FormatError(f"{self.path}: encoded matrix {self.name!r} fails its crc32 check ({where}); the "
                           "file is corrupt: copy it again or re-run qmoe compress (`qmoe verify DIR` lists "
                           "all)")


def _first_bad_row(raw: np.ndarray, suffix: str, m: MappedMatrix) -> str:
    """``"row R ..."`` for the first row of the (damaged) matrix that does not decode, else what is known."""
    if m.version < 2:
        return f"in its {suffix!r} array"
    try:
        enc = EncodedMatrix.from_blob(raw, verify=False, copy=True, padded=m.version >= 3)
    except FormatError as err:
        return f"its header or offsets: {str(err).removeprefix('encoded matrix is corrupt: ')}"
    from qmoe.codec.decode import decode_dense

    try:
        decode_dense(enc)
    except FormatError as err:
        return str(err).split(": ", 1)[-1]  # "row R does not end where the next row starts"
    return "every row still decodes: a flipped value or level, row unknown"


@dataclass
class MappedShard:
    """A shard opened by ``open_shard``: ordinary tensors by entry, encoded matrices as handles."""

    path: str
    tensors: dict[str, Entry]
    checksums: dict[str, str]
    encoded: dict[str, MappedMatrix]
    metadata: dict[str, str]
    _map: Any = field(default=None, repr=False)

    def check_tensor(self, name: str) -> None:
        """crc32 of ordinary tensor ``name``, read from the file; FormatError naming it on a mismatch."""
        e = self.tensors[name]
        crc, pos = 0, e.begin
        with open(self.path, "rb") as f:
            while pos < e.end:
                chunk = os.pread(f.fileno(), min(CHUNK, e.end - pos), pos)
                if not chunk:
                    raise FormatError(f"{self.path}: tensor {name!r} is cut short; the file is truncated")
                crc, pos = zlib.crc32(chunk, crc), pos + len(chunk)
        if f"{crc:08x}" != self.checksums[name]:
            raise FormatError(f"{self.path}: tensor {name!r} fails its crc32 check; the file is corrupt: "
                              "copy it again or re-run qmoe compress")

    def tensor_bytes(self) -> int:
        return sum(e.end - e.begin for e in self.tensors.values())


def read_entries(path: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """``({tensor: Entry}, safetensors metadata)`` from the file's header alone; FormatError if it is not a
    well-formed safetensors file whose tensors lie inside it."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        start, entries = 8 + n, {}
        for name, d in header.items():
            dtype, shape, (b, e) = d["dtype"], tuple(int(v) for v in d["shape"]), d["data_offsets"]
            want = _ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
            if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e and e - b == want
                    and start + e <= size):
                raise ValueError(f"tensor {name!r} has offsets {[b, e]} for {dtype}{list(shape)} in a "
                                 f"{size}-byte file")
            entries[name] = Entry(dtype, shape, start + b, start + e)
    except OSError as err:
        raise FormatError(f"{path}: cannot be read ({err})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise FormatError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); the file "
                          "is corrupt or truncated") from None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{path}: safetensors metadata is not a map of strings; the file is corrupt")
    return entries, meta


def open_shard(path: str | os.PathLike) -> MappedShard:
    """Open a shard written by ``save_shard`` in place (module docstring); reads only its header."""
    path = os.fspath(path)
    entries, meta = read_entries(path)
    header = _header(path, meta)
    checksums = header["checksums"]
    _check_tensor_list(path, checksums, list(entries))
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # read_entries saw a non-empty file
    version = header["format_version"]
    encoded = {}
    if version >= 4:  # slices of the one packed tensor, as the matrix index lays them out
        packed = entries.pop(PACKED, None)
        if packed is not None and (packed.dtype != "U64" or len(packed.shape) != 1):
            raise FormatError(f"{path}: the {PACKED!r} tensor is not a 1-D uint64 tensor; the file is "
                              "corrupt")
        for e in matrix_index(path, header, None if packed is None else packed.shape[0]):
            begin = packed.begin + 8 * e.word
            part = Entry("U64", (e.words,), begin, begin + 8 * e.words)
            encoded[e.name] = MappedMatrix(path, e.name, e.kind, {BLOB: part}, {BLOB: e.crc}, version, mm)
    else:
        suffixes = (BLOB,) if version >= 2 else ARRAY_NAMES
        for name, kind in header["encoded"].items():
            parts = {}
            for s in suffixes:
                e = entries.pop(f"{name}{SEP}{s}", None)
                if e is None:
                    raise FormatError(f"{path}: encoded matrix {name!r} lacks its {s!r} tensor")
                parts[s] = e
            crcs = {s: checksums[f"{name}{SEP}{s}"] for s in parts}
            encoded[name] = MappedMatrix(path, name, kind, parts, crcs, version, mm)
    stray = [n for n in entries if SEP in n]
    if stray:
        raise FormatError(f"{path}: tensors {stray[:5]} look like parts of an unlisted encoded matrix")
    return MappedShard(path, entries, {n: checksums[n] for n in entries}, encoded,
                       {k: v for k, v in meta.items() if k != "qmoe"}, mm)
