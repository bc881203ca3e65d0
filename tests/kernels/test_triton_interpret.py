"""The Triton kernels against the reference decoder, run on CPU tensors by Triton's interpreter.

The interpreter executes the kernel body with numpy, one program at a time: shapes stay small and blocks
large (few programs). Error budget: float32 accumulation against float64 over at most ~1k terms.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from qmoe import codec  # noqa: E402
from qmoe.errors import FormatError  # noqa: E402
from qmoe.kernels import triton_kernel as tk  # noqa: E402
from qmoe.kernels.triton_prepare import piece_index  # noqa: E402

BIG = tk.LaunchConfig(lanes=256, num_warps=4, block_t=8)  # few programs: the interpreter runs them serially


def ternary_matrix(rng: np.random.Generator, rows: int, cols: int, p0: float) -> codec.EncodedMatrix:
    codes = rng.choice([-1, 0, 1], size=(rows, cols), p=[(1 - p0) / 2, p0, (1 - p0) / 2]).astype(np.int8)
    if rows >= 4:
        codes[1] = 0  # all-zero row
        codes[2] = 0
        codes[2, -1] = 1  # one long zero run: escapes, then a value in the last column
        codes[3] = rng.choice([-1, 1], size=cols)  # no zeros at all
    lo = -rng.random(rows).astype(np.float16) - 0.1
    hi = rng.random(rows).astype(np.float16) + 0.1
    return codec.encode_ternary(codes, lo, hi)


def int2_matrix(rng: np.random.Generator, rows: int, cols: int) -> codec.EncodedMatrix:
    codes = rng.choice(4, size=(rows, cols), p=[0.08, 0.06, 0.8, 0.06]).astype(np.uint8)  # background 2
    if rows >= 2:
        codes[1] = 2  # all-background row
    return codec.encode_int2(codes, rng.standard_normal((rows, 4)).astype(np.float32))


def reference(enc: codec.EncodedMatrix, x: torch.Tensor) -> np.ndarray:
    w = codec.dequantize(enc, backend="reference").astype(np.float64)  # [rows, cols]
    return x.double().numpy() @ w.T


def check(y: torch.Tensor, want: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(y.double().numpy() - want).max(initial=0.0))
    assert err <= 2e-5 * scale, f"max error {err} exceeds the budget 2e-5 * {scale}"


@pytest.mark.parametrize(("kind", "shape", "tokens", "pieces"), [
    ("ternary", (13, 301), 1, 4),
    ("ternary", (40, 777), 3, 8),
    ("ternary", (1, 1), 1, 1),
    ("ternary", (5, 2500), 2, 16),  # long rows, short pieces; rows longer than run limits
    ("int2", (21, 203), 1, 2),
    ("int2", (9, 64), 10, 4),  # two token tiles of 8
])
def test_matmul_matches_reference(kind: str, shape: tuple[int, int], tokens: int, pieces: int) -> None:
    rng = np.random.default_rng(hash((kind, shape, tokens)) % 2**32)
    enc = ternary_matrix(rng, *shape, 0.885) if kind == "ternary" else int2_matrix(rng, *shape)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
    group = tk.prepare(enc, device="cpu", pieces=pieces)
    check(tk.matmul_prepared(group, x, config=BIG), reference(enc, x))


def test_strided_x_and_default_pieces() -> None:
    rng = np.random.default_rng(7)
    enc = ternary_matrix(rng, 17, 150, 0.7)
    x = torch.randn(150, 4).t()  # [4, 150] with the tokens contiguous (column-major)
    check(tk.matmul_prepared(tk.prepare(enc, device="cpu"), x, config=BIG), reference(enc, x))
    y = tk.matmul(enc, x[:1])  # the cached path
    check(y, reference(enc, x[:1]))
    assert tk.prepared_for(enc, "cpu") is tk.prepared_for(enc, "cpu")


def test_grouped_launch_matches_per_expert() -> None:
    rng = np.random.default_rng(11)
    encs = [ternary_matrix(rng, 24, 190, p0) for p0 in (0.885, 0.95, 0.5, 0.885)]
    counts = [3, 0, 1, 5]  # an idle expert included
    xs = [torch.randn(c, 190) for c in counts]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int32)
    group = tk.prepare(encs, device="cpu", pieces=4)
    y = tk.matmul_grouped(group, torch.cat(xs), offsets, config=BIG)
    assert y.shape == (sum(counts), 24)
    for e, enc in enumerate(encs):
        check(y[offsets[e]:offsets[e + 1]], reference(enc, xs[e]))


def test_piece_index_covers_rows() -> None:
    rng = np.random.default_rng(3)
    enc = ternary_matrix(rng, 6, 900, 0.885)
    pbit, pcol, pnsym = piece_index(enc, 8)
    starts = enc.row_starts()
    assert np.all(np.diff(pbit) >= 0) and np.array_equal(pbit[::8], starts)
    assert np.all((pcol >= 0) & (pcol < 900)) and pnsym.sum() > 0


def test_prepare_rejects_mixed_groups_and_corrupt_streams() -> None:
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="one kind and shape"):
        tk.prepare([ternary_matrix(rng, 4, 30, 0.8), ternary_matrix(rng, 4, 31, 0.8)], device="cpu")
    enc = ternary_matrix(rng, 4, 300, 0.5)
    enc.stream[: len(enc.stream) - 1] ^= np.uint32(0x5A5A5A5A)
    with pytest.raises(FormatError):
        tk.prepare(enc, device="cpu")


def test_dispatcher_backend_and_grouped_call() -> None:
    from qmoe import kernels

    rng = np.random.default_rng(13)
    encs = [ternary_matrix(rng, 12, 70, 0.885) for _ in range(3)]
    xs = [torch.randn(c, 70) for c in (2, 0, 1)]
    ys = kernels.matmul_experts(encs, xs, backend="triton")
    for enc, x, y in zip(encs, xs, ys, strict=True):
        assert y.shape == (x.shape[0], 12)
        check(y, reference(enc, x))
    check(kernels.matmul(encs[0], xs[0], backend="triton"), reference(encs[0], xs[0]))


def test_import_does_not_load_triton() -> None:
    import subprocess
    import sys

    code = ("import sys, qmoe.kernels.triton_kernel, qmoe.kernels.triton_matmul; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
