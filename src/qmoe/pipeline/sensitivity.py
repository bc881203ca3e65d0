"""The sensitivity pass of a model-wide budget: each MoE layer's loss curvature and each expert's energy.

A small calibration sample (``budget.PLAN_SAMPLES``) is streamed through the *reference* model block by
block, as the compression streams it. At every MoE layer the reference stream counts each expert's routed
positions and gate-weighted output energy, and two perturbed streams start there: the layer's output plus
and minus the same Gaussian noise. Every stream then runs through all later blocks (an encoder's perturbed
streams through the whole decoder too, cross-attending to their own encoder output) to the loss. With ``L``
MoE layers, block ``i`` runs ``1 + 2 * (MoE layers before it)`` streams of the small sample: ``O(L^2)``
block passes of 64 samples, against the compression's few passes of the full calibration set per block.

``kappa = (loss(+e) + loss(-e) - 2 loss) / 2 / (sigma^2 d)`` per token: the curvature of the loss along
random directions of the layer output, per unit squared error per position (``qmoe.pipeline.budget``).
"""

from __future__ import annotations

from typing import Any

import torch

from qmoe.pipeline.budget import NOISE_SCALE, PLAN_SAMPLES, LayerSensitivity
from qmoe.pipeline.buffers import ActivationBuffer, to_device
from qmoe.pipeline.context import RunContext, final_norms, layer_calibration, load_block
from qmoe.pipeline.streams import capacity_lifted


def measure(ctx: RunContext) -> list[LayerSensitivity]:
    """``LayerSensitivity`` of every MoE layer, in block order, for the compression run ``ctx``."""
    p = ctx.plan
    calib = ctx.samples["calib"]
    n = min(PLAN_SAMPLES, len(calib["labels"]))
    bufs: dict[tuple[str, str], ActivationBuffer] = {}  # (stream, stack) -> [n, S, d]
    streams = ["ref"]
    stats: dict[str, dict[str, Any]] = {}  # per MoE layer: routed, energy, positions, sigma
    stack_state: dict[str, dict[str, Any]] = {}
    norms = final_norms(p)  # [d] per stack: read once
    for stack in p.stacks:
        stack_state[stack.name] = p.adapter.prepare_stack(p.hf_config, stack, p.reader.get)
        embed = p.reader.get(stack.embed_key).float()  # [vocab, d]
        ids = torch.from_numpy(calib[stack.inputs][:n])  # [n, S]
        for s in streams:
            buf = ActivationBuffer(f"plan/{stack.name}/{s}", (*ids.shape, embed.shape[1]), ctx.memory)
            buf.data[:] = torch.nn.functional.embedding(ids, embed)
            bufs[(s, stack.name)] = buf
        del embed
        for bp in (b for b in p.blocks if b.stack.name == stack.name):
            block, raw = load_block(ctx, bp)
            cal = None
            if bp.moe_path is not None:
                cal = layer_calibration(ctx, block, raw, bp, range(p.n_experts), None)
                cal.stats = {
                    "energy": torch.zeros(p.n_experts, dtype=torch.float64),
                    "out_sq": 0.0,
                    "positions": 0,
                }
                cal.start("run", count_tokens=True)
            for s in list(streams):
                if cal is not None:
                    cal.count_tokens = s == "ref"
                    cal.stats_on = s == "ref"
                _forward(ctx, block, bp, stack_state[stack.name], bufs, s, stack, norms)
            if cal is not None:
                stats[bp.moe_path] = _layer_stats(cal, bufs[("ref", stack.name)].shape[2], stack.name)
                sigma = stats[bp.moe_path]["sigma"]
                _perturb(ctx, bufs, streams, stack.name, bp.moe_path, bp.g, sigma)
            del block, raw, cal
    losses = _losses(ctx, bufs, streams, n, norms[p.stacks[-1].name])
    out = []
    for name, st in stats.items():
        d = next(b.shape[2] for (s, k), b in bufs.items() if s == "ref" and k == st["stack"])
        curvature = (losses[f"+{name}"] + losses[f"-{name}"] - 2 * losses["ref"]) / 2
        kappa = curvature / (st["sigma"] ** 2 * d) if st["sigma"] > 0 else 0.0
        out.append(
            LayerSensitivity(
                name,
                float(kappa),
                float(st["sigma"]),
                st["positions"],
                tuple(st["routed"]),
                tuple(float(v) for v in st["energy"]),
            )
        )
    for b in bufs.values():
        b.release()
    return out


