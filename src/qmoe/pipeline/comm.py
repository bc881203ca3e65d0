"""The communication a compression run needs, for one process: every collective is the identity.

The pipeline's stages receive a communication object explicitly and call its collectives where the
algorithm needs the other ranks (a Hessian-capture pass, a size search summing a group's bytes, gathering
encoded matrices); none is hidden in a callback. :class:`Local` is the one-process version; the torchrun
version, :class:`qmoe.pipeline.dist.Dist`, has the same methods and says what each does across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

T = TypeVar("T")


class Local:
    """One process holding every expert: rank 0 of 1."""

    rank = 0
    world = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def close(self) -> None:
        """Nothing to end (a torchrun job ends its process group here)."""

    # -- work split ------------------------------------------------------------------------------------------
    def owned(self, n_experts: int) -> range:
        """The experts this rank quantizes: a contiguous range, sizes differing by at most one."""
        return range(self.rank * n_experts // self.world, (self.rank + 1) * n_experts // self.world)

    def mine(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """``(index, item)`` of the items this rank computes: every ``world``-th, starting at ``rank``."""
        return [(j, it) for j, it in enumerate(items) if j % self.world == self.rank]

    # -- errors and collectives: the identity in one process -------------------------------------------------
    def guard(self, fn: Callable[[], T], where: str) -> T:
        return fn()

    def gather_experts(self, local: Tensor, n_experts: int) -> Tensor:
        return local

    def all_gather_rows(self, local: Tensor) -> list[Tensor]:
        return [local]

    def share_rows(self, data: Tensor, batches: Sequence[tuple[int, int]]) -> None:
        return None

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        return list(values)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        return [obj]

    def barrier(self) -> None:
        return None

    def check_shared_dir(self, path: Path) -> None:
        return None


LOCAL = Local()
