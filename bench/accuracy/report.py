"""python -m bench.accuracy.report DIR: markdown tables and plots from DIR/results.jsonl.

Everything here is computed from the JSONL rows (nothing typed in): per task, policy and length
the mean of the per-sample scores (RULER's task score), the RULER average over the tasks present,
paired differences against full KV with bootstrap intervals, the fidelity statistics, memory and
time; plots: RULER scores per task, a needle heatmap (length x depth) per policy, and fidelity KL /
top-1 per policy. The ``*_stats`` functions return the numbers (``bench.summary`` judges targets
on them), the ``*_table`` ones format them. Files are written through a temp file and a rename.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

from bench.accuracy import ruler
from bench.accuracy.results import RESULTS_FILE, dedupe_rows, read_rows, write_atomic
from bench.common import revision_text

REPORT_FILE = "report.md"


def label(row: dict) -> str:
    r = row.get("ratio")
    return row["policy"] if r is None else f"{row['policy']}@{r:g}"


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else math.nan


def _fmt(x, digits=1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _order(seq):
    return list(dict.fromkeys(seq))


def _full_first(kv):
    return kv[0][0], kv[0][1] != "full"


def group(rows: list[dict], *keys) -> dict:
    out = collections.defaultdict(list)
    for r in rows:
        out[tuple(r[k] if k != "label" else label(r) for k in keys)].append(r)
    return out


def score_tables(rows: list[dict]) -> str:
    gen = [r for r in rows if r["task"] != "fidelity"]
    if not gen:
        return ""
    labels = _order(label(r) for r in rows)
    by = group(gen, "length", "task", "label")
    parts = ["## Scores\n\nMean of per-sample scores (RULER: `string_match_all` / `string_match_part`, x100; "
             "needle: ROUGE-1 F x100; passkey: `string_match_all`), n samples in brackets."]
    for length in sorted({r["length"] for r in gen}):
        tasks = [t for t in (*ruler.TASKS, "needle", "passkey") if any((length, t, lb) in by for lb in labels)]
        body = []
        for t in tasks:
            cells = []
            for lb in labels:
                rs = by.get((length, t, lb), [])
                cells.append(f"{_fmt(_mean(r['score'] for r in rs), 2)} ({len(rs)})" if rs else "-")
            body.append([t, *cells])
        rtasks = [t for t in tasks if t in ruler.TASKS]
        if len(rtasks) > 1:
            avg = []
            for lb in labels:
                ms = [_mean(r["score"] for r in by[(length, t, lb)]) for t in rtasks if (length, t, lb) in by]
                avg.append(f"**{_fmt(_mean(ms), 2)}** ({len(ms)} tasks)" if ms else "-")
            body.append(["RULER average", *avg])
        parts.append(f"### {length} tokens\n\n" + _table(["task", *labels], body))
    return "\n\n".join(parts)


def paired_stats(rows: list[dict], reps: int = 4000, seed: int = 0, reference: str = "full") -> list[dict]:
    """RULER average of each policy against full KV on the same samples, with a bootstrap CI.
    ``reference``: another policy (its spec or label) to pair against instead (then "full_avg" is its
    average).

    Policies see identical samples (same seed, same prompts), so the difference is paired: per
    task the mean over the samples both have, averaged over the tasks both have; the bootstrap
    resamples samples within each task (``reps`` times) for 95% intervals of the difference and of
    the ratio to full (NaN when a task has one sample: no spread). ``better / worse / same`` count
    samples. One dict per (length, policy label), full first within a length.
    """
    gen = [r for r in rows if r["task"] in ruler.TASKS]
    full = {(r["length"], r["task"], r["sample"]): r["score"] for r in gen if reference in (label(r), r["policy"])}
    if not full:
        return []
    rng = np.random.default_rng(seed)
    out = []
    for (length, lb), rs in sorted(group(gen, "length", "label").items(), key=_full_first):
        if reference in (lb, lb.split("@")[0]):
            continue
        per_task = collections.defaultdict(list)
        for r in rs:
            f = full.get((length, r["task"], r["sample"]))
            if f is not None:
                per_task[r["task"]].append((f, r["score"]))
        if len(per_task) < 2:
            continue
        pairs = [np.asarray(v, float) for v in per_task.values()]
        fa = float(np.mean([p[:, 0].mean() for p in pairs]))
        pa = float(np.mean([p[:, 1].mean() for p in pairs]))
        boot_f, boot_p = np.zeros(reps), np.zeros(reps)
        for p in pairs:
            idx = rng.integers(0, len(p), (reps, len(p)))
            boot_f += p[idx, 0].mean(1) / len(pairs)
            boot_p += p[idx, 1].mean(1) / len(pairs)
        d_lo, d_hi = np.percentile(boot_p - boot_f, [2.5, 97.5])
        ok = boot_f > 0
        r_lo, r_hi = np.percentile(100 * boot_p[ok] / boot_f[ok], [2.5, 97.5]) if ok.any() else (math.nan,) * 2
        if min(len(p) for p in pairs) < 2:  # one sample in a task: no spread to resample
            d_lo = d_hi = r_lo = r_hi = math.nan
        allp = np.concatenate(pairs)
        out.append({"label": lb, "length": length, "tasks": len(pairs), "samples": len(allp), "full_avg": fa,
                    "policy_avg": pa, "diff": pa - fa, "diff_ci": (float(d_lo), float(d_hi)),
                    "pct_of_full": 100 * pa / fa if fa else math.nan, "pct_ci": (float(r_lo), float(r_hi)),
                    "better": int((allp[:, 1] > allp[:, 0]).sum()), "worse": int((allp[:, 1] < allp[:, 0]).sum()),
                    "same": int((allp[:, 1] == allp[:, 0]).sum())})
    return out


def paired_table(rows: list[dict], reps: int = 4000, seed: int = 0) -> str:
    """``paired_stats`` as a markdown section."""
    body = [[s["label"], str(s["length"]), str(s["tasks"]), str(s["samples"]), _fmt(s["full_avg"], 2),
             _fmt(s["policy_avg"], 2), _fmt(s["diff"], 2), f"[{_fmt(s['diff_ci'][0], 2)}, {_fmt(s['diff_ci'][1], 2)}]",
             _fmt(s["pct_of_full"], 1), f"[{_fmt(s['pct_ci'][0], 1)}, {_fmt(s['pct_ci'][1], 1)}]",
             f"{s['better']} / {s['worse']} / {s['same']}"] for s in paired_stats(rows, reps, seed)]
    if not body:
        return ""
    return ("## RULER against full KV, paired\n\nOn the samples both ran: RULER average of full KV and of the "
            "policy, their difference with a 95% bootstrap interval (samples resampled within each task, "
            f"{reps} draws), the policy's average as % of full's with its interval, and samples better / worse / "
            "same than full. An interval that holds 0 (or 100%) means the run cannot tell the policy from full KV."
            "\n\n" + _table(["policy", "length", "tasks", "samples", "full avg", "policy avg", "diff", "95% CI diff",
                              "% of full", "95% CI %", "better / worse / same"], body))


def fidelity_stats(rows: list[dict]) -> list[dict]:
    """Per (length, policy label) means of the fidelity rows' metrics, full first within a length."""
    fid = [r for r in rows if r["task"] == "fidelity"]
    out = []
    for (length, lb), rs in sorted(group(fid, "length", "label").items(), key=_full_first):
        m = lambda k: _mean(r["metrics"][k] for r in rs)  # noqa: E731
        out.append({"label": lb, "length": length, "n": len(rs), "positions": rs[0]["metrics"]["positions"],
                    "kl_mean": m("kl_mean"), "kl_p95": m("kl_p95"), "kl_max": m("kl_max"),
                    "top1_pct": 100 * m("top1_agreement"), "ppl": m("ppl"), "ppl_full": m("ppl_full")})
    return out


