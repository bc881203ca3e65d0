"""Every decoder against the codec's row-status rule on one corpus of corrupt matrices (corrupt_corpus.py).

Decoders: the reference (bit by bit), the numba decoder (codes and weights), the CPU kernels (numba and the
native C kernel, one token and a batch), the decode step's column lists, the Triton preparation
(``piece_index``, numpy only), the Triton kernels under ``TRITON_INTERPRET=1`` and ``qmoe decompress``. Each
must raise exactly the rule's message (matrix and first bad row) or, where the rule finds the matrix sound,
compute what the reference computes.
A seeded fuzz (hypothesis) drives the cheap decoders through random mutations of random matrices.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (test_triton_interpret)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from corrupt_corpus import bases, corpus, expected, outcome, rebuild, row_bits  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qmoe import codec  # noqa: E402
from qmoe.codec.decode import ROW_STATUS_TEXT  # noqa: E402
from qmoe.errors import BackendUnavailable  # noqa: E402
from qmoe.kernels import cpu  # noqa: E402
from qmoe.kernels.triton_prepare import piece_index  # noqa: E402

CORPUS = corpus()
LABELS = sorted(CORPUS)


def _native_ok() -> bool:
    try:
        from qmoe.kernels import _native

        _native.load()
        return True
    except BackendUnavailable:
        return False


def test_corpus_reaches_every_status() -> None:
    """The corpus is worth something only if it holds sound matrices, layout errors and every row status."""
    messages = [expected(e)[1] for e in CORPUS.values()]
    assert any(expected(e)[0] == "ok" for e in CORPUS.values())
    assert any("row" not in m and m for m in messages)  # layout (offsets) errors
    for text in ROW_STATUS_TEXT.values():
        assert any(text in m for m in messages), f"no corpus entry gives {text!r}"


def test_row_ending_short_is_past_its_bits() -> None:
    """The issue's case: a header says one column more than the stream holds (the codec's message)."""
    enc = bases()["ternary"]
    rows, cols = enc.shape
    wide = rebuild(enc, row_bits(enc), shape=(rows, cols + 1))
    kind, msg = expected(wide)
    assert kind == "error" and "runs past its bits" in msg
    for fn in (codec.decode_reference, codec.decode_dense, lambda e: piece_index(e, 4)):
        assert outcome(lambda fn=fn: fn(wide)) == ("error", msg)


def _check(label: str, run, compare, enc=None) -> None:
    enc = CORPUS[label] if enc is None else enc
    want_kind, want_msg = expected(enc)
    got_kind, got = outcome(lambda: run(enc))
    assert got_kind == want_kind, f"{label}: rule: {want_kind} ({want_msg}); decoder: {got_kind} ({got})"
    if got_kind == "error":
        assert got == want_msg, f"{label}: message differs from the rule's"
    else:
        compare(enc, got)


def _codes_equal(enc, got) -> None:
    assert np.array_equal(got, codec.decode_reference(enc))


def _weights_close(enc, got) -> None:
    assert np.array_equal(got, codec.dequantize(enc, backend="reference"))


@pytest.mark.parametrize("label", LABELS)
def test_reference_and_numba(label: str) -> None:
    _check(label, codec.decode_reference, _codes_equal)
    _check(label, codec.decode_dense, _codes_equal)
    _check(label, codec.dequantize_fast, _weights_close)


def _x(enc, tokens: int) -> np.ndarray:
    return np.random.default_rng(tokens).standard_normal((tokens, enc.shape[1])).astype(np.float32)


def _matmul_close(tokens: int):
    def compare(enc, y) -> None:
        w = codec.dequantize(enc, backend="reference").astype(np.float64)  # [rows, cols]
        want = _x(enc, tokens).astype(np.float64) @ w.T
        assert np.abs(np.asarray(y) - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    return compare


@pytest.mark.parametrize("mode", ["numba", "native"])
def test_cpu_kernels(mode: str) -> None:
    if mode == "native" and not _native_ok():
        pytest.skip("the native CPU kernel is unavailable here")
    before = cpu.kernel()
    cpu.set_kernel(mode)
    try:
        for label in LABELS:
            for tokens in (1, 9):  # batch 1 and batched paths of each kernel
                _check(label, lambda e, t=tokens: cpu.matmul(e, _x(e, t)), _matmul_close(tokens))
    finally:
        cpu.set_kernel(before)


def test_column_lists() -> None:
    """The decode step's column lists (qmoe.kernels.lists) of every ternary entry: built only where the rule
    finds the matrix sound, and then holding exactly its codes and computing its product."""
    if not _native_ok():
        pytest.skip("the native CPU kernel is unavailable here")
    import torch

    from qmoe.kernels import lists

    def compare(enc, got) -> None:
        codes = codec.decode_reference(enc)
        for r in range(enc.shape[0]):
            for sign in (1, -1):
                assert lists.columns(got, r, sign) == np.flatnonzero(codes[r] == sign).tolist()
        _matmul_close(1)(enc, lists.matvec([got], torch.from_numpy(_x(enc, 1))).numpy())

    ternary = [label for label in LABELS if CORPUS[label].kind == "ternary"]
    assert ternary
    for label in ternary:
        _check(label, lists.build, compare)


@pytest.mark.parametrize("pieces", [1, 4])
def test_triton_prepare(pieces: int) -> None:
    for label in LABELS:
        def compare(enc, idx, pieces=pieces) -> None:
            pbit, pcol, pnsym = idx
            assert np.array_equal(pbit[::pieces], enc.row_starts()) and pnsym.sum() > 0

        _check(label, lambda e: piece_index(e, pieces), compare)


def test_triton_kernels_interpreted() -> None:
    """The kernels trust ``prepare``: sound entries compute the reference's product, the others never
    reach a launch. Every 4th entry (the interpreter runs one program at a time)."""
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    from qmoe.kernels import triton_kernel as tk

    big = tk.LaunchConfig(lanes=256, num_warps=4, block_t=8)
    for label in LABELS[::4]:
        def run(enc):
            return tk.matmul_prepared(tk.prepare(enc, device="cpu", pieces=2), torch.from_numpy(_x(enc, 2)),
                                      config=big).numpy()

        _check(label, run, _matmul_close(2))


# -- fuzz ----------------------------------------------------------------------------------------------------

def _mutate(seed: int, ops: list[tuple[int, int, int]]):
    """A random base (kind, shape, density) and mutations (op, row, arg) on its row bits."""
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 9)), int(rng.integers(1, 80))
    if seed % 2:
        p0 = float(rng.uniform(0.3, 1.0))
        c = rng.choice([-1, 0, 1], size=(rows, cols), p=[(1 - p0) / 2, p0, (1 - p0) / 2]).astype(np.int8)
        enc = codec.encode_ternary(c, -np.ones(rows), np.ones(rows))
    else:
        c = rng.choice(4, size=(rows, cols), p=[0.1, 0.6, 0.2, 0.1]).astype(np.uint8)
        enc = codec.encode_int2(c, rng.standard_normal((rows, 4)))
    bits = row_bits(enc)
    shape = enc.shape
    for op, r, arg in ops:
        r %= len(bits)
        b = bits[r]
        if op == 0 and len(b) > 1:  # truncate
            bits[r] = b[: max(1, len(b) - 1 - arg % 8)]
        elif op == 1:  # extend
            bits[r] = np.concatenate([b, rng.integers(0, 2, 1 + arg % 8)]).astype(np.uint8)
        elif op == 2:  # flip
            b[arg % len(b)] ^= 1
        elif op == 3 and r + 1 < len(bits) and len(b) > 1:  # move a boundary
            k = 1 + arg % (len(b) - 1)
            bits[r], bits[r + 1] = b[:-k], np.concatenate([b[-k:], bits[r + 1]])
        elif op == 4:  # header width
            shape = (shape[0], max(1, shape[1] + arg % 5 - 2))
    return rebuild(enc, bits, shape=shape)


def _cheap_decoders_agree(enc) -> None:
    want_kind, want_msg = expected(enc)
    runs = {"reference": codec.decode_reference, "numba": codec.decode_dense,
            "pieces": lambda e: piece_index(e, 4),
            "cpu-numba": lambda e: cpu.matmul(e, _x(e, 1))}
    before = cpu.kernel()
    cpu.set_kernel("numba")
    try:
        for name, run in runs.items():
            got_kind, got = outcome(lambda run=run: run(enc))
            assert (got_kind, got if got_kind == "error" else "") == (want_kind, want_msg), name
    finally:
        cpu.set_kernel(before)
    if want_kind == "ok":
        assert np.array_equal(codec.decode_dense(enc), codec.decode_reference(enc))


OPS = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 8), st.integers(0, 2**16)), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(seed=st.integers(0, 2**16), ops=OPS)
def test_fuzz_cheap_decoders(seed: int, ops) -> None:
    _cheap_decoders_agree(_mutate(seed, ops))


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(seed=st.integers(0, 2**20), ops=OPS)
def test_fuzz_cheap_decoders_long(seed: int, ops) -> None:
    _cheap_decoders_agree(_mutate(seed, ops))
