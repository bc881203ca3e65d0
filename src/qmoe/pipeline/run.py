"""The one orchestrator of a compression run: stream a checkpoint block by block through calibration, GPTQ
and the codec, with bounded memory and resume (QMoE, Frantar & Alistarh 2023, section 4).

Per block (built on ``meta``, its tensors read from the shards and assigned, nothing else of the model in
memory besides the activation buffers):

1. reference evaluation streams go through the original block;
2. MoE block: the calibration stream goes through once to capture each expert's routed tokens into
   ``H_first`` (token cap per expert), the first projections are quantized, a second pass captures
   ``act(x W_first_q^T)`` into ``H_second``, the second projection is quantized (RTN skips both captures);
3. the calibration stream and the compressed evaluation streams go through the *quantized* block and
   replace their buffers: block i+1 is calibrated on what the compressed block i produces (sequential);
4. the block's shard (original non-expert tensors + encoded experts) and the activation snapshots are
   written, then the resume state.

Evaluation streams never enter a Hessian; at the end the loss of the reference and the compressed stream
on the same samples gives ``eval`` in the report (as QMoE measures its validation loss). Encoder-decoder
models run the encoder stack, then the decoder stack cross-attending to the (final-normed) encoder output
of the *same* stream: reference decoder on the reference encoder, compressed on compressed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qmoe.adapters.drop import dropping
from qmoe.codec.container import header_share
from qmoe.config import CompressConfig
from qmoe.errors import ConfigError, SourceError
from qmoe.gptq import QuantizedExperts
from qmoe.pipeline import output, report
from qmoe.pipeline.budget import MAX_MULTIPLIER, BudgetPlan, make_plan
from qmoe.pipeline.buffers import ActivationBuffer, MemoryBudget, to_device
from qmoe.pipeline.dist import Dist, from_environment, local_device, settle_threads
from qmoe.pipeline.moe import MoELayerCalibration
from qmoe.pipeline.preflight import BlockPlan, Plan, plan
from qmoe.pipeline.quantize import (
    encode_experts,
    encode_fused,
    expert_rates,
    group_bits,
    quantize,
    quantize_to_size,
    stack_experts,
)
from qmoe.pipeline.state import PARTIAL_DIR, RunState, atomic_write_text
from qmoe.progress import Progress
from qmoe.sources import resolve_device

log = logging.getLogger(__name__)

EVAL_SEED = 1234  # evaluation samples: as qmoe eval and the built-in models' training logs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
KILL_ENV = "QMOE_TEST_KILL"  # "after:G" / "during:G": SIGKILL ourselves at block G (resume tests)
FAIL_ENV = "QMOE_TEST_FAIL"  # "R:LAYER": rank R raises in the GPTQ of MoE layer LAYER (distributed tests)


@dataclass(frozen=True)
class Stream:
    name: str  # "calib", "ref:<set>", "q:<set>"
    data: str  # key into the samples: "calib" or an eval set name
    reference: bool  # runs through the original weights


@contextlib.contextmanager
def _capacity_lifted(block: torch.nn.Module, attribute: str | None) -> Iterator[None]:
    """Lift every router's token capacity in ``block`` (so no token is dropped) for the duration."""
    saved = []
    if attribute:
        for m in block.modules():
            if hasattr(m, attribute):
                saved.append((m, getattr(m, attribute)))
                setattr(m, attribute, 2**62)
    try:
        yield
    finally:
        for m, v in saved:
            setattr(m, attribute, v)


def _kill_hook(stage: str, g: int) -> None:
    if os.environ.get(KILL_ENV) == f"{stage}:{g}":
        os.kill(os.getpid(), signal.SIGKILL)


