"""What every benchmark needs: machine facts, the code's git revision, measured bandwidth, medians,
result files. jax is imported where a function needs it, so reading results stays light."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
# outputs, not code: a run that appends to its own results must not call itself dirty
_NOT_CODE = ("bench/results",)
_MAX_DIRTY_FILES = 50


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"git {args[0]} failed")
    return out.stdout


def git_state(root: Path | str = REPO_ROOT) -> dict:
    """The code a result came from: ``git_revision`` (full sha of HEAD), ``git_dirty`` (tracked files
    differ from HEAD, results under bench/results/ excluded) and ``git_dirty_files`` (which ones).

    Both are None, with ``git_note`` saying why, when git is missing or ``root`` is not a checkout
    of this project (an installed copy, a tarball): a result never claims a revision it cannot show.
    """
    root = Path(root).resolve()
    try:
        top = Path(_git(root, "rev-parse", "--show-toplevel").strip()).resolve()
        if top != root:
            raise RuntimeError(f"{root.name} is not the top of a git checkout (that is {top.name})")
        sha = _git(root, "rev-parse", "--verify", "HEAD").strip()
        status = _git(root, "status", "--porcelain=v1", "--untracked-files=no", "--", ".",
                      *(f":(exclude){p}" for p in _NOT_CODE))
    except FileNotFoundError:
        return {"git_revision": None, "git_dirty": None, "git_note": "git not found: revision not recorded"}
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        why = re.sub(r"(/[^\s:'\"]+)+", "<path>", str(e))  # no machine paths in committed results
        return {"git_revision": None, "git_dirty": None, "git_note": f"no git checkout: {why}"}
    files = sorted(line[3:] for line in status.splitlines() if line.strip())
    state = {"git_revision": sha, "git_dirty": bool(files), "git_dirty_files": files[:_MAX_DIRTY_FILES]}
    if len(files) > _MAX_DIRTY_FILES:
        state["git_dirty_files"].append(f"... and {len(files) - _MAX_DIRTY_FILES} more")
    return state


def revision_text(info: dict) -> str:
    """One line for a result's revision: the short sha, whether the tree was dirty, or why none."""
    if "git_revision" not in info:
        return "not recorded"
    sha = info["git_revision"]
    if sha is None:
        return f"unknown ({info.get('git_note', 'no git checkout')})"
    if info.get("git_dirty"):
        n = len([f for f in info.get("git_dirty_files", []) if not f.startswith("...")])
        return f"{sha[:12]} + uncommitted changes ({n} file{'s' if n != 1 else ''})"
    return sha[:12]


def machine() -> dict:
    """The machine, in words and numbers, and the code's revision (``git_state``), for every result file."""
    import jax

    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "device": dev.device_kind if dev.platform != "cpu" else f"cpu: {cpu}",
        "platform": dev.platform,
        "cpu_cores": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews absolute times
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        **git_state(),
    }


def device_slug() -> str:
    import jax

    dev = jax.devices()[0]
    name = dev.device_kind if dev.platform != "cpu" else "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured memory read bandwidth (bytes/s): a matvec over an ``nbytes`` f32 matrix.

    A decode step is a chain of matvecs over weights plus reads of KV, so this is its roofline.
    """
    import jax
    import jax.numpy as jnp

    cols = 4096
    rows = max(nbytes // (4 * cols), 1)
    a = jnp.ones((rows, cols), jnp.float32)
    x = jnp.ones((cols,), jnp.float32)
    f = jax.jit(lambda a, x: a @ x)
    t = median_time(lambda: f(a, x).block_until_ready(), repeats)
    del a
    return rows * cols * 4 / t


def write_results(stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.md`` under bench/results atomically (temp, then rename).

    ``payload["machine"]`` must come from ``machine()``: a result without its revision is refused.
    """
    if "git_revision" not in payload.get("machine", {}):
        raise ValueError(f"{stem}: payload['machine'] has no git_revision; build it with bench.common.machine()")
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".json", json.dumps(payload, indent=1, default=_np_default)), (".md", markdown)):
        path = RESULTS / f"{stem}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=f".{stem}", suffix=suffix)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def _np_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with (key, header) columns; floats get 3 significant digits."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def header_md(title: str, info: dict) -> str:
    dirty = info.get("git_dirty_files") if info.get("git_dirty") else None
    return (
        f"# {title}\n\n- machine: {info['device']} ({info['cpu_cores']} cores), jax {info['jax']}, "
        f"python {info['python']}\n- date: {info['date']}; 1-minute load average at start: "
        f"{info.get('load_avg_1m', '?')} (on {info['cpu_cores']} cores)\n- command: `{info['command']}`\n"
        f"- revision: {revision_text(info)}" + (f" ({', '.join(dirty)})" if dirty else "") + "\n"
    )
