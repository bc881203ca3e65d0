"""Sensitivity report of the built-in models: how much of each model's quality lives in its experts.

For every model: validation and test loss, the unigram baseline, and the validation loss after damaging the
experts in ways that bound what a compression recipe can do to them:

- every expert weight set to zero (the experts' whole contribution);
- each MoE layer's experts replaced by their mean (what is specific to each expert);
- round-to-nearest ternary on every expert, QMoE's per-row ``{min(row, 0), 0, max(row, 0)}`` grid;
- round-to-nearest 2-bit (asymmetric min-max per row), for scale;
- (Switch) each sample given another sample's encoder input (does the decoder use the encoder?);
- (decoder-only) the quarter of each layer's experts that the router chooses least often on the validation
  samples zeroed (are there near-dead experts a compression recipe could drop for free?), and the routing
  balance: the least-chosen expert's share of the mean, per layer.

Each damaged variant is compared with the intact model on identical samples: the report gives the mean
per-token loss increase and a 95% interval from the per-sample paired differences.

    python benchmarks/testbed.py                   # both built-ins, 256 validation samples
    python benchmarks/testbed.py --write-docs      # also rewrite the table in docs/testbeds.md

Writes ``docs/testbeds.json`` (machine, versions, command, every number).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qmoe.calib import load_texts
from qmoe.evaluation import DEFAULT_SAMPLES, DEFAULT_SEED, eval_samples, sample_losses, unigram_baseline
from qmoe.grids import get_grid
from qmoe.sources import BUILTINS, load_model

ROOT = Path(__file__).resolve().parents[1]
MARK_BEGIN, MARK_END = "<!-- testbed:begin -->", "<!-- testbed:end -->"


def expert_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """Expert weights grouped by (MoE layer, projection): each group is one stack of same-shape matrices.

    Switch keeps one Linear per expert (``...mlp.experts.expert_3.wi.weight``, 2-D); transformers-5 decoder
    MoEs hold one fused 3-D tensor per projection (``...mlp.experts.gate_up_proj`` ``[E, 2I, H]``).
    """
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if ".experts." not in name or "bias" in name:
            continue
        key = re.sub(r"\.expert_\d+\.", ".expert_*.", name)
        groups.setdefault(key, []).append(p)
    return groups


def stacked(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """[E, rows, cols] float32 copy of a group."""
    if len(params) == 1 and params[0].dim() == 3:
        return params[0].detach().float().clone()
    return torch.stack([p.detach().float() for p in params])


def assign(params: list[torch.nn.Parameter], w: torch.Tensor) -> None:
    with torch.no_grad():
        if len(params) == 1 and params[0].dim() == 3:
            params[0].copy_(w)
        else:
            for p, we in zip(params, w, strict=True):
                p.copy_(we)


def rtn(grid_name: str):
    grid = get_grid(grid_name)

    def apply(w: torch.Tensor) -> torch.Tensor:  # [E, rows, cols], levels fitted per row
        levels = grid.fit(w)
        return grid.dequantize(grid.quantize(w, levels), levels)

    return apply


DAMAGE = {
    "experts zeroed": lambda w: torch.zeros_like(w),
    "experts replaced by their layer's mean": lambda w: w.mean(0, keepdim=True).expand_as(w).clone(),
    "RTN ternary, per-row {min,0,max} (QMoE's grid)": rtn("ternary"),
    "RTN 2-bit, per-row min-max": rtn("int2"),
}


@torch.no_grad()
def routing_counts(model, val: tuple[np.ndarray, ...], batch: int = 32) -> list[np.ndarray]:
    """Per MoE layer, how often the router chose each expert on ``val`` (decoder-only models)."""
    k = model.config.num_experts_per_tok
    counts: list[np.ndarray] = []
    for i in range(0, len(val[0]), batch):
        out = model(input_ids=torch.from_numpy(val[0][i : i + batch]), output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):  # [T, E]
            c = np.bincount(
                torch.topk(logits, k, dim=-1).indices.flatten().numpy(), minlength=logits.shape[-1]
            )
            if layer == len(counts):
                counts.append(c)
            else:
                counts[layer] += c
    return counts


def zero_least_used(
    groups: dict[str, list[torch.nn.Parameter]],
    originals: dict[str, torch.Tensor],
    counts: list[np.ndarray],
    fraction: float = 0.25,
) -> None:
    """Zero the ``fraction`` of each layer's experts with the fewest routed tokens (fused 3-D experts)."""
    for key, g in groups.items():
        layer = int(re.search(r"layers\.(\d+)\.", key).group(1))
        c = counts[layer]
        drop = np.argsort(c, kind="stable")[: int(len(c) * fraction)]
        w = originals[key].clone()
        w[torch.from_numpy(drop)] = 0
        assign(g, w)


