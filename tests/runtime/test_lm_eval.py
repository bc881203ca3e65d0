"""lm-evaluation-harness on a compressed model and its dense reference (tiny random Qwen3-MoE, offline task).

The oracle: ``write_compressed`` also writes the dense model whose experts are the decoded ternary weights;
the harness must give the compressed model exactly that model's loglikelihoods (it runs qmoe's kernels on
the encoded experts), and different ones from the original dense model.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from qmoe.cli import main
from qmoe.harness.bible_task import TASK_NAME, write_task

if not os.environ.get("CI"):  # CI installs the test extra, lm-eval included: there this test must run
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[test]'")

DOCS = 12


@pytest.fixture(scope="module")
def runs(qwen3_dense, qwen3_compressed, reference_of, tmp_path_factory) -> dict:
    from qmoe.harness.run import HarnessConfig, evaluate_source, task_manager_for

    task = tmp_path_factory.mktemp("task")
    write_task(task, docs=DOCS)
    config = HarnessConfig(tasks=(TASK_NAME,), batch_size=16, include_path=(str(task),))
    tm = task_manager_for(config)
    sources = {"dense": qwen3_dense, "dense again": qwen3_dense, "compressed": qwen3_compressed,
               "dequantized": reference_of(qwen3_compressed)}
    return {name: evaluate_source(src, config, task_manager=tm) for name, src in sources.items()}


def _loglikelihoods(results: dict) -> list[float]:
    # one entry per document and choice: resps = [[(loglikelihood, is_greedy)]] per request
    return [r[0][0] for s in results["samples"][TASK_NAME] for r in s["resps"]]


def test_identical_requests(runs) -> None:
    from qmoe.harness.compare import check_identical_requests

    for name in ("dense again", "compressed", "dequantized"):
        assert check_identical_requests(runs["dense"], runs[name]) == DOCS * 4
    contexts = [[a[0] for a in s["arguments"]] for s in runs["compressed"]["samples"][TASK_NAME]]
    assert all(len(set(c)) == 1 for c in contexts) and len({c[0] for c in contexts}) == DOCS


def test_compressed_is_scored_on_its_decoded_weights(runs) -> None:
    dense, comp, deq = (_loglikelihoods(runs[k]) for k in ("dense", "compressed", "dequantized"))
    assert len(comp) == DOCS * 4 and all(math.isfinite(x) and x < 0 for x in comp)
    assert _loglikelihoods(runs["dense again"]) == dense  # the harness is deterministic
    assert comp == pytest.approx(deq, abs=1e-3)
    assert max(abs(a - b) for a, b in zip(comp, dense, strict=True)) > 1e-2


def test_paired_rows(runs) -> None:
    from qmoe.harness.compare import compare, paired_difference

    rows = {r.metric: r for r in compare(runs["dense"], runs["compressed"])}
    assert sorted(rows) == ["acc", "acc_norm"]
    for metric, r in rows.items():
        per_item = [[s[metric] for s in runs[k]["samples"][TASK_NAME]] for k in ("dense", "compressed")]
        assert r.n == DOCS
        assert r.dense == runs["dense"]["results"][TASK_NAME][f"{metric},none"]
        assert r.compressed == runs["compressed"]["results"][TASK_NAME][f"{metric},none"]
        assert r.difference == pytest.approx(r.compressed - r.dense)
        assert (r.difference, r.stderr) == pytest.approx(paired_difference(*per_item))
    same = compare(runs["dense"], runs["dense again"])
    assert all(r.difference == 0 and r.stderr == 0 for r in same)


def test_cli_finds_the_dense_source_in_the_report(qwen3_dense, qwen3_compressed, tmp_path, capsys) -> None:
    comp = shutil.copytree(qwen3_compressed, tmp_path / "compressed")
    (comp / "qmoe_report.json").write_text(json.dumps({"source": str(qwen3_dense)}))
    argv = ["eval", str(comp), "--tasks", TASK_NAME, "--limit", "5", "--batch-size", "8", "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (got["reference"], got["compressed"], got["requests"]) == (str(qwen3_dense), True, 5 * 4)
    acc = next(r for r in got["rows"] if r["metric"] == "acc")
    assert acc["n"] == 5 and acc["difference"] == pytest.approx(acc["compressed"] - acc["dense"])


def test_cli_table_and_pass_through(qwen3_compressed, reference_of, tmp_path, capsys) -> None:
    task = tmp_path / "task"
    write_task(task, docs=6, seed=1)
    (task / f"{TASK_NAME}.yaml").rename(task / "mine.yaml")
    text = (task / "mine.yaml").read_text().replace(f"task: {TASK_NAME}", "task: my_task")
    (task / "mine.yaml").write_text(text)
    argv = ["eval", str(qwen3_compressed), "--tasks", "my_task", "--include-path", str(task),
            "--reference", str(reference_of(qwen3_compressed)), "--lm-eval-args", "num_fewshot=1,limit=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "12 identical requests" in out[0]  # 3 documents x 4 choices, each with a 1-shot context
    assert out[1].split()[:5] == ["task", "metric", "n", "dense", "compressed"]
    acc = out[2].split()
    assert acc[:3] == ["my_task", "acc", "3"] and acc[3] == acc[4]  # the decoded weights: equal scores


def test_unreadable_task_data_is_one_line(qwen3_compressed, reference_of, tmp_path, capsys) -> None:
    yaml = write_task(tmp_path, docs=2)
    yaml.write_text(yaml.read_text().replace(f"task: {TASK_NAME}", "task: my_missing"))
    (tmp_path / f"{TASK_NAME}.jsonl").unlink()  # as a hub dataset is when the hub is unreachable
    argv = ["eval", str(qwen3_compressed), "--tasks", "my_missing", "--include-path", str(tmp_path),
            "--no-reference"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("qmoe eval: error: lm-eval could not read the data of my_missing"), err
