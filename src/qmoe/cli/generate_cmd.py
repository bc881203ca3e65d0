"""qmoe generate: greedy text from a dense or compressed model, with its speed measured honestly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qmoe.cli._args import add_device_arguments

NAME = "generate"
HELP = "generate text from a model (built-in name, HF directory, or qmoe-compressed directory) and time it"
REPORT_FILE = "qmoe_report.json"  # qmoe.pipeline.report.REPORT_FILE; not imported, it would load torch early


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="built-in model name (tiny-switch, tiny-qwen3-moe), a model directory or a "
                   "compressed one")
    p.add_argument("--prompt", required=True, help="input text (for T5-style models: the encoder input)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="stop after N generated tokens (default %(default)s), or earlier at end of sequence")
    p.add_argument("--repeats", type=int, default=3, metavar="R",
                   help="timed calls per model after one untimed warm-up call, whose time (compilation, "
                   "first-touch costs) is shown apart; the median is reported (default %(default)s)")
    p.add_argument("--compare", nargs="?", const="", default=None, metavar="DENSE",
                   help="for a compressed SOURCE: also run the uncompressed model (default: the source "
                   "named in its qmoe_report.json) on the same prompt, timed in the same process, calls "
                   "interleaved")
    add_device_arguments(p)


def _dense_source(compressed: Path, given: str) -> str:
    """The uncompressed model to compare with: ``given``, else the source recorded at compression."""
    from qmoe.errors import SourceError

    if given:
        return given
    try:
        source = json.loads((compressed / REPORT_FILE).read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{compressed / REPORT_FILE} does not name the source model "
                          f"({type(exc).__name__}); pass it: --compare DENSE_DIR") from exc
    return str(source)


def run(args: argparse.Namespace) -> int:
    from qmoe.errors import ConfigError, SourceError
    from qmoe.runtime.generate import describe, generate, time_interleaved
    from qmoe.sources import is_compressed, load_model, read_config, resolve_source

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    names = [args.source]
    if args.compare is not None:
        path = resolve_source(args.source)
        if not is_compressed(read_config(path)):
            raise SourceError(f"--compare needs a qmoe-compressed SOURCE; {args.source} is dense (pass the "
                              "compressed directory, e.g. qmoe generate tiny-switch-qmoe --compare)")
        names.insert(0, _dense_source(path, args.compare))
    # --int8-weights: the compressed model's (the last one), never the dense one it is compared with
    loaded = [load_model(name, device=args.device, backend=args.backend,
                         int8_weights=args.int8_weights and i == len(names) - 1)[:2]
              for i, name in enumerate(names)]

    def call(model, tokenizer):  # noqa: ANN001, ANN202 - a closure per model
        # exact: every call (and every model) generates the same number of tokens, so their times compare.
        return lambda: generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                                exact=len(names) > 1)

    timed = time_interleaved([call(m, t) for m, t in loaded], args.repeats)
    width = max(len(str(n)) for n in names)
    for name, t in zip(names, timed, strict=True):
        print(f"{str(name) + ':':<{width + 1}} {t.runs[-1].text}" if len(names) > 1 else t.runs[-1].text)
    how = "after an untimed warm-up call" + (", calls interleaved" if len(names) > 1 else "")
    print(f"median of {args.repeats} call{'s' if args.repeats > 1 else ''} {how}; "
          f"prompt {timed[0].runs[0].prompt_tokens} tokens:", file=sys.stderr)
    for name, (model, _), t in zip(names, loaded, timed, strict=True):
        print(f"  {name}: {t.runs[0].new_tokens} tokens in {t.seconds:.3f} s: {t.tokens_per_s:.1f} tokens/s "
              f"[{describe(model)}] (first call {t.first.seconds:.2f} s)", file=sys.stderr)
    if len(names) > 1:
        ratio = timed[1].seconds / timed[0].seconds if timed[0].seconds > 0 else float("inf")
        print(f"  compressed / dense time: {ratio:.2f}x", file=sys.stderr)
    return 0
