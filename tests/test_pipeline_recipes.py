"""Recipes, the size knob and the calibration invariants of a compression run, on tiny random checkpoints.

The invariants are checked against transformers' own forward pass, not against the pipeline's code: the
Hessian a layer is quantized with is rebuilt from the routed inputs that transformers computes with the
already-compressed earlier layers in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qmoe.config import CompressConfig
from qmoe.recipes import RECIPE_FIELDS, recipe, recipe_settings

FAST = dict(calib_samples=16, eval_samples=8, batch_size=8, seq_len=64)


def test_qmoe_recipe_is_the_paper_setting_by_setting() -> None:
    c = recipe("qmoe", calib_samples=77)
    assert (c.bits, c.grid, c.method) == ("ternary", "ternary", "gptq")
    assert (c.damp, c.token_cap, c.min_tokens, c.act_order) == (0.1, 4.0, 1, False)
    assert (c.rate, c.target_bits, c.refit, c.gate_weighted) == (0.0, None, False, False)
    assert (c.no_drop, c.skip_sentinels) == (True, True)
    assert c.calib_samples == 77  # what a recipe leaves open stays the caller's
    assert set(recipe_settings("default")) == set(RECIPE_FIELDS) == set(recipe_settings("qmoe"))
    d = recipe("default")
    assert d == CompressConfig() and recipe_settings("default") != recipe_settings("qmoe")
    with pytest.raises(Exception, match="unknown recipe 'gptq'; choose one of default, qmoe"):
        recipe("gptq")


def test_version_1_configs_read_as_they_ran() -> None:
    old = {k: v for k, v in CompressConfig().to_dict().items() if k in CompressConfig.__dataclass_fields__}
    for k in ("rate", "refit", "target_bits", "no_drop", "skip_sentinels", "gate_weighted", "level_scale"):
        old.pop(k)
    c = CompressConfig.from_dict({**old, "config_version": 1})
    assert (c.rate, c.refit, c.no_drop, c.skip_sentinels, c.gate_weighted) == (
        0.0,
        False,
        False,
        False,
        False,
    )


def _capture_hessians(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (H, counts) of every GPTQ call the pipeline makes, in order."""
    import qmoe.pipeline.moe_block as block_mod

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = block_mod.quantize

    def spy(W, H, counts, config, rate=None, **kw):  # noqa: ANN001, ANN202
        seen.append((H.clone(), counts.clone()))
        return real(W, H, counts, config, rate, **kw)

    monkeypatch.setattr(block_mod, "quantize", spy)
    return seen


def _calib_ids(src: Path, cfg: CompressConfig) -> np.ndarray:
    from transformers import AutoTokenizer

    from qmoe.adapters import get_adapter
    from qmoe.calib import load_texts

    adapter = get_adapter(json.loads((src / "config.json").read_text()))
    tok = AutoTokenizer.from_pretrained(src)
    return adapter.samples(tok, load_texts(cfg.calib_data), cfg.calib_samples, cfg.seed, cfg.seq_len)[
        "input_ids"
    ]


def _routed_hessian(model: torch.nn.Module, layer: int, ids: np.ndarray, E: int) -> tuple[torch.Tensor, list]:
    """``2/n sum x x^T`` of the tokens each expert of ``layer`` receives in transformers' forward."""
    experts = model.model.layers[layer].mlp.experts
    got: list = []

    def hook(_m, args, kwargs):  # noqa: ANN001, ANN202
        x = kwargs.get("hidden_states", args[0] if args else None)
        idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        got.append((x.detach().reshape(-1, x.shape[-1]).double(), idx.detach().reshape(x.shape[0], -1)))

    h = experts.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids))
    h.remove()
    x = torch.cat([g[0] for g in got])
    idx = torch.cat([g[1] for g in got])
    cols = x.shape[1]
    H = torch.zeros(E, cols, cols, dtype=torch.float64)
    counts = []
    for e in range(E):
        xe = x[(idx == e).any(1)]
        counts.append(xe.shape[0])
        H[e] = 2.0 / max(1, xe.shape[0]) * xe.T @ xe
    return H, counts


