"""The shipped built-in models: present, within the size budget, shaped as their family, trained, and
with experts that carry the model (the property the recipe benchmarks rely on)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qmoe.cli import main
from qmoe.sources import BUILTINS, load_model, read_config, resolve_source

MAX_BYTES = 64 * 2**20


@pytest.fixture(scope="module", params=BUILTINS)
def builtin(request):
    return request.param


def test_builtins_ship_with_weights_tokenizer_and_budget(builtin) -> None:
    path = resolve_source(builtin)
    weights = path / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= MAX_BYTES, weights
    assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()
    cfg = read_config(path)
    assert cfg["dtype"] in ("float16", "bfloat16")
    if cfg["model_type"] == "switch_transformers":
        # Experts in every feed-forward layer of both stacks.
        assert cfg["encoder_sparse_step"] == 1 and cfg["decoder_sparse_step"] == 1
        assert cfg["num_sparse_encoder_layers"] == cfg["num_layers"]
        assert cfg["num_experts"] >= 16
    else:
        assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
        assert cfg["decoder_sparse_step"] == 1 and not cfg.get("mlp_only_layers")
        assert cfg["num_experts_per_tok"] > 1 and cfg.get("num_local_experts", cfg.get("num_experts")) >= 16


def _losses(model, arrays) -> np.ndarray:
    from qmoe.evaluation import sample_losses

    per = sample_losses(model, arrays, batch_size=8)
    return per[:, 0] / per[:, 1]


# Floors well under what docs/testbeds.md measured on 256 samples (tiny-switch +0.335, tiny-qwen3-moe +5.88).
ZEROED_EXPERTS_FLOOR = {"tiny-switch": 0.15, "tiny-qwen3-moe": 3.0}


def test_builtin_is_trained_and_its_experts_matter(builtin) -> None:
    """Validation loss well below the unigram baseline of the same objective, and zeroing every expert
    weight costs a large part of what the model learned."""
    from qmoe.calib import load_texts
    from qmoe.evaluation import eval_samples, unigram_baseline

    model, tok, _ = load_model(builtin)
    objective, arrays = eval_samples(model, tok, load_texts("validation"), 12, seed=1234)
    assert objective == ("span-corruption" if builtin == "tiny-switch" else "causal-lm")
    loss = _losses(model, arrays)
    unigram = unigram_baseline(tok, objective, arrays)
    assert loss.mean() < 0.85 * unigram, (loss.mean(), unigram)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.zero_()
    zeroed = _losses(model, arrays)
    assert (zeroed - loss).mean() > ZEROED_EXPERTS_FLOOR[builtin], (zeroed - loss).mean()


def test_builtin_eval_and_generate_cli(builtin, capsys) -> None:
    assert main(["eval", builtin, "--samples", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["samples"] == 4 and math.isfinite(out["loss"]) and out["loss"] < 6.0
    prompt = "And God said, Let there be <extra_id_0>: and there was light." if builtin == "tiny-switch" \
        else "And God said, Let there be"
    assert main(["generate", builtin, "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
