"""Memory-mapped experts (qmoe.codec.mapped, qmoe.load's default) and `qmoe verify` on small checkpoints.

The large run (a checkpoint larger than RAM) is benchmarks/larger_than_memory.py.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import qmoe
from qmoe.cli import main
from qmoe.codec.mapped import MappedMatrix, open_shard
from qmoe.errors import DeviceMemoryError, FormatError
from qmoe.runtime.experts import CompressedExperts
from qmoe.runtime.verify import verify_dir


def _layers(model) -> list[CompressedExperts]:
    return [m for m in model.modules() if isinstance(m, CompressedExperts)]


def _mapped_base(arr: np.ndarray) -> object:
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fixture", ["switch_compressed", "qwen3_compressed"])
def test_mapped_equals_read(request, fixture: str) -> None:
    path = request.getfixturevalue(fixture)
    mapped, read = qmoe.load(path), qmoe.load(path, mapped=False)
    ids = torch.randint(0, mapped.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(mapped, ids), _logits(read, ids))  # same kernels on the same bytes
    # Read at load: every expert in memory. Mapped: only the routed ones were opened, as views of the file.
    assert all(isinstance(m, qmoe.codec.EncodedMatrix) for layer in _layers(read)
               for mats in layer.matrices.values() for m in mats)
    opened = [m for layer in _layers(mapped) for mats in layer.matrices.values() for m in mats
              if not isinstance(m, MappedMatrix)]
    assert opened
    for enc in opened:
        assert not enc.stream.flags.owndata and isinstance(_mapped_base(enc.stream), mmap.mmap)
        assert enc.stream.ctypes.data % 8 == 0  # version-3 blobs are aligned in the file


def test_load_opens_only_the_first_expert(switch_compressed) -> None:
    model = qmoe.load(switch_compressed)
    for layer in _layers(model):
        for mats in layer.matrices.values():
            assert not isinstance(mats[0], MappedMatrix)  # opened at load: a config mismatch fails there
            assert all(isinstance(m, MappedMatrix) for m in mats[1:])


def _routed_expert(model, ids: torch.Tensor) -> tuple[int, str]:
    """An expert (not 0, which load opens) that ``ids`` route to in the first MoE layer, and its wi's name."""
    layer = _layers(model)[0]
    names = {e: m.name for e, m in enumerate(layer.matrices["wi"]) if isinstance(m, MappedMatrix)}
    seen: list[int] = []
    handle = layer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.extend(mod.routing(args, kwargs).expert.tolist()), with_kwargs=True)
    _logits(model, ids)
    handle.remove()
    e = next(x for x in seen if x in names)
    return e, names[e]


def _flip_in_stream(path: Path, name: str, at: float = 0.5) -> Path:
    """Flip one byte in the middle of encoded matrix ``name``'s stream, in place; returns its shard."""
    for f in sorted(path.glob("*.safetensors")):
        shard = open_shard(f)
        if name in shard.encoded:
            part = shard.encoded[name].parts["qmoe"]
            stream_bytes = 4 * int(shard.encoded[name].get().stream.size)
            offset = part.begin + 64 + int(at * stream_bytes)  # past the 64-byte matrix header
            del shard
            raw = bytearray(f.read_bytes())
            raw[offset] ^= 0x5A
            f.write_bytes(bytes(raw))
            return f
    raise AssertionError(name)


def test_corrupt_expert_fails_at_first_use(switch_compressed, copy_dir, capsys) -> None:
    ids = torch.tensor([[5, 17, 23, 42, 7, 9, 11, 3]])
    e, name = _routed_expert(qmoe.load(switch_compressed), ids)
    path = copy_dir(switch_compressed)
    shard = _flip_in_stream(path, name)

    model = qmoe.load(path)  # loading reads no expert but the first of each layer
    with pytest.raises(FormatError) as err:
        _logits(model, ids)
    msg = str(err.value)
    assert str(shard) in msg and repr(name) in msg and "row " in msg and "\n" not in msg
    with pytest.raises(FormatError, match=re.escape(name)):
        qmoe.load(path, mapped=False)  # reading at load checks everything there

    r = verify_dir(path)
    assert len(r.problems) == 1 and repr(name) in r.problems[0] and str(shard) in r.problems[0]
    assert main(["verify", str(path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert repr(name) in out and "1 problem(s)" in out


def test_verify_clean(switch_compressed, capsys) -> None:
    r = verify_dir(switch_compressed)
    assert r.ok and r.files == 3 and r.matrices == 2 * 2 * 4 and r.tensors > 0
    assert r.bytes == sum(e.end - e.begin for f in sorted(Path(switch_compressed).glob("*.safetensors"))
                          for s in [open_shard(f)]
                          for e in [*s.tensors.values(), *(p for m in s.encoded.values()
                                                           for p in m.parts.values())])
    seen: list[tuple[int, int]] = []
    verify_dir(switch_compressed, lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
    assert main(["verify", str(switch_compressed), "--quiet"]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_finds_a_missing_expert_and_a_wrong_tensor(switch_compressed, copy_dir) -> None:
    import json

    path = copy_dir(switch_compressed)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts"] += 1  # the shards hold one expert fewer per layer than config.json says
    (path / "config.json").write_text(json.dumps(cfg))
    shard = path / "model-00001-of-00003.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 1  # inside the last non-expert tensor
    shard.write_bytes(bytes(raw))
    problems = verify_dir(path).problems
    assert any("expert matrices are missing" in p for p in problems)
    assert any("fails its crc32 check" in p and "tensor" in p for p in problems)
    with pytest.raises(FormatError, match="fails its crc32 check"):
        qmoe.load(path)  # the non-expert tensors are checked at load


def test_device_memory_check(switch_compressed, monkeypatch) -> None:
    from qmoe.runtime.load import check_device_memory

    model = qmoe.load(switch_compressed)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 10, 80 << 30))
    with pytest.raises(DeviceMemoryError, match=r"cuda:0 has 0\.0 GiB free of 80\.0 GiB, but this model "
                                                r"needs .* GiB there"):
        check_device_memory(model, "cuda:0")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
    check_device_memory(model, "cuda:0")
    check_device_memory(model, "cpu")  # no check off the GPU
