"""Quality, size and speed of ``qmoe compress`` on a built-in model (tiny-switch by default): reference vs
RTN and GPTQ at both widths.

    python benchmarks/quality.py [--source tiny-switch] [--calib-samples 1024] [--work DIR] [--grids ternary]

Every run uses the same calibration set and the same evaluation samples (Bible validation books and,
out of domain, Python's pydoc topics); the reference loss is measured in the same streaming pass as the
compressed one. Prints the losses, their increases, sizes (bits/param overall and in the experts, ratio vs
bf16), wall time, and whether the targets hold: GPTQ's loss increase at most 0.5x RTN's at each width.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def run(source: str, out: Path, **cfg: object) -> dict:
    from qmoe.config import CompressConfig
    from qmoe.pipeline import compress

    config = CompressConfig(eval_data=("validation", "pydoc"), **cfg)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    rep = compress(source, out, config, progress=False)
    rep["_seconds"] = time.perf_counter() - t0
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="tiny-switch")
    ap.add_argument("--calib-samples", type=int, default=None, help="default: CompressConfig's default")
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument(
        "--grids", nargs="+", default=["ternary"], help="ternary grids to try (ternary, ternary-opt)"
    )
    ap.add_argument("--no-2bit", action="store_true", help="ternary runs only (skip RTN/GPTQ 2-bit)")
    ap.add_argument("--work", default=None, help="keep outputs here (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qmoe-quality-"))
    common: dict[str, object] = {"eval_samples": args.eval_samples}
    if args.calib_samples:
        common["calib_samples"] = args.calib_samples
    runs = []
    for grid in args.grids:
        runs += [("RTN", "ternary", grid), ("GPTQ", "ternary", grid)]
    if not args.no_2bit:
        runs += [("RTN", "2", "int2"), ("GPTQ", "2", "int2")]
    results = {}
    for method, bits, grid in runs:
        name = f"{method} {grid}"
        out = work / f"{method.lower()}-{grid}"
        rep = run(args.source, out, method=method.lower(), bits=bits, grid=grid, **common)
        results[name] = rep
        ev, extra = rep["eval"], rep["eval_extra"][0]
        print(
            f"{name:<18} val {ev['loss_reference']:.4f} -> {ev['loss_compressed']:.4f}   pydoc "
            f"{extra['loss_reference']:.4f} -> {extra['loss_compressed']:.4f}   {rep['_seconds']:.0f} s",
            flush=True,
        )

    first = next(iter(results.values()))
    ref_val, ref_pd = first["eval"]["loss_reference"], first["eval_extra"][0]["loss_reference"]
    refs = {round(r["eval"]["loss_reference"], 6) for r in results.values()}
    if len(refs) > 1:  # the source changed during the benchmark (e.g. a retrained built-in model)
        print(f"WARNING: reference losses differ between runs {sorted(refs)}: the source changed; rerun")
    print()
    print(
        f"source {args.source}: {first['totals']['params']:,} params "
        f"({first['totals']['expert_params']:,} in experts), "
        f"calibration {first['config']['calib_samples']} samples, eval {first['eval']['samples']} "
        f"samples ({first['eval']['tokens']:,} tokens) + pydoc {first['eval_extra'][0]['tokens']:,} tokens"
    )
    header = (
        f"| {'run':<18} | val loss | val +delta | pydoc loss | pydoc +delta | bytes | bits/param | "
        f"expert bits/w | ratio vs bf16 | fallbacks | wall s |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    print(
        f"| {'reference':<18} | {ref_val:.4f} | | {ref_pd:.4f} | | {2 * first['totals']['params']:,} | "
        "16 | 16 | 1.0 | | |"
    )
    for name, rep in results.items():
        t, ev, pd = rep["totals"], rep["eval"], rep["eval_extra"][0]
        print(
            f"| {name:<18} | {ev['loss_compressed']:.4f} | {ev['loss_compressed'] - ref_val:+.4f} | "
            f"{pd['loss_compressed']:.4f} | {pd['loss_compressed'] - ref_pd:+.4f} | {t['bytes']:,} | "
            f"{t['bits_per_param']:.3f} | {t['expert_bits_per_weight']:.3f} | {t['ratio_vs_bf16']:.2f} | "
            f"{t['experts_fallback']}/{t['experts']} | {rep['wall_seconds']:.0f} |"
        )
    print()
    pairs = [(f"RTN {g}", f"GPTQ {g}") for g in args.grids]
    pairs += [] if args.no_2bit else [("RTN int2", "GPTQ int2")]
    for rtn_name, gptq_name in pairs:
        d_rtn = results[rtn_name]["eval"]["loss_compressed"] - ref_val
        d_gptq = results[gptq_name]["eval"]["loss_compressed"] - ref_val
        ok = d_gptq <= 0.5 * d_rtn
        print(
            f"target {gptq_name} increase {d_gptq:+.4f} <= 0.5 x {rtn_name} increase {d_rtn:+.4f}: "
            f"{'MET' if ok else 'NOT MET'} (ratio {d_gptq / d_rtn:.2f})"
        )
    default = results.get("GPTQ ternary")
    if default is not None and args.calib_samples is None:
        print(
            f"speed: GPTQ ternary with default settings took {default['wall_seconds']:.0f} s "
            f"({'under' if default['wall_seconds'] < 300 else 'OVER'} the 5-minute target)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {k: {kk: v for kk, v in r.items() if kk != "layers"} for k, r in results.items()}, indent=1
            )
        )
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
