"""bench.peers.kvpress_run without kvpress: prompt splitting, ratio mapping, row format, CLI.

The kvpress venv and the model are not needed (CI has the project's own install only); the real
run is ``python -m bench.peers.kvpress_run`` (see its docstring).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.accuracy import synthetic
from bench.peers import kvpress_run as kr

CHAT = "<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


def _kvpress_kept(context: int, cr: float) -> int:
    """kvpress.utils.compute_n_kept, as kvpress 0.5.5 has it."""
    return 0 if cr >= 1.0 else max(1, int(context * (1 - cr)))


@pytest.mark.parametrize("task, body, question", [
    ("niah_single_1", "Some text. What is the special magic number for x? More text.\n",
     "What is the special magic number for foo-bar mentioned in the provided text?"),
    ("niah_multivalue", "A haystack.\n",
     "What are all the special magic numbers for foo mentioned in the provided text?"),
    ("vt", "VAR A = 1\n", "Question: Find all variables that are assigned the value 1 in the text above."),
    ("cwe", "1. apple\n", "Question: What are the 10 most common words in the above list?"),
    ("fwe", "abc .... abc\n", "Question: Do not provide any explanation. Please ignore the dots."),
    ("qa_1", "Answer the question based on the given documents. Only...\n\nDocument 1: x\n\n",
     "Answer the question based on the given documents. Only give me the answer.\n\nQuestion: who?"),
    ("passkey", "The pass key is 12345. Filler.\n", synthetic.PASSKEY_QUESTION),
    ("needle", "Essays.<|im_end|>\n<|im_start|>user\n", synthetic.NEEDLE_QUESTION + " Don't ..."),
])
def test_split_at_last_question(task, body, question):
    prompt = CHAT.format(body=body + question)
    cut = kr.split_prompt(prompt, task)
    assert prompt[:cut] == CHAT.split("{body}")[0] + body
    assert prompt[cut:].startswith(question)


def test_split_unknown_task_or_missing_question():
    with pytest.raises(kr.PeerError):
        kr.split_prompt("text", "fidelity")
    with pytest.raises(kr.PeerError):
        kr.split_prompt("no question here", "passkey")


def test_split_ids_token_straddling_the_cut_goes_to_question():
    offsets = [(0, 3), (3, 7), (7, 10), (10, 12)]
    ids = [1, 2, 3, 4]
    assert kr.split_ids(ids, offsets, 7) == 2   # cut on a token boundary
    assert kr.split_ids(ids, offsets, 8) == 2   # token (7, 10) straddles the cut: question side
    assert kr.split_ids(ids, offsets, 12) == 4  # nothing left for the question


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("context, question", [(1826, 42), (1999, 16), (100, 7), (3, 1)])
def test_compression_ratio_keeps_our_budget(ratio, context, question):
    cr = kr.compression_ratio(ratio, context, question, "context")
    assert 0.0 <= cr < 1.0
    assert _kvpress_kept(context, cr) == max(1, math.floor(ratio * context + 1e-9))
    if ratio == 0.5:
        assert abs(cr - 0.5) <= 1 / context
    total = math.floor(ratio * (context + question) + 1e-9)
    if total - question >= 1:
        cr = kr.compression_ratio(ratio, context, question, "prompt")
        assert _kvpress_kept(context, cr) + question == total
    else:
        with pytest.raises(kr.PeerError):
            kr.compression_ratio(ratio, context, question, "prompt")


def test_compression_ratio_rejects_bad_ratio():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(kr.PeerError):
            kr.compression_ratio(bad, 100, 10, "context")


def test_policy_names():
    assert kr.policy_name("snapkv", "context") == "kvpress-snapkv"
    assert kr.policy_name("streaming", "prompt") == "kvpress-streaming-pb"
    assert kr.policy_name("none", "prompt") == "kvpress-none"


def _sample(task="passkey", metric="string_match_all", refs=("29045",)):
    return {"schema": kr.SCHEMA, "id": f"{task}/2048/0", "model": "default", "task": task,
            "suite": "needle" if task == "needle" else task, "length": 2048, "sample": 0, "seed": 42,
            "setting": "template=chat", "context_ids": [1] * 10, "question_ids": [2] * 4, "references": list(refs),
            "metric": metric, "max_new_tokens": 16, "stop_token_ids": [2], "extra": {}}


def _pred(answer):
    return {"key": "k", "press": "snapkv", "press_kwargs": {"compression_ratio": 0.5}, "answer": answer,
            "generated_ids": [5, 6, 2], "context_tokens": 10, "question_tokens": 4, "kv_tokens_kept": [5] * 30,
            "cache_bytes": 1234, "timing": {"prefill_s": 1.0, "decode_s": 0.5, "steps": 2,
                                            "decode_ms_per_token": 250.0}, "versions": {"kvpress": "0.5.5"}}


def test_row_has_the_runner_format_and_scores():
    from bench.accuracy.results import KEY

    row = kr.make_row(_sample(), "kvpress-snapkv", 0.5, _pred(" 29045.\n"))
    for k in KEY + ("suite", "score", "metric", "metrics", "prediction", "references", "prompt_tokens",
                    "generated_tokens", "device_bytes", "host_bytes", "stats", "timing", "extra", "time"):
        assert k in row, k
    assert row["score"] == 100.0 and row["prediction"] == "29045."
    assert row["policy"] == "kvpress-snapkv" and row["ratio"] == 0.5 and row["prompt_tokens"] == 14
    assert row["stats"]["kv_tokens_kept_max"] == 5 and row["device_bytes"] == 1234
    assert kr.make_row(_sample(), "kvpress-snapkv", 0.5, _pred("no idea"))["score"] == 0.0
    needle = _sample("needle", "rouge1_f", [synthetic.NEEDLE.strip()])
    row = kr.make_row(needle, "kvpress-streaming", 0.5, _pred(synthetic.NEEDLE.strip()))
    assert row["score"] == pytest.approx(100.0) and row["metrics"]["string_match_all"] == 100.0
    json.dumps(row)
    assert "git_revision" in row and "git_dirty" in row  # the scoring code's revision
    git = {"git_revision": "f" * 40, "git_dirty": False, "git_dirty_files": []}
    assert kr.make_row(_sample(), "kvpress-snapkv", 0.5, _pred("x"), git).items() >= git.items()


def test_run_refuses_a_folder_another_runner_holds(tmp_path, capsys):
    from tests.test_provenance import _HOLDER

    samples = tmp_path / "s.jsonl"
    kr.write_samples(samples, [_sample()])
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert kr.main(["--samples", str(samples), "--out", str(run), "--presses", "snapkv"]) == 2
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {proc.pid}" in err[0] and not (run / "results.jsonl").exists()


def test_read_samples_checks_schema(tmp_path):
    good = tmp_path / "s.jsonl"
    kr.write_samples(good, [_sample()])
    assert kr.read_samples(good)[0]["id"] == "passkey/2048/0"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(kr.PeerError):
        kr.read_samples(bad)


def test_cli_help_and_missing_venv(tmp_path, monkeypatch):
    out = subprocess.run([sys.executable, "-m", "bench.peers.kvpress_run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--presses" in out.stdout and "compression_ratio" in out.stdout
    samples = tmp_path / "s.jsonl"
    kr.write_samples(samples, [_sample()])
    monkeypatch.setenv("KVPRESS_VENV", str(tmp_path / "no-venv"))
    rc = kr.main(["--samples", str(samples), "--out", str(tmp_path / "run"), "--presses", "snapkv"])
    assert rc == 2  # a clear error naming the setup script, nothing run
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_worker_is_standalone():
    """The worker runs under kvpress's venv: stdlib imports only at module level."""
    src = kr.WORKER.read_text()
    top = [line for line in src.splitlines() if line.startswith(("import ", "from "))]
    assert all(line.split()[1].split(".")[0] in {"__future__", "argparse", "json", "os", "sys", "time", "pathlib"}
               for line in top), top
