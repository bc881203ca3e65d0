"""``qmoe compress``: translate the options into a ``CompressConfig`` and call ``qmoe.compress``."""

from __future__ import annotations

import argparse
import os

NAME = "compress"
HELP = (
    "Compress a Mixture-of-Experts checkpoint below 1 bit per parameter: stream it block by block, "
    "calibrate, GPTQ-quantize every expert and entropy-code it (QMoE). On several processes: "
    "torchrun --nproc-per-node M -m qmoe compress ... (same output bytes). Supported families: qmoe families."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qmoe.config import TUNES, CompressConfig
    from qmoe.recipes import RECIPES

    d = CompressConfig()
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="built-in model name (tiny-switch, tiny-qwen3-moe) or a local Hugging Face "
        "model directory (safetensors, sharded or not, or pytorch_model*.bin)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory (new or empty; rerunning the same command on an unfinished DIR resumes it)",
    )
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        default="default",
        help="the quantization settings to start from: qmoe's default, or QMoE's (Frantar & Alistarh 2023: "
        "nearest rounding on the min/max ternary grid, 10%% dampening, token cap 4); the options below "
        "override single settings (default: %(default)s)",
    )
    p.add_argument(
        "--target-bits",
        type=float,
        default=None,
        metavar="B",
        help="size knob: per expert matrix group, search the bit price (below the grid's own size) or the "
        "level scale (above it) so that the stored expert bits/weight (every byte counted) land on B, "
        "e.g. 1.2 (ternary only)",
    )
    p.add_argument(
        "--allocation",
        choices=("uniform", "global"),
        default=None,
        help="how --target-bits is spent: 'uniform' lands every expert matrix group on B; 'global' spends B "
        "over the whole model at one price per bit in nats of loss (measured per layer and expert), so the "
        "experts and layers that matter get more bits (default recipe: uniform)",
    )
    p.add_argument(
        "--no-drop-experts",
        action="store_true",
        help="with --allocation global: never drop an expert (by default the budget may give an expert no "
        "weights, and its router then never chooses it)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="price of one coded bit in each rounding decision (entropy-constrained rounding); 0: nearest "
        f"rounding, higher: smaller and coarser (default recipe: {d.rate})",
    )
    p.add_argument(
        "--level-scale",
        type=float,
        default=None,
        metavar="S",
        help="multiply the grid's levels by S before quantizing; below 1: more, smaller nonzero codes "
        f"(more bits, less error) (default recipe: {d.level_scale})",
    )
    p.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"re-solve each row's levels for its final codes by Hessian least squares, keeping the row's "
        f"output energy (default recipe: {'on' if d.refit else 'off'})",
    )
    p.add_argument(
        "--row-prices",
        choices=("auto", "relative", "output"),
        default=None,
        help="a bit's price from row to row: relative to the row's own size, or one price per matrix in "
        "units of the expert's output error (first-projection rows weighted by their measured output "
        "sensitivity); auto: output with --allocation global, else relative "
        f"(default recipe: {d.row_prices})",
    )
    p.add_argument(
        "--tune",
        choices=TUNES,
        default=None,
        help="fit each compressed block's norm and attention weights (norms: the norm weights alone) to the "
        "original model's hidden states on the calibration text, the attention judged on held-out samples "
        f"(no bits; stored as before), or keep them (default recipe: {d.tune})",
    )
    p.add_argument(
        "--tune-epochs",
        type=int,
        default=None,
        help=f"passes over the calibration samples when tuning (default recipe: {d.tune_epochs})",
    )
    p.add_argument(
        "--tune-samples",
        type=int,
        default=None,
        help=f"calibration samples the tuning uses, the first ones (default recipe: {d.tune_samples})",
    )
    p.add_argument(
        "--tune-lr",
        type=float,
        default=None,
        help=f"Adam learning rate of the norm tuning (default recipe: {d.tune_lr})",
    )
    p.add_argument(
        "--bits",
        choices=("ternary", "2"),
        default=None,
        help=f"ternary {{lo, 0, hi}} per row, entropy coded (QMoE), or 2-bit (default: {d.bits})",
    )
    p.add_argument(
        "--shared-experts",
        choices=("keep", "ternary", "2"),
        default=None,
        help="shared experts (Qwen2-MoE, DeepSeek-V3, GLM-4-MoE: the MLP every token uses): keep them as "
        "stored, or quantize them at ternary or 2 bits with Hessians from every token (default: keep)",
    )
    p.add_argument(
        "--method",
        choices=("gptq", "rtn"),
        default=None,
        help=f"GPTQ with per-expert Hessians, or round-to-nearest (default: {d.method})",
    )
    p.add_argument(
        "--grid",
        default=None,
        help="quantization grid: ternary (QMoE's min/max levels) or "
        "ternary-opt (error-minimising levels) for --bits ternary; int2 for --bits 2",
    )
    p.add_argument(
        "--calib-data",
        default=d.calib_data,
        metavar="SRC",
        help="calibration text: a split name, pydoc, or a .txt/.jsonl file (default: %(default)s)",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=d.calib_samples,
        metavar="N",
        help="calibration samples (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=d.seq_len,
        metavar="L",
        help="tokens per sample for decoder-only models (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (default: %(default)s)")
    p.add_argument(
        "--token-cap",
        type=float,
        default=None,
        metavar="X",
        help=f"at most X times the mean tokens per expert enter its Hessian; 0: no cap "
        f"(default: {d.token_cap})",
    )
    p.add_argument(
        "--min-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"experts with fewer calibration tokens are rounded to nearest (default: {d.min_tokens})",
    )
    p.add_argument(
        "--damp",
        type=float,
        default=None,
        help=f"GPTQ dampening, relative to the mean Hessian diagonal (default: {d.damp})",
    )
    p.add_argument(
        "--block-size", type=int, default=None, help=f"GPTQ lazy-batch columns (default: {d.block_size})"
    )
    p.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPTQ: quantize columns by decreasing Hessian diagonal",
    )
    p.add_argument(
        "--keep-capacity",
        action="store_true",
        help="calibrate with the router's own expert capacity (tokens beyond it are dropped) instead of "
        "lifting it",
    )
    p.add_argument(
        "--keep-sentinels",
        action="store_true",
        help="let span-corruption sentinel positions into the Hessians (both recipes leave them out)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the validation loss before/after")
    p.add_argument(
        "--eval-data",
        nargs="+",
        default=list(d.eval_data),
        metavar="SRC",
        help="evaluation texts; the first is the report's eval (default: %(default)s)",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=d.eval_samples,
        metavar="N",
        help="evaluation samples per set (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="samples per forward pass (default: %(default)s)"
    )
    p.add_argument(
        "--device",
        default=None,
        help="where forward passes and GPTQ run: cpu, cuda, cuda:N "
        "(default: cuda if available); activations stay in CPU memory",
    )
    p.add_argument(
        "--buffer-gb",
        type=float,
        default=None,
        metavar="GB",
        help="activations kept in RAM before "
        "spilling to a disk memmap (default: half the free RAM, at most 8)",
    )
    p.add_argument(
        "--dry-run",
        nargs="?",
        type=int,
        const=1,
        default=None,
        metavar="RANKS",
        help="print the plan (every MoE block's matrices, the experts each of RANKS processes holds, the "
        "memory and disk the run needs) after the checks, and stop: nothing is quantized or written",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-layer table")
    p.add_argument("--verbose", action="store_true",
                   help="also a bar (or, outside a terminal, a line) for each pass through a block")


def run(args: argparse.Namespace) -> int:
    from qmoe.config import CompressConfig
    from qmoe.errors import ConfigError
    from qmoe.pipeline import compress
    from qmoe.pipeline.report import summary
    from qmoe.progress import Progress
    from qmoe.recipes import recipe_settings

    given = {
        "bits": args.bits,
        "method": args.method,
        "grid": args.grid,
        "token_cap": args.token_cap,
        "min_tokens": args.min_tokens,
        "damp": args.damp,
        "block_size": args.block_size,
        "act_order": args.act_order,
        "rate": args.rate,
        "level_scale": args.level_scale,
        "target_bits": args.target_bits,
        "allocation": args.allocation,
        "drop_experts": False if args.no_drop_experts else None,
        "refit": args.refit,
        "row_prices": args.row_prices,
        "tune": args.tune,
        "tune_epochs": args.tune_epochs,
        "tune_lr": args.tune_lr,
        "tune_samples": args.tune_samples,
        "shared_experts": args.shared_experts,
        "no_drop": False if args.keep_capacity else None,
        "skip_sentinels": False if args.keep_sentinels else None,
    }
    settings = recipe_settings(args.recipe)
    if args.bits is not None and args.grid is None and args.bits != settings["bits"]:
        settings["grid"] = None  # the other width's default grid
    config = CompressConfig(
        **{**settings, **{k: v for k, v in given.items() if v is not None}},
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        eval=not args.no_eval,
        eval_data=tuple(args.eval_data),
        eval_samples=args.eval_samples,
        batch_size=args.batch_size,
    )
    if args.dry_run is not None:
        from qmoe.pipeline import dry_run
        from qmoe.pipeline.dryrun import format_plan

        if args.dry_run < 1:
            raise ConfigError(f"--dry-run {args.dry_run}: the number of ranks must be at least 1")
        print(format_plan(dry_run(args.source, args.out, config, ranks=args.dry_run)))
        return 0
    progress = Progress(enabled=not args.quiet, verbose=args.verbose)
    report = compress(
        args.source, args.out, config, device=args.device, buffer_gb=args.buffer_gb, progress=progress
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the job
        # The live table already showed the layers unless --quiet.
        print(summary(report, table=args.quiet))
        print(f"wrote {args.out}")
    return 0
