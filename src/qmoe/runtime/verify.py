"""``qmoe verify DIR``: check every byte of a compressed checkpoint without loading the model.

``qmoe.load`` checks the non-expert tensors at load and each expert matrix on its first use
(``qmoe.codec.mapped``), so a model larger than memory starts without reading its files. ``verify_dir``
checks what load leaves for later, in one sequential pass over each shard: the directory (config, index,
every shard present), every tensor's crc32, every encoded matrix's crc32 and structure
(``EncodedMatrix.from_blob``), that each MoE layer has every expert with the shape ``config.json`` implies,
and that the index names each tensor where it is. It reads the files with ``pread`` in chunks of whole
tensors (about 64 MiB), not through a mapping, and tells the kernel to drop each chunk from the page cache,
so it neither grows the resident set nor evicts other work's cache.

Problems are collected, not raised: one line each, naming file and tensor (and row where the stream shows
it), so that one run lists every damaged matrix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmoe.errors import FormatError

CHUNK = 64 << 20  # bytes read per step (whole tensors; a larger tensor is read alone)


@dataclass
class Verification:
    """What ``verify_dir`` checked and what it found."""

    path: str
    files: int = 0
    tensors: int = 0
    matrices: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "files": self.files, "tensors": self.tensors,
                "matrices": self.matrices, "bytes": self.bytes, "seconds": self.seconds,
                "problems": list(self.problems)}


def _expected(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Every expert matrix the model needs -> its shape ``[out, in]``."""
    from qmoe.adapters import get_adapter

    adapter = get_adapter(cfg)
    layout = adapter.experts
    shapes = {p: tuple(layout.shape(cfg, p)) for p in layout.projections}
    dropped = (cfg.get("quantization_config") or {}).get("dropped_experts") or {}
    out = {}
    for layer in adapter.moe_layers(cfg):
        disk = adapter.disk_key(layer)
        gone = set(dropped.get(disk, ()))  # experts the budget gave no weights: nothing stored
        for e in range(adapter.num_experts(cfg)):
            if e not in gone:
                out.update({layout.expert_key(disk, e, p): shapes[p] for p in layout.projections})
    return out


def _chunks(items: list[tuple[int, int, Any]]) -> list[tuple[int, int, list[Any]]]:
    """Group ``(begin, end, item)`` into reads ``(begin, end, items)`` of about CHUNK bytes, by offset."""
    out: list[tuple[int, int, list[Any]]] = []
    for b, e, item in sorted(items, key=lambda t: t[0]):
        if out and e - out[-1][0] <= CHUNK:
            out[-1] = (out[-1][0], e, [*out[-1][2], item])
        else:
            out.append((b, e, [item]))
    return out


def verify_dir(path: str | Path, progress: Callable[[int, int], None] | None = None) -> Verification:
    """Check the compressed checkpoint in ``path`` (module docstring); ``progress(done, total)`` is called
    with bytes after each chunk. Raises a QMoEError only when the directory cannot be checked at all (no
    config, unknown family, missing index); damage is reported in ``Verification.problems``."""
    import json
    import zlib

    from qmoe.codec.mapped import MappedMatrix, open_shard
    from qmoe.runtime.load import INDEX_FILE, check_dir

    t0 = time.perf_counter()
    root, cfg, files = check_dir(path)
    report = Verification(str(root))
    expected = _expected(cfg)
    index = root / INDEX_FILE
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    total = sum(f.stat().st_size for f in files)
    done = 0
    found: set[str] = set()
    for f in files:
        try:
            shard = open_shard(f)
        except FormatError as err:
            report.problems.append(str(err))
            done += f.stat().st_size
            continue
        report.files += 1
        names = [*shard.tensors, *shard.encoded]
        if weight_map is not None:
            wrong = [n for n in names if weight_map.get(n) != f.name]
            if wrong:
                report.problems.append(f"{f}: {len(wrong)} tensors are not listed for this file in "
                                       f"{INDEX_FILE} (first: {wrong[0]!r}); the index is corrupt")
        items = [(e.begin, e.end, ("tensor", n)) for n, e in shard.tensors.items()]
        for n, m in shard.encoded.items():
            items.append((min(p.begin for p in m.parts.values()), max(p.end for p in m.parts.values()),
                          ("matrix", n)))
        fd = os.open(f, os.O_RDONLY)
        try:
            for b, e, group in _chunks(items):
                buf = os.pread(fd, e - b, b)
                if len(buf) != e - b:
                    report.problems.append(f"{f}: cut short at byte {b + len(buf)}; the file is truncated")
                    break
                for kind, n in group:
                    if kind == "tensor":
                        report.tensors += 1
                        t = shard.tensors[n]
                        crc = zlib.crc32(memoryview(buf)[t.begin - b:t.end - b])
                        if f"{crc:08x}" != shard.checksums[n]:
                            report.problems.append(f"{f}: tensor {n!r} fails its crc32 check")
                        continue
                    report.matrices += 1
                    m: MappedMatrix = shard.encoded[n]
                    found.add(n)
                    try:
                        enc = m.verify(buf, base=b)
                    except FormatError as err:
                        report.problems.append(str(err))
                        continue
                    want = expected.get(n)
                    if want is not None and tuple(enc.shape) != want:
                        report.problems.append(f"{f}: encoded matrix {n!r} has shape {tuple(enc.shape)}, "
                                               f"config.json implies {want}")
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, b, e - b, os.POSIX_FADV_DONTNEED)
                done += e - b
                report.bytes += e - b
                if progress is not None:
                    progress(done, total)
        finally:
            os.close(fd)
    missing = sorted(set(expected) - found)
    if missing:
        report.problems.append(f"{root}: {len(missing)} expert matrices are missing from the shards (first: "
                               f"{missing[0]!r}); the checkpoint is incomplete")
    report.seconds = time.perf_counter() - t0
    if progress is not None:
        progress(total, total)
    return report
