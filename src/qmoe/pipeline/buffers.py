"""Calibration activations ``[N, S, d]`` float32 on the CPU, spilled to a disk memmap past a byte budget.

QMoE keeps the activations of every calibration sample in CPU memory and streams them through the GPU one
block at a time; for long runs or big calibration sets they need not fit in RAM: a buffer that would exceed
the budget lives in a ``np.memmap`` file instead (the OS pages it). Buffers are updated in place, one
micro-batch of samples at a time (a sample's output depends only on that sample).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class MemoryBudget:
    """Bytes of activations allowed in RAM; what does not fit is spilled to ``spill_dir``."""

    def __init__(self, nbytes: int, spill_dir: Path) -> None:
        self.free = nbytes
        self.spill_dir = spill_dir

    def take(self, nbytes: int) -> bool:
        if nbytes <= self.free:
            self.free -= nbytes
            return True
        return False

    def give(self, nbytes: int) -> None:
        self.free += nbytes


class ActivationBuffer:
    """One stream's hidden states ``[N, S, d]`` float32 (RAM or memmap, same interface)."""

    def __init__(self, name: str, shape: tuple[int, int, int], budget: MemoryBudget) -> None:
        self.name = name
        self.shape = shape
        self.nbytes = 4 * shape[0] * shape[1] * shape[2]
        self._budget = budget
        self.in_ram = budget.take(self.nbytes)
        self._file: Path | None = None
        if self.in_ram:
            self.data = torch.empty(shape, dtype=torch.float32)
        else:
            budget.spill_dir.mkdir(parents=True, exist_ok=True)
            self._file = budget.spill_dir / f"spill-{name.replace('/', '-')}.f32"
            mm = np.memmap(self._file, dtype=np.float32, mode="w+", shape=shape)
            self.data = torch.from_numpy(mm)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> list[tuple[int, int]]:
        return [(i, min(i + batch_size, self.shape[0])) for i in range(0, self.shape[0], batch_size)]

    def save(self, path: Path) -> None:
        """Snapshot to ``path`` (.npy) atomically: a temporary name, fsync, then rename."""
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, self.data.numpy(), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, name: str, path: Path, budget: MemoryBudget) -> ActivationBuffer:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        buf = cls(name, tuple(arr.shape), budget)
        rows = max(1, (64 << 20) // max(1, buf.nbytes // max(1, len(buf))))  # copy in ~64 MiB pieces
        for i0, i1 in buf.batches(rows):
            buf.data[i0:i1] = torch.from_numpy(np.array(arr[i0:i1]))
        del arr
        return buf

    def release(self) -> None:
        if self.in_ram:
            self._budget.give(self.nbytes)
        self.data = torch.empty(0)
        if self._file is not None and self._file.exists():
            self._file.unlink()


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A micro-batch on the compute device (a copy for memmaps, so the map's pages can be dropped)."""
    return t.to(device, copy=True) if device.type == "cpu" else t.to(device, non_blocking=False)
