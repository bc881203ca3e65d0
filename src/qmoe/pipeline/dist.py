"""Compression on several processes (``torchrun ... -m qmoe compress``) with the bytes of one process.

What each rank does, so that the output is byte-identical to a single-process run with the same settings
and the same threads per process:

- **Experts** are split: a rank reads, holds and computes only a contiguous range of each MoE layer's
  experts, ``E / world`` of them (:meth:`Dist.owned`), so memory per rank falls with the ranks.
- **Hessian capture passes** run every calibration batch on every rank (a Hessian must sum its tokens in
  the single run's order; attention and routers are replicated), each rank accumulating its own experts'
  Hessians, one GEMM per expert over exactly its tokens, so nothing depends on which experts a rank holds.
- **GPTQ** quantizes the owned experts; only report statistics are gathered (:meth:`Dist.gather_experts`).
  Each expert's arithmetic does not depend on which other experts are in its batch (tested: same bytes).
- **Propagation through an MoE block** runs every batch on every rank; each rank computes its experts'
  gate-weighted outputs, all are gathered (:meth:`Dist.all_gather_rows`) and added into the output in
  ascending expert order, one accumulating ``index_put_`` per expert, exactly as one process adds them.
- **Propagation through a dense block** splits the batches: rank ``r`` runs batches ``r, r + world, ...``
  with the single run's batch boundaries, and every batch's rows are then broadcast from the rank that
  computed them (:meth:`Dist.share_rows`). A batch's output depends only on its own samples.
- **Encoding** of the owned experts is split too; rank 0 gathers the encoded matrices and writes the shard,
  the resume state and the activation snapshots. Resume reads them on every rank, so ``--out`` must be on a
  filesystem every rank sees (checked at start).
- A size target (``--target-bits``) needs the whole group's size in each step of its search: the ranks sum
  their integer byte counts (:meth:`Dist.sum_ints`), so every rank takes the same decisions.

Errors: work runs inside :meth:`Dist.guard`, which turns an exception into a one-line ``RankFailed`` naming
the rank and what it was doing (the MoE layer); ``qmoe compress`` prints it and the process exits. Its
connections close, so a rank waiting for it in a collective fails at once (with a line saying it lost a
rank, :meth:`Dist._collective`) rather than hanging, and torchrun stops the job and names the failed rank
too. No status exchange is attempted: the other ranks may be inside a different collective (a size target's
search runs several), and mismatched collectives would hang. A rank that dies outright (a kill, out of
memory) is the same case. The rerun resumes after the last block rank 0 finished.
Collectives: gloo for CPU tensors, NCCL for CUDA tensors (``cpu:gloo,cuda:nccl``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from qmoe.errors import ConfigError, QMoEError
from qmoe.pipeline.comm import Local

T = TypeVar("T")
TIMEOUT_ENV = "QMOE_DIST_TIMEOUT"  # seconds a rank waits in a collective (default 1800)


class RankFailed(QMoEError):
    """Another rank (or this one) failed; the message names the rank and the layer."""


class Dist(Local):
    """This process's place in a torchrun job: ``rank`` of ``world`` (with ``world == 1`` every call is
    local, as :class:`qmoe.pipeline.comm.Local`'s)."""

    def __init__(self, rank: int = 0, world: int = 1, owns_group: bool = False) -> None:
        self.rank, self.world = rank, world
        self.owns_group = owns_group  # from_environment started the process group: close() ends it

    def close(self) -> None:
        """End the process group this job started (:func:`from_environment`); a group the caller started
        is left alone. Every rank must call this before its process exits, also after a failure: a gloo
        group still alive at interpreter exit is torn down by static destructors while its threads run,
        and ``std::terminate`` aborts the process ("terminate called without an active exception",
        SIGABRT), at random, after a successful run too. No collective is left pending when this is called
        (every collective here waits for its result), so it returns at once; a peer still waiting on this
        rank sees its connection close and fails, as when the process exits."""
        if not self.owns_group:
            return
        import torch.distributed as dist

        self.owns_group = False
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- errors ----------------------------------------------------------------------------------------------
    def guard(self, fn: Callable[[], T], where: str) -> T:
        """``fn()``; in a distributed job an exception becomes one line naming this rank and ``where``."""
        if not self.active:
            return fn()
        try:
            return fn()
        except RankFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of this rank ends the job with one line
            msg = str(exc).splitlines()[0] if str(exc) else ""
            raise RankFailed(
                f"rank {self.rank} of {self.world} failed at {where}: {type(exc).__name__}: {msg[:300]}; fix "
                "the cause and rerun the same command to resume after the last finished block"
            ) from exc

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """A collective that fails because another rank is gone says so in one line."""
        try:
            yield
        except RuntimeError as exc:  # gloo / NCCL: connection closed, timeout
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RankFailed(
                f"rank {self.rank} of {self.world} lost another rank during {what} ({first}); its own "
                "error says why; rerun the same command to resume"
            ) from exc

    # -- collectives -----------------------------------------------------------------------------------------
    def gather_experts(self, local: Tensor, n_experts: int) -> Tensor:
        """``[E, ...]`` on every rank from each rank's owned ``[E_r, ...]`` (an exact copy)."""
        if not self.active:
            return local
        import torch.distributed as dist

        sizes = [len(Dist(r, self.world).owned(n_experts)) for r in range(self.world)]
        pad = max(sizes)
        buf = torch.zeros((pad, *local.shape[1:]), dtype=local.dtype, device=local.device)
        buf[: local.shape[0]] = local
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        with self._collective("all_gather"):
            dist.all_gather(parts, buf)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    def all_gather_rows(self, local: Tensor) -> list[Tensor]:
        """Every rank's ``local [n_r, ...]`` (``n_r`` may differ), in rank order, on every rank."""
        if not self.active:
            return [local]
        import torch.distributed as dist

        sizes = [int(v) for v in self.all_ints(local.shape[0])]
        buf = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
        buf[: local.shape[0]] = local
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        with self._collective("all_gather"):
            dist.all_gather(parts, buf)
        return [p[:s] for p, s in zip(parts, sizes, strict=True)]

    def all_ints(self, value: int) -> list[int]:
        """Every rank's integer, in rank order."""
        import torch.distributed as dist

        parts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        with self._collective("all_gather"):
            dist.all_gather(parts, torch.tensor([value], dtype=torch.int64))
        return [int(p) for p in parts]

    def share_rows(self, data: Tensor, batches: Sequence[tuple[int, int]]) -> None:
        """After a split propagation pass: rows ``i0:i1`` of batch ``j`` from rank ``j % world`` to all."""
        if not self.active:
            return
        import torch.distributed as dist

        for j, (i0, i1) in enumerate(batches):
            rows = data[i0:i1]
            if rows.is_contiguous():
                with self._collective("broadcast"):
                    dist.broadcast(rows, src=j % self.world)
            else:  # pragma: no cover - buffers are contiguous along the sample axis
                tmp = rows.contiguous()
                dist.broadcast(tmp, src=j % self.world)
                rows.copy_(tmp)

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        """Element-wise sum over ranks of integer counts (exact, so every rank gets the same)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64)
        with self._collective("all_reduce"):
            dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (``None`` elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.main else None
        with self._collective("gather_object"):
            dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            with self._collective("barrier"):
                dist.barrier()

    def check_shared_dir(self, path: Path) -> None:
        """Refuse an output directory that not every rank sees (resume state and shards live there)."""
        if not self.active:
            return
        token = path / f".qmoe-rank-check-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
        if self.main:
            path.mkdir(parents=True, exist_ok=True)
            token.write_text("qmoe\n")
        self.barrier()
        seen = self.sum_ints([int(token.is_file())])[0]
        self.barrier()
        if self.main:
            token.unlink(missing_ok=True)
        if seen != self.world:
            raise ConfigError(
                f"--out {path} is not visible to every rank ({seen} of {self.world} see it); put it on a "
                "filesystem all nodes share"
            )


def local_launcher(ranks: int) -> list[str]:
    """The command prefix that runs ``qmoe ...`` on ``ranks`` processes of this machine (torchrun's module;
    one process: plain ``python -m qmoe``), for scripts and tests."""
    import sys

    if ranks <= 1:
        return [sys.executable, "-m", "qmoe"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "-m",
        "qmoe",
    ]


def from_environment(device: torch.device) -> Local:
    """The job torchrun describes (``WORLD_SIZE``, ``RANK``), its process group started (unless the caller
    started one); else one process. The caller ends it with :meth:`Dist.close` before the process exits."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Local()
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed; run one process")
    if dist.is_initialized():  # the caller's group: theirs to end
        return Dist(dist.get_rank(), dist.get_world_size())
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), owns_group=True)


