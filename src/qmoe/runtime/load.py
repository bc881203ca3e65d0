"""Loading a compressed checkpoint as a transformers model whose experts stay encoded.

A compressed directory is an ordinary Hugging Face model directory (docs/pipeline.md, docs/runtime.md) whose
expert weights are encoded matrices. ``load`` is transformers' own ``from_pretrained`` with qmoe registered as
a quantization method (``hf_quantizer.py``), so ``qmoe.load(DIR)`` and ``AutoModelFor*.from_pretrained(DIR)``
build the same model:

1. transformers builds the model from ``config.json`` on the ``meta`` device (no weight memory);
2. ``convert`` (called by the quantizer) swaps every MoE layer's experts container for a ``CompressedExperts``
   and fills it with the shards' encoded matrices. By default (``mapped=True``) the shards are opened in place
   (``qmoe.codec.mapped.open_shard``: only their headers are read, the files are memory-mapped), the
   non-expert tensors' crc32 are checked here, and each expert is a handle checked (crc32, structure, shape)
   and opened the first time a token routes to it; shared-expert matrices are checked here. The first
   expert of each layer and projection is opened here too, so a checkpoint that does not match its config
   fails at load. ``mapped=False`` reads every matrix into memory and checks all of them here
   (``qmoe.codec.load_shard``), as qmoe did before;
3. transformers loads the non-expert tensors (memory-mapped safetensors, assigned without a second copy when
   the dtype matches), ties the embeddings and sets eval mode.

``load`` first runs ``check_dir`` so that a directory from a newer qmoe, a missing or a corrupt shard is one
``FormatError`` line naming the file, not a transformers traceback. On a GPU every expert is copied to device
memory (the triton backend packs them there); ``check_device_memory`` refuses, in one line naming the sizes, a
model whose non-expert weights and encoded experts do not fit the device's free memory.
"""

from __future__ import annotations

import contextvars
import json
from functools import partial
from pathlib import Path
from typing import Any

