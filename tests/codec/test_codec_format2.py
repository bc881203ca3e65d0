"""Format version 2: its level grid, exact round trips, version choice, and crafted blobs whose compact
fields (row lengths, level exponents, widths, padding) are wrong -> one-line FormatError naming field or row.

The decoders on version-2 matrices with corrupt streams are tested in tests/test_corrupt_rows.py (the corpus
holds version-2 bases whose every mutation goes through the version-2 blob)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qmoe import codec
from qmoe.codec import format2
from qmoe.codec import levels as lv
from qmoe.codec.mapped import open_shard
from qmoe.errors import FormatError


def _ternary(rng, shape, p0=0.8) -> np.ndarray:
    return rng.choice([-1, 0, 1], size=shape, p=[(1 - p0) / 2, p0, (1 - p0) / 2]).astype(np.int8)


def _int2_levels(rng, rows: int) -> np.ndarray:
    """Min-max 2-bit levels with zero points 1 and 2 (as qmoe.grids.MinMaxGrid fits them), on the grid."""
    lo, hi = -rng.random(rows) - 0.05, rng.random(rows) + 0.05
    scale = (hi - lo) / 3
    z = np.round(-lo / scale)
    return lv.round_levels(scale[:, None] * (np.arange(4) - z[:, None]), "int2")


def _v2(rng, kind: str, shape) -> tuple[codec.EncodedMatrix, np.ndarray, np.ndarray]:
    rows = shape[0]
    if kind == "ternary":
        codes = _ternary(rng, shape)
        levels = lv.round_levels(np.stack([-rng.random(rows) - 1e-3, rng.random(rows) + 1e-3], 1), "ternary")
        levels[0, 1] = 0.0  # a zero level (a row without positive weights)
        enc = codec.encode_ternary(codes, levels[:, 0], levels[:, 1])
    else:
        codes = rng.choice(4, size=shape, p=[0.1, 0.4, 0.4, 0.1]).astype(np.uint8)
        levels = _int2_levels(rng, rows)
        enc = codec.encode_int2(codes, levels)
    assert enc.version == 2
    return enc, codes, levels


@pytest.mark.parametrize("kind", ["ternary", "int2"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (192, 192), (33, 1000), (300, 65)])
def test_round_trip_is_exact(kind: str, shape) -> None:
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    enc, codes, levels = _v2(rng, kind, shape)
    blob = enc.to_blob()
    assert blob.nbytes == enc.nbytes
    again = _v2(np.random.default_rng(shape[0] * 7 + shape[1]), kind, shape)[0].to_blob()
    assert again.tobytes() == blob.tobytes()  # deterministic
    got = codec.EncodedMatrix.from_blob(blob)
    assert got.version == 2 and got.to_blob().tobytes() == blob.tobytes()
    for backend in ("reference", "numba"):
        out = codec.decode(got, backend=backend)
        assert np.array_equal(out[0], codes)
        back = np.stack(out[1:], 1) if kind == "ternary" else out[1]
        assert np.array_equal(back.view(np.uint32), levels.view(np.uint32))  # levels bit for bit
    assert np.array_equal(codec.dequantize(got), codec.dequantize(got, backend="reference"))


@pytest.mark.parametrize("steps", [1, 4, 8, 13, 64])
def test_level_grid_is_idempotent_and_close(steps: int) -> None:
    rng = np.random.default_rng(steps)
    t = np.stack([-np.exp(rng.normal(-3, 2, 500)), np.exp(rng.normal(-3, 2, 500))], 1).astype(np.float32)
    t[:5, 0] = 0.0
    r = lv.round_levels(t, "ternary", steps)
    assert lv.on_grid(r, "ternary", steps) and not lv.on_grid(t, "ternary", steps)
    assert np.array_equal(lv.round_levels(r, "ternary", steps).view(np.uint32), r.view(np.uint32))
    assert (r[:5, 0] == 0).all() and (r[5:, 0] < 0).all() and (r[:, 1] > 0).all()
    ratio = np.abs(r[5:] / t[5:])  # log-domain rounding: within half a step
    assert (np.abs(np.log2(ratio)) <= 0.5 / steps + 1e-6).all()
    i2 = _int2_levels(rng, 200)
    assert lv.on_grid(i2, "int2")
    again = lv.round_levels(i2, "int2", 8)
    assert np.array_equal(again.view(np.uint32), i2.view(np.uint32))
    assert ((i2 == 0).sum(1) == 1).all()  # zero is exactly one of the four levels


def test_version_choice() -> None:
    rng = np.random.default_rng(1)
    codes = _ternary(rng, (5, 40))
    off = np.full(5, 0.3)
    assert codec.encode_ternary(codes, -off, off).version == 1  # 0.3 is not on the grid: format 1
    on = lv.round_levels(np.stack([-off, off], 1), "ternary")
    assert codec.encode_ternary(codes, on[:, 0], on[:, 1]).version == 2
    v1 = codec.encode_ternary(codes, on[:, 0], on[:, 1], version=1)
    assert v1.version == 1
    assert np.array_equal(codec.decode(codec.EncodedMatrix.from_blob(v1.to_blob()))[0], codes)
    with pytest.raises(ValueError, match="not on the version-2 grid"):
        codec.encode_ternary(codes, -off, off, version=2)
    with pytest.raises(ValueError, match="one blob"):
        codec.encode_ternary(codes, on[:, 0], on[:, 1]).to_arrays()
    assert codec.encode_ternary(codes, on[:, 0], -on[:, 1]).version == 1  # hi < 0: format 1


# -- crafted blobs -------------------------------------------------------------------------------------------


def _craft(blob: np.ndarray, keep_crc: bool = False, **fields) -> np.ndarray:
    """``blob`` with header fields replaced, its crc32 recomputed (a crafted file carries a correct one)."""
    b = blob.copy()
    h = np.frombuffer(b[: format2.HEADER2_BYTES].tobytes(), dtype=format2.HEADER2).copy()
    for k, v in fields.items():
        h[0][k] = v
    b[: format2.HEADER2_BYTES] = np.frombuffer(h.tobytes(), np.uint8)
    if not keep_crc:
        b[format2._CRC] = 0
        b[format2._CRC] = np.frombuffer(np.uint32(zlib.crc32(b)).astype("<u4").tobytes(), np.uint8)
    return b


def _recrc(b: np.ndarray) -> np.ndarray:
    b = b.copy()
    b[format2._CRC] = 0
    b[format2._CRC] = np.frombuffer(np.uint32(zlib.crc32(b)).astype("<u4").tobytes(), np.uint8)
    return b


def _bases() -> dict[str, codec.EncodedMatrix]:
    rng = np.random.default_rng(9)
    return {k: _v2(rng, k, (7, 50))[0] for k in ("ternary", "int2")}


def _cases() -> dict[str, tuple[np.ndarray, str]]:
    """label -> (crafted blob, the fragment its FormatError must hold)."""
    out = {}
    for kind, enc in _bases().items():
        b = enc.to_blob()
        h = format2.header_of(b)
        w = [int(x) for x in h["widths"]]
        meta_at = format2.HEADER2_BYTES + enc.stream.nbytes
        out[f"{kind}/truncated by 1"] = (b[:-1], "blob holds")
        out[f"{kind}/truncated to the header"] = (b[:39], "uint8[>= 40]")
        out[f"{kind}/extended by 8"] = (np.concatenate([b, np.zeros(8, np.uint8)]), "blob holds")
        flipped = b.copy()
        flipped[60] ^= 1  # a stream bit; the crc32 no longer matches
        out[f"{kind}/crc"] = (flipped, "crc32")
        out[f"{kind}/version 3"] = (_craft(b, version=3), "format version 3")
        out[f"{kind}/kind id 5"] = (_craft(b, kind=5), "unknown kind id 5")
        out[f"{kind}/level steps 0"] = (_craft(b, level_steps=0), "level steps 0")
        out[f"{kind}/width 17"] = (_craft(b, widths=[w[0], 17, w[2]]), "field widths")
        out[f"{kind}/lengths do not add up"] = (_craft(b, len_base=int(h["len_base"]) + 1),
                                                "row lengths add up")
        out[f"{kind}/length base 0"] = (_craft(b, len_base=0), "row-length base is 0")
        out[f"{kind}/exponent out of range"] = (
            _craft(b, level_base=[32000, int(h["level_base"][1])]),
            "row 0: lo level exponent" if kind == "ternary" else "row 0: level scale exponent")
        out[f"{kind}/rows 8"] = (_craft(b, rows=8), "blob holds")
        # padding bits of the row metadata set (7 rows: rows * sum(widths) is rarely a multiple of 8)
        nbits = 7 * sum(w)
        if nbits % 8:
            p = b.copy()
            p[meta_at + nbits // 8] |= np.uint8(0x80)
            out[f"{kind}/metadata padding"] = (_recrc(p), "row-metadata padding")
        p = b.copy()
        p[-1] |= np.uint8(0xF0) if (2 * int(h["run_limit"]) + 2) % 2 == 0 and kind == "ternary" else 0
        if kind == "ternary":  # nsym even: the last nibble is a real length; > 12 breaks the prefix code
            out[f"{kind}/code length 15"] = (_recrc(p), "prefix code")
    enc = _bases()["int2"]
    b = enc.to_blob()
    h = format2.header_of(b)
    e, z = lv.int2_params(enc.levels)
    r = int(np.argmax(z - z.min()))
    assert z[r] > z.min(), "the base must hold rows of two zero points"
    out["int2/zero point out of range"] = (
        _craft(b, level_base=[int(h["level_base"][0]), 4 - int(z[r] - z.min())]),
        f"row {r}: level zero point 4 out of range")
    return out


CASES = _cases()


@pytest.mark.parametrize("label", sorted(CASES))
def test_crafted_blob_is_refused(label: str) -> None:
    blob, fragment = CASES[label]
    with pytest.raises(FormatError) as err:
        codec.EncodedMatrix.from_blob(blob)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_crafted_blob_in_a_shard_names_file_and_matrix(tmp_path: Path) -> None:
    """A shard whose (checksummed) blob has a bad level exponent: load_shard and open_shard name both."""
    enc = _bases()["ternary"]
    bad = CASES["ternary/exponent out of range"][0]
    enc._blob = bad  # what save_shard writes for this matrix
    path = tmp_path / "s"
    codec.save_shard(path, {"n": torch.ones(2)}, {"experts.0.w": enc})
    for read in (lambda: codec.load_shard(path), lambda: open_shard(path).encoded["experts.0.w"].get()):
        with pytest.raises(FormatError) as err:
            read()
        msg = str(err.value)
        assert str(path) in msg and "'experts.0.w'" in msg and "row 0: lo level exponent" in msg
        assert "\n" not in msg