def settle_threads() -> tuple[int, str | None]:
    """Run this process (one rank, or the one process) on the threads its environment asks for:
    ``OMP_NUM_THREADS`` when set (torchrun sets 1 per rank unless the user did), else torch's default.

    torch and numba's OpenMP layer share one OpenMP runtime, so ``numba.set_num_threads`` also sets torch's
    count: left alone, numba (one thread per core by default) raised a 1-thread run to 2 threads after its
    first encode, and the bytes followed (float reductions round with the thread count). Both are set to
    one count here; returns it and, when it is not the one asked for, a one-line reason."""
    import numba

    asked, note = torch.get_num_threads(), None
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            asked = max(1, int(env))
        except ValueError:
            note = f"OMP_NUM_THREADS={env!r} is not a thread count; using torch's {asked}"
    threads = min(asked, numba.config.NUMBA_NUM_THREADS)
    if threads != asked:
        cap = numba.config.NUMBA_NUM_THREADS
        note = (f"running on {threads} threads, not the {asked} asked for: numba is capped at "
                f"NUMBA_NUM_THREADS={cap} and shares OpenMP's thread count with torch")
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)  # after numba: its call sets the shared OpenMP count too
    return torch.get_num_threads(), note


def local_device(device: torch.device) -> torch.device:
    """A CUDA device per local rank (``LOCAL_RANK``) when several processes share a machine's GPUs."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % max(1, torch.cuda.device_count()))
    return device