from qmoe.errors import DeviceMemoryError, FormatError, SourceError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Whether convert() maps the shards (load's ``mapped``); a context variable because transformers calls
# convert() from inside from_pretrained, through the quantizer, with no way to pass an argument.
MAPPED: contextvars.ContextVar[bool] = contextvars.ContextVar("qmoe_mapped", default=True)


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
    from qmoe.adapters.drop import drop_experts
    from qmoe.codec import load_shard
    from qmoe.codec.mapped import MappedMatrix, open_shard
    from qmoe.runtime.experts import CompressedExperts
    from qmoe.runtime.linear import CompressedLinear

    adapter = get_adapter(cfg)
    layout = adapter.experts
    n_experts = adapter.num_experts(cfg)
    shapes = {p: layout.shape(cfg, p) for p in layout.projections}
    modules: dict[str, CompressedExperts] = {}
    dropped_cfg = (cfg.get("quantization_config") or {}).get("dropped_experts") or {}
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
        dropped = _dropped(dropped_cfg, adapter.disk_key(layer), n_experts, path)
        if dropped:  # no weights stored; the router is masked once transformers has loaded it
            module.drop(dropped)
            top_k = adapter.top_k(cfg)
            module.drop_router = partial(drop_experts, adapter, parent, dropped, n_experts, top_k)
        for e in range(n_experts):
            if e in dropped:
                continue
            for proj in layout.projections:
                slots[layout.expert_key(adapter.disk_key(layer), e, proj)] = (module, e, proj)
    mapped = MAPPED.get()
    for f in files:
        if mapped:
            shard = open_shard(f)  # the header only; the file is mapped
            for t in shard.tensors:
                shard.check_tensor(t)  # the non-expert tensors: crc32 now (read once, by pread)
        else:
            shard = load_shard(f, verify=True)  # crc32 of every tensor in the file, experts and the rest
        for name, enc in shard.encoded.items():
            if name not in slots and _is_shared(adapter, name):  # --shared-experts ternary|2
                path_ = adapter.module_key(name).removesuffix(".weight")
                parent, _, child = path_.rpartition(".")
                # used by every token: checked and opened now
                CompressedLinear.replacing(_submodule(model, parent), child,
                                           enc.get() if isinstance(enc, MappedMatrix) else enc)
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
    for module in modules.values():  # a checkpoint that does not match config.json fails now, not mid-way
        kept = next(e for e in range(n_experts) if e not in module.dropped)
        for proj in layout.projections:
            module.matrix(proj, kept)
    return modules


def _dropped(dropped_cfg: dict[str, Any], layer: str, n_experts: int, path: Path) -> tuple[int, ...]:
    """The experts of MoE layer ``layer`` (on-disk path) that the checkpoint stores no weights for."""
    got = dropped_cfg.get(layer, [])
    if not isinstance(got, list) or not all(isinstance(e, int) and 0 <= e < n_experts for e in got):
        raise FormatError(f"{path / 'config.json'}: quantization_config.dropped_experts[{layer!r}] is "
                          f"{got!r}, not a list of expert indices below {n_experts}; the file is corrupt")
    return tuple(sorted(set(got)))


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


def check_device_memory(model: Any, device: Any) -> None:
    """DeviceMemoryError, naming the sizes, unless ``model``'s weights and encoded experts fit the free
    memory of CUDA ``device`` (``torch.cuda.mem_get_info``); a no-op for other devices."""
    import torch

    from qmoe.runtime.experts import CompressedExperts

    device = torch.device(device)
    if device.type != "cuda":
        return
    dense = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    layers = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    experts = sum(m.nbytes for m in layers)
    # The triton backend keeps a [4096] int32 decode table per matrix next to the streams.
    tables = 4 * 4096 * sum(len(mats) for m in layers for mats in m.matrices.values())
    free, total = torch.cuda.mem_get_info(device)
    need = dense + experts + tables
    if need > free:
        gib = 2**30
        raise DeviceMemoryError(
            f"{device} has {free / gib:.1f} GiB free of {total / gib:.1f} GiB, but this model needs "
            f"{need / gib:.1f} GiB there ({dense / gib:.1f} GiB of non-expert weights, "
            f"{(experts + tables) / gib:.1f} GiB of encoded experts and their decode tables); load it with "
            "device='cpu' (experts run memory-mapped from the files) or on a GPU with more free memory")


def load(path: str | Path, device: str = "cpu", dtype: Any = None, backend: str | None = None,
         mapped: bool = True, half_weights: bool | None = None, int8_weights: bool = False) -> Any:
    """The compressed model in ``path`` as a transformers model in eval mode (see the module docstring).

    ``dtype`` is that of the non-expert weights and activations (default float32: this is what CPUs run
    fastest, and what dense models load in elsewhere in qmoe); the experts compute in float32.
    ``device``: where everything lives. On a GPU the encoded experts are packed for the device here, once
    per layer and projection, and generation needs no host round trip per token. ``backend``: the experts'
    kernel backend (``cpu``, ``triton``, ``reference``; default triton on CUDA, cpu otherwise; ``triton`` on
    the CPU runs Triton's interpreter when ``TRITON_INTERPRET=1``). ``mapped``: experts used in place from
    the memory-mapped shards and checked on first use (default), or read and checked at load (False).
    ``half_weights``: on the CPU with float32 activations, keep the non-expert weights that the checkpoint
    stores in fp16/bf16 in that type and widen them in registers (``qmoe.runtime.half``: the same results,
    half the memory and bytes per token). Default (None): whenever the checkpoint stores them so and the
    native kernel is available; False: widen them to float32 at load, as before.
    ``int8_weights``: on the CPU with float32 activations, quantize the non-expert Linear weights (attention,
    LM head; not routers, embeddings or norms) to int8 with a scale per output row (``qmoe.runtime.int8``):
    half the bytes a decode step reads of 16-bit weights, at the cost of their rounding (docs/results.md).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    import qmoe.runtime.hf_quantizer  # noqa: F401 - registers qmoe with transformers (if the hook has not)
    from qmoe.adapters import get_adapter

    path, cfg, _ = check_dir(path)
    auto = AutoModelForSeq2SeqLM if get_adapter(cfg).is_encoder_decoder else AutoModelForCausalLM
    if int8_weights and (torch.device(device).type != "cpu" or dtype not in (None, torch.float32)):
        from qmoe.errors import ConfigError

        raise ConfigError(f"int8_weights=True is a CPU path for float32 activations, not device {device!r} "
                          f"with dtype {dtype}; load with device='cpu' and the default dtype, or without it")
    half = _half_dtype(path, device, dtype, half_weights)
    token = MAPPED.set(mapped)
    try:
        model, info = auto.from_pretrained(str(path), dtype=half or dtype or torch.float32,
                                           output_loading_info=True)
    except (OSError, ValueError) as exc:  # transformers' way of saying a file is unreadable
        raise FormatError(f"cannot load {path} ({type(exc).__name__}: {str(exc)[:200]})") from None
    finally:
        MAPPED.reset(token)
    bad = {k: sorted(v)[:3] for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise FormatError(f"{path}: the shards do not match config.json ({bad}); re-run qmoe compress")
    from qmoe.runtime.experts import CompressedExperts
    from qmoe.runtime.linear import CompressedLinear

    if half is not None:
        from qmoe.runtime.half import narrow

        narrow(model, get_adapter(cfg).wide_linears)
    if int8_weights:
        from qmoe.runtime.int8 import quantize_linears, routers

        adapter = get_adapter(cfg)
        quantize_linears(model, adapter.wide_linears, routers(model, adapter.router))
    check_device_memory(model, device)
    model.to(device)
    for m in model.modules():
        if isinstance(m, CompressedExperts):
            m.backend = backend
            m.prepare(device, backend)  # device state for backends that keep one (triton); else a no-op
        elif isinstance(m, CompressedLinear):
            m.backend = backend
    return model.eval()


def _half_dtype(path: Path, device: str, dtype: Any, half_weights: bool | None) -> Any:
    """The 16-bit dtype to load the non-expert weights in (``load``'s ``half_weights``), or None: float32 or
    ``dtype`` everywhere, as transformers loads them."""
    import torch

    from qmoe.errors import ConfigError
    from qmoe.runtime.half import HALF, checkpoint_dtype

    if half_weights is False:
        return None
    why = None
    if torch.device(device).type != "cpu":
        why = f"device {device!r} (16-bit weights widened in registers are a CPU path)"
    elif dtype not in (None, torch.float32):
        why = f"dtype {dtype} (the 16-bit weights are for float32 activations)"
    stored = checkpoint_dtype(path)
    if why is None and stored not in HALF:
        why = f"the checkpoint stores its non-expert weights as {stored}"
    if why is None:
        from qmoe.kernels.dense16 import available

        if not available() and half_weights is None:
            why = "the native kernel is unavailable"
    if why is None:
        return stored
    if half_weights:
        raise ConfigError(f"half_weights=True cannot apply: {why}; load with half_weights=None or False")
    return None
