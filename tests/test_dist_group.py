"""The process group of a distributed compression is ended before the process exits (Dist.close): a gloo
group left to interpreter exit aborted ranks at random ("terminate called without an active exception",
SIGABRT), after successful runs too. The 2-rank launches themselves are in test_distributed.py (slow tier);
these check, in one process and a one-rank gloo group, who ends which group and that compress always does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from qmoe.errors import QMoEError
from qmoe.pipeline import dist as qdist
from qmoe.pipeline import run

_INIT = tdist.init_process_group  # the real one (a test patches the module's)


def _one_rank_group(tmp_path: Path) -> None:
    # torchrun's env:// rendezvous needs a second rank; a file store with world size 1 needs none
    _INIT("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WORLD_SIZE", "2")  # what makes from_environment start a group
    yield
    if tdist.is_initialized():
        tdist.destroy_process_group()


def test_close_ends_the_group_from_environment_started(
    torchrun_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tdist, "init_process_group", lambda *a, **k: _one_rank_group(tmp_path))
    d = qdist.from_environment(torch.device("cpu"))
    assert tdist.is_initialized() and d.owns_group
    d.close()
    assert not tdist.is_initialized() and not d.owns_group
    d.close()  # a second close is harmless


def test_close_leaves_a_group_the_caller_started(torchrun_env: None, tmp_path: Path) -> None:
    _one_rank_group(tmp_path)
    d = qdist.from_environment(torch.device("cpu"))
    assert (d.rank, d.world, d.owns_group) == (0, 1, False)
    d.close()
    assert tdist.is_initialized()  # theirs to end


class _Recording(qdist.Dist):
    closed = 0

    def close(self) -> None:
        _Recording.closed += 1


def test_compress_closes_the_group_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "from_environment", lambda device: _Recording())
    _Recording.closed = 0
    with pytest.raises(QMoEError):
        run.compress(tmp_path / "no-such-model", tmp_path / "out", device="cpu", progress=False)
    assert _Recording.closed == 1
