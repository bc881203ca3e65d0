"""Greedy text generation with timing: what ``qmoe generate`` prints and ``benchmarks/runtime.py`` measures.

Works for any model from ``qmoe.sources.load_model`` (dense or compressed, encoder-decoder or causal).

Timing rule (``time_interleaved``): the first call of each model in a process pays one-off costs that differ
between models (kernel compilation or loading, lazily built tables, allocator growth, page faults on
memory-mapped weights), so it is timed apart and never counted; then every model runs ``repeats`` more
calls, one model after another in rounds, so that a change in machine load hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float  # the whole generate call: prompt (and encoder) pass plus every decoding step

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 32,
             exact: bool = False) -> Generation:
    """Greedy continuation of ``prompt``. ``exact`` forces ``max_new_tokens`` tokens (no stop at EOS), so
    that timings of different models compare the same work."""
    import torch

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    ids = enc["input_ids"]  # [1, S]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
    if exact:
        kwargs["min_new_tokens"] = max_new_tokens
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=enc["attention_mask"], **kwargs)  # [1, S' ]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    # An encoder-decoder's output starts with the decoder start token; a causal LM's with the prompt.
    skip = 1 if getattr(model.config, "is_encoder_decoder", False) else ids.shape[1]
    new = out[0, skip:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text, int(ids.shape[1]), int(new.numel()), seconds)


@dataclass(frozen=True)
class Timed:
    """One model's calls under the timing rule: the first call apart, then ``repeats`` timed calls."""

    first: Generation  # the warm-up call: one-off costs included, not counted in ``seconds``
    runs: tuple[Generation, ...]  # the timed calls, in order

    @property
    def seconds(self) -> float:
        """Median over the timed calls."""
        return statistics.median(g.seconds for g in self.runs)

    @property
    def tokens_per_s(self) -> float:
        return self.runs[0].new_tokens / self.seconds if self.seconds > 0 else float("inf")


def time_interleaved(calls: Sequence[Callable[[], Generation]], repeats: int) -> list[Timed]:
    """Run each of ``calls`` once (the warm-up, reported apart), then ``repeats`` rounds of every call in
    turn; one :class:`Timed` per call, in the order given."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    first = [call() for call in calls]
    runs: list[list[Generation]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            runs[i].append(call())
    return [Timed(f, tuple(r)) for f, r in zip(first, runs, strict=True)]


def describe(model: Any) -> str:
    """How ``model`` computes, for a speed report: its weights' dtype, and for a compressed model where its
    experts are and which kernel multiplies with them."""
    import torch

    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    dtype = str(max(counts, key=counts.__getitem__)).removeprefix("torch.") if counts else "?"
    qc = getattr(model.config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: {})()
    if qc.get("quant_method") != "qmoe":
        return f"dense {dtype}"
    from qmoe.runtime.experts import CompressedExperts

    cuda = next(model.parameters()).device.type == "cuda"
    backends = {m.backend or ("triton" if cuda else "cpu") for m in model.modules()
                if isinstance(m, CompressedExperts)}
    kernel = ", ".join(sorted(str(b) for b in backends)) or "?"
    if backends == {"cpu"}:
        from qmoe.kernels import cpu

        kernel = f"cpu ({cpu.kernel()})"
    from qmoe.runtime.half import HalfLinear
    from qmoe.runtime.int8 import Int8Linear

    if any(isinstance(m, HalfLinear) for m in model.modules()):  # qmoe.runtime.half: widened in registers
        dtype = f"{dtype} weights on float32 activations"
    if any(isinstance(m, Int8Linear) for m in model.modules()):  # qmoe.runtime.int8
        dtype = f"int8 attention and head, {dtype}"
    return f"{dtype}, experts compressed, {kernel} kernel on float32 activations"
