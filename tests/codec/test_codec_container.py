"""Shard container: round trip, determinism, and corruption always ending in a FormatError."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmoe import codec
from qmoe.codec.container import SHARD_VERSION
from qmoe.errors import FormatError


def _content(seed: int = 0) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    t = rng.choice([-1, 0, 1], size=(6, 45), p=[0.05, 0.9, 0.05]).astype(np.int8)
    i2 = rng.choice(4, size=(4, 30)).astype(np.uint8)
    tensors = {"router.weight": torch.randn(3, 5, generator=torch.Generator().manual_seed(seed)),
               "norm": torch.ones(7, dtype=torch.bfloat16), "ids": torch.arange(4),
               "mask": torch.tensor([True])}
    encoded = {"experts.0.wi": codec.encode_ternary(t, -np.ones(6), np.ones(6)),
               "experts.0.wo": codec.encode_int2(i2, rng.standard_normal((4, 4)).astype(np.float16))}
    return tensors, encoded, {"ternary": t, "int2": i2}


def test_round_trip(tmp_path: Path) -> None:
    tensors, encoded, raw = _content()
    path = tmp_path / "shard.safetensors"
    codec.save_shard(path, tensors, encoded, {"model": "tiny"})
    shard = codec.load_shard(path)
    assert shard.metadata == {"model": "tiny"}
    assert shard.tensors.keys() == tensors.keys()
    for k, v in tensors.items():
        assert shard.tensors[k].dtype == v.dtype and torch.equal(shard.tensors[k], v)
    assert np.array_equal(codec.decode(shard.encoded["experts.0.wi"])[0], raw["ternary"])
    assert np.array_equal(codec.decode(shard.encoded["experts.0.wo"])[0], raw["int2"])
    assert [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]  # no temporary left behind


def test_deterministic_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        tensors, encoded, _ = _content()
        codec.save_shard(tmp_path / name, tensors, encoded)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def test_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "s"
    codec.save_shard(path, *_content()[:2])

    def bump(h: dict) -> None:
        q = json.loads(h["__metadata__"]["qmoe"])
        q["format_version"] = SHARD_VERSION + 1
        h["__metadata__"]["qmoe"] = json.dumps(q)
    _rewrite_header(path, bump)
    with pytest.raises(FormatError, match="newer"):
        codec.load_shard(path)


def test_checksum_names_tensor(tmp_path: Path) -> None:
    path = tmp_path / "s"
    tensors, encoded, _ = _content()
    codec.save_shard(path, tensors, encoded)
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    begin = header["router.weight"]["data_offsets"][0]
    data[8 + n + begin] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="router.weight"):
        codec.load_shard(path)
    assert torch.isfinite(codec.load_shard(path, verify=False).tensors["router.weight"]).all()


def test_not_a_shard(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "plain")
    with pytest.raises(FormatError, match="no qmoe header"):
        codec.load_shard(tmp_path / "plain")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(FormatError):
        codec.load_shard(tmp_path / "empty")
    with pytest.raises(FormatError):
        codec.load_shard(tmp_path / "missing")


def test_bad_names() -> None:
    tensors, encoded, _ = _content()
    with pytest.raises(ValueError):
        codec.save_shard("/nonexistent/x", {"a#b": torch.zeros(1)}, {})
    with pytest.raises(ValueError):
        codec.save_shard("/nonexistent/x", tensors, {"norm": encoded["experts.0.wi"]})
    with pytest.raises(ValueError):
        codec.save_shard("/nonexistent/x", {}, {}, {"qmoe": "x"})


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("s") / "s"
    codec.save_shard(path, *_content()[:2])
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                      min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_corrupt_file(tmp_path: Path, shard_bytes: bytes, edits: list, cut: float | None) -> None:
    data = bytearray(shard_bytes)
    for where, bit in edits:
        data[int(where * len(data))] ^= 1 << bit
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path / f"c{os.getpid()}"
    path.write_bytes(bytes(data))
    tensors, encoded, raw = _content()
    try:
        shard = codec.load_shard(path)
    except FormatError:
        return
    # Loaded: flips landed in JSON whitespace or cancelled out; then everything must be exact.
    for k, v in tensors.items():
        assert torch.equal(shard.tensors[k], v)
    assert np.array_equal(codec.decode(shard.encoded["experts.0.wi"])[0], raw["ternary"])
    assert np.array_equal(codec.decode(shard.encoded["experts.0.wo"])[0], raw["int2"])


def _save_version_1(path: Path, tensors: dict, encoded: dict) -> None:
    """A shard as qmoe wrote it before version 2: six tensors per encoded matrix."""
    import zlib

    from safetensors.torch import save_file

    out = {k: v.contiguous() for k, v in tensors.items()}
    for name, enc in encoded.items():
        v1 = dataclasses.replace(enc, version=1, _blob=None)  # same arrays in version 1's layout
        for field_name, arr in v1.to_arrays().items():
            out[f"{name}#{field_name}"] = torch.from_numpy(np.ascontiguousarray(arr).copy())
    crc = {n: f"{zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()):08x}" for n, t in sorted(out.items())}
    header = {"format": "qmoe-shard", "format_version": 1, "encoded": {n: e.kind for n, e in encoded.items()},
              "checksums": crc}
    save_file(out, str(path), metadata={"qmoe": json.dumps(header)})


def test_version_1_shards_still_load(tmp_path: Path) -> None:
    tensors, encoded, raw = _content()
    _save_version_1(tmp_path / "v1", tensors, encoded)
    shard = codec.load_shard(tmp_path / "v1")
    assert np.array_equal(codec.decode(shard.encoded["experts.0.wi"])[0], raw["ternary"])
    assert np.array_equal(codec.decode(shard.encoded["experts.0.wo"])[0], raw["int2"])
    assert shard.tensors.keys() == tensors.keys()


def test_one_packed_tensor_per_shard(tmp_path: Path) -> None:
    """Version 4: every matrix's padded blob back to back in one uint64 tensor, in the index's order."""
    from safetensors import safe_open

    from qmoe.codec.container import header_share, matrix_header_bytes, padded_blob

    tensors, encoded, _ = _content()
    codec.save_shard(tmp_path / "s", tensors, encoded)
    with safe_open(str(tmp_path / "s"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("#qmoe").numpy()
    assert keys == set(tensors) | {"#qmoe"}
    want = np.concatenate([padded_blob(encoded[n]) for n in sorted(encoded)])
    assert packed.dtype == np.uint64 and np.array_equal(packed, want)
    # What a layer's matrices add to the file besides their blobs (96 of them, each its own codes): the
    # estimate the size search uses and the measurement agree, and both are far below version 3's.
    rng = np.random.default_rng(1)
    layer = {f"model.layers.0.mlp.experts.{e}.{p}_proj.weight":
             codec.encode_ternary(rng.choice([-1, 0, 1], size=(8, 40), p=[0.1, 0.8, 0.1]).astype(np.int8),
                                  -np.ones(8), np.ones(8))
             for e in range(32) for p in ("gate", "up", "down")}
    for version in (3, 4):
        codec.save_shard(tmp_path / f"l{version}", {}, layer, version=version)
    measured = header_share(tmp_path / "l4", sorted(layer))
    estimate = sum(matrix_header_bytes(n, e) for n, e in layer.items())
    assert abs(measured - estimate) <= 4 * len(layer), (measured, estimate)
    assert measured < header_share(tmp_path / "l3", sorted(layer)) / 8  # version 3: ~220 bytes a matrix
    assert codec.load_shard(tmp_path / "l4").encoded.keys() == layer.keys()


def test_version_3_shards_still_load(tmp_path: Path) -> None:
    from safetensors import safe_open

    tensors, encoded, raw = _content()
    codec.save_shard(tmp_path / "v3", tensors, encoded, version=3)
    with safe_open(str(tmp_path / "v3"), "pt") as f:
        assert set(f.keys()) == set(tensors) | {f"{n}#qmoe" for n in encoded}
    shard = codec.load_shard(tmp_path / "v3")
    assert np.array_equal(codec.decode(shard.encoded["experts.0.wi"])[0], raw["ternary"])
    assert np.array_equal(codec.decode(shard.encoded["experts.0.wo"])[0], raw["int2"])
    assert shard.tensors.keys() == tensors.keys()


@pytest.mark.parametrize("version", [3, 4])
def test_checksum_names_the_matrix(tmp_path: Path, version: int) -> None:
    """A flipped bit inside one matrix's blob: the error names that matrix, in the file reader and the
    mapped one alike."""
    from qmoe.codec.mapped import open_shard

    path = tmp_path / "s"
    tensors, encoded, _ = _content()
    codec.save_shard(path, tensors, encoded, version=version)
    part = open_shard(path).encoded["experts.0.wo"].parts["qmoe"]
    data = bytearray(path.read_bytes())
    data[part.begin + 41] ^= 0x10  # past the 40-byte header of the int2 matrix
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="experts.0.wo.*crc32"):
        codec.load_shard(path)
    with pytest.raises(FormatError, match="experts.0.wo.*crc32"):
        open_shard(path).encoded["experts.0.wo"].get()
    open_shard(path).encoded["experts.0.wi"].get()  # the other matrix is fine


def test_corrupt_matrix_index(tmp_path: Path) -> None:
    """An index that disagrees with the packed tensor, or does not decode, is refused in one line."""
    import base64
    import zlib

    path = tmp_path / "s"
    codec.save_shard(path, *_content()[:2])

    def edit_index(change) -> None:
        def edit(h: dict) -> None:
            q = json.loads(h["__metadata__"]["qmoe"])
            index = json.loads(zlib.decompress(base64.b64decode(q["matrices"])))
            change(index)
            q["matrices"] = base64.b64encode(zlib.compress(json.dumps(index).encode())).decode()
            h["__metadata__"]["qmoe"] = json.dumps(q)
        return edit

    for change, message in [(lambda i: i["words"].__setitem__(0, i["words"][0] + 1), "covers"),
                            (lambda i: i["kinds"].__setitem__(0, "int3"), "index is corrupt"),
                            (lambda i: i["names"].__setitem__(1, i["names"][0]), "index is corrupt"),
                            (lambda i: i["crc32"].pop(), "index is corrupt")]:
        codec.save_shard(path, *_content()[:2])
        _rewrite_header(path, edit_index(change))
        with pytest.raises(FormatError, match=message) as err:
            codec.load_shard(path)
        assert "\n" not in str(err.value)


def test_blob_layout(tmp_path: Path) -> None:
    tensors, encoded, _ = _content()
    for enc in encoded.values():  # the blob is exactly the six arrays, nothing else
        assert codec.EncodedMatrix.from_blob(enc.to_blob()).to_blob().tobytes() == enc.to_blob().tobytes()
        assert enc.to_blob().nbytes == enc.nbytes
    with pytest.raises(FormatError, match="blob holds"):
        codec.EncodedMatrix.from_blob(encoded["experts.0.wi"].to_blob()[:-1])
