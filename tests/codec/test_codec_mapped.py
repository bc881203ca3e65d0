"""Shards opened in place (qmoe.codec.mapped) against the reference reader ``load_shard``, every version."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec_container import _content, _save_version_1

from qmoe import codec
from qmoe.codec import container, format2
from qmoe.codec.mapped import open_shard
from qmoe.errors import FormatError


def _same(path: Path) -> None:
    """open_shard + get() equals load_shard, array by array."""
    ref = codec.load_shard(path)
    m = open_shard(path)
    assert m.encoded.keys() == ref.encoded.keys() and m.tensors.keys() == ref.tensors.keys()
    for name, enc in ref.encoded.items():
        got = m.encoded[name].get()
        assert got.kind == enc.kind and got.shape == enc.shape and got.total_bits == enc.total_bits
        assert got.version == enc.version and np.array_equal(got.table.lengths, enc.table.lengths)
        for k in ("stream", "block_offsets", "row_deltas", "levels"):  # what the decoders read
            a, b = getattr(enc, k), getattr(got, k)
            assert a.dtype == b.dtype and np.array_equal(a, b), (name, k)
        assert got.stream.ctypes.data % 4 == 0  # the kernels read whole words
    for name in ref.tensors:
        m.check_tensor(name)


def test_version_3_is_aligned_and_mapped(tmp_path: Path) -> None:
    tensors, encoded, _ = _content()
    codec.save_shard(tmp_path / "v3", tensors, encoded)
    _same(tmp_path / "v3")
    m = open_shard(tmp_path / "v3")
    for mm in m.encoded.values():
        assert mm.parts["qmoe"].dtype == "U64" and mm.parts["qmoe"].begin % 8 == 0
        assert not mm.checked
        enc = mm.get()
        assert mm.checked and mm.get() is enc
        assert not enc.stream.flags.owndata and not enc.stream.flags.writeable
        if enc.version == 2:  # its blob is the mapping too: nbytes and to_blob copy nothing
            stored = mm.parts["qmoe"].end - mm.parts["qmoe"].begin  # padded to 8-byte words
            assert not enc.to_blob().flags.owndata and enc.nbytes <= stored < enc.nbytes + 8


def test_version_2_and_1_still_map(tmp_path: Path, monkeypatch) -> None:
    tensors, encoded, _ = _content()
    _save_version_1(tmp_path / "v1", tensors, encoded)
    _same(tmp_path / "v1")
    # version 2: unpadded uint8 blobs at arbitrary offsets (copied on first use when unaligned)
    monkeypatch.setattr(container, "SHARD_VERSION", 2)
    monkeypatch.setattr(container, "padded_blob", lambda enc: enc.to_blob())
    codec.save_shard(tmp_path / "v2", tensors, encoded)
    assert open_shard(tmp_path / "v2").encoded["experts.0.wi"].parts["qmoe"].dtype == "U8"
    _same(tmp_path / "v2")


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
    """Any damage: open_shard, a matrix's get() or a tensor's check raises FormatError, or all is exact."""
    data = bytearray(shard_bytes)
    for where, bit in edits:
        data[int(where * len(data))] ^= 1 << bit
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path / f"c{os.getpid()}"
    path.write_bytes(bytes(data))
    tensors, _, raw = _content()
    try:
        m = open_shard(path)
        got = {n: m.encoded[n].get() for n in ("experts.0.wi", "experts.0.wo")}
        for n in tensors:
            m.check_tensor(n)
    except FormatError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return
    assert np.array_equal(codec.decode(got["experts.0.wi"])[0], raw["ternary"])
    assert np.array_equal(codec.decode(got["experts.0.wo"])[0], raw["int2"])


def test_not_a_shard(tmp_path: Path) -> None:
    entry = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (tmp_path / "plain").write_bytes(len(entry).to_bytes(8, "little") + entry)  # its data is missing
    for name in ("plain", "missing"):
        with pytest.raises(FormatError, match=name):
            open_shard(tmp_path / name)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign"))
    with pytest.raises(FormatError, match="no qmoe header"):
        open_shard(tmp_path / "foreign")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("where", ["stream", "levels"])
def test_first_use_error_names_the_row(tmp_path: Path, where: str, version: int) -> None:
    """A flip in the stream names the first row that no longer decodes; one in the levels says none does."""
    tensors, encoded, raw_codes = _content()
    ones = np.ones(6)
    encoded["experts.0.wi"] = codec.encode_ternary(raw_codes["ternary"], -ones, ones, version=version)
    path = tmp_path / "s"
    codec.save_shard(path, tensors, encoded)
    enc = encoded["experts.0.wi"]
    begin = open_shard(path).encoded["experts.0.wi"].parts["qmoe"].begin
    raw = bytearray(path.read_bytes())
    if version == 1:  # blob: header (64 bytes), stream, offsets, levels
        levels_at = 64 + 4 * enc.stream.size + 4 * enc.block_offsets.size + 1
        raw[begin + (64 + 2 * enc.stream.size if where == "stream" else levels_at)] ^= 0x5A
    elif where == "stream":  # blob: header (40 bytes), stream, row metadata (lengths, lo, hi fields), table
        raw[begin + 40 + 2 * enc.stream.size] ^= 0x5A
    else:  # the first bit of row 0's lo field, after every row's length field
        widths = format2.header_of(enc.to_blob())["widths"]
        bit = 8 * (40 + 4 * enc.stream.size) + enc.shape[0] * int(widths[0])
        assert widths[1] >= 1
        raw[begin + bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))
    m = open_shard(path)
    with pytest.raises(FormatError) as err:
        m.encoded["experts.0.wi"].get()
    msg = str(err.value)
    assert str(path) in msg and "'experts.0.wi' fails its crc32 check" in msg and "\n" not in msg
    assert ("row " in msg) if where == "stream" else ("every row still decodes" in msg)
    assert not m.encoded["experts.0.wi"].checked
    m.encoded["experts.0.wo"].get()  # the other matrix is fine
