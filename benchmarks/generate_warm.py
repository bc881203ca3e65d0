"""Warm, in-process timing of a dense model against its compressed directory: the reference that
``qmoe generate DIR --compare`` is checked against (issue 27: its ratio within 20% of this one).

Independent of qmoe's own timing code (``qmoe.runtime.generate``): ``model.generate`` timed directly with
``perf_counter``, ``--warmup`` untimed calls per model first (default 5, against the CLI's one), then
``--rounds`` interleaved rounds (default 10), exactly ``--new-tokens`` tokens per call. Prints the median and
the minimum ratio compressed / dense time and writes every call's time as JSON.

    python benchmarks/generate_warm.py tiny-switch tiny-switch-qmoe \\
        --prompt "And God said, Let there be <extra_id_0>: and there was light."
    python benchmarks/generate_warm.py tiny-qwen3-moe tiny-qwen3-moe-qmoe \\
        --prompt "In the beginning God created"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dense", help="built-in name or dense model directory")
    ap.add_argument("compressed", help="its qmoe-compressed directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=None, metavar="FILE", help="write every call's time here")
    args = ap.parse_args()

    import torch

    from qmoe.sources import load_model

    models = [load_model(name)[:2] for name in (args.dense, args.compressed)]

    def call(model, tokenizer) -> float:  # noqa: ANN001
        enc = tokenizer(args.prompt, return_tensors="pt")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=pad)
            return time.perf_counter() - t0

    for _ in range(args.warmup):
        for m, tok in models:
            call(m, tok)
    times: list[list[float]] = [[], []]
    for _ in range(args.rounds):
        for i, (m, tok) in enumerate(models):
            times[i].append(call(m, tok))
    dense, comp = times
    med = statistics.median(comp) / statistics.median(dense)
    print(f"{args.compressed} / {args.dense} time, {args.new_tokens} tokens, {args.warmup} warm-up calls, "
          f"{args.rounds} interleaved rounds: median {med:.2f}x, min {min(comp) / min(dense):.2f}x "
          f"(dense median {statistics.median(dense):.3f} s, compressed {statistics.median(comp):.3f} s; "
          f"load average {os.getloadavg()[0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "machine": platform.machine(), "cpus": os.cpu_count(),
                       "load_average": os.getloadavg(), "dense_s": dense, "compressed_s": comp,
                       "ratio_median": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
