"""What int8 non-expert weights (``qmoe.load(..., int8_weights=True)``) cost in loss, paired on identical
tokens.

    python benchmarks/int8_quality.py DIR [DIR ...] [--splits validation test pydoc] [--samples 256]
        [--json FILE]

Each DIR is a compressed model (typically the same recipe at several calibration seeds). For each DIR and
split, the same evaluation samples (``qmoe.evaluation``: 256 windows per split, sample seed 1234) are
scored by the default load (the checkpoint's 16-bit non-expert weights, computed exactly) and by the int8
load, and the loss increase ``sum(int8 - default) / tokens`` is reported with its paired 95% interval over
samples (``qmoe.evaluation.paired_delta``). The last rows pool the directories: the mean increase over
them, with an interval that adds the spread between directories to the mean paired interval
(``sqrt(mean h^2 / S + (1.96 sd / sqrt S)^2)``, as benchmarks/quality.py combines seeds). The int8 rounding
involves no calibration, so the directories differ only in their experts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--splits", nargs="+", default=["validation", "test", "pydoc"])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    import qmoe
    from qmoe.evaluation import DEFAULT_SEED, eval_samples, eval_texts, paired_delta, sample_losses

    torch.manual_seed(0)
    rows: list[dict] = []
    for d in args.dirs:
        tok = AutoTokenizer.from_pretrained(str(d))
        models = {"default": qmoe.load(d), "int8": qmoe.load(d, int8_weights=True)}
        for split in args.splits:
            _, texts = eval_texts(split, None)
            _, arrays = eval_samples(models["default"], tok, texts, args.samples, DEFAULT_SEED)
            per = {k: sample_losses(m, arrays) for k, m in models.items()}
            delta, h = paired_delta(per["default"][:, 0], per["int8"][:, 0], per["default"][:, 1])
            base = float(per["default"][:, 0].sum() / per["default"][:, 1].sum())
            rows.append({"dir": str(d), "split": split, "loss_default": base, "delta": delta, "ci95": h,
                         "tokens": int(per["default"][:, 1].sum())})
            print(f"{d.name:40s} {split:10s} default {base:.4f}  int8 - default {delta:+.5f} +- {h:.5f}",
                  flush=True)
    print("\n| split | directories | default loss | int8 - default (nats/token) |\n|---|---|---|---|")
    pooled = {}
    for split in args.splits:
        rs = [r for r in rows if r["split"] == split]
        ds = [r["delta"] for r in rs]
        mean = statistics.fmean(ds)
        sd = statistics.stdev(ds) if len(ds) > 1 else 0.0
        h_samples = statistics.fmean(r["ci95"] ** 2 for r in rs) / len(rs)
        h = math.sqrt(h_samples + (1.96 * sd / math.sqrt(len(rs))) ** 2)
        pooled[split] = {"delta": mean, "ci95": h, "n": len(rs)}
        print(f"| {split} | {len(rs)} | {statistics.fmean(r['loss_default'] for r in rs):.4f} | "
              f"{mean:+.5f} +- {h:.5f} |")
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "pooled": pooled}, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
