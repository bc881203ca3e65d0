"""qmoe generate: greedy text from a dense or compressed model, with its speed."""

from __future__ import annotations

import argparse
import sys

from qmoe.cli._args import add_device_arguments

NAME = "generate"
HELP = "generate text from a model (built-in name, HF directory, or qmoe-compressed directory) and time it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="built-in model name (tiny-switch, tiny-qwen3-moe), a model directory or a "
                   "compressed one")
    p.add_argument("--prompt", required=True, help="input text (for T5-style models: the encoder input)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="stop after N generated tokens (default %(default)s), or earlier at end of sequence")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    from qmoe.errors import ConfigError
    from qmoe.runtime.generate import generate
    from qmoe.sources import load_model

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer, _ = load_model(args.source, device=args.device, backend=args.backend)
    # One untimed token first: the first call pays one-off costs (kernel tables, compiled-code loading)
    # that would otherwise dominate the tokens/s of a short generation.
    generate(model, tokenizer, args.prompt, max_new_tokens=1)
    g = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    print(g.text)
    print(f"{g.new_tokens} tokens in {g.seconds:.2f} s: {g.tokens_per_s:.1f} tokens/s "
          f"(prompt {g.prompt_tokens} tokens)", file=sys.stderr)
    return 0
