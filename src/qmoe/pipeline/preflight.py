"""Checks before any compute is spent, each failing with a one-line ``QMoEError`` that says what to do.

- the source resolves, is an MoE model of a supported family, and is not already compressed;
- every weight shard the index names exists;
- every tensor the config implies exists with the implied shape, and no block holds unexpected tensors
  (each block is built on the ``meta`` device, which costs no memory, and compared with the shard headers);
- the output directory is new/empty, or holds this very run (finished: nothing to do; unfinished: resume),
  never a different one;
- the disk has room for the estimated output and the activation snapshots.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qmoe.adapters import Adapter, StackSpec, get_adapter
from qmoe.config import CompressConfig
from qmoe.errors import ConfigError, QMoEError, SourceError
from qmoe.pipeline.shards import ShardReader
from qmoe.pipeline.state import PARTIAL_DIR, RunState, fingerprint
from qmoe.sources import is_compressed, read_config, require_moe, resolve_source

# Upper bounds of the encoded size per expert weight, for the disk estimate (measured: ~0.3-1.6 / ~1.5-2.2).
_EST_BITS = {"ternary": 2.0, "2": 3.0}


@dataclass
class BlockPlan:
    stack: StackSpec
    i: int  # index within the stack
    g: int  # index over all stacks
    tensor_keys: list[str]  # non-expert tensors of the block (copied to the output as they are)
    moe_path: str | None
    expert_keys: list[str] = field(default_factory=list)  # on-disk expert weights (read)
    # the encoded matrices written for them: (name, [rows, cols]), one per expert and projection
    matrices: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    # on-disk weights of the MoE layer's shared experts: kept in tensor_keys, or (--shared-experts ternary|2)
    # read, quantized and encoded like the routed experts (and then listed in matrices too)
    shared_keys: list[str] = field(default_factory=list)


@dataclass
class Plan:
    source: Path
    source_cfg: dict[str, Any]
    adapter: Adapter
    hf_config: Any
    reader: ShardReader
    stacks: tuple[StackSpec, ...]
    blocks: list[BlockPlan]
    rest_keys: list[str]  # tensors outside every block
    n_experts: int
    params: int
    expert_params: int
    fingerprint: str
    out: Path
    state: RunState | None  # an unfinished run of the same settings to resume
    complete: bool  # the output already holds this run, finished
    shared_params: int = 0  # weights of the shared experts' projections (kept or compressed)


def _check_block(
    adapter: Adapter,
    plan_cfg: dict[str, Any],
    hf_config: Any,
    reader: ShardReader,
    stack: StackSpec,
    i: int,
    n_experts: int,
) -> tuple[list[str], list[str]]:
    prefix = stack.block_prefix(i) + "."
    moe = stack.moe_path(i)
    moe = None if moe is None else adapter.disk_key(moe)
    layout = adapter.experts
    with torch.device("meta"):
        block = adapter.build_block(hf_config, stack, i)
    expected: dict[str, tuple[int, ...]] = {}
    container = None if moe is None else f"{moe}.{layout.container}."
    biases = set() if moe is None else {layout.bias_key(moe, p) for p in layout.projections} - {None}
    for name, t in block.state_dict().items():
        key = adapter.disk_key(prefix + name)
        if container is None or not key.startswith(container) or key in biases:  # biases stay as stored
            expected[key] = tuple(t.shape)
    tensor_keys = list(expected)
    expert_keys = []
    if moe is not None:
        for key, shape in layout.disk_tensors(moe, plan_cfg, n_experts).items():
            expected[key] = shape
            expert_keys.append(key)
    on_disk = {k for k in reader.keys() if k.startswith(prefix)}
    missing = [k for k in expected if k not in on_disk]
    if missing:
        raise SourceError(
            f"{reader.path} lacks {len(missing)} tensor(s) that its config.json implies (first: "
            f"{missing[0]}); the weights do not match the config"
        )
    for k, shape in expected.items():
        if reader.shape(k) != shape:
            raise SourceError(
                f"tensor {k} has shape {list(reader.shape(k))} but config.json implies {list(shape)}; "
                "the weights do not match the config"
            )
    extra = sorted(on_disk - set(expected))
    if extra:
        raise SourceError(
            f"{reader.path} holds {len(extra)} tensor(s) that config.json does not explain (first: "
            f"{extra[0]}); the weights do not match the config"
        )
    return tensor_keys, expert_keys


def _shared_keys(
    adapter: Adapter, stack: StackSpec, i: int, config: CompressConfig, tensor_keys: list[str]
) -> list[str]:
    """On-disk weights of block ``i``'s shared experts (the layout's projection names under
    ``adapter.shared_experts``); refuses ``--shared-experts ternary|2`` for a family that has none."""
    moe = stack.moe_path(i)
    if adapter.shared_experts is None:
        if config.shared_experts != "keep":
            raise ConfigError(
                f"--shared-experts {config.shared_experts}: {adapter.name} models have no shared experts; "
                "drop the option"
            )
        return []
    if moe is None:
        return []
    prefix = f"{moe}.{adapter.shared_experts}"
    keys = [adapter.disk_key(f"{prefix}.{p}.weight") for p in adapter.experts.projections]
    return [k for k in keys if k in tensor_keys]


def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _output_state(out: Path, fp: str) -> tuple[RunState | None, bool]:
    """(state to resume, already complete) for the output directory; refuses a directory of another run."""
    if not out.exists():
        return None, False
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose a new directory")
    cfg_file = out / "config.json"
    if cfg_file.is_file():
        try:
            qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
        except (OSError, ValueError):
            qc = {}
        if qc.get("quant_method") == "qmoe" and qc.get("run_fingerprint") == fp:
            return None, True
        raise ConfigError(
            f"{out} already holds a model from a different run (or another tool); choose another "
            "--out directory or delete this one"
        )
    partial = out / PARTIAL_DIR
    if partial.is_dir():
        state = RunState.load(partial)
        if state is not None and state.fingerprint != fp:
            raise ConfigError(
                f"{out} holds an unfinished qmoe run with different settings or source; rerun that "
                "command to finish it, or choose another --out directory"
            )
        return state, False
    if any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no qmoe run; choose a new or empty --out directory")
    return None, False


def _check_target_bits(target: float, matrices: list[tuple[str, tuple[int, ...]]]) -> None:
    """Refuse a size target below what storing the experts costs with every code zero (levels, row offsets,
    tables, headers): no rate reaches it on these shapes."""
    import numpy as np

    from qmoe.codec import encode_ternary
    from qmoe.codec.container import matrix_header_bytes

    zero: dict[tuple[int, ...], Any] = {}  # shape -> the all-zero encoded matrix
    total = weights = 0
    for key, shape in matrices:
        if shape not in zero:
            rows = shape[0]
            ones = np.ones(rows, np.float32)
            zero[shape] = encode_ternary(np.zeros(shape, np.int8), -ones, ones)
        total += zero[shape].nbytes + matrix_header_bytes(key, zero[shape])
        weights += int(np.prod(shape))
    least = 8 * total / weights
    if target < 1.15 * least:
        raise ConfigError(
            f"--target-bits {target:g} is out of reach: with every code zero these expert matrices still "
            f"take {least:.2f} bits/weight (per-row levels and offsets, tables, headers); choose at least "
            f"{1.15 * least:.2f}"
        )


def _blocks(
    adapter: Adapter,
    plan_cfg: dict[str, Any],
    hf_config: Any,
    reader: ShardReader,
    stacks: tuple[StackSpec, ...],
    config: CompressConfig,
    n_experts: int,
) -> list[BlockPlan]:
    """Every block of every stack, checked against the shard headers, with the matrices it will encode."""
    blocks: list[BlockPlan] = []
    layout = adapter.experts
    for stack in stacks:
        for i in range(stack.n_blocks):
            tensor_keys, expert_keys = _check_block(adapter, plan_cfg, hf_config, reader, stack, i, n_experts)
            moe = stack.moe_path(i)
            moe = None if moe is None else adapter.disk_key(moe)  # expert keys and report rows: on-disk names
            matrices = (
                []
                if moe is None
                else [
                    (layout.expert_key(moe, e, p), layout.shape(plan_cfg, p))
                    for e in range(n_experts)
                    for p in layout.projections
                ]
            )
            shared = _shared_keys(adapter, stack, i, config, tensor_keys)
            if config.shared_experts != "keep":
                tensor_keys = [k for k in tensor_keys if k not in shared]
                matrices += [(k, reader.shape(k)) for k in shared]
            blocks.append(BlockPlan(stack, i, len(blocks), tensor_keys, moe, expert_keys, matrices, shared))
    return blocks


def hidden_size(plan_cfg: dict[str, Any]) -> int:
    return int(plan_cfg.get("d_model") or plan_cfg.get("hidden_size") or 0)


def disk_estimate(
    plan_cfg: dict[str, Any],
    reader: ShardReader,
    stacks: tuple[StackSpec, ...],
    blocks: list[BlockPlan],
    expert_params: int,
    config: CompressConfig,
) -> dict[str, int]:
    """Upper bounds of the bytes the run writes: the output (non-expert tensors as stored, experts at
    ``_EST_BITS``) and the activation snapshots (two generations of every stream's buffer, at the end of a
    block while the previous snapshot is still the resume point)."""
    n_eval = len(config.eval_data) * 2 * config.eval_samples if config.eval else 0
    acts = 4 * hidden_size(plan_cfg) * config.seq_len * (config.calib_samples + n_eval) * len(stacks)
    non_expert = sum(reader.nbytes(k) for k in reader.keys()) - sum(
        reader.nbytes(k) for b in blocks for k in b.expert_keys
    )
    return {
        "output": non_expert + int(expert_params * _EST_BITS[config.bits] / 8),
        "snapshots": 2 * acts,
    }


def _open_source(source: str | Path) -> tuple[Path, dict[str, Any]]:
    """The source directory and its config.json: an MoE checkpoint of 16/32-bit weights."""
    src = resolve_source(source)
    cfg = read_config(src)
    require_moe(src, cfg)
    if is_compressed(cfg):
        raise SourceError(f"{src} is already a qmoe-compressed model; compress the original checkpoint")
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method:  # DeepSeek-V3's fp8 and gpt-oss's mxfp4 releases, GPTQ/AWQ files, ...
        raise SourceError(
            f"{src} holds {method}-quantized weights; qmoe compresses 16/32-bit checkpoints: dequantize it "
            "first (load it in transformers with the quantization's dequantize option and save_pretrained)"
        )
    return src, cfg


def plan(source: str | Path, out: str | Path, config: CompressConfig, qmoe_version: str) -> Plan:
    """Check the source and the output directory and lay out every block; reads only config and shard
    headers (no weights), so it takes seconds on any model."""
    src, cfg = _open_source(source)
    adapter = get_adapter(cfg)
    reader = ShardReader(src)
    hf_config = adapter.hf_config(src)
    plan_cfg = hf_config.to_dict()  # includes defaults that config.json may omit
    n_experts = adapter.num_experts(plan_cfg)
    stacks = adapter.stacks(plan_cfg)

    blocks = _blocks(adapter, plan_cfg, hf_config, reader, stacks, config, n_experts)
    needed = {s.embed_key for s in stacks} | {s.final_norm_key for s in stacks if s.final_norm_key}
    needed |= set(adapter.head_keys(plan_cfg).values())
    missing = sorted(k for k in needed if k not in reader)
    if missing:
        raise SourceError(
            f"{reader.path} lacks tensor {missing[0]} that the model needs; the checkpoint is incomplete"
        )
    in_blocks = {k for b in blocks for k in (*b.tensor_keys, *b.expert_keys, *b.shared_keys)}
    rest_keys = [k for k in reader.keys() if k not in in_blocks]
    expert_params = sum(reader.numel(k) for b in blocks for k in b.expert_keys)
    shared_params = sum(reader.numel(k) for b in blocks for k in b.shared_keys)
    params = sum(reader.numel(k) for k in reader.keys())
    if config.target_bits is not None:
        _check_target_bits(config.target_bits, [m for b in blocks for m in b.matrices])

    from qmoe.codec import FORMAT_VERSION

    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in reader.files]
    fp = fingerprint(config.to_dict(), cfg, files, qmoe_version, FORMAT_VERSION)
    out = Path(out).expanduser()
    state, complete = _output_state(out, fp)

    if not complete:
        need = sum(disk_estimate(plan_cfg, reader, stacks, blocks, expert_params, config).values())
        free = _free_bytes(out)
        if free < need:
            raise QMoEError(
                f"not enough disk space for {out}: about {need / 2**30:.2f} GiB needed (output and "
                f"activation snapshots), {free / 2**30:.2f} GiB free; free space or choose another --out"
            )
    return Plan(src, cfg, adapter, hf_config, reader, stacks, blocks, rest_keys, n_experts, params,
                expert_params, fp, out, state, complete, shared_params)