def test_calibration_runs_through_the_compressed_previous_layer(
    tiny_qwen3_moe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Qwen3MoeForCausalLM

    from qmoe.codec import dequantize, load_shard
    from qmoe.pipeline import compress

    seen = _capture_hessians(monkeypatch)
    cfg = recipe("qmoe", token_cap=0, eval=False, **FAST)  # no cap: every routed token enters
    out = tmp_path / "out"
    rep = compress(tiny_qwen3_moe_dir, out, cfg, device="cpu", progress=False)
    assert len(seen) == 4  # (first, second) x 2 layers
    ids = _calib_ids(tiny_qwen3_moe_dir, cfg)
    model = Qwen3MoeForCausalLM.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32).eval()
    E = model.config.num_experts
    H_original, _ = _routed_hessian(model, 1, ids, E)

    sd = model.state_dict()  # put layer 0's decoded experts into transformers' model
    for f in sorted(out.glob("model-*.safetensors")):
        for k, enc in load_shard(f).encoded.items():
            if ".layers.0." in k:
                e, proj = int(k.split(".experts.")[1].split(".")[0]), k.split(".")[-2]
                w = torch.from_numpy(np.asarray(dequantize(enc))).float()
                fused = sd["model.layers.0.mlp.experts.gate_up_proj"] if proj != "down_proj" else None
                if proj == "down_proj":
                    sd["model.layers.0.mlp.experts.down_proj"][e] = w
                else:
                    rows = w.shape[0]
                    fused[
                        e, (0 if proj == "gate_proj" else rows) : (rows if proj == "gate_proj" else 2 * rows)
                    ] = w
    model.load_state_dict(sd)
    H_quant, counts = _routed_hessian(model, 1, ids, E)

    H_seen, counts_seen = seen[2]  # layer 1, first projections
    assert counts_seen.tolist() == counts  # every routed calibration token, and no evaluation token
    assert sum(counts) == ids.size * model.config.num_experts_per_tok
    assert torch.allclose(H_seen.double(), H_quant, rtol=1e-3, atol=1e-4 * H_quant.abs().max())
    assert not torch.allclose(H_seen.double(), H_original, rtol=1e-3, atol=1e-4 * H_original.abs().max())
    used = [e["tokens_used"] for e in rep["layers"][1]["per_expert"]]
    assert used == counts  # the report reads the Hessians' own counts


def test_evaluation_tokens_never_reach_a_hessian(
    tiny_qwen3_moe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qmoe.pipeline import compress

    seen = _capture_hessians(monkeypatch)
    base = recipe("default", **FAST)
    compress(tiny_qwen3_moe_dir, tmp_path / "a", base.replace(eval=False), device="cpu", progress=False)
    n = len(seen)
    compress(
        tiny_qwen3_moe_dir,
        tmp_path / "b",
        base.replace(eval_data=["validation", "pydoc"], eval_samples=24),
        device="cpu",
        progress=False,
    )
    for (Ha, ca), (Hb, cb) in zip(seen[:n], seen[n:], strict=True):
        assert torch.equal(ca, cb) and torch.equal(Ha, Hb)
    ma = {f.name: f.read_bytes() for f in (tmp_path / "a").glob("model-*.safetensors")}
    mb = {f.name: f.read_bytes() for f in (tmp_path / "b").glob("model-*.safetensors")}
    assert ma == mb


def test_token_cap_is_applied_inside_the_hessians(
    tiny_qwen3_moe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qmoe.pipeline import compress

    seen = _capture_hessians(monkeypatch)
    cfg = recipe("qmoe", token_cap=1.0, eval=False, **FAST)
    rep = compress(tiny_qwen3_moe_dir, tmp_path / "out", cfg, device="cpu", progress=False)
    ids = _calib_ids(tiny_qwen3_moe_dir, cfg)
    cap = int(np.ceil(ids.size * 2 / 4))  # 1x the mean: top-2 of 4 experts
    for li, row in enumerate(rep["layers"]):
        counts = seen[2 * li][1].tolist()
        routed = [e["tokens"] for e in row["per_expert"]]
        assert [e["tokens_used"] for e in row["per_expert"]] == counts
        assert counts == [min(r, cap) for r in routed] and max(routed) > cap


def test_switch_calibration_lifts_capacity_and_skips_sentinels(
    tiny_switch_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    from qmoe.calib.tokenizer import sentinel_ids
    from qmoe.pipeline import compress

    cfg = recipe("qmoe", token_cap=0, eval=False, calib_samples=16, batch_size=8)
    src = tiny_switch_dir
    # A capacity of 4 tokens per expert and sequence drops most tokens unless calibration lifts it.
    small = tmp_path / "src"
    small.mkdir()
    for f in src.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    c = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**c, "expert_capacity": 4}))

    from qmoe.adapters import get_adapter
    from qmoe.calib import load_texts

    s = get_adapter(c).samples(AutoTokenizer.from_pretrained(small), load_texts("calibration"), 16, 0, 128)
    sent = np.asarray(sentinel_ids(AutoTokenizer.from_pretrained(small)))
    for kw, expect in (
        ({}, {k: int((~np.isin(s[k], sent)).sum()) for k in ("input_ids", "decoder_input_ids")}),
        ({"skip_sentinels": False}, {k: s[k].size for k in ("input_ids", "decoder_input_ids")}),
    ):
        out = tmp_path / f"out{len(kw)}"
        rep = compress(small, out, cfg.replace(**kw), device="cpu", progress=False)
        enc, dec = rep["layers"]
        assert sum(e["tokens_used"] for e in enc["per_expert"]) == expect["input_ids"]
        assert sum(e["tokens_used"] for e in dec["per_expert"]) == expect["decoder_input_ids"]
    rep = compress(small, tmp_path / "drop", cfg.replace(no_drop=False), device="cpu", progress=False)
    used = sum(e["tokens_used"] for e in rep["layers"][0]["per_expert"])
    assert used < expect["input_ids"] // 2  # the model's own capacity drops tokens


