"""The streaming pipeline end to end on a tiny random SwitchTransformers checkpoint (CPU).

The compressed evaluation stream must equal the transformers model with the decoded experts put back in,
and the reference stream the untouched model: that checks routing, masks, position biases, cross-attention
and the sequential hand-over between blocks against transformers' own forward.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qmoe.config import CompressConfig

FAST = dict(calib_samples=24, eval_samples=12, batch_size=8)


def make_switch(path: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=1024,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_experts=4,
        expert_capacity=64,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    cfg.update(overrides)
    SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**cfg)).half().save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def switch_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_switch(tmp_path_factory.mktemp("switch"), tokenizer_dir)


@pytest.fixture(scope="module")
def gptq_out(tmp_path_factory: pytest.TempPathFactory, switch_dir: Path) -> tuple[Path, dict]:
    from qmoe.pipeline import compress

    out = tmp_path_factory.mktemp("gptq") / "out"
    rep = compress(switch_dir, out, CompressConfig(**FAST), device="cpu", progress=False)
    return out, rep


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file of an output directory except the report (whose timings differ run to run)."""
    return {
        f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.is_file() and f.name != "qmoe_report.json"
    }


def hf_losses(src: Path, out: Path, rep: dict) -> tuple[float, float]:
    """(reference, compressed) loss of transformers' model on the report's evaluation samples."""
    from transformers import AutoTokenizer, SwitchTransformersForConditionalGeneration

    from qmoe.adapters import get_adapter
    from qmoe.calib import load_texts
    from qmoe.codec import dequantize, load_shard
    from qmoe.pipeline.run import EVAL_SEED

    tok = AutoTokenizer.from_pretrained(src)
    adapter = get_adapter(json.loads((src / "config.json").read_text()))
    s = adapter.samples(tok, load_texts("validation"), rep["config"]["eval_samples"], EVAL_SEED, 128)
    model = SwitchTransformersForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()

    def loss() -> float:
        with torch.no_grad():
            return model(
                input_ids=torch.from_numpy(s["input_ids"]), labels=torch.from_numpy(s["labels"])
            ).loss.item()

    ref = loss()
    sd = model.state_dict()
    for f in sorted(out.glob("model-*.safetensors")):
        shard = load_shard(f)
        for k, enc in shard.encoded.items():
            sd[k] = torch.from_numpy(np.asarray(dequantize(enc))).float()
        for k, t in shard.tensors.items():  # the stored dense tensors: the tuned norms among them
            if k in sd:
                sd[k] = t.float()
    model.load_state_dict(sd)
    return ref, loss()


def test_switch_gptq_matches_transformers(switch_dir: Path, gptq_out: tuple[Path, dict]) -> None:
    out, rep = gptq_out
    ref, comp = hf_losses(switch_dir, out, rep)
    assert abs(rep["eval"]["loss_reference"] - ref) < 1e-4
    assert abs(rep["eval"]["loss_compressed"] - comp) < 1e-4
    assert rep["eval"]["loss_compressed"] != rep["eval"]["loss_reference"]


