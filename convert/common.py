"""Helpers shared by the converters: the error type, dtype parsing, hashing, locks, atomic folders."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import platformdirs
from filelock import FileLock, Timeout

from convert.interrupts import cleanup_pending, signals_deferred

log = logging.getLogger("hetero_jax")


class ConvertError(ValueError):
    """Input that cannot be converted or loaded; the message says what is wrong and what to do."""


SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def as_dtype(dtype) -> np.dtype:
    """'float32' / 'bfloat16' / 'float16' (or the dtype objects) -> a numpy dtype jax accepts."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ConvertError(f"unknown dtype {dtype!r}; use one of {', '.join(SUPPORTED_DTYPES)}") from e
    if dt.name not in SUPPORTED_DTYPES:
        raise ConvertError(f"dtype {dt.name} is not supported for weights; use one of {', '.join(SUPPORTED_DTYPES)}")
    return dt


def want_progress(progress) -> bool:
    """Explicit True/False wins; None means 'show a bar when a person is watching stderr'."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def existing_path(path, what: str) -> Path:
    """``path`` as a Path, or a ConvertError naming it when it does not exist."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConvertError(f"{p}: no such file or folder; {what}")
    return p


def model_home() -> Path:
    """Where fetched and converted models live: ``$HETERO_JAX_HOME``, else the user cache dir."""
    env = os.environ.get("HETERO_JAX_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("hetero-jax"))


# ---------------------------------------------------------------------------- temp files and locks
_TEMP = re.compile(r"\.(?P<stem>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")
_LEGACY_TEMP = re.compile(r"\.(?P<stem>.+)\.(?:tmp|old)-[0-9a-f]{8}")  # before owners were named
LEGACY_TEMP_AGE_S = 3600


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``path`` named after this process: ``.NAME.tmp-PID-RANDOM``."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(parent: Path, name: str) -> list[Path]:
    """Remove temp siblings of ``parent/name`` whose owner process is dead (killed, crashed).

    Call it while holding the lock for that name, so no live writer of ours is racing it.
    """
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.fullmatch(p.name)
        if m and m["stem"] == name:
            stale = int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))
        else:
            m = _LEGACY_TEMP.fullmatch(p.name)
            stale = bool(m and m["stem"] == name and _age_s(p) > LEGACY_TEMP_AGE_S)
        if stale:
            _remove(p)
            removed.append(p)
    if removed:
        log.info("removed %d stale temp folder(s) left by interrupted runs: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _age_s(p: Path) -> float:
    try:
        return time.time() - p.lstat().st_mtime
    except OSError:
        return 0.0


def _remove(p: Path) -> None:
    with signals_deferred():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def lock_path(dst: Path) -> Path:
    """The lock file guarding writes into ``dst``: in ``model_home()/locks``, not beside ``dst``."""
    dst = dst.parent.resolve() / dst.name
    digest = hashlib.sha256(str(dst).encode()).hexdigest()[:16]
    return model_home() / "locks" / f"{dst.name[:40]}-{digest}.lock"


@contextlib.contextmanager
def destination_lock(dst: Path):
    """Hold the lock for ``dst`` or refuse at once: two writers into one destination never race."""
    path = lock_path(dst)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=0)
        lock.acquire()
    except Timeout:
        raise ConvertError(
            f"{dst}: another process is writing this destination right now (lock {path}); wait for it to "
            "finish or choose another destination"
        ) from None
    except OSError as e:
        raise ConvertError(f"cannot create the lock file {path} ({e.strerror or e}); set HETERO_JAX_HOME to "
                           "a folder you can write to") from e
    try:
        yield path
    finally:
        lock.release()


def writable_dir(folder: Path, what: Path) -> None:
    """Create ``folder`` (and parents) or explain why ``what`` cannot be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"cannot write {what}: {folder}: {e.strerror or e}; choose a destination you can "
                           "write to") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConvertError(f"cannot write {what}: {folder} is not writable; choose a destination you can write to")


def make_temp_dir(tmp: Path, dst: Path) -> None:
    """Create ``tmp`` with signals held: call it inside the ``try`` whose ``finally`` removes ``tmp``.

    A Ctrl-C landing between a bare ``mkdir`` and the ``try`` after it would skip that ``finally``
    and leave the folder behind (seen under load in tests/test_reliability.py).
    """
    try:
        with signals_deferred():
            tmp.mkdir()
    except OSError as e:
        raise ConvertError(f"cannot write {dst}: {e.strerror or e}; choose a destination you can write to") from e


@contextlib.contextmanager
def atomic_dir(dst: Path, overwrite: bool):
    """Yield a temp sibling of ``dst`` to fill; on success it replaces ``dst`` in one rename.

    Holds ``dst``'s lock throughout (a second writer is refused), removes temps that dead
    processes left for ``dst``, and on any failure, Ctrl-C or SIGTERM removes its own temp
    folder, so a reader never sees a half-written ``dst``. An existing ``dst`` is refused
    unless ``overwrite``.
    """
    dst = Path(dst).expanduser().absolute()
    with destination_lock(dst), cleanup_pending():
        if dst.exists() and not overwrite:
            raise ConvertError(f"{dst} already exists; pass overwrite=True (--overwrite) or choose another destination")
        writable_dir(dst.parent, dst)
        remove_stale_temps(dst.parent, dst.name)
        tmp = temp_sibling(dst)
        try:
            make_temp_dir(tmp, dst)
            yield tmp
            with signals_deferred():  # both renames or neither
                if dst.exists():  # rename cannot replace a non-empty folder: move the old one aside first
                    old = temp_sibling(dst, "old")
                    os.replace(dst, old)
                    os.replace(tmp, dst)
                    _remove(old)
                else:
                    os.replace(tmp, dst)
        finally:
            if tmp.exists():
                _remove(tmp)
