"""Quality against size of every recipe on the built-in models, with paired 95% intervals over evaluation
samples and several calibration seeds (the protocol behind docs/results.md's recipe table).

    python benchmarks/quality.py [--models tiny-qwen3-moe tiny-switch] [--seeds 0 1 2] \
        [--sweep 0.8 1.0 1.2 1.4] [--ablations] [--work DIR] [--json FILE] [--figure FILE] [--only NAME ...]

Protocol:
- every variant compresses the same model on the same calibration text (``--calib-data``, default the held-out
  ``calibration`` books; ``--calib-samples`` 512 of its ~1,000 windows, so that each seed draws a different
  half) and is evaluated in the same streaming pass on identical tokens: validation and test books and, out
  of domain, Python's pydoc topics (256 samples each);
- a loss increase is ``sum(compressed - reference) / tokens`` over samples, averaged over seeds per sample;
  its 95% interval combines the paired spread over samples with the spread over seeds
  (``sqrt(h_samples^2 + (1.96 sd_seeds / sqrt(S))^2)``); calibration-free RTN runs once;
- sizes are the report's expert bits/weight: every byte the experts occupy in the files, shard-header
  entries included.

Runs are kept under ``--work`` (default ``runs/quality``) and reused: rerunning the command only computes what
is missing, so a killed benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("validation", "test", "pydoc")


def variants() -> dict[str, dict[str, Any]]:
    """name -> (recipe, overrides, calibrated). Calibration-free variants run for the first seed only."""
    v: dict[str, dict[str, Any]] = {
        "RTN ternary": {"recipe": "qmoe", "over": {"method": "rtn"}, "calibrated": False},
        "QMoE recipe": {"recipe": "qmoe", "over": {}, "calibrated": True},
        "qmoe default": {"recipe": "default", "over": {}, "calibrated": True},
        # the default at its price before shard version 4 (rate 0.05; 0.1 since, docs/recipes.md)
        "qmoe default, rate 0.05": {"recipe": "default", "over": {"rate": 0.05}, "calibrated": True},
        # the default with each block's attention weights tuned with its norms (--tune attention): the
        # default since 2026-12-07, kept under this name because the runs before it carry it
        "qmoe default, tuned attention": {
            "recipe": "default",
            "over": {"tune": "attention"},
            "calibrated": True,
        },
        # the default with only the norms tuned (--tune norms: the default before 2026-12-07)
        "qmoe default, tuned norms": {"recipe": "default", "over": {"tune": "norms"}, "calibrated": True},
        # the default with every block's norms stored as they were (the default before norm tuning)
        "qmoe default, untuned": {"recipe": "default", "over": {"tune": "none"}, "calibrated": True},
        # the default's rate as one model-wide price, spread over experts by measured importance
        "qmoe default, global price": {
            "recipe": "default",
            "over": {"allocation": "global"},
            "calibrated": True,
        },
        "RTN 2-bit": {
            "recipe": "qmoe",
            "over": {"method": "rtn", "bits": "2", "grid": "int2"},
            "calibrated": False,
        },
        "GPTQ 2-bit": {"recipe": "qmoe", "over": {"bits": "2", "grid": "int2"}, "calibrated": True},
        "qmoe default 2-bit": {
            "recipe": "default",
            "over": {"bits": "2", "grid": "int2"},
            "calibrated": True,
        },
        "qmoe default 2-bit, rate 0.05": {  # the 2-bit point as measured against IQ2_XXS (docs/peers.md)
            "recipe": "default",
            "over": {"bits": "2", "grid": "int2", "rate": 0.05, "tune": "norms"},
            "calibrated": True,
        },
        "qmoe default 2-bit, tuned attention": {  # the 2-bit default since 2026-12-07
            "recipe": "default",
            "over": {"bits": "2", "grid": "int2", "tune": "attention"},
            "calibrated": True,
        },
        # bits priced per row in units of the expert's output error (qmoe.pipeline.rows)
        "qmoe default, output row prices": {
            "recipe": "default",
            "over": {"row_prices": "output"},
            "calibrated": True,
        },
    }
    return v


ABLATIONS: dict[str, dict[str, Any]] = {  # the default recipe with one setting changed
    "default, no act-order": {"act_order": False},
    "default, no gate weighting": {"gate_weighted": False},
    "default, rate 0": {"rate": 0.0},
    "default + refit": {"refit": True},
    "default, ternary-opt levels": {"grid": "ternary-opt"},
    "default, damp 0.03": {"damp": 0.03},
    "default, damp 0.2": {"damp": 0.2},
    "default, no token cap": {"token_cap": 0.0},
    "default, min tokens 1": {"min_tokens": 1},
}


def sweep_variants(sweep: list[float], sweep_seeds: int, budget: list[float]) -> dict[str, dict[str, Any]]:
    """``target B``: every expert matrix group lands on B (``--allocation uniform``); ``budget B``: B for the
    whole model at one price per bit (``--allocation global``)."""
    v: dict[str, dict[str, Any]] = {}
    for b in sweep:
        v[f"target {b:g}"] = {
            "recipe": "default",
            "over": {"target_bits": b},
            "calibrated": True,
            "seeds": sweep_seeds,
        }
    for b in budget:
        v[f"budget {b:g}"] = {
            "recipe": "default",
            "over": {"target_bits": b, "allocation": "global"},
            "calibrated": True,
            "seeds": sweep_seeds,
        }
        # the same budget with every row priced relative to its own size (row prices before they were
        # output-aware under a global budget, qmoe.pipeline.rows)
        v[f"budget {b:g} relative rows"] = {
            "recipe": "default",
            "over": {"target_bits": b, "allocation": "global", "row_prices": "relative"},
            "calibrated": True,
            "seeds": sweep_seeds,
        }
        v[f"budget {b:g} untuned"] = {  # the same budget with the norms stored as they were
            "recipe": "default",
            "over": {"target_bits": b, "allocation": "global", "tune": "none"},
            "calibrated": True,
            "seeds": sweep_seeds,
        }
        v[f"budget {b:g} tuned attention"] = {  # the same budget, attention tuned with the norms
            "recipe": "default",
            "over": {"target_bits": b, "allocation": "global", "tune": "attention"},
            "calibrated": True,
            "seeds": sweep_seeds,
        }
        v[f"budget {b:g} tuned norms"] = {  # the same budget, the norms alone tuned (the default before)
            "recipe": "default",
            "over": {"target_bits": b, "allocation": "global", "tune": "norms"},
            "calibrated": True,
            "seeds": sweep_seeds,
        }
        v[f"budget {b:g} no-drop"] = {  # the same budget with every expert kept (--no-drop-experts)
            "recipe": "default",
            "over": {"target_bits": b, "allocation": "global", "drop_experts": False},
            "calibrated": True,
            "seeds": sweep_seeds,
        }
    return v


def model_work_dir(work: str | Path, model: str) -> Path:
    """``work/<name>`` for a built-in name or a model directory: named from the model's name (the folder's
    last part), never its path, so an absolute ``--model DIR`` cannot put outputs inside the checkpoint;
    refused when it would still land inside the model's folder or inside a ``src`` source tree."""
    name = Path(model).name if ("/" in model or "\\" in model or Path(model).is_dir()) else model
    if name in ("", ".", ".."):
        raise SystemExit(f"cannot name a work folder after the model {model!r}; pass a model directory")
    out = Path(work).expanduser().resolve() / name
    src = Path(model).expanduser().resolve()
    forbidden = [src] if src.is_dir() else []
    forbidden += [p for p in out.parents if p.name == "src" and (p / "qmoe").is_dir()]  # qmoe's own sources
    for f in forbidden:
        if out == f or f in out.parents:
            raise SystemExit(f"the work folder {out} lies inside {f}; choose another --work")
    return out


