"""Weight-only int8 (qmoe.kernels.dense8, dense8.c): the quantizer's grid and error bound, the native kernel
(AVX2 body, tails, prefetching row pairs, the portable build) and the torch path against the float64
reference, and one-line refusals of wrong inputs."""

from __future__ import annotations

import os

import pytest
import torch

from qmoe.kernels import _native, dense8
from qmoe.kernels.dense8 import matmul8, quantize, reference

needs_native = pytest.mark.skipif(not dense8.available(), reason="native kernel unavailable")
SHAPES = [(1, 1), (3, 7), (2, 8), (5, 33), (130, 200), (64, 2048), (67, 1000), (9, 96)]


def _close(y: torch.Tensor, Q: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> None:
    """Within float32 rounding of the sums: relative to sum |q x| s per output."""
    ref = reference(Q, s, x)
    scale = ((x.double().abs() @ Q.double().abs().T) * s.double()).float().clamp_min(1e-30)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert float(((y - ref).abs() / scale).max()) < 1e-5


def test_quantize_is_round_to_nearest_on_the_row_grid() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2100, 40, generator=g) * torch.logspace(-4, 1, 2100)[:, None]  # rows of every magnitude
    W[5] = 0.0  # an all-zero row
    W[7, 3] = -W[7].abs().max() * 2  # the row's absmax is negative: it maps to -127
    Q, s = quantize(W.bfloat16())
    Wb = W.bfloat16().double()
    assert Q.dtype == torch.int8 and s.dtype == torch.float32 and Q.shape == W.shape and s.shape == (2100,)
    assert float(s[5]) == 0.0 and not Q[5].any()
    assert int(Q[7, 3]) == -127 and int(Q.abs().max()) == 127
    nz = s > 0
    assert torch.allclose(s[nz].double(), Wb[nz].abs().amax(1) / 127, rtol=1e-6)
    err = (Q.double() * s.double()[:, None] - Wb).abs()
    assert bool((err <= s.double()[:, None] / 2 * (1 + 1e-5) + 1e-30).all())  # at most half a step
    # a matrix already on a grid of 127 steps per row comes back exactly
    exact = torch.randint(-127, 128, (6, 50), generator=g).float()
    exact[:, 0] = 127.0
    step = torch.tensor([0.5, 0.25, 2.0, 1.0, 0.125, 4.0])[:, None]
    Q2, s2 = quantize(exact * step)
    assert torch.equal(Q2.float() * s2[:, None], exact * step)


@needs_native
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 8])
def test_native_matches_reference(rows, cols, T) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + cols + T)
    Q, s = quantize(torch.randn(rows, cols, generator=g) * 0.05)
    x = torch.randn(T, cols, generator=g)
    _close(matmul8(Q, s, x, native=True), Q, s, x)


def test_large_batches_take_torch_and_match() -> None:
    g = torch.Generator().manual_seed(3)
    Q, s = quantize(torch.randn(70, 130, generator=g))
    x = torch.randn(dense8.SMALL_BATCH + 5, 130, generator=g)
    _close(matmul8(Q, s, x), Q, s, x)
    _close(matmul8(Q, s, x[:2], native=False), Q, s, x[:2])


def test_portable_build_matches_reference(monkeypatch, tmp_path) -> None:
    """The library compiled with -DQMOE_SCALAR_ONLY (machines without AVX2): the same products."""
    monkeypatch.setenv("QMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"{os.environ.get('CC', 'cc')} -DQMOE_SCALAR_ONLY")
    _native.reset()
    try:
        if not dense8.available():
            pytest.skip("native kernel unavailable")
        g = torch.Generator().manual_seed(5)
        for rows, cols in SHAPES:
            Q, s = quantize(torch.randn(rows, cols, generator=g))
            x = torch.randn(2, cols, generator=g)
            _close(matmul8(Q, s, x, native=True), Q, s, x)
    finally:
        monkeypatch.undo()
        _native.reset()


def test_bad_inputs_say_what_is_wrong() -> None:
    Q, s = quantize(torch.randn(4, 16))
    want = r"got Q torch.int8\(4, 16\), s torch.float32\(4,\), x torch.float32\(1, 15\)"
    with pytest.raises(ValueError, match=want):
        matmul8(Q, s, torch.zeros(1, 15))
    with pytest.raises(ValueError, match="s \\[rows\\] float32"):
        matmul8(Q, s[:3], torch.zeros(1, 16))
    with pytest.raises(ValueError, match="quantize takes a floating W"):
        quantize(torch.zeros(4, 16, dtype=torch.int8))
