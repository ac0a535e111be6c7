"""bench.summary: target checks on small synthetic results, and the committed summaries and reports
equal what their data gives (they cannot drift from the JSON)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from bench import summary
from bench.accuracy import report, results
from bench.common import RESULTS
from bench.decode import add_ratios

SHA = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------- decode targets
def _decode_rows(rng, hetero_ms, snap_ms, full_ms=100.0, hf_ms=150.0):
    """full, hetero, snapkv at batch 4 x 8128 and batch 1 x 8128, plus HF; bytes with a known ratio."""
    rows = []
    for batch in (1, 4):
        full_bytes = int(rng.integers(10**8, 10**9))
        for pol, ms, frac in (("full", full_ms, 1.0), ("hetero:0.5", hetero_ms, 0.5), ("snapkv:0.5", snap_ms, 0.5)):
            rows.append({"policy": pol, "context": 8128, "batch": batch, "decode_ms": ms * batch,
                         "bytes_per_step": int(full_bytes * frac), "device_kv_bytes": int(full_bytes * frac),
                         "roofline_ms": 0.45 * full_ms * batch, "roofline_frac": 0.45 * full_ms / ms})
    rows.append({"policy": "hf-transformers full", "context": 8128, "batch": 1, "decode_ms": hf_ms})
    return add_ratios(rows)


def test_decode_checks_by_hand(seed):
    rng = np.random.default_rng(seed)
    rows = _decode_rows(rng, hetero_ms=100 / (2 * 0.9) - 0.01, snap_ms=60.0)  # just above 0.9 of the 2x byte ratio
    out = summary.speedup_share(rows, "hetero:0.5", 8128, 4, min=0.9)
    assert out.met is True and "byte ratio 2.00" in out.measured
    rows = _decode_rows(rng, hetero_ms=100 / (2 * 0.9) + 0.01, snap_ms=50.0)
    assert summary.speedup_share(rows, "hetero:0.5", 8128, 4, min=0.9).met is False
    assert summary.as_fast_as(rows, "hetero:0.5", "snapkv:0.5", 8128, 4).met is False
    assert summary.as_fast_as(rows, "snapkv:0.5", "hetero:0.5", 8128, 4).met is True
    assert summary.roofline(rows, "full", 8128, 1, min=0.44).met is True
    assert summary.roofline(rows, "full", 8128, 1, min=0.46).met is False
    out = summary.vs_hf(rows, "full", 8128, max=0.6)
    assert out.met is False and out.measured.startswith("0.67x")  # 100 / 150
    missing = summary.speedup_share(rows, "hetero:0.5", 4096, 4, min=0.9)
    assert missing.met is None and missing.text() == "not measured"


def test_step_ratio_every_row_must_pass(seed):
    rng = np.random.default_rng(seed)
    other = rng.uniform(50, 100, 3)
    rows = [{"policy": "hetero:0.5", "context": 4096, "batch": b, "other_step_ms": o, "check_step_ms": o * f}
            for b, o, f in zip((1, 2, 4), other, (1.0, 1.05, 1.10))]
    rows.append({"policy": "hetero:0.5", "context": 8128, "batch": 1, "other_step_ms": 10.0})  # no check fired
    assert summary.step_ratio(rows, "hetero:0.5", "check", max=1.10).met is True
    assert summary.step_ratio(rows, "hetero:0.5", "check", max=1.09).met is False
    assert summary.step_ratio(rows, "hetero:0.5", "refresh", max=1.15).met is None


def test_kernel_target_only_judged_on_its_platform():
    rows = [{"layout": lay, "tokens": 32768, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "batch": 1,
             "frac_copy": f} for lay, f in (("full", 0.8), ("hetero", 0.72))]
    kw = dict(tokens=32768, kv_heads=8, head_dim=128, dtype="bfloat16", min=0.7, platform="gpu")
    assert summary.kernel_copy(rows, **kw, machine={"platform": "gpu"}).met is True
    assert summary.kernel_copy(rows, **{**kw, "min": 0.75}, machine={"platform": "gpu"}).met is False
    cpu = summary.kernel_copy(rows, **kw, machine={"platform": "cpu"})
    assert cpu.met is None and cpu.text().startswith("n/a")


def _write_decode(folder, rows, machine):
    payload = {"machine": machine, "bandwidth_GBps": 10.0, "param_bytes": 10**8, "model": "m", "dtype": "f32",
               "new_tokens": 4, "repeats": 2, "rows": rows}
    (folder / "decode-test.json").write_text(json.dumps(payload))


def test_decode_summary_cites_source_and_revision_and_check_catches_drift(tmp_path, seed):
    rng = np.random.default_rng(seed)
    rows = _decode_rows(rng, hetero_ms=80.0, snap_ms=70.0)
    for r in rows:  # as decode.py writes them: the summary recomputes the ratios itself
        for k in ("speedup_vs_full", "byte_ratio_vs_full", "x_hf_ms"):
            r.pop(k, None)
    machine = {"device": "d", "platform": "cpu", "date": "today", "command": "decode.py", "load_avg_1m": 0.1,
               "git_revision": SHA, "git_dirty": True, "git_dirty_files": ["a.py", "b.py"]}
    _write_decode(tmp_path, rows, machine)
    md = summary.decode_summary(tmp_path)
    line = next(ln for ln in md.splitlines() if ln.startswith("| hetero:0.5 speedup") and "batch 4" in ln)
    assert "`decode-test.json`" in line and f"{SHA[:12]} + uncommitted changes (2 files)" in line
    assert "**no**" in line and "1.25x over full" in line  # 100 / 80, byte ratio 2
    (tmp_path / "accuracy").mkdir()
    assert summary.main(["--results", str(tmp_path), "--check"]) == 1  # nothing written yet
    assert summary.main(["--results", str(tmp_path)]) == 0
    assert (tmp_path / summary.DECODE_PLOT).stat().st_size > 0
    assert summary.main(["--results", str(tmp_path), "--check"]) == 0
    _write_decode(tmp_path, rows, {**machine, "git_dirty": False})  # new data, summary not regenerated
    assert summary.main(["--results", str(tmp_path), "--check"]) == 1
    del machine["git_revision"]
    _write_decode(tmp_path, rows, machine)
    assert "| `decode-test.json` | not recorded |" in summary.decode_summary(tmp_path)


# ---------------------------------------------------------------- accuracy targets
def _acc_row(policy, ratio, task, sample, score, **kw):
    return {"model": "m", "policy": policy, "ratio": ratio, "task": task, "suite": "ruler", "length": 4096,
            "sample": sample, "seed": 42, "setting": "s", "score": score, **kw}


def test_accuracy_checks_by_hand(seed):
    rng = np.random.default_rng(seed)
    rows = []
    for t in ("niah_single_1", "vt"):
        for s in range(3):
            f = float(rng.choice([50.0, 100.0]))
            rows += [_acc_row("full", None, t, s, f), _acc_row("hetero:0.5", 0.5, t, s, f),
                     _acc_row("snapkv:0.5", 0.5, t, s, f / 2)]
    out = summary.ruler_pct_of_full(rows, "hetero:0.5", 4096, min=99.0)
    assert out.met is True and out.measured.startswith("100.0% of full, 95% CI [100.0, 100.0]")
    assert summary.ruler_pct_of_full(rows, "snapkv:0.5", 4096, min=99.0).met is False
    assert summary.ruler_above(rows, "hetero:0.5", "snapkv:0.5", 4096).met is True
    assert summary.ruler_above(rows, "snapkv:0.5", "hetero:0.5", 4096).met is False
    fid = []
    for s in range(3):
        c, r = int(rng.integers(100, 200)), int(rng.integers(0, 30))
        m = {"kl_mean": 0.01, "kl_p95": 0.02, "kl_max": 0.1, "ppl": 10.0, "ppl_full": 10.0, "positions": 8}
        fid += [_acc_row("hetero:0.5", 0.5, "fidelity", s, 90.0, stats={"checks": c, "refreshes": r,
                                                                          "bytes_moved": 0},
                         metrics={**m, "top1_agreement": 0.90}),
                _acc_row("hetero:0.5:threshold=1:steps=1", 0.5, "fidelity", s, 95.0,
                         stats={"checks": c, "refreshes": c, "bytes_moved": 0}, metrics={**m, "top1_agreement": 0.95})]
    fid.append(_acc_row("hetero:0.5:threshold=1:steps=1", 0.5, "fidelity", 9, 0.0,  # a sample only one ran
                        stats={"checks": 1, "refreshes": 1, "bytes_moved": 0}, metrics={**m, "top1_agreement": 0.0}))
    pct = 100 * sum(r["stats"]["refreshes"] for r in fid[:-1:2]) / sum(r["stats"]["checks"] for r in fid[:-1:2])
    out = summary.refresh_share(fid, "hetero:0.5", 4096, max=20.0)
    assert out.measured.startswith(f"{pct:.1f}%") and out.met == (pct <= 20.0)
    out = summary.top1_loss(fid, "hetero:0.5", "hetero:0.5:threshold=1:steps=1", 4096, max=0.5)
    loss = 100 * (1 - 0.90 / 0.95)
    assert out.met is False and f"{loss:.2f}% lower" in out.measured and "(3 samples)" in out.measured
    assert summary.top1_loss(fid, "hetero:0.5", "hetero:0.5:threshold=1:steps=1", 4096, max=6.0).met is True
    assert summary.top1_loss(fid, "hetero:0.5", "retrieval:0.5", 4096, max=1.0).met is None


def test_issue13_checks_by_hand(seed):
    """Paired interval against another policy (not full), fidelity at least as good, one source."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in ("niah_single_1", "qa_1"):
        for s in range(4):
            f = float(rng.choice([50.0, 100.0]))
            rows += [_acc_row("full", None, t, s, f), _acc_row("hetero_plus:0.5", 0.5, t, s, f),
                     _acc_row("snapkv:0.5", 0.5, t, s, f / 2), _acc_row("streaming:0.5", 0.5, t, s, f if s else 0.0)]
    out = summary.ruler_paired_above(rows, "hetero_plus:0.5", "snapkv:0.5", 4096)
    assert out.met is True and "diff +" in out.measured
    # one sample better on each task: the resampled difference can be 0, so the interval holds 0
    assert summary.ruler_paired_above(rows, "hetero_plus:0.5", "streaming:0.5", 4096).met is False
    assert summary.ruler_paired_above(rows, "snapkv:0.5", "hetero_plus:0.5", 4096).met is False
    m = {"kl_p95": 0.02, "kl_max": 0.1, "ppl": 10.0, "ppl_full": 10.0, "positions": 8}
    fid = [_acc_row("hetero_plus:0.5", 0.5, "fidelity", s, 0, metrics={**m, "kl_mean": 0.01, "top1_agreement": 0.9})
           for s in range(2)]
    fid += [_acc_row("snapkv:0.5", 0.5, "fidelity", s, 0, metrics={**m, "kl_mean": 0.02, "top1_agreement": 0.9})
            for s in range(3)]
    out = summary.fidelity_at_least(fid, "hetero_plus:0.5", "snapkv:0.5", 4096)
    assert out.met is True and "(2 windows)" in out.measured
    assert summary.fidelity_at_least(fid, "snapkv:0.5", "hetero_plus:0.5", 4096).met is False
    table = summary.evaluate([("ruler_paired_above", dict(policy="hetero_plus:0.5", other="snapkv:0.5", length=4096,
                                                          source="b"), "#13")], summary.ACCURACY_CHECKS,
                             {"accuracy": [("a/results.jsonl", {"rows": [], "revision": ""}),
                                           ("b/results.jsonl", {"rows": rows, "revision": ""})]})
    assert [r["source"] for r in table] == ["`b/results.jsonl`"] and table[0]["met"] == "yes"