@pytest.mark.slow  # a size search: several full compressions (10 min on a loaded 2-core machine)
@pytest.mark.parametrize("target", [0.7, 1.6])
def test_target_bits_lands_within_three_percent(tmp_path: Path, target: float) -> None:
    """On the built-in tiny-qwen3-moe (192-wide experts, where metadata is a third of the bytes)."""
    from qmoe.pipeline import compress

    cfg = recipe("default", target_bits=target, eval=False, **FAST)
    rep = compress("tiny-qwen3-moe", tmp_path / "out", cfg, device="cpu", progress=False)
    got = rep["totals"]["expert_bits_per_weight"]
    assert abs(got - target) <= 0.03 * target, got
    if target < 1.0:  # below the grid's own size (~1.35 here): a bit price, the grid's levels
        assert all(r > 0 for row in rep["layers"] for r in row["rate"].values())
        assert all(s == 1.0 for row in rep["layers"] for s in row["level_scale"].values())
    else:  # above it: nearest rounding on shrunken levels
        assert all(r == 0 for row in rep["layers"] for r in row["rate"].values())
        assert all(s < 1.0 for row in rep["layers"] for s in row["level_scale"].values())


def test_unreachable_target_is_refused_before_work(tiny_qwen3_moe_dir: Path, tmp_path: Path) -> None:
    from qmoe.errors import ConfigError
    from qmoe.pipeline import compress

    with pytest.raises(ConfigError, match=r"--target-bits 0.9 is out of reach: .* choose at least \d"):
        compress(tiny_qwen3_moe_dir, tmp_path / "o", recipe("default", target_bits=0.9), progress=False)
    assert not (tmp_path / "o").exists()


def test_expert_bytes_count_every_stored_byte(tiny_qwen3_moe_dir: Path, tmp_path: Path) -> None:
    """Expert bytes + the rest of each shard (non-expert tensors, fixed header) == the shard's file size."""
    from safetensors import safe_open

    from qmoe.codec import load_shard
    from qmoe.codec.container import HEADER_KEY, SHARD_FIXED_BYTES, header_share, matrix_header_bytes
    from qmoe.pipeline import compress

    out = tmp_path / "out"
    rep = compress(
        tiny_qwen3_moe_dir, out, recipe("default", eval=False, **FAST), device="cpu", progress=False
    )
    shards = sorted(out.glob("model-*.safetensors"))[1:]  # one per MoE layer
    for row, f in zip(rep["layers"], shards, strict=True):
        shard = load_shard(f)
        names = sorted(shard.encoded)
        arrays = sum(enc.nbytes for enc in shard.encoded.values())
        assert row["array_bytes"] == arrays and row["header_bytes"] == header_share(f, names)
        digits = len(str(f.stat().st_size))
        # the size search's estimate (per matrix, plus the shard's fixed index cost) is close to the truth
        estimate = sum(matrix_header_bytes(n, shard.encoded[n], digits) for n in names) + SHARD_FIXED_BYTES
        assert abs(estimate - row["header_bytes"]) <= 0.1 * row["header_bytes"]
        with safe_open(str(f), "pt") as sf:
            others = sum(sf.get_tensor(k).numel() * sf.get_tensor(k).element_size() for k in shard.tensors)
            meta_len = len(json.dumps({HEADER_KEY: sf.metadata()[HEADER_KEY]}))
        n_header = int.from_bytes(f.read_bytes()[:8], "little")
        fixed = f.stat().st_size - 8 - n_header - others - arrays  # data: the tensors and each blob's padding
        assert fixed == sum(-len(shard.encoded[n].to_blob()) % 8 for n in names)
        assert row["header_bytes"] < n_header and row["header_bytes"] < meta_len + n_header
    total = sum(r["bytes"] for r in rep["layers"])
    assert rep["totals"]["expert_bits_per_weight"] == pytest.approx(
        8 * total / rep["totals"]["expert_params"]
    )


