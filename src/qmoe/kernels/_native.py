"""Build and load the native lane-parallel CPU kernel (``cpu_lanes.c``), once per source and machine.

The C source ships inside the package. On first use it is compiled with the system compiler (``$CC``, else
``cc``) into a per-user cache directory (``$QMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qmoe`` or
``~/.cache/qmoe``), under a name keyed by a hash of the source, the compiler command and the machine, then
loaded with ctypes. Nothing happens at import. ``load()`` returns the kernel's address (the numba driver
calls it per work item) or raises BackendUnavailable saying why: no compiler, a failed compile, no AVX2/FMA,
not x86-64. qmoe.kernels.cpu then falls back to the numba kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from qmoe.errors import BackendUnavailable

SOURCE = Path(__file__).with_name("cpu_lanes.c")
ABI = 2 * 1000 + 20  # QMOE_NATIVE_ABI * 1000 + NMETA in cpu_lanes.c; NMETA = qmoe.kernels._cpu_numba.NMETA
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-strict-aliasing"]
COMPILE_TIMEOUT_S = 120

_state: dict[str, object] = {}  # "lib": the CDLL, "addr": kernel address, "error": the BackendUnavailable


def cache_dir() -> Path:
    root = os.environ.get("QMOE_CACHE_DIR")
    if root:
        return Path(root) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qmoe" / "native"


def compiler() -> list[str]:
    return (os.environ.get("CC") or "cc").split()


def library_path() -> Path:
    """Where the compiled kernel for this source, compiler command and machine lives."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(repr((compiler(), FLAGS, platform.machine(), platform.system())).encode())
    return cache_dir() / f"qmoe_cpu_lanes-{h.hexdigest()[:16]}.so"


def build(target: Path) -> None:
    """Compile the source into ``target`` (atomically: a unique temporary name, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    cmd = [*compiler(), *FLAGS, str(SOURCE), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        os.unlink(tmp)
        raise BackendUnavailable(f"cannot compile the native CPU kernel ({' '.join(cmd)}): {err}") from err
    if res.returncode != 0:
        os.unlink(tmp)
        raise BackendUnavailable(f"compiling the native CPU kernel failed ({' '.join(cmd)}):\n"
                                 f"{res.stderr.strip()[-2000:]}")
    os.replace(tmp, target)


def load() -> int:
    """The address of ``qmoe_native_item`` (built and loaded on first call); BackendUnavailable otherwise.
    The outcome is remembered for the process."""
    if "addr" in _state:
        return _state["addr"]  # type: ignore[return-value]
    if "error" in _state:
        raise _state["error"]  # type: ignore[misc]
    try:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise BackendUnavailable(f"the native CPU kernel needs x86-64, not {platform.machine()}")
        path = library_path()
        if not path.is_file():
            try:
                build(path)
            except OSError as err:  # e.g. an unwritable cache directory
                msg = f"cannot build the native CPU kernel in {path.parent}: {err}"
                raise BackendUnavailable(msg) from err
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as err:
            raise BackendUnavailable(f"cannot load the native CPU kernel {path}: {err}") from err
        for name in ("qmoe_native_abi", "qmoe_native_cpu_ok", "qmoe_native_item"):
            getattr(lib, name).restype = ctypes.c_int64
        if lib.qmoe_native_abi() != ABI:
            raise BackendUnavailable(f"{path} has ABI {lib.qmoe_native_abi()}, expected {ABI}; delete it")
        if not lib.qmoe_native_cpu_ok():
            raise BackendUnavailable("the native CPU kernel needs AVX2 and FMA, which this CPU lacks")
    except BackendUnavailable as err:
        _state["error"] = err
        raise
    _state["lib"] = lib
    _state["addr"] = ctypes.cast(lib.qmoe_native_item, ctypes.c_void_p).value
    return _state["addr"]  # type: ignore[return-value]


def reset() -> None:
    """Forget the outcome of ``load`` (tests: simulate a failed build, then recover)."""
    _state.clear()