def fidelity_table(rows: list[dict]) -> str:
    body = [[s["label"], str(s["length"]), str(s["n"]), str(s["positions"]), _fmt(s["kl_mean"], 4),
             _fmt(s["kl_p95"], 4), _fmt(s["kl_max"], 3), _fmt(s["top1_pct"], 1), _fmt(s["ppl"], 2),
             _fmt(s["ppl_full"], 2)] for s in fidelity_stats(rows)]
    if not body:
        return ""
    return ("## Fidelity (teacher-forced, against full KV)\n\nPer position KL(full || policy) in nats, averaged "
            "over positions then samples; top-1 = % of positions whose argmax matches full KV's; perplexity of "
            "the true text.\n\n" + _table(["policy", "length", "n", "positions", "KL mean", "KL p95", "KL max",
                                             "top-1 %", "ppl", "ppl full"], body))


def refresh_stats(rows: list[dict]) -> list[dict]:
    """Fidelity rows of policies that count drift checks (hetero variants), per (length, label):
    refreshes and checks summed over the samples, their share, mean MiB moved per sample, and
    what it bought (KL, top-1 agreement)."""
    fid = [r for r in rows if r["task"] == "fidelity" and (r.get("stats") or {}).get("checks")]
    out = []
    for (length, lb), rs in sorted(group(fid, "length", "label").items()):
        checks = sum(r["stats"]["checks"] for r in rs)
        refreshes = sum(r["stats"]["refreshes"] for r in rs)
        m = lambda k: _mean(r["metrics"][k] for r in rs)  # noqa: E731
        out.append({"label": lb, "length": length, "n": len(rs), "refreshes": refreshes, "checks": checks,
                    "pct_of_checks": 100 * refreshes / checks,
                    "mib_moved": _mean(r["stats"]["bytes_moved"] for r in rs) / 2**20,
                    "kib_per_token": _mean(r["stats"]["bytes_moved"] / r["metrics"].get("positions", math.nan)
                                           for r in rs) / 2**10,  # per decode step of a fidelity window
                    "kl_mean": m("kl_mean"), "top1_pct": 100 * m("top1_agreement")})
    return out


