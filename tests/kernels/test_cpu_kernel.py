"""The fused CPU kernel against the reference (codec reference decode, dense float64 matmul).

Error budget: every output element within 1e-5 of the reference relative to ``|x| @ |W|^T`` (the scale of a
dot product's rounding error; the kernel accumulates in fp32), and the whole output within 1e-5 normwise.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qmoe import codec, kernels
from qmoe.codec.format import EncodedMatrix
from qmoe.errors import BackendUnavailable, FormatError

RTOL = 1e-5


def _levels(rng: np.random.Generator, shape: tuple[int, ...], fp16: bool) -> np.ndarray:
    lv = rng.uniform(0.2, 2.0, size=shape).astype(np.float32)
    # fp16-exact levels are stored as fp16; random fp32 ones stay fp32
    return lv.astype(np.float16).astype(np.float32) if fp16 else lv


def _special_rows(codes: np.ndarray, rng: np.random.Generator, nonzero: np.ndarray) -> None:
    """Overwrite rows with edge cases: all zero, all nonzero, long zero runs (past any run limit)."""
    rows, cols = codes.shape
    if rows >= 4:
        codes[0] = 0
        codes[1] = rng.choice(nonzero, size=cols)
        codes[2] = 0
        codes[2, -1] = nonzero[0]  # one weight after a run of cols - 1 zeros
        codes[3] = 0
        codes[3, 0] = nonzero[-1]  # one weight, then zeros to the end


def ternary(rng: np.random.Generator, rows: int, cols: int, p0: float, fp16: bool = True) -> EncodedMatrix:
    codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(rows, cols), p=[(1 - p0) / 2, p0, (1 - p0) / 2])
    _special_rows(codes, rng, np.array([-1, 1], np.int8))
    lo, hi = -_levels(rng, (rows,), fp16), _levels(rng, (rows,), fp16)
    return codec.encode_ternary(codes, lo, hi)


def int2(rng: np.random.Generator, rows: int, cols: int, p0: float, fp16: bool = True) -> EncodedMatrix:
    bg = int(rng.integers(4))
    p = np.full(4, (1 - p0) / 3)
    p[bg] = p0
    codes = rng.choice(np.arange(4, dtype=np.uint8), size=(rows, cols), p=p)
    _special_rows(codes, rng, np.array([(bg + 1) & 3, (bg + 3) & 3], np.uint8))
    levels = np.sort(_levels(rng, (rows, 4), fp16) * rng.choice([-1, 1], size=(rows, 4)), axis=1)
    return codec.encode_int2(codes, levels)


MAKERS = {"ternary": ternary, "int2": int2}


def check(y: np.ndarray, enc: EncodedMatrix, x: np.ndarray) -> None:
    w = codec.dequantize(enc, backend="reference").astype(np.float64)
    ref = x.astype(np.float64) @ w.T
    scale = np.abs(x.astype(np.float64)) @ np.abs(w).T
    assert y.dtype == np.float32 and y.shape == ref.shape, f"{y.dtype}{y.shape} vs {ref.shape}"
    rel = np.abs(y - ref) / (scale + 1e-30)
    assert np.all(rel <= RTOL), f"max error {rel.max():.2e} relative to |x| @ |W|^T"
    assert np.linalg.norm(y - ref) <= RTOL * np.linalg.norm(ref) + 1e-30


@pytest.mark.parametrize("kind", ["ternary", "int2"])
@pytest.mark.parametrize(("rows", "cols", "p0"), [
    (1, 1, 0.5), (1, 7, 0.9), (7, 1, 0.5), (5, 13, 0.5), (33, 301, 0.885), (17, 1000, 0.99), (9, 4099, 0.97),
    (260, 65, 0.7),
])
@pytest.mark.parametrize("fp16", [True, False])
def test_matches_reference(kind: str, rows: int, cols: int, p0: float, fp16: bool) -> None:
    rng = np.random.default_rng([rows, cols, int(p0 * 1000), fp16, kind == "int2"])
    enc = MAKERS[kind](rng, rows, cols, p0, fp16)
    assert enc.levels.dtype == (np.float16 if fp16 else np.float32)
    for tokens in (1, 3, 8, 64, 100):
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        check(kernels.matmul(enc, x, backend="cpu"), enc, x)


def _greedy(single: np.ndarray, i: int) -> tuple[int, list[tuple[int, int]], int | None]:
    """Decode window i with the codec's single-symbol table the slow way: (bits, [(column, v)], advance or
    None for the end of the row), taking whole codewords while at most two values are written."""
    from qmoe.codec import huffman

    used, pos, vals = 0, 0, []
    while used < 12:
        e = int(single[(i >> used) & 4095])
        n, v, skip = e & huffman.LEN_MASK, (e >> huffman.VAL_SHIFT) & 3, e >> huffman.SKIP_SHIFT
        if used == 0 and n == 0:
            return 0, [], None
        if n == 0 or used + n > 12 or (v and (len(vals) == 2 or (used and pos + skip > 255))):
            break
        used += n
        if e & huffman.EOR_FLAG:
            return used, vals, None
        if v:
            vals.append((pos + skip, v))
        pos += skip + (v > 0)
    return used, vals, pos


@pytest.mark.parametrize("kind", ["ternary", "int2"])
@pytest.mark.parametrize("p0", [0.3, 0.885, 0.99])
def test_pair_table_matches_single_table(kind: str, p0: float) -> None:
    """Every entry of the multi-symbol table = a slow greedy decode with the codec's single-symbol table."""
    from qmoe.kernels import _cpu_numba as nb
    from qmoe.kernels.cpu import build_lut2

    rng = np.random.default_rng([int(p0 * 1000), kind == "int2"])
    enc = MAKERS[kind](rng, 16, 3000, p0)
    lut2, pad = build_lut2(enc)
    single = enc.table.decode_lut()
    for i in range(4096):
        e = int(lut2[i])
        used, vals, adv = _greedy(single, i)
        vv = (e >> 4) & 15
        got = [(int((e >> 8) & 0xFFFF), vv & 3), (int((e >> 24) & 0xFFFF), vv >> 2)]
        assert e & 15 == used, f"entry {i}: length"
        assert [g for g in got if g[1]] == vals, f"entry {i}: values {got} vs {vals}"
        assert all(c == 0 for c, v in got if v == 0), f"entry {i}: empty slots read x[pos]"
        assert e >> nb.E2_ADV_SHIFT == (nb.E2_ADV_END if adv is None else adv), f"entry {i}: advance"
        assert all(c < pad for c, _ in vals)