class _Run:
    def __init__(
        self,
        p: Plan,
        config: CompressConfig,
        device: torch.device,
        state: RunState,
        samples: dict[str, dict[str, np.ndarray]],
        budget: MemoryBudget,
        progress: bool | Progress,
        dist: Dist | None = None,
    ) -> None:
        self.p, self.config, self.device, self.state = p, config, device, state
        self.samples, self.budget = samples, budget
        self.dist = dist or Dist()
        self.progress = Progress.of(progress) if self.dist.main else Progress(enabled=False)
        self.partial = p.out / PARTIAL_DIR
        self.n_shards = 1 + len(p.blocks)
        self.streams = [Stream("calib", "calib", False)]
        if config.eval:
            for s in config.eval_data:
                self.streams += [Stream(f"ref:{s}", s, True), Stream(f"q:{s}", s, False)]
        self.buffers: dict[str, ActivationBuffer] = {}
        self.stack_state: dict[str, dict[str, Any]] = {}
        self.norm_weights: dict[str, Tensor] = {}  # [d] each: the next stack's memory and the head need them
        for stack in p.stacks:
            if stack.final_norm_key:
                self.norm_weights[stack.name] = p.reader.get(stack.final_norm_key).float()
        self.glu = p.adapter.expert_glu(p.hf_config.to_dict())  # [t, F*I] -> [t, I]
        self._printed_header = False
        self.budget_plan: BudgetPlan | None = None  # --allocation global: the model-wide plan
        self.spent_bits = 0.0  # stored bits of the groups quantized so far (the plan's drift correction)

    def set_budget(self, plan: BudgetPlan) -> None:
        """Follow ``plan``; the groups of blocks already done (a resumed run) count as spent."""
        self.budget_plan = plan
        self.spent_bits = 0.0
        for row in self.state.layers if not plan.fixed_price else ():  # a fixed price has no size to keep
            for kind, bits in zip(("first", "second"), row["group_bits"], strict=True):
                self.spent_bits += bits * plan.groups[plan.index(row["name"], kind)].weights

    # -- buffers ---------------------------------------------------------------------------------------------
    def _restore_buffers(self) -> None:
        for name, file in self.state.buffers.items():
            self.buffers[name] = ActivationBuffer.load(name, self.partial / file, self.budget)

    def _start_stack(self, stack: Any) -> None:
        """Embed each stream's inputs into fresh buffers, unless a resumed run already has them."""
        self.stack_state[stack.name] = self.p.adapter.prepare_stack(
            self.p.hf_config, stack, self.p.reader.get
        )
        if all(f"{stack.name}/{s.name}" in self.buffers for s in self.streams):
            return
        embed = self.p.reader.get(stack.embed_key).float()  # [vocab, d]
        for s in self.streams:
            ids = torch.from_numpy(self.samples[s.data][stack.inputs])  # [N, S]
            buf = ActivationBuffer(f"{stack.name}/{s.name}", (*ids.shape, embed.shape[1]), self.budget)
            for i0, i1 in buf.batches(256):
                buf.data[i0:i1] = F.embedding(ids[i0:i1], embed)
            self.buffers[buf.name] = buf
        del embed

    def _checkpoint(self, stack: Any, g: int) -> None:
        if not self.dist.main:  # rank 0 writes the resume state; every rank reads it on resume
            self.state.done = g + 1
            return
        old = dict(self.state.buffers)
        for s in self.streams:
            name = f"{stack.name}/{s.name}"
            file = f"{name.replace('/', '-').replace(':', '-')}.{g}.npy"
            self.buffers[name].save(self.partial / file)
            self.state.buffers[name] = file
        self.state.done = g + 1
        self.state.save(self.partial)
        for f in set(old.values()) - set(self.state.buffers.values()):
            (self.partial / f).unlink(missing_ok=True)

    # -- running a block -------------------------------------------------------------------------------------
    def _propagate(
        self,
        block: torch.nn.Module,
        bp: BlockPlan,
        stream: Stream,
        write: bool,
        what: str,
        cal: MoELayerCalibration | None = None,
    ) -> None:
        """Run ``stream`` through ``block``; ``cal`` (capturing Hessians) gets each batch's token mask.

        The calibration stream runs with every router's capacity lifted when the recipe says so.
        """
        stack = bp.stack
        buf = self.buffers[f"{stack.name}/{stream.name}"]
        lift = stream.data == "calib" and self.config.no_drop
        all_batches = buf.batches(self.config.batch_size)
        # Through a dense block, a pass that writes activations splits its batches over the ranks (each batch
        # as in one process) and shares the rows after. Through an MoE block every rank runs every batch:
        # each computes its own experts' outputs (all ranks' are then added in expert order), or sums its own
        # experts' Hessians in the single run's token order.
        split = write and bp.moe_path is None
        todo = [b for _, b in self.dist.mine(all_batches)] if split else all_batches
        batches = self.progress.bar(todo, desc=f"  {what} {stream.name}", unit="batch", detail=True)
        self.dist.guard(
            lambda: self._run_batches(block, bp, stream, batches, write, cal, lift),
            f"the {what} pass of {stream.name} through {stack.name} block {bp.i}",
        )
        if split:
            self.dist.share_rows(buf.data, all_batches)

    def _run_batches(
        self,
        block: torch.nn.Module,
        bp: BlockPlan,
        stream: Stream,
        batches: Iterable[tuple[int, int]],
        write: bool,
        cal: MoELayerCalibration | None,
        lift: bool,
    ) -> None:
        """This rank's share of a pass: each batch ``(i0, i1)`` through the block, written back if asked."""
        stack = bp.stack
        buf = self.buffers[f"{stack.name}/{stream.name}"]
        mem = self.buffers.get(f"{stack.memory}/{stream.name}") if stack.memory else None
        mask = self.samples[stream.data].get(f"mask:{stack.inputs}") if cal is not None else None
        with (
            _capacity_lifted(block, self.p.adapter.capacity_attribute if lift else None),
            self._dropping(block, bp, stream),
        ):
            for i0, i1 in batches:
                h = to_device(buf.data[i0:i1], self.device)  # [B, S, d]
                if cal is not None:
                    cal.token_mask = None if mask is None else torch.from_numpy(mask[i0:i1].reshape(-1))
                m = None
                if mem is not None:
                    w = self.norm_weights[stack.memory].to(self.device)
                    m = self.p.adapter.final_norm(
                        self.p.hf_config, w, to_device(mem.data[i0:i1], self.device)
                    )
                y = self.p.adapter.block_forward(block, bp.i, h, m, self.stack_state[stack.name])
                if write:
                    buf.data[i0:i1] = y.to("cpu", torch.float32)

    def dropped(self, moe_path: str | None) -> frozenset[int]:
        """Experts of the MoE layer at ``moe_path`` that the budget plan gives no weights."""
        plan = self.budget_plan
        return frozenset() if plan is None or moe_path is None else plan.dropped(moe_path)

    def _dropping(self, block: torch.nn.Module, bp: BlockPlan, stream: Stream) -> Any:
        """The compressed streams run with the dropped experts' router columns masked (as the compressed
        model will), so later blocks, and this block's Hessians, see the tokens go to their next choice."""
        dropped = self.dropped(bp.moe_path)
        if stream.reference or not dropped:
            return contextlib.nullcontext()
        adapter = self.p.adapter
        moe = block.get_submodule(adapter.module_key(bp.stack.moe_layers[bp.i]))
        return dropping(adapter, moe, sorted(dropped), self.p.n_experts, adapter.top_k(self.p.source_cfg))

    def _shared_quantized(self, bp: BlockPlan) -> list[str]:
        """On-disk keys of this block's shared-expert weights that are quantized (``--shared-experts``)."""
        return bp.shared_keys if self.config.shared_experts != "keep" else []

    def layer_calibration(
        self, block: torch.nn.Module, raw: dict[str, Tensor], bp: BlockPlan, owned: range, dist: Dist | None
    ) -> MoELayerCalibration:
        """The MoE layer of ``block`` taken over by a ``MoELayerCalibration`` holding experts ``owned``
        (weights read from the source, float32 on the device; biases from the block's tensors ``raw``)."""
        config, adapter, layout = self.config, self.p.adapter, self.p.adapter.experts
        E = self.p.n_experts
        w_first, w_second = stack_experts(  # [E_r, F*I, d], [E_r, d, I]
            self.p.reader.get_many(layout.keys_of(bp.moe_path, owned)),
            layout,
            bp.moe_path,
            owned,
            self.device,
        )
        mask = self.samples["calib"].get(f"mask:{bp.stack.inputs}")
        n_tokens = int(np.prod(self.samples["calib"][bp.stack.inputs].shape) if mask is None else mask.sum())
        cap = None
        if config.token_cap > 0:  # QMoE: at most token_cap x the mean routed tokens per expert
            cap = int(np.ceil(config.token_cap * n_tokens * adapter.top_k(self.p.source_cfg) / E))
        biases = None  # (b_first [E_r, F*I], b_second [E_r, d]): kept as stored, part of the experts' math
        if layout.bias is not None:
            b = {
                p: raw[layout.bias_key(bp.moe_path, p)][owned.start : owned.stop].to(
                    self.device, torch.float32
                )
                for p in layout.projections
            }
            biases = (torch.cat([b[p] for p in layout.first], dim=1), b[layout.second])
        cal = MoELayerCalibration(
            adapter, w_first, w_second, self.glu, cap, config.gate_weighted, biases, owned, E, dist
        )
        cal.install(block.get_submodule(f"{bp.stack.moe_layers[bp.i]}.{layout.container}"))
        return cal

    def load_block(self, bp: BlockPlan) -> tuple[torch.nn.Module, dict[str, Tensor]]:
        """The block with every tensor loaded, and the source-dtype tensors written to the output as they
        are (all but the experts' and the quantized shared experts' weights)."""
        shared = self._shared_quantized(bp)
        raw = self.p.reader.get_many([*bp.tensor_keys, *shared])
        with torch.device("meta"):
            block = self.p.adapter.build_block(self.p.hf_config, bp.stack, bp.i)
        prefix = bp.stack.block_prefix(bp.i) + "."
        to_module = self.p.adapter.module_key
        sd = {to_module(k)[len(prefix) :]: v.to(self.device, torch.float32) for k, v in raw.items()}
        missing, unexpected = block.load_state_dict(sd, strict=False, assign=True)
        container = None
        if bp.moe_path is not None:
            container = f"{bp.stack.moe_layers[bp.i]}.{self.p.adapter.experts.container}"
        stray = [k for k in missing if container is None or not k.startswith(container + ".")]
        assert not unexpected and not stray, f"block {prefix}: unexpected {unexpected}, missing {stray}"
        for k in shared:
            del raw[k]
        return block, raw

    def _block(self, bp: BlockPlan) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        config, adapter = self.config, self.p.adapter
        block, raw = self.load_block(bp)
        ref_streams = [s for s in self.streams if s.reference]
        out_streams = [s for s in self.streams if not s.reference]
        calib = self.streams[0]
        if bp.moe_path is None:
            for s in self.streams:
                self._propagate(block, bp, s, write=True, what="dense")
            if self.dist.main:
                output.write_shard(self.p.out, bp.g + 1, self.n_shards, raw, {})
            return None
        dist = self.dist
        where = f"MoE layer {bp.moe_path}"

        layout = adapter.experts
        E = self.p.n_experts
        owned = dist.owned(E)  # the experts whose weights, Hessians, GPTQ and outputs this process computes
        lo, hi = owned.start, owned.stop
        cal = self.layer_calibration(block, raw, bp, owned, dist)
        w_first, w_second = cal.w_first, cal.w_second  # [E_r, F*I, d], [E_r, d, I]: this rank's experts
        shared = self._shared_modules(block, bp)  # [nn.Linear] in layout.projections order, if quantized
        if shared:
            F_ = len(layout.first)
            cal.shared = (
                torch.cat([m.weight for m in shared[:F_]])[None].float(),  # [1, F*I_s, d]
                shared[F_].weight[None].float(),  # [1, d, I_s]
            )

        cal.start("run")
        for s in ref_streams:
            self._propagate(block, bp, s, write=True, what="reference")
        gptq = config.method == "gptq"
        H1 = None
        used = [0] * E  # tokens that entered the Hessians, read from the accumulator's own counts
        if gptq:
            cal.start("first", count_tokens=True)
            self._propagate(block, bp, calib, write=False, what="H first", cal=cal)
            H1 = cal.hessian
            used = dist.gather_experts(H1.counts.cpu(), E).tolist()
        quantize_first = partial(self._quantize, w_first, H1, "first", bp.moe_path, lo)
        q1, rate1, scale1, bits1 = dist.guard(quantize_first, f"GPTQ of {where}")
        del quantize_first
        del H1
        cal.w_first = q1.dequantized.to(self.device)
        shared_tokens = 0
        if shared:
            if cal.shared_hessian is not None:
                shared_tokens = int(cal.shared_hessian.counts[0])
            sq1 = self._quantize_shared(cal.shared[0], cal.shared_hessian)
            cal.shared = (sq1.dequantized.to(self.device), cal.shared[1])
        _kill_hook("during", bp.g)
        H2 = None
        if gptq:
            cal.start("second")
            self._propagate(block, bp, calib, write=False, what="H second", cal=cal)
            H2 = cal.hessian
            assert H2.counts.tolist() == used[lo:hi], "both capture passes must see the same tokens"
        quantize_second = partial(self._quantize, w_second, H2, "second", bp.moe_path, lo)
        q2, rate2, scale2, bits2 = dist.guard(quantize_second, f"GPTQ of {where}")
        del H2, w_first, w_second, quantize_second
        cal.w_second = q2.dequantized.to(self.device)
        shared_encoded: dict[str, Any] = {}
        if shared:
            sq2 = self._quantize_shared(cal.shared[1], cal.shared_hessian)
            # the quantized streams run the block with the quantized shared experts
            rows = sq1.dequantized.shape[1] // len(layout.first)
            for j, m in enumerate(shared[: len(layout.first)]):
                m.weight.copy_(sq1.dequantized[0, j * rows : (j + 1) * rows])
            shared[-1].weight.copy_(sq2.dequantized[0])
            keys = self._shared_quantized(bp)
            bits = config.shared_experts
            shared_encoded = {**encode_fused(keys[:-1], sq1, bits), **encode_fused(keys[-1:], sq2, bits)}
            cal.shared = cal.shared_hessian = None
        cal.start("run")
        for s in out_streams:
            cal.count_tokens = not gptq and s is calib  # RTN counts routing here; it does not depend on W
            self._propagate(block, bp, s, write=True, what="quantized")

        routed = [int(v) for v in cal.routed.tolist()]  # counted in passes every rank runs whole
        fallbacks = [dist.gather_experts(q.fallback.to(torch.uint8), E).bool().tolist() for q in (q1, q2)]
        objectives = [
            [None] * E if q.objective is None else dist.gather_experts(q.objective.cpu(), E).tolist()
            for q in (q1, q2)
        ]
        dropped = self.dropped(bp.moe_path)
        parts = dist.gather_objects(
            dist.guard(
                lambda: encode_experts(layout, bp.moe_path, q1, q2, config.bits, lo, dropped),
                f"encoding of {where}",
            )
        )
        if not dist.main:
            return None
        encoded = {k: v for enc, _ in parts for k, v in enc.items()}
        sizes = [s for _, rank_sizes in parts for s in rank_sizes]
        shard = output.write_shard(self.p.out, bp.g + 1, self.n_shards, raw, {**encoded, **shared_encoded})
        header = header_share(self.p.out / shard, sorted(encoded))
        names = ["+".join(layout.first), layout.second]
        row = report.layer_row(
            bp.moe_path,
            bp.stack.name,
            bp.i,
            names,
            routed,
            used,
            fallbacks,
            objectives,
            sizes,
            time.perf_counter() - t0,
            header_bytes=header,
            rates=[rate1, rate2],
            level_scales=[scale1, scale2],
        )
        row["group_bits"] = [bits1, bits2]  # each group's stored bits/weight, header estimate included
        row["dropped"] = sorted(dropped)  # experts given no weights (a budget's choice)
        if (
            bp.shared_keys
        ):  # the shared experts' own line: stored (kept) or encoded bytes, header share included
            weights = sum(self.p.reader.numel(k) for k in bp.shared_keys)
            if shared_encoded:
                nbytes = sum(e.nbytes for e in shared_encoded.values())
                nbytes += header_share(self.p.out / shard, sorted(shared_encoded))
            else:
                nbytes = sum(self.p.reader.nbytes(k) for k in bp.shared_keys)
            row["shared"] = {
                "weights": weights,
                "bytes": nbytes,
                "bits_per_weight": 8 * nbytes / weights,
                "tokens_used": shared_tokens,  # tokens in their Hessians (0: kept, or round-to-nearest)
            }
        return row

    def _shared_modules(self, block: torch.nn.Module, bp: BlockPlan) -> list[torch.nn.Module]:
        """The block's shared-expert Linears being quantized, in ``layout.projections`` order."""
        keys = self._shared_quantized(bp)
        prefix = bp.stack.block_prefix(bp.i) + "."
        to_module = self.p.adapter.module_key
        return [block.get_submodule(to_module(k)[len(prefix) :].removesuffix(".weight")) for k in keys]

    def _quantize_shared(self, W: Tensor, acc: Any) -> QuantizedExperts:
        """The shared experts' ``W [1, rows, cols]`` at ``--shared-experts`` bits on that width's default
        grid, with the run's method, rate and level scale (no size target: that is the routed experts')."""
        c = self.config
        shared_config = c.replace(bits=c.shared_experts, grid=None, target_bits=None)
        H, counts = (None, None) if acc is None else (acc.H, acc.counts)
        return quantize(W, H, counts, shared_config)

    def _quantize(
        self, W: Tensor, acc: Any, kind: str, moe_path: str, first: int = 0
    ) -> tuple[QuantizedExperts, float, float, float | None]:
        """Quantize one group (``kind`` "first": the fused first projections, "second": the second) at the
        configured rate and level scale, or at those that land its stored size on ``target_bits`` (uniform)
        or on the budget plan's share (global): ``(q, rate, level_scale, bits/weight of the group)``, the
        last ``None`` without a size target (not measured: it would encode the group twice).

        ``W [E_r, rows, cols]`` holds experts ``first, first + 1, ...`` (a distributed run's share); a size
        target then counts the whole group, summed over the ranks, so every rank searches alike."""
        if os.environ.get(FAIL_ENV) == f"{self.dist.rank}:{moe_path}":
            raise RuntimeError(f"{FAIL_ENV} asked rank {self.dist.rank} to fail here")
        config = self.config
        layout = self.p.adapter.experts
        projections = list(layout.first) if kind == "first" else [layout.second]
        H, counts = (None, None) if acc is None else (acc.H, acc.counts)

        dropped = self.dropped(moe_path)

        def bits_of(q: QuantizedExperts) -> float:
            sum_ints = self.dist.sum_ints
            return group_bits(layout, moe_path, q, projections, config.bits, first, sum_ints, dropped)

        plan = self.budget_plan
        if config.target_bits is None and plan is None:
            return quantize(W, H, counts, config), config.rate, config.level_scale, None
        target, weights = None, None
        if plan is not None:
            i = plan.index(moe_path, kind)
            m = plan.groups[i].multipliers[first : first + W.shape[0]]
            weights = torch.tensor(m, dtype=torch.float32, device=W.device)
            for e in dropped:  # not stored: round them to zero at once, their bits are not counted anyway
                if first <= e < first + W.shape[0]:
                    weights[e - first] = MAX_MULTIPLIER
            if plan.fixed_price:  # one model-wide price, no size search
                q = quantize(W, H, counts, config, rate=expert_rates(plan.price, weights))
                return q, plan.price, config.level_scale, None
            target = plan.target(i, self.spent_bits)
        q, rate, scale, bits = quantize_to_size(W, H, counts, config, bits_of, target, weights)
        if plan is not None:
            self.spent_bits += bits * plan.groups[i].weights
        return q, rate, scale, bits

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> float:
        self._restore_buffers()
        t_start = time.perf_counter()
        n = len(self.p.blocks)
        bar = self.progress.bar(total=n, initial=self.state.done, desc="blocks", unit="block")
        current = None
        for bp in self.p.blocks:
            if bp.g < self.state.done:
                continue
            if current != bp.stack.name:
                self._start_stack(bp.stack)
                current = bp.stack.name
            bar.set_description(f"{bp.stack.name} block {bp.i}")
            row = self._block(bp)
            if row is not None:
                self.state.layers.append(row)
                if self.progress.enabled:
                    if not self._printed_header:
                        self.progress.write(report.TABLE_HEADER)
                        self._printed_header = True
                    self.progress.write(report.table_row(row))
            self.state.seconds += time.perf_counter() - t_start
            t_start = time.perf_counter()
            self._checkpoint(bp.stack, bp.g)
            _kill_hook("after", bp.g)
            bar.update(1)
        bar.close()
        return time.perf_counter() - t_start

    def evaluate(self) -> list[dict[str, Any]]:
        """Loss of the reference and the compressed stream on each evaluation set."""
        if not self.config.eval:
            return []
        last = self.p.stacks[-1]
        head = {
            k: self.p.reader.get(key).float().to(self.device)
            for k, key in self.p.adapter.head_keys(self.p.hf_config.to_dict()).items()
        }
        norm = self.norm_weights[last.name].to(self.device)
        results = []
        for name in self.config.eval_data:
            labels = torch.from_numpy(self.samples[name]["labels"])
            sums: dict[str, list[float]] = {}
            tokens: list[int] = []
            for kind in ("ref", "q"):
                buf = self.buffers[f"{last.name}/{kind}:{name}"]
                sums[kind] = []
                for i0, i1 in buf.batches(self.config.batch_size):
                    h = self.p.adapter.final_norm(
                        self.p.hf_config, norm, to_device(buf.data[i0:i1], self.device)
                    )
                    lab = labels[i0:i1].to(self.device)
                    for j in range(i1 - i0):  # per sample, for intervals paired over samples
                        s, c = self.p.adapter.loss(self.p.hf_config, head, h[j : j + 1], lab[j : j + 1])
                        sums[kind].append(s)
                        if kind == "ref":
                            tokens.append(c)
            count = sum(tokens)
            results.append(
                {
                    "split": name,
                    "samples": int(labels.shape[0]),
                    "tokens": count,
                    "loss_reference": sum(sums["ref"]) / count,
                    "loss_compressed": sum(sums["q"]) / count,
                    # Summed nats per sample (same samples, same tokens): paired differences need them.
                    "sample_tokens": tokens,
                    "sample_loss_reference": sums["ref"],
                    "sample_loss_compressed": sums["q"],
                }
            )
        return results


