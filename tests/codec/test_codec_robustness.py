"""Corrupt, truncated and random encodings end in FormatError or the correct result: never a crash or hang.

With ``verify=False`` the crc check is skipped, so the structural validation and the decoders' own guards
face the corruption alone; then both decoders must agree (same error or same output).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmoe import codec
from qmoe.codec import format as fmt
from qmoe.errors import FormatError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sample(kind: str, seed: int) -> tuple[codec.EncodedMatrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 7)), int(rng.integers(1, 60))
    if kind == "ternary":
        p0 = float(rng.uniform(0.3, 1.0))
        codes = rng.choice([-1, 0, 1], size=(rows, cols), p=[(1 - p0) / 2, p0, (1 - p0) / 2]).astype(np.int8)
        return codec.encode_ternary(codes, np.ones(rows), -np.ones(rows)), codes
    codes = rng.choice(4, size=(rows, cols), p=[0.1, 0.6, 0.2, 0.1]).astype(np.uint8)
    return codec.encode_int2(codes, np.ones((rows, 4))), codes


def _outcome(fn):
    try:
        return fn()
    except FormatError as e:
        return e


def _flip(arrays: dict[str, np.ndarray], name: str, bit: int) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in arrays.items()}
    raw = out[name].view(np.uint8).reshape(-1)
    if raw.size:
        raw[(bit // 8) % raw.size] ^= np.uint8(1 << (bit % 8))
    return out


@SETTINGS
@given(kind=st.sampled_from(["ternary", "int2"]), seed=st.integers(0, 2**16),
       name=st.sampled_from(fmt.ARRAY_NAMES), bits=st.lists(st.integers(0, 2**20), min_size=1, max_size=3))
def test_bit_flips(kind: str, seed: int, name: str, bits: list[int]) -> None:
    enc, codes = _sample(kind, seed)
    arrays = enc.to_arrays()
    for b in bits:
        arrays = _flip(arrays, name, b)
    # With the crc: an error or (if the flips cancelled out) the exact matrix.
    got = _outcome(lambda: codec.decode(codec.EncodedMatrix.from_arrays(arrays))[0])
    assert isinstance(got, FormatError) or np.array_equal(got, codes)
    # Without it: validation + decoder guards only; the two decoders must agree.
    try:
        bare = codec.EncodedMatrix.from_arrays(arrays, verify=False)
    except FormatError:
        return
    fast = _outcome(lambda: codec.decode_dense(bare))
    ref = _outcome(lambda: codec.decode_reference(bare))
    assert isinstance(fast, FormatError) == isinstance(ref, FormatError)
    if not isinstance(fast, FormatError):
        # a header flip may leave a sound matrix of another width (trailing background): compare decoders
        assert np.array_equal(fast, ref) and (name == "header" or fast.shape == codes.shape)
        assert np.array_equal(codec.dequantize_fast(bare), codec.dequantize(bare, backend="reference"),
                              equal_nan=True)


@SETTINGS
@given(kind=st.sampled_from(["ternary", "int2"]), seed=st.integers(0, 2**16),
       name=st.sampled_from(fmt.ARRAY_NAMES), keep=st.floats(0, 0.99))
def test_truncated_arrays(kind: str, seed: int, name: str, keep: float) -> None:
    enc, _ = _sample(kind, seed)
    arrays = enc.to_arrays()
    arrays[name] = arrays[name].reshape(-1)[: int(arrays[name].size * keep)]
    for verify in (True, False):
        with pytest.raises(FormatError):
            codec.EncodedMatrix.from_arrays(arrays, verify=verify)


@SETTINGS
@given(seed=st.integers(0, 2**16), field=st.integers(0, fmt.HEADER_WORDS - 1),
       value=st.integers(0, 2**32 - 1))
def test_header_fields(seed: int, field: int, value: int) -> None:
    enc, codes = _sample("ternary", seed)
    arrays = enc.to_arrays()
    arrays["header"][field] = value
    got = _outcome(lambda: codec.decode(codec.EncodedMatrix.from_arrays(arrays))[0])
    assert isinstance(got, FormatError) or np.array_equal(got, codes)
    try:
        bare = codec.EncodedMatrix.from_arrays(arrays, verify=False)
    except FormatError:
        return
    fast, ref = _outcome(lambda: codec.decode_dense(bare)), _outcome(lambda: codec.decode_reference(bare))
    assert isinstance(fast, FormatError) == isinstance(ref, FormatError)
    if not isinstance(fast, FormatError):
        assert np.array_equal(fast, ref)


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(fmt.ARRAY_NAMES),
                            st.lists(st.integers(0, 2**32 - 1), max_size=40), min_size=6))
def test_random_arrays(data: dict[str, list[int]]) -> None:
    arrays = {k: np.array(v, dtype="<u4") for k, v in data.items()}
    with pytest.raises(FormatError):
        codec.EncodedMatrix.from_arrays(arrays)


def test_newer_version_is_named() -> None:
    enc, _ = _sample("ternary", 0)
    arrays = enc.to_arrays()
    arrays["header"][fmt.H_VERSION] = fmt.FORMAT_VERSION + 1
    with pytest.raises(FormatError, match="version"):
        codec.EncodedMatrix.from_arrays(arrays)


def test_random_stream_contents() -> None:
    # Valid structure, random stream words: the row guards must catch every overrun.
    rng = np.random.default_rng(0)
    enc, _ = _sample("ternary", 3)
    for _ in range(200):
        arrays = enc.to_arrays()
        arrays["stream"][:-1] = rng.integers(0, 2**32, size=arrays["stream"].size - 1, dtype=np.uint64)
        tail = enc.total_bits % 32
        if tail:
            arrays["stream"][-2] &= (1 << tail) - 1
        bare = codec.EncodedMatrix.from_arrays(arrays, verify=False)
        fast = _outcome(lambda b=bare: codec.decode_dense(b))
        ref = _outcome(lambda b=bare: codec.decode_reference(b))
        assert isinstance(fast, FormatError) == isinstance(ref, FormatError)
        if not isinstance(fast, FormatError):
            assert np.array_equal(fast, ref)
