"""`import qmoe` teaches transformers the qmoe quantization method, whatever the import order."""

from __future__ import annotations

import subprocess
import sys

CHECK = "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; assert 'qmoe' in M, sorted(M)"


ORDERS = (
    "import qmoe; import transformers",  # the hook fires when transformers loads its quantizers
    "import transformers; import qmoe",  # transformers imports lazily: still the hook
    "import transformers.quantizers.auto; import qmoe",  # already loaded: registers at once
)


def test_registration_any_import_order() -> None:
    procs = [subprocess.Popen([sys.executable, "-c", f"{order}; {CHECK}"], stderr=subprocess.PIPE, text=True)
             for order in ORDERS]  # fresh interpreters, run side by side
    for order, p in zip(ORDERS, procs, strict=True):
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, f"{order}: {err}"


def test_register_is_idempotent() -> None:
    from qmoe.runtime.hf_quantizer import register

    register()
    register()
