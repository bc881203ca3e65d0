"""What every stage of a compression run reads and never changes: the preflight plan, the settings, where
the math runs, the token samples, the memory budget, the communication; and loading one block from it.

A stage takes a :class:`RunContext` and its own small inputs and returns a frozen result; the only state
that lives across blocks (the activation streams, ``qmoe.pipeline.streams``, and the resume state) has one
owner each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qmoe.config import CompressConfig
from qmoe.pipeline.buffers import MemoryBudget
from qmoe.pipeline.comm import Local
from qmoe.pipeline.moe import MoELayerCalibration
from qmoe.pipeline.preflight import BlockPlan, Plan
from qmoe.pipeline.quantize import stack_experts
from qmoe.progress import Progress


@dataclass(frozen=True)
class RunContext:
    plan: Plan  # the checked source, its blocks and matrices, the output directory (qmoe.pipeline.preflight)
    config: CompressConfig
    device: torch.device  # forward passes, Hessians and GPTQ; activations stay in CPU memory
    samples: dict[str, dict[str, np.ndarray]]  # "calib" and each eval set -> adapter.samples arrays
    memory: MemoryBudget  # activation buffers beyond it spill to disk
    comm: Local  # one process, or this rank's place in a torchrun job (qmoe.pipeline.dist.Dist)
    progress: Progress

    def shared_quantized(self, bp: BlockPlan) -> list[str]:
        """On-disk keys of this block's shared-expert weights that are quantized (``--shared-experts``)."""
        return bp.shared_keys if self.config.shared_experts != "keep" else []


def final_norms(p: Plan) -> dict[str, Tensor]:
    """Each stack's final norm weight ``[d]`` (the next stack's memory and the head need them)."""
    return {s.name: p.reader.get(s.final_norm_key).float() for s in p.stacks if s.final_norm_key}


def load_block(ctx: RunContext, bp: BlockPlan) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    """The block with every tensor loaded (float32 on the device; the routed experts' weights are left on
    ``meta``: the calibration module holds them), and the source-dtype tensors written to the output as
    they are (all but the experts' and the quantized shared experts' weights)."""
    p = ctx.plan
    shared = ctx.shared_quantized(bp)
    raw = p.reader.get_many([*bp.tensor_keys, *shared])
    with torch.device("meta"):
        block = p.adapter.build_block(p.hf_config, bp.stack, bp.i)
    prefix = bp.stack.block_prefix(bp.i) + "."
    to_module = p.adapter.module_key
    sd = {to_module(k)[len(prefix) :]: v.to(ctx.device, torch.float32) for k, v in raw.items()}
    missing, unexpected = block.load_state_dict(sd, strict=False, assign=True)
    container = None
    if bp.moe_path is not None:
        container = f"{bp.stack.moe_layers[bp.i]}.{p.adapter.experts.container}"
    stray = [k for k in missing if container is None or not k.startswith(container + ".")]
    assert not unexpected and not stray, f"block {prefix}: unexpected {unexpected}, missing {stray}"
    for k in shared:
        del raw[k]
    return block, raw


def token_cap(ctx: RunContext, bp: BlockPlan) -> int | None:
    """QMoE's cap: at most ``token_cap`` x the mean routed calibration tokens enter one expert's Hessian."""
    if ctx.config.token_cap <= 0:
        return None
    calib = ctx.samples["calib"]
    mask = calib.get(f"mask:{bp.stack.inputs}")
    n_tokens = int(np.prod(calib[bp.stack.inputs].shape) if mask is None else mask.sum())
    top_k = ctx.plan.adapter.top_k(ctx.plan.source_cfg)
    return int(np.ceil(ctx.config.token_cap * n_tokens * top_k / ctx.plan.n_experts))


def layer_calibration(
    ctx: RunContext,
    block: torch.nn.Module,
    raw: dict[str, Tensor],
    bp: BlockPlan,
    owned: range,
    comm: Local | None,
) -> MoELayerCalibration:
    """The MoE layer of ``block`` taken over by a ``MoELayerCalibration`` holding experts ``owned``
    (weights read from the source, float32 on the device; biases from the block's tensors ``raw``).
    ``comm``: the run's communication when ``owned`` is this rank's share, ``None`` when it is every
    expert (the budget's sensitivity pass, which each rank runs whole)."""
    p, config = ctx.plan, ctx.config
    layout = p.adapter.experts
    w_first, w_second = stack_experts(  # [E_r, F*I, d], [E_r, d, I]
        p.reader.get_many(layout.keys_of(bp.moe_path, owned)), layout, bp.moe_path, owned, ctx.device
    )
    biases = None  # (b_first [E_r, F*I], b_second [E_r, d]): kept as stored, part of the experts' math
    if layout.bias is not None:
        own = slice(owned.start, owned.stop)
        b = {
            proj: raw[layout.bias_key(bp.moe_path, proj)][own].to(ctx.device, torch.float32)
            for proj in layout.projections
        }
        biases = (torch.cat([b[proj] for proj in layout.first], dim=1), b[layout.second])
    glu = p.adapter.expert_glu(p.hf_config.to_dict())  # [t, F*I] -> [t, I]
    cal = MoELayerCalibration(
        p.adapter,
        w_first,
        w_second,
        glu,
        token_cap(ctx, bp),
        config.gate_weighted,
        biases,
        owned,
        p.n_experts,
        comm,
    )
    cal.row_weighted = config.rows == "output" and config.method == "gptq"
    cal.install(block.get_submodule(f"{bp.stack.moe_layers[bp.i]}.{layout.container}"))
    return cal


def shared_modules(ctx: RunContext, block: torch.nn.Module, bp: BlockPlan) -> list[torch.nn.Module]:
    """The block's shared-expert Linears being quantized, in ``layout.projections`` order."""
    prefix = bp.stack.block_prefix(bp.i) + "."
    to_module = ctx.plan.adapter.module_key
    return [
        block.get_submodule(to_module(k)[len(prefix) :].removesuffix(".weight"))
        for k in ctx.shared_quantized(bp)
    ]


def moe_module(ctx: RunContext, block: torch.nn.Module, bp: BlockPlan) -> torch.nn.Module:
    """The block's MoE layer (router and experts)."""
    return block.get_submodule(ctx.plan.adapter.module_key(bp.stack.moe_layers[bp.i]))