def _layer_stats(cal: Any, d: int, stack: str) -> dict[str, Any]:
    """What the reference stream counted at one MoE layer, and the noise scale of its perturbed streams."""
    st = cal.stats
    positions = int(st["positions"])
    return {
        "routed": [int(v) for v in cal.routed.tolist()],
        "energy": st["energy"].tolist(),
        "positions": positions,
        "sigma": NOISE_SCALE * (st["out_sq"] / max(1, positions * d)) ** 0.5,
        "stack": stack,
    }


def _forward(
    ctx: RunContext,
    block: torch.nn.Module,
    bp: Any,
    state: dict[str, Any],
    bufs: dict[tuple[str, str], ActivationBuffer],
    stream: str,
    stack: Any,
    norms: dict[str, Any],
) -> None:
    """Stream ``stream`` through ``block`` in place (capacity lifted when the recipe lifts it)."""
    p, device = ctx.plan, ctx.device
    buf = bufs[(stream, stack.name)]
    mem = None
    if stack.memory:  # cross-attention: the stream's own encoder output, or the reference's
        mem = bufs.get((stream, stack.memory)) or bufs[("ref", stack.memory)]
    lift = p.adapter.capacity_attribute if ctx.config.no_drop else None
    w = norms[stack.memory].to(device) if mem is not None else None  # [d]
    with capacity_lifted(block, lift):
        for i0, i1 in buf.batches(ctx.config.batch_size):
            h = to_device(buf.data[i0:i1], device)
            m = None
            if mem is not None:
                m = p.adapter.final_norm(p.hf_config, w, to_device(mem.data[i0:i1], device))
            buf.data[i0:i1] = p.adapter.block_forward(block, bp.i, h, m, state).to("cpu", torch.float32)


def _perturb(
    ctx: RunContext,
    bufs: dict[tuple[str, str], ActivationBuffer],
    streams: list[str],
    stack: str,
    name: str,
    g: int,
    sigma: float,
) -> None:
    """Start the streams ``+name`` / ``-name``: the reference output of this block plus / minus noise."""
    ref = bufs[("ref", stack)]
    gen = torch.Generator().manual_seed(1_000_003 * (ctx.config.seed + 1) + g)
    noise = torch.randn(ref.shape, generator=gen) * sigma  # [n, S, d]
    for sign in (1.0, -1.0):
        s = f"{'+' if sign > 0 else '-'}{name}"
        buf = ActivationBuffer(f"plan/{stack}/{s}", ref.shape, ctx.memory)
        buf.data[:] = ref.data + sign * noise
        bufs[(s, stack)] = buf
        streams.append(s)


def _losses(
    ctx: RunContext,
    bufs: dict[tuple[str, str], ActivationBuffer],
    streams: list[str],
    n: int,
    final_norm: Any,
) -> dict[str, float]:
    """Mean loss per target token of every stream on the plan sample."""
    p, device = ctx.plan, ctx.device
    last = p.stacks[-1]
    head = {
        k: p.reader.get(key).float().to(device)
        for k, key in p.adapter.head_keys(p.hf_config.to_dict()).items()
    }
    norm = final_norm.to(device)  # [d]
    labels = torch.from_numpy(ctx.samples["calib"]["labels"][:n])
    out = {}
    for s in streams:
        buf = bufs[(s, last.name)]
        total, count = 0.0, 0
        for i0, i1 in buf.batches(ctx.config.batch_size):
            h = p.adapter.final_norm(p.hf_config, norm, to_device(buf.data[i0:i1], device))
            ls, c = p.adapter.loss(p.hf_config, head, h, labels[i0:i1].to(device))
            total, count = total + ls, count + c
        out[s] = total / max(1, count)
    return out
