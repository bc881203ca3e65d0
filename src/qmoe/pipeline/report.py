"""``qmoe_report.json``: per-layer and per-expert statistics, totals, evaluation; and the live table rows.

Report layout (``REPORT_VERSION`` 1)::

    {"report_version", "qmoe_version", "source", "adapter", "config": CompressConfig.to_dict(),
     "execution": {"device", "threads", "rank_threads": [threads of each rank]},
     "layers": [{"name", "stack", "block", "experts", "tokens": {min, median, max, total}, "fallbacks",
                 "objective_mean": {proj: float|None}, "bits_per_weight", "zero_fraction", "bytes",
                 "array_bytes", "header_bytes", "rate": {proj: float}, "level_scale": {proj: float},
                 "seconds", "rss_bytes",
                 "per_expert": [{"expert", "tokens", "tokens_used", "fallback", "objective": {proj: ...},
                                 "zero_fraction", "bits_per_weight", "bytes", "dropped"}],
                 "shared": {"weights", "bytes", "bits_per_weight", "tokens_used"}}],  # if the family has them
     "totals": {"params", "expert_params", "bytes", "bits_per_param", "expert_bits_per_weight",
                "ratio_vs_bf16", "experts", "experts_gptq", "experts_fallback", "experts_dropped",
                "shared_expert_params", "shared_expert_bytes", "shared_expert_bits_per_weight"},
     "eval": {"split", "samples", "tokens", "loss_reference", "loss_compressed", "sample_tokens",
              "sample_loss_reference", "sample_loss_compressed"} | null,   # per-sample summed nats
     "eval_extra": [same as eval, for further eval_data],
     "wall_seconds", "cpu_seconds", "peak_rss_bytes", "resumed_from_block"}

What the sizes count: a layer's ``bytes`` are every byte its experts occupy in the shard file, i.e. the
encoded arrays (stream, code table, row offsets, levels, the matrix header with its crc32) plus the
experts' entries in the safetensors header and in the qmoe header (names, shapes, offsets, crc32 strings);
``totals.expert_bits_per_weight`` is 8 x their sum over the expert weights. ``totals.bytes`` is the size
of all shard files. Shared experts (the MLP every token uses, Qwen2-MoE / DeepSeek-V3) are counted apart, in
the layer's ``shared`` entry and the ``shared_expert_*`` totals: their stored bytes when kept, their encoded
bytes plus header share when ``--shared-experts`` quantizes them; ``expert_*`` counts the routed experts only.

``wall_seconds`` (plus the compute time of killed attempts), ``cpu_seconds`` (user + system time of this
process: on a shared machine the honest measure of the work) and ``peak_rss_bytes`` describe the process
that finished the run. They, the per-layer ``seconds`` and ``rss_bytes`` and ``resumed_from_block`` are the
only fields that differ between repeated runs (``stable`` drops them).
"""

from __future__ import annotations

import json
import resource
import statistics
from pathlib import Path
from typing import Any

from qmoe.errors import FormatError
from qmoe.pipeline.state import PARTIAL_DIR, STATE_FILE

REPORT_VERSION = 1
REPORT_FILE = "qmoe_report.json"
VOLATILE_FIELDS = ("wall_seconds", "cpu_seconds", "peak_rss_bytes", "resumed_from_block")
VOLATILE_LAYER_FIELDS = ("seconds", "rss_bytes")


