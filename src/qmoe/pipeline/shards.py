"""Lazy, low-memory reading of a Hugging Face checkpoint's weights, one group of tensors at a time.

Shapes and dtypes come from the safetensors headers (8-byte length + JSON, parsed without mapping the
data), so checks of the whole checkpoint cost no I/O beyond the headers. Tensors are read with
``safe_open`` per call and the file is closed again: an mmap that stays open keeps every page it ever
touched resident, and the resident set would grow with the model instead of with one block.
``pytorch_model*.bin`` files are read with ``torch.load(weights_only=True, mmap=True)`` (no pickle code runs).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from qmoe.errors import SourceError

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise SourceError(f"{path} is not a readable safetensors file ({exc}); re-download it") from exc
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _ST_DTYPES:
            raise SourceError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        out[name] = (tuple(info["shape"]), _ST_DTYPES[info["dtype"]])
    return out


class ShardReader:
    """The tensors of a model directory: ``keys``, ``shape``, ``dtype``, and ``get_many`` (source dtype)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.files = self._weight_files()
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for f in self.files:
            header = _safetensors_header(f) if f.suffix == ".safetensors" else self._bin_header(f)
            for name, meta in header.items():
                self._where[name] = f
                self._meta[name] = meta

    def _weight_files(self) -> list[Path]:
        for index in WEIGHT_INDEXES:
            p = self.path / index
            if p.is_file():
                try:
                    weight_map = json.loads(p.read_text())["weight_map"]
                except (OSError, ValueError, KeyError) as exc:
                    raise SourceError(f"{p} is not a valid weight index ({exc})") from exc
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not (self.path / f).is_file()]
                if missing:
                    raise SourceError(
                        f"{self.path} lacks {len(missing)} of the {len(files)} weight shards listed in "
                        f"{index} (first: {missing[0]}); download the missing files"
                    )
                return [self.path / f for f in files]
        for name in WEIGHT_FILES:
            if (self.path / name).is_file():
                return [self.path / name]
        raise SourceError(
            f"{self.path} holds no weights (model.safetensors, a sharded index or "
            "pytorch_model.bin); download the model's weight files into it"
        )

    @staticmethod
    def _load_bin(path: Path) -> dict[str, Tensor]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
            raise SourceError(
                f"cannot read {path} safely ({type(exc).__name__}: {str(exc)[:120]}); "
                "convert it to safetensors"
            ) from exc

    def _bin_header(self, path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self._load_bin(path).items()}

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def numel(self, key: str) -> int:
        n = 1
        for s in self.shape(key):
            n *= s
        return n

    def nbytes(self, key: str) -> int:
        return self.numel(key) * self.dtype(key).itemsize

    def get(self, key: str) -> Tensor:
        return self.get_many([key])[key]

    def get_many(self, keys: Iterable[str]) -> dict[str, Tensor]:
        """Tensors by key, in the source dtype, each file opened once and closed again."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self._where:
                raise SourceError(
                    f"{self.path} has no tensor {k}; the checkpoint does not match its config.json"
                )
            by_file.setdefault(self._where[k], []).append(k)
        out: dict[str, Tensor] = {}
        for f, names in by_file.items():
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as h:
                    for k in names:
                        out[k] = h.get_tensor(
                            k
                        ).clone()  # own the memory: no page of the map outlives the file
            else:
                sd = self._load_bin(f)
                for k in names:
                    out[k] = sd[k].clone()
                del sd
        return out
