"""Loading a compressed checkpoint as a transformers model whose experts stay encoded.

A compressed directory is an ordinary Hugging Face model directory (docs/pipeline.md, docs/runtime.md) whose
expert weights are encoded matrices. ``load`` is transformers' own ``from_pretrained`` with qmoe registered as
a quantization method (``hf_quantizer.py``), so ``qmoe.load(DIR)`` and ``AutoModelFor*.from_pretrained(DIR)``
build the same model:

1. transformers builds the model from ``config.json`` on the ``meta`` device (no weight memory);
2. ``convert`` (called by the quantizer) swaps every MoE layer's experts container for a ``CompressedExperts``
   and fills it with the encoded matrices read from the shards by ``qmoe.codec.load_shard``, which checks
   every tensor's crc32;
3. transformers loads the non-expert tensors (memory-mapped safetensors, assigned without a second copy when
   the dtype matches), ties the embeddings and sets eval mode.

``load`` first runs ``check_dir`` so that a directory from a newer qmoe, a missing or a corrupt shard is one
``FormatError`` line naming the file, not a transformers traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qmoe.errors import FormatError, SourceError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def quantization_config(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` of a qmoe directory, its format version checked."""
    from qmoe.codec import FORMAT_VERSION

    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "qmoe":
        raise SourceError(f"{path} is not a qmoe-compressed model (config.json has no quantization_config "
                          "with quant_method 'qmoe'); compress it with `qmoe compress` or load it as dense")
    version = qc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{path / 'config.json'}: quantization_config.format_version is {version!r}, not a "
                          "positive integer; the file is corrupt")
    if version > FORMAT_VERSION:
        raise FormatError(f"{path} was written by a newer qmoe (format version {version}; this qmoe "
                          f"{_qmoe_version()} reads up to {FORMAT_VERSION}); upgrade qmoe")
    return qc


def _qmoe_version() -> str:
    from qmoe import __version__

    return __version__


