"""The lm-evaluation-harness glue without a model: the offline task, request pairing, paired errors, the CLI's
errors, and that neither ``import qmoe`` nor the eval command imports the harness before it is asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qmoe.cli import main
from qmoe.errors import ConfigError, DataError
from qmoe.harness.bible_task import TASK_NAME, task_documents, write_task
from qmoe.harness.compare import MetricRow, check_identical_requests, compare, format_table, paired_difference


def test_paired_difference_by_hand() -> None:
    # d = [0, 1, -1, 0]: mean 0, sample std sqrt(2/3), stderr sqrt(2/3)/2
    assert paired_difference([1, 0, 1, 1], [1, 1, 0, 1]) == pytest.approx((0.0, (2 / 3) ** 0.5 / 2))
    # d = [1, 0, 0, 0, 0]: mean 0.2, sample variance (0.64 + 4 * 0.04) / 4 = 0.2, stderr sqrt(0.2 / 5) = 0.2
    assert paired_difference([0, 1, 1, 0, 1], [1, 1, 1, 0, 1]) == pytest.approx((0.2, 0.2))
    # Identical scores: no difference and no uncertainty, though each run alone has a large stderr.
    assert paired_difference([0, 1, 0, 1], [0, 1, 0, 1]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1, 0, 1])


def _sample(doc_id: int, ctx: str, acc: float, ll: float, filt: str = "none") -> dict:
    return {"doc_id": doc_id, "filter": filt, "arguments": [[ctx, " a"], [ctx, " b"]],
            "resps": [[[ll, False]], [[ll - 1, False]]], "acc": acc, "perplexity": ll}


def _results(accs_a: list[float], accs_b: list[float], ctx: str = "ctx") -> dict:
    """A harness result with a group "g" of two tasks; perplexity is not a mean of its items."""
    samples = {"a": [_sample(i, f"{ctx}{i}", x, -float(i)) for i, x in enumerate(accs_a)],
               "b": [_sample(i, f"{ctx}{i}", x, -float(i)) for i, x in enumerate(accs_b)]}
    pooled = accs_a + accs_b
    return {
        "results": {t: {"acc,none": sum(x) / len(x), "acc_stderr,none": 0.1, "perplexity,none": ppl}
                    for t, x, ppl in (("a", accs_a, 7.0), ("b", accs_b, 9.0))},
        "groups": {"g": {"acc,none": sum(pooled) / len(pooled), "acc_stderr,none": 0.05}},
        "group_subtasks": {"g": ["a", "b"]},
        "samples": samples,
    }


def test_compare_pairs_items_of_tasks_and_pooled_groups() -> None:
    dense = _results([1, 0, 1, 1], [0, 0, 1])
    comp = _results([1, 1, 0, 1], [0, 0, 0])
    assert check_identical_requests(dense, comp) == 2 * 7
    rows = {(r.task, r.metric): r for r in compare(dense, comp)}
    a = rows[("a", "acc")]
    assert (a.n, a.dense, a.compressed) == (4, 0.75, 0.75)
    assert (a.difference, a.stderr) == pytest.approx((0.0, (2 / 3) ** 0.5 / 2))
    g = rows[("g", "acc")]  # pooled over a's 4 and b's 3 items: d = [0, 1, -1, 0, 0, 0, -1]
    assert g.n == 7
    assert (g.difference, g.stderr) == pytest.approx(paired_difference([1, 0, 1, 1, 0, 0, 1],
                                                                       [1, 1, 0, 1, 0, 0, 0]))
    assert g.difference == pytest.approx(-1 / 7)
    p = rows[("a", "perplexity")]  # the aggregate (7.0) is not the mean of the items: no paired stderr
    assert (p.n, p.difference, p.stderr) == (0, 0.0, None)


def test_a_group_that_is_not_the_pooled_mean_gets_no_paired_stderr() -> None:
    dense, comp = _results([1, 0, 1, 1], [0, 0, 1]), _results([1, 1, 0, 1], [0, 0, 0])
    for res in (dense, comp):  # the unweighted mean of the two subtasks' accuracies
        tasks = res["results"]
        res["groups"]["g"]["acc,none"] = (tasks["a"]["acc,none"] + tasks["b"]["acc,none"]) / 2
    g = next(r for r in compare(dense, comp) if r.task == "g")
    assert g.stderr is None and g.difference == pytest.approx(0.0 - 1 / 6)


def test_different_requests_are_refused() -> None:
    dense = _results([1, 0, 1, 1], [0, 0, 1])
    with pytest.raises(DataError, match="task a, document 2: the two runs sent different requests"):
        other = _results([1, 0, 1, 1], [0, 0, 1])
        other["samples"]["a"][2]["arguments"][1][1] = " c"
        compare(dense, other)
    with pytest.raises(DataError, match="scored 4 and 3 documents"):
        other = _results([1, 0, 1, 1], [0, 0, 1])
        other["samples"]["a"].pop()
        check_identical_requests(dense, other)
    with pytest.raises(DataError, match="different tasks"):
        other = _results([1, 0, 1, 1], [0, 0, 1])
        del other["samples"]["b"]
        check_identical_requests(dense, other)
    with pytest.raises(DataError, match="no logged samples"):
        check_identical_requests({"results": {}}, dense)


def test_format_table() -> None:
    rows = [MetricRow("qmoe_bible_next", "acc", "none", 1000, 0.41, 0.395, -0.015, 0.0085),
            MetricRow("qmoe_bible_next", "perplexity", "none", 0, 7.0, 7.5, 0.5, None)]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["task", "metric", "n", "dense", "compressed", "difference", "±", "stderr"]
    assert lines[1].split() == [TASK_NAME, "acc", "1000", "0.4100", "0.3950", "-0.0150", "±", "0.0085"]
    assert lines[2].split() == ["qmoe_bible_next", "perplexity", "-", "7.0000", "7.5000", "+0.5000"]
    single = format_table([MetricRow("t", "acc", "none", 10, None, 0.5, None, 0.1)]).splitlines()
    assert single[1].split() == ["t", "acc", "10", "0.5000", "±", "0.1000"]


def test_bible_task_documents() -> None:
    from qmoe.calib.corpus import bible_chapter_verses

    docs = task_documents(docs=50, seed=3)
    assert docs == task_documents(docs=50, seed=3) and docs != task_documents(docs=50, seed=4)
    following = {(v[i], v[i + 1]) for v in bible_chapter_verses("test") for i in range(len(v) - 1)}
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        assert (d["context"], d["choices"][d["label"]]) in following  # the answer is the next verse
    assert len({d["label"] for d in docs}) == 4  # the answer's position varies
    with pytest.raises(DataError, match="fewer than the 100000 documents"):
        task_documents(docs=100_000)


def test_write_task(tmp_path) -> None:
    yaml = write_task(tmp_path / "t", docs=5)
    assert yaml.name == f"{TASK_NAME}.yaml" and f"task: {TASK_NAME}" in yaml.read_text()
    rows = [json.loads(line) for line in (tmp_path / "t" / f"{TASK_NAME}.jsonl").read_text().splitlines()]
    assert rows == task_documents(docs=5)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [f"{TASK_NAME}.jsonl", f"{TASK_NAME}.yaml"]


def test_import_does_not_load_the_harness() -> None:
    code = ("import qmoe, qmoe.harness, qmoe.cli, qmoe.cli.eval_cmd, sys; qmoe.cli.build_parser(); "
            "print(sorted(m for m in ('lm_eval', 'datasets', 'accelerate', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_extra_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    err = _error(["eval", "tiny-switch", "--tasks", "hellaswag"], capsys)
    assert "pip install 'qmoe[lm-eval]'" in err


def test_cli_option_errors(capsys) -> None:
    if not os.environ.get("CI"):  # CI installs the test extra, lm-eval included: there this test must run
        pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[test]'")
    assert "only apply with --tasks" in _error(["eval", "tiny-switch", "--limit", "5"], capsys)
    assert "own data" in _error(["eval", "tiny-switch", "--tasks", "x", "--split", "test"], capsys)
    assert "not KEY=VALUE" in _error(["eval", "tiny-switch", "--tasks", "x", "--lm-eval-args", "fewshot"],
                                     capsys)
    assert "has no option num_fewshots" in _error(
        ["eval", "tiny-switch", "--tasks", "x", "--lm-eval-args", "num_fewshots=5"], capsys)
    assert "qmoe sets them" in _error(["eval", "tiny-switch", "--tasks", "x", "--model-args", "device=cuda"],
                                      capsys)
    assert "not compressed" in _error(["eval", "tiny-switch", "--tasks", "x", "--reference", "tiny-switch"],
                                      capsys)
    assert "--limit must be" in _error(["eval", "tiny-switch", "--tasks", "x", "--limit", "2.5"], capsys)
    with pytest.raises(ConfigError, match="at least one task"):
        from qmoe.harness import HarnessConfig

        HarnessConfig(tasks=())


def test_reference_of_reads_the_report(tmp_path) -> None:
    from qmoe.errors import SourceError
    from qmoe.harness.run import reference_of

    with pytest.raises(SourceError, match="pass --reference DIR"):
        reference_of(tmp_path)  # no qmoe_report.json
    (tmp_path / "qmoe_report.json").write_text(json.dumps({"source": "tiny-qwen3-moe"}))
    assert reference_of(tmp_path) == "tiny-qwen3-moe"
    (tmp_path / "qmoe_report.json").write_text(json.dumps({"source": str(tmp_path / "gone")}))
    with pytest.raises(SourceError, match="is not available here.*--no-reference"):
        reference_of(tmp_path)