def _quantization_config(
    p: Plan, config: CompressConfig, version: str, plan: BudgetPlan | None = None
) -> dict[str, Any]:
    from qmoe.codec import FORMAT_VERSION

    layout = p.adapter.experts
    cfg = p.hf_config.to_dict()
    return {
        "quant_method": "qmoe",
        "format_version": FORMAT_VERSION,
        "bits": config.bits,
        "grid": config.grid,
        "method": config.method,
        "qmoe_version": version,
        "adapter": p.adapter.name,
        "calibration": {
            "data": config.calib_data,
            "samples": config.calib_samples,
            "seq_len": config.seq_len,
            "seed": config.seed,
            "token_cap": config.token_cap,
            "min_tokens": config.min_tokens,
            "damp": config.damp,
            "block_size": config.block_size,
            "act_order": config.act_order,
            "batch_size": config.batch_size,
            "rate": config.rate,
            "target_bits": config.target_bits,
            "refit": config.refit,
            "no_drop": config.no_drop,
            "skip_sentinels": config.skip_sentinels,
            "gate_weighted": config.gate_weighted,
            "level_scale": config.level_scale,
        },
        "experts": {
            "layers": p.adapter.moe_layers(cfg),
            "container": layout.container,
            "key": layout.key,
            "first": list(layout.first),
            "second": layout.second,
            "gated": layout.gated,
            "activation": p.adapter.activation(cfg),
            "num_experts": p.n_experts,
        },
        "run_fingerprint": p.fingerprint,
        # MoE layer (on-disk path) -> experts with no weights: the loader masks them in the router
        "dropped_experts": {
            bp.moe_path: sorted(plan.dropped(bp.moe_path))
            for bp in p.blocks
            if plan is not None and bp.moe_path is not None and plan.dropped(bp.moe_path)
        },
    }


