"""Resume state of an unfinished run: which blocks are done, where the activation snapshots are.

Lives in ``OUT/.qmoe-partial/state.json``, rewritten atomically after every completed block, *after* that
block's shard and the activation snapshots it points to are on disk. A run killed at any moment therefore
finds either the previous or the new state, both consistent; a restart with the same settings (same
fingerprint) continues after ``done`` blocks. ``config.json`` is written last and marks a complete output.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PARTIAL_DIR = ".qmoe-partial"
STATE_FILE = "state.json"
KILL_ENV = "QMOE_TEST_KILL"  # "after:G" / "during:G": SIGKILL ourselves at block G (resume tests)


def kill_hook(stage: str, g: int) -> None:
    """The resume tests' way to die at a chosen point of block ``g``, as a killed run would."""
    if os.environ.get(KILL_ENV) == f"{stage}:{g}":
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of everything that determines the output bytes."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class RunState:
    fingerprint: str
    done: int = 0  # blocks completed, counted over all stacks in order
    buffers: dict[str, str] = field(default_factory=dict)  # buffer name -> snapshot file in the partial dir
    layers: list[dict[str, Any]] = field(default_factory=list)  # report rows of the MoE layers done
    seconds: float = 0.0  # compute time spent by earlier (killed) attempts
    # Where the run computes: {"device": "cpu"|"cuda", "threads": N}. Float reductions (GEMMs, Cholesky)
    # round differently with another thread count or device, so a resume must run under the same one.
    execution: dict[str, Any] = field(default_factory=dict)

    def save(self, partial: Path) -> None:
        atomic_write_text(partial / STATE_FILE, json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def load(cls, partial: Path) -> RunState | None:
        p = partial / STATE_FILE
        if not p.is_file():
            return None
        try:
            return cls(**json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # unreadable state: start over (files are rewritten atomically, so this is rare)