def run_one(model: str, name: str, spec: dict[str, Any], seed: int, args: argparse.Namespace) -> dict:
    from qmoe.config import CompressConfig
    from qmoe.pipeline import compress
    from qmoe.recipes import recipe

    out = model_work_dir(args.work, model) / f"{name.replace(' ', '_')}-s{seed}"
    cfg = recipe(
        spec["recipe"],
        **spec["over"],
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        seed=seed,
        eval_data=SPLITS,
        eval_samples=args.eval_samples,
    )
    t0 = time.perf_counter()
    done = out / "qmoe_report.json"
    if done.is_file() and _same_run(CompressConfig.from_dict(json.loads(done.read_text())["config"]), cfg):
        rep = json.loads(done.read_text())  # written by an older qmoe whose settings read the same
    else:
        rep = compress(model, out, cfg, progress=False)
    fresh = time.perf_counter() - t0
    print(
        f"  {model} {name} seed {seed}: {rep['totals']['expert_bits_per_weight']:.3f} bits/w, "
        f"val +{rep['eval']['loss_compressed'] - rep['eval']['loss_reference']:.4f} "
        f"({rep['wall_seconds']:.0f} s{'' if fresh > 5 else ', reused'})",
        flush=True,
    )
    return rep


def _same_run(a: Any, b: Any) -> bool:
    """Whether two CompressConfigs compress alike (``drop_experts`` only matters to a global budget)."""
    from dataclasses import replace

    if a.allocation != "global" and b.allocation != "global":
        a = replace(a, drop_experts=b.drop_experts)
    return replace(a, row_prices=a.rows) == replace(b, row_prices=b.rows)  # "auto" as it resolves