def shard_files(path: Path) -> list[Path]:
    """The checkpoint's shard files (from the index), each present; FormatError naming a missing one."""
    index = path / INDEX_FILE
    if not index.is_file():
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        raise FormatError(f"{path} has no {INDEX_FILE} (nor {SINGLE_FILE}); the compressed checkpoint is "
                          "incomplete: re-run qmoe compress")
    try:
        content = json.loads(index.read_text())
        content["metadata"].items()  # transformers reads it too
        files = sorted(set(content["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{index} is not a valid weight index ({type(exc).__name__}: {exc}); the file is "
                          "corrupt") from None
    # A shard is a file next to the index: no directories, no absolute paths, no '..' (decompress writes
    # each under its own name, which must then be unique too).
    odd = [f for f in files if not isinstance(f, str) or f in ("", ".", "..") or "/" in f or "\\" in f]
    if odd:
        raise FormatError(f"{index} names shard {odd[0]!r}, which is not a plain file name in {path}; the "
                          "index is corrupt or crafted: re-run qmoe compress")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FormatError(f"{path}: shard {missing[0]} is missing ({len(missing)} of {len(files)} shards "
                          f"listed in {INDEX_FILE}); copy it again or re-run qmoe compress")
    return [path / f for f in files]


def check_dir(path: str | Path) -> tuple[Path, dict[str, Any], list[Path]]:
    """``(dir, config dict, shard files)`` of a compressed directory, or a one-line QMoEError."""
    from qmoe.adapters import get_adapter
    from qmoe.sources import read_config

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} is not a model directory (no config.json)")
    cfg = read_config(path)
    quantization_config(path, cfg)
    get_adapter(cfg)  # an unsupported family fails here, before anything is read
    return path, cfg, shard_files(path)


def convert(model: Any, path: Path, cfg: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """Put a ``CompressedExperts`` holding the encoded matrices from ``files`` in place of every MoE layer's
    experts container of ``model`` (usually still on ``meta``). Returns ``{moe layer path: module}``.
    """
    from qmoe.adapters import get_adapter
    from qmoe.codec import load_shard
    from qmoe.runtime.experts import CompressedExperts
    from qmoe.runtime.linear import CompressedLinear

    adapter = get_adapter(cfg)
    layout = adapter.experts
    n_experts = adapter.num_experts(cfg)
    shapes = {p: layout.shape(cfg, p) for p in layout.projections}
    modules: dict[str, CompressedExperts] = {}
    slots: dict[str, tuple[CompressedExperts, int, str]] = {}  # on-disk key -> (module, expert, projection)
    for layer in adapter.moe_layers(cfg):
        parent = _submodule(model, layer)
        module = CompressedExperts(layout, adapter.routing, n_experts, adapter.expert_glu(cfg), shapes,
                                   adapter.activation(cfg))
        setattr(parent, layout.container, module)
        # transformers re-initialises modules it did not load weights into; these have none to initialise,
        # and the family's _init_weights would index the experts container it expects.
        parent._is_hf_initialized = True
        module._is_hf_initialized = True
        modules[layer] = module
        for e in range(n_experts):
            for proj in layout.projections:
                slots[layout.expert_key(adapter.disk_key(layer), e, proj)] = (module, e, proj)
    for f in files:
        shard = load_shard(f, verify=True)  # crc32 of every tensor in the file, experts and the rest
        for name, enc in shard.encoded.items():
            if name not in slots and _is_shared(adapter, name):  # --shared-experts ternary|2
                path_ = adapter.module_key(name).removesuffix(".weight")
                parent, _, child = path_.rpartition(".")
                CompressedLinear.replacing(_submodule(model, parent), child, enc)
                continue
            if name not in slots:
                raise FormatError(f"{f}: encoded matrix {name!r} is not an expert weight of this "
                                  f"{cfg.get('model_type')} model; the checkpoint does not match config.json")
            module, e, proj = slots.pop(name)
            module.set_expert(e, proj, enc, name)
    if slots:
        first = next(iter(slots))
        raise FormatError(f"{path}: {len(slots)} expert weights are missing from the shards (first: "
                          f"{first}); the checkpoint is incomplete: re-run qmoe compress")
    return modules


def _is_shared(adapter: Any, name: str) -> bool:
    """Whether encoded matrix ``name`` is a shared-expert weight (``<moe layer>.<shared>.<proj>.weight``)."""
    parts = adapter.module_key(name).split(".")
    return (adapter.shared_experts is not None and len(parts) >= 3 and parts[-3] == adapter.shared_experts
            and parts[-1] == "weight")


def _submodule(model: Any, name: str) -> Any:
    """``model``'s module at the checkpoint path ``name`` (also for a base model without the task head)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        if prefix != "." and name.startswith(prefix):
            return model.get_submodule(name[len(prefix):])
        raise


def load(path: str | Path, device: str = "cpu", dtype: Any = None, backend: str | None = None) -> Any:
    """The compressed model in ``path`` as a transformers model in eval mode (see the module docstring).

    ``dtype`` is that of the non-expert weights and activations (default float32: this is what CPUs run
    fastest, and what dense models load in elsewhere in qmoe); the experts compute in float32.
    ``device``: where everything lives. On a GPU the encoded experts are packed for the device here, once
    per layer and projection, and generation needs no host round trip per token. ``backend``: the experts'
    kernel backend (``cpu``, ``triton``, ``reference``; default triton on CUDA, cpu otherwise; ``triton`` on
    the CPU runs Triton's interpreter when ``TRITON_INTERPRET=1``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    import qmoe.runtime.hf_quantizer  # noqa: F401 - registers qmoe with transformers (if the hook has not)
    from qmoe.adapters import get_adapter

    path, cfg, _ = check_dir(path)
    auto = AutoModelForSeq2SeqLM if get_adapter(cfg).is_encoder_decoder else AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(str(path), dtype=dtype or torch.float32, output_loading_info=True)
    except (OSError, ValueError) as exc:  # transformers' way of saying a file is unreadable
        raise FormatError(f"cannot load {path} ({type(exc).__name__}: {str(exc)[:200]})") from None
    bad = {k: sorted(v)[:3] for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise FormatError(f"{path}: the shards do not match config.json ({bad}); re-run qmoe compress")
    from qmoe.runtime.experts import CompressedExperts
    from qmoe.runtime.linear import CompressedLinear

    model.to(device)
    for m in model.modules():
        if isinstance(m, CompressedExperts):
            m.backend = backend
            m.prepare(device, backend)  # device state for backends that keep one (triton); else a no-op
        elif isinstance(m, CompressedLinear):
            m.backend = backend
    return model.eval()
