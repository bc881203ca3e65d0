"""Exact round trips of qmoe.codec through both decoders, over odd shapes, sparsities and level values."""

from __future__ import annotations

import numpy as np
import pytest

from qmoe import codec
from qmoe.codec import format as fmt

SHAPES = [(1, 1), (1, 17), (17, 1), (5, 33), (33, 97), (8, 300), (3, 1000)]
SPARSITIES = [0.0, 0.5, 0.885, 0.97, 1.0]


def ternary(rng: np.random.Generator, shape: tuple[int, int], p0: float) -> np.ndarray:
    return rng.choice([-1, 0, 1], size=shape, p=[(1 - p0) / 2, p0, (1 - p0) / 2]).astype(np.int8)


def check_ternary(codes: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> codec.EncodedMatrix:
    enc = codec.encode_ternary(codes, lo, hi)
    assert enc.shape == codes.shape and enc.kind == "ternary"
    for backend in ("numba", "reference"):
        c, l, h = codec.decode(enc, backend=backend)
        assert c.dtype == np.int8 and np.array_equal(c, codes), backend
        assert np.array_equal(l.view(np.uint32), np.asarray(lo, np.float32).view(np.uint32))
        assert np.array_equal(h.view(np.uint32), np.asarray(hi, np.float32).view(np.uint32))
    want = np.where(codes == -1, lo[:, None], np.where(codes == 1, hi[:, None], 0)).astype(np.float32)
    for backend in ("numba", "reference"):
        assert np.array_equal(codec.dequantize(enc, backend=backend), want, equal_nan=True)
    return enc


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p0", SPARSITIES)
def test_ternary_round_trip(shape: tuple[int, int], p0: float) -> None:
    rng = np.random.default_rng(hash((shape, p0)) % 2**32)
    codes = ternary(rng, shape, p0)
    lo = -rng.random(shape[0]).astype(np.float16)
    hi = rng.random(shape[0]).astype(np.float16)
    enc = check_ternary(codes, lo, hi)
    assert enc.levels.dtype == np.float16  # fp16-exact levels are stored as fp16


def test_mixed_rows_and_long_runs() -> None:
    rng = np.random.default_rng(1)
    codes = ternary(rng, (12, 3000), 0.9)
    codes[0] = 0  # all-zero row
    codes[1] = rng.choice([-1, 1], size=3000)  # all-nonzero row
    codes[2] = 0
    codes[2, -1] = 1  # one run of 2999 background codes: many escapes
    codes[3] = 0
    codes[3, 0] = -1  # trailing run only
    codes[4:] = ternary(rng, (8, 3000), 0.99)
    check_ternary(codes, np.full(12, -0.5, np.float16), np.full(12, 2.0, np.float16))


def test_special_and_fp32_levels() -> None:
    rng = np.random.default_rng(2)
    codes = ternary(rng, (6, 50), 0.7)
    lo = np.array([0.0, -0.0, -np.inf, np.inf, np.nan, 65504.0], np.float32)
    check_ternary(codes, lo, lo[::-1].copy())
    exact32 = np.float32(1 / 3) * np.ones(6, np.float32)  # not fp16-representable
    enc = check_ternary(codes, exact32, -exact32)
    assert enc.levels.dtype == np.float32


def test_int2_round_trip() -> None:
    rng = np.random.default_rng(3)
    for shape, probs in [((7, 129), [0.1, 0.2, 0.6, 0.1]), ((1, 1), [1, 0, 0, 0]), ((9, 40), [0.25] * 4)]:
        codes = rng.choice(4, size=shape, p=probs).astype(np.uint8)
        levels = rng.standard_normal((shape[0], 4)).astype(np.float16)
        enc = codec.encode_int2(codes, levels)
        assert enc.kind == "int2"
        for backend in ("numba", "reference"):
            c, lv = codec.decode(enc, backend=backend)
            assert c.dtype == np.uint8 and np.array_equal(c, codes)
            assert np.array_equal(lv, levels.astype(np.float32))
            want = np.take_along_axis(levels.astype(np.float32), codes.astype(np.int64), axis=1)
            assert np.array_equal(codec.dequantize(enc, backend=backend), want)
    codes = rng.choice(4, size=(5, 300), p=[0.05, 0.05, 0.85, 0.05]).astype(np.uint8)
    assert codec.encode_int2(codes, np.zeros((5, 4))).table.background == 2


def test_rows_longer_than_16_bit_deltas() -> None:
    # A row of > 65535 coded bits forces one block per row (block_log2 = 0).
    rng = np.random.default_rng(4)
    codes = ternary(rng, (3, 60000), 1 / 3)
    enc = codec.encode_ternary(codes, np.ones(3), np.ones(3))
    assert enc.block_log2 == 0 and enc.total_bits > 3 * 65536
    assert np.array_equal(codec.decode_dense(enc), codes)
    assert np.array_equal(codec.decode_reference(codec.EncodedMatrix.from_arrays(enc.to_arrays())), codes)


def test_arrays_round_trip_and_determinism() -> None:
    rng = np.random.default_rng(5)
    codes = ternary(rng, (40, 77), 0.9)
    lo, hi = np.full(40, -1.0), np.full(40, 1.0)
    a = codec.encode_ternary(codes, lo, hi, version=1).to_arrays()
    b = codec.encode_ternary(codes, lo, hi, version=1).to_arrays()
    assert a.keys() == b.keys() == set(fmt.ARRAY_NAMES)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    enc = codec.EncodedMatrix.from_arrays(a)
    assert np.array_equal(codec.decode(enc)[0], codes)
    assert enc.nbytes == sum(v.nbytes for v in a.values())


def test_shared_table() -> None:
    rng = np.random.default_rng(6)
    mats = [ternary(rng, (16, 200), p) for p in (0.85, 0.95)]
    table = codec.build_table(mats, "ternary")
    other = ternary(rng, (4, 1000), 0.5)  # statistics the table never saw: still encodable
    for m in [*mats, other]:
        ones = np.ones(m.shape[0])
        enc = codec.encode_ternary(m, ones, ones, table=table)
        own = codec.encode_ternary(m, ones, ones)
        # a shared table is still stored with every matrix (to_blob), so nbytes counts it
        assert enc.table_shared and enc.nbytes == enc.to_blob().nbytes
        assert not own.table_shared
        assert np.array_equal(codec.decode(codec.EncodedMatrix.from_blob(enc.to_blob()))[0], m)
    sparse_only = codec.encode_ternary(np.zeros((2, 10), np.int8), np.ones(2), np.ones(2)).table
    with pytest.raises(ValueError, match="shared table"):
        codec.encode_ternary(mats[0], np.ones(16), np.ones(16), table=sparse_only)
    i2 = rng.choice(4, size=(8, 64)).astype(np.uint8)
    t2 = codec.build_table([i2], "int2")
    assert np.array_equal(codec.decode(codec.encode_int2(i2, np.ones((8, 4)), table=t2))[0], i2)


@pytest.mark.parametrize("bad", [
    lambda: codec.encode_ternary(np.full((2, 2), 2, np.int8), np.ones(2), np.ones(2)),
    lambda: codec.encode_ternary(np.zeros((2, 2), np.int16), np.ones(2), np.ones(2)),
    lambda: codec.encode_ternary(np.zeros((2, 2), np.int8), np.ones(3), np.ones(2)),
    lambda: codec.encode_ternary(np.zeros((0, 2), np.int8), np.ones(0), np.ones(0)),
    lambda: codec.encode_int2(np.full((2, 2), 4, np.uint8), np.ones((2, 4))),
    lambda: codec.encode_int2(np.zeros((2, 2), np.uint8), np.ones((2, 3))),
])
def test_bad_input_raises(bad) -> None:
    with pytest.raises(ValueError):
        bad()


def test_bits_accounting() -> None:
    # nbytes = header + stream words + table + offsets + deltas + levels, as docs/format.md states.
    rng = np.random.default_rng(7)
    rows, cols = 300, 500
    enc = codec.encode_ternary(ternary(rng, (rows, cols), 0.92), np.ones(rows), np.ones(rows))
    g = enc.block_log2
    nblocks = -(-rows // (1 << g))
    stream = 4 * ((enc.total_bits + 31) // 32 + 1)
    want = 64 + stream + enc.table.nsym + 4 * (nblocks + 1) + 2 * rows + 4 * rows  # levels: 2 x fp16
    assert enc.nbytes == want
