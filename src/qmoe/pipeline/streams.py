"""The activation streams of a compression run: each holds ``[N, S, d]`` hidden states at the current block.

- ``calib``: the calibration samples, through the *compressed* blocks (block i+1 is calibrated on what the
  compressed block i produces: QMoE's sequential order);
- ``ref:calib`` (when the run tunes norms, ``qmoe.pipeline.tune``): the same samples through the original
  blocks, the tuning's target;
- ``ref:<set>`` / ``q:<set>``: each evaluation set through the original and through the compressed blocks
  (they never enter a Hessian; their final losses give the report's ``eval``).

:class:`Streams` owns the buffers: it embeds a stack's inputs, runs a stream through a block (writing the
block's output back, or only feeding a Hessian capture), and snapshots the buffers for resume. An encoder's
final-normed output is the decoder's memory, stream by stream (reference decoder on reference encoder).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qmoe.adapters.drop import dropping
from qmoe.pipeline.buffers import ActivationBuffer, to_device
from qmoe.pipeline.context import RunContext, final_norms, moe_module
from qmoe.pipeline.moe import MoELayerCalibration
from qmoe.pipeline.preflight import BlockPlan


@dataclass(frozen=True)
class Stream:
    name: str  # "calib", "ref:<set>", "q:<set>"
    data: str  # key into the samples: "calib" or an eval set name
    reference: bool  # runs through the original weights


@contextlib.contextmanager
def capacity_lifted(block: torch.nn.Module, attribute: str | None) -> Iterator[None]:
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


def run_streams(eval_data: tuple[str, ...] | None, tune: bool = False) -> list[Stream]:
    """The calibration stream (and its reference when tuning), then a reference and a compressed stream per
    evaluation set."""
    streams = [Stream("calib", "calib", False)]
    if tune:
        streams.append(Stream("ref:calib", "calib", True))
    for s in eval_data or ():
        streams += [Stream(f"ref:{s}", s, True), Stream(f"q:{s}", s, False)]
    return streams


class Streams:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.all = run_streams(ctx.config.eval_data if ctx.config.eval else None, ctx.config.tune != "none")
        self.buffers: dict[str, ActivationBuffer] = {}  # "<stack>/<stream>" -> [N, S, d]
        self.stack_state: dict[str, dict[str, Any]] = {}  # per stack: the adapter's prepared inputs
        self.norm_weights = final_norms(ctx.plan)  # [d] each: the next stack's memory and the head need them

    @property
    def calib(self) -> Stream:
        return self.all[0]

    def restore(self, snapshots: dict[str, str], partial: Path) -> None:
        """The buffers of a resumed run, from the snapshots its state names."""
        for name, file in snapshots.items():
            self.buffers[name] = ActivationBuffer.load(name, partial / file, self.ctx.memory)

    def snapshot(self, stack_name: str, g: int, partial: Path) -> dict[str, str]:
        """Write this stack's buffers after block ``g``; buffer name -> file (in ``partial``)."""
        files = {}
        for s in self.all:
            name = f"{stack_name}/{s.name}"
            file = f"{name.replace('/', '-').replace(':', '-')}.{g}.npy"
            self.buffers[name].save(partial / file)
            files[name] = file
        return files

    def release(self) -> None:
        for buf in self.buffers.values():
            buf.release()

    def start_stack(self, stack: Any) -> None:
        """Embed each stream's inputs into fresh buffers, unless a resumed run already has them."""
        p = self.ctx.plan
        self.stack_state[stack.name] = p.adapter.prepare_stack(p.hf_config, stack, p.reader.get)
        if all(f"{stack.name}/{s.name}" in self.buffers for s in self.all):
            return
        embed = p.reader.get(stack.embed_key).float()  # [vocab, d]
        for s in self.all:
            ids = torch.from_numpy(self.ctx.samples[s.data][stack.inputs])  # [N, S]
            buf = ActivationBuffer(f"{stack.name}/{s.name}", (*ids.shape, embed.shape[1]), self.ctx.memory)
            for i0, i1 in buf.batches(256):
                buf.data[i0:i1] = F.embedding(ids[i0:i1], embed)
            self.buffers[buf.name] = buf
        del embed

    def propagate(
        self,
        block: torch.nn.Module,
        bp: BlockPlan,
        stream: Stream,
        write: bool,
        what: str,
        cal: MoELayerCalibration | None = None,
        dropped: frozenset[int] = frozenset(),
    ) -> None:
        """Run ``stream`` through ``block``; ``cal`` (capturing Hessians) gets each batch's token mask.

        The calibration stream runs with every router's capacity lifted when the recipe says so; the
        compressed streams with the ``dropped`` experts' router columns masked (as the compressed model
        will), so later blocks, and this block's Hessians, see the tokens go to their next choice.
        """
        comm, config = self.ctx.comm, self.ctx.config
        buf = self.buffers[f"{bp.stack.name}/{stream.name}"]
        all_batches = buf.batches(config.batch_size)
        # Through a dense block, a pass that writes activations splits its batches over the ranks (each batch
        # as in one process) and shares the rows after. Through an MoE block every rank runs every batch:
        # each computes its own experts' outputs (all ranks' are then added in expert order), or sums its own
        # experts' Hessians in the single run's token order.
        split = write and bp.moe_path is None
        todo = [b for _, b in comm.mine(all_batches)] if split else all_batches
        batches = self.ctx.progress.bar(todo, desc=f"  {what} {stream.name}", unit="batch", detail=True)

        def run() -> None:
            with self.running(block, bp, stream, dropped):
                self._run_batches(block, bp, stream, batches, write, cal)

        comm.guard(run, f"the {what} pass of {stream.name} through {bp.stack.name} block {bp.i}")
        if split:
            comm.share_rows(buf.data, all_batches)

    @contextlib.contextmanager
    def running(
        self, block: torch.nn.Module, bp: BlockPlan, stream: Stream, dropped: frozenset[int] = frozenset()
    ) -> Iterator[None]:
        """The block as ``stream`` runs through it: the routers' capacity lifted for calibration samples when
        the recipe says so, the ``dropped`` experts masked for the compressed streams."""
        lift = stream.data == "calib" and self.ctx.config.no_drop
        attribute = self.ctx.plan.adapter.capacity_attribute if lift else None
        with capacity_lifted(block, attribute), self._dropping(block, bp, stream, dropped):
            yield

    def _dropping(
        self, block: torch.nn.Module, bp: BlockPlan, stream: Stream, dropped: frozenset[int]
    ) -> Any:
        if stream.reference or not dropped:
            return contextlib.nullcontext()
        p = self.ctx.plan
        top_k = p.adapter.top_k(p.source_cfg)
        return dropping(p.adapter, moe_module(self.ctx, block, bp), sorted(dropped), p.n_experts, top_k)

    def _run_batches(
        self,
        block: torch.nn.Module,
        bp: BlockPlan,
        stream: Stream,
        batches: Iterable[tuple[int, int]],
        write: bool,
        cal: MoELayerCalibration | None,
    ) -> None:
        """This rank's share of a pass: each batch ``(i0, i1)`` through the block, written back if asked."""
        p, device, stack = self.ctx.plan, self.ctx.device, bp.stack
        buf = self.buffers[f"{stack.name}/{stream.name}"]
        mem = self.buffers.get(f"{stack.memory}/{stream.name}") if stack.memory else None
        mask = self.ctx.samples[stream.data].get(f"mask:{stack.inputs}") if cal is not None else None
        for i0, i1 in batches:
            h = to_device(buf.data[i0:i1], device)  # [B, S, d]
            if cal is not None:
                cal.token_mask = None if mask is None else torch.from_numpy(mask[i0:i1].reshape(-1))
            m = None
            if mem is not None:  # the encoder's output of the same stream, final-normed: [B, S_enc, d]
                w = self.norm_weights[stack.memory].to(device)
                m = p.adapter.final_norm(p.hf_config, w, to_device(mem.data[i0:i1], device))
            y = p.adapter.block_forward(block, bp.i, h, m, self.stack_state[stack.name])
            if write:
                buf.data[i0:i1] = y.to("cpu", torch.float32)
