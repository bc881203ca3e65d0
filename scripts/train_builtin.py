"""Train qmoe's built-in models on CPU: ``tiny-switch`` (SwitchTransformers, T5 span corruption) and
``tiny-qwen3-moe`` (Qwen3-MoE, causal LM), on the Bible *train* books only (never calibration, validation
or test books).

    python scripts/train_builtin.py --family switch      # -> runs/tiny-switch/, then copied into the package
    python scripts/train_builtin.py --family qwen3-moe   # -> runs/tiny-qwen3-moe/

Reproducible: the seed fixes initialisation, dropout and the data order (epoch ``k`` is a fresh corruption /
window offset drawn from ``seed + k``). Resumable: a checkpoint (model, optimizer, RNG state, log) is
written atomically to ``--run-dir`` every ``--ckpt-every`` steps; rerunning the same command continues from
it. ``--threads`` may differ between the first run and a resume (the result then differs in the last bits).

At the end it writes the fp16 weights, config, tokenizer and generation config to ``--out`` and the training
log (curves, timings, baselines) to ``docs/<name>-training.json`` plus a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qmoe.calib import bible_split, span_corruption_samples, token_stream
from qmoe.calib.tokenizer import train_tokenizer
from qmoe.evaluation import DEFAULT_SAMPLES, DEFAULT_SEED, model_loss, unigram_baseline

LM_LENGTH = 128  # qmoe eval's causal-LM window


@dataclass(frozen=True)
class Recipe:
    """AdamW with linear warm-up and cosine decay to 10% of the peak, in one or more cycles (warm restarts):
    the schedule is a function of the step alone, so a run resumed with more cycles is the same as a fresh
    run with them."""

    name: str
    cycles: tuple[int, ...]  # steps of each cosine cycle
    batch: int
    lr: float  # peak of the first cycle
    warmup: int  # steps of the first cycle's warm-up (later cycles: a third of it)
    restart_lr: float = 0.5  # peak of each later cycle, as a fraction of ``lr``
    balance: float = 0.0  # per-layer load-balancing weight (decoder-only MoE; layer_balance_loss)

    @property
    def steps(self) -> int:
        return sum(self.cycles)

    def lr_at(self, step: int) -> float:
        start = 0
        for i, n in enumerate(self.cycles):
            if step < start + n or i == len(self.cycles) - 1:
                break
            start += n
        s = step - start
        peak, warm = (self.lr, self.warmup) if i == 0 else (self.lr * self.restart_lr, self.warmup // 3)
        if s < warm:
            return peak * (s + 1) / warm
        frac = min(1.0, (s - warm) / max(1, n - warm))
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


RECIPES = {
    "switch": Recipe("tiny-switch", cycles=(2400,), batch=32, lr=1e-3, warmup=300),
    # balance: each layer balanced on its own (v1 used transformers' all-layer loss at 0.01 and kept
    # near-dead experts; production MoEs trained with per-layer balancing have none)
    "qwen3-moe": Recipe("tiny-qwen3-moe", cycles=(1600,), batch=32, lr=2e-3, warmup=100, balance=0.03),
}


def switch_config(vocab: int):
    """Every feed-forward layer is an MoE layer (4 encoder + 4 decoder), 16 experts, top-1 (Switch)."""
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(
        vocab_size=vocab, d_model=192, d_kv=32, d_ff=384, num_heads=6,
        num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=4, num_sparse_decoder_layers=4,
        num_experts=16, expert_capacity=64, router_bias=False, router_jitter_noise=0.0,
        router_dtype="float32", router_ignore_padding_tokens=False,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.05, layer_norm_epsilon=1e-6, initializer_factor=1.0,
        feed_forward_proj="relu", is_encoder_decoder=True, use_cache=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        router_z_loss_coef=0.001, router_aux_loss_coef=0.01, tie_word_embeddings=True,
    )


def qwen3_config(vocab: int):
    """All layers MoE with fine-grained SwiGLU experts (32, top-4, normalised top-k), as Qwen3-MoE."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=192, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        moe_intermediate_size=192, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
        decoder_sparse_step=1, router_aux_loss_coef=0.0, output_router_logits=False,
        pad_token_id=0, bos_token_id=None, eos_token_id=1, initializer_range=0.02,
    )


