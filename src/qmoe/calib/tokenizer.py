"""Byte-level BPE tokenizer with T5 conventions: pad=0, eos=1, unk=2, sentinels <extra_id_0..99> last.

As in T5, ``<extra_id_0>`` has the highest id (vocab_size - 1) and ``<extra_id_99>`` the lowest sentinel id.
Saved as a ``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

NUM_SENTINELS = 100
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def sentinel_tokens() -> list[str]:
    return [f"<extra_id_{k}>" for k in range(NUM_SENTINELS)]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Any:
    """Train on ``texts``; returns a transformers ``PreTrainedTokenizerFast`` of exactly ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_SENTINELS,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Sentinels appended in reverse so <extra_id_0> gets the highest id, as in T5.
    tok.add_special_tokens(list(reversed(sentinel_tokens())))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=sentinel_tokens(),
    )
    assert fast.pad_token_id == 0 and fast.eos_token_id == 1, (fast.pad_token_id, fast.eos_token_id)
    assert fast.convert_tokens_to_ids("<extra_id_0>") == len(fast) - 1, len(fast)
    return fast


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def sentinel_ids(tokenizer: Any) -> np.ndarray:
    """int64 [100]: id of <extra_id_k> at index k."""
    ids = tokenizer.convert_tokens_to_ids(sentinel_tokens())
    return np.asarray(ids, dtype=np.int64)
