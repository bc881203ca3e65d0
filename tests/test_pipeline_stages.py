"""The pipeline's stages, each on its own with small inputs: the communication object, a group's stored
size against a written shard, the size search on two simulated ranks, the streams against transformers,
their snapshots, and the plan that ``--dry-run`` prints."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qmoe.config import CompressConfig
from qmoe.pipeline.comm import Local
from qmoe.pipeline.dist import Dist


def _ctx(src: Path, out: Path, **config: object):  # noqa: ANN202
    from qmoe import __version__
    from qmoe.pipeline.buffers import MemoryBudget
    from qmoe.pipeline.context import RunContext
    from qmoe.pipeline.preflight import plan
    from qmoe.pipeline.samples import load_samples
    from qmoe.progress import Progress

    cfg = CompressConfig(**config)
    p = plan(src, out, cfg, __version__)
    memory = MemoryBudget(1 << 30, out / "spill")
    quiet = Progress(enabled=False)
    return RunContext(p, cfg, torch.device("cpu"), load_samples(p, cfg), memory, Local(), quiet)


@pytest.mark.parametrize("comm", [Local(), Dist(0, 1)], ids=["Local", "Dist-1"])
def test_one_process_communication_is_the_identity(comm: Local) -> None:
    t = torch.arange(6).reshape(3, 2)
    assert comm.main and not comm.active and comm.owned(5) == range(5)
    assert comm.sum_ints([3, 4]) == [3, 4]
    assert comm.gather_experts(t, 3) is t and comm.all_gather_rows(t)[0] is t
    assert comm.gather_objects({"a": 1}) == [{"a": 1}]
    assert comm.mine(["x", "y"]) == [(0, "x"), (1, "y")]
    with pytest.raises(ValueError, match="boom"):  # one process: the error itself, not a rank message
        comm.guard(lambda: (_ for _ in ()).throw(ValueError("boom")), "somewhere")


def _qwen_layout():  # noqa: ANN202
    from qmoe.adapters import get_adapter

    return get_adapter({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}).experts


def _group(E: int = 4, rows: int = 24, cols: int = 32, seed: int = 0):  # noqa: ANN202
    """Random first-projection weights ``[E, 2*rows, cols]`` and GPTQ Hessians ``[E, cols, cols]``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, 2 * rows, cols, generator=g) * 0.05
    X = torch.randn(E, 256, cols, generator=g)
    H = 2 * X.transpose(1, 2) @ X / 256
    return W, H, torch.full((E,), 256)


def test_group_size_matches_the_written_shard(tmp_path: Path) -> None:
    """The size a search steers by (arrays plus a header estimate) is what the written shard stores."""
    from qmoe.codec.container import header_share
    from qmoe.gptq import rtn_quantize
    from qmoe.pipeline import output
    from qmoe.pipeline.encode import GroupSize, encode_experts

    layout = _qwen_layout()
    W, _, _ = _group()
    q1 = rtn_quantize(W, grid="ternary", rate=0.0)
    q2 = rtn_quantize(W[:, :, :24].transpose(1, 2).contiguous(), grid="ternary", rate=0.0)
    path = "model.layers.0.mlp"
    size1 = GroupSize(layout, path, list(layout.first), "ternary")
    size2 = GroupSize(layout, path, [layout.second], "ternary")
    encoded, _ = encode_experts(layout, path, q1, q2, "ternary")
    shard = output.write_shard(tmp_path, 1, 2, {}, encoded)  # a layer's shard: both groups
    stored = 8 * (sum(e.nbytes for e in encoded.values()) + header_share(tmp_path / shard, sorted(encoded)))
    estimate = size1.bits_per_weight(q1) * q1.codes.numel() + size2.bits_per_weight(q2) * q2.codes.numel()
    assert estimate == pytest.approx(stored, rel=0.01)
    # each group on its own: its arrays plus its share of the shard's header
    first = sorted(k for k in encoded if not k.endswith("down_proj.weight"))
    stored1 = 8 * (sum(encoded[k].nbytes for k in first) + header_share(tmp_path / shard, first))
    assert size1.bits_per_weight(q1) == pytest.approx(stored1 / q1.codes.numel(), rel=0.02)


