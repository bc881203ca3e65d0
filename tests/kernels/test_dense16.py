"""The dense 16-bit kernel (qmoe.kernels.dense16, dense16.c) against the float64 reference: every shape's
vector body and scalar tails, both 16-bit types, values that test the widening (fp16 subnormals, signed
zeros, the largest finite values), and the torch path for larger batches."""

from __future__ import annotations

import pytest
import torch

from qmoe.kernels import dense16
from qmoe.kernels.dense16 import matmul16, reference

needs_native = pytest.mark.skipif(not dense16.available(), reason="native kernel unavailable")


def _close(y: torch.Tensor, W: torch.Tensor, x: torch.Tensor) -> None:
    """Within float32 rounding of the sums: relative to sum |w x| per output."""
    ref = reference(W, x)
    scale = (x.double().abs() @ W.double().abs().T).float().clamp_min(1e-30)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert float(((y - ref).abs() / scale).max()) < 1e-5


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (2, 8), (5, 33), (130, 200), (64, 2048), (67, 1000)])
@pytest.mark.parametrize("T", [1, 2, 8])
def test_native_matches_reference(dtype, rows, cols, T) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + cols + T)
    W = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    x = torch.randn(T, cols, generator=g)
    _close(matmul16(W, x, native=True), W, x)


@needs_native
def test_widening_is_exact_on_special_values() -> None:
    # fp16: subnormals (smallest 2**-24), signed zeros, the largest finite value, ordinary values;
    # one value at a time against x = one-hot, so the output IS the widened weight
    vals = torch.tensor([2.0**-24, -(2.0**-24), 3 * 2.0**-20, 0.0, -0.0, 65504.0, -65504.0, 1.5, -0.333],
                        dtype=torch.float16)
    for dtype, v in ((torch.float16, vals), (torch.bfloat16, vals.float().to(torch.bfloat16))):
        cols = 40  # a vector body of 32 and a scalar tail of 8
        W = torch.zeros(len(v), cols, dtype=dtype)
        for j in (0, 9, 37):  # in the body, the 8-wide part and the tail
            W.zero_()
            W[:, j] = v
            x = torch.zeros(1, cols)
            x[0, j] = 1.0
            y = matmul16(W, x, native=True)
            assert torch.equal(y[0], v.float()), (dtype, j)


def test_large_batches_take_torch_and_match() -> None:
    W = (torch.randn(48, 96) * 0.1).to(torch.bfloat16)
    x = torch.randn(dense16.SMALL_BATCH + 5, 96)
    _close(matmul16(W, x), W, x)
    assert matmul16(W, x[:0]).shape == (0, 48)


@pytest.mark.parametrize("block_bytes", [1, 4 * 96 * 5, 4 * 96 * 48, 1 << 30])
def test_widened_linear_in_row_blocks_matches_reference(block_bytes) -> None:
    # blocks of 1 row, of 5 (48 rows: a short last block), exactly all rows, and one block for everything;
    # with a per-row scale (the int8 path) and with a 3-D input
    g = torch.Generator().manual_seed(block_bytes % 1000)
    W = (torch.randn(48, 96, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(2, 11, 96, generator=g)
    y = dense16.widened_linear(x, W, block_bytes=block_bytes)
    assert y.shape == (2, 11, 48)
    _close(y.reshape(22, 48), W, x.reshape(22, 96))
    s = torch.rand(48, generator=g) + 0.5
    ys = dense16.widened_linear(x.reshape(22, 96), W, s, block_bytes=block_bytes)
    ref = reference(W, x.reshape(22, 96)) * s
    bound = (x.reshape(22, 96).double().abs() @ W.double().abs().T).float() * s
    assert float(((ys - ref).abs() / bound.clamp_min(1e-30)).max()) < 1e-5


def test_bad_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="fp16/bf16"):
        matmul16(torch.zeros(4, 8), torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"x \[T, cols\]"):
        matmul16(torch.zeros(4, 8, dtype=torch.float16), torch.zeros(1, 9))
