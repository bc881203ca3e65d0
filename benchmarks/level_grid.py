"""How coarse may version 2's level grid be? Rounding error and stored bits per row against fp16 levels.

    python benchmarks/level_grid.py [--models tiny-switch tiny-qwen3-moe] [--steps 4 6 8 12 16 32]

For every expert matrix of the built-in models: fit the grid's levels per row (ternary: QMoE's min/max;
int2: min-max with a zero point), round them to fp16 (format 1) or onto the version-2 grid with S steps per
octave (``qmoe.codec.levels``), round every weight to its row's nearest level, and compare the squared error
``||W - Q||^2`` with fp16's. Also prints the bits per row the version-2 level fields take at each S (fixed
width per matrix, as ``qmoe.codec.format2`` stores them). Round to nearest, no Hessian: a proxy for what the
grid's step costs GPTQ, which sees the same levels.

With ``--lloyd``, a second table: the 2-bit grid against non-uniform levels per row (Lloyd-Max from the
min-max grid, 4 free levels, unweighted), round to nearest: squared error, the codes' zeroth-order entropy
(what the entropy coder's stream approaches) and the level bits per row each needs (format 2's int2 fields
against four magnitudes on the same S = 8 grid with a sign each, fixed width per matrix).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def expert_weights(model: str) -> list[np.ndarray]:
    from safetensors import safe_open

    path = Path(__file__).resolve().parents[1] / "src" / "qmoe" / "models" / model / "model.safetensors"
    with safe_open(str(path), "np") as f:
        return [f.get_tensor(k).astype(np.float32) for k in sorted(f.keys()) if "expert" in k
                and f.get_slice(k).get_shape().__len__() == 2]


def width(values: np.ndarray) -> int:
    """Bits of the fixed-width field holding ``values - min``."""
    return int(values.max() - values.min()).bit_length()


def measure(mats: list[np.ndarray], kind: str, steps: list[int]) -> dict:
    from qmoe.codec import levels as lv
    from qmoe.grids import get_grid

    grid = get_grid("ternary" if kind == "ternary" else "int2")
    W = [torch.from_numpy(m)[None] for m in mats]
    err = {"fp16": 0.0, **{s: 0.0 for s in steps}}
    bits = {s: 0.0 for s in steps}
    rows = 0
    energy = 0.0
    for w in W:
        fit = grid.fit(w)  # [1, rows, L] fp16-exact
        cand = {"fp16": fit}
        for s in steps:
            if kind == "ternary":
                r = lv.round_levels(fit[0][:, [0, 2]].numpy(), "ternary", s)
                cand[s] = torch.from_numpy(np.stack([r[:, 0], np.zeros_like(r[:, 0]), r[:, 1]], -1))[None]
                e = lv.ternary_exponents(r, s)
                bits[s] += sum(width(e[:, j]) + 1 for j in range(2)) * w.shape[1]  # +1: the zero code
            else:
                cand[s] = torch.from_numpy(lv.round_levels(fit[0].numpy(), "int2", s))[None]
                e, z = lv.int2_params(cand[s][0].numpy(), s)
                bits[s] += (width(e) + width(z)) * w.shape[1]
        for key, levels in cand.items():
            q = grid.dequantize(grid.quantize(w, levels), levels)
            err[key] += float((w - q).double().square().sum())
        energy += float(w.double().square().sum())
        rows += w.shape[1]
    return {"rel_err_fp16": err["fp16"] / energy,
            **{s: (err[s] / err["fp16"], bits[s] / rows) for s in steps}}


def lloyd(w: torch.Tensor, levels: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Lloyd-Max levels ``[1, rows, 4]`` for ``w [1, rows, cols]`` from ``levels``: assign each weight to its
    nearest level, move each level to the mean of its weights (an empty level stays), repeat."""
    from qmoe.grids import get_grid

    grid = get_grid("int2")
    lv = levels.clone()
    for _ in range(iterations):
        idx = grid.quantize(w, lv).long()  # [1, rows, cols]
        for k in range(4):
            m = (idx == k).float()
            n = m.sum(-1)
            lv[..., k] = torch.where(n > 0, (w * m).sum(-1) / n.clamp(min=1), lv[..., k])
        lv = lv.sort(-1).values
    return lv


def entropy(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() * codes.size)


def measure_lloyd(mats: list[np.ndarray]) -> dict:
    from qmoe.codec import levels as lv
    from qmoe.grids import get_grid

    grid = get_grid("int2")
    err = {"uniform": 0.0, "lloyd": 0.0}
    h0 = {"uniform": 0.0, "lloyd": 0.0}
    bits = {"uniform": 0.0, "lloyd": 0.0}
    weights = rows = 0
    for m in mats:
        w = torch.from_numpy(m)[None]
        uni = torch.from_numpy(lv.round_levels(grid.fit(w)[0].numpy(), "int2"))[None]
        ll = lloyd(w, uni)
        e4 = lv._nearest_exponent(np.abs(ll[0].numpy()), 8)  # [rows, 4] magnitudes on the S = 8 grid
        ll = torch.from_numpy(np.sign(ll[0].numpy()) * lv.magnitude(e4, 8))[None].float()
        e, z = lv.int2_params(uni[0].numpy())
        bits["uniform"] += (width(e) + width(z)) * w.shape[1]
        bits["lloyd"] += sum(width(e4[:, k]) + 1 for k in range(4)) * w.shape[1]
        for key, levels in (("uniform", uni), ("lloyd", ll)):
            codes = grid.quantize(w, levels)
            err[key] += float((w - grid.dequantize(codes, levels)).double().square().sum())
            h0[key] += entropy(codes.numpy())
        weights += m.size
        rows += w.shape[1]
    return {k: (err[k], h0[k] / weights, bits[k] / rows) for k in err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-switch", "tiny-qwen3-moe"])
    ap.add_argument("--steps", nargs="+", type=int, default=[4, 6, 8, 12, 16, 32])
    ap.add_argument("--lloyd", action="store_true", help="also: 2-bit uniform vs Lloyd levels per row")
    args = ap.parse_args()
    print("| model | kind | fp16: ||W-Q||^2 / ||W||^2 | " + " | ".join(
        f"S={s}: err / fp16's, level bits/row" for s in args.steps) + " |")
    print("|---|---|---|" + "---|" * len(args.steps))
    for model in args.models:
        mats = expert_weights(model)
        for kind in ("ternary", "int2"):
            m = measure(mats, kind, args.steps)
            cells = " | ".join(f"{m[s][0]:.4f}, {m[s][1]:.1f}" for s in args.steps)
            print(f"| {model} | {kind} | {m['rel_err_fp16']:.4f} | {cells} |", flush=True)
    if args.lloyd:
        print()
        print("| model | 2-bit levels | err / uniform's | codes H0 bits/w | level bits/row |")
        print("|---|---|---|---|---|")
        for model in args.models:
            m = measure_lloyd(expert_weights(model))
            for key in ("uniform", "lloyd"):
                print(f"| {model} | {key} | {m[key][0] / m['uniform'][0]:.4f} | {m[key][1]:.4f} | "
                      f"{m[key][2]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
