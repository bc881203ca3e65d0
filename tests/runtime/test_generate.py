"""Running compressed models: qmoe generate, transformers' pipeline, qmoe eval."""

from __future__ import annotations

import math
import re

import pytest
import torch

import qmoe
from qmoe.cli import main
from qmoe.evaluation import evaluate
from qmoe.runtime.generate import Generation, generate, time_interleaved


@pytest.mark.parametrize("family", ["switch_compressed", "qwen3_compressed"])
def test_generate_cli(family, request, capsys) -> None:
    path = request.getfixturevalue(family)
    assert main(["generate", str(path), "--prompt", "In the beginning God", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    # stdout: the text (random weights may stop at once); stderr: the speed, the dtype, the first call apart
    speed = r"^  .+: [1-5] tokens in [0-9.]+ s: [0-9.]+ tokens/s \[.*float32.*\] \(first call [0-9.]+ s\)$"
    assert re.search(speed, out.err, re.MULTILINE), out.err
    assert "after an untimed warm-up call" in out.err


def test_timing_rule_counts_no_first_call_and_interleaves() -> None:
    """The warm-up rule on a call counter (no clock): each model's first call is reported apart and never
    among the timed ones, and the timed calls alternate between the models."""
    log: list[tuple[str, int]] = []

    def model(name: str):
        def call() -> Generation:
            k = sum(1 for n, _ in log if n == name)  # this model's call number, 0 = its first
            log.append((name, k))
            return Generation(f"{name}{k}", 3, 5, seconds=100.0 if k == 0 else float(k))
        return call

    dense, comp = time_interleaved([model("d"), model("c")], repeats=3)
    assert log == [("d", 0), ("c", 0), ("d", 1), ("c", 1), ("d", 2), ("c", 2), ("d", 3), ("c", 3)]
    assert dense.first.text == "d0" and [g.text for g in dense.runs] == ["d1", "d2", "d3"]
    assert comp.first.seconds == 100.0 and comp.seconds == 2.0  # median of calls 1..3, the first left out
    assert comp.tokens_per_s == 5 / 2.0
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved([model("x")], repeats=0)


def test_generate_compare_cli(switch_compressed, reference_of, capsys) -> None:
    dense = reference_of(switch_compressed)
    argv = ["generate", str(switch_compressed), "--prompt", "In the beginning God", "--max-new-tokens", "4",
            "--repeats", "2", "--compare", str(dense)]
    assert main(argv) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    # both sides, labelled, on the same prompt: the dense model holding the dequantized experts says the same
    assert len(lines) == 2
    assert lines[0].startswith(f"{dense}:") and lines[1].startswith(f"{switch_compressed}:")
    assert lines[0].split(":", 1)[1].strip() == lines[1].split(":", 1)[1].strip()
    assert "calls interleaved" in out.err and "[dense float32]" in out.err and "experts compressed" in out.err
    assert re.search(r"^  compressed / dense time: [0-9.]+x$", out.err, re.MULTILINE), out.err
    # no report to name the source: one line saying what to pass
    assert main(argv[:-1]) == 2
    err = capsys.readouterr().err.strip()
    assert "qmoe_report.json" in err and "--compare DENSE_DIR" in err and "\n" not in err
    assert main(["generate", str(dense), "--prompt", "x", "--compare"]) == 2
    assert "needs a qmoe-compressed SOURCE" in capsys.readouterr().err


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
