"""Checkpoint shards: ordinary tensors and encoded matrices in one safetensors file (no pickle).

The safetensors metadata key ``"qmoe"`` holds a JSON header (shard version 4)::

    {"format": "qmoe-shard", "format_version": 4,
     "checksums": {"<ordinary tensor>": "<crc32, 8 hex digits>", ...},
     "matrices": "<base64 of zlib of the matrix index>"}

and every encoded matrix of the shard sits in one uint64 tensor ``#qmoe``: their ``EncodedMatrix.to_blob``
bytes, each zero-padded to whole 8-byte words, back to back in the index's order. The index is the JSON
object ``{"names": [...], "kinds": [...], "words": [...], "crc32": [...]}``, one entry per matrix (its name,
``"ternary"``/``"int2"``, its length in words, the crc32 of its padded bytes as an integer), compressed. So
a matrix costs the file about 12 bytes besides its blob (and a shard about 230 once), where version 3 (one
``<name>#qmoe`` tensor per matrix, with a kind and a checksum entry of its own in the JSON) cost about 220:
on tiny-qwen3-moe's 192x192 experts 0.05 bits per weight, on 2048-wide experts 0.001. safetensors puts
uint64 tensors first and starts the data 8-byte aligned, so every blob, and every array inside it, is
aligned in the file: a memory-mapped shard (``qmoe.codec.mapped``) hands the kernels the file's pages as
they are.

Versions 1-3 are still read: 3 stored each padded blob as its own uint64 tensor ``<name>#qmoe``, 2 the same
bytes unpadded as uint8 (arbitrary offsets), 1 the six arrays of ``EncodedMatrix.to_arrays`` as six tensors
``<name>#header``, ``<name>#stream``, ...; versions 1-3 list ``"encoded": {name: kind}`` in the header and a
checksum for every tensor. Other metadata keys are the caller's strings. Spec: docs/format.md, section 7.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmoe.codec.format import ARRAY_NAMES, KINDS, EncodedMatrix
from qmoe.errors import FormatError

SHARD_FORMAT = "qmoe-shard"
HEADER_KEY = "qmoe"
SEP = "#"
BLOB = "qmoe"  # suffix of an encoded matrix's tensor: <name>#qmoe (versions 2, 3)
PACKED = f"{SEP}{BLOB}"  # version 4: the one tensor holding every encoded matrix of the shard
# 1: six tensors per encoded matrix; 2: one uint8 blob tensor per matrix; 3: one uint64 blob, zero-padded;
# 4: every padded blob in one uint64 tensor, the matrices listed in a compressed index
SHARD_VERSION = 4
BLOB_ALIGN = 8  # versions 3, 4: bytes per blob word
# Version 4: what one matrix adds to the compressed index, and what the index and the packed tensor's entry
# cost a shard whatever its matrices (measured on layers of 12-384 Qwen-named matrices: 11-13 and ~230).
INDEX_BYTES = 12
SHARD_FIXED_BYTES = 230


@dataclass
class Shard:
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> torch.Tensor
    encoded: dict[str, EncodedMatrix] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def _crc(t: Any) -> str:
    import torch

    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(raw):08x}"


def padded_blob(enc: EncodedMatrix) -> np.ndarray:
    """``enc.to_blob()`` zero-padded to whole words, as the ``[ceil(nbytes / 8)] uint64`` a shard stores."""
    blob = enc.to_blob()
    out = np.zeros(-(-blob.size // BLOB_ALIGN) * BLOB_ALIGN, dtype=np.uint8)
    out[: blob.size] = blob
    return out.view("<u8")


def save_shard(path: str | os.PathLike, tensors: dict[str, Any], encoded: dict[str, EncodedMatrix],
               metadata: dict[str, str] | None = None, version: int | None = None) -> None:
    """Write one safetensors file atomically (temporary name, then rename); same inputs, same bytes.

    ``version``: the shard version to write, ``SHARD_VERSION`` (4) unless a test asks for 2 or 3."""
    import torch
    from safetensors.torch import save_file

    version = SHARD_VERSION if version is None else version
    metadata = dict(metadata or {})
    if HEADER_KEY in metadata:
        raise ValueError(f"metadata key {HEADER_KEY!r} is reserved for the qmoe header")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if SEP in name:
            raise ValueError(f"tensor name {name!r} contains {SEP!r}, which is reserved for encoded matrices")
        out[name] = t.detach().contiguous()
    for name in encoded:
        if name in tensors or SEP in name:
            raise ValueError(f"encoded matrix name {name!r} clashes with a tensor or contains {SEP!r}")
    header: dict[str, Any] = {"format": SHARD_FORMAT, "format_version": version}
    if version >= 4:
        header["checksums"] = {n: _crc(t) for n, t in sorted(out.items())}
        if encoded:
            blobs = [padded_blob(encoded[n]) for n in sorted(encoded)]
            header["matrices"] = pack_index(sorted(encoded), [encoded[n].kind for n in sorted(encoded)],
                                            [int(b.size) for b in blobs],
                                            [zlib.crc32(b.view(np.uint8)) for b in blobs])
            out[PACKED] = torch.from_numpy(np.concatenate(blobs))
    else:
        for name, enc in encoded.items():
            out[f"{name}{SEP}{BLOB}"] = torch.from_numpy(padded_blob(enc))
        header["encoded"] = {n: e.kind for n, e in sorted(encoded.items())}
        header["checksums"] = {n: _crc(t) for n, t in sorted(out.items())}
    metadata[HEADER_KEY] = json.dumps(header, sort_keys=True, separators=(",", ":"))
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        save_file(out, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # safetensors creates files 0600; a checkpoint gets the usual permissions (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pack_index(names: list[str], kinds: list[str], words: list[int], crcs: list[int]) -> str:
    """Version 4's matrix index, for matrices whose padded blobs lie in this order in the packed tensor:
    base64 of the zlib-compressed JSON (deterministic: fixed key order, level 9). Names repeat their
    family's pattern, so they compress to a few bytes each."""
    index = {"names": names, "kinds": kinds, "words": words, "crc32": crcs}
    raw = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


