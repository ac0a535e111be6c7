"""The results file: one JSON line per (policy, task, length, sample), appended atomically.

A row is identified by ``KEY``; a rerun skips every key already present. Each row is written with
one ``write`` of a complete line on an append-only file and flushed to disk, so a crash loses at
most the row being written; a torn last line (no newline) is cut off when the file is next
opened for appending, and ignored when read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

RESULTS_FILE = "results.jsonl"
KEY = ("model", "policy", "ratio", "task", "length", "sample", "seed", "setting")


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY)


def _default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def dumps(row: dict) -> str:
    return json.dumps(row, default=_default, ensure_ascii=False)


def read_rows(path: Path) -> list[dict]:
    """All complete rows of a results file (a torn or unparsable line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn last line from an interrupted write
            try:
                rows.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return rows


def _repair_tail(path: Path) -> None:
    """Cut a torn last line so the next append starts on a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


class ResultsFile:
    def __init__(self, folder: Path):
        self.path = Path(folder) / RESULTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.path)
        self.done = {row_key(r) for r in read_rows(self.path)}

    def has(self, key: tuple) -> bool:
        return key in self.done

    def append(self, row: dict) -> None:
        line = (dumps(row) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done.add(row_key(row))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file through a temp sibling and a rename (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