def local_attention_init(model, strength: float = 8.0) -> None:
    """Start four encoder heads as neighbour readers: relative-position bias ``strength`` at offset -1, +1,
    -2, +2 (heads 0-3), zero elsewhere; the other heads keep their random init.

    Span corruption is learnable only through a two-step circuit: the decoder finds the sentinel it is
    filling by content (cross-attention), and reads there what the encoder gathered from the sentinel's
    neighbours (self-attention by relative position). Neither step pays off without the other, so from a
    random init T5-style models sit on a long plateau as decoder-only span LMs (our earlier tiny-switch:
    another sample's encoder input cost 0.056 nats after 2000 steps; a synthetic find-the-marker lookup was
    still unlearned after 1100 steps). With the neighbour heads in place the content step pays off at once
    (the same lookup: learned in ~150 steps). Training is free to change the biases afterwards.
    """
    att = model.encoder.block[0].layer[0].SelfAttention  # holds the bias table shared by all encoder blocks
    cfg = model.config
    offsets = torch.tensor([-1, 1, -2, 2])
    buckets = att._relative_position_bucket(offsets, bidirectional=True,
                                            num_buckets=cfg.relative_attention_num_buckets,
                                            max_distance=cfg.relative_attention_max_distance)
    with torch.no_grad():
        w = att.relative_attention_bias.weight  # [buckets, heads]
        for head, bucket in enumerate(buckets.tolist()):
            w[:, head] = 0.0
            w[bucket, head] = strength


class Data:
    """Training batches by step: epoch ``k`` is a fixed permutation of samples drawn with ``seed + k``."""

    def __init__(self, family: str, tokenizer, seed: int, batch: int):
        self.family, self.tokenizer, self.seed, self.batch = family, tokenizer, seed, batch
        self.texts = bible_split("train")
        self.stream = token_stream(tokenizer, self.texts) if family == "qwen3-moe" else None
        self._epoch, self._arrays, self._order = -1, None, None

    def _load_epoch(self, epoch: int) -> None:
        s = self.seed + epoch
        if self.family == "switch":  # a fresh span corruption of the same text each epoch
            b = span_corruption_samples(self.tokenizer, self.texts, None, seed=s)
            self._arrays = (b.input_ids, b.labels)
        else:  # windows of the stream at an epoch-dependent offset
            off = int(np.random.default_rng(s).integers(LM_LENGTH))
            n = (len(self.stream) - off) // LM_LENGTH
            self._arrays = (self.stream[off : off + n * LM_LENGTH].reshape(n, LM_LENGTH),)
        self._order = np.random.default_rng(s).permutation(len(self._arrays[0]))
        self._epoch = epoch

    def batch_at(self, step: int) -> tuple[int, tuple[torch.Tensor, ...]]:
        if self._order is None:
            self._load_epoch(0)
        per_epoch = len(self._order) // self.batch
        epoch, i = divmod(step, per_epoch)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        idx = self._order[i * self.batch : (i + 1) * self.batch]
        return epoch, tuple(torch.from_numpy(a[idx]) for a in self._arrays)


def forward_loss(model, family: str, tensors: tuple[torch.Tensor, ...], balance: float) -> torch.Tensor:
    """Training loss, including the router's load-balancing (and, for Switch, z-) loss."""
    if family == "switch":
        out = model(input_ids=tensors[0], labels=tensors[1], output_router_logits=True)
        return out.loss + switch_router_losses(model, out)
    # the config's router_aux_loss_coef is 0, so out.loss is the LM loss alone
    out = model(input_ids=tensors[0], labels=tensors[0], output_router_logits=True)
    top_k = model.config.num_experts_per_tok
    return out.loss + balance * sum(layer_balance_loss(lg, top_k) for lg in out.router_logits)


