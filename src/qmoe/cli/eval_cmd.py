"""qmoe eval: the span-corruption (or LM) loss of a dense or compressed model."""

from __future__ import annotations

import argparse
import json
import sys

from qmoe.cli._args import add_device_arguments

NAME = "eval"
HELP = "loss of a model (built-in name, HF directory, or qmoe-compressed directory) on a text split"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="built-in model name (tiny-switch, tiny-qwen3-moe) or a local model "
                   "directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--split", default="validation", choices=["train", "calibration", "validation", "test",
                                                                  "pydoc"],
                       help="built-in evaluation text (held-out Bible books, or Python's pydoc topics)")
    which.add_argument("--data", metavar="FILE",
                       help="your own .txt (blank-line separated) or .jsonl (text) file, or a Hugging Face "
                            "dataset name (needs the hub and the datasets package)")
    p.add_argument("--samples", type=int, default=256, help="number of evaluation segments (default 256)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed of the evaluation segments")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    from qmoe.errors import ConfigError
    from qmoe.evaluation import evaluate

    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    res = evaluate(args.source, split=None if args.data else args.split, data=args.data, samples=args.samples,
                   seed=args.seed, batch_size=args.batch_size, progress=sys.stderr.isatty() or not args.json,
                   device=args.device, backend=args.backend)
    if args.json:
        print(json.dumps({"source": str(args.source), **res.to_dict()}))
    else:
        print(f"{args.source}: {res.objective} loss {res.loss:.4f} (perplexity {res.perplexity:.2f}) on "
              f"{res.split}: {res.samples} samples, {res.tokens} target tokens")
    return 0
