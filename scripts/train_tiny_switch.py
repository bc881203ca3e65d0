"""Train the built-in ``tiny-switch`` model: a SwitchTransformersForConditionalGeneration on the Bible
train split with T5 span corruption, on CPU. Reproducible: fixed seed, fixed step count, fixed data order.

    python scripts/train_tiny_switch.py --out src/qmoe/models/tiny-switch --steps 2000

Writes the fp16 weights, config, tokenizer and generation config to --out, and the training log
(loss curve data, timings, baselines) to docs/tiny-switch-training.json plus a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qmoe.calib import bible_split, span_corruption_samples
from qmoe.calib.tokenizer import train_tokenizer


def model_config(vocab_size: int):
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(
        vocab_size=vocab_size, d_model=192, d_kv=32, d_ff=768, num_heads=6,
        num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
        num_experts=8, expert_capacity=64, router_bias=False, router_jitter_noise=0.0,
        router_dtype="float32", router_ignore_padding_tokens=False,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0,
        feed_forward_proj="relu", is_encoder_decoder=True, use_cache=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        router_z_loss_coef=0.001, router_aux_loss_coef=0.01, tie_word_embeddings=True,
    )


@torch.no_grad()
def eval_loss(model, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> float:
    """Mean token loss of the decoder targets. With inputs rolled by one sample (``inputs.roll(1, 0)``) the
    same call measures how much the model relies on its encoder input: a collapsed encoder scores the same."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch):
        out = model(input_ids=inputs[i : i + batch], labels=labels[i : i + batch])
        n = labels[i : i + batch].numel()
        total += out.loss.item() * n
        count += n
    model.train()
    return total / count


def unigram_loss(train_labels: np.ndarray, val_labels: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) of the validation targets under add-one unigram counts of train targets."""
    counts = np.bincount(train_labels.ravel(), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_labels.ravel()].mean())


def plot_log(log: dict, path: Path) -> None:
    """Loss curves: train (running mean), validation, validation with mismatched encoder inputs, unigram."""
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
    ax.plot(tr[k - 1 :, 0], np.convolve(tr[:, 1], np.ones(k) / k, "valid"), label=f"train ({k}-step mean)")
    va = np.array(log["val"])
    ax.plot(va[:, 0], va[:, 1], "o-", ms=3, label="validation")
    if log.get("val_wrong_input"):
        wr = np.array(log["val_wrong_input"])
        ax.plot(wr[:, 0], wr[:, 1], "--", label="validation, encoder input of another sample")
    unigram = log["val_loss_unigram"]
    ax.axhline(unigram, ls=":", c="gray", label=f"unigram baseline {unigram:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("span-corruption loss (nats/token)")
    ax.set_ylim(3, max(unigram, 8) + 0.5)
    ax.legend()
    ax.set_title("tiny-switch training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="src/qmoe/models/tiny-switch")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", default="docs/tiny-switch-training.json")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from an existing --log")
    args = ap.parse_args()
    if args.replot:
        plot_log(json.loads(Path(args.log).read_text()), Path(args.log).with_suffix(".png"))
        return

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import GenerationConfig, SwitchTransformersForConditionalGeneration

    t0 = time.time()
    tokenizer = train_tokenizer(bible_split("train"))
    vocab = len(tokenizer)
    val = span_corruption_samples(tokenizer, bible_split("validation"), 256, seed=1234)
    val_in, val_lab = torch.from_numpy(val.input_ids), torch.from_numpy(val.labels)
    epoch0 = span_corruption_samples(tokenizer, bible_split("train"), None, seed=args.seed)
    print(f"tokenizer {vocab} tokens, {len(epoch0.input_ids)} train segments/epoch, {time.time() - t0:.1f}s")

    model = SwitchTransformersForConditionalGeneration(model_config(vocab))
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"params {n_params:,} (experts {n_expert:,} = {n_expert / n_params:.0%})")
    untrained = eval_loss(model, val_in, val_lab)
    unigram = unigram_loss(epoch0.labels, val.labels, vocab)
    print(f"untrained val loss {untrained:.3f}, unigram baseline {unigram:.3f}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    log = {"train": [], "val": [[0, untrained]]}
    data, epoch, pos = epoch0, 0, 0
    order = np.random.default_rng(args.seed).permutation(len(data.input_ids))
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        if pos + args.batch > len(order):  # new epoch: fresh span corruption of the same text
            epoch += 1
            data = span_corruption_samples(tokenizer, bible_split("train"), None, seed=args.seed + epoch)
            order = np.random.default_rng(args.seed + epoch).permutation(len(data.input_ids))
            pos = 0
        idx = order[pos : pos + args.batch]
        pos += args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch_in, batch_lab = torch.from_numpy(data.input_ids[idx]), torch.from_numpy(data.labels[idx])
        out = model(input_ids=batch_in, labels=batch_lab, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["train"].append([step + 1, float(out.loss.item())])
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            v = eval_loss(model, val_in, val_lab)
            log["val"].append([step + 1, v])
            wrong = eval_loss(model, val_in.roll(1, 0), val_lab)
            log.setdefault("val_wrong_input", []).append([step + 1, wrong])
            el = time.time() - t_train
            print(f"step {step + 1}/{args.steps} epoch {epoch} train {out.loss.item():.3f} val {v:.3f} "
                  f"(wrong input {log['val_wrong_input'][-1][1]:.3f}) "
                  f"{el / 60:.1f} min", flush=True)
    train_seconds = time.time() - t_train

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                                               max_new_tokens=32)
    model.half().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    final = log["val"][-1][1]
    log.update(
        command="python " + " ".join(sys.argv),
        steps=args.steps, batch=args.batch, lr=args.lr, epochs_started=epoch + 1,
        train_seconds=train_seconds, params=n_params, expert_params=n_expert,
        val_loss_untrained=untrained, val_loss_unigram=unigram, val_loss_final_fp32=final,
        val_samples=len(val_in), torch_threads=args.threads,
    )
    Path(args.log).write_text(json.dumps(log, indent=1))
    plot_log(log, Path(args.log).with_suffix(".png"))
    print(f"done in {train_seconds / 60:.1f} min; final val {final:.3f} (unigram {unigram:.3f}, untrained "
          f"{untrained:.3f})")


if __name__ == "__main__":
    main()
