"""Build and load the native lane-parallel CPU kernel (``cpu_lanes.c``), once per source and machine.

The C source ships inside the package. On first use it is compiled with the system compiler (``$CC``, else
``cc``) into a per-user cache directory (``$QMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qmoe`` or
``~/.cache/qmoe``, then ``native/``), under a name keyed by a hash of the source, the compiler command and the
machine, then loaded with ctypes. Nothing happens at import. ``load()`` returns the kernel's address (the
numba driver calls it per work item) or raises BackendUnavailable saying why: no compiler, a failed compile,
no AVX2/FMA, not x86-64, an unsafe cache directory. qmoe.kernels.cpu then falls back to the numba kernel.

Loading a shared library runs its constructors, so nobody but the user may choose what gets loaded
(docs/runtime.md): the cache directory must be a real directory (not a symlink) owned by the user with mode
0700, under no world-writable, non-sticky ancestor, else it is refused in one line; no symlink is followed
inside it (``O_NOFOLLOW``); the library's sha256 is written to a sidecar ``<name>.so.sha256`` when it is
built and checked before ``dlopen``, which then loads the very file that was hashed (``/proc/self/fd``); a
library that is not a regular file owned by the user, lacks its sidecar or does not match it is removed
and rebuilt. Processes that find no valid library build it one at a time (a lock file beside it).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import platform
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qmoe.errors import BackendUnavailable

SOURCE = Path(__file__).with_name("cpu_lanes.c")
DENSE16 = Path(__file__).with_name("dense16.c")  # the dense 16-bit kernel, built into the same library
LISTS = Path(__file__).with_name("cpu_lists.c")  # the column-list kernel (qmoe.kernels.lists), likewise
DENSE8 = Path(__file__).with_name("dense8.c")  # the int8 dense kernel (qmoe.kernels.dense8), likewise


def sources() -> tuple[Path, ...]:
    """What the one library is compiled from: the lanes, dense 16-bit, column-list and int8 dense kernels."""
    return (SOURCE, DENSE16, LISTS, DENSE8)
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
    h = hashlib.sha256(b"".join(s.read_bytes() for s in sources()))
    h.update(repr((compiler(), FLAGS, platform.machine(), platform.system())).encode())
    return cache_dir() / f"qmoe_cpu_lanes-{h.hexdigest()[:16]}.so"


def _refuse(d: Path, why: str) -> BackendUnavailable:
    return BackendUnavailable(f"refusing the native kernel cache {d}: {why}; point QMOE_CACHE_DIR at a "
                              "directory of your own with mode 0700")


def private_dir() -> Path:
    """The cache directory, created 0700 if missing; BackendUnavailable (one line) unless it is private."""
    d = cache_dir()
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        d.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError as err:
        raise BackendUnavailable(f"cannot create the native kernel cache {d}: {err}") from err
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise _refuse(d, "it is a symlink or not a directory")
    if st.st_uid != os.getuid():
        raise _refuse(d, f"it is owned by uid {st.st_uid}, not by you")
    if st.st_mode & 0o022:
        raise _refuse(d, f"its mode {stat.S_IMODE(st.st_mode):04o} lets others write to it")
    if st.st_mode & 0o077:  # ours and only we could write (an older qmoe made it 0755): make it private
        os.chmod(d, 0o700, follow_symlinks=False)
    for up in d.resolve().parents:  # whoever can rename entries of an ancestor can swap the directory
        m = os.stat(up).st_mode
        if m & stat.S_IWOTH and not m & stat.S_ISVTX:
            raise _refuse(d, f"its ancestor {up} is world-writable")
    return d


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_own(path: Path) -> tuple[int, bytes] | None:
    """(open fd, contents) of ``path`` if it is a regular file owned by the user that others cannot write,
    opened without following a symlink; None otherwise (missing, a symlink, someone else's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        os.close(fd)
        return None
    with os.fdopen(os.dup(fd), "rb") as f:  # the dup shares fd's offset: rewind it after
        data = f.read()
    os.lseek(fd, 0, os.SEEK_SET)
    return fd, data


def verified(path: Path) -> int | None:
    """An open fd of the library at ``path`` if it and its sidecar pass every check (module docstring) and
    its sha256 matches the sidecar's; None otherwise. The caller closes the fd."""
    lib = _read_own(path)
    if lib is None:
        return None
    fd, data = lib
    side = _read_own(_sidecar(path))
    if side is not None:
        os.close(side[0])
    if side is None or side[1].decode(errors="replace").strip() != hashlib.sha256(data).hexdigest():
        os.close(fd)
        return None
    return fd


def _discard(path: Path) -> None:
    for p in (path, _sidecar(path)):
        try:
            os.unlink(p)  # removes a symlink itself, never its target
        except FileNotFoundError:
            pass


def build(target: Path) -> None:
    """Compile the source into ``target`` and record its sha256 in the sidecar (both atomically: a unique
    temporary name, then rename; the library first, so a crash in between leaves a mismatch: a rebuild)."""
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    cmd = [*compiler(), *FLAGS, *map(str, sources()), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        os.unlink(tmp)
        raise BackendUnavailable(f"cannot compile the native CPU kernel ({' '.join(cmd)}): {err}") from err
    if res.returncode != 0:
        os.unlink(tmp)
        raise BackendUnavailable(f"compiling the native CPU kernel failed ({' '.join(cmd)}):\n"
                                 f"{res.stderr.strip()[-2000:]}")
    os.chmod(tmp, 0o700)
    digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
    fd, side = tempfile.mkstemp(prefix=target.stem, suffix=".sha256.tmp", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(digest + "\n")
    os.replace(tmp, target)
    os.replace(side, _sidecar(target))


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold ``<name>.so.lock`` (flock) while checking, discarding and building ``path``: the processes of
    one job (torchrun ranks) start together on an empty cache, and without it one would discard the
    library another has just renamed into place but not yet given its sidecar, so that the other's
    check fails and it falls back to the numba kernel."""
    fd = os.open(path.with_name(path.name + ".lock"),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, also if the process dies
        yield
    finally:
        os.close(fd)


def library() -> tuple[Path, int]:
    """(path, open fd) of the verified library, built (or rebuilt over anything that fails the checks)."""
    path = private_dir() / library_path().name
    fd = verified(path)
    if fd is not None:
        return path, fd
    try:
        with _build_lock(path):
            fd = verified(path)  # built by another process while this one waited
            if fd is None:
                _discard(path)
                build(path)
                fd = verified(path)
    except OSError as err:  # e.g. a full disk
        raise BackendUnavailable(f"cannot build the native CPU kernel in {path.parent}: {err}") from err
    if fd is None:
        raise BackendUnavailable(f"the native CPU kernel just built at {path} fails its checksum; "
                                 "is another process writing to the cache?")
    return path, fd


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
        path, fd = library()
        # Load the file that was hashed, not whatever the name points at by now.
        by_fd = f"/proc/self/fd/{fd}"
        try:
            lib = ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(path))
        except OSError as err:
            raise BackendUnavailable(f"cannot load the native CPU kernel {path}: {err}") from err
        finally:
            os.close(fd)
        for name in ("qmoe_native_abi", "qmoe_native_cpu_ok", "qmoe_native_item", "qmoe_dense16_item",
                     "qmoe_dense8_item", "qmoe_lists_item", "qmoe_lists_size", "qmoe_lists_fill"):
            getattr(lib, name).restype = ctypes.c_int64
        for name in ("qmoe_lists_size", "qmoe_lists_fill"):
            getattr(lib, name).argtypes = [ctypes.c_int64] * (4 if name.endswith("size") else 5)
        if lib.qmoe_native_abi() != ABI:
            raise BackendUnavailable(f"{path} has ABI {lib.qmoe_native_abi()}, expected {ABI}; delete it")
        if not lib.qmoe_native_cpu_ok():
            raise BackendUnavailable("the native CPU kernel needs AVX2 and FMA, which this CPU lacks")
    except BackendUnavailable as err:
        _state["error"] = err
        raise
    _state["lib"] = lib
    _state["addr"] = ctypes.cast(lib.qmoe_native_item, ctypes.c_void_p).value
    _state["dense16"] = ctypes.cast(lib.qmoe_dense16_item, ctypes.c_void_p).value
    _state["lists"] = ctypes.cast(lib.qmoe_lists_item, ctypes.c_void_p).value
    _state["dense8"] = ctypes.cast(lib.qmoe_dense8_item, ctypes.c_void_p).value
    return _state["addr"]  # type: ignore[return-value]


def dense16() -> int:
    """The address of ``qmoe_dense16_item`` (dense16.c), from the same library as ``load``'s (built and
    loaded on first call); BackendUnavailable when the library cannot be."""
    load()
    return _state["dense16"]  # type: ignore[return-value]


def dense8() -> int:
    """The address of ``qmoe_dense8_item`` (dense8.c), from the same library as ``load``'s; BackendUnavailable
    when the library cannot be loaded."""
    load()
    return _state["dense8"]  # type: ignore[return-value]


def lists() -> tuple[int, ctypes.CDLL]:
    """The address of ``qmoe_lists_item`` (cpu_lists.c) and the library, whose ``qmoe_lists_size`` and
    ``qmoe_lists_fill`` build the lists; BackendUnavailable when the library cannot be loaded."""
    load()
    return _state["lists"], _state["lib"]  # type: ignore[return-value]


def reset() -> None:
    """Forget the outcome of ``load`` (tests: simulate a failed build, then recover)."""
    _state.clear()
