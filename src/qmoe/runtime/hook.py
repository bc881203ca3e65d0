"""Registering qmoe with transformers without importing transformers.

``import qmoe`` calls ``install()``. If transformers' quantizer table (``transformers.quantizers.auto``) is
already imported, qmoe registers at once; otherwise a one-shot import hook registers it right after that
module first executes (which transformers does before any ``from_pretrained`` can run). Either way
``AutoModelFor*.from_pretrained(compressed_dir)`` works after ``import qmoe``, and a program that never
touches transformers pays nothing. Standard library only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

TARGET = "transformers.quantizers.auto"


def install() -> None:
    """Register qmoe with transformers now if possible, else as soon as transformers loads its quantizers."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def _register() -> None:
    try:
        # Importing the module registers; a plain import (no `from ... import`) is also safe when the module
        # is itself mid-import (it imports transformers.quantizers.auto, which can fire the hook).
        importlib.import_module("qmoe.runtime.hf_quantizer")
    except Exception as exc:  # noqa: BLE001 - never break transformers' own import over qmoe's registration
        warnings.warn(f"qmoe could not register with transformers ({type(exc).__name__}: {exc}); "
                      "load compressed models with qmoe.load(DIR)", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``TARGET`` through the other finders and runs ``_register`` after the module executes."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; and the lookup below must not find us again
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register  # this loader instance serves only this module
        return spec
