"""The plan of a run as data: what every block will do, which ranks hold which experts, and the memory and
disk it will need, from the preflight alone (config and shard headers; no weight is read).

``qmoe compress ... --dry-run`` prints it and writes nothing; every report records it (``plan``).
"""

from __future__ import annotations

import math
from typing import Any

from qmoe.config import CompressConfig
from qmoe.pipeline.preflight import Plan, disk_estimate, hidden_size
from qmoe.pipeline.streams import run_streams


def _moe_blocks(p: Plan) -> list[dict[str, Any]]:
    out = []
    for bp in p.blocks:
        if bp.moe_path is None:
            continue
        shapes = sorted({shape for _, shape in bp.matrices})
        out.append(
            {
                "block": f"{bp.stack.name}.{bp.i}",
                "moe_layer": bp.moe_path,
                "matrices": len(bp.matrices),
                "shapes": [list(s) for s in shapes],
                "shared_experts": bp.shared_keys
                and ("quantized" if bp.shared_keys[0] in dict(bp.matrices) else "kept"),
            }
        )
    return out


def _memory(p: Plan, config: CompressConfig, world: int) -> dict[str, int]:
    """Bytes a rank holds at the peak of an MoE block: activations (before spilling to disk), its experts'
    float32 weights, one group's float32 Hessians (the widest: ``[E_r, cols, cols]``), and the tuning
    stage's own: every rank gathers the whole layer's experts in float32, and ``tune="attention"`` holds the
    block's matrices six times in float32 (weights, gradients, two Adam moments, the untuned copy and the
    best epoch's; every 2-D non-expert tensor of the block counts, an upper bound: kept shared experts and
    the router are not tuned)."""
    cfg = p.hf_config.to_dict()
    d = hidden_size(cfg)
    streams = run_streams(config.eval_data if config.eval else None, config.tune != "none")
    rows = sum(config.calib_samples if s.data == "calib" else config.eval_samples for s in streams)
    routed = p.n_experts * len(p.adapter.experts.projections)  # bp.matrices: routed first, shared after
    per_expert = max(  # weights of one expert, largest layer
        (
            sum(math.prod(shape) for _, shape in bp.matrices[:routed]) // p.n_experts
            for bp in p.blocks
            if bp.moe_path is not None
        ),
        default=0,
    )
    experts_per_rank = math.ceil(p.n_experts / world)
    cols = [shape[1] for bp in p.blocks for _, shape in bp.matrices]
    tuning = 0
    if config.tune != "none":
        shapes = [[p.reader.shape(k) for k in bp.tensor_keys] for bp in p.blocks if bp.moe_path is not None]
        block_matrices = max((sum(math.prod(s) for s in block if len(s) == 2) for block in shapes), default=0)
        tuning = 4 * per_expert * p.n_experts + (24 * block_matrices if config.tune == "attention" else 0)
    return {
        "activations": 4 * d * config.seq_len * rows * len(p.stacks),
        "expert_weights": 4 * per_expert * experts_per_rank,
        "hessians": 4 * experts_per_rank * max(cols, default=0) ** 2 if config.method == "gptq" else 0,
        "tuning": tuning,
    }


def describe(p: Plan, config: CompressConfig, world: int = 1) -> dict[str, Any]:
    """The plan of a run of ``config`` on ``world`` ranks, as JSON-ready data."""
    cfg = p.hf_config.to_dict()
    moe = _moe_blocks(p)
    ranks = [
        [r * p.n_experts // world, (r + 1) * p.n_experts // world - 1] for r in range(world)
    ]  # experts each rank quantizes (first, last)
    if config.allocation == "global":
        size = (
            f"model-wide budget at {config.target_bits} bits/weight"
            if config.target_bits
            else (f"one model-wide price {config.rate}")
        )
        size += " (a sensitivity pass and a planning pass run first)"
    elif config.target_bits is not None:
        size = f"every expert matrix group searched to {config.target_bits} bits/weight"
    else:
        size = f"bit price {config.rate}, level scale {config.level_scale}"
    return {
        "source": str(p.source),
        "adapter": p.adapter.name,
        "params": p.params,
        "expert_params": p.expert_params,
        "experts_per_layer": p.n_experts,
        "blocks": len(p.blocks),
        "moe_blocks": moe,
        "quantization": {"bits": config.bits, "grid": config.grid, "method": config.method, "size": size},
        "calibration": {
            "samples": config.calib_samples,
            "seq_len": config.seq_len,
            "data": config.calib_data,
        },
        "ranks": ranks,
        "memory_bytes_per_rank": _memory(p, config, world),
        "disk_bytes": disk_estimate(cfg, p.reader, p.stacks, p.blocks, p.expert_params, config),
        "resume": {"complete": p.complete, "blocks_done": p.state.done if p.state else 0},
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def format_plan(d: dict[str, Any]) -> str:
    """The plan for a person: one screen."""
    q, c = d["quantization"], d["calibration"]
    lines = [
        f"source    {d['source']} ({d['adapter']}): {d['params'] / 1e6:.1f}M parameters, "
        f"{d['expert_params'] / 1e6:.1f}M in routed experts, {d['experts_per_layer']} experts per MoE layer",
        f"quantize  {q['bits']} ({q['grid']}) by {q['method']}; {q['size']}",
        f"calibrate {c['samples']} samples x {c['seq_len']} tokens of {c['data']}",
        f"blocks    {d['blocks']}, of which {len(d['moe_blocks'])} MoE:",
    ]
    for b in d["moe_blocks"]:
        shapes = ", ".join("x".join(map(str, s)) for s in b["shapes"])
        shared = f"; shared experts {b['shared_experts']}" if b["shared_experts"] else ""
        lines.append(
            f"  {b['block']:<12} {b['moe_layer']:<36} {b['matrices']:5d} matrices [{shapes}]{shared}"
        )
    ranks = "; ".join(f"rank {r}: experts {a}-{b}" for r, (a, b) in enumerate(d["ranks"]))
    lines.append(f"ranks     {len(d['ranks'])} ({ranks})")
    mem = d["memory_bytes_per_rank"]
    lines.append(
        "memory    per rank: activations " + _gib(mem["activations"]) + " (spilled to disk beyond "
        "--buffer-gb), expert weights " + _gib(mem["expert_weights"]) + ", Hessians " + _gib(mem["hessians"])
        + ", tuning " + _gib(mem["tuning"])
    )
    disk = d["disk_bytes"]
    lines.append(
        f"disk      output <= {_gib(disk['output'])}, activation snapshots <= {_gib(disk['snapshots'])}"
    )
    r = d["resume"]
    state = (
        "complete"
        if r["complete"]
        else (f"resumes after block {r['blocks_done']}" if r["blocks_done"] else "new")
    )
    lines.append(f"output    {state}")
    return "\n".join(lines)
