"""Checkpoint shards: ordinary tensors and encoded matrices in one safetensors file (no pickle).

The safetensors metadata key ``"qmoe"`` holds a JSON header::

    {"format": "qmoe-shard", "format_version": 3,
     "encoded": {"<name>": "ternary" | "int2", ...},
     "checksums": {"<tensor name>": "<crc32, 8 hex digits>", ...}}   # every tensor in the file

Encoded matrix ``<name>`` is stored as one uint64 tensor ``<name>#qmoe``: its ``EncodedMatrix.to_blob``
bytes, zero-padded to whole 8-byte words (shard version 3). safetensors puts uint64 tensors first and the
data starts 8-byte aligned, so every blob, and every array inside it, is aligned in the file: a memory-mapped
shard (``qmoe.codec.mapped``) hands the kernels the file's pages as they are. Version 2 stored the same
bytes unpadded as uint8 (arbitrary offsets); version 1 the six arrays of ``EncodedMatrix.to_arrays`` as six
tensors ``<name>#header``, ``<name>#stream``, ...; both are still read. One tensor instead of six cuts what
each matrix adds to the file's header (names, shapes, offsets, checksums) from about 1.1 kB to about 0.2 kB:
on a 192-wide expert that is 0.19 bits per weight. Other metadata keys are the caller's strings. Spec:
docs/format.md.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmoe.codec.format import ARRAY_NAMES, EncodedMatrix
from qmoe.errors import FormatError

SHARD_FORMAT = "qmoe-shard"
HEADER_KEY = "qmoe"
SEP = "#"
BLOB = "qmoe"  # suffix of an encoded matrix's tensor: <name>#qmoe
# 1: six tensors per encoded matrix; 2: one uint8 blob tensor per matrix; 3: one uint64 blob, zero-padded
SHARD_VERSION = 3
BLOB_ALIGN = 8  # version 3: bytes per blob word


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
               metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically (temporary name, then rename); same inputs, same bytes."""
    import torch
    from safetensors.torch import save_file

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
    for name, enc in encoded.items():
        if name in tensors or SEP in name:
            raise ValueError(f"encoded matrix name {name!r} clashes with a tensor or contains {SEP!r}")
        out[f"{name}{SEP}{BLOB}"] = torch.from_numpy(padded_blob(enc))
    header = {"format": SHARD_FORMAT, "format_version": SHARD_VERSION,
              "encoded": {n: e.kind for n, e in sorted(encoded.items())},
              "checksums": {n: _crc(t) for n, t in sorted(out.items())}}
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


def _header(path: str, meta: dict[str, str] | None) -> dict:
    if not meta or HEADER_KEY not in meta:
        raise FormatError(f"{path}: no qmoe header; not a qmoe shard (or written by another tool)")
    try:
        header = json.loads(meta[HEADER_KEY])
        version = header["format_version"]
        ok = (header["format"] == SHARD_FORMAT and isinstance(version, int)
              and isinstance(header["encoded"], dict) and isinstance(header["checksums"], dict))
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: qmoe header is corrupt ({e})") from None
    if not ok:
        raise FormatError(f"{path}: qmoe header is corrupt")
    if version > SHARD_VERSION:
        raise FormatError(f"{path}: shard format version {version} is newer than this qmoe reads "
                          f"({SHARD_VERSION}); upgrade qmoe")
    if version < 1:
        raise FormatError(f"{path}: shard format version {version} is invalid")
    return header


def load_shard(path: str | os.PathLike, verify: bool = True) -> Shard:
    """Read a shard written by ``save_shard``. ``verify`` checks every tensor's crc32 (and each matrix's).

    Raises FormatError naming the file or the tensor on any corruption, truncation or newer version.
    """
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
    if set(checksums) != set(names):
        odd = sorted(set(checksums) ^ set(names))[:5]
        raise FormatError(f"{path}: tensors and checksum list disagree (e.g. {odd}); the file is corrupt")
    if verify:
        for n in names:
            if _crc(raw[n]) != checksums[n]:
                raise FormatError(f"{path}: tensor {n!r} fails its crc32 check; the file is corrupt")
    shard = Shard(metadata={k: v for k, v in meta.items() if k != HEADER_KEY})
    for name, kind in header["encoded"].items():
        try:
            if header["format_version"] >= 2:
                blob = raw.pop(f"{name}{SEP}{BLOB}", None)
                if blob is None:
                    raise FormatError(f"{path}: encoded matrix {name!r} lacks its {BLOB!r} tensor")
                enc = EncodedMatrix.from_blob(blob.numpy().view(np.uint8), verify=verify,
                                              padded=header["format_version"] >= 3)
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
    """Estimated bytes one encoded matrix adds to its shard besides its arrays: its safetensors entries
    (offsets taken as ``offset_digits`` digits), its checksum and its kind in the qmoe header, and the zero
    padding of its blob to whole words. ``header_share`` measures the same on a written file."""
    t = f"{name}{SEP}{BLOB}"
    off = 10 ** (offset_digits - 1)
    n = -len(enc.to_blob()) % BLOB_ALIGN
    n += _escaped_len(f'"{name}":"{enc.kind}",')
    n += _tensor_entry_len(t, "U64", [-(-enc.nbytes // BLOB_ALIGN)], [off, off])
    n += _escaped_len(f'"{t}":"00000000",')
    return n


def header_share(path: str | os.PathLike, matrices: list[str]) -> int:
    """Bytes of ``path``'s safetensors header that belong to the encoded matrices ``matrices``.

    Counted: each of their tensors' entries (name, dtype, shape, offsets), their crc32 entries and kind
    entries in the qmoe header (as escaped inside it), and the zero padding after each blob (version 3).
    Not counted: the header's fixed part and its padding.
    """
    from qmoe.codec.format import HEADER_WORDS, blob_nbytes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        qh = json.loads(header["__metadata__"][HEADER_KEY])
        wanted = set(matrices)
        total = 0
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