def layer_balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch's load-balancing loss for ONE layer: E * sum_e f_e * P_e, 1 when balanced.

    ``logits`` [T, E]. f_e is the share of the layer's T * top_k routing slots that went to expert e, P_e its
    mean router probability. transformers' ``load_balancing_loss_func`` concatenates all layers before the
    product, so a layer can starve experts as long as another layer uses them; summing this per layer cannot.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
    share = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / top_k  # [E], sums to 1
    return probs.shape[-1] * (share * probs.mean(0)).sum()


@torch.no_grad()
def routing_shares(model, tokens: np.ndarray) -> list[list[float]]:
    """Per layer, each expert's share of the routing slots on ``tokens`` [N, S], relative to the mean."""
    out = model(input_ids=torch.from_numpy(tokens), output_router_logits=True)
    k, shares = model.config.num_experts_per_tok, []
    for lg in out.router_logits:  # [N * S, E]
        counts = torch.bincount(torch.topk(lg, k, dim=-1).indices.flatten(), minlength=lg.shape[-1])
        shares.append((counts.float() / counts.float().mean()).tolist())
    return shares


def switch_router_losses(model, out) -> torch.Tensor | float:
    """The z- and load-balancing losses transformers skips when *every* layer is sparse.

    ``SwitchTransformersForConditionalGeneration`` adds them only when ``*_sparse_step > 1``; with experts in
    every layer (step 1) it would train without load balancing and routing collapses onto a few experts.
    """
    from transformers.models.switch_transformers import modeling_switch_transformers as sw

    cfg, extra = model.config, 0.0
    for step, logits in ((cfg.encoder_sparse_step, out.encoder_router_logits),
                         (cfg.decoder_sparse_step, out.decoder_router_logits)):
        if step > 1 or not logits:
            continue  # transformers already counted this stack
        router_logits, expert_index = model._unpack_router_logits(logits)  # [B, S * layers, E], [B, S * L]
        extra = extra + cfg.router_z_loss_coef * sw.router_z_loss_func(router_logits)
        extra = extra + cfg.router_aux_loss_coef * sw.load_balancing_loss_func(
            torch.softmax(router_logits, dim=-1), expert_index)
    return extra


def evaluate(model, family: str, val: tuple[np.ndarray, ...]) -> dict[str, float]:
    """Validation loss; for Switch also the loss with each sample given another sample's encoder input."""
    model.eval()
    out = {"val": model_loss(model, val)[0]}
    if family == "switch":
        out["val_wrong_input"] = model_loss(model, (np.roll(val[0], 1, axis=0), val[1]))[0]
    else:  # the least-routed expert's share of the mean, over layers: balance is a per-layer property
        out["min_share"] = min(min(s) for s in routing_shares(model, val[0][:64]))
    model.train()
    return out


