"""Per-expert Hessian accumulation: ``sum x x^T`` over the tokens routed to each expert, ``[E, cols, cols]``.

Convention: ``H = 2/n * sum x x^T`` over the ``n`` tokens an expert saw (GPTQ's running mean). The scale does
not change GPTQ's result (damping is relative to the mean diagonal), only the objective's units.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qmoe.errors import ConfigError


class HessianAccumulator:
    """Streams ``sum x x^T`` per expert over token batches: ``[E, cols, cols]`` plus a token count per expert.

    ``add`` takes the tokens of many experts at once; they are grouped by expert and each expert's tokens go
    through one GEMM, never token by token.
    """

    def __init__(
        self,
        n_experts: int,
        cols: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._sum = torch.zeros(n_experts, cols, cols, device=device, dtype=dtype)  # [E, cols, cols]
        self.counts = torch.zeros(n_experts, dtype=torch.int64, device=self._sum.device)  # [E]

    @property
    def H(self) -> Tensor:
        """``2/n * sum x x^T`` per expert ``[E, cols, cols]``; all zeros for an expert with no tokens."""
        scale = 2.0 / self.counts.clamp(min=1).to(self._sum.dtype)  # [E]
        return self._sum * scale[:, None, None]

    def add(self, expert_idx: Tensor, x: Tensor) -> None:
        """Add tokens ``x [T, cols]``, token ``t`` routed to expert ``expert_idx[t]`` (``[T]`` integer)."""
        E, cols = self._sum.shape[0], self._sum.shape[-1]
        if x.dim() != 2 or x.shape[1] != cols or expert_idx.shape != (x.shape[0],):
            raise ConfigError(
                f"HessianAccumulator.add expects expert_idx [T] and x [T, {cols}], "
                f"got {tuple(expert_idx.shape)} and {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return
        idx = expert_idx.to(self._sum.device, torch.int64)
        if int(idx.min()) < 0 or int(idx.max()) >= E:
            lo, hi = int(idx.min()), int(idx.max())
            raise ConfigError(f"expert indices must lie in [0, {E}), got values in [{lo}, {hi}]")
        x = x.to(self._sum.device, self._sum.dtype)
        counts = torch.bincount(idx, minlength=E)  # [E]
        self.counts += counts

        # One GEMM per expert over exactly its own tokens ([t_e, cols] -> [cols, cols]): an expert's Hessian
        # then does not depend on which other experts share the call, so a distributed run, whose ranks each
        # hold a share of the experts, sums every Hessian exactly as one process does (qmoe.pipeline.dist).
        # (The padded, batched GEMM used before rounded differently depending on which experts shared it:
        # measured, a 2-rank run then differed from one process in the last bits of some Hessians.)
        order = torch.argsort(idx, stable=True)  # tokens grouped by expert, in their order within each
        xs = x[order]  # [T, cols]
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                xe = xs[start : start + c]  # [t_e, cols]
                self._sum[e].addmm_(xe.T, xe)
                start += c