def dropped(rep: dict) -> dict[str, Any]:
    """Experts a global budget dropped and the share of the plan sample's routing slots they received
    (``budget.layers[].routed``: per expert, in layer order)."""
    gone = [
        (i, e["expert"])
        for i, layer in enumerate(rep["layers"])
        for e in layer["per_expert"]
        if e.get("dropped")
    ]
    routed = [layer["routed"] for layer in (rep.get("budget") or {}).get("layers", [])]
    total = sum(sum(r) for r in routed)
    share = sum(routed[i][e] for i, e in gone) / total if routed and total else 0.0
    return {"experts": len(gone), "routed_share": share, "which": gone}


def _evals(rep: dict) -> dict[str, dict]:
    return {e["split"]: e for e in [rep["eval"], *rep["eval_extra"]]}


def summarize(reps: list[dict]) -> dict[str, Any]:
    """Size and per-split loss increase (seed-averaged, paired over samples) of one variant's runs."""
    from qmoe.evaluation import paired_delta

    out: dict[str, Any] = {
        "seeds": len(reps),
        "expert_bits_per_weight": float(np.mean([r["totals"]["expert_bits_per_weight"] for r in reps])),
        "expert_bits_per_weight_seeds": [r["totals"]["expert_bits_per_weight"] for r in reps],
        "fallbacks": [r["totals"]["experts_fallback"] for r in reps],
        "dropped": [dropped(r) for r in reps],
        "wall_seconds": [r["wall_seconds"] for r in reps],
    }
    for split in SPLITS:
        evs = [_evals(r)[split] for r in reps]
        ref = np.asarray(evs[0]["sample_loss_reference"])
        tok = np.asarray(evs[0]["sample_tokens"])
        comp = np.mean([np.asarray(e["sample_loss_compressed"]) for e in evs], 0)
        delta, h_samples = paired_delta(ref, comp, tok)
        per_seed = [paired_delta(ref, e["sample_loss_compressed"], tok)[0] for e in evs]
        sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
        out[split] = {
            "delta": delta,
            "ci95": float(np.hypot(h_samples, 1.96 * sd / np.sqrt(len(per_seed)))),
            "ci95_samples": h_samples,
            "seed_sd": sd,
            "per_seed": per_seed,
            "reference": float(ref.sum() / tok.sum()),
        }
    return out


