"""Batched GPTQ over experts: quality (GPTQ vs round-to-nearest, QMoE's ternary grid vs ternary-opt) and speed
(one batched call vs a Python loop over experts calling the same code), side by side.

    python benchmarks/gptq.py quality                       # synthetic correlated inputs
    python benchmarks/gptq.py quality --model DIR           # real expert inputs captured from a Switch model
    python benchmarks/gptq.py quality --random-model        # the capture code on a tiny random Switch model
    python benchmarks/gptq.py speed --experts 64 --shapes 768x3072,3072x768 --project 2

Shapes are ``rows x cols`` of ``nn.Linear.weight``: cols is the input dimension, the Hessian's size.
"""

from __future__ import annotations

import argparse
import time

import torch

from qmoe.gptq import HessianAccumulator, QuantizedExperts, gptq_quantize, rtn_quantize

GRIDS = ["ternary", "ternary-opt", "int2", "int3", "int4"]


def correlated_inputs(cols: int, tokens: int, n_outliers: int, g: torch.Generator) -> torch.Tensor:
    """``[tokens, cols]`` features mixed through singular values ``e^(-8i/cols)``, a few x10 outliers."""
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g))
    X = torch.randn(tokens, cols, generator=g) @ (Q * torch.exp(-torch.arange(cols) / (cols / 8))).T
    X[:, torch.randperm(cols, generator=g)[:n_outliers]] *= 10
    return X