def test_revisions_per_row():
    rows = [{"git_revision": SHA, "git_dirty": False}] * 2 + [{}]
    assert report.revisions(rows) == f"{SHA[:12]} (2 rows), not recorded (1 row)"


# ---------------------------------------------------------------- the committed files
def test_committed_summaries_equal_what_the_data_gives():
    for path, text in summary.outputs(RESULTS).items():
        assert path.read_text() == text, f"{path} is stale: run python -m bench.summary"
    assert summary.main(["--check"]) == 0


def test_committed_reports_equal_what_their_rows_give(tmp_path):
    for folder in sorted(p.parent for p in (RESULTS / summary.ACCURACY_DIR).glob("*/results.jsonl")):
        rows = results.read_rows(folder / results.RESULTS_FILE)
        assert results.dedupe_rows(rows)[1] == 0, f"{folder.name}: duplicate rows on disk"
        copy = tmp_path / folder.name
        copy.mkdir()
        for name in (results.RESULTS_FILE, "run.json"):
            shutil.copy(folder / name, copy / name)
        assert report.write_report(copy).read_text() == (folder / report.REPORT_FILE).read_text(), folder.name


def test_no_orphaned_results():
    """Every committed file under bench/results is a summary or its notes, or the output of a
    command they cite: decode-*/kernels-* runs, accuracy run folders with their report's plots."""
    out = subprocess.run(["git", "-C", str(RESULTS), "ls-files", "."], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: the committed file list is unknown")
    files = set(out.stdout.split())
    decode_md = (RESULTS / summary.DECODE_SUMMARY).read_text()
    allowed = {summary.DECODE_SUMMARY, summary.DECODE_NOTES, summary.DECODE_PLOT,
               f"{summary.ACCURACY_DIR}/{summary.ACCURACY_SUMMARY}", f"{summary.ACCURACY_DIR}/{summary.ACCURACY_NOTES}"}
    for f in files - allowed:
        stem, _, ext = f.rpartition(".")
        if f.startswith(("decode-", "kernels-")):
            assert f"`{stem}.json`" in decode_md and ext in ("json", "md", "png"), f
        else:
            run, _, name = f.removeprefix(f"{summary.ACCURACY_DIR}/").partition("/")
            assert f.startswith(f"{summary.ACCURACY_DIR}/") and "/" not in name, f
            cited = (RESULTS / summary.ACCURACY_DIR / summary.ACCURACY_SUMMARY).read_text()
            assert f"`{run}/{results.RESULTS_FILE}`" in cited, f
            rep = (RESULTS / summary.ACCURACY_DIR / run / report.REPORT_FILE).read_text()
            assert name in (results.RESULTS_FILE, "run.json", report.REPORT_FILE) or f"]({name})" in rep, f



def test_model_scoped_target_reads_only_that_models_files(seed):
    rng = np.random.default_rng(seed)
    rows = _decode_rows(rng, hetero_ms=80.0, snap_ms=70.0)
    sources = {"decode": [(f"decode-{m}.json", {"rows": rows, "model": m, "revision": "r"})
                          for m in ("default", summary.KV_SHAPE)]}
    targets = (("speedup_share", dict(policy="hetero:0.5", context=8128, batch=4, min=0.9,
                                      model=summary.KV_SHAPE), "#12"),)
    table = summary.evaluate(targets, summary.DECODE_CHECKS, sources)
    assert [t["source"] for t in table] == [f"`decode-{summary.KV_SHAPE}.json`"]
    assert table[0]["met"] == "**no**"
    targets = (("speedup_share", dict(policy="hetero:0.5", context=8128, batch=4, min=0.9,
                                      not_model=summary.KV_SHAPE), "#12"),)
    assert [t["source"] for t in summary.evaluate(targets, summary.DECODE_CHECKS, sources)] == ["`decode-default.json`"]
