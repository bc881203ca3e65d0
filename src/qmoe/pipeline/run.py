"""The driver of a compression run (QMoE, Frantar & Alistarh 2023, section 4), read top to bottom:

1. **plan** (``preflight``): check the source and the output directory, lay out every block and matrix;
   nothing heavy yet (``--dry-run`` stops here and prints it, ``dryrun``);
2. **samples** (``samples``): tokenize the calibration windows and the evaluation sets;
3. **budget** (``budget``, ``--allocation global`` only): a sensitivity pass and size curves, then one
   model-wide price that meets ``--target-bits``;
4. **for each block**, streamed (``context.load_block``: built on ``meta``, its tensors read and assigned,
   nothing else of the model in memory besides the activation buffers, ``streams``):
   a dense block runs every stream through it; an MoE block (``moe_block``) runs the reference streams,
   captures Hessians on the calibration stream, quantizes, runs the calibration and compressed streams
   through the *quantized* block (block i+1 calibrates on what compressed block i produces) and encodes;
   then its shard is written and the **checkpoint** (activation snapshots, then the resume state);
5. **finish** (``finish``): evaluation, the remaining shard, index, report, ``config.json`` (last).

Communication is one object handed to the stages (``comm.Local`` for one process, ``dist.Dist`` under
torchrun); the same bytes come out either way, and after a resume.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from qmoe.config import CompressConfig
from qmoe.errors import ConfigError
from qmoe.pipeline import report
from qmoe.pipeline.budget import BudgetPlan, make_plan, spent_bits
from qmoe.pipeline.buffers import MemoryBudget
from qmoe.pipeline.comm import Local
from qmoe.pipeline.context import RunContext
from qmoe.pipeline.dist import from_environment, local_device, settle_threads
from qmoe.pipeline.dryrun import check_memory, describe, device_capacity
from qmoe.pipeline.finish import RunFacts, finish
from qmoe.pipeline.moe_block import FAIL_ENV, dense_block, moe_block
from qmoe.pipeline.preflight import Plan, plan
from qmoe.pipeline.samples import EVAL_SEED, load_samples
from qmoe.pipeline.state import KILL_ENV, PARTIAL_DIR, RunState, kill_hook
from qmoe.pipeline.streams import Streams
from qmoe.progress import Progress
from qmoe.sources import resolve_device

__all__ = ["compress", "EVAL_SEED", "FAIL_ENV", "KILL_ENV"]

log = logging.getLogger(__name__)


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
    comm = from_environment(dev)  # torchrun: this rank's place in the job; else one process
    try:
        return _compress(source, out, config, local_device(dev), comm, buffer_gb, progress, wall0)
    finally:
        comm.close()  # before the process exits, success or failure (Dist.close says why)


def dry_run(
    source: str | Path, out: str | Path, config: CompressConfig | None = None, ranks: int = 1
) -> dict[str, Any]:
    """The plan of ``compress(source, out, config)`` on ``ranks`` processes, writing nothing."""
    from qmoe import __version__

    config = config if config is not None else CompressConfig()
    return describe(plan(source, out, config, __version__), config, ranks)


def _compress(
    source: str | Path,
    out: str | Path,
    config: CompressConfig,
    dev: torch.device,
    comm: Local,
    buffer_gb: float | None,
    progress: bool | Progress,
    wall0: float,
) -> dict[str, Any]:
    from qmoe import __version__

    p = plan(source, out, config, __version__)
    if comm.world > p.n_experts:
        raise ConfigError(
            f"{comm.world} ranks but {p.n_experts} experts per MoE layer: every rank needs at least one "
            f"expert; run at most {p.n_experts} ranks"
        )
    comm.barrier()  # every rank has read the output directory's state before rank 0 writes to it
    if p.complete:
        shutil.rmtree(p.out / PARTIAL_DIR, ignore_errors=True)
        log.info("%s already holds this run, complete; nothing to do", p.out)
        return json.loads((p.out / report.REPORT_FILE).read_text())
    # what the report says about earlier attempts, read before this run adds its blocks to the same state
    resumed_from, prior_seconds = (p.state.done, p.state.seconds) if p.state else (None, 0.0)
    # the plan as the report records it: where this attempt resumed is already resumed_from_block
    plan_data = {k: v for k, v in describe(p, config, comm.world).items() if k != "resume"}
    check_memory(p, config, comm.world, *device_capacity(dev))  # before anything is written
    ctx, state, execution = _start(p, config, dev, comm, buffer_gb, progress)
    streams = Streams(ctx)
    streams.restore(state.buffers, p.out / PARTIAL_DIR)
    with torch.inference_mode():
        budget = make_plan(ctx) if config.allocation == "global" else None
        _blocks(ctx, streams, state, budget)
        usage = comm.gather_objects((report.cpu_seconds(), report.peak_rss_bytes()))
        facts = RunFacts(str(source), __version__, execution, usage or [], wall0, prior_seconds, resumed_from,
                         plan_data)  # fmt: skip
        done = lambda: finish(ctx, streams, state, budget, facts) if comm.main else {}  # noqa: E731
        rep = comm.guard(done, "finishing the output directory")
    streams.release()
    comm.barrier()  # every rank has released its buffers (spill files live inside the partial directory)
    if not comm.main:
        return json.loads((p.out / report.REPORT_FILE).read_text())
    shutil.rmtree(p.out / PARTIAL_DIR, ignore_errors=True)
    return rep


def _start(
    p: Plan, config: CompressConfig, dev: torch.device, comm: Local, buffer_gb: float | None,
    progress: bool | Progress,
) -> tuple[RunContext, RunState, dict[str, Any]]:  # fmt: skip
    """The run's context, its resume state (new or the unfinished run's) and where it executes."""
    samples = load_samples(p, config)
    threads, note = settle_threads()
    if note:
        log.warning("qmoe: %s", note)
    execution = {"device": dev.type, "threads": threads}
    # every rank's threads, in rank order (the report records them; resume compares only `execution`)
    rank_threads = comm.sum_ints([threads if r == comm.rank else 0 for r in range(comm.world)])
    if p.state is not None and p.state.execution and p.state.execution != execution:
        was = p.state.execution
        raise ConfigError(
            f"{p.out} holds an unfinished run started on {was['device']} with {was['threads']} "
            f"threads; this process has {execution['device']} with {execution['threads']}, and the bytes "
            f"depend on both. Resume with the same device and thread count (e.g. "
            f"OMP_NUM_THREADS={was['threads']}), or delete {p.out} to start over"
        )
    partial = p.out / PARTIAL_DIR
    comm.check_shared_dir(p.out)
    if comm.main:
        partial.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    if buffer_gb is None:
        import psutil

        budget_bytes = int(min(8 << 30, psutil.virtual_memory().available // 2))
    else:
        budget_bytes = int(buffer_gb * 2**30)
    spill = partial if comm.main else partial / f"rank-{comm.rank}"  # each rank's own spilled activations
    memory = MemoryBudget(budget_bytes // comm.world, spill)
    shown = Progress.of(progress) if comm.main else Progress(enabled=False)
    ctx = RunContext(p, config, dev, samples, memory, comm, shown)
    state = p.state or RunState(p.fingerprint, execution=execution)
    return ctx, state, {**execution, "rank_threads": rank_threads}


def _blocks(ctx: RunContext, streams: Streams, state: RunState, budget: BudgetPlan | None) -> None:
    """Every block not done yet, in order, each ending with a checkpoint."""
    p, shown = ctx.plan, ctx.progress
    spent = spent_bits(budget, state.layers)  # a resumed run's finished groups count as spent
    t_start = time.perf_counter()
    bar = shown.bar(total=len(p.blocks), initial=state.done, desc="blocks", unit="block")
    current, header_shown = None, False
    for bp in p.blocks[state.done :]:
        if current != bp.stack.name:
            streams.start_stack(bp.stack)
            current = bp.stack.name
        bar.set_description(f"{bp.stack.name} block {bp.i}")
        if bp.moe_path is None:
            dense_block(ctx, streams, bp)
        else:
            result = moe_block(ctx, streams, bp, budget, spent)
            spent = result.spent_bits
            if result.row is not None:
                state.layers.append(result.row)
                if shown.enabled:
                    if not header_shown:
                        shown.write(report.TABLE_HEADER)
                        header_shown = True
                    shown.write(report.table_row(result.row))
        state.seconds += time.perf_counter() - t_start
        t_start = time.perf_counter()
        _checkpoint(ctx, streams, state, bp.stack.name, bp.g)
        kill_hook("after", bp.g)
        bar.update(1)
    bar.close()


def _checkpoint(ctx: RunContext, streams: Streams, state: RunState, stack: str, g: int) -> None:
    """Block ``g`` is done: rank 0 writes the activation snapshots, then the resume state that points to
    them (a run killed in between finds the previous state, still consistent), then drops the old ones."""
    if not ctx.comm.main:  # rank 0 writes the resume state; every rank reads it on resume
        state.done = g + 1
        return
    partial = ctx.plan.out / PARTIAL_DIR
    old = dict(state.buffers)
    state.buffers.update(streams.snapshot(stack, g, partial))
    state.done = g + 1
    state.save(partial)
    for f in set(old.values()) - set(state.buffers.values()):
        (partial / f).unlink(missing_ok=True)
