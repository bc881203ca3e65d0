"""Model sources: built-in names (shipped inside the package) and local Hugging Face directories.

Checks here run before any compute is spent and raise :class:`SourceError` with a one-line message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qmoe.errors import SourceError

BUILTIN_DIR = Path(__file__).parent / "models"
BUILTINS = ("tiny-switch", "tiny-qwen3-moe")

# Config fields under which the families we know store their expert count.
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")


def resolve_device(device: Any) -> Any:
    """A ``torch.device`` for ``--device`` (None: CUDA if available, else CPU); ConfigError if unusable."""
    import torch

    from qmoe.errors import ConfigError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid --device {device!r}; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_source(source: str | Path) -> Path:
    """The directory of a built-in model name or a local HF model directory (validated)."""
    s = str(source)
    if s in BUILTINS:
        path = BUILTIN_DIR / s
        if not (path / "config.json").is_file():
            raise SourceError(f"the built-in model {s!r} is missing from this installation ({path}); "
                              "reinstall qmoe")
        return path
    path = Path(s).expanduser()
    if not path.exists():
        hint = f"built-in models: {', '.join(BUILTINS)}"
        if "/" not in s and not s.startswith("."):
            raise SourceError(f"unknown built-in model {s!r} and no such directory; {hint}")
        raise SourceError(f"{s} does not exist; pass a local Hugging Face model directory or one of: "
                          f"{', '.join(BUILTINS)}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise SourceError(f"{s} is not a model directory (no config.json); pass a local Hugging Face model "
                          "directory (config.json + *.safetensors) or a built-in name")
    return path


def read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path / 'config.json'} is not readable JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise SourceError(f"{path / 'config.json'} does not hold a JSON object")
    return cfg


def num_experts(cfg: dict[str, Any]) -> int:
    """Experts per MoE layer according to the config, 0 for a dense model."""
    for field in _EXPERT_COUNT_FIELDS:
        value = cfg.get(field)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def require_moe(path: Path, cfg: dict[str, Any]) -> None:
    if num_experts(cfg) <= 1:
        raise SourceError(f"{path} is a model without MoE layers (model_type={cfg.get('model_type')!r}); "
                          "qmoe "
                          "compresses Mixture-of-Experts models only")


def is_compressed(cfg: dict[str, Any]) -> bool:
    qc = cfg.get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "qmoe"


def load_model(source: str | Path, dtype: Any = None, device: Any = "cpu",
               backend: str | None = None, int8_weights: bool = False) -> tuple[Any, Any, Path]:
    """(model, tokenizer, dir) for a built-in name, a dense HF directory or a qmoe-compressed directory.

    Dense models load in float32 (CPU paths stay in fp32; this machine has no native bf16). ``device``: where
    the whole model lives (for a compressed one, its encoded experts too); ``backend``: the kernel backend of
    compressed experts (default by device, see ``qmoe.runtime.load``); ``int8_weights``: a compressed model's
    attention and head quantized to int8 at load (``qmoe.runtime.int8``; ConfigError for a dense source).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are enough

    path = resolve_source(source)
    cfg = read_config(path)
    require_moe(path, cfg)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        # transformers 5 would silently build an empty tokenizer here and every loss would be meaningless.
        raise SourceError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); copy the "
                          "tokenizer of the model into the directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
        raise SourceError(f"{path} has no usable tokenizer ({type(exc).__name__}); copy the tokenizer files "
                          "(tokenizer.json, tokenizer_config.json) into it") from exc
    if is_compressed(cfg):
        from qmoe.runtime.load import load

        model = load(path, device=str(resolve_device(device)), backend=backend, int8_weights=int8_weights)
        return model, tokenizer, path
    if int8_weights:
        from qmoe.errors import ConfigError

        raise ConfigError(f"--int8-weights quantizes the attention and head of a qmoe-compressed model; "
                          f"{source} is a dense model (drop --int8-weights, or pass a compressed directory)")
    config = AutoConfig.from_pretrained(str(path))
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(path), dtype=dtype or torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SourceError(f"cannot load the weights of {path} ({type(exc).__name__}: {str(exc)[:200]}); "
                          "check that its shards are complete") from exc
    return model.to(resolve_device(device)).eval(), tokenizer, path
