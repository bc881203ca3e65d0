"""Model quality as QMoE reports it: mean token cross-entropy of span-corruption decoder targets
(encoder-decoder models, QMoE's "C4 validation loss") or of next-token prediction (decoder-only models),
on a deterministic sample of a text split, a user's file, or Python's pydoc topics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from qmoe.errors import DataError
from qmoe.progress import Progress

DEFAULT_SAMPLES = 256
DEFAULT_SEED = 1234  # evaluation samples stay fixed across runs and independent of calibration seeds


@dataclass(frozen=True)
class EvalResult:
    loss: float  # nats per target token
    tokens: int
    samples: int
    split: str
    objective: str  # "span-corruption" or "causal-lm"

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity}


def eval_texts(split: str | None, data: str | None) -> tuple[str, tuple[str, ...]]:
    """(name, documents) for ``--split`` or ``--data``."""
    from qmoe.calib import EVAL_SETS, load_texts

    if data is not None:
        # A local .txt/.jsonl file, or else a Hugging Face dataset name (needs the hub; clear error without).
        return str(data), load_texts(str(data))
    split = split or "validation"
    if split not in EVAL_SETS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(EVAL_SETS)} or pass --data FILE")
    return split, load_texts(split)


def eval_samples(model: Any, tokenizer: Any, texts: tuple[str, ...], samples: int | None, seed: int):
    """Arrays for the model's objective: (input_ids [N, S_in], labels [N, S_out]) or (windows [N, L],)."""
    from qmoe.calib import lm_samples, span_corruption_samples

    if getattr(model.config, "is_encoder_decoder", False):
        batch = span_corruption_samples(tokenizer, texts, samples, seed)
        return "span-corruption", (batch.input_ids, batch.labels)
    return "causal-lm", (lm_samples(tokenizer, texts, samples, seed),)


def sample_losses(model: Any, arrays: tuple, batch_size: int = 32, progress: bool | Progress = False):
    """float64 [N, 2]: per sample, the summed target-token loss and the number of target tokens.

    Per-sample sums let callers pair two models on identical tokens (differences with error bars)."""
    import numpy as np
    import torch

    n = len(arrays[0])
    out = np.zeros((n, 2), dtype=np.float64)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in Progress.of(progress).bar(range(0, n, batch_size), desc="eval", unit="batch"):
            chunk = [torch.from_numpy(a[i : i + batch_size]).to(device) for a in arrays]
            if len(chunk) == 2:
                logits = model(input_ids=chunk[0], labels=chunk[1]).logits  # [B, S_out, V]
                target = chunk[1]
            else:
                logits = model(input_ids=chunk[0]).logits[:, :-1]  # [B, L-1, V]
                target = chunk[0][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), target, reduction="none")  # [B, S]
            out[i : i + len(target), 0] = loss.double().sum(1).cpu().numpy()
            out[i : i + len(target), 1] = target.shape[1]
    return out


def model_loss(model: Any, arrays: tuple, batch_size: int = 32, progress: bool = False) -> tuple[float, int]:
    """(mean token loss, tokens) of ``model`` on pre-built sample arrays."""
    per = sample_losses(model, arrays, batch_size, progress)
    return float(per[:, 0].sum() / per[:, 1].sum()), int(per[:, 1].sum())


def targets_of(arrays: tuple):
    """The scored tokens of sample arrays: decoder labels [N, S_out], or windows without their first token."""
    return arrays[1] if len(arrays) == 2 else arrays[0][:, 1:]


def unigram_baseline(tokenizer: Any, objective: str, arrays: tuple, train_split: str = "train") -> float:
    """Cross-entropy (nats/token) of the scored tokens of ``arrays`` under add-one unigram counts of the
    same objective's targets on ``train_split``: the loss of a model that ignores all context.

    For span corruption the counts come from span-corrupted train text, so sentinels and EOS get their real
    frequency in targets."""
    import numpy as np

    from qmoe.calib import bible_split, span_corruption_samples, token_stream

    if objective == "span-corruption":
        train = span_corruption_samples(tokenizer, bible_split(train_split), None, seed=0).labels
    else:
        train = token_stream(tokenizer, bible_split(train_split))
    counts = np.bincount(train.ravel(), minlength=len(tokenizer)).astype(np.float64) + 1.0
    return float(-np.log(counts / counts.sum())[targets_of(arrays).ravel()].mean())


def evaluate(source: Any, split: str | None = "validation", data: str | None = None,
             samples: int | None = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED, batch_size: int = 32,
             progress: bool = False, device: Any = "cpu", backend: str | None = None,
             int8_weights: bool = False) -> EvalResult:
    """Loss of ``source`` (built-in name, model directory, or a loaded (model, tokenizer) pair), computed
    on ``device`` (compressed experts with kernel ``backend``, default by device; ``int8_weights``: see
    ``qmoe.sources.load_model``)."""
    from qmoe.sources import load_model

    name, texts = eval_texts(split, data)  # cheap input checks before the model is loaded
    if isinstance(source, tuple):
        model, tokenizer = source
    else:
        model, tokenizer, _ = load_model(source, device=device, backend=backend, int8_weights=int8_weights)
    objective, arrays = eval_samples(model, tokenizer, texts, samples, seed)
    loss, tokens = model_loss(model, arrays, batch_size, progress)
    if not math.isfinite(loss):
        raise DataError(f"the loss on {name} is not finite ({loss}); the model's weights may be corrupt")
    return EvalResult(loss=loss, tokens=tokens, samples=len(arrays[0]), split=name, objective=objective)


def paired_delta(reference: Any, other: Any, tokens: Any) -> tuple[float, float]:
    """Loss increase of ``other`` over ``reference`` (nats per token) and the half-width of its 95% interval.

    ``reference``/``other``: summed nats per evaluation sample (the same samples, the same tokens), ``tokens``
    per sample. The increase is ``sum(other - reference) / sum(tokens)``; its interval is paired over samples
    (ratio estimator: the variance of ``d_i - delta * t_i`` over samples, normal approximation).
    """
    import numpy as np

    r, o, t = (np.asarray(a, dtype=np.float64) for a in (reference, other, tokens))
    if not (r.shape == o.shape == t.shape) or r.ndim != 1 or len(r) < 2:
        shapes = f"{r.shape} {o.shape} {t.shape}"
        raise ValueError(f"need equal 1-D per-sample arrays (>= 2 samples), got {shapes}")
    d = o - r
    delta = d.sum() / t.sum()
    resid = d - delta * t
    se = np.sqrt(len(d) / (len(d) - 1) * (resid**2).sum()) / t.sum()
    return float(delta), float(1.96 * se)