def refresh_table(rows: list[dict]) -> str:
    body = [[s["label"], str(s["length"]), str(s["n"]), f"{s['refreshes']} / {s['checks']}",
             _fmt(s["pct_of_checks"], 1), _fmt(s["mib_moved"], 1), _fmt(s["kl_mean"], 4), _fmt(s["top1_pct"], 2)]
            for s in refresh_stats(rows)]
    if not body:
        return ""
    return ("## Refresh ablation (fidelity rows of policies with drift checks)\n\nRefreshes / checks summed "
            "over the samples (a check is one pivot's test; a refresh moves its satellites' rows), MiB moved "
            "host -> device per sample, KL(full || policy) and top-1 agreement as in the fidelity table. "
            "Compare rows on the same n.\n\n"
            + _table(["policy", "length", "n", "refreshes / checks", "% of checks", "MiB moved", "KL mean",
                      "top-1 %"], body))


def cost_table(rows: list[dict]) -> str:
    body = []
    for (length, lb), rs in sorted(group(rows, "length", "label").items(), key=_full_first):
        t = lambda k: _mean(r["timing"].get(k) for r in rs)  # noqa: E731
        body.append([lb, str(length), str(len(rs)), _fmt(_mean(r.get("device_bytes") for r in rs) / 2**20, 1),
                     _fmt(_mean(r.get("host_bytes") for r in rs) / 2**20, 1), _fmt(t("prefill_s"), 2),
                     _fmt(t("decode_ms_per_token"), 1)])
    return ("## Memory and time\n\nMeans over all rows (every task) of a policy and length: cache bytes held on "
            "device / host after the run (as the policy reports them), prefill seconds and decode ms per "
            "token (compilation excluded for generation tasks).\n\n"
            + _table(["policy", "length", "rows", "device MiB", "host MiB", "prefill s", "decode ms/token"], body))


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
    return path.name


def _main_labels(rows: list[dict]) -> list[str]:
    """The labels a plot shows: those with at least half the rows of the best-covered one, so short
    screening runs (a few windows of a variant) stay in the tables and out of the pictures."""
    counts = collections.Counter(label(r) for r in rows)
    most = max(counts.values(), default=0)
    return [lb for lb in _order(label(r) for r in rows) if 2 * counts[lb] >= most]


def _legend(fig, axes) -> None:
    """One legend under the axes (profile paths shortened): inside, a dozen entries hid the data."""
    fig.tight_layout()  # first, so the figure's bottom edge is below the tick labels
    handles, names = axes[0].get_legend_handles_labels()
    names = [n.replace("profile=bench/accuracy/profiles/", "profile=") for n in names]
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)


def plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    labels = _main_labels([r for r in rows if r["task"] in ruler.TASKS])
    by = group(rows, "length", "task", "label")
    rtasks = [t for t in ruler.TASKS if any(r["task"] == t for r in rows)]
    for length in sorted({r["length"] for r in rows if r["task"] in rtasks}):
        fig, ax = plt.subplots(figsize=(max(7, 2 + 0.12 * len(rtasks) * len(labels)), 3.5))
        w = 0.8 / len(labels)
        for j, lb in enumerate(labels):
            ys = [_mean(r["score"] for r in by.get((length, t, lb), [])) for t in rtasks]
            ax.bar(np.arange(len(rtasks)) + j * w, ys, w, label=lb, color=plt.get_cmap("tab20")(j % 20))
        ax.set_xticks(np.arange(len(rtasks)) + 0.4 - w / 2, rtasks, rotation=45, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("score")
        ax.set_title(f"RULER, {length} tokens")
        _legend(fig, [ax])
        made.append(_save(fig, out / f"ruler_{length}.png"))
        plt.close(fig)
    needle = [r for r in rows if r["task"] == "needle"]
    for lb in _order(label(r) for r in needle):
        rs = [r for r in needle if label(r) == lb]
        lengths = sorted({r["length"] for r in rs})
        deps = sorted({r["extra"]["depth"] for r in rs})
        grid = np.full((len(lengths), len(deps)), np.nan)
        for r in rs:
            grid[lengths.index(r["length"]), deps.index(r["extra"]["depth"])] = r["score"]
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(deps), 1 + 0.5 * len(lengths)))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(deps)), [f"{d:g}" for d in deps])
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("needle depth (%)")
        ax.set_ylabel("context length")
        ax.set_title(f"needle in a haystack, {lb} (ROUGE-1 F x100)")
        fig.colorbar(im, ax=ax)
        made.append(_save(fig, out / f"needle_{lb.replace('@', '_r').replace(':', '-')}.png"))
        plt.close(fig)
    fid = [r for r in rows if r["task"] == "fidelity" and r["policy"] != "full"]
    if fid:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        g = group(fid, "label", "length")
        for j, lb in enumerate(_main_labels(fid)):
            ls = sorted(length for (l2, length) in g if l2 == lb)
            color = plt.get_cmap("tab20")(j % 20)  # the default cycle repeats after 10 policies
            axes[0].plot(ls, [_mean(r["metrics"]["kl_mean"] for r in g[(lb, n)]) for n in ls], "o-", label=lb,
                         color=color)
            top1 = [_mean(100 * r["metrics"]["top1_agreement"] for r in g[(lb, n)]) for n in ls]
            axes[1].plot(ls, top1, "o-", label=lb, color=color)
        axes[0].set_ylabel("KL(full || policy), nats")
        axes[1].set_ylabel("top-1 agreement with full (%)")
        for ax in axes:
            ax.set_xlabel("context length")
        _legend(fig, axes)
        made.append(_save(fig, out / "fidelity.png"))
        plt.close(fig)
    return made


def load_rows(folder) -> list[dict]:
    """The rows of ``folder``/results.jsonl, a key scored twice counted once (the first)."""
    folder = Path(folder)
    rows = read_rows(folder / RESULTS_FILE)
    if not rows:
        raise FileNotFoundError(f"{folder / RESULTS_FILE}: no results to report")
    unique, dropped = dedupe_rows(rows, strict=False)
    if dropped:  # two runners on one folder before the lock existed: the same sample scored twice
        print(f"note: {dropped} duplicate rows in {RESULTS_FILE} ignored (first kept); drop them with "
              f"python -m bench.accuracy.results dedupe {folder}", file=sys.stderr)
    return unique


def revisions(rows: list[dict]) -> str:
    """Which code produced the rows: each revision (``bench.common.revision_text``) with its row count."""
    counts = collections.Counter(revision_text(r) for r in rows)
    return ", ".join(f"{text} ({n} row{'s' if n != 1 else ''})" for text, n in counts.most_common())


def report_markdown(folder, rows: list[dict], images: list[str]) -> str:
    folder = Path(folder)
    try:
        meta = json.loads((folder / "run.json").read_text())["runs"][-1]
    except (OSError, json.JSONDecodeError, KeyError, IndexError):
        meta = {}
    models = _order(r["model"] for r in rows)
    head = [f"# Long-context accuracy: {', '.join(models)}", ""]
    if meta:
        head.append(f"Last run: {meta.get('date', '?')} on {meta.get('device', '?')}, jax {meta.get('jax', '?')}; "
                    f"`{meta.get('command', '')}`.")
    head.append(f"{len(rows)} rows from `{RESULTS_FILE}`; seeds {sorted({r['seed'] for r in rows})}, "
                f"settings {sorted({r['setting'] for r in rows})}.")
    head.append(f"Code revision of the rows: {revisions(rows)}.")
    sections = [s for s in (score_tables(rows), paired_table(rows), fidelity_table(rows), refresh_table(rows),
                            cost_table(rows)) if s]
    sections.append("## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in images) if images else "")
    return "\n".join(head) + "\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def write_report(folder) -> Path:
    folder = Path(folder)
    rows = load_rows(folder)
    images = plots(rows, folder)
    path = folder / REPORT_FILE
    write_atomic(path, report_markdown(folder, rows, images))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy.report",
                                description="Markdown tables and plots from an accuracy run folder.")
    p.add_argument("folder", type=Path, help="the --out folder of python -m bench.accuracy")
    args = p.parse_args(argv)
    try:
        print(write_report(args.folder))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
