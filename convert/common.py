"""Helpers shared by the converters: the error type, dtype parsing, hashing, atomic folders."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import uuid
from pathlib import Path

import jax.numpy as jnp
import numpy as np


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


@contextlib.contextmanager
def atomic_dir(dst: Path, overwrite: bool):
    """Yield a temp sibling of ``dst`` to fill; on success it replaces ``dst`` in one rename.

    On any failure (including Ctrl-C) the temp folder is removed, so a reader never sees a
    half-written ``dst``. An existing ``dst`` is refused unless ``overwrite``.
    """
    dst = Path(dst).expanduser()
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} already exists; pass overwrite=True (--overwrite) or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():  # rename cannot replace a non-empty folder: move the old one aside first
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
