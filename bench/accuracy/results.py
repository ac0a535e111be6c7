"""The results file: one JSON line per (policy, task, length, sample), appended atomically.

A row is identified by ``KEY``; a rerun skips every key already present, and appending a key that
is already there is refused. Each row is written with one ``write`` of a complete line on an
append-only file and flushed to disk, so a crash loses at most the row being written; a torn last
line (no newline) is cut off when the file is next opened for appending, and ignored when read.
Writers hold ``folder_lock`` on the run folder, so two runners never append to one file.

    python -m bench.accuracy.results dedupe DIR    # drop rows scored twice (after checking they agree)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".runner.lock"
HOLDER_FILE = ".runner.holder"  # pid and command of the lock's holder, for the busy message
KEY = ("model", "policy", "ratio", "task", "length", "sample", "seed", "setting")
# what a row scored twice must agree on (timings and the clock differ between runs)
OUTCOME = ("score", "metric", "metrics", "prediction", "references", "prompt_tokens", "generated_tokens")


class DuplicateRowError(ValueError):
    """A row whose key is already in the results file (or two copies that disagree)."""


class FolderBusy(ValueError):
    """Another process holds the run folder's lock."""


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
        if row_key(row) in self.done:
            raise DuplicateRowError(f"{self.path.name} already has the row {_key_text(row)}; not appended twice")
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


def _key_text(row: dict) -> str:
    return ", ".join(f"{k}={row.get(k)}" for k in KEY)


def dedupe_rows(rows: list[dict], strict: bool = True) -> tuple[list[dict], int]:
    """(the first row of each key in file order, how many copies were dropped).

    ``strict``: copies must agree on ``OUTCOME`` (runs are deterministic); a disagreement raises
    ``DuplicateRowError`` naming the key, since keeping either would hide it.
    """
    first: dict[tuple, dict] = {}
    for r in rows:
        k = row_key(r)
        if k not in first:
            first[k] = r
            continue
        diff = [f for f in OUTCOME if first[k].get(f) != r.get(f)]
        if strict and diff:
            raise DuplicateRowError(f"row {_key_text(r)} appears twice with different {', '.join(diff)}; "
                                    "resolve it by hand")
    return list(first.values()), len(rows) - len(first)


def dedupe(folder: Path) -> int:
    """Rewrite ``folder``/results.jsonl without duplicate rows (holding the folder's lock); returns
    how many were dropped. The file is rewritten only if some were."""
    path = Path(folder) / RESULTS_FILE
    with folder_lock(folder):
        _repair_tail(path)
        rows = read_rows(path)
        kept, dropped = dedupe_rows(rows)
        if dropped:
            write_atomic(path, "".join(dumps(r) + "\n" for r in kept))
    return dropped


_held: dict[Path, list] = {}  # folder -> [FileLock, depth]: re-entrant within one process


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold ``folder``'s runner lock for the block, or raise ``FolderBusy`` naming the holder's pid.

    An OS file lock (``filelock``): released when the holder exits, even if it is killed, so a stale
    lock cannot block the next run. Nested use in one process is allowed.
    """
    from filelock import FileLock, Timeout

    shown, folder = Path(folder), Path(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        try:
            yield
        finally:
            _held[folder][1] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads((folder / HOLDER_FILE).read_text())
            who = f"pid {holder['pid']} (`{holder.get('command', '?')}`)"
        except (OSError, ValueError, KeyError):
            who = "a process whose pid is not recorded yet"
        raise FolderBusy(f"{shown}/ is in use by {who}: two runners must not write one folder; wait for it to "
                         "finish or use another --out") from None
    _held[folder] = [lock, 1]
    try:
        write_atomic(folder / HOLDER_FILE, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)}))
        yield
    finally:
        del _held[folder]
        with contextlib.suppress(OSError):
            (folder / HOLDER_FILE).unlink()
        lock.release()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy.results", description="Maintain a results.jsonl.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dedupe", help="drop rows whose key appears twice (copies must agree)")
    d.add_argument("folder", type=Path, help="a run folder (the --out of python -m bench.accuracy)")
    args = p.parse_args(argv)
    if not (args.folder / RESULTS_FILE).is_file():
        print(f"error: no {RESULTS_FILE} in {args.folder}", file=sys.stderr)
        return 2
    try:
        dropped = dedupe(args.folder)
    except (DuplicateRowError, FolderBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{dropped} duplicate rows dropped from {args.folder / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
