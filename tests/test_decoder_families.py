"""Decoder-only families beyond Qwen3-MoE (OLMoE; Qwen2-MoE with its shared expert) end to end, each on a
tiny random config written as published checkpoints are (per-expert ``mlp.experts.{e}.{gate,up,down}_proj``
keys): GPTQ compression, ``qmoe.load`` equal to ``from_pretrained``, ``qmoe decompress`` logits within 1e-4,
generation, and parameter counts equal to the model's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qmoe
from qmoe.config import CompressConfig


def _config(family: str):
    common = dict(
        vocab_size=1024,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=6,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=2,
    )
    if family == "olmoe":
        from transformers import OlmoeConfig, OlmoeForCausalLM

        return OlmoeForCausalLM(OlmoeConfig(intermediate_size=16, **common))
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, **common
        )
    )


@pytest.fixture(scope="module", params=["olmoe", "qwen2_moe"])
def family_dir(request, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    model = _config(request.param)
    with torch.no_grad():  # random-init experts are tiny (std 0.02): make the MoE path matter
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(20)
            layer.mlp.experts.down_proj.mul_(20)
    path = tmp_path_factory.mktemp(request.param) / "dense"
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def family_compressed(family_dir: Path) -> tuple[Path, dict]:
    from qmoe.pipeline import compress

    out = family_dir.parent / "compressed"
    rep = compress(
        family_dir,
        out,
        CompressConfig(calib_samples=16, seq_len=32, eval_samples=8, batch_size=8),
        device="cpu",
        progress=False,
    )
    return out, rep


def test_compresses_and_reports_the_models_own_counts(family_dir: Path, family_compressed) -> None:
    from transformers import AutoModelForCausalLM

    _, rep = family_compressed
    assert [r["name"] for r in rep["layers"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert rep["layers"][0]["tokens"]["total"] == 2 * 16 * 32  # top-2: every token reaches two experts
    model = AutoModelForCausalLM.from_pretrained(family_dir)
    assert rep["totals"]["params"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert rep["totals"]["expert_params"] == experts
    # the pipeline runs the family as transformers does: its reference loss is transformers' own
    from transformers import AutoTokenizer

    from qmoe.adapters import get_adapter
    from qmoe.calib import load_texts
    from qmoe.pipeline.run import EVAL_SEED

    adapter = get_adapter(json.loads((family_dir / "config.json").read_text()))
    s = adapter.samples(AutoTokenizer.from_pretrained(family_dir), load_texts("validation"), 8, EVAL_SEED, 32)
    ids = torch.from_numpy(s["input_ids"])
    with torch.no_grad():
        ref = model.float().eval()(input_ids=ids, labels=ids).loss.item()
    assert abs(rep["eval"]["loss_reference"] - ref) < 1e-4


def test_runtime_hf_and_decompressed_agree(family_compressed, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmoe.runtime.decompress import decompress
    from qmoe.runtime.generate import generate

    out, rep = family_compressed
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    a = qmoe.load(out)
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # after import qmoe
    dense_dir = tmp_path / "dense"
    decompress(out, dense_dir, "fp32")
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    c = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        la, lb, lc = (m(input_ids=ids).logits for m in (a, b, c))
    torch.testing.assert_close(la, lb, atol=0, rtol=0)
    torch.testing.assert_close(lc, la, atol=1e-4, rtol=1e-4)
    g = generate(a, AutoTokenizer.from_pretrained(out), "In the beginning", max_new_tokens=4, exact=True)
    assert g.new_tokens == 4
