"""One MoE block of a compression run: capture, quantize, run the compressed streams, encode.

In order (QMoE, Frantar & Alistarh 2023, section 4; GPTQ's true-sequential order inside the layer):

1. the reference evaluation streams go through the original block;
2. capture ``H_first`` from each expert's routed calibration tokens (token cap per expert), quantize the
   fused first projections; capture ``H_second`` from ``act(x W_first_q^T)``, quantize the second
   projection (round-to-nearest skips both captures);
3. the block's norms are tuned toward the original model's hidden states (``qmoe.pipeline.tune``);
   the calibration stream and the compressed evaluation streams go through the *quantized* block (with
   the budget's dropped experts masked in the router);
4. the quantized experts are encoded; rank 0 writes the block's shard and returns its report row.

A group's size follows the run's settings: the configured bit price, a per-group ``--target-bits``, or the
model-wide budget plan's share (``qmoe.pipeline.budget``), whose drift correction needs the bits spent so
far: ``spent`` comes in and goes out, nothing else is carried between blocks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qmoe.codec.container import header_share
from qmoe.gptq import QuantizedExperts
from qmoe.pipeline import output, report
from qmoe.pipeline.budget import MAX_MULTIPLIER, BudgetPlan
from qmoe.pipeline.context import RunContext, layer_calibration, load_block, shared_modules
from qmoe.pipeline.encode import GroupSize, encode_experts, encode_fused
from qmoe.pipeline.moe import MoELayerCalibration
from qmoe.pipeline.preflight import BlockPlan
from qmoe.pipeline.quantize import Quantized, expert_rates, quantize, quantize_to_size
from qmoe.pipeline.state import kill_hook
from qmoe.pipeline.streams import Streams
from qmoe.pipeline.tune import tune_block

FAIL_ENV = "QMOE_TEST_FAIL"  # "R:LAYER": rank R raises in the GPTQ of MoE layer LAYER (distributed tests)


@dataclass(frozen=True)
class BlockResult:
    row: dict[str, Any] | None  # the MoE layer's report row (rank 0; None elsewhere and for a dense block)
    spent_bits: float  # stored bits of the groups quantized so far, this block's included (budget drift)


def dropped_experts(budget: BudgetPlan | None, moe_path: str | None) -> frozenset[int]:
    """Experts of the MoE layer at ``moe_path`` that the budget plan gives no weights."""
    return frozenset() if budget is None or moe_path is None else budget.dropped(moe_path)


def dense_block(ctx: RunContext, streams: Streams, bp: BlockPlan) -> None:
    """A block without experts: every stream through it; its tensors written as they are."""
    block, raw = load_block(ctx, bp)
    for s in streams.all:
        streams.propagate(block, bp, s, write=True, what="dense")
    if ctx.comm.main:
        output.write_shard(ctx.plan.out, bp.g + 1, 1 + len(ctx.plan.blocks), raw, {})


def moe_block(
    ctx: RunContext, streams: Streams, bp: BlockPlan, budget: BudgetPlan | None, spent: float
) -> BlockResult:
    t0 = time.perf_counter()
    comm, E = ctx.comm, ctx.plan.n_experts
    block, raw = load_block(ctx, bp)
    owned = comm.owned(E)  # the experts whose weights, Hessians, GPTQ and outputs this process computes
    dropped = dropped_experts(budget, bp.moe_path)
    cal = layer_calibration(ctx, block, raw, bp, owned, comm)
    shared = _SharedExperts(ctx, block, bp, cal)
    cal.start("run")
    for s in streams.all:
        if s.reference:
            streams.propagate(block, bp, s, write=True, what="reference")
    quantize_group = _Groups(ctx, bp, owned.start, budget, dropped)
    H1 = _capture(ctx, streams, block, bp, cal, "first", dropped)
    used = [0] * E if H1 is None else comm.gather_experts(H1.counts.cpu(), E).tolist()
    g1, spent = quantize_group(cal.w_first, H1, "first", spent, cal.row_sens)
    del H1
    cal.row_sens = None
    cal.w_first = g1.q.dequantized.to(ctx.device)
    shared.quantize_first()
    kill_hook("during", bp.g)
    H2 = _capture(ctx, streams, block, bp, cal, "second", dropped)
    assert H2 is None or H2.counts.tolist() == used[owned.start : owned.stop], "same tokens in both passes"
    g2, spent = quantize_group(cal.w_second, H2, "second", spent)
    del H2
    cal.w_second = g2.q.dequantized.to(ctx.device)
    shared_encoded = shared.finish()
    gptq, tuning = ctx.config.method == "gptq", ctx.config.tune != "none"
    if not gptq and tuning:  # RTN counts routing before the norms change it, as GPTQ's capture pass does
        cal.start("run", count_tokens=True)
        streams.propagate(block, bp, streams.calib, write=False, what="routing", dropped=dropped)
    tuned = ctx.comm.guard(
        lambda: tune_block(ctx, streams, block, bp, cal, raw, dropped),
        f"norm tuning of MoE layer {bp.moe_path}",
    )
    cal.start("run")
    for s in streams.all:
        if not s.reference:
            # RTN without tuning counts routing here: it ignores W
            cal.count_tokens = not gptq and not tuning and s is streams.calib
            streams.propagate(block, bp, s, write=True, what="quantized", dropped=dropped)
    row = _encode_and_write(ctx, bp, raw, cal, (g1, g2), used, dropped, shared, shared_encoded)
    if row is not None:
        row["seconds"] = time.perf_counter() - t0
        if tuned is not None:
            row["tuned"] = tuned.to_dict()
    return BlockResult(row, spent)


def _capture(
    ctx: RunContext,
    streams: Streams,
    block: torch.nn.Module,
    bp: BlockPlan,
    cal: MoELayerCalibration,
    kind: str,
    dropped: frozenset[int],
) -> Any:
    """GPTQ: the Hessians of group ``kind`` from the calibration stream (``None`` for round-to-nearest),
    routed as the compressed model routes (``dropped`` experts masked)."""
    if ctx.config.method != "gptq":
        return None
    cal.start(kind, count_tokens=kind == "first")
    streams.propagate(block, bp, streams.calib, write=False, what=f"H {kind}", cal=cal, dropped=dropped)
    return cal.hessian


class _Groups:
    """Quantize one group of a block (``kind`` "first": the fused first projections, "second": the second)
    at the configured rate and level scale, or at those that land its stored size on ``target_bits``
    (uniform) or on the budget plan's share (global). ``W [E_r, rows, cols]`` holds experts
    ``first_expert, first_expert + 1, ...`` (a distributed run's share); a size target counts the whole
    group, summed over the ranks, so every rank searches alike."""

    def __init__(
        self,
        ctx: RunContext,
        bp: BlockPlan,
        first_expert: int,
        budget: BudgetPlan | None,
        dropped: frozenset[int],
    ) -> None:
        self.ctx, self.bp, self.budget, self.dropped = ctx, bp, budget, dropped
        self.first_expert = first_expert

    def __call__(
        self, W: Tensor, acc: Any, kind: str, spent: float, sensitivity: Tensor | None = None
    ) -> tuple[Quantized, float]:
        """``(the quantized group, bits spent so far including it)``; ``sensitivity [E_r, rows]``: the first
        projections' row sensitivities (``row_prices="output"``, qmoe.pipeline.rows)."""
        where = f"GPTQ of MoE layer {self.bp.moe_path}"
        return self.ctx.comm.guard(lambda: self._quantize(W, acc, kind, spent, sensitivity), where)

    def _quantize(
        self, W: Tensor, acc: Any, kind: str, spent: float, sensitivity: Tensor | None
    ) -> tuple[Quantized, float]:
        rank = self.ctx.comm.rank
        if os.environ.get(FAIL_ENV) == f"{rank}:{self.bp.moe_path}":
            raise RuntimeError(f"{FAIL_ENV} asked rank {rank} to fail here")
        config, plan, layout = self.ctx.config, self.budget, self.ctx.plan.adapter.experts
        H, counts = (None, None) if acc is None else (acc.H, acc.counts)
        rows = None
        if config.rows == "output" and H is not None:
            from qmoe.pipeline.rows import row_scales

            rows = row_scales(W, sensitivity if kind == "first" else None)
        if config.target_bits is None and plan is None:
            q = quantize(W, H, counts, config, row_scales=rows)
            return Quantized(q, config.rate, config.level_scale, None), spent
        projections = list(layout.first) if kind == "first" else [layout.second]
        size = GroupSize(layout, self.bp.moe_path, projections, config.bits, self.first_expert, self.dropped)
        if plan is None:
            return quantize_to_size(W, H, counts, config, size, self.ctx.comm, row_scales=rows), spent
        i = plan.index(self.bp.moe_path, kind)
        weights = torch.tensor(
            plan.groups[i].multipliers[self.first_expert : self.first_expert + W.shape[0]],
            dtype=torch.float32,
            device=W.device,
        )
        for e in self.dropped:  # not stored: round them to zero at once, their bits are not counted anyway
            if self.first_expert <= e < self.first_expert + W.shape[0]:
                weights[e - self.first_expert] = MAX_MULTIPLIER
        if plan.fixed_price:  # one model-wide price, no size search
            q = quantize(W, H, counts, config, rate=expert_rates(plan.price, weights), row_scales=rows)
            return Quantized(q, plan.price, config.level_scale, None), spent
        g = quantize_to_size(W, H, counts, config, size, self.ctx.comm, plan.target(i, spent), weights, rows)
        return g, spent + g.bits * plan.groups[i].weights


class _SharedExperts:
    """The block's shared experts when ``--shared-experts`` quantizes them (else every method does nothing):
    Hessians from every token, captured alongside the routed experts' (``cal.shared``), the run's method at
    the shared width's default grid, no size target."""

    def __init__(self, ctx: RunContext, block: torch.nn.Module, bp: BlockPlan, cal: MoELayerCalibration):
        self.ctx, self.bp, self.cal = ctx, bp, cal
        self.modules = shared_modules(ctx, block, bp)  # [nn.Linear] in layout.projections order
        self.n_first = len(ctx.plan.adapter.experts.first)
        self.tokens = 0  # tokens in their Hessians (0: kept, or round-to-nearest)
        self.q_first: QuantizedExperts | None = None  # the quantized fused first projections [1, F*I_s, d]
        if self.modules:
            cal.shared = (
                torch.cat([m.weight for m in self.modules[: self.n_first]])[None].float(),  # [1, F*I_s, d]
                self.modules[self.n_first].weight[None].float(),  # [1, d, I_s]
            )

    def _quantize(self, W: Tensor) -> QuantizedExperts:
        c, acc = self.ctx.config, self.cal.shared_hessian
        shared_config = c.replace(bits=c.shared_experts, grid=None, target_bits=None)
        H, counts = (None, None) if acc is None else (acc.H, acc.counts)
        return quantize(W, H, counts, shared_config)

    def quantize_first(self) -> None:
        if not self.modules:
            return
        cal = self.cal
        if cal.shared_hessian is not None:
            self.tokens = int(cal.shared_hessian.counts[0])
        self.q_first = self._quantize(cal.shared[0])
        cal.shared = (self.q_first.dequantized.to(self.ctx.device), cal.shared[1])

    def finish(self) -> dict[str, Any]:
        """Quantize the second projection, put both into the block (the compressed streams run them) and
        return the encoded matrices under their on-disk keys."""
        if not self.modules:
            return {}
        cal, q_first = self.cal, self.q_first
        assert q_first is not None
        q_second = self._quantize(cal.shared[1])
        rows = q_first.dequantized.shape[1] // self.n_first
        for j, m in enumerate(self.modules[: self.n_first]):
            m.weight.copy_(q_first.dequantized[0, j * rows : (j + 1) * rows])
        self.modules[-1].weight.copy_(q_second.dequantized[0])
        keys, bits = self.ctx.shared_quantized(self.bp), self.ctx.config.shared_experts
        cal.shared = cal.shared_hessian = None
        return {**encode_fused(keys[:-1], q_first, bits), **encode_fused(keys[-1:], q_second, bits)}

    def row(self, shard: str, encoded: dict[str, Any]) -> dict[str, Any]:
        """The shared experts' own report line: stored (kept) or encoded bytes, header share included."""
        p = self.ctx.plan
        weights = sum(p.reader.numel(k) for k in self.bp.shared_keys)
        if encoded:
            nbytes = sum(e.nbytes for e in encoded.values()) + header_share(p.out / shard, sorted(encoded))
        else:
            nbytes = sum(p.reader.nbytes(k) for k in self.bp.shared_keys)
        return {
            "weights": weights,
            "bytes": nbytes,
            "bits_per_weight": 8 * nbytes / weights,
            "tokens_used": self.tokens,
        }


def _encode_and_write(
    ctx: RunContext,
    bp: BlockPlan,
    raw: dict[str, Tensor],
    cal: MoELayerCalibration,
    groups: tuple[Quantized, Quantized],
    used: list[int],
    dropped: frozenset[int],
    shared: _SharedExperts,
    shared_encoded: dict[str, Any],
) -> dict[str, Any] | None:
    """Encode this rank's experts, gather every rank's on rank 0, which writes the shard: its report row."""
    comm, E, layout = ctx.comm, ctx.plan.n_experts, ctx.plan.adapter.experts
    q1, q2 = (g.q for g in groups)
    first_expert = comm.owned(E).start
    routed = [int(v) for v in cal.routed.tolist()]  # counted in passes every rank runs whole
    fallbacks = [comm.gather_experts(q.fallback.to(torch.uint8), E).bool().tolist() for q in (q1, q2)]
    objectives = [
        [None] * E if q.objective is None else comm.gather_experts(q.objective.cpu(), E).tolist()
        for q in (q1, q2)
    ]
    parts = comm.gather_objects(
        comm.guard(
            lambda: encode_experts(layout, bp.moe_path, q1, q2, ctx.config.bits, first_expert, dropped),
            f"encoding of MoE layer {bp.moe_path}",
        )
    )
    if not comm.main:
        return None
    encoded = {k: v for enc, _ in parts for k, v in enc.items()}
    sizes = [s for _, rank_sizes in parts for s in rank_sizes]
    shard = output.write_shard(
        ctx.plan.out, bp.g + 1, 1 + len(ctx.plan.blocks), raw, {**encoded, **shared_encoded}
    )
    row = report.layer_row(
        bp.moe_path,
        bp.stack.name,
        bp.i,
        ["+".join(layout.first), layout.second],
        routed,
        used,
        fallbacks,
        objectives,
        sizes,
        0.0,
        header_bytes=header_share(ctx.plan.out / shard, sorted(encoded)),
        rates=[g.rate for g in groups],
        level_scales=[g.level_scale for g in groups],
    )
    row["group_bits"] = [g.bits for g in groups]  # each group's stored bits/weight, header estimate included
    row["dropped"] = sorted(dropped)  # experts given no weights (a budget's choice)
    if bp.shared_keys:
        row["shared"] = shared.row(shard, shared_encoded)
    return row
