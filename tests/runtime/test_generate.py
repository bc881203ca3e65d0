"""Running compressed models: qmoe generate, transformers' pipeline, qmoe eval."""

from __future__ import annotations

import math
import re

import pytest
import torch

import qmoe
from qmoe.cli import main
from qmoe.evaluation import evaluate
from qmoe.runtime.generate import generate


@pytest.mark.parametrize("family", ["switch_compressed", "qwen3_compressed"])
def test_generate_cli(family, request, capsys) -> None:
    path = request.getfixturevalue(family)
    assert main(["generate", str(path), "--prompt", "In the beginning God", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    # stdout: the text (random weights may stop at once); stderr: the speed
    assert re.search(r"^[1-5] tokens in [0-9.]+ s: [0-9.]+ tokens/s", out.err, re.MULTILINE), out.err


def test_generation_matches_dequantized_dense_model(qwen3_compressed, reference_of) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_compressed)
    a = generate(qmoe.load(qwen3_compressed), tok, "And the earth was", max_new_tokens=8, exact=True)
    b = generate(AutoModelForCausalLM.from_pretrained(reference_of(qwen3_compressed), dtype=torch.float32),
                 tok, "And the earth was", max_new_tokens=8, exact=True)
    assert a.new_tokens == 8 and a.text == b.text


def test_transformers_pipeline(qwen3_compressed) -> None:
    from transformers import pipeline

    from qmoe.runtime.experts import CompressedExperts

    pipe = pipeline("text-generation", model=str(qwen3_compressed), dtype=torch.float32)
    assert any(isinstance(m, CompressedExperts) for m in pipe.model.modules())
    out = pipe("And God said", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("And God said")


def test_eval_compressed_dir_matches_dequantized(switch_compressed, reference_of) -> None:
    got = evaluate(str(switch_compressed), split="validation", samples=8, batch_size=8)
    want = evaluate(str(reference_of(switch_compressed)), split="validation", samples=8, batch_size=8)
    assert math.isfinite(got.loss) and got.tokens == want.tokens
    assert got.loss == pytest.approx(want.loss, rel=1e-5)
