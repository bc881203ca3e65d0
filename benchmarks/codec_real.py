"""The entropy coder on real GPTQ codes: stream size against each matrix's zeroth-order entropy.

    python benchmarks/codec_real.py DIR [DIR ...] [--json FILE]

``DIR`` is a ``qmoe compress`` output. For every encoded ternary matrix: ``H0`` = rows x cols x the empirical
entropy of its codes {-1, 0, 1} (the size an ideal coder of independent codes reaches), ``stream`` = the coded
bits (``header[10]``), and their ratio; then the per-matrix ratios' spread (the target is <= 1.03 for each
matrix), the metadata (levels, row offsets, tables, headers) per weight, and how far the rows' sparsity
spreads within a matrix (which is what lets run-length coding beat H0, or costs it when rows end early).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def entropy_bits(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() * codes.size)


def measure(out: Path) -> dict:
    from qmoe.codec import decode, load_shard
    from qmoe.codec.format import H_BITS

    ratios, meta, rows_spread, nweights, h0_total, stream_total = [], [], [], 0, 0.0, 0
    worst = (0.0, "")
    for f in sorted(out.glob("model-*.safetensors")):
        for name, enc in load_shard(f).encoded.items():
            if enc.kind != "ternary":
                continue
            codes = decode(enc)[0]
            h0 = entropy_bits(codes)
            stream = int(enc.to_arrays()["header"][H_BITS])
            ratio = stream / h0 if h0 > 0 else float("inf")
            ratios.append(ratio)
            if ratio > worst[0]:
                worst = (ratio, name)
            meta.append(8 * enc.nbytes - stream)
            zero_rows = (codes == 0).mean(1)  # [rows] zero fraction per row
            rows_spread.append(np.percentile(zero_rows, [5, 50, 95]))
            nweights += codes.size
            h0_total += h0
            stream_total += stream
    r = np.asarray(ratios)
    spread = np.asarray(rows_spread)
    return {
        "dir": str(out),
        "matrices": len(r),
        "stream_over_h0": {
            "min": float(r.min()),
            "median": float(np.median(r)),
            "p95": float(np.percentile(r, 95)),
            "max": float(r.max()),
            "all": float(stream_total / h0_total),
            "worst_matrix": worst[1],
            "matrices_over_1.03": int((r > 1.03).sum()),
        },
        "h0_bits_per_weight": h0_total / nweights,
        "stream_bits_per_weight": stream_total / nweights,
        "array_metadata_bits_per_weight": float(sum(meta) / nweights),
        "row_zero_fraction_p5_p50_p95": [float(v) for v in spread.mean(0)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    print(
        "| output | matrices | H0 bits/w | stream bits/w | stream/H0 all (min / median / p95 / max) | "
        "over 1.03 | metadata bits/w | row zeros p5 / p50 / p95 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for d in args.dirs:
        m = measure(Path(d))
        results.append(m)
        s = m["stream_over_h0"]
        z = m["row_zero_fraction_p5_p50_p95"]
        print(
            f"| {d} | {m['matrices']} | {m['h0_bits_per_weight']:.4f} | {m['stream_bits_per_weight']:.4f} | "
            f"{s['all']:.4f} ({s['min']:.4f} / {s['median']:.4f} / {s['p95']:.4f} / {s['max']:.4f}) | "
            f"{s['matrices_over_1.03']} | {m['array_metadata_bits_per_weight']:.3f} | "
            f"{z[0]:.2f} / {z[1]:.2f} / {z[2]:.2f} |"
        )
        print(f"  worst matrix: {s['worst_matrix']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
