"""qmoe: compress Mixture-of-Experts language models below one bit per parameter and run them compressed.

``import qmoe`` is light: it imports no torch, transformers, numba or triton. The public functions below
import what they need on first use. It does register qmoe with transformers (``qmoe.runtime.hook``): once
transformers loads, ``AutoModelFor*.from_pretrained`` accepts qmoe-compressed directories.
"""

from __future__ import annotations

from typing import Any

from qmoe.errors import FormatError, QMoEError
from qmoe.recipes import recipe
from qmoe.runtime.hook import install as _register_with_transformers

__version__ = "0.1.0"

__all__ = ["__version__", "QMoEError", "FormatError", "compress", "load", "evaluate", "recipe"]

_register_with_transformers()


def compress(source: str, out: str, config: Any = None, **kwargs: Any) -> Any:
    """Compress ``source`` (built-in name or HF directory) into ``out``. See ``qmoe.pipeline``.

    ``config``: a ``CompressConfig``, e.g. ``qmoe.recipe("qmoe", calib_samples=512)`` or
    ``qmoe.recipe("default", target_bits=0.9)``; default ``qmoe.recipe("default")``.
    """
    from qmoe.pipeline import compress as _compress

    return _compress(source, out, config=config, **kwargs)


def load(path: str, **kwargs: Any) -> Any:
    """Load a compressed checkpoint as a transformers model with compressed experts."""
    from qmoe.runtime.load import load as _load

    return _load(path, **kwargs)


def evaluate(source: str, **kwargs: Any) -> Any:
    """Span-corruption (or LM) loss of a model on a text split. See ``qmoe.evaluation``."""
    from qmoe.evaluation import evaluate as _evaluate

    return _evaluate(source, **kwargs)
