"""What every benchmark needs: machine facts, measured bandwidth, medians, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine, in words and numbers, for every result file."""
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
    }


def device_slug() -> str:
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
    cols = 4096
    rows = max(nbytes // (4 * cols), 1)
    a = jnp.ones((rows, cols), jnp.float32)
    x = jnp.ones((cols,), jnp.float32)
    f = jax.jit(lambda a, x: a @ x)
    t = median_time(lambda: f(a, x).block_until_ready(), repeats)
    del a
    return rows * cols * 4 / t


def write_results(stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.md`` under bench/results atomically (temp, then rename)."""
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
    return (
        f"# {title}\n\n- machine: {info['device']} ({info['cpu_cores']} cores), jax {info['jax']}, "
        f"python {info['python']}\n- date: {info['date']}; 1-minute load average at start: "
        f"{info.get('load_avg_1m', '?')} (on {info['cpu_cores']} cores)\n- command: `{info['command']}`\n"
    )
