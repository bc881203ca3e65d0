"""The plan of a run as data: what every block will do, which ranks hold which experts, and the memory and
disk it will need, from the preflight alone (config and shard headers; no weight is read).

``qmoe compress ... --dry-run`` prints it and writes nothing; every report records it (``plan``); a run
checks it against its device before its first block (``check_memory``).
"""

from __future__ import annotations

import math
from typing import Any

from qmoe.config import CompressConfig
from qmoe.errors import ConfigError
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


def _per_expert(p: Plan) -> int:
    """Weights of one routed expert, in the largest MoE layer."""
    routed = p.n_experts * len(p.adapter.experts.projections)  # bp.matrices: routed first, shared after
    return max(
        (
            sum(math.prod(shape) for _, shape in bp.matrices[:routed]) // p.n_experts
            for bp in p.blocks
            if bp.moe_path is not None
        ),
        default=0,
    )


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
    per_expert = _per_expert(p)
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


def device_capacity(device: Any) -> tuple[int, str]:
    """(bytes, name) of the memory a rank's tensors live in: the GPU's total memory, or the machine's RAM
    plus swap for a CPU run (what the kernel could ever hand out, not what is free now)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory), f"cuda:{index}"
    import psutil

    return int(psutil.virtual_memory().total + psutil.swap_memory().total), "this machine (RAM and swap)"


def check_memory(p: Plan, config: CompressConfig, world: int, capacity: int, where: str) -> None:
    """Refuse, before any block runs, a run whose rank cannot hold what a stage must hold at once: its share
    of a layer's experts in float32 with their Hessians (the quantization), or the whole layer's experts in
    float32 (the tuning stage gathers them on every rank). Both are lower bounds of what the stage
    allocates, so a run refused here would have failed hours later with an out-of-memory error."""
    mem = _memory(p, config, world)
    need = mem["expert_weights"] + mem["hessians"]
    if need > capacity:
        raise ConfigError(
            f"each rank must hold its share of an MoE layer's experts in float32 with their Hessians: "
            f"{_gib(need)} on {world} rank(s), but {where} has {_gib(capacity)}; run more ranks (torchrun "
            f"--nproc-per-node N: each holds 1/N of the experts) or use a device with more memory"
        )
    gathered = 4 * _per_expert(p) * p.n_experts
    if config.tune != "none" and gathered > capacity:
        raise ConfigError(
            f"the tuning stage (--tune {config.tune}) gathers a whole MoE layer's experts in float32 on "
            f"every rank: {_gib(gathered)}, but {where} has {_gib(capacity)}; pass --tune none (the norms "
            f"and attention stay as the source stores them) or use a device with more memory"
        )


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
    if n >= 2**28:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


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
