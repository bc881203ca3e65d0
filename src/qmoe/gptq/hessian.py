"""Per-expert Hessian accumulation: ``sum x x^T`` over the tokens routed to each expert, ``[E, cols, cols]``.

Convention: ``H = 2/n * sum x x^T`` over the ``n`` tokens an expert saw (GPTQ's running mean). The scale does
not change GPTQ's result (damping is relative to the mean diagonal), only the objective's units.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qmoe.errors import ConfigError

_PAD_ELEMS = 1 << 26  # cap on the padded [experts, tokens, cols] buffer in HessianAccumulator.add


class HessianAccumulator:
    """Streams ``sum x x^T`` per expert over token batches: ``[E, cols, cols]`` plus a token count per expert.

    ``add`` takes the tokens of many experts at once; they are grouped by expert and multiplied as one padded,
    batched GEMM (experts sorted by token count, so padding stays small), never token by token.
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

        # Rank experts by token count (descending) and sort tokens by that rank: each chunk of consecutive
        # ranks is a contiguous token range whose padded [m, c_max, cols] buffer wastes at most half its rows.
        by_count = torch.argsort(counts, descending=True, stable=True)  # [E] expert at each rank
        rank = torch.empty_like(by_count)
        rank[by_count] = torch.arange(E, device=idx.device)
        key = rank[idx]  # [T]
        order = torch.argsort(key, stable=True)
        xs, key = x[order], key[order]  # [T, cols], [T] (ascending rank)
        sorted_counts = counts[by_count].tolist()
        starts = [0]
        for c in sorted_counts:
            starts.append(starts[-1] + c)
        n_present = sum(1 for c in sorted_counts if c > 0)
        r0 = 0
        while r0 < n_present:
            c_max, r1, total = sorted_counts[r0], r0 + 1, sorted_counts[r0]
            while r1 < n_present:
                m, total_next = r1 - r0 + 1, total + sorted_counts[r1]
                if m * c_max > 2 * total_next or m * c_max * cols > _PAD_ELEMS:
                    break
                r1, total = r1 + 1, total_next
            t0, t1 = starts[r0], starts[r1]
            slot = key[t0:t1] - r0  # [t] chunk slot of each token
            first_token = torch.tensor(starts, device=idx.device)[key[t0:t1]]
            pos = torch.arange(t0, t1, device=idx.device) - first_token  # [t] row within its expert
            padded = xs.new_zeros(r1 - r0, c_max, cols)  # [m, c_max, cols]
            padded[slot, pos] = xs[t0:t1]
            self._sum.index_add_(0, by_count[r0:r1], padded.transpose(1, 2) @ padded)  # [m, cols, cols]
            r0 = r1