@dataclass(frozen=True)
class IndexEntry:
    """One encoded matrix of a version-4 shard: where its padded blob lies in the packed tensor."""

    name: str
    kind: str
    word: int  # first word in the packed tensor
    words: int
    crc: str  # crc32 of its padded bytes, 8 hex digits


def matrix_index(path: str, header: dict, packed_words: int | None) -> list[IndexEntry]:
    """The entries of a version-4 header's ``"matrices"``, checked against each other and against the
    packed tensor's length in words (``None``: the file has no packed tensor)."""
    packed = header.get("matrices")
    if packed is None:
        if packed_words is not None:
            raise FormatError(f"{path}: the shard holds a {PACKED!r} tensor but no matrix index; the file is "
                              "corrupt")
        return []
    try:
        index = json.loads(zlib.decompress(base64.b64decode(packed, validate=True)))
        names, kinds, words, crcs = index["names"], index["kinds"], index["words"], index["crc32"]
        ok = (isinstance(names, list) and len(names) == len(kinds) == len(words) == len(crcs)
              and all(isinstance(n, str) and n and SEP not in n for n in names)
              and len(set(names)) == len(names)
              and all(k in KINDS for k in kinds)
              and all(isinstance(w, int) and w > 0 for w in words)
              and all(isinstance(c, int) and 0 <= c < 1 << 32 for c in crcs))
    except (ValueError, KeyError, TypeError, zlib.error) as e:
        raise FormatError(f"{path}: the qmoe matrix index is corrupt ({type(e).__name__}: {e})") from None
    if not ok:
        raise FormatError(f"{path}: the qmoe matrix index is corrupt (its lists disagree or hold odd values)")
    if packed_words != sum(words):
        raise FormatError(f"{path}: the matrix index covers {sum(words)} words but the {PACKED!r} tensor "
                          f"holds {packed_words}; the file is corrupt")
    entries, at = [], 0
    for n, k, w, c in zip(names, kinds, words, crcs, strict=True):
        entries.append(IndexEntry(n, k, at, w, f"{c:08x}"))
        at += w
    return entries