@pytest.mark.parametrize("kind", ["ternary", "int2"])
def test_short_rows_end_inside_the_window(kind: str) -> None:
    """Rows of a few codewords: the end of a row (end symbol, an escape past the width) lands inside a
    multi-symbol entry, which the kernel must re-check symbol by symbol."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        cols = int(rng.integers(1, 48))
        enc = MAKERS[kind](rng, int(rng.integers(1, 12)), cols, float(rng.choice([0.5, 0.8, 0.95])))
        for tokens in (1, 3):
            x = rng.standard_normal((tokens, cols)).astype(np.float32)
            check(kernels.matmul(enc, x, backend="cpu"), enc, x)


def test_torch_in_torch_out_and_strided_input() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    enc = ternary(rng, 40, 130, 0.885)
    x = torch.randn(130, 5).T  # non-contiguous [5, 130]
    y = kernels.matmul(enc, x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (5, 40)
    check(y.numpy(), enc, x.numpy())
    ref = kernels.matmul(enc, x, backend="reference")
    assert isinstance(ref, torch.Tensor)


def test_grouped_equals_per_expert() -> None:
    rng = np.random.default_rng(2)
    encs = [ternary(rng, 48, 96, 0.885), int2(rng, 48, 96, 0.8), ternary(rng, 20, 96, 0.95, fp16=False),
            ternary(rng, 48, 96, 0.6)]
    xs = [rng.standard_normal((t, 96)).astype(np.float32) for t in (1, 0, 7, 64)]
    ys = kernels.matmul_experts(encs, xs)
    for enc, x, y in zip(encs, xs, ys, strict=True):
        assert y.shape == (x.shape[0], enc.shape[0])
        np.testing.assert_array_equal(y, kernels.matmul(enc, x))  # same rows, same arithmetic: bit-equal
    ref = kernels.matmul_experts(encs, xs, backend="reference")
    for r, y in zip(ref, ys, strict=True):
        np.testing.assert_allclose(y, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("x", "error", "match"), [
    (np.zeros((2, 31), np.float32), ValueError, r"shape \[tokens, 30\]"),
    (np.zeros((2, 30), np.float64), ValueError, "float32"),
    (np.zeros(30, np.float32), ValueError, r"shape \[tokens, 30\]"),
    (np.zeros((1, 2, 30), np.float32), ValueError, r"shape \[tokens, 30\]"),
    ([[0.0] * 30], TypeError, "torch tensor or numpy array"),
])
def test_bad_inputs(x: object, error: type, match: str) -> None:
    enc = ternary(np.random.default_rng(3), 10, 30, 0.8)
    for backend in ("cpu", "reference"):
        with pytest.raises(error, match=match):
            kernels.matmul(enc, x, backend=backend)
    with pytest.raises(error, match=match):
        kernels.matmul_experts([enc], [x])
    with pytest.raises(ValueError, match="2 matrices but 1 inputs"):
        kernels.matmul_experts([enc, enc], [np.zeros((1, 30), np.float32)])


def test_unknown_or_missing_backend() -> None:
    enc = ternary(np.random.default_rng(4), 4, 8, 0.5)
    x = np.ones((1, 8), np.float32)
    with pytest.raises(BackendUnavailable, match="unknown kernel backend 'nope'"):
        kernels.matmul(enc, x, backend="nope")
    if "triton" not in kernels.available_backends():
        with pytest.raises(BackendUnavailable, match="triton"):
            kernels.matmul(enc, x, backend="triton")


def test_corrupt_streams_fail_like_the_codec() -> None:
    """Flipped stream bits: the kernel rejects exactly what the codec's decoder rejects, and never crashes."""
    rng = np.random.default_rng(5)
    enc = ternary(rng, 24, 200, 0.885)
    x = rng.standard_normal((2, 200)).astype(np.float32)
    rejected = 0
    for _ in range(60):
        arrays = enc.to_arrays()
        stream = arrays["stream"].copy()
        bit = int(rng.integers(enc.total_bits))
        stream[bit >> 5] ^= np.uint32(1 << (bit & 31))
        arrays["stream"] = stream
        bad = EncodedMatrix.from_arrays(arrays, verify=False)
        try:
            w = codec.dequantize(bad)
        except FormatError:
            rejected += 1
            for t in (1, 2):
                with pytest.raises(FormatError, match="corrupt"):
                    kernels.matmul(bad, x[:t])
            continue
        y = kernels.matmul(bad, x)
        np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    assert rejected > 10


def test_import_stays_lean() -> None:
    code = "import sys, qmoe.kernels; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mods = out.stdout.split()
    heavy = sorted(m for m in mods if m.split(".")[0] in {"numba", "torch", "triton"})
    assert not heavy, f"import qmoe.kernels imports {heavy[:5]}"