def test_resume_refuses_another_thread_count(tiny_qwen3_moe_dir: Path, tmp_path: Path) -> None:
    from qmoe.errors import ConfigError
    from qmoe.pipeline import compress
    from qmoe.pipeline.state import PARTIAL_DIR, RunState

    out = tmp_path / "out"
    cfg = recipe("default", eval=False, **FAST)
    compress(tiny_qwen3_moe_dir, out, cfg, device="cpu", progress=False)
    # Turn the finished run into an unfinished one started elsewhere.
    state_dir = out / PARTIAL_DIR
    state_dir.mkdir()
    (out / "config.json").unlink()
    from qmoe import __version__
    from qmoe.pipeline.preflight import plan

    fp = plan(tiny_qwen3_moe_dir, out, cfg, __version__).fingerprint
    RunState(fp, execution={"device": "cpu", "threads": torch.get_num_threads() + 7}).save(state_dir)
    with pytest.raises(ConfigError, match=r"started on cpu with \d+ threads; this process has cpu with"):
        compress(tiny_qwen3_moe_dir, out, cfg, device="cpu", progress=False)


@pytest.mark.slow  # compressions through the CLI
def test_cli_recipe_and_size_knob(tmp_path: Path) -> None:
    from qmoe.cli import main

    out = tmp_path / "cli"
    args = [
        "compress",
        "tiny-qwen3-moe",
        "--out",
        str(out),
        "--recipe",
        "qmoe",
        "--target-bits",
        "1.2",
    ]
    args += ["--calib-samples", "16", "--seq-len", "64", "--no-eval", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["target_bits"] == 1.2 and qc["calibration"]["min_tokens"] == 1
    rep = json.loads((out / "qmoe_report.json").read_text())
    assert abs(rep["totals"]["expert_bits_per_weight"] - 1.2) <= 0.036


def _routed_gated_hessian(model: torch.nn.Module, layer: int, ids: np.ndarray, E: int, power: float,
                          shift: int = 0):
    """``2/n sum (g^power x)(g^power x)^T`` over the tokens each expert of ``layer`` receives, with the gates
    ``g`` that transformers' own router hands its experts module (``shift``: each gate paired with the
    token ``shift`` places later, a misalignment)."""
    experts = model.model.layers[layer].mlp.experts
    got: list = []

    def hook(_m, args, kwargs):  # noqa: ANN001, ANN202
        x = kwargs.get("hidden_states", args[0] if args else None)
        idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        w = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
        got.append((x.detach().reshape(-1, x.shape[-1]).double(), idx.detach().reshape(x.shape[0], -1),
                    w.detach().reshape(x.shape[0], -1).double()))

    h = experts.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids))
    h.remove()
    x, idx, gate = (torch.cat([g[i] for g in got]) for i in range(3))  # [T, d], [T, k], [T, k]
    H = torch.zeros(E, x.shape[1], x.shape[1], dtype=torch.float64)
    for e in range(E):
        hit = idx == e  # [T, k]: at most one slot per token
        g = (gate * hit).sum(1)[hit.any(1)]  # [t] this expert's gate for each of its tokens
        g = torch.roll(g, shift)
        xe = x[hit.any(1)] * g[:, None] ** power
        H[e] = 2.0 / max(1, xe.shape[0]) * xe.T @ xe
    return H


def test_default_hessians_are_weighted_by_the_routers_squared_gates(
    tiny_qwen3_moe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default recipe's gate-weighted Hessians, rebuilt from transformers' router: each token's
    ``x x^T`` counts ``g^2`` times (the layer adds ``g * expert(x)``); misaligned or unsquared gates fail."""
    from transformers import Qwen3MoeForCausalLM

    from qmoe.pipeline import compress

    seen = _capture_hessians(monkeypatch)
    cfg = recipe("default", token_cap=0, eval=False, **FAST)
    assert cfg.gate_weighted  # the default's key ingredient
    compress(tiny_qwen3_moe_dir, tmp_path / "out", cfg, device="cpu", progress=False)
    ids = _calib_ids(tiny_qwen3_moe_dir, cfg)
    model = Qwen3MoeForCausalLM.from_pretrained(tiny_qwen3_moe_dir, dtype=torch.float32).eval()
    E = model.config.num_experts
    H_seen = seen[0][0].double()  # layer 0, first projections: transformers' inputs, nothing compressed yet

    def close(H: torch.Tensor) -> bool:
        return torch.allclose(H_seen, H, rtol=1e-3, atol=1e-4 * H.abs().max())

    assert close(_routed_gated_hessian(model, 0, ids, E, power=1.0))
    assert not close(_routed_gated_hessian(model, 0, ids, E, power=0.5))  # |g| instead of g^2
    assert not close(_routed_gated_hessian(model, 0, ids, E, power=0.0))  # no gates
    assert not close(_routed_gated_hessian(model, 0, ids, E, power=1.0, shift=1))  # gates off by one token