def stable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its timing and memory fields: equal for equal runs, resumed or not."""
    out = {k: v for k, v in report.items() if k not in VOLATILE_FIELDS}
    out["layers"] = [{k: v for k, v in r.items() if k not in VOLATILE_LAYER_FIELDS} for r in report["layers"]]
    return out


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _expert_row(
    e: int,
    objective_names: list[str],
    routed: list[int],
    used: list[int],
    fallbacks: list[list[bool]],
    objectives: list[list[float | None]],
    sizes: list[dict[str, Any]],
) -> dict[str, Any]:
    s = sizes[e]
    return {
        "expert": e,
        "tokens": routed[e],
        "tokens_used": used[e],
        # a dropped expert has no weights to quantize: not a fallback, whatever its (zero) tokens
        "fallback": any(fb[e] for fb in fallbacks) and not s.get("dropped", False),
        "dropped": s.get("dropped", False),
        "objective": {n: obj[e] for n, obj in zip(objective_names, objectives, strict=True)},
        "zero_fraction": s["zero_fraction"],
        "bits_per_weight": s["bits_per_weight"],
        "bytes": s["bytes"],
    }


def layer_row(
    name: str,
    stack: str,
    block: int,
    objective_names: list[str],
    routed: list[int],
    used: list[int],
    fallbacks: list[list[bool]],
    objectives: list[list[float | None]],
    sizes: list[dict[str, Any]],
    seconds: float,
    header_bytes: int = 0,
    rates: list[float] | None = None,
    level_scales: list[float] | None = None,
) -> dict[str, Any]:
    """A layer's report entry; ``fallbacks``/``objectives``/``rates`` hold one entry per projection group.

    ``bytes`` (and ``bits_per_weight``) count the encoded arrays plus ``header_bytes``, the experts' share
    of the shard's header (``codec.container.header_share``); per-expert sizes count the arrays only.
    """
    E = len(routed)
    per_expert = [
        _expert_row(e, objective_names, routed, used, fallbacks, objectives, sizes) for e in range(E)
    ]
    array_bytes = sum(s["bytes"] for s in sizes)
    nbytes = array_bytes + header_bytes
    weights = sum(s["weights"] for s in sizes)
    zeros = sum(s["zero_fraction"] * s["weights"] for s in sizes)

    def mean(vals: list[float | None]) -> float | None:
        v = [x for x in vals if x is not None]
        return sum(v) / len(v) if v else None

    return {
        "name": name,
        "stack": stack,
        "block": block,
        "experts": E,
        "tokens": {
            "min": min(routed),
            "median": float(statistics.median(routed)),
            "max": max(routed),
            "total": sum(routed),
        },
        "fallbacks": sum(p["fallback"] for p in per_expert),
        "objective_mean": {n: mean(obj) for n, obj in zip(objective_names, objectives, strict=True)},
        "bits_per_weight": 8 * nbytes / weights,
        "zero_fraction": zeros / weights,
        "bytes": nbytes,
        "array_bytes": array_bytes,
        "header_bytes": header_bytes,
        "rate": dict(zip(objective_names, rates or [0.0] * len(objective_names), strict=True)),
        "level_scale": dict(zip(objective_names, level_scales or [1.0] * len(objective_names), strict=True)),
        "seconds": seconds,
        "rss_bytes": current_rss_bytes(),
        "per_expert": per_expert,
    }


TABLE_HEADER = (
    f"{'MoE layer':<34} {'tokens min/med/max':>22} {'fallback':>8} {'objective':>21} "
    f"{'bits/w':>6} {'zero%':>6} {'sec':>6} {'RSS GB':>6}"
)


def _fmt_obj(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def table_row(row: dict[str, Any]) -> str:
    t = row["tokens"]
    tokens = f"{t['min']}/{t['median']:.0f}/{t['max']}"
    objective = "/".join(_fmt_obj(v) for v in row["objective_mean"].values())
    return (
        f"{row['name'][-34:]:<34} {tokens:>22} {row['fallbacks']:>4}/{row['experts']:<3} {objective:>21} "
        f"{row['bits_per_weight']:6.3f} {100 * row['zero_fraction']:6.1f} {row['seconds']:6.1f} "
        f"{row['rss_bytes'] / 2**30:6.2f}"
    )


def totals(
    params: int, expert_params: int, total_bytes: int, expert_bytes: int, layers: list[dict[str, Any]]
) -> dict[str, Any]:
    experts = sum(r["experts"] for r in layers)
    fell = sum(r["fallbacks"] for r in layers)
    dropped = sum(len(r.get("dropped", ())) for r in layers)
    shared_weights = sum(r["shared"]["weights"] for r in layers if "shared" in r)
    shared_bytes = sum(r["shared"]["bytes"] for r in layers if "shared" in r)
    return {
        "params": params,
        "expert_params": expert_params,
        "bytes": total_bytes,
        "bits_per_param": 8 * total_bytes / params,
        "expert_bytes": expert_bytes,
        "expert_bits_per_weight": 8 * expert_bytes / max(1, expert_params),
        "ratio_vs_bf16": 2 * params / total_bytes,
        "experts": experts,
        "experts_gptq": experts - fell - dropped,
        "experts_fallback": fell,
        "experts_dropped": dropped,  # given no weights by the budget (the router never chooses them)
        "shared_expert_params": shared_weights,
        "shared_expert_bytes": shared_bytes,
        "shared_expert_bits_per_weight": 8 * shared_bytes / shared_weights if shared_weights else None,
    }


def load_report(directory: str | Path) -> dict[str, Any]:
    """The report of a finished output directory (FormatError if it has none or it is unreadable)."""
    path = Path(directory) / REPORT_FILE
    if not path.is_file():
        hint = ""
        if (Path(directory) / PARTIAL_DIR / STATE_FILE).is_file():
            hint = " (an unfinished run is there: rerun its qmoe compress command to finish it)"
        raise FormatError(
            f"{directory} holds no {REPORT_FILE}{hint}; pass the --out directory of qmoe compress"
        )
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(report, dict) or report.get("report_version") != REPORT_VERSION:
        raise FormatError(f"{path} is not a qmoe report of version {REPORT_VERSION}")
    return report


def _recipe_line(c: dict[str, Any]) -> str:
    size = (
        f"target {c['target_bits']:g} bits/weight" if c.get("target_bits") else f"rate {c.get('rate', 0):g}"
    )
    flags = [
        name
        for name, on in (
            ("act-order", c.get("act_order")),
            ("gate-weighted Hessians", c.get("gate_weighted")),
            ("level refit", c.get("refit")),
            ("rows priced in output units", c.get("row_prices") == "output"
             or (c.get("row_prices") == "auto" and c.get("allocation") == "global")),
            ("tuned norms", c.get("tune", "none") == "norms"),
            ("tuned norms and attention", c.get("tune", "none") == "attention"),
        )
        if on
    ]
    return (
        f"recipe      {size}, damp {c['damp']:g}, token cap {c['token_cap']:g}x, "
        f"min tokens {c['min_tokens']}{', ' if flags else ''}{', '.join(flags)}"
    )


def summary(report: dict[str, Any], table: bool = True) -> str:
    """Readable multi-line summary of a report (``qmoe inspect``), with the per-layer table if ``table``."""
    t = report["totals"]
    lines = [
        f"source      {report.get('source')}  ({report.get('adapter')})",
        f"method      {report['config']['method']} on grid {report['config']['grid']} "
        f"(bits={report['config']['bits']}), {report['config']['calib_samples']} calibration samples "
        f"of {report['config']['calib_data']!r}",
        _recipe_line(report["config"]),
        f"params      {t['params']:,} ({t['expert_params']:,} in experts)",
        f"size        {t['bytes']:,} bytes: {t['bits_per_param']:.3f} bits/param overall, "
        f"{t['expert_bits_per_weight']:.3f} bits/weight in experts (every stored byte), "
        f"ratio {t['ratio_vs_bf16']:.1f}x vs bf16",
        f"experts     {t['experts']} quantized: {t['experts_gptq']} by {report['config']['method']}, "
        f"{t['experts_fallback']} fell back to round-to-nearest"
        + (f", {t['experts_dropped']} dropped (no weights)" if t.get("experts_dropped") else ""),
    ]
    if t.get("shared_expert_params"):
        how = report["config"].get("shared_experts", "keep")
        lines.append(
            f"shared      {t['shared_expert_params']:,} weights in shared experts, "
            f"{'kept as stored' if how == 'keep' else 'quantized at ' + how}: "
            f"{t['shared_expert_bits_per_weight']:.3f} bits/weight"
        )
    for ev in [report.get("eval"), *report.get("eval_extra", [])]:
        if ev:
            lines.append(
                f"eval        {ev['split']}: loss {ev['loss_reference']:.4f} -> {ev['loss_compressed']:.4f} "
                f"({ev['loss_compressed'] - ev['loss_reference']:+.4f}) on {ev['tokens']:,} tokens"
            )
    lines.append(
        f"run         {report['wall_seconds']:.1f} s wall, {report.get('cpu_seconds', 0.0):.1f} s CPU, "
        f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    if table:
        lines += ["", TABLE_HEADER, *(table_row(r) for r in report["layers"])]
    return "\n".join(lines)