def _header(path: str, meta: dict[str, str] | None) -> dict:
    if not meta or HEADER_KEY not in meta:
        raise FormatError(f"{path}: no qmoe header; not a qmoe shard (or written by another tool)")
    try:
        header = json.loads(meta[HEADER_KEY])
        version = header["format_version"]
        ok = (header["format"] == SHARD_FORMAT and isinstance(version, int)
              and isinstance(header["checksums"], dict))
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: qmoe header is corrupt ({e})") from None
    if not ok:
        raise FormatError(f"{path}: qmoe header is corrupt")
    if version > SHARD_VERSION:
        raise FormatError(f"{path}: shard format version {version} is newer than this qmoe reads "
                          f"({SHARD_VERSION}); upgrade qmoe")
    if version < 1:
        raise FormatError(f"{path}: shard format version {version} is invalid")
    if (version < 4 and not isinstance(header.get("encoded"), dict)) or (
            version >= 4 and not isinstance(header.get("matrices", ""), str)):
        raise FormatError(f"{path}: qmoe header is corrupt (no list of its encoded matrices)")
    return header


def _check_tensor_list(path: str, checksums: dict, names: list[str]) -> None:
    """Every tensor of the file has a checksum and every checksum a tensor (version 4's packed tensor is
    covered by its matrices' checksums in the index instead)."""
    names = [n for n in names if n != PACKED]
    if set(checksums) != set(names):
        odd = sorted(set(checksums) ^ set(names))[:5]
        raise FormatError(f"{path}: tensors and checksum list disagree (e.g. {odd}); the file is corrupt")


def load_shard(path: str | os.PathLike, verify: bool = True) -> Shard:
    """Read a shard written by ``save_shard``. ``verify`` checks every tensor's crc32 (and each matrix's).

    Raises FormatError naming the file or the tensor on any corruption, truncation or newer version.
    """
    import torch
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            header = _header(path, meta)
            names = list(f.keys())
            raw = {}
            for n in names:
                try:
                    raw[n] = f.get_tensor(n)
                except Exception as e:  # safetensors raises several types on corrupt data
                    raise FormatError(f"{path}: tensor {n!r} cannot be read ({e})") from None
    except FormatError:
        raise
    except Exception as e:  # a truncated or garbled file fails inside safetensors with varied types
        raise FormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    checksums = header["checksums"]
    version = header["format_version"]
    _check_tensor_list(path, checksums, names)
    if verify:
        for n in checksums:
            if _crc(raw[n]) != checksums[n]:
                raise FormatError(f"{path}: tensor {n!r} fails its crc32 check; the file is corrupt")
    shard = Shard(metadata={k: v for k, v in meta.items() if k != HEADER_KEY})
    if version >= 4:
        packed = raw.pop(PACKED, None)
        if packed is not None and (packed.dtype != torch.uint64 or packed.dim() != 1):
            raise FormatError(f"{path}: the {PACKED!r} tensor is not a 1-D uint64 tensor; the file is "
                              "corrupt")
        words = None if packed is None else packed.numpy()
        entries = {e.name: e for e in matrix_index(path, header, None if words is None else words.size)}
        listed = [(e.name, e.kind) for e in entries.values()]
    else:
        listed = list(header["encoded"].items())
    for name, kind in listed:
        try:
            if version >= 4:
                e = entries[name]
                blob = words[e.word: e.word + e.words].view(np.uint8)
                if verify and f"{zlib.crc32(blob):08x}" != e.crc:
                    raise FormatError(f"{path}: encoded matrix {name!r} fails its crc32 check; the file is "
                                      "corrupt")
                enc = EncodedMatrix.from_blob(blob, verify=verify, padded=True)
            elif version >= 2:
                blob = raw.pop(f"{name}{SEP}{BLOB}", None)
                if blob is None:
                    raise FormatError(f"{path}: encoded matrix {name!r} lacks its {BLOB!r} tensor")
                enc = EncodedMatrix.from_blob(blob.numpy().view(np.uint8), verify=verify, padded=version >= 3)
            else:
                arrays = {}
                for a in ARRAY_NAMES:
                    t = raw.pop(f"{name}{SEP}{a}", None)
                    if t is None:
                        raise FormatError(f"{path}: encoded matrix {name!r} lacks its {a!r} tensor")
                    arrays[a] = t.numpy()
                enc = EncodedMatrix.from_arrays(arrays, verify=verify)
        except FormatError as e:
            if str(e).startswith(f"{path}: "):
                raise
            raise FormatError(f"{path}: encoded matrix {name!r}: {e}") from None
        if enc.kind != kind:
            raise FormatError(f"{path}: encoded matrix {name!r} is {enc.kind}, header says {kind}")
        enc.name = name  # messages from the decoders name the tensor
        shard.encoded[name] = enc
    stray = [n for n in raw if SEP in n]
    if stray:
        raise FormatError(f"{path}: tensors {stray[:5]} look like parts of an unlisted encoded matrix")
    shard.tensors = raw
    return shard