def compare(a: list[dict], b: list[dict], split: str) -> dict[str, float]:
    """Paired difference of loss increases ``a - b`` on ``split`` over the seeds both ran (the same
    calibration text per seed): per sample (seed-averaged) with its 95% interval, plus the spread of the
    per-seed differences as for single variants when there are several. Also the ratio of the increases."""
    from qmoe.evaluation import paired_delta

    n = min(len(a), len(b))  # the seeds both ran (the first n of --seeds): the same calibration text each
    ea = [_evals(r)[split] for r in a[:n]]
    eb = [_evals(r)[split] for r in b[:n]]
    tok = np.asarray(ea[0]["sample_tokens"])
    ca = np.mean([np.asarray(e["sample_loss_compressed"]) for e in ea], 0)
    cb = np.mean([np.asarray(e["sample_loss_compressed"]) for e in eb], 0)
    diff, h = paired_delta(cb, ca, tok)
    if len(ea) == len(eb) > 1:
        per_seed = [
            paired_delta(y["sample_loss_compressed"], x["sample_loss_compressed"], tok)[0]
            for x, y in zip(ea, eb, strict=True)
        ]
        h = float(np.hypot(h, 1.96 * np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))))
    ref = np.asarray(ea[0]["sample_loss_reference"])
    da, db = paired_delta(ref, ca, tok)[0], paired_delta(ref, cb, tok)[0]
    return {"difference": diff, "ci95": h, "ratio": da / db if db else float("nan")}


MARK_BEGIN, MARK_END = "<!-- quality:begin -->", "<!-- quality:end -->"


def markdown(model: str, res: dict[str, Any], args: argparse.Namespace) -> str:
    """One model's table (every variant, every split) and its paired comparisons, as markdown."""
    summary, comparisons = res["variants"], res["comparisons"]
    lines = [
        f"\n**{model}**: calibration `{args.calib_data}` x {args.calib_samples} samples, seeds {args.seeds} "
        f"(sweep points {args.sweep_seeds} seeds, ablations 1); loss increase in nats over "
        f"{args.eval_samples} samples per split, 95% interval over samples and seeds\n",
        f"| variant | seeds | expert bits/w | {' | '.join(SPLITS)} | RTN fallbacks per seed "
        "| dropped experts per seed (routed share) |",
        "|---|---|---|" + "---|" * len(SPLITS) + "---|---|",
    ]
    for name, v in summary.items():
        cells = " | ".join(f"{v[s]['delta']:+.4f} ± {v[s]['ci95']:.4f}" for s in SPLITS)
        drops = ", ".join(f"{d['experts']} ({d['routed_share']:.1%})" for d in v["dropped"])
        bits = v["expert_bits_per_weight"]
        lines.append(f"| {name} | {v['seeds']} | {bits:.3f} | {cells} | {v['fallbacks']} | {drops} |")
    lines += ["", "| paired comparison (A vs B) | " + " | ".join(f"{s}: A - B (A/B)" for s in SPLITS) + " |"]
    lines.append("|---|" + "---|" * len(SPLITS))
    for key, c in comparisons.items():
        cells = " | ".join(
            f"{c[s]['difference']:+.4f} ± {c[s]['ci95']:.4f} ({c[s]['ratio']:.2f}x)" for s in SPLITS
        )
        lines.append(f"| {key} | {cells} |")
    return "\n".join(lines)


def figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        res = results[model]["variants"]
        sweep = sorted(
            (v["expert_bits_per_weight"], v["validation"]["delta"], v["validation"]["ci95"])
            for k, v in res.items()
            if k.startswith("target ")
        )
        if sweep:
            x, y, e = zip(*sweep, strict=True)
            ax.errorbar(x, y, yerr=e, fmt="-o", color="C0", capsize=3, label="qmoe --target-bits B (uniform)")
        budget = sorted(
            (v["expert_bits_per_weight"], v["validation"]["delta"], v["validation"]["ci95"])
            for k, v in res.items()
            if k.startswith("budget ")
            and not k.endswith(("no-drop", " untuned", " tuned norms", " tuned attention"))
        )
        if budget:
            x, y, e = zip(*budget, strict=True)
            ax.errorbar(
                x,
                y,
                yerr=e,
                fmt="-s",
                color="C1",
                capsize=3,
                label="qmoe --target-bits B --allocation global",
            )
        styles = {
            "qmoe default": ("C0", "*"),
            "QMoE recipe": ("C3", "s"),
            "RTN ternary": ("C7", "v"),
            "GPTQ 2-bit": ("C2", "D"),
            "qmoe default 2-bit": ("C0", "D"),
            "RTN 2-bit": ("C8", "^"),
        }
        for k, (color, marker) in styles.items():
            if k in res:
                v = res[k]
                ax.errorbar(
                    [v["expert_bits_per_weight"]],
                    [v["validation"]["delta"]],
                    yerr=[v["validation"]["ci95"]],
                    fmt=marker,
                    color=color,
                    capsize=3,
                    markersize=9,
                    label=k,
                )
        ax.set_yscale("log")
        ax.set_xlabel("expert bits/weight (every stored byte)")
        ax.set_ylabel("validation loss increase, nats (95% CI)")
        ax.set_title(model)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-qwen3-moe", "tiny-switch"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--sweep",
        nargs="*",
        type=float,
        default=[0.8, 1.0, 1.2, 1.4],
        help="--target-bits values for the default recipe's size curve",
    )
    ap.add_argument(
        "--budget",
        nargs="*",
        type=float,
        default=[],
        help="--target-bits values with --allocation global (one model-wide budget), paired with the same "
        "--sweep point where both ran",
    )
    ap.add_argument("--sweep-seeds", type=int, default=2, help="calibration seeds per sweep point")
    ap.add_argument("--ablations", action="store_true", help="also the default recipe with one change each")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the tables in docs/results.md")
    ap.add_argument("--calib-data", default="calibration")
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants (names as printed)")
    ap.add_argument("--work", default="runs/quality", help="compressed outputs, reused on rerun")
    ap.add_argument(
        "--existing",
        action="store_true",
        help="only outputs already in --work (per variant the seeds done, in order); computes nothing",
    )
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--figure", default=None, help="loss increase against expert bits/weight (PNG)")
    args = ap.parse_args()

    import torch

    specs = {**variants(), **sweep_variants(args.sweep, args.sweep_seeds, args.budget)}
    if args.ablations:
        specs.update(
            {
                k: {"recipe": "default", "over": o, "calibrated": True, "seeds": 1}
                for k, o in ABLATIONS.items()
            }
        )
    if args.only:
        unknown = sorted(set(args.only) - set(specs))
        if unknown:
            sys.exit(f"unknown variants {unknown}; choose from {sorted(specs)}")
        specs = {k: v for k, v in specs.items() if k in args.only}
    results: dict[str, Any] = {}
    for model in args.models:
        runs: dict[str, list[dict]] = {}
        for name, spec in specs.items():
            seeds = args.seeds[: spec.get("seeds", len(args.seeds))] if spec["calibrated"] else args.seeds[:1]
            if args.existing:  # the longest prefix of those seeds already compressed: computes nothing
                d = model_work_dir(args.work, model)
                have = [(d / f"{name.replace(' ', '_')}-s{s}" / "qmoe_report.json").is_file() for s in seeds]
                seeds = seeds[: have.index(False)] if False in have else seeds
                if not seeds:
                    print(f"  {model} {name}: no output yet; left out", flush=True)
                    continue
            runs[name] = [run_one(model, name, spec, s, args) for s in seeds]
        summary = {name: summarize(r) for name, r in runs.items()}
        comparisons = {}
        pairs = [
            ("qmoe default", "QMoE recipe"),
            ("qmoe default", "qmoe default, untuned"),
            ("qmoe default", "qmoe default, rate 0.05"),
            ("qmoe default, tuned attention", "qmoe default"),
            ("qmoe default, tuned attention", "QMoE recipe"),
            ("qmoe default, tuned attention", "qmoe default, rate 0.05"),
            ("qmoe default", "qmoe default, tuned norms"),
            ("qmoe default, tuned norms", "QMoE recipe"),
            ("qmoe default, rate 0.05", "QMoE recipe"),
            ("qmoe default, untuned", "QMoE recipe"),
            ("qmoe default, global price", "QMoE recipe"),
            ("qmoe default, global price", "qmoe default"),
            ("QMoE recipe", "RTN ternary"),
            ("qmoe default", "RTN ternary"),
            ("GPTQ 2-bit", "RTN 2-bit"),
            ("qmoe default 2-bit", "RTN 2-bit"),
            ("qmoe default 2-bit", "qmoe default 2-bit, rate 0.05"),
            ("qmoe default 2-bit, tuned attention", "qmoe default 2-bit, rate 0.05"),
            ("qmoe default 2-bit, tuned attention", "qmoe default 2-bit"),
        ]
        pairs += [(k, "QMoE recipe") for k in runs if k.startswith(("target ", "budget "))]
        pairs += [(k, "QMoE recipe") for k in runs if k == "qmoe default, output row prices"]
        pairs += [("qmoe default, output row prices", "qmoe default")]
        pairs += [(k, "target " + k.split()[1]) for k in runs if k.startswith("budget ") and not k.endswith(("rows", " untuned"))]
        pairs += [
            (k.removesuffix(" relative rows"), k)
            for k in runs
            if k.startswith("budget ") and k.endswith(" relative rows")
        ]
        pairs += [
            (k, k + " no-drop")
            for k in runs
            if k.startswith("budget ") and not k.endswith(("no-drop", " rows", " untuned"))
        ]
        pairs += [(k, "qmoe default") for k in runs if k in ABLATIONS]
        pairs += [(k, k.removesuffix(" tuned attention")) for k in runs if k.endswith(" tuned attention")]
        pairs += [(k.removesuffix(" tuned norms"), k) for k in runs if k.endswith(" tuned norms")]
        pairs += [
            (k.removesuffix(" untuned"), k) for k in runs if k.startswith("budget ") and k.endswith(" untuned")
        ]
        for a, b in pairs:
            if a in runs and b in runs:
                comparisons[f"{a} vs {b}"] = {s: compare(runs[a], runs[b], s) for s in SPLITS}
        results[model] = {"variants": summary, "comparisons": comparisons}

        print(markdown(model, results[model], args), flush=True)

    if args.json:
        meta = {
            "command": " ".join(sys.argv),
            "machine": f"{platform.machine()} {platform.processor()} {torch.get_num_threads()} threads",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "calib_data": args.calib_data,
            "calib_samples": args.calib_samples,
            "seeds": args.seeds,
            "eval_samples": args.eval_samples,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    if args.figure:
        figure(results, Path(args.figure))
    if args.write_docs:
        doc = Path(__file__).resolve().parents[1] / "docs" / "results.md"
        text = doc.read_text()
        i, j = text.index(MARK_BEGIN), text.index(MARK_END)
        body = "\n".join(markdown(m, r, args) for m, r in results.items())
        command = "python " + " ".join(sys.argv)
        doc.write_text(f"{text[: i + len(MARK_BEGIN)]}\n`{command}`\n{body}\n{text[j:]}")


if __name__ == "__main__":
    main()
