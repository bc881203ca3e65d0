"""How coarse may version 2's level grid be? Rounding error and stored bits per row against fp16 levels.

    python benchmarks/level_grid.py [--models tiny-switch tiny-qwen3-moe] [--steps 4 6 8 12 16 32]

For every expert matrix of the built-in models: fit the grid's levels per row (ternary: QMoE's min/max;
int2: min-max with a zero point), round them to fp16 (format 1) or onto the version-2 grid with S steps per
octave (``qmoe.codec.levels``), round every weight to its row's nearest level, and compare the squared error
``||W - Q||^2`` with fp16's. Also prints the bits per row the version-2 level fields take at each S (fixed
width per matrix, as ``qmoe.codec.format2`` stores them). Round to nearest, no Hessian: a proxy for what the
grid's step costs GPTQ, which sees the same levels.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-switch", "tiny-qwen3-moe"])
    ap.add_argument("--steps", nargs="+", type=int, default=[4, 6, 8, 12, 16, 32])
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


if __name__ == "__main__":
    main()
