"""The native kernel cache cannot be used to run someone else's code (qmoe.kernels._native, docs/runtime.md).

Each refusal and each rebuild has its test. Most compile a two-line C file in place of cpu_lanes.c (the cache
logic does not care what it builds); one end-to-end test plants a library whose constructor would leave a
mark, at the path the real kernel is cached under, and loads the kernel in a fresh process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmoe.errors import BackendUnavailable
from qmoe.kernels import _native

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc").split()[0]) is None,
                              reason="no C compiler")
PLANT = '#include <stdio.h>\n__attribute__((constructor)) static void plant(void) {{ ' \
        'FILE *f = fopen("{mark}", "w"); if (f) fclose(f); }}\nint planted(void) {{ return 1; }}\n'


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """QMOE_CACHE_DIR under tmp_path and a tiny source in place of cpu_lanes.c."""
    src = tmp_path / "tiny.c"
    src.write_text("int qmoe_tiny(void) { return 7; }\n")
    monkeypatch.setattr(_native, "SOURCE", src)
    monkeypatch.setenv("QMOE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "native"


def _refusal(match: str) -> None:
    with pytest.raises(BackendUnavailable, match=match) as info:
        _native.private_dir()
    assert "\n" not in str(info.value) and "QMOE_CACHE_DIR" in str(info.value)


def test_cache_dir_is_created_private(cache) -> None:
    assert _native.private_dir() == cache and (cache.stat().st_mode & 0o777) == 0o700


def test_refuses_a_directory_others_can_write(cache) -> None:
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    _refusal("lets others write")


def test_tightens_our_own_readable_directory(cache) -> None:
    cache.mkdir(parents=True)
    cache.chmod(0o755)  # what an older qmoe created: only we could write to it
    _native.private_dir()
    assert (cache.stat().st_mode & 0o777) == 0o700


def test_refuses_a_symlinked_directory(cache, tmp_path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    cache.parent.mkdir(parents=True)
    cache.symlink_to(real)
    _refusal("symlink")


def test_refuses_a_directory_of_another_user(cache, monkeypatch) -> None:
    cache.mkdir(parents=True, mode=0o700)
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # as if it belonged to someone else
    _refusal("owned by uid")


def test_refuses_a_world_writable_ancestor(monkeypatch, tmp_path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may rename our directory away and put theirs there
    monkeypatch.setenv("QMOE_CACHE_DIR", str(shared / "me"))
    _refusal("world-writable")


def _build_tiny(cache: Path) -> Path:
    path, fd = _native.library()
    os.close(fd)
    return path


# Each case compiles the whole library (~5 s): one in the fast tier, the other three in the slow tier.
SLOW_ATTACKS = [pytest.param(a, marks=pytest.mark.slow) for a in ("no sidecar", "symlink", "sidecar symlink")]


@needs_cc
@pytest.mark.parametrize("attack", ["tampered bytes", *SLOW_ATTACKS])
def test_a_library_that_fails_a_check_is_rebuilt(cache, tmp_path, attack: str) -> None:
    path = _build_tiny(cache)
    side = path.with_name(path.name + ".sha256")
    good = path.read_bytes()
    assert side.read_text().strip() == hashlib.sha256(good).hexdigest()
    planted = tmp_path / "planted.so"
    planted.write_bytes(good + b"\0planted")
    if attack == "tampered bytes":
        path.write_bytes(planted.read_bytes())
    elif attack == "no sidecar":
        side.unlink()
        path.write_bytes(planted.read_bytes())
    elif attack == "symlink":
        path.unlink()
        path.symlink_to(planted)
        side.write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")  # even with a matching sum
    else:
        fake = tmp_path / "fake.sha256"
        fake.write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
        path.write_bytes(planted.read_bytes())
        side.unlink()
        side.symlink_to(fake)
    assert _native.verified(path) is None
    path2, fd = _native.library()
    try:
        assert path2 == path and not path.is_symlink() and not side.is_symlink()
        data = os.read(fd, 1 << 20)
        assert b"planted" not in data and side.read_text().strip() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)
    assert planted.read_bytes().endswith(b"planted"), "the symlink's target was written through"


@needs_cc
def test_a_library_of_another_owner_is_rebuilt(cache, monkeypatch) -> None:
    path = _build_tiny(cache)
    uid = os.getuid()
    assert _native.verified(path) is not None
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    assert _native.verified(path) is None  # the owner check alone rejects it


@needs_cc
def test_planted_kernel_never_runs(tmp_path) -> None:
    """A library planted under the real kernel's cached name runs no code: qmoe rebuilds before dlopen."""
    if _native.platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the native kernel is x86-64 only")
    cache = tmp_path / "cache"
    env = {**os.environ, "QMOE_CACHE_DIR": str(cache)}
    where = subprocess.run([sys.executable, "-c", "from qmoe.kernels import _native; "
                            "print(_native.private_dir() / _native.library_path().name)"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    mark = tmp_path / "constructor-ran"
    src = tmp_path / "plant.c"
    src.write_text(PLANT.format(mark=mark))
    subprocess.run([*_native.compiler(), "-shared", "-fPIC", str(src), "-o", where], check=True)
    code = "from qmoe.kernels import _native; assert _native.load()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert not mark.exists(), "the planted library's constructor ran"
    assert b"planted" not in Path(where).read_bytes()


@needs_cc
def test_a_second_process_never_discards_a_library_being_built(cache, monkeypatch) -> None:
    """Two ranks on an empty cache: B looks in the moment A has renamed the library into place but not yet
    its sidecar. B must wait for A, not discard A's file (then A's own check failed: numba fallback)."""
    import threading

    path = _native.private_dir() / _native.library_path().name
    discarded, results = threading.Event(), {}
    real_replace, real_discard = os.replace, _native._discard

    def discard(p: Path) -> None:
        real_discard(p)
        if threading.current_thread().name == "B":
            discarded.set()

    def b() -> None:  # a thread stands in for the other process: flock locks conflict between open files
        try:
            p, fd = _native.library()
            os.close(fd)
            results["B"] = p
        except BackendUnavailable as err:
            results["B"] = err

    def replace(src, dst) -> None:
        real_replace(src, dst)
        if Path(dst) == path and "B" not in threads:  # A's library is in place, its sidecar not yet
            threads["B"] = threading.Thread(target=b, name="B")
            threads["B"].start()
            discarded.wait(timeout=3)  # old behaviour: B discards A's library at once

    threads: dict[str, threading.Thread] = {}
    monkeypatch.setattr(_native, "_discard", discard)
    monkeypatch.setattr(_native.os, "replace", replace)
    a_path, fd = _native.library()  # A
    os.close(fd)
    threads["B"].join(timeout=60)
    assert results["B"] == a_path == path and not discarded.is_set()
