"""Results you can trace: the git revision every result records, one writer per accuracy folder,
no row twice, and test seeds that repeat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench import common
from bench.accuracy import results
from tests.conftest import SEED_ENV, seed_for


# ---------------------------------------------------------------- git revision
def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    (root / "bench" / "results").mkdir(parents=True)
    (root / "code.py").write_text("x = 1\n")
    (root / "bench" / "results" / "r.json").write_text("{}\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-qm", "one")
    return root


def test_git_state_clean_dirty_and_results_excluded(repo):
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert common.git_state(repo) == {"git_revision": sha, "git_dirty": False, "git_dirty_files": []}
    (repo / "bench" / "results" / "r.json").write_text('{"a": 1}\n')  # a run writing its own results
    (repo / "untracked.py").write_text("")
    assert common.git_state(repo)["git_dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    state = common.git_state(repo)
    assert state["git_revision"] == sha and state["git_dirty"] is True and state["git_dirty_files"] == ["code.py"]
    assert common.revision_text(state) == f"{sha[:12]} + uncommitted changes (1 file)"
    assert common.revision_text({**state, "git_dirty": False}) == sha[:12]


def test_git_state_without_git_or_checkout(tmp_path, repo, monkeypatch):
    for where in (tmp_path / "plain", repo / "bench"):  # not a checkout; inside one but not its top
        where.mkdir(exist_ok=True)
        state = common.git_state(where)
        assert state["git_revision"] is None and state["git_dirty"] is None
        assert state["git_note"].startswith("no git checkout") and str(tmp_path) not in state["git_note"]
        assert common.revision_text(state).startswith("unknown (no git checkout")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    state = common.git_state(repo)
    assert state == {"git_revision": None, "git_dirty": None, "git_note": "git not found: revision not recorded"}
    assert common.revision_text({}) == "not recorded"  # results written before revisions were


def test_every_result_writer_records_the_revision(tmp_path, monkeypatch):
    info = common.machine()
    assert {"git_revision", "git_dirty"} <= set(info)
    assert f"- revision: {common.revision_text(info)}" in common.header_md("t", info)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    with pytest.raises(ValueError, match="git_revision"):
        common.write_results("x", {"machine": {"device": "d"}, "rows": []}, "md")
    assert not list(tmp_path.iterdir())
    jpath, _ = common.write_results("x", {"machine": info, "rows": []}, "md")
    assert json.loads(jpath.read_text())["machine"]["git_revision"] == info["git_revision"]


# ---------------------------------------------------------------- duplicates and the folder lock
def _row(sample, score=1.0, **kw):
    return {"model": "m", "policy": "full", "ratio": None, "task": "vt", "length": 8, "sample": sample, "seed": 1,
            "setting": "s", "score": score, "prediction": str(score), "timing": {"t": time.time()}, **kw}


def test_dedupe_keeps_first_of_agreeing_copies_and_refuses_disagreeing(tmp_path):
    path = tmp_path / results.RESULTS_FILE
    rows = [_row(0), _row(1), _row(0, timing={"t": 0}), _row(2), _row(1)]  # copies differ in timing only
    path.write_text("".join(results.dumps(r) + "\n" for r in rows))
    assert results.main(["dedupe", str(tmp_path)]) == 0
    assert [r["sample"] for r in results.read_rows(path)] == [0, 1, 2]
    assert results.read_rows(path)[0]["timing"] == rows[0]["timing"]
    assert results.dedupe(tmp_path) == 0
    before = path.read_text() + results.dumps(_row(2, score=0.0)) + "\n"
    path.write_text(before)
    with pytest.raises(results.DuplicateRowError, match="sample=2.*different score"):
        results.dedupe(tmp_path)
    assert path.read_text() == before  # nothing rewritten
    kept, dropped = results.dedupe_rows(results.read_rows(path), strict=False)
    assert dropped == 1 and kept[-1]["score"] == 1.0


_HOLDER = """
import sys, time
from bench.accuracy.results import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held_folder(tmp_path):
    """A run folder whose lock another process holds; yields (folder, that process)."""
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_second_runner_on_a_folder_stops_naming_the_holder(held_folder, capsys):
    from bench.accuracy.__main__ import main

    folder, proc = held_folder
    assert main(["--tasks", "passkey", "--out", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"pid {proc.pid}" in err[0], err
    assert not (folder / results.RESULTS_FILE).exists()
    with pytest.raises(results.FolderBusy, match=f"pid {proc.pid}"):
        results.dedupe(folder)


def test_lock_is_released_and_reentrant(tmp_path):
    with results.folder_lock(tmp_path):
        with results.folder_lock(tmp_path):  # the runner inside the CLI's hold
            assert json.loads((tmp_path / results.HOLDER_FILE).read_text())["pid"] == os.getpid()
        out = subprocess.run([sys.executable, "-c", "import sys; from bench.accuracy.results import folder_lock\n"
                              "with folder_lock(sys.argv[1]): pass", str(tmp_path)], capture_output=True, text=True)
        assert out.returncode != 0 and f"pid {os.getpid()}" in out.stderr  # still held after the inner block
    assert not (tmp_path / results.HOLDER_FILE).exists()
    with results.folder_lock(tmp_path):  # free again
        pass


# ---------------------------------------------------------------- test seeds
def test_seed_fixed_per_test_with_overrides():
    a, b = "tests/test_x.py::test_a", "tests/test_x.py::test_b[1]"
    assert seed_for(a) == seed_for(a) and seed_for(a) != seed_for(b)
    assert 0 <= seed_for(a) < 2**31 and seed_for(a, "") == seed_for(a)
    assert seed_for(a, "123") == seed_for(b, " 123 ") == 123
    fresh = {seed_for(a, "random") for _ in range(4)}
    assert len(fresh) > 1
    with pytest.raises(pytest.UsageError, match=SEED_ENV):
        seed_for(a, "banana")


def test_seed_fixture_repeats(seed, request):
    expected = seed_for(request.node.nodeid, os.environ.get(SEED_ENV))
    if os.environ.get(SEED_ENV, "").strip().lower() != "random":
        assert seed == expected
    assert ("seed", seed) in request.node.user_properties
