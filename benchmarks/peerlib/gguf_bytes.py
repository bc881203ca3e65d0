"""Bytes a GGUF file spends on each tensor, read from the file's own header (GGUF v2/v3), without the gguf
package: the tensor's data, the padding to the file's alignment after it, and its tensor-info entry.

Layout (little-endian; ggml/docs/gguf.md): magic ``GGUF``, u32 version, u64 tensor count, u64 key-value
count, the key-value pairs, then per tensor: string name, u32 n_dims, u64 dims[n_dims], u32 ggml type,
u64 data offset; data starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

# ggml type id -> (name, weights per block, bytes per block): ggml/src/ggml-common.h block structs
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
}
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes


@dataclass(frozen=True)
class TensorBytes:
    name: str
    type: str
    shape: tuple[int, ...]  # numpy order (outermost first): [E, out, in] for stacked experts
    data: int  # bytes of the encoded blocks
    padding: int  # alignment bytes after them (or before the next tensor)
    info: int  # bytes of the tensor-info entry in the header

    @property
    def weights(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def total(self) -> int:
        return self.data + self.padding + self.info


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("Q")
        s = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:  # array: element type, count, elements
            etype, n = self.take("I"), self.take("Q")
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALAR:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {self.pos}")
        fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[
            vtype
        ]
        return self.take(fmt)


def tensor_bytes(path: str | Path) -> list[TensorBytes]:
    """Every tensor of the GGUF file ``path`` with the bytes it occupies. Reads the header only."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(min(size, 64 << 20))
    r = _Reader(head)
    if head[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {head[:4]!r})")
    r.pos = 4
    version = r.take("I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not read here (2 and 3 are)")
    n_tensors, n_kv = r.take("Q"), r.take("Q")
    alignment = 32
    for _ in range(n_kv):
        key = r.string()
        value = r.value(r.take("I"))
        if key == "general.alignment":
            alignment = int(value)
    infos = []
    for _ in range(n_tensors):
        start = r.pos
        name = r.string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        gtype, offset = r.take("I"), r.take("Q")
        infos.append((name, tuple(reversed(dims)), gtype, offset, r.pos - start))
    data_start = -(-r.pos // alignment) * alignment
    out = []
    offsets = sorted(o for _, _, _, o, _ in infos) + [size - data_start]
    for name, shape, gtype, offset, info in infos:
        if gtype not in GGML_TYPES:
            raise ValueError(f"{path}: tensor {name} has ggml type {gtype}, unknown here")
        tname, block, block_bytes = GGML_TYPES[gtype]
        n = 1
        for d in shape:
            n *= d
        assert n % block == 0, f"{name}: {n} weights are not whole {tname} blocks"
        data = n // block * block_bytes
        end = next(o for o in offsets if o > offset)  # the next tensor's data, or the end of the file
        assert end - offset >= data, f"{name}: {end - offset} bytes hold less than {data} of {tname}"
        out.append(TensorBytes(name, tname, shape, data, end - offset - data, info))
    return out