def test_output_directory_contract(switch_dir: Path, gptq_out: tuple[Path, dict]) -> None:
    from safetensors import safe_open

    from qmoe.codec import FORMAT_VERSION, load_shard

    out, rep = gptq_out
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((switch_dir / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "qmoe" and qc["format_version"] == FORMAT_VERSION
    assert (qc["bits"], qc["grid"], qc["method"]) == ("ternary", "ternary", "gptq")
    assert qc["calibration"]["samples"] == FAST["calib_samples"] and "qmoe_version" in qc
    assert qc["experts"]["layers"] == ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (switch_dir / name).read_bytes()
    assert not (out / ".qmoe-partial").exists()

    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored: dict[str, object] = {}
    for f in sorted(set(index["weight_map"].values())):
        shard = load_shard(out / f)
        for k in (*shard.tensors, *shard.encoded):
            assert index["weight_map"][k] == f
            stored[k] = shard.encoded.get(k, shard.tensors.get(k))
    assert set(stored) == set(index["weight_map"])
    tuned = {k for layer in rep["layers"] if layer["tuned"]["kept"] for k in layer["tuned"]["keys"]}
    # the sparse blocks' norms and attention weights (the default's --tune attention), nothing else
    assert tuned and all(".block.1." in k and ("layer_norm" in k or "Attention." in k) for k in tuned)
    with safe_open(str(switch_dir / "model.safetensors"), "pt") as src:
        assert set(src.keys()) == set(stored)  # every source tensor, none added
        for k in src.keys():
            t = src.get_tensor(k)
            if ".experts.expert_" in k:  # one encoded matrix per expert projection, nn.Linear orientation
                assert stored[k].shape == tuple(t.shape) and stored[k].kind == "ternary"
            elif k in tuned:  # refitted by the tuning stage (qmoe.pipeline.tune): source dtype and shape
                assert stored[k].dtype == t.dtype and stored[k].shape == t.shape
                assert not torch.equal(stored[k], t)
            else:  # untouched, source dtype
                assert stored[k].dtype == t.dtype and torch.equal(stored[k], t)


def test_report_fields(gptq_out: tuple[Path, dict]) -> None:
    out, rep = gptq_out
    assert json.loads((out / "qmoe_report.json").read_text()) == rep
    t = rep["totals"]
    for k in (
        "params",
        "expert_params",
        "bytes",
        "bits_per_param",
        "expert_bits_per_weight",
        "ratio_vs_bf16",
    ):
        assert t[k] > 0
    assert t["bytes"] == sum(f.stat().st_size for f in out.glob("model-*.safetensors"))
    assert t["experts"] == 8 and t["experts_gptq"] + t["experts_fallback"] == 8
    assert rep["eval"]["split"] == "validation" and rep["wall_seconds"] > 0 and rep["peak_rss_bytes"] > 0
    assert [r["name"] for r in rep["layers"]] == [
        "encoder.block.1.layer.1.mlp",
        "decoder.block.1.layer.2.mlp",
    ]
    for row in rep["layers"]:
        assert len(row["per_expert"]) == 4 and set(row["objective_mean"]) == {"wi", "wo"}
        assert row["tokens"]["total"] == sum(e["tokens"] for e in row["per_expert"])
        for e in row["per_expert"]:
            assert (
                0 <= e["zero_fraction"] <= 1 and e["bits_per_weight"] > 0 and e["tokens_used"] <= e["tokens"]
            )
            assert e["fallback"] or all(v is not None for v in e["objective"].values())


def test_deterministic_and_spill_identical(
    switch_dir: Path, gptq_out: tuple[Path, dict], tmp_path: Path
) -> None:
    """Same inputs -> byte-identical files, also when activations spill to a disk memmap."""
    from qmoe.pipeline import compress

    compress(
        switch_dir, tmp_path / "again", CompressConfig(**FAST), device="cpu", progress=False, buffer_gb=0
    )
    assert output_bytes(tmp_path / "again") == output_bytes(gptq_out[0])


@pytest.fixture(scope="module")
def starved_out(tmp_path_factory: pytest.TempPathFactory, switch_dir: Path) -> tuple[Path, dict]:
    """2-bit GPTQ with every expert below min_tokens (all fall back) and a token cap of 1x the mean."""
    from qmoe.pipeline import compress

    out = tmp_path_factory.mktemp("starved") / "out"
    cfg = CompressConfig(bits="2", min_tokens=10**9, token_cap=1.0, rate=0.0, skip_sentinels=False, **FAST)
    return out, compress(switch_dir, out, cfg, device="cpu", progress=False)


def test_fallback_is_reported_and_two_bit_encoded(starved_out: tuple[Path, dict]) -> None:
    from qmoe.codec import load_shard

    out, rep = starved_out
    assert rep["totals"]["experts_fallback"] == rep["totals"]["experts"] == 8  # every expert still quantized
    assert all(e["fallback"] for r in rep["layers"] for e in r["per_expert"])
    kinds = {enc.kind for f in out.glob("model-*.safetensors") for enc in load_shard(f).encoded.values()}
    assert kinds == {"int2"}


def test_token_cap_limits_hessian_tokens(starved_out: tuple[Path, dict]) -> None:
    for row in starved_out[1]["layers"]:
        tokens = {"encoder": 127, "decoder": 29}[row["stack"]]  # span-corruption input / target lengths
        cap = np.ceil(FAST["calib_samples"] * tokens / 4)  # 1x the mean over 4 experts, top-1 routing
        routed = [e["tokens"] for e in row["per_expert"]]
        used = [e["tokens_used"] for e in row["per_expert"]]
        assert used == [min(r, cap) for r in routed] and max(routed) > cap


def test_cli_compress(
    switch_dir: Path, starved_out: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qmoe.cli import main

    out = tmp_path / "cli"
    argv = [
        "compress",
        str(switch_dir),
        "--out",
        str(out),
        "--bits",
        "2",
        "--method",
        "rtn",
        "--calib-samples",
        str(FAST["calib_samples"]),
        "--eval-samples",
        str(FAST["eval_samples"]),
        "--batch-size",
        str(FAST["batch_size"]),
        "--token-cap",
        "1",
        "--rate",
        "0",
        "--keep-sentinels",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "bits/param" in text and "encoder.block.1.layer.1.mlp" in text
    rep = json.loads((out / "qmoe_report.json").read_text())
    # Experts that fell back are round-to-nearest on the same grid: the same model as the RTN run.
    assert rep["eval"]["loss_compressed"] == pytest.approx(
        starved_out[1]["eval"]["loss_compressed"], abs=1e-6
    )
    assert rep["layers"][0]["tokens"] == starved_out[1]["layers"][0]["tokens"]

    assert main(["compress", str(switch_dir), "--out", str(out), "--method", "gptq", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qmoe compress: error:") and "different run" in err and "\n" not in err


def test_cli_compress_log_outside_a_terminal(
    switch_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Redirected (capsys is not a terminal): whole lines, no carriage-return redraws; a line per block plus
    the table and summary, and with --verbose one more line per pass through a block (tests/test_progress.py
    checks the lines themselves)."""
    from qmoe.cli import main

    argv = ["compress", str(switch_dir), "--out", str(tmp_path / "o"), "--method", "rtn", "--device", "cpu",
            "--calib-samples", str(FAST["calib_samples"]), "--eval-samples", str(FAST["eval_samples"]),
            "--batch-size", str(FAST["batch_size"])]
    assert main([*argv, "--verbose"]) == 0
    cap = capsys.readouterr()
    log = cap.out + cap.err
    assert "\r" not in log and "\x1b" not in log
    rep = json.loads((tmp_path / "o" / "qmoe_report.json").read_text())
    blocks = [line for line in cap.err.splitlines() if " blocks done, " in line]
    n_blocks = int(blocks[-1].split(": ")[1].split("/")[1].split()[0])
    assert len(blocks) == n_blocks and blocks[-1].split(": ")[1].startswith(f"{n_blocks}/{n_blocks} ")
    passes = [line for line in cap.err.splitlines() if "batches done" in line]
    assert len(passes) > n_blocks
    rows = [line for line in cap.out.splitlines() if line.startswith(("encoder.", "decoder."))]
    assert len(rows) == len(rep["layers"])
    # without --verbose those pass lines go: a line per block, the table and the summary
    assert len(log.splitlines()) - len(passes) < n_blocks + len(rep["layers"]) + 20


def test_cli_inspect(gptq_out: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qmoe.cli import main

    out, rep = gptq_out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits/param" in text and "decoder.block.1.layer.2.mlp" in text and "validation: loss" in text
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rep
    pytest.importorskip("matplotlib")
    assert main(["inspect", str(out), "--plot", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 2
    assert "holds no qmoe_report.json" in capsys.readouterr().err
