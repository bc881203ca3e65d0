"""qmoe eval: the span-corruption (or LM) loss of a dense or compressed model; with ``--tasks``, tasks of
EleutherAI's lm-evaluation-harness, a compressed model paired with its dense reference."""

from __future__ import annotations

import argparse
import json
import sys

from qmoe.cli._args import add_device_arguments

NAME = "eval"
HELP = ("loss of a model (built-in name, HF directory, or qmoe-compressed directory) on a text split, or its "
        "lm-evaluation-harness scores (--tasks)")
EPILOG = """\
lm-evaluation-harness (pip install 'qmoe[lm-eval]'):
  qmoe eval COMPRESSED_DIR --tasks hellaswag,arc_easy --limit 500
scores the compressed model and its dense source (recorded in COMPRESSED_DIR/qmoe_report.json, or
--reference DIR) on identical requests and prints per task and metric: dense, compressed, and the difference
with its standard error, paired over the items. Any other lm_eval.simple_evaluate option goes in
--lm-eval-args KEY=VALUE,... (e.g. num_fewshot=5,bootstrap_iters=0), any HFLM model option in --model-args
(e.g. max_length=512). The offline task qmoe_bible_next (which verse comes next, held-out Bible books) needs
no download; --include-path DIR adds your own task YAMLs."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("source", help="built-in model name (tiny-switch, tiny-qwen3-moe) or a local model "
                   "directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--split", default=None, choices=["train", "calibration", "validation", "test",
                                                          "pydoc"],
                       help="built-in evaluation text (held-out Bible books, or Python's pydoc topics; "
                            "default validation)")
    which.add_argument("--data", metavar="FILE",
                       help="your own .txt (blank-line separated) or .jsonl (text) file, or a Hugging Face "
                            "dataset name (needs the hub and the datasets package)")
    p.add_argument("--samples", type=int, default=256, help="number of evaluation segments (default 256)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed of the evaluation segments")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_device_arguments(p)
    h = p.add_argument_group("lm-evaluation-harness (with --tasks)")
    h.add_argument("--tasks", metavar="T1,T2", help="comma-separated lm-eval task or group names (e.g. "
                   "hellaswag,arc_easy,mmlu, or qmoe_bible_next offline); selects the harness, not the "
                   "loss")
    h.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction of them if below 1); default all")
    h.add_argument("--reference", metavar="DIR", help="the dense model a compressed source is compared with "
                   "(default: the source recorded in its qmoe_report.json)")
    h.add_argument("--no-reference", action="store_true", help="score a compressed source alone")
    h.add_argument("--include-path", metavar="DIR", action="append", default=[],
                   help="a folder of your own task YAMLs (repeatable)")
    h.add_argument("--lm-eval-args", metavar="K=V,...", help="further lm_eval.simple_evaluate options, e.g. "
                   "num_fewshot=5,bootstrap_iters=0,fewshot_random_seed=1")
    h.add_argument("--model-args", metavar="K=V,...", help="further options of lm-eval's HFLM model wrapper, "
                   "e.g. max_length=512,add_bos_token=True")


def run(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return run_harness(args)
    from qmoe.errors import ConfigError
    from qmoe.evaluation import evaluate

    harness_only = [f for f, v in (("--limit", args.limit), ("--reference", args.reference),
                                   ("--no-reference", args.no_reference),
                                   ("--include-path", args.include_path),
                                   ("--lm-eval-args", args.lm_eval_args), ("--model-args", args.model_args))
                    if v]
    if harness_only:
        raise ConfigError(f"{', '.join(harness_only)} only apply with --tasks (lm-evaluation-harness)")
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    res = evaluate(args.source, split=None if args.data else args.split or "validation", data=args.data,
                   samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                   progress=sys.stderr.isatty() or not args.json, device=args.device, backend=args.backend,
                   int8_weights=args.int8_weights)
    if args.json:
        print(json.dumps({"source": str(args.source), **res.to_dict()}))
    else:
        print(f"{args.source}: {res.objective} loss {res.loss:.4f} (perplexity {res.perplexity:.2f}) on "
              f"{res.split}: {res.samples} samples, {res.tokens} target tokens")
    return 0


def run_harness(args: argparse.Namespace) -> int:
    from qmoe.errors import ConfigError
    from qmoe.harness.compare import format_table
    from qmoe.harness.run import HarnessConfig, parse_args_string, run_harness

    if args.split or args.data:
        raise ConfigError("--split/--data choose the text of the loss evaluation; with --tasks the lm-eval "
                          "tasks bring their own data (drop --split/--data)")
    if args.reference and args.no_reference:
        raise ConfigError("--reference and --no-reference contradict each other; pass one")
    config = HarnessConfig(
        tasks=tuple(t.strip() for t in args.tasks.split(",")), batch_size=args.batch_size, limit=args.limit,
        include_path=tuple(args.include_path), options=parse_args_string(args.lm_eval_args, "--lm-eval-args"),
        model_args=parse_args_string(args.model_args, "--model-args"))
    res = run_harness(args.source, config, reference=args.reference, compare_reference=not args.no_reference,
                      device=args.device, backend=args.backend, int8_weights=args.int8_weights)
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0
    if res.reference is not None:
        print(f"{res.source} (compressed) vs {res.reference} (dense): {res.requests} identical requests, "
              f"lm-eval {res.lm_eval_version}; difference = compressed - dense, ± its standard error paired "
              "over the items")
    else:
        print(f"{res.source}: lm-eval {res.lm_eval_version}; ± the harness's standard error")
    print(format_table(list(res.rows)))
    return 0
