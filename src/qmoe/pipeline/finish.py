"""The last stage, on rank 0: evaluation, the shard of tensors outside the blocks, the index, the report,
and ``config.json`` with its ``quantization_config`` (written last: it marks the directory complete)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from qmoe.config import CompressConfig
from qmoe.pipeline import output, report
from qmoe.pipeline.budget import BudgetPlan
from qmoe.pipeline.context import RunContext
from qmoe.pipeline.evaluate import evaluate
from qmoe.pipeline.preflight import Plan
from qmoe.pipeline.state import RunState, atomic_write_text
from qmoe.pipeline.streams import Streams


@dataclass(frozen=True)
class RunFacts:
    """What the report records about the run itself rather than its result."""

    source: str
    version: str
    execution: dict[str, Any]  # {"device", "threads", "rank_threads"}: the bytes depend on them
    usage: list[tuple[float, int]]  # every rank's (cpu seconds, peak RSS bytes)
    wall0: float  # perf_counter when this process started the run
    prior_seconds: float  # block time of earlier (killed) attempts
    resumed_from: int | None
    plan: dict[str, Any]  # the run's plan (qmoe.pipeline.dryrun.describe)


def quantization_config(
    p: Plan, config: CompressConfig, version: str, budget: BudgetPlan | None = None
) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: what a loader needs to rebuild the experts."""
    from qmoe.codec import FORMAT_VERSION

    layout = p.adapter.experts
    cfg = p.hf_config.to_dict()
    calibration = {"data": config.calib_data, "samples": config.calib_samples, "seq_len": config.seq_len}
    calibration |= {
        k: getattr(config, k)
        for k in (
            "seed",
            "token_cap",
            "min_tokens",
            "damp",
            "block_size",
            "act_order",
            "batch_size",
            "rate",
            "target_bits",
            "refit",
            "row_prices",
            "no_drop",
            "skip_sentinels",
            "gate_weighted",
            "level_scale",
        )
    }
    return {
        "quant_method": "qmoe",
        "format_version": FORMAT_VERSION,
        "bits": config.bits,
        "grid": config.grid,
        "method": config.method,
        "qmoe_version": version,
        "adapter": p.adapter.name,
        "calibration": calibration,
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
            bp.moe_path: sorted(budget.dropped(bp.moe_path))
            for bp in p.blocks
            if budget is not None and bp.moe_path is not None and budget.dropped(bp.moe_path)
        },
    }


def finish(
    ctx: RunContext, streams: Streams, state: RunState, budget: BudgetPlan | None, facts: RunFacts
) -> dict[str, Any]:
    """Write everything but the block shards; returns the report."""
    p, config = ctx.plan, ctx.config
    evals = evaluate(ctx, streams)
    n_shards = 1 + len(p.blocks)
    output.write_shard(p.out, 0, n_shards, p.reader.get_many(p.rest_keys), {})
    names = {0: list(p.rest_keys)}
    for bp in p.blocks:
        names[bp.g + 1] = [*bp.tensor_keys, *(k for k, _ in bp.matrices)]
    expert_keys = [k for bp in p.blocks for k, _ in bp.matrices]
    total_bytes = output.write_index(p.out, n_shards, names, expert_keys)
    output.copy_side_files(p.source, p.out)
    expert_bytes = sum(r["bytes"] for r in state.layers)
    rep = {
        "report_version": report.REPORT_VERSION,
        "qmoe_version": facts.version,
        "source": facts.source,
        "adapter": p.adapter.name,
        "config": config.to_dict(),
        "execution": facts.execution,
        "layers": state.layers,
        "totals": report.totals(p.params, p.expert_params, total_bytes, expert_bytes, state.layers),
        "eval": evals[0] if evals else None,
        "eval_extra": evals[1:],
        # state.seconds: block time of this and earlier (killed) attempts; add what this process spent
        # outside the blocks (set-up, evaluation, finishing) without counting its blocks twice.
        "wall_seconds": facts.prior_seconds + (time.perf_counter() - facts.wall0),
        "cpu_seconds": sum(c for c, _ in facts.usage),  # every rank's
        "peak_rss_bytes": max(r for _, r in facts.usage),  # of the largest process
        "resumed_from_block": facts.resumed_from,
        "budget": None if budget is None else budget.to_dict(),
        "ranks": ctx.comm.world,
        "plan": facts.plan,
    }
    atomic_write_text(p.out / report.REPORT_FILE, json.dumps(rep, indent=1) + "\n")
    qc = quantization_config(p, config, facts.version, budget)
    output.write_config(p.out, p.source_cfg, qc)  # marks done
    return rep
