"""The tuning stage of an MoE block: its normalisation weights (``tune="norms"``), or those and its attention
weights (``tune="attention"``, the default recipe's), fitted so that the compressed block, on the compressed
calibration stream, reproduces the *original model's* hidden states at that depth.

Why these weights, and why that target:

- GPTQ minimises each expert matrix's own output error; what the model loses is the drift of the residual
  stream that every block's experts add to. The block's RMSNorm/LayerNorm weights (``d`` numbers each: the
  input norm, the norm in front of the router and the experts, per-head q/k norms) scale what the
  attention, the router and every expert see, so they can undo the systematic part of that drift: ternary
  rows with shrunk or grown output energy, routing gates that moved. The attention is the rest of the
  block that is stored uncompressed: fitting it too lets the block re-mix what the compressed experts
  left (measured on tiny-qwen3-moe: 0.62x the default's test loss increase with norms alone, 3 seeds;
  ``docs/results.md``, "The default tunes the attention"). Neither costs bits: they are stored as they
  were, in the checkpoint's dtype. A few thousand per-channel scales cannot memorise calibration text; whole
  attention matrices could, hence their held-out check (:data:`HOLDOUT`).
- The target is the original model's hidden state after this block (the ``ref:calib`` stream, run through
  the original blocks), not the original block applied to the compressed input: so each block also
  corrects what the blocks before it left (measured on tiny-qwen3-moe, default recipe, seed 0, validation:
  tuning toward the original block on the same input gained -0.0161 nats, toward the original stream
  -0.0207, tuning the norms end to end on the logits -0.0215; ``docs/results.md``, "Norm tuning").

The fit: Adam on the mean squared error of the block's output ``[N, S, d]``, ``tune_epochs`` passes over the
first ``tune_samples`` calibration samples in a seeded order, batches of :data:`BATCH` samples, learning rate
``tune_lr`` decaying to 0 on a cosine. The tuned values are rounded to the checkpoint's dtype before the last
check, and kept only if the block's error went down (else the block keeps its weights): for the norms, the
error on the samples it fitted; for ``tune="attention"``, which fits a hundred times more numbers, the error
on samples the fit never saw (:data:`HOLDOUT`).
A distributed run gathers the layer's experts on every rank and tunes the same way everywhere, so its
bytes equal a single process's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qmoe.pipeline.buffers import to_device
from qmoe.pipeline.context import RunContext
from qmoe.pipeline.moe import MoELayerCalibration
from qmoe.pipeline.preflight import BlockPlan
from qmoe.pipeline.streams import Streams

# ``tune="attention"``: the attention's matrices move at this fraction of ``tune_lr`` (3e-3 -> 2e-4, the
# end-to-end probe's rate for them); per-channel norms take the full rate.
MATRIX_LR = 1 / 15
# ``tune="attention"`` fits every attention matrix (98,752 numbers per tiny-qwen3-moe block, ~19M per
# Qwen3-30B-A3B block, against 448 norm weights): enough to fit the calibration text instead of the drift.
# So it holds out the last 1/HOLDOUT of its samples (the draws are seeded and random, so these are as
# typical as any): the fit never sees them, they are measured after every epoch, and the epoch with the
# lowest held-out error is kept, "no epoch" (the untuned block) included. Tuning then never makes unseen
# text worse than it measured on those samples. 1/8: 64 of 512 samples, enough for a stable mean squared
# error over [64, S, d] while the fit keeps 7/8 of its data.
HOLDOUT = 8
BATCH = 16  # samples per Adam step (the end-to-end probe's; larger batches take fewer steps per epoch)
TARGET = "ref:calib"  # the stream that holds the original model's hidden states on the calibration samples


@dataclass(frozen=True)
class TuneResult:
    params: int  # tuned numbers
    mse_before: float  # mean squared error of the block output against the target, before and after
    mse_after: float
    kept: bool  # False: tuning did not lower the error; the block keeps its weights
    keys: tuple[str, ...]  # the on-disk names of the tuned tensors (rewritten when kept)
    # tune="attention": the held-out samples (the last ``held_out`` of the tuning samples) and their error
    # before and after (the rounded values of the best epoch); the keep decision is theirs. 0 / None else.
    held_out: int = 0
    held_out_before: float | None = None
    held_out_after: float | None = None
    epoch: int | None = None  # the epoch whose values were kept (0: none lowered the held-out error)

    def to_dict(self) -> dict[str, Any]:
        d = {"params": self.params, "mse_before": self.mse_before, "mse_after": self.mse_after,
             "kept": self.kept, "keys": list(self.keys)}
        if self.held_out:
            d.update(held_out=self.held_out, held_out_before=self.held_out_before,
                     held_out_after=self.held_out_after, epoch=self.epoch)
        return d


def norm_parameters(block: torch.nn.Module) -> list[str]:
    """Names (in ``block``) of the 1-D weights and biases of its normalisation modules (any class whose
    name says Norm: RMSNorm, LayerNorm, T5's), in module order."""
    names = []
    for mod_name, mod in block.named_modules():
        if "norm" not in type(mod).__name__.lower():
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            if p.dim() == 1:
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def attention_parameters(block: torch.nn.Module) -> list[str]:
    """Names (in ``block``) of every parameter inside its attention modules (any class whose name says
    Attention: self- and cross-attention, MLA's low-rank projections), in module order, each once."""
    names: list[str] = []
    for mod_name, mod in block.named_modules():
        if "attention" in type(mod).__name__.lower():
            for p_name, _ in mod.named_parameters(prefix=mod_name):
                if p_name not in names:
                    names.append(p_name)
    return names


def tuned_parameters(block: torch.nn.Module, tune: str) -> list[str]:
    """What ``tune`` fits in ``block``: ``"norms"`` its norm weights, ``"attention"`` those and every
    attention parameter."""
    names = norm_parameters(block)
    if tune == "attention":
        names += [n for n in attention_parameters(block) if n not in names]
    return names


def _normal(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) cloned outside inference mode: tensors made
    under the run's ``inference_mode`` cannot be saved for a backward pass."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _normal(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_normal(v) for v in obj)
    return obj


@contextmanager
def _trainable(block: torch.nn.Module, names: set[str]) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Every parameter and buffer of ``block`` replaced by a normal clone for the duration, the ``names``
    requiring gradients; yields those. The originals (inference tensors) are put back after."""
    saved: list[tuple[torch.nn.Module, str, bool, Tensor]] = []
    tuned: dict[str, torch.nn.Parameter] = {}
    try:
        for mod_name, mod in block.named_modules():
            for p_name, p in list(mod._parameters.items()):
                if p is None:
                    continue
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                saved.append((mod, p_name, True, p))
                clone = torch.nn.Parameter(p.detach().clone(), requires_grad=full in names)
                mod._parameters[p_name] = clone
                if full in names:
                    tuned[full] = clone
            for b_name, b in list(mod._buffers.items()):
                if b is not None:
                    saved.append((mod, b_name, False, b))
                    mod._buffers[b_name] = b.detach().clone()
        yield tuned
    finally:
        for mod, name, is_param, t in reversed(saved):
            (mod._parameters if is_param else mod._buffers)[name] = t


@contextmanager
def _whole_layer(ctx: RunContext, cal: MoELayerCalibration) -> Iterator[None]:
    """The calibration module computing every expert in this process, from normal clones of the weights
    (a distributed run gathers the other ranks' experts first)."""
    comm, E = ctx.comm, ctx.plan.n_experts
    saved = (cal.w_first, cal.w_second, cal.b_first, cal.b_second, cal.owned, cal.dist, cal.mode,
             cal.count_tokens, cal.stats_on)

    def full(t: Tensor | None) -> Tensor | None:
        return None if t is None else comm.gather_experts(t, E).detach().clone()

    try:
        cal.w_first, cal.w_second = full(cal.w_first), full(cal.w_second)
        cal.b_first, cal.b_second = full(cal.b_first), full(cal.b_second)
        cal.owned, cal.dist = range(E), None
        cal.mode, cal.count_tokens, cal.stats_on = "run", False, False  # outputs only; nothing counted
        yield
    finally:
        (cal.w_first, cal.w_second, cal.b_first, cal.b_second, cal.owned, cal.dist, cal.mode,
         cal.count_tokens, cal.stats_on) = saved


def _block_forward(
    ctx: RunContext, streams: Streams, block: torch.nn.Module, bp: BlockPlan
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``forward(idx)``: the block's output on calibration samples ``idx`` (from the compressed stream at
    its input) and the target there, both ``[B, S, d]``. Built inside ``tune_block``'s trainable context."""
    p = ctx.plan
    x_buf = streams.buffers[f"{bp.stack.name}/{streams.calib.name}"]
    t_buf = streams.buffers[f"{bp.stack.name}/{TARGET}"]
    mem = streams.buffers.get(f"{bp.stack.memory}/{streams.calib.name}") if bp.stack.memory else None
    state = _normal(streams.stack_state[bp.stack.name])
    norm_w = None
    if mem is not None:  # the final norm the decoder's memory goes through: [d]
        norm_w = streams.norm_weights[bp.stack.memory].detach().clone().to(ctx.device)

    def forward(idx: Tensor) -> tuple[Tensor, Tensor]:
        h = to_device(x_buf.data[idx], ctx.device).clone()  # [B, S, d]
        m = None
        if mem is not None:  # the encoder's compressed output, final-normed: [B, S_enc, d]
            m = p.adapter.final_norm(p.hf_config, norm_w, to_device(mem.data[idx], ctx.device).clone())
        y = p.adapter.block_forward(block, bp.i, h, m, state)
        return y, to_device(t_buf.data[idx], ctx.device).clone()

    return forward


def _fit(
    params: dict[str, torch.nn.Parameter],
    norms: set[str],
    forward: Callable[[Tensor], tuple[Tensor, Tensor]],
    fit: int,
    config: Any,
    g: int,
) -> Iterator[int]:
    """Adam on the block output's mean squared error over samples ``[0, fit)``, in seeded batches of
    :data:`BATCH`; norms at ``tune_lr``, matrices at ``tune_lr * MATRIX_LR``, both decaying to 0 on one
    cosine. Yields each finished epoch's number (1-based), the values in ``params``."""
    groups = [
        {"params": [v for k, v in params.items() if k in norms], "base": config.tune_lr},
        {"params": [v for k, v in params.items() if k not in norms], "base": config.tune_lr * MATRIX_LR},
    ]
    opt = torch.optim.Adam([gr for gr in groups if gr["params"]], lr=config.tune_lr)
    steps_per_epoch = max(1, fit // BATCH)
    total_steps = config.tune_epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + g)
    step = 0
    for epoch in range(1, config.tune_epochs + 1):
        order = torch.randperm(fit, generator=gen)
        for j in range(steps_per_epoch):
            idx = order[j * BATCH : (j + 1) * BATCH].sort().values
            y, t = forward(idx)
            loss = (y.float() - t.float()).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:  # cosine decay to 0 over the whole fit
                group["lr"] = group["base"] * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            opt.step()
            step += 1
        yield epoch


def tune_block(
    ctx: RunContext,
    streams: Streams,
    block: torch.nn.Module,
    bp: BlockPlan,
    cal: MoELayerCalibration,
    raw: dict[str, Tensor],
    dropped: frozenset[int],
) -> TuneResult | None:
    """Fit the ``tune`` parameters of the compressed ``block`` (its experts already quantized in ``cal``) to
    the target stream; write the kept values into ``raw`` (in its dtype: what the shard stores) and into the
    block. None when the run does not tune or the block has nothing to tune."""
    config = ctx.config
    if config.tune == "none":
        return None
    names = tuned_parameters(block, config.tune)
    if not names:
        return None
    p = ctx.plan
    prefix = bp.stack.block_prefix(bp.i) + "."
    raw_key = {p.adapter.module_key(k)[len(prefix) :]: k for k in raw}  # block parameter -> on-disk key
    names = [n for n in names if n in raw_key]
    x_buf = streams.buffers[f"{bp.stack.name}/{streams.calib.name}"]
    n = min(x_buf.data.shape[0], config.tune_samples)  # the first samples (seeded draws already)
    with torch.inference_mode(False), torch.enable_grad(), _whole_layer(ctx, cal), _trainable(
        block, set(names)
    ) as params, streams.running(block, bp, streams.calib, dropped):
        forward = _block_forward(ctx, streams, block, bp)

        def error(lo: int, hi: int) -> float:
            with torch.no_grad():
                total = 0.0
                for i0 in range(lo, hi, BATCH):
                    y, t = forward(torch.arange(i0, min(hi, i0 + BATCH)))
                    total += float((y.float() - t.float()).pow(2).sum())
            return total / ((hi - lo) * x_buf.data.shape[1] * x_buf.data.shape[2])  # mean over [hi-lo, S, d]

        held = n // HOLDOUT if config.tune == "attention" else 0
        fit = n - held  # samples [0, fit) are fitted, [fit, n) held out
        before, held_before = error(0, n), (error(fit, n) if held else None)
        best = start = {k: v.detach().clone() for k, v in params.items()}
        best_err, best_epoch = held_before, 0
        for epoch in _fit(params, set(norm_parameters(block)), forward, fit, config, bp.g):
            if held and (err := error(fit, n)) < best_err:
                best, best_err, best_epoch = {k: v.detach().clone() for k, v in params.items()}, err, epoch
        with torch.no_grad():
            for k, v in params.items():  # what the shard will store (the best epoch's, held out)
                v.copy_((best[k] if held else v).to(raw[raw_key[k]].dtype).float())
        after = error(0, n)
        held_after = error(fit, n) if held else None
        kept = held_after < held_before if held else after < before
        final = {k: (v.detach().clone() if kept else start[k]) for k, v in params.items()}
    if kept:
        own = dict(block.named_parameters())
        for k, v in final.items():
            raw[raw_key[k]] = v.to(raw[raw_key[k]].dtype).cpu()
            own[k].copy_(v.to(own[k].dtype))
    keys, count = tuple(raw_key[k] for k in final), sum(v.numel() for v in final.values())
    epoch = (best_epoch if kept else 0) if held else None
    return TuneResult(count, before, after, kept, keys, held, held_before, held_after, epoch)
