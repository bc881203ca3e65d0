"""The entropy coder on real GPTQ codes: stream size against each matrix's zeroth-order entropy, and the
non-code bits per row of format versions 1 and 2 on the same codes.

    python benchmarks/codec_real.py DIR [DIR ...] [--json FILE]

``DIR`` is a ``qmoe compress`` output. For every encoded ternary matrix: ``H0`` = rows x cols x the empirical
entropy of its codes {-1, 0, 1} (the size an ideal coder of independent codes reaches), ``stream`` = the coded
bits (``header[10]``), and their ratio; then the per-matrix ratios' spread (the target is <= 1.03 for each
matrix), the metadata (levels, row offsets, tables, headers) per weight, and how far the rows' sparsity
spreads within a matrix (which is what lets run-length coding beat H0, or costs it when rows end early).

Second table, every encoded matrix (ternary and int2): each is re-encoded from its decoded codes and levels
as format 1 (levels rounded to fp16, as version 1 stored them) and as format 2 (levels on its grid,
``qmoe.codec.levels``); the codes, hence the stream, are the same. Non-code bits per row = (bytes stored
for the matrix in a shard, i.e. its blob zero-padded to whole 8-byte words, times 8, minus the stream's
codeword bits) / rows: header, table, row index, levels, the stream's last-word padding and guard word.
The shard's JSON entries per matrix (name, offsets, crc; the same for both versions) are printed apart.
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

    ratios, meta, rows_spread, nweights, h0_total, stream_total = [], [], [], 0, 0.0, 0
    worst = (0.0, "")
    for f in sorted(out.glob("model-*.safetensors")):
        for name, enc in load_shard(f).encoded.items():
            if enc.kind != "ternary":
                continue
            codes = decode(enc)[0]
            h0 = entropy_bits(codes)
            stream = enc.total_bits
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
    if not ratios:
        return {"dir": str(out), "matrices": 0}
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


def stored_bits(enc) -> int:
    """Bits the matrix takes in a shard (version 3): its blob padded to whole 8-byte words."""
    return 64 * -(-enc.nbytes // 8)


def versions(out: Path) -> dict:
    """Non-code bits per row of format 1 and 2 on the same codes, per kind; and the shard-entry bytes."""
    from qmoe.codec import container, encode_int2, encode_ternary, load_shard
    from qmoe.codec.decode import decode
    from qmoe.codec.levels import round_levels

    acc: dict = {}
    for f in sorted(out.glob("model-*.safetensors")):
        shard = load_shard(f)
        entries = container.header_share(f, list(shard.encoded))
        for enc in shard.encoded.values():
            a = acc.setdefault(enc.kind, {"rows": 0, "matrices": 0, "v1": 0, "v2": 0, "entries": 0,
                                          "weights": 0, "versions_read": set()})
            a["versions_read"].add(enc.version)
            if enc.kind == "ternary":
                codes, lo, hi = decode(enc)
                lv = np.stack([lo, hi], 1)
                v1 = encode_ternary(codes, *lv.astype(np.float16).T, version=1)
                v2l = round_levels(lv, "ternary")
                v2 = encode_ternary(codes, v2l[:, 0], v2l[:, 1], version=2)
            else:
                codes, lv = decode(enc)
                v1 = encode_int2(codes, lv.astype(np.float16), version=1)
                v2 = encode_int2(codes, round_levels(lv, "int2"), version=2)
            assert v1.total_bits == v2.total_bits == enc.total_bits
            a["rows"] += enc.shape[0]
            a["weights"] += enc.shape[0] * enc.shape[1]
            a["matrices"] += 1
            a["v1"] += stored_bits(v1) - v1.total_bits
            a["v2"] += stored_bits(v2) - v2.total_bits
        # the shard header's entries: split over the file's matrices by kind (same for both versions)
        n = len(shard.encoded)
        for enc in shard.encoded.values():
            acc[enc.kind]["entries"] += 8 * entries / n
    return {k: {"matrices": a["matrices"], "rows": a["rows"], "stored_versions": sorted(a["versions_read"]),
                "v1_noncode_bits_per_row": a["v1"] / a["rows"],
                "v2_noncode_bits_per_row": a["v2"] / a["rows"],
                "v1_noncode_bits_per_weight": a["v1"] / a["weights"],
                "v2_noncode_bits_per_weight": a["v2"] / a["weights"],
                "shard_entry_bits_per_row": a["entries"] / a["rows"]} for k, a in acc.items()}


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
        if not m["matrices"]:
            print(f"| {d} | 0 (no ternary matrix) | | | | | | |")
            continue
        s = m["stream_over_h0"]
        z = m["row_zero_fraction_p5_p50_p95"]
        print(
            f"| {d} | {m['matrices']} | {m['h0_bits_per_weight']:.4f} | {m['stream_bits_per_weight']:.4f} | "
            f"{s['all']:.4f} ({s['min']:.4f} / {s['median']:.4f} / {s['p95']:.4f} / {s['max']:.4f}) | "
            f"{s['matrices_over_1.03']} | {m['array_metadata_bits_per_weight']:.3f} | "
            f"{z[0]:.2f} / {z[1]:.2f} / {z[2]:.2f} |"
        )
        print(f"  worst matrix: {s['worst_matrix']}", flush=True)
    print()
    print("| output | kind | matrices | rows | stored as | non-code bits/row v1 | v2 | v2/v1 | "
          "non-code bits/weight v1 | v2 | shard entries bits/row (both) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d, m in zip(args.dirs, results, strict=True):
        m["versions"] = versions(Path(d))
        for kind, v in m["versions"].items():
            stored = "+".join(f"v{x}" for x in v["stored_versions"])
            print(f"| {d} | {kind} | {v['matrices']} | {v['rows']} | {stored}"
                  f" | {v['v1_noncode_bits_per_row']:.1f} | {v['v2_noncode_bits_per_row']:.1f} | "
                  f"{v['v2_noncode_bits_per_row'] / v['v1_noncode_bits_per_row']:.3f} | "
                  f"{v['v1_noncode_bits_per_weight']:.4f} | {v['v2_noncode_bits_per_weight']:.4f} | "
                  f"{v['shard_entry_bits_per_row']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
