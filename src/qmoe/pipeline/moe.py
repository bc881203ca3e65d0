"""One MoE layer during compression: stacked expert weights, routed-token capture, per-expert Hessians.

The layer's experts module is given a new ``forward`` (an instance attribute, so the block's own code runs
unchanged up to the routing decision) that reads the routing from its arguments through the adapter and
then, depending on the mode:

- ``"first"``: feeds each expert's routed tokens (the normed block input) into ``H_first [E, d, d]``;
- ``"second"``: feeds ``glu(x W_first^T + b_first)`` -- with the *already quantized* first projection, so
  that the second projection compensates the first one's error (GPTQ's true-sequential order) -- into
  ``H_second [E, I, I]``;
- ``"run"``: computes the layer's output with the current weights (counting routed tokens when asked).

In the two capture modes the output is not needed (the MoE layer is the last op of the block in every
supported family and the block's output is thrown away), so it returns zeros and skips the expert math.

Token cap (QMoE): an expert's Hessian takes at most ``cap`` tokens, the first ones in sample order; the
same tokens in both capture passes, since routing does not depend on the expert weights. ``token_mask``
(``[T]`` bool for the current batch, set by the pipeline) keeps masked positions (span-corruption
sentinels) out of the Hessians and out of the cap's count; the Hessians' own ``counts`` are what entered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from qmoe.adapters import Adapter, expert_hidden
from qmoe.adapters.base import Routing, combine, expert_outputs, group_by_expert
from qmoe.gptq import HessianAccumulator


class MoELayerCalibration:
    """Stacked experts ``w_first [E_r, F*I, d]`` and ``w_second [E_r, d, I]`` (float32, compute device) of
    the ``owned`` experts (all ``E`` in one process; a contiguous share in a distributed run, whose ``dist``
    then combines every rank's expert outputs in ``"run"`` mode, qmoe.pipeline.dist)."""

    def __init__(
        self,
        adapter: Adapter,
        w_first: Tensor,
        w_second: Tensor,
        glu: Callable[[Tensor], Tensor],
        cap: int | None,
        gate_weighted: bool = False,
        biases: tuple[Tensor, Tensor] | None = None,
        owned: range | None = None,
        n_experts: int | None = None,
        dist: Any = None,
    ) -> None:
        self.adapter = adapter
        self.w_first, self.w_second = w_first, w_second
        self.glu = glu  # [t, F*I] -> [t, I]
        self.b_first, self.b_second = (None, None) if biases is None else biases  # [E_r, F*I], [E_r, d]
        self.n_experts = w_first.shape[0] if n_experts is None else n_experts
        self.dist = dist
        # The experts whose weights, Hessians and outputs this process computes (a distributed run splits
        # them, qmoe.pipeline.dist): weights and accumulators hold experts owned.start, ... at rows 0, 1, ...
        self.owned = range(self.n_experts) if owned is None else owned
        self.cap = cap
        self.gate_weighted = gate_weighted
        self.mode = "run"
        self.count_tokens = False
        self.hessian: HessianAccumulator | None = None
        self.token_mask: Tensor | None = None  # [T] bool for the current batch; None: every token counts
        self.routed = torch.zeros(self.n_experts, dtype=torch.int64)  # [E] tokens the router sent, all passes
        self._seen = torch.zeros(self.n_experts, dtype=torch.int64)  # [E] routed so far in this capture pass
        # Shared experts being quantized (--shared-experts): (w_first [1, F*I_s, d], w_second [1, d, I_s]);
        # every unmasked token enters their Hessian (no cap, no gate weight), in the same capture passes.
        self.shared: tuple[Tensor, Tensor] | None = None
        self.shared_hessian: HessianAccumulator | None = None
        # The budget's sensitivity pass (qmoe.pipeline.sensitivity): in "run" mode, while ``stats_on``, add
        # each expert's gate-weighted output energy sum g^2 ||y||^2 into stats["energy"] [E] (float64), the
        # layer output's sum of squares into stats["out_sq"] and its positions into stats["positions"].
        self.stats: dict[str, Any] | None = None
        self.stats_on = False
        # ``row_prices="output"`` (qmoe.pipeline.rows): in "first" mode also each first-projection row's
        # output sensitivity [E_r, F*I] (float64), from the same tokens as the Hessian
        self.row_weighted = False
        self.row_sens: Tensor | None = None

    def install(self, experts_module: torch.nn.Module) -> None:
        experts_module.forward = self._forward  # type: ignore[method-assign]

    def start(self, mode: str, count_tokens: bool = False) -> None:
        """Begin a pass over the calibration stream in ``mode`` ("first", "second" or "run")."""
        assert mode in ("first", "second", "run"), mode
        self.mode, self.count_tokens = mode, count_tokens
        self._seen.zero_()
        if mode == "first":
            cols = self.w_first.shape[2]
        elif mode == "second":
            cols = self.w_second.shape[2]
        else:
            self.hessian = self.shared_hessian = None
            return
        self.hessian = HessianAccumulator(len(self.owned), cols, device=self.w_first.device)
        if mode == "first":
            self.row_sens = (torch.zeros(len(self.owned), self.w_first.shape[1], dtype=torch.float64,
                                         device=self.w_first.device) if self.row_weighted else None)
        if self.shared is not None:
            shared_cols = self.shared[0 if mode == "first" else 1].shape[2]
            self.shared_hessian = HessianAccumulator(1, shared_cols, device=self.w_first.device)

    def _forward(self, *args: Any, **kwargs: Any) -> Tensor:
        r = self.adapter.routing(args, kwargs)
        if self.count_tokens:
            self.routed += torch.bincount(r.expert.cpu(), minlength=self.n_experts)
        if self.mode == "run":
            parts = expert_outputs(
                r, self.w_first, self.w_second, self.glu, self.b_first, self.b_second, self.owned
            )
            if self.dist is not None and self.dist.active:
                parts = self._all_parts(parts, r.x)
            out = combine(torch.zeros_like(r.x), parts)  # [T, d]
            if self.stats is not None and self.stats_on:
                for e, _, y in parts:
                    self.stats["energy"][e] += float(y.double().pow(2).sum())
                self.stats["out_sq"] += float(out.double().pow(2).sum())
                self.stats["positions"] += out.shape[0]
            return out
        self._capture(r)
        return torch.zeros_like(r.x)

    def _all_parts(
        self, parts: list[tuple[int, Tensor, Tensor]], x: Tensor
    ) -> list[tuple[int, Tensor, Tensor]]:
        """Every rank's ``(expert, token [t], output [t, d])`` in ascending expert order (ranks own ascending
        ranges), so that they are added as in one process."""
        d = x.shape[1]
        expert = torch.cat(
            [torch.full((len(t),), e, dtype=torch.int64, device=x.device) for e, t, _ in parts]
            or [torch.zeros(0, dtype=torch.int64, device=x.device)]
        )
        token = torch.cat([t for _, t, _ in parts] or [torch.zeros(0, dtype=torch.int64, device=x.device)])
        y = torch.cat([v for _, _, v in parts] or [x.new_zeros(0, d)])
        experts, tokens, ys = (self.dist.all_gather_rows(t) for t in (expert, token.long(), y))
        out = []
        for es, ts, vs in zip(experts, tokens, ys, strict=True):
            if es.numel() == 0:
                continue
            values, counts = torch.unique_consecutive(es, return_counts=True)
            start = 0
            for e, c in zip(values.tolist(), counts.tolist(), strict=True):
                out.append((e, ts[start : start + c], vs[start : start + c]))
                start += c
        return out

    def _capture(self, r: Routing) -> None:
        xs, es = [], []
        for e, tok, gate in group_by_expert(r):
            if self.token_mask is not None:
                keep = self.token_mask.to(tok.device)[tok]
                tok, gate = tok[keep], gate[keep]
            take = (
                tok.numel() if self.cap is None else max(0, min(tok.numel(), self.cap - int(self._seen[e])))
            )
            self._seen[e] += tok.numel()
            if take == 0 or e not in self.owned:
                continue
            x = r.x[tok[:take]]  # [t, d]: the first tokens in sample order
            if self.mode == "first" and self.row_sens is not None:
                from qmoe.pipeline.rows import first_row_sensitivity

                i = e - self.owned.start
                b = None if self.b_first is None else self.b_first[i]
                weights = gate[:take] if self.gate_weighted else None
                self.row_sens[i] += first_row_sensitivity(x, weights, self.w_first[i], b, self.w_second[i],
                                                          self.glu)
            if self.mode == "second":
                i = e - self.owned.start
                b = None if self.b_first is None else self.b_first[i]
                x = expert_hidden(x, self.w_first[i], self.glu, b)  # [t, I]
            if self.gate_weighted:  # the layer adds g * expert(x): a token's error counts g^2 times
                x = x * gate[:take, None].to(x.dtype)
            xs.append(x)
            es.append(torch.full((take,), e - self.owned.start, dtype=torch.int64, device=x.device))
        if xs:
            assert self.hessian is not None
            self.hessian.add(torch.cat(es), torch.cat(xs).float())
        if self.shared is not None and self.shared_hessian is not None:
            x = r.x if self.token_mask is None else r.x[self.token_mask.to(r.x.device)]  # [t, d]
            if self.mode == "second":
                x = expert_hidden(x, self.shared[0][0], self.glu)  # [t, I_s]
            zeros = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
            self.shared_hessian.add(zeros, x.float())