# -- size accounting ---------------------------------------------------------------------------------------


def _escaped_len(fragment: str) -> int:
    """Characters ``fragment`` takes inside the JSON string that carries the qmoe header."""
    return len(json.dumps(fragment)) - 2


def _tensor_entry_len(name: str, dtype: str, shape: list[int], offsets: list[int]) -> int:
    entry = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}},
                       separators=(",", ":"))
    return len(entry) - 2 + 1  # without the braces, with the separating comma


def matrix_header_bytes(name: str, enc: EncodedMatrix, offset_digits: int = 8) -> int:
    """Estimated bytes one encoded matrix adds to its shard besides its arrays: the zero padding of its blob
    to whole words and its entry in the compressed matrix index (``INDEX_BYTES``; version 4). What the
    shard pays once (``SHARD_FIXED_BYTES``) is left to the caller to share out. ``header_share`` measures
    the same on a written file. (``name`` and ``offset_digits`` mattered to version 3's per-matrix
    entries.)"""
    return -len(enc.to_blob()) % BLOB_ALIGN + INDEX_BYTES


def header_share(path: str | os.PathLike, matrices: list[str]) -> int:
    """Bytes of ``path``'s safetensors header that belong to the encoded matrices ``matrices``.

    Version 4: the matrix index (as escaped inside the header) and the packed tensor's entry, shared out
    by matrix count, plus the zero padding after each of their blobs. Versions 1-3: each of their tensors'
    entries (name, dtype, shape, offsets), their crc32 entries and kind entries in the qmoe header, and the
    padding (version 3). Not counted: the header's fixed part and its padding.
    """
    from qmoe.codec.format import HEADER_WORDS, blob_nbytes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        qh = json.loads(header["__metadata__"][HEADER_KEY])
        wanted = set(matrices)
        total = 0
        if qh["format_version"] >= 4:
            entry = header[PACKED]
            index = matrix_index(os.fspath(path), qh, entry["shape"][0])
            shared = _tensor_entry_len(PACKED, entry["dtype"], entry["shape"], entry["data_offsets"])
            shared += _escaped_len(f'"matrices":"{qh["matrices"]}",')
            mine = [e for e in index if e.name in wanted]
            total += shared * len(mine) // len(index)
            for e in mine:
                f.seek(8 + n + entry["data_offsets"][0] + 8 * e.word)
                head = np.frombuffer(f.read(4 * HEADER_WORDS), dtype=np.uint8)  # v1: 64, v2: 40 bytes
                total += 8 * e.words - blob_nbytes(head)
            return total
        for key, entry in header.items():
            if key != "__metadata__" and key.split(SEP)[0] in wanted and SEP in key:
                total += _tensor_entry_len(key, entry["dtype"], entry["shape"], entry["data_offsets"])
                total += _escaped_len(f'"{key}":"{qh["checksums"][key]}",')
                if entry["dtype"] == "U64":  # padded blob: stored bytes minus those its header implies
                    begin, end = entry["data_offsets"]
                    f.seek(8 + n + begin)
                    head = np.frombuffer(f.read(4 * HEADER_WORDS), dtype=np.uint8)  # v1: 64, v2: 40 bytes
                    total += end - begin - blob_nbytes(head)
    for name in matrices:
        total += _escaped_len(f'"{name}":"{qh["encoded"][name]}",')
    return total
