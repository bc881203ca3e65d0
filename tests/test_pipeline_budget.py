"""The model-wide bit budget: per-expert prices in the solver, the plan's arithmetic, the sensitivity pass
against transformers, and an end-to-end run that lands on its budget and resumes to the same bytes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from qmoe.gptq import gptq_quantize, rtn_quantize
from qmoe.pipeline.budget import LAMBDAS, MAX_MULTIPLIER, BudgetPlan, GroupPlan, choose, multipliers


def _weights(E: int = 3, rows: int = 24, cols: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, rows, cols, generator=g)
    X = torch.randn(E, 256, cols, generator=g)
    return W, X.transpose(1, 2) @ X / 128


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_equal_per_expert_rates_equal_one_rate(method: str) -> None:
    W, H = _weights()
    same = torch.full((3,), 0.05)
    if method == "gptq":
        a, b = (gptq_quantize(W, H, rate=r, act_order=True) for r in (0.05, same))
    else:
        a, b = (rtn_quantize(W, H=H, rate=r) for r in (0.05, same))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.levels, b.levels)


def test_each_expert_pays_its_own_price() -> None:
    W, H = _weights()
    W = W[:1].expand(3, -1, -1).contiguous()  # the same expert three times
    H = H[:1].expand(3, -1, -1).contiguous()
    q = gptq_quantize(W, H, rate=torch.tensor([0.0, 0.1, 3.0]), expert_batch=1)
    zeros = (q.codes == 0).flatten(1).float().mean(1)  # [3]
    assert zeros[0] < zeros[1] < zeros[2]
    for e, r in enumerate((0.0, 0.1, 3.0)):  # and each equals that expert quantized alone at its rate
        alone = gptq_quantize(W[e : e + 1], H[e : e + 1], rate=r)
        assert torch.equal(alone.codes[0], q.codes[e])


def test_bad_per_expert_rates_are_refused() -> None:
    from qmoe.errors import ConfigError

    W, H = _weights()
    with pytest.raises(ConfigError, match=r"finite \[3\] tensor"):
        gptq_quantize(W, H, rate=torch.tensor([0.1, -1.0, 0.1]))
    with pytest.raises(ConfigError, match=r"finite \[3\] tensor"):
        rtn_quantize(W, rate=torch.tensor([0.1, 0.1]))


def test_multipliers_share_one_normaliser() -> None:
    imp = [np.array([1.0, 4.0, 0.0]), np.array([0.5, 2.0, 8.0])]
    m = multipliers(imp, [100, 50])
    live = np.concatenate([m[0][:2], m[1]])
    assert math.isclose(float(np.exp(np.log(live).mean())), 1.0, rel_tol=1e-9)
    # ratios across groups are n / importance, untouched by the normaliser
    assert math.isclose(m[0][0] / m[1][2], (100 / 1.0) / (50 / 8.0), rel_tol=1e-9)
    assert m[0][2] == MAX_MULTIPLIER  # never routed: its bits buy nothing


def _group(name: str, curve: list[float], weights: int) -> GroupPlan:
    return GroupPlan(name, "first", weights, (1.0,), 0.0, LAMBDAS, tuple(curve))


def test_choose_spends_the_budget_at_one_price() -> None:
    K = len(LAMBDAS)
    steep = np.linspace(2.0, 0.3, K)  # a group whose size falls quickly with the price
    flat = np.linspace(1.2, 0.8, K)
    plan = choose(1.0, [_group("a", list(steep), 300), _group("b", list(flat), 100)], [])
    bits = np.array([g.bits for g in plan.groups])
    assert math.isclose(float((bits * [300, 100]).sum() / 400), 1.0, rel_tol=1e-9)
    assert plan.predicted_bits == pytest.approx(1.0)
    # both groups sit at the same price: the same position on the (log-lambda) grid
    k = np.interp(np.log(plan.price), np.log(LAMBDAS), np.arange(K))
    assert np.interp(k, np.arange(K), steep) == pytest.approx(bits[0])
    assert np.interp(k, np.arange(K), flat) == pytest.approx(bits[1])
    # out of reach: below every price's size, the smallest; above, scaled alike
    low = choose(0.1, [_group("a", list(steep), 300), _group("b", list(flat), 100)], [])
    assert [g.bits for g in low.groups] == [steep[-1], flat[-1]]
    high = choose(2.0, [_group("a", list(steep), 300), _group("b", list(flat), 100)], [])
    assert high.groups[0].bits / high.groups[1].bits == pytest.approx(steep[0] / flat[0])


def test_target_corrects_for_drift() -> None:
    groups = tuple(
        GroupPlan(f"l{i}", "first", 100, (1.0,), b, LAMBDAS, (0.0,)) for i, b in enumerate((1.0, 0.5, 1.5))
    )
    plan = BudgetPlan(1.0, 0.1, 1.0, groups, ())
    assert plan.target(0, 0.0) == pytest.approx(1.0)
    # group 0 stored 1.3 bits/weight instead of 1.0: the other two shrink in proportion to their plan
    assert plan.target(1, 130.0) == pytest.approx(0.5 * (300 - 130) / 200)
    assert plan.target(2, 130.0 + 0.5 * 85) == pytest.approx((300 - 130 - 42.5) / 100)


def _sensitivity(src: Path, out: Path, **config: object) -> list:
    """The sensitivity pass alone, on a pipeline run set up as ``compress`` sets it up."""
    from qmoe import __version__
    from qmoe.config import CompressConfig
    from qmoe.pipeline.buffers import MemoryBudget
    from qmoe.pipeline.comm import Local
    from qmoe.pipeline.context import RunContext
    from qmoe.pipeline.preflight import plan
    from qmoe.pipeline.samples import load_samples
    from qmoe.pipeline.sensitivity import measure
    from qmoe.progress import Progress

    cfg = CompressConfig(eval=False, **config)
    p = plan(src, out, cfg, __version__)
    memory = MemoryBudget(1 << 30, out / "spill")
    quiet = Progress(enabled=False)
    ctx = RunContext(p, cfg, torch.device("cpu"), load_samples(p, cfg), memory, Local(), quiet)
    with torch.inference_mode():
        return measure(ctx)


@pytest.mark.timeout(600)
def test_sensitivity_pass_equals_transformers(tmp_path: Path, tiny_qwen3_moe_dir: Path) -> None:
    """kappa, routed counts and expert energies of the streamed pass, recomputed on the transformers model
    with the same samples and the same noise added by a forward hook."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmoe.adapters import get_adapter
    from qmoe.calib import load_texts
    from qmoe.pipeline.budget import NOISE_SCALE, PLAN_SAMPLES
    from qmoe.sources import read_config

    src = tiny_qwen3_moe_dir
    layers = [asdict(s) for s in _sensitivity(src, tmp_path / "out", calib_samples=80, seq_len=32)]
    assert [s["name"] for s in layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]

    tok = AutoTokenizer.from_pretrained(src)
    adapter = get_adapter(read_config(src))
    ids = torch.from_numpy(
        adapter.samples(tok, load_texts("calibration"), 80, 0, 32)["input_ids"][:PLAN_SAMPLES]
    )
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

    def loss(layer: int | None = None, noise: torch.Tensor | None = None) -> float:
        hooks = []
        if layer is not None:
            mlp = model.model.layers[layer].mlp
            hooks.append(mlp.register_forward_hook(lambda m, a, out: out + noise.reshape(out.shape)))
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
        for h in hooks:
            h.remove()
        return float(out.loss), out.router_logits

    base, router_logits = loss()
    for li, s in enumerate(layers):
        counts = torch.bincount(torch.topk(router_logits[li], 2, dim=-1).indices.flatten(), minlength=4)
        assert list(s["routed"]) == counts.tolist()
        # noise drawn as the pass draws it: generator seeded by (seed, block index); sigma from the MoE
        # output's RMS, here checked by its definition on the recorded output
        gen = torch.Generator().manual_seed(1_000_003 * 1 + li)
        noise = torch.randn((*ids.shape, 32), generator=gen) * s["sigma"]
        curvature = (loss(li, noise)[0] + loss(li, -noise)[0] - 2 * base) / 2
        assert s["kappa"] == pytest.approx(curvature / (s["sigma"] ** 2 * 32), rel=2e-3, abs=1e-7)
        captured: dict[str, torch.Tensor] = {}
        mlp = model.model.layers[li].mlp
        hooks = [
            mlp.register_forward_pre_hook(lambda m, a, c=captured: c.setdefault("x", a[0])),
            mlp.register_forward_hook(lambda m, a, out, c=captured: c.setdefault("y", out)),
        ]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        y = captured["y"].double()
        assert s["sigma"] == pytest.approx(NOISE_SCALE * float(y.pow(2).mean().sqrt()), rel=1e-4)
        # each expert's gate-weighted output energy, from the transformers weights and router
        x = captured["x"].reshape(-1, 32).double()
        with torch.no_grad():
            _, gates, chosen = mlp.gate(captured["x"].reshape(-1, 32))
        energy = torch.zeros(4, dtype=torch.float64)
        for e in range(4):
            t, k = torch.where(chosen == e)
            gate, up = (x[t] @ mlp.experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(gate) * up) @ mlp.experts.down_proj[e].double().T
            energy[e] = (out * gates[t, k, None].double()).pow(2).sum()
        assert s["energy"] == pytest.approx(energy.tolist(), rel=1e-4)
        assert sum(s["energy"]) > 0 and s["positions"] == ids.numel()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_global_budget_lands_and_resumes(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Lands within 2% of B; important experts get more bits than unimportant ones; a run killed after a
    block resumes to the same bytes."""
    from test_pipeline import make_switch, output_bytes

    from qmoe.config import CompressConfig
    from qmoe.pipeline import compress
    from qmoe.pipeline.run import KILL_ENV

    # rows of 192 and 256 weights: metadata leaves room for codes at 0.9 bits/weight
    src = make_switch(tmp_path / "src", tokenizer_dir, d_model=192, d_ff=256, d_kv=48)
    cfg = CompressConfig(calib_samples=16, eval_samples=8, batch_size=8, target_bits=0.9, allocation="global")
    ref = compress(src, tmp_path / "ref", cfg, device="cpu", progress=False)
    assert ref["totals"]["expert_bits_per_weight"] == pytest.approx(0.9, rel=0.02)
    assert ref["budget"]["predicted_bits"] == pytest.approx(0.9, rel=1e-6)
    for layer, plan in zip(ref["layers"], ref["budget"]["layers"], strict=True):  # importance buys bits
        imp = np.asarray(plan["energy"])  # one curvature per layer: energy orders its experts
        bits = [e["bits_per_weight"] for e in layer["per_expert"]]
        live = np.nonzero(imp > 0)[0]
        assert bits[live[np.argmax(imp[live])]] > bits[live[np.argmin(imp[live])]], (imp, bits)

    import os
    import subprocess
    import sys

    code = (
        "import sys; from qmoe.pipeline import compress; from qmoe.config import CompressConfig; "
        f"compress(sys.argv[1], sys.argv[2], CompressConfig.from_dict({cfg.to_dict()!r}), device='cpu', "
        "progress=False)"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(src), str(out)],
        env={**os.environ, KILL_ENV: "after:1"},
        capture_output=True,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    rep = compress(src, out, cfg, device="cpu", progress=False)
    assert rep["resumed_from_block"] == 2
    assert output_bytes(out) == output_bytes(tmp_path / "ref")
    assert json.dumps(rep["budget"]) == json.dumps(ref["budget"])


def test_fixed_price_prices_experts_without_a_size_search(tmp_path: Path, tokenizer_dir: Path) -> None:
    """``allocation='global'`` without ``target_bits``: every group at ``rate`` times its experts' relative
    prices (no size search). Against the uniform run at the same rate (the control), in the first MoE layer
    (whose Hessians both runs share): an expert priced below the model-wide typical price (multiplier < 1)
    keeps more nonzero codes, one priced above keeps fewer."""
    from test_drop import _saved, _tiny

    from qmoe.config import CompressConfig
    from qmoe.pipeline import compress

    src = _saved(_tiny("qwen3_moe"), tmp_path / "src", tokenizer_dir)  # no size target: any width
    base = dict(calib_samples=16, seq_len=32, eval_samples=8, batch_size=8, rate=0.3, drop_experts=False)
    rep = compress(src, tmp_path / "price", CompressConfig(allocation="global", **base), device="cpu",
                   progress=False)
    uni = compress(src, tmp_path / "uniform", CompressConfig(**base), device="cpu", progress=False)
    plan = rep["budget"]
    assert plan["fixed_price"] and plan["price"] == 0.3
    assert rep["layers"][0]["rate"] == {"gate_proj+up_proj": 0.3, "down_proj": 0.3}  # scalar; experts x m_e
    m = np.asarray(plan["groups"][0]["multipliers"])
    zeros, control = ([e["zero_fraction"] for e in r["layers"][0]["per_expert"]] for r in (rep, uni))
    # the first projections see identical Hessians in both runs, the second ones inputs that differ (they
    # follow the first's quantization), so the per-expert zero fraction follows the price in most experts
    # and, on average, always
    shift = np.asarray(zeros) - np.asarray(control)  # [E] more zeros than at the uniform price
    agree = np.sign(shift) == np.sign(m - 1)
    assert agree.mean() >= 2 / 3, (m, shift)
    assert shift[m > 1].mean() > shift[m < 1].mean(), (m, shift)
