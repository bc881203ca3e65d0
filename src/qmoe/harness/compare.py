"""Pairing two lm-evaluation-harness runs: the same requests, per-item differences with their standard error.

Both runs (the dense reference and the compressed model) are scored by the harness on the same documents,
with the same few-shot examples and seeds, so each item (document) has a score under each model. The
accuracy difference of the compressed model is the mean of the per-item differences ``d_i = c_i - r_i`` and
its standard error is the paired one, ``std(d, ddof=1) / sqrt(n)``: the two scores of an item are strongly
correlated (most items are right or wrong under both models), so combining the two runs' own standard errors
as if independent, ``sqrt(se_r^2 + se_c^2)``, would overstate the uncertainty several-fold.

The pairing is only valid if the requests really are identical; ``check_identical_requests`` compares every
request's arguments (context and continuation strings, or prompt and generation settings), document by
document, and refuses otherwise.

A metric gets a paired standard error where the harness's aggregate is the mean of the per-item values (acc,
acc_norm, exact_match, ...; checked, not assumed, for tasks and for groups pooled over their subtasks);
other aggregates (perplexity, BLEU, a group's unweighted mean of subtasks) get their difference without one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from qmoe.errors import DataError


@dataclass(frozen=True)
class MetricRow:
    task: str  # task or group name
    metric: str  # "acc", "acc_norm", ...
    filter: str  # the harness's filter name ("none" for plain loglikelihood tasks)
    n: int  # items behind the metric (0 where no per-item values were logged)
    dense: float | None
    compressed: float | None
    difference: float | None  # compressed - dense
    stderr: float | None  # of the difference (paired over items), or of the single score if one model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(reference: Any, other: Any) -> tuple[float, float]:
    """(mean of ``other - reference``, its standard error), paired over items (``len >= 2``)."""
    import numpy as np

    r, o = (np.asarray(a, dtype=np.float64) for a in (reference, other))
    if r.shape != o.shape or r.ndim != 1 or len(r) < 2:
        raise ValueError(f"need two equal 1-D per-item arrays of >= 2 items, got {r.shape} and {o.shape}")
    d = o - r
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def _request_key(sample: dict[str, Any]) -> str:
    # json with default=str: arguments are tuples of strings and, for generation tasks, dicts of settings.
    return json.dumps([sample["doc_id"], sample["filter"], sample["arguments"]], default=str, sort_keys=True)


def check_identical_requests(reference: dict[str, Any], other: dict[str, Any]) -> int:
    """Raise DataError unless two harness results (``log_samples=True``) hold the same tasks, documents and
    request arguments, in the same order; returns the number of requests compared."""
    ref, oth = reference.get("samples"), other.get("samples")
    if not ref or not oth:
        raise DataError("the harness results hold no logged samples; run them with log_samples=True")
    if sorted(ref) != sorted(oth):
        raise DataError(f"the two runs scored different tasks: {sorted(ref)} vs {sorted(oth)}")
    count = 0
    for task in sorted(ref):
        a, b = ref[task], oth[task]
        if len(a) != len(b):
            raise DataError(f"task {task}: the two runs scored {len(a)} and {len(b)} documents; pass the "
                            "same limit and options to both")
        for x, y in zip(a, b, strict=True):
            if _request_key(x) != _request_key(y):
                raise DataError(f"task {task}, document {x['doc_id']}: the two runs sent different requests "
                                "(check that both models have the same tokenizer and chat template)")
            count += len(x["arguments"])
    return count


def _leaves(name: str, results: dict[str, Any]) -> list[str]:
    """The tasks with logged samples under ``name`` (itself if it is a task), depth first."""
    if name in results.get("samples", {}):
        return [name]
    return [leaf for child in results.get("group_subtasks", {}).get(name, [])
            for leaf in _leaves(child, results)]


def _items(results: dict[str, Any], name: str, metric: str, filt: str) -> list[float]:
    out = []
    for leaf in _leaves(name, results):
        for s in results["samples"][leaf]:
            if s["filter"] == filt and isinstance(s.get(metric), (int, float)):
                out.append(float(s[metric]))
    return out


def _is_mean(items: list[float], value: Any) -> bool:
    return bool(items) and isinstance(value, (int, float)) and math.isclose(
        sum(items) / len(items), float(value), rel_tol=1e-9, abs_tol=1e-12)


def _scores(results: dict[str, Any]) -> dict[tuple[str, str, str], Any]:
    """{(task or group, metric, filter): aggregate} from the harness's "results" and "groups" tables."""
    out = {}
    for table in ("results", "groups"):
        for name, entry in results.get(table, {}).items():
            for key, value in entry.items():
                metric, sep, filt = key.partition(",")
                if sep and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                    out[(name, metric, filt)] = value
    return out


def _stderr(results: dict[str, Any], name: str, metric: str, filt: str) -> float | None:
    for table in ("results", "groups"):
        value = results.get(table, {}).get(name, {}).get(f"{metric}_stderr,{filt}")
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def single_rows(results: dict[str, Any], which: str) -> list[MetricRow]:
    """The rows of one run (``which``: "dense" or "compressed"), with the harness's own standard errors."""
    rows = []
    for (name, metric, filt), value in _scores(results).items():
        n = len(_items(results, name, metric, filt)) if results.get("samples") else 0
        score = {"dense": None, "compressed": None, which: float(value)}
        rows.append(MetricRow(name, metric, filt, n, score["dense"], score["compressed"], None,
                              _stderr(results, name, metric, filt)))
    return rows


def compare(dense: dict[str, Any], compressed: dict[str, Any]) -> list[MetricRow]:
    """One row per (task or group, metric, filter): both scores, the difference and its paired stderr."""
    check_identical_requests(dense, compressed)
    a, b = _scores(dense), _scores(compressed)
    if sorted(a) != sorted(b):
        raise DataError("the two runs report different metrics; run both with the same lm-eval options")
    rows = []
    for key in a:
        name, metric, filt = key
        r_items, c_items = _items(dense, *key), _items(compressed, *key)
        if len(r_items) >= 2 and len(r_items) == len(c_items) and _is_mean(r_items, a[key]) \
                and _is_mean(c_items, b[key]):
            diff, se = paired_difference(r_items, c_items)
            n = len(r_items)
        else:  # not a mean of per-item values: the difference of the aggregates, no paired error
            diff, se, n = float(b[key]) - float(a[key]), None, 0
        rows.append(MetricRow(name, metric, filt, n, float(a[key]), float(b[key]), diff, se))
    return rows


def format_table(rows: list[MetricRow]) -> str:
    """A plain-text table: task, metric, n, dense, compressed, difference ± stderr (one model: score ±
    stderr)."""
    def num(x: float | None, se: float | None = None) -> str:
        return "-" if x is None else f"{x:.4f}" + ("" if se is None else f" ± {se:.4f}")

    paired = any(r.dense is not None and r.compressed is not None for r in rows)
    head = ("task", "metric", "n", *(("dense", "compressed", "difference ± stderr") if paired else
                                     ("score ± stderr",)))
    body = []
    for r in rows:
        if paired:
            diff = "-" if r.difference is None else f"{r.difference:+.4f}" + (
                "" if r.stderr is None else f" ± {r.stderr:.4f}")
            scores = (num(r.dense), num(r.compressed), diff)
        else:
            scores = (num(r.dense if r.dense is not None else r.compressed, r.stderr),)
        body.append((r.task, r.metric if r.filter == "none" else f"{r.metric} ({r.filter})", str(r.n or "-"),
                     *scores))
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(line, widths, strict=True))).rstrip()
                     for line in (head, *body))
