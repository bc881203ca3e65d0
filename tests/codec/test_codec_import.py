"""``import qmoe`` and ``import qmoe.codec`` stay lean: numba and torch load on first use."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_is_lean() -> None:
    for stmt in ("import qmoe", "import qmoe.codec"):
        mods = _modules_after(stmt)
        heavy = {m for m in mods if m.split(".")[0] in {"numba", "torch", "safetensors", "triton"}}
        assert not heavy, f"{stmt} imports {sorted(heavy)[:5]}"
