"""Greedy text generation with timing: what ``qmoe generate`` prints and ``benchmarks/runtime.py`` measures.

Works for any model from ``qmoe.sources.load_model`` (dense or compressed, encoder-decoder or causal).
"""

from __future__ import annotations

import time
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