def _load_samples(p: Plan, config: CompressConfig) -> dict[str, dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    from qmoe.calib import load_texts

    # transformers 5 builds an empty tokenizer (special tokens only) for a directory without tokenizer files.
    if not any((p.source / f).is_file() for f in TOKENIZER_FILES):
        raise SourceError(
            f"{p.source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); copy the "
            "model's tokenizer into it"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p.source))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
        raise SourceError(
            f"{p.source} has no usable tokenizer ({type(exc).__name__}); copy the tokenizer files "
            "(tokenizer.json, tokenizer_config.json) into it"
        ) from exc
    make: Callable[..., dict[str, np.ndarray]] = p.adapter.samples
    out = {
        "calib": make(
            tokenizer, load_texts(config.calib_data), config.calib_samples, config.seed, config.seq_len
        )
    }
    if config.skip_sentinels:
        for stack in p.stacks:
            mask = p.adapter.hessian_mask(tokenizer, out["calib"][stack.inputs])
            if mask is not None:
                out["calib"][f"mask:{stack.inputs}"] = mask
    if config.eval:
        for name in config.eval_data:
            out[name] = make(tokenizer, load_texts(name), config.eval_samples, EVAL_SEED, config.seq_len)
    return out


def compress(
    source: str | Path,
    out: str | Path,
    config: CompressConfig | None = None,
    *,
    device: str | torch.device | None = None,
    buffer_gb: float | None = None,
    progress: bool | Progress = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Compress the MoE checkpoint ``source`` (built-in name or HF directory) into the directory ``out``.

    ``config`` (default ``CompressConfig()``) with ``overrides`` applied (e.g. ``method="rtn"``) sets
    everything that determines the output bytes. ``device``: where the forward passes, Hessians and GPTQ run
    (default CUDA if available); activations stay in CPU memory, up to ``buffer_gb`` GiB (default: half the
    available RAM, at most 8 GiB), beyond which they spill to a memmap in the output directory. ``progress``:
    True (a bar over the blocks and the per-layer table; plain lines when stderr is not a terminal), False
    (silent), or a :class:`qmoe.progress.Progress` (e.g. ``verbose=True`` for a bar per pass in a block).

    A killed run restarted with the same arguments resumes after its last completed block; a finished
    output directory of the same run is left as it is. Returns the report (also in ``qmoe_report.json``).
    """
    wall0 = time.perf_counter()
    config = config if config is not None else CompressConfig()
    if not isinstance(config, CompressConfig):
        raise ConfigError(f"config must be a qmoe.config.CompressConfig, got {type(config).__name__}")
    if overrides:
        config = config.replace(**overrides)
    dev = resolve_device(device)
    dist = from_environment(dev)  # torchrun: this rank's place in the job; else one process
    try:
        return _compress(source, out, config, local_device(dev), dist, buffer_gb, progress, wall0)
    finally:
        dist.close()  # before the process exits, success or failure (Dist.close says why)


def _compress(
    source: str | Path,
    out: str | Path,
    config: CompressConfig,
    dev: torch.device,
    dist: Dist,
    buffer_gb: float | None,
    progress: bool | Progress,
    wall0: float,
) -> dict[str, Any]:
    from qmoe import __version__

    p = plan(source, out, config, __version__)
    if dist.world > p.n_experts:
        raise ConfigError(
            f"{dist.world} ranks but {p.n_experts} experts per MoE layer: every rank needs at least one "
            f"expert; run at most {p.n_experts} ranks"
        )
    dist.barrier()  # every rank has read the output directory's state before rank 0 writes to it
    if p.complete:
        shutil.rmtree(p.out / PARTIAL_DIR, ignore_errors=True)
        log.info("%s already holds this run, complete; nothing to do", p.out)
        return json.loads((p.out / report.REPORT_FILE).read_text())
    samples = _load_samples(p, config)

    threads, note = settle_threads()
    if note:
        log.warning("qmoe: %s", note)
    execution = {"device": dev.type, "threads": threads}
    # every rank's threads, in rank order (the report records them; resume compares only `execution`)
    rank_threads = dist.sum_ints([threads if r == dist.rank else 0 for r in range(dist.world)])
    if p.state is not None and p.state.execution and p.state.execution != execution:
        was = p.state.execution
        raise ConfigError(
            f"{p.out} holds an unfinished run started on {was['device']} with {was['threads']} "
            f"threads; this process has {execution['device']} with {execution['threads']}, and the bytes "
            f"depend on both. Resume with the same device and thread count (e.g. "
            f"OMP_NUM_THREADS={was['threads']}), or delete {p.out} to start over"
        )
    partial = p.out / PARTIAL_DIR
    dist.check_shared_dir(p.out)
    if dist.main:
        partial.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = p.state or RunState(p.fingerprint, execution=execution)
    resumed_from = p.state.done if p.state else None
    prior_seconds = p.state.seconds if p.state else 0.0
    if buffer_gb is None:
        import psutil

        budget_bytes = int(min(8 << 30, psutil.virtual_memory().available // 2))
    else:
        budget_bytes = int(buffer_gb * 2**30)
    spill = partial if dist.main else partial / f"rank-{dist.rank}"  # each rank's own spilled activations
    run = _Run(
        p, config, dev, state, samples, MemoryBudget(budget_bytes // dist.world, spill), progress, dist
    )
    with torch.inference_mode():
        if config.allocation == "global":
            run.set_budget(make_plan(run))
        run.run()
        usage = dist.gather_objects((report.cpu_seconds(), report.peak_rss_bytes()))

        def finish() -> dict[str, Any]:
            """Rank 0: evaluation, the rest shard, index, report and config.json (written last)."""
            assert usage is not None
            evals = run.evaluate()
            output.write_shard(p.out, 0, run.n_shards, p.reader.get_many(p.rest_keys), {})
            names = {0: list(p.rest_keys)}
            for bp in p.blocks:
                names[bp.g + 1] = [*bp.tensor_keys, *(k for k, _ in bp.matrices)]
            expert_keys = [k for bp in p.blocks for k, _ in bp.matrices]
            total_bytes = output.write_index(p.out, run.n_shards, names, expert_keys)
            output.copy_side_files(p.source, p.out)

            expert_bytes = sum(r["bytes"] for r in state.layers)
            rep = {
                "report_version": report.REPORT_VERSION,
                "qmoe_version": __version__,
                "source": str(source),
                "adapter": p.adapter.name,
                "config": config.to_dict(),
                # the bytes depend on device and threads per process (float rounding)
                "execution": {**execution, "rank_threads": rank_threads},
                "layers": state.layers,
                "totals": report.totals(p.params, p.expert_params, total_bytes, expert_bytes, state.layers),
                "eval": evals[0] if evals else None,
                "eval_extra": evals[1:],
                # state.seconds: block time of this and earlier (killed) attempts; add what this process spent
                # outside the blocks (set-up, evaluation, finishing) without counting its blocks twice.
                "wall_seconds": prior_seconds + (time.perf_counter() - wall0),
                "cpu_seconds": sum(c for c, _ in usage),  # every rank's
                "peak_rss_bytes": max(r for _, r in usage),  # of the largest process
                "resumed_from_block": resumed_from,
                "budget": None if run.budget_plan is None else run.budget_plan.to_dict(),
                "ranks": dist.world,
            }
            atomic_write_text(p.out / report.REPORT_FILE, json.dumps(rep, indent=1) + "\n")
            output.write_config(
                p.out, p.source_cfg, _quantization_config(p, config, __version__, run.budget_plan)
            )  # marks done
            return rep

        rep = dist.guard(finish if dist.main else dict, "finishing the output directory")
    for buf in run.buffers.values():
        buf.release()
    dist.barrier()  # every rank has released its buffers (spill files live inside the partial directory)
    if not dist.main:
        return json.loads((p.out / report.REPORT_FILE).read_text())
    shutil.rmtree(partial, ignore_errors=True)
    return rep
