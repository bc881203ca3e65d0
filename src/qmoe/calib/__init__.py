"""Offline corpora, the tokenizer and the span-corruption objective used for calibration and evaluation."""

from qmoe.calib.batches import SpanBatch, lm_samples, span_corruption_samples, token_stream
from qmoe.calib.corpus import EVAL_SETS, SPLITS, bible_split, load_texts, pydoc_texts, read_text_file
from qmoe.calib.span import noise_mask, reconstruct, span_corrupt

__all__ = [
    "EVAL_SETS", "SPLITS", "SpanBatch", "bible_split", "lm_samples", "load_texts", "noise_mask",
    "pydoc_texts", "read_text_file", "reconstruct", "span_corrupt", "span_corruption_samples", "token_stream",
]
