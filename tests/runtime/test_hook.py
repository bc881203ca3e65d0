"""`import qmoe` teaches transformers the qmoe quantization method, whatever the import order."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; assert 'qmoe' in M, sorted(M)"


ORDERS = (
    "import qmoe; import transformers",  # the hook fires when transformers loads its quantizers
    "import transformers; import qmoe",  # transformers imports lazily: still the hook
    "import transformers.quantizers.auto; import qmoe",  # already loaded: registers at once
    "import qmoe.runtime.hf_quantizer",  # its own import of transformers fires the hook mid-import
)


@pytest.mark.slow  # three fresh interpreters importing transformers: ~17 s
def test_registration_any_import_order() -> None:
    # Fresh interpreters, side by side; any warning (such as a failed registration) is an error.
    procs = [subprocess.Popen([sys.executable, "-W", "error", "-c", f"{order}; {CHECK}"],
                              stderr=subprocess.PIPE, text=True) for order in ORDERS]
    for order, p in zip(ORDERS, procs, strict=True):
        _, err = p.communicate(timeout=500)  # generous: the CI machine is shared
        assert p.returncode == 0, f"{order}: {err}"


def test_register_is_idempotent() -> None:
    from qmoe.runtime.hf_quantizer import register

    register()
    register()