def mean_loss(per: np.ndarray) -> float:
    """Token-mean loss of ``sample_losses`` output [N, 2] (summed loss, tokens)."""
    return float(per[:, 0].sum() / per[:, 1].sum())


def paired(base: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Mean per-token loss of ``other`` minus ``base`` (same samples), with a 95% interval over samples."""
    d = other[:, 0] / other[:, 1] - base[:, 0] / base[:, 1]  # equal token counts per sample
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return {"loss": mean_loss(other), "delta": float(d.mean()), "ci95": float(half)}


def report(name: str, samples: int) -> dict:
    t0 = time.time()
    model, tokenizer, _ = load_model(name)
    val_obj, val = eval_samples(model, tokenizer, load_texts("validation"), samples, DEFAULT_SEED)
    _, test = eval_samples(model, tokenizer, load_texts("test"), samples, DEFAULT_SEED)
    base = sample_losses(model, val)
    groups = expert_groups(model)
    res: dict = {
        "model": name,
        "objective": val_obj,
        "samples": samples,
        "tokens": int(base[:, 1].sum()),
        "params": sum(p.numel() for p in model.parameters()),
        "expert_params": sum(p.numel() for g in groups.values() for p in g),
        "val": mean_loss(base),
        "test": mean_loss(sample_losses(model, test)),
        "unigram": unigram_baseline(tokenizer, val_obj, val),
        "variants": {},
    }
    if len(val) == 2:  # encoder-decoder: another sample's encoder input; rolling keeps every target
        res["variants"]["another sample's encoder input"] = paired(
            base, sample_losses(model, (np.roll(val[0], 1, axis=0), val[1]))
        )
    originals = {k: stacked(g) for k, g in groups.items()}
    if len(val) == 1 and hasattr(model.config, "num_experts_per_tok"):  # decoder-only: routing balance
        counts = routing_counts(model, val)
        res["min_share"] = [float(c.min() / c.mean()) for c in counts]
        res["routed_share_of_least_used_quarter"] = [
            float(np.sort(c)[: len(c) // 4].sum() / c.sum()) for c in counts
        ]
        zero_least_used(groups, originals, counts)
        res["variants"]["least-used quarter of each layer's experts zeroed"] = paired(
            base, sample_losses(model, val)
        )
        for k, g in groups.items():
            assign(g, originals[k])
    for label, fn in DAMAGE.items():
        for k, g in groups.items():
            assign(g, fn(originals[k]))
        res["variants"][label] = paired(base, sample_losses(model, val))
        for k, g in groups.items():
            assign(g, originals[k])
    res["seconds"] = time.time() - t0
    return res


def markdown(results: list[dict]) -> str:
    lines = ["| | " + " | ".join(f"`{r['model']}`" for r in results) + " |", "|---|" + "---|" * len(results)]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("objective", [r["objective"] for r in results])
    row(
        "parameters (experts)",
        [f"{r['params'] / 1e6:.1f} M ({r['expert_params'] / r['params']:.0%})" for r in results],
    )
    row("validation loss", [f"**{r['val']:.3f}**" for r in results])
    row("test-book loss", [f"{r['test']:.3f} ({r['test'] - r['val']:+.3f})" for r in results])
    row("unigram baseline", [f"{r['unigram']:.3f} (val = {r['val'] / r['unigram']:.2f}x)" for r in results])
    row(
        "least-chosen expert's share of the mean, per layer",
        [", ".join(f"{v:.2f}" for v in r["min_share"]) if "min_share" in r else "n/a" for r in results],
    )
    labels = list(dict.fromkeys(k for r in results for k in r["variants"]))
    for label in labels:
        cells = []
        for r in results:
            v = r["variants"].get(label)
            cells.append(f"{v['loss']:.3f} (**{v['delta']:+.3f}** ± {v['ci95']:.3f})" if v else "n/a")
        row(label, cells)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(BUILTINS))
    ap.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "docs/testbeds.json"))
    ap.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/testbeds.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [report(m, args.samples) for m in args.models]
    table = markdown(results)
    print(table)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "results": results,
    }
    Path(args.json).write_text(json.dumps(meta, indent=1))
    if args.write_docs:
        doc = ROOT / "docs/testbeds.md"
        text = doc.read_text()
        i, j = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
        doc.write_text(text[:i] + "\n" + table + "\n" + text[j:])
        print(f"rewrote the table in {doc}")


if __name__ == "__main__":
    main()