def synthetic_problem(E: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    acc = HessianAccumulator(E, cols)
    for e in range(E):
        X = correlated_inputs(cols, 8 * cols, max(1, cols // 64), g)
        acc.add(torch.full((X.shape[0],), e), X)
    return torch.randn(E, rows, cols, generator=g) * 0.05, acc.H


def code_stats(r: QuantizedExperts) -> tuple[float, float]:
    """Fraction of zero-level codes and the empirical code entropy in bits/weight (what a codec can reach)."""
    zero = 1 if r.grid.startswith("ternary") else None
    counts = torch.bincount(r.codes.flatten().long() + (1 if zero else 0))
    p = counts[counts > 0].double() / r.codes.numel()
    frac_zero = float((r.codes == 0).float().mean()) if zero else float("nan")
    return frac_zero, float(-(p * p.log2()).sum())


def quality_table(W: torch.Tensor, H: torch.Tensor, label: str) -> None:
    print(f"\n## {label}: W {tuple(W.shape)}, objective tr((W-Q) H (W-Q)^T) summed over experts")
    print(f"{'grid':12} {'RTN':>10} {'GPTQ':>10} {'GPTQ+ao':>10} {'GPTQ/RTN':>9} {'ao/RTN':>7} "
          f"{'worst e':>8} {'zeros':>6} {'bits':>5}")  # fmt: skip
    gptq_obj = {}
    for grid in GRIDS:
        rtn = rtn_quantize(W, grid=grid, H=H)
        gp = gptq_quantize(W, H, grid=grid)
        ao = gptq_quantize(W, H, grid=grid, act_order=True)
        gptq_obj[grid] = (gp.objective.sum(), ao.objective.sum())
        worst = float((gp.objective / rtn.objective).max())
        zeros, bits = code_stats(ao)
        r, o, a = (float(t.objective.sum()) for t in (rtn, gp, ao))
        print(f"{grid:12} {r:10.4g} {o:10.4g} {a:10.4g} {o / r:9.3f} {a / r:7.3f} "
              f"{worst:8.3f} {zeros:6.3f} {bits:5.2f}")  # fmt: skip
    for i, name in enumerate(("GPTQ", "GPTQ+act_order")):
        ratio = float(gptq_obj["ternary-opt"][i] / gptq_obj["ternary"][i])
        print(f"ternary-opt vs ternary ({name}): objective x{ratio:.3f} ({100 * (1 - ratio):.1f}% lower)")


def capture_switch(model, n_batches: int, seq_len: int, batch: int, seed: int) -> dict:
    """Hessians of every expert's ``wi`` and ``wo`` inputs in the first sparse encoder and decoder layers."""
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    sparse = [(n, m) for n, m in model.named_modules() if isinstance(m, SwitchTransformersSparseMLP)]
    picked = [
        next(s for s in sparse if ".encoder." in f".{s[0]}"),
        next(s for s in sparse if "decoder" in s[0]),
    ]
    accs, hooks = {}, []
    for name, mlp in picked:
        experts = [mlp.experts[f"expert_{i}"] for i in range(mlp.experts.num_experts)]
        for proj in ("wi", "wo"):
            lin = [getattr(ex, proj) for ex in experts]
            acc = HessianAccumulator(len(lin), lin[0].in_features)
            accs[f"{name}.{proj}"] = (acc, torch.stack([m.weight.detach().float() for m in lin]))
            for e, m in enumerate(lin):

                def hook(_m, args, e=e, acc=acc):  # one expert's routed tokens: [n, in_features]
                    x = args[0].reshape(-1, args[0].shape[-1])
                    acc.add(torch.full((x.shape[0],), e, dtype=torch.long), x.detach())

                hooks.append(m.register_forward_pre_hook(hook))
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    with torch.no_grad():
        for _ in range(n_batches):
            ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
            dec = torch.randint(0, vocab, (batch, seq_len // 4), generator=g)
            model(input_ids=ids, decoder_input_ids=dec)
    for h in hooks:
        h.remove()
    return accs


def quality(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    if args.model or args.random_model:
        import transformers

        if args.model:
            model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(args.model)
        else:
            cfg = transformers.SwitchTransformersConfig(
                vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                num_experts=8, expert_capacity=64,
            )  # fmt: skip
            model = transformers.SwitchTransformersForConditionalGeneration(cfg)
        model.eval()
        accs = capture_switch(model, args.batches, args.seq_len, args.batch, seed=0)
        for name, (acc, W) in accs.items():
            print(f"\n{name}: tokens per expert {acc.counts.tolist()}")
            keep = acc.counts >= args.min_tokens  # the rest would fall back to RTN on both sides
            quality_table(
                W[keep], acc.H[keep], f"{name} ({int(keep.sum())} experts with >= {args.min_tokens} tokens)"
            )
    else:
        for rows, cols in parse_shapes(args.shapes):
            W, H = synthetic_problem(args.experts, rows, cols, seed=0)
            quality_table(W, H, f"synthetic correlated inputs {rows}x{cols}")


def synthetic_hessians(E: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Cheap correlated positive definite ``[E, cols, cols]``: ``D_e (M M^T) D_e``, one shared ``M``."""
    M = torch.randn(cols, cols, generator=g) * torch.exp(-torch.arange(cols) / (cols / 8))
    base = M @ M.T + 1e-3 * torch.eye(cols)
    d = 0.5 + torch.rand(E, cols, generator=g)  # [E, cols]
    return d[:, :, None] * base * d[:, None, :]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def speed(args: argparse.Namespace) -> None:
    # The benchmark, not the library, sets threads: on a shared, oversubscribed CPU, OpenMP teams spin at
    # barriers and small batched LAPACK calls get 20-100x slower with 2 threads than with 1.
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, grid {args.grid}, block 128; times include the fp64 objective")
    print(f"{'E x rows x cols':18} {'batched s':>10} {'loop s':>8} {'speed-up':>8} {'batched exp/s':>13} "
          f"{'loop exp/s':>10}")  # fmt: skip
    for rows, cols in parse_shapes(args.shapes):
        E = args.experts
        W = torch.randn(E, rows, cols, generator=g) * 0.05
        H = synthetic_hessians(E, cols, g)
        gptq_quantize(W[:1], H[:1], grid=args.grid)  # warm-up
        tb = timed(lambda W=W, H=H: gptq_quantize(W, H, grid=args.grid, expert_batch=args.expert_batch))
        tl = timed(
            lambda W=W, H=H, E=E: [
                gptq_quantize(W[e : e + 1], H[e : e + 1], grid=args.grid) for e in range(E)
            ]
        )
        print(f"{f'{E}x{rows}x{cols}':18} {tb:10.2f} {tl:8.2f} {tl / tb:8.2f} {E / tb:13.3f} {E / tl:10.3f}")
        del W, H
    if args.project:
        print(f"\nswitch-c-2048 layer projection: {args.project} experts measured at the real sizes, x2048")
        total = 0.0
        for rows, cols in ((6144, 2080), (2080, 6144)):  # wi: [d_ff, d_model], wo: [d_model, d_ff]
            W = torch.randn(args.project, rows, cols, generator=g) * 0.05
            H = synthetic_hessians(args.project, cols, g)
            t = timed(lambda W=W, H=H: gptq_quantize(W, H, grid=args.grid))
            per = t / args.project
            total += per * 2048
            print(
                f"  {rows}x{cols} (H {cols}x{cols}): {per:.2f} s/expert -> {per * 2048 / 3600:.2f} h for 2048"
            )
            del W, H
        print(f"  one layer (wi + wo): {total / 3600:.2f} h on this machine")


def parse_shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in shape.split("x")) for shape in s.split(",")]  # type: ignore[misc]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality", help="GPTQ vs RTN objectives per grid")
    q.add_argument("--experts", type=int, default=8)
    q.add_argument("--shapes", default="128x256")
    q.add_argument("--model", help="HF SwitchTransformers directory (e.g. src/qmoe/models/tiny-switch)")
    q.add_argument("--random-model", action="store_true", help="a tiny random SwitchTransformersConfig model")
    q.add_argument("--batches", type=int, default=8, help="calibration batches of random token ids")
    q.add_argument("--batch", type=int, default=16)
    q.add_argument("--seq-len", type=int, default=128)
    q.add_argument("--min-tokens", type=int, default=16)
    s = sub.add_parser("speed", help="batched vs looped GPTQ, experts/s, switch-c-2048 projection")
    s.add_argument("--experts", type=int, default=64)
    s.add_argument("--shapes", default="768x3072,3072x768")
    s.add_argument("--grid", default="ternary")
    s.add_argument("--expert-batch", type=int, default=None, help="default: sized to ~4 GiB")
    s.add_argument("--threads", type=int, default=1, help="torch threads for this run (default 1)")
    s.add_argument("--project", type=int, default=0, help="experts to time at switch-c-2048 sizes (0: skip)")
    args = p.parse_args()
    quality(args) if args.cmd == "quality" else speed(args)


if __name__ == "__main__":
    main()