def plot_log(log: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss-curve PNG")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = np.array(log["train"])
    k = min(20, len(tr))
    ax.plot(tr[k - 1 :, 0], np.convolve(tr[:, 1], np.ones(k) / k, "valid"), lw=1,
            label=f"train incl. router losses ({k}-step mean)")
    ev = log["eval"]
    steps = [e["step"] for e in ev]
    ax.plot(steps, [e["val"] for e in ev], "o-", ms=3, label="validation")
    if "val_wrong_input" in ev[-1]:
        ax.plot(steps, [e["val_wrong_input"] for e in ev], "s--", ms=3,
                label="validation, another sample's encoder input")
    unigram = log["val_loss_unigram"]
    ax.axhline(unigram, ls=":", c="gray", label=f"unigram baseline {unigram:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{log['objective']} loss (nats/token)")
    ax.set_ylim(2, max(log["val_loss_unigram"], 7) + 0.5)
    ax.legend()
    ax.set_title(f"{title} training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(RECIPES), required=True)
    ap.add_argument("--steps", type=int, help="default: the family's recipe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--balance", type=float, help="per-layer load-balancing weight (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--run-dir", help="checkpoint folder (default runs/<name>; keep it out of git)")
    ap.add_argument("--out", help="model folder (default runs/<name>/model)")
    ap.add_argument("--log", help="training log JSON (default docs/<name>-training.json)")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from an existing --log")
    args = ap.parse_args()
    recipe = RECIPES[args.family]
    if args.steps:  # a single cycle of that length
        recipe = replace(recipe, cycles=(args.steps,))
    if args.balance is not None:
        recipe = replace(recipe, balance=args.balance)
    steps = recipe.steps
    run_dir = Path(args.run_dir or f"runs/{recipe.name}")
    out_dir = Path(args.out or run_dir / "model")
    log_path = Path(args.log or f"docs/{recipe.name}-training.json")
    if args.replot:
        plot_log(json.loads(log_path.read_text()), log_path.with_suffix(".png"), recipe.name)
        return

    torch.set_num_threads(args.threads)
    from transformers import GenerationConfig, Qwen3MoeForCausalLM, SwitchTransformersForConditionalGeneration

    t0 = time.time()
    tokenizer = train_tokenizer(bible_split("train"))
    vocab = len(tokenizer)
    if args.family == "switch":
        v = span_corruption_samples(tokenizer, bible_split("validation"), DEFAULT_SAMPLES, seed=DEFAULT_SEED)
        val = (v.input_ids, v.labels)
    else:
        from qmoe.calib import lm_samples

        val = (lm_samples(tokenizer, bible_split("validation"), DEFAULT_SAMPLES, DEFAULT_SEED, LM_LENGTH),)
    data = Data(args.family, tokenizer, args.seed, recipe.batch)
    print(f"tokenizer {vocab} tokens ({time.time() - t0:.1f}s)", flush=True)

    torch.manual_seed(args.seed)
    if args.family == "switch":
        model = SwitchTransformersForConditionalGeneration(switch_config(vocab))
        local_attention_init(model)
    else:
        model = Qwen3MoeForCausalLM(qwen3_config(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"])
        log, start = ck["log"], ck["step"]
        print(f"resumed at step {start} from {ckpt_path}", flush=True)
    else:
        start = 0
        log = {"train": [], "eval": [], "train_seconds": 0.0,
               "objective": "span-corruption" if args.family == "switch" else "causal-lm"}
        log["val_loss_unigram"] = unigram_baseline(tokenizer, log["objective"], val)
        log["eval"].append({"step": 0, **evaluate(model, args.family, val)})
        print(f"params {n_params:,} (experts {n_expert:,} = {n_expert / n_params:.0%}); untrained "
              f"{log['eval'][0]}; unigram {log['val_loss_unigram']:.3f}", flush=True)

    model.train()
    t_seg = time.time()
    epoch = 0
    for step in range(start, steps):
        epoch, tensors = data.batch_at(step)
        for g in opt.param_groups:
            g["lr"] = recipe.lr_at(step)
        loss = forward_loss(model, args.family, tensors, recipe.balance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["train"].append([step + 1, float(loss.item())])
        done = step + 1
        if done % args.eval_every == 0 or done == steps:
            ev = {"step": done, **evaluate(model, args.family, val)}
            log["eval"].append(ev)
            elapsed = log["train_seconds"] + time.time() - t_seg
            print(f"step {done}/{steps} epoch {epoch} train {loss.item():.3f} "
                  + " ".join(f"{k} {v:.3f}" for k, v in ev.items() if k != "step")
                  + f" {elapsed / 60:.1f} min", flush=True)
        if done % args.ckpt_every == 0 or done == steps:
            log["train_seconds"] += time.time() - t_seg
            t_seg = time.time()
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                         "log": log, "step": done}, ckpt_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    if args.family == "switch":
        model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                                                   max_new_tokens=32)
    else:
        model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, max_new_tokens=32)
    model.half().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.update(command="python " + " ".join(sys.argv), family=args.family, steps=steps, batch=recipe.batch,
               cycles=list(recipe.cycles), lr=recipe.lr, warmup=recipe.warmup, balance=recipe.balance,
               seed=args.seed, epochs_started=epoch + 1,
               params=n_params, expert_params=n_expert, val_samples=DEFAULT_SAMPLES,
               torch_threads=args.threads)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(json.dumps(log, indent=1))
    plot_log(log, log_path.with_suffix(".png"), recipe.name)
    print(f"done: {log['train_seconds'] / 60:.1f} min of training; final {log['eval'][-1]} (unigram "
          f"{log['val_loss_unigram']:.3f})", flush=True)


if __name__ == "__main__":
    main()
