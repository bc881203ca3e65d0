"""qmoe eval: the metric against transformers' own loss, and every CLI error path."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from qmoe.cli import main
from qmoe.evaluation import evaluate


def test_eval_matches_transformers_loss(tiny_switch_dir) -> None:
    from transformers import AutoTokenizer, SwitchTransformersForConditionalGeneration

    from qmoe.calib import bible_split, span_corruption_samples

    res = evaluate(str(tiny_switch_dir), split="validation", samples=20, batch_size=8)
    assert res.samples == 20 and res.objective == "span-corruption"
    assert math.isfinite(res.loss) and abs(res.loss - math.log(1024)) < 1.0  # untrained: near uniform
    model = SwitchTransformersForConditionalGeneration.from_pretrained(str(tiny_switch_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_switch_dir))
    b = span_corruption_samples(tok, bible_split("validation"), 20, seed=1234)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(b.input_ids), labels=torch.from_numpy(b.labels)).loss.item()
    assert res.tokens == b.labels.size
    assert res.loss == pytest.approx(ref, rel=1e-5)
    # A different split gives a different, still deterministic, number.
    again = evaluate(str(tiny_switch_dir), split="pydoc", samples=8)
    assert again == evaluate(str(tiny_switch_dir), split="pydoc", samples=8)


def test_eval_cli_json_and_user_file(tiny_switch_dir, tmp_path, capsys) -> None:
    data = tmp_path / "mine.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "light", "water", "earth"]
    data.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, 300))}) for _ in range(4)))
    assert main(["eval", str(tiny_switch_dir), "--data", str(data), "--samples", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["split"] == str(data) and out["samples"] == 4 and math.isfinite(out["loss"])
    assert {"loss", "tokens", "samples", "split"} <= out.keys()


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_cli_errors(tmp_path, tiny_switch_dir, capsys) -> None:
    assert "unknown built-in model 'tiny-swtch'" in _error(["eval", "tiny-swtch"], capsys)
    assert "not a model directory" in _error(["eval", str(tmp_path)], capsys)
    assert "does not exist" in _error(["eval", str(tmp_path / "nowhere" / "x")], capsys)
    missing = str(tmp_path / "x.txt")
    assert "does not exist" in _error(["eval", str(tiny_switch_dir), "--data", missing], capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert "not valid JSON" in _error(["eval", str(tiny_switch_dir), "--data", str(bad)], capsys)
    assert "--samples must be at least 1" in _error(["eval", str(tiny_switch_dir), "--samples", "0"], capsys)
    # --debug shows the traceback instead.
    from qmoe.errors import SourceError

    with pytest.raises(SourceError):
        main(["eval", "tiny-swtch", "--debug"])


@pytest.mark.slow  # the datasets library retries the unreachable hub for ~20 s before it gives up
def test_cli_error_unreachable_dataset(tiny_switch_dir, capsys) -> None:
    # Not a file: taken as a Hugging Face dataset name, which an offline machine cannot fetch.
    import importlib.util

    err = _error(["eval", str(tiny_switch_dir), "--data", "someone/some-dataset"], capsys)
    if importlib.util.find_spec("datasets"):  # the test extra installs it (through lm-eval)
        assert "cannot load Hugging Face dataset 'someone/some-dataset'" in err
        assert "pass a local .txt or .jsonl file with --data instead" in err
    else:
        assert "'someone/some-dataset' is neither a built-in split nor a local file" in err
        assert "pip install datasets" in err


def test_cli_error_model_without_tokenizer(tmp_path, tiny_switch_dir, capsys) -> None:
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_switch_dir, model_dir)
    for f in model_dir.glob("tokenizer*"):
        f.unlink()
    assert "no tokenizer files" in _error(["eval", str(model_dir)], capsys)


def test_cli_error_model_without_moe(tmp_path, tokenizer_dir, capsys) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=1024, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(tmp_path)
    assert "without MoE layers" in _error(["eval", str(tmp_path)], capsys)


def test_import_is_light() -> None:
    heavy = "('torch', 'transformers', 'numba', 'triton')"
    code = f"import qmoe, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