class _Threads(Local):
    """Two ranks simulated by two threads: ``sum_ints`` really sums both ranks' values (a barrier each)."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.world, self.shared = rank, 2, shared
        self.calls = 0

    def sum_ints(self, values):  # noqa: ANN001, ANN201
        self.calls += 1
        s = self.shared
        s["slot"][self.rank] = list(values)
        s["barrier"].wait()
        total = [a + b for a, b in zip(*s["slot"], strict=True)]
        s["barrier"].wait()
        return total


def test_size_search_on_two_ranks_equals_one_process() -> None:
    """Each rank searches on its half of the experts, the group's size summed through the communication
    object it was handed: the same rate, the same bits and the same codes as one process on all of them."""
    from qmoe.pipeline.encode import GroupSize
    from qmoe.pipeline.quantize import quantize_to_size

    layout, path = _qwen_layout(), "model.layers.0.mlp"
    W, H, counts = _group(E=4)
    config = CompressConfig(target_bits=1.3, min_tokens=1)
    one = quantize_to_size(W, H, counts, config, GroupSize(layout, path, list(layout.first), "ternary"))
    shared = {"slot": [None, None], "barrier": threading.Barrier(2, timeout=60)}
    halves: list = [None, None]
    comms = [_Threads(r, shared) for r in range(2)]

    def rank(r: int) -> None:
        sl = slice(2 * r, 2 * r + 2)
        size = GroupSize(layout, path, list(layout.first), "ternary", first_expert=2 * r)
        halves[r] = quantize_to_size(W[sl], H[sl], counts[sl], config, size, comms[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(h is not None for h in halves), "a rank failed (see the thread's traceback)"
    assert one.rate > 0 and comms[0].calls == comms[1].calls >= 4  # a price search: several sizes summed
    for h in halves:
        assert (h.rate, h.level_scale, h.bits) == (one.rate, one.level_scale, one.bits)
    torch.testing.assert_close(torch.cat([h.q.codes for h in halves]), one.q.codes, rtol=0, atol=0)


@pytest.mark.timeout(300)
def test_streams_through_a_block_equal_transformers(tmp_path: Path, tiny_qwen3_moe_dir: Path) -> None:
    """The calibration stream through block 0 (experts run by the calibration module) is transformers'
    hidden state after layer 0; its snapshot restores exactly."""
    from transformers import AutoModelForCausalLM

    from qmoe.pipeline.context import layer_calibration, load_block
    from qmoe.pipeline.streams import Streams

    ctx = _ctx(tiny_qwen3_moe_dir, tmp_path / "out", calib_samples=6, seq_len=16, eval=False)
    streams = Streams(ctx)
    bp = ctx.plan.blocks[0]
    streams.start_stack(bp.stack)
    block, raw = load_block(ctx, bp)
    cal = layer_calibration(ctx, block, raw, bp, range(ctx.plan.n_experts), ctx.comm)
    cal.start("run", count_tokens=True)
    with torch.inference_mode():
        streams.propagate(block, bp, streams.calib, write=True, what="test")
    got = streams.buffers[f"{bp.stack.name}/calib"].data.clone()

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(ctx.samples["calib"]["input_ids"])
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert int(cal.routed.sum()) == ids.numel() * model.config.num_experts_per_tok

    partial = tmp_path / "snap"
    partial.mkdir()
    files = streams.snapshot(bp.stack.name, 0, partial)
    again = Streams(ctx)
    again.restore(files, partial)
    assert set(again.buffers) == set(files)
    assert torch.equal(again.buffers[f"{bp.stack.name}/calib"].data, got)


def test_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, tiny_qwen3_moe_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from qmoe.cli import main
    from qmoe.pipeline import dry_run

    out = tmp_path / "never"
    assert main(["compress", str(tiny_qwen3_moe_dir), "--out", str(out), "--dry-run", "2"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "rank 0: experts 0-1; rank 1: experts 2-3" in text and "12 matrices" in text
    plan = dry_run(tiny_qwen3_moe_dir, out, CompressConfig(), ranks=2)
    assert [b["matrices"] for b in plan["moe_blocks"]] == [12, 12]  # 4 experts x 3 projections per layer
    assert plan["ranks"] == [[0, 1], [2, 3]]
    one = dry_run(tiny_qwen3_moe_dir, out, CompressConfig(), ranks=1)["memory_bytes_per_rank"]
    two = plan["memory_bytes_per_rank"]
    # a rank holds half the experts on two ranks: its weights and Hessians halve, activations do not
    assert (one["expert_weights"], one["hessians"]) == (2 * two["expert_weights"], 2 * two["hessians"])
    assert one["activations"] == two["activations"]
    # the tuning stage gathers the whole layer on every rank: 4 experts x 3 matrices of 24x32 in float32,
    # plus the attention's q/k/v/o six times over in float32 (tune="attention", the default)
    from safetensors import safe_open

    with safe_open(str(tiny_qwen3_moe_dir / "model.safetensors"), "pt") as f:
        shapes = [f.get_slice(f"model.layers.0.self_attn.{m}_proj.weight").get_shape() for m in "qkvo"]
    attention = sum(a * b for a, b in shapes)
    experts = 4 * 3 * 24 * 32
    assert one["tuning"] == two["tuning"] == 4 * experts + 24 * (attention + 4 * 32)  # + the router [4, 32]
    norms = dry_run(tiny_qwen3_moe_dir, out, CompressConfig(tune="norms"), ranks=2)["memory_bytes_per_rank"]
    assert norms["tuning"] == 4 * experts
    untuned = dry_run(tiny_qwen3_moe_dir, out, CompressConfig(tune="none"))["memory_bytes_per_rank"]
    assert untuned["tuning"] == 0
    assert "tuning " in text
    json.dumps(plan)  # the report records it as JSON


def test_a_run_that_cannot_fit_is_refused_before_it_starts(
    tmp_path: Path, tiny_qwen3_moe_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank must hold its experts' float32 weights with their Hessians (the quantization) and the whole
    layer in float32 (the tuning stage): where the device cannot, the run stops at once with one line, not
    with an out-of-memory error hours in, and writes nothing."""
    import qmoe.pipeline.run as run
    from qmoe import __version__
    from qmoe.cli import main
    from qmoe.errors import ConfigError
    from qmoe.pipeline.dryrun import check_memory
    from qmoe.pipeline.preflight import plan

    # tiny-qwen3-moe: 4 experts of 3 matrices 24x32 (gate, up) and 32x24 (down), widest input 32 columns
    weights = 4 * (4 * 3 * 24 * 32)  # the layer's experts in float32
    hessians = 4 * 4 * 32 * 32  # one [32, 32] float32 Hessian per expert
    out = tmp_path / "out"
    p = plan(tiny_qwen3_moe_dir, out, CompressConfig(), __version__)
    check_memory(p, CompressConfig(), 1, weights + hessians, "it")  # exactly enough
    short = r"with their Hessians: 52\.0 KiB on 1 rank\(s\), but it has 52\.0 KiB; run more ranks"
    with pytest.raises(ConfigError, match=short):
        check_memory(p, CompressConfig(), 1, weights + hessians - 1, "it")
    # on two ranks each holds half the experts, but the tuning stage still gathers all of them
    half = (weights + hessians) // 2
    with pytest.raises(ConfigError, match="gathers a whole MoE layer's experts .* pass --tune none"):
        check_memory(p, CompressConfig(), 2, half, "it")
    check_memory(p, CompressConfig(tune="none"), 2, half, "it")
    check_memory(p, CompressConfig(), 2, weights, "it")

    monkeypatch.setattr(run, "device_capacity", lambda dev: (weights + hessians - 1, "the test's device"))
    assert main(["compress", str(tiny_qwen3_moe_dir), "--out", str(out), "--calib-samples", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the test's device has" in err[0] and "--nproc-per-node" in err[0], err
    assert not out.exists()


def test_dry_run_refuses_zero_ranks(
    tmp_path: Path, tiny_qwen3_moe_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from qmoe.cli import main

    code = main(["compress", str(tiny_qwen3_moe_dir), "--out", str(tmp_path / "o"), "--dry-run", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "--dry-run 0" in err and len(err.strip().splitlines()) == 1


def test_report_records_the_plan(tmp_path: Path, tiny_qwen3_moe_dir: Path) -> None:
    from qmoe.pipeline import compress, dry_run

    cfg = CompressConfig(method="rtn", calib_samples=4, seq_len=16, eval=False)
    out = tmp_path / "out"
    planned = dry_run(tiny_qwen3_moe_dir, out, cfg)
    rep = compress(tiny_qwen3_moe_dir, out, cfg, device="cpu", progress=False)
    assert rep["plan"] == {k: v for k, v in planned.items() if k != "resume"}
    # the matrices the plan announced are the ones the run stored
    assert sum(b["matrices"] for b in planned["moe_blocks"]) == sum(
        len(row["per_expert"]) * 3 for row in rep["layers"]
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = [k for k in index["weight_map"] if ".experts." in k]
    assert len(stored) == sum(b["matrices"] for b in planned["moe_blocks"])


@pytest.mark.timeout(300)
def test_moe_block_stage_writes_what_the_quantizer_computes(tmp_path: Path, tiny_qwen3_moe_dir: Path) -> None:
    """The MoE stage alone on block 0 (round-to-nearest, no budget): the shard holds every expert matrix,
    decoding to the quantizer's own result on the source weights; the compressed stream moved through the
    quantized block, the reference streams through the original one; the row counts every routed token."""
    from qmoe.codec import dequantize, load_shard
    from qmoe.gptq import rtn_quantize
    from qmoe.pipeline.moe_block import moe_block
    from qmoe.pipeline.quantize import stack_experts
    from qmoe.pipeline.streams import Streams

    settings = {"method": "rtn", "calib_samples": 6, "seq_len": 16, "eval_samples": 4}
    ctx = _ctx(tiny_qwen3_moe_dir, tmp_path / "out", **settings)
    ctx.plan.out.mkdir()
    streams = Streams(ctx)
    bp = ctx.plan.blocks[0]
    streams.start_stack(bp.stack)
    before = {k: b.data.clone() for k, b in streams.buffers.items()}
    with torch.inference_mode():
        result = moe_block(ctx, streams, bp, None, 12.5)
    assert result.spent_bits == 12.5  # no budget: nothing spent
    row = result.row
    top_k, E = 2, ctx.plan.n_experts
    assert row is not None and row["tokens"]["total"] == 6 * 16 * top_k and row["experts"] == E

    shard = load_shard(next(ctx.plan.out.glob("model-00002-of-*.safetensors")))
    layout = ctx.plan.adapter.experts
    assert sorted(shard.encoded) == sorted(k for k, _ in bp.matrices)
    w_first, w_second = stack_experts(
        ctx.plan.reader.get_many(layout.keys_of(bp.moe_path, range(E))), layout, bp.moe_path, range(E),
        torch.device("cpu"),
    )
    c = ctx.config
    q1, q2 = (rtn_quantize(w, c.grid, rate=c.rate, level_scale=c.level_scale) for w in (w_first, w_second))
    rows = w_first.shape[1] // 2
    for e in range(E):
        for j, proj in enumerate(layout.first):
            got = dequantize(shard.encoded[layout.expert_key(bp.moe_path, e, proj)])
            want = q1.dequantized[e, j * rows : (j + 1) * rows].numpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        got = dequantize(shard.encoded[layout.expert_key(bp.moe_path, e, layout.second)])
        np.testing.assert_allclose(got, q2.dequantized[e].numpy(), rtol=0, atol=1e-6)

    name = bp.stack.name
    assert not torch.equal(streams.buffers[f"{name}/calib"].data, before[f"{name}/calib"])
    ref, q = (streams.buffers[f"{name}/{k}:validation"].data for k in ("ref", "q"))
    assert torch.equal(before[f"{name}/ref:validation"], before[f"{name}/q:validation"])
    assert not torch.equal(ref, q)  # the same input through the original and the quantized block
