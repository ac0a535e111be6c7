"""NVIDIA kvpress (SnapKV, StreamingLLM presses) on our accuracy runner's exact samples and model.

    PYTHON=.venv/bin/python bash bench/peers/setup_kvpress.sh   # once: kvpress's own venv (~2 min)
    python -m bench.peers.kvpress_run --samples runs/acc/peer-samples.jsonl \\
        --tasks niah_single_1,passkey,needle --lengths 2048 --num-samples 2 \\
        --presses snapkv,streaming --ratio 0.5 --out runs/acc

Three steps, the first and last in the project's venv, the middle one in kvpress's:

1. Samples (``--tasks`` given): built by ``bench.accuracy``'s own builders (RULER from the
   ``<out>/samples/`` cache the accuracy runner uses, needle, passkey; fidelity has no question
   and is not a peer task), tokenized with the same tokenizer and written to ``--samples``
   (schema below). Without ``--tasks`` the ``--samples`` file must exist.
2. Predictions: ``kvpress_worker.py`` runs under the kvpress venv's python, one process for all
   jobs, appending to ``<out>/kvpress/predictions.jsonl``.
3. Scores: the same post-processing and scoring functions as the runner
   (``bench.accuracy.scoring``: RULER's ``string_match_all`` / ``string_match_part``; needle: ROUGE-1
   F via ``synthetic.score_needle``); one row per (press, sample) appended to
   ``<out>/results.jsonl`` in the runner's row format, policy ``kvpress-snapkv`` /
   ``kvpress-streaming`` (``kvpress-none``: kvpress's pipeline without a press, a full-KV anchor).
   Rows already there are skipped (resumable), so ``python -m bench.accuracy.report <out>`` shows
   the peers beside our policies when ``--out`` is the accuracy run's folder. Each row records the
   git revision of this code; the run holds the folder's lock, as the accuracy runner does.

How this differs from our policies (read the table with this in mind):

* Context / question split: kvpress compresses the *context* during its prefill, before it sees
  the question; the question tokens (and the answer) are then added uncompressed. Our policies
  prefill the whole prompt (context + question) and select with the question in view (SnapKV's
  observation window is the end of the prompt, i.e. the question). The split point is the last
  match of the task's question pattern (RULER: kvpress's own ``QUESTION_PATTERNS`` from its RULER
  benchmark; needle / passkey: the question sentence); everything before it, chat-template tokens
  included, is the context. The token ids are exactly our runner's (one tokenization of the whole
  prompt, cut at the first token that reaches into the question), so both see the same prompt.
  A consequence: our prefill runs the question over the *full* KV and compresses afterwards; in
  kvpress the question's own forward pass already sees only the compressed context.
* Chat template: the prompt is the runner's, already templated; kvpress's ``preprocess`` (which
  would apply the template again) is skipped, nothing else in its pipeline is.
* Ratio: our ``--ratio`` is the fraction of prompt KV *kept*; kvpress's ``compression_ratio`` is
  the fraction of the context *removed*. ``--budget context`` (default): compression_ratio =
  1 - ratio on the context (nudged by < 1/context tokens so kvpress keeps exactly
  floor(ratio * context), our rounding), question kept in full (kvpress's native use; it holds a
  little more KV than ours: + the question tokens). ``--budget prompt``: per sample,
  compression_ratio is chosen so that kept context + question = floor(ratio * prompt tokens), our
  policies' total prompt budget (policy name gets ``-pb``). Rows record ``ratio`` = our kept fraction, and the exact
  compression_ratio and per-layer kept tokens in ``stats``.
* Press defaults are kvpress's: SnapKV window 64, pooling kernel 5, GQA group *mean* (ours: window
  32, group max); StreamingLLM 4 sinks + the most recent context tokens (ours: the most recent
  *prompt* tokens). Override with ``--snapkv-window`` / ``--n-sink``.
* Decoding: kvpress's greedy loop (batch 1, argmax, stop at the runner's stop tokens, at most
  ``max_new_tokens`` including the stop token), HF transformers in float32 on torch CPU/GPU
  from the same GGUF (dequantized weights equal ours).

Check: ``--presses none`` (kvpress's pipeline, no press) must reproduce ``full``'s predictions from
``python -m bench.accuracy`` (same text); it did on 10 of 10 samples at 2048 tokens.
On the shared 2-core machines pass ``--threads 1`` (torch's 2 threads fight other processes:
5-10x slower there).

Sample file schema (``hetero-jax-peer-sample/1``, one JSON object a line; built here, readable by
any peer): ``id`` ("task/length/sample"), ``model``, ``task``, ``suite``, ``length``, ``sample``,
``seed``, ``setting`` (these eight as in the runner's row key), ``prompt`` (the runner's full
prompt text; = ``context`` + ``question``), ``context``, ``question``, ``context_ids``,
``question_ids`` (their concatenation = the runner's prompt token ids), ``references``, ``metric``,
``max_new_tokens``, ``stop_token_ids``, ``extra``, ``schema``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from bench.peers import kvpress_venv

SCHEMA = "hetero-jax-peer-sample/1"
PRESSES = ("snapkv", "streaming", "none")
WORKER = Path(__file__).with_name("kvpress_worker.py")
SETUP = "bash bench/peers/setup_kvpress.sh"

# kvpress's evaluation/benchmarks/ruler/create_huggingface_dataset.py (QUESTION_PATTERNS), keyed by
# the RULER task family; the question starts at the pattern's last match.
RULER_QUESTION_PATTERNS = {
    "niah": r"What (?:is|are all) the special magic",
    "vt": r"Question: Find all variables that are assigned the value",
    "cwe": r"Question: What are the 10 most common words in the above list\?",
    "fwe": r"Question: Do not provide any explanation\.",
    "qa": r"Answer the question based on the given documents\.",
}


class PeerError(ValueError):
    pass


# ---------------------------------------------------------------------------------------- samples
def question_pattern(task: str) -> str:
    from bench.accuracy import synthetic

    if task == "needle":
        return re.escape(synthetic.NEEDLE_QUESTION)
    if task == "passkey":
        return re.escape(synthetic.PASSKEY_QUESTION)
    family = task.split("_")[0]
    if family not in RULER_QUESTION_PATTERNS:
        raise PeerError(f"no context/question split for task {task!r}")
    return RULER_QUESTION_PATTERNS[family]


def split_prompt(prompt: str, task: str) -> int:
    """Character offset where the question starts (the last match of the task's pattern)."""
    matches = list(re.finditer(question_pattern(task), prompt))
    if not matches:
        raise PeerError(f"{task}: question pattern {question_pattern(task)!r} not found in the prompt")
    return matches[-1].start()


def split_ids(ids: list[int], offsets: list[tuple[int, int]], cut: int) -> int:
    """Index of the first token that reaches past character ``cut`` (it goes to the question)."""
    for i, (_, end) in enumerate(offsets):
        if end > cut:
            return i
    return len(ids)


def build_samples(tasks: list[str], lengths: list[int], n: int, out: Path, *, model: str = "default",
                  seed: int = 42, template: str = "chat", progress: bool = True) -> tuple[list[dict], object]:
    """The runner's samples (``Runner._samples``: same builders, same RULER cache under ``out``)."""
    from bench.accuracy import synthetic
    from bench.accuracy.runner import RunConfig, Runner, expand_tasks, suite_of

    tasks = [t for t in expand_tasks(tasks) if t != "fidelity"]
    if not tasks:
        raise PeerError("no generation tasks (fidelity has no question; it is not a peer task)")
    runner = Runner(RunConfig(policies=["full"], tasks=tasks, lengths=lengths, samples=n, out=out, model=model,
                              seed=seed, template=template, progress=progress))
    tok = runner.loaded.tokenizer
    stop = list(runner._stop_tokens())
    rows = []
    for length in lengths:
        for task in tasks:
            built = runner._samples(task, length)  # sample id -> sample (a list in older versions)
            for i, s in (built.items() if isinstance(built, dict) else enumerate(built)):
                prompt = s["prompt"]
                ids = synthetic.encode(tok, prompt)
                enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
                if list(enc["input_ids"]) != ids:
                    raise PeerError(f"{task} sample {i}: offset tokenization differs from the runner's")
                cut = split_prompt(prompt, task)
                k = split_ids(ids, enc["offset_mapping"], cut)
                cut_char = enc["offset_mapping"][k][0] if k < len(ids) else len(prompt)
                rows.append({
                    "schema": SCHEMA, "id": f"{task}/{length}/{i}", "model": runner.model_name, "task": task,
                    "suite": suite_of(task), "length": length, "sample": i, "seed": seed,
                    "setting": runner.setting(task), "prompt": prompt, "context": prompt[:cut_char],
                    "question": prompt[cut_char:], "context_ids": ids[:k], "question_ids": ids[k:],
                    "references": list(s["references"]), "metric": s["metric"],
                    "max_new_tokens": int(s["max_new_tokens"]), "stop_token_ids": stop, "extra": s["extra"],
                })
    return rows, runner


def write_samples(path: Path, rows: list[dict]) -> None:
    from bench.accuracy.results import dumps, write_atomic

    write_atomic(path, "".join(dumps(r) + "\n" for r in rows))


def read_samples(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        if r.get("schema") != SCHEMA:
            raise PeerError(f"{path}: not a {SCHEMA} file (schema {r.get('schema')!r}); build it with --tasks")
    return rows


# ---------------------------------------------------------------------------------------- budgets
def kept_context(ratio: float, context: int, question: int, budget: str) -> int:
    """Context tokens kvpress should keep per KV head for our kept fraction ``ratio``."""
    if not 0.0 < ratio <= 1.0:
        raise PeerError(f"--ratio must be in (0, 1], got {ratio}")
    if budget == "context":
        return max(1, math.floor(ratio * context + 1e-9))
    if budget != "prompt":
        raise PeerError(f"unknown budget {budget!r}")
    keep = math.floor(ratio * (context + question) + 1e-9) - question
    if keep < 1:
        raise PeerError(f"--budget prompt: a {ratio} budget of {context + question} prompt tokens does not cover "
                        f"the {question}-token question")
    return min(keep, context)


def compression_ratio(ratio: float, context: int, question: int, budget: str) -> float:
    """kvpress's compression_ratio (fraction of the context removed) for our kept ``ratio``.

    About ``1 - ratio`` (context budget), nudged by under ``1 / context`` so that kvpress's
    ``int(context * (1 - compression_ratio))`` is exactly ``kept_context(...)`` (floor, as ours).
    """
    keep = kept_context(ratio, context, question, budget)
    return min(max(1.0 - (keep + 0.5) / context, 0.0), 0.999999)


def policy_name(press: str, budget: str) -> str:
    return f"kvpress-{press}" + ("-pb" if budget == "prompt" and press != "none" else "")


# ---------------------------------------------------------------------------------------- run
def model_source(model: str) -> str:
    """What the worker loads: the default model's GGUF, a .gguf, or an HF folder."""
    if model == "default":
        import convert

        return str(convert.default_gguf_path())
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf" or (p / "config.json").is_file():
        return str(p)
    raise PeerError(f"{model}: kvpress loads a .gguf file or an HF model folder (not a converted folder)")


def venv_python() -> Path:
    py = kvpress_venv() / "bin" / "python"
    if not py.exists():
        raise PeerError(f"no kvpress venv at {kvpress_venv()}; create it with: {SETUP}")
    return py


def press_kwargs(press: str, cr: float, args) -> dict:
    if press == "snapkv":
        return {"compression_ratio": cr, "window_size": args.snapkv_window, "kernel_size": args.snapkv_kernel}
    if press == "streaming":
        return {"compression_ratio": cr, "n_sink": args.n_sink}
    return {}


def score(sample: dict, answer: str) -> tuple[str, float, dict]:
    from bench.accuracy import scoring, synthetic

    pred = scoring.postprocess_pred(answer)
    if sample["task"] == "needle":
        value, metrics = synthetic.score_needle(pred, sample["references"])
    else:
        value = scoring.METRICS[sample["metric"]](pred, sample["references"])
        metrics = {sample["metric"]: value}
    return pred, value, metrics


def make_row(sample: dict, policy: str, ratio: float | None, pred: dict, git: dict | None = None) -> dict:
    """One results.jsonl row in the runner's format; ``git``: ``bench.common.git_state()`` of this run."""
    if git is None:
        from bench.common import git_state

        git = git_state()
    text, value, metrics = score(sample, pred["answer"])
    kept = pred.get("kv_tokens_kept") or []
    stats = {"peer": "kvpress", "press": pred["press"], "press_kwargs": pred.get("press_kwargs", {}),
             "context_tokens": pred["context_tokens"], "question_tokens": pred["question_tokens"],
             "kv_tokens_kept_min": min(kept) if kept else None, "kv_tokens_kept_max": max(kept) if kept else None,
             "versions": pred.get("versions")}
    return {
        "model": sample["model"], "policy": policy, "ratio": ratio, "task": sample["task"], "suite": sample["suite"],
        "length": sample["length"], "sample": sample["sample"], "seed": sample["seed"], "setting": sample["setting"],
        "score": value, "metric": sample["metric"], "metrics": metrics, "prediction": text,
        "references": sample["references"], "prompt_tokens": len(sample["context_ids"]) + len(sample["question_ids"]),
        "generated_tokens": len(pred["generated_ids"]), "device_bytes": pred.get("cache_bytes"), "host_bytes": 0,
        "stats": stats, "timing": pred["timing"], "extra": sample.get("extra", {}),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git,
    }


def run(args) -> int:
    """The three steps, holding the run folder's lock (shared with ``python -m bench.accuracy``)."""
    from bench.accuracy.results import folder_lock

    with folder_lock(args.out):
        return _run(args)


def _run(args) -> int:
    from bench.accuracy.results import ResultsFile, row_key
    from bench.common import git_state

    out = Path(args.out)
    presses = [p for p in args.presses]
    bad = [p for p in presses if p not in PRESSES]
    if bad:
        raise PeerError(f"unknown press {bad}; choose from {', '.join(PRESSES)}")
    if args.tasks:
        samples, _ = build_samples(args.tasks.split(","), args.lengths, args.num_samples, out, model=args.model,
                                   seed=args.seed, template=args.template, progress=not args.quiet)
        write_samples(args.samples, samples)
        print(f"{len(samples)} samples -> {args.samples}", file=sys.stderr)
    elif not Path(args.samples).is_file():
        raise PeerError(f"{args.samples}: no such file; build it with --tasks / --lengths / --num-samples")
    else:
        samples = read_samples(args.samples)
    if args.samples_only:
        return 0

    results = ResultsFile(out)
    git = git_state()  # the scoring code's revision (the worker runs kvpress's pinned release)
    jobs, todo = [], {}
    for press in presses:
        policy = policy_name(press, args.budget)
        ratio = None if press == "none" else args.ratio
        for s in samples:
            row = {**{k: s[k] for k in ("model", "task", "length", "sample", "seed", "setting")},
                   "policy": policy, "ratio": ratio}
            if results.has(row_key(row)):
                continue
            cr = 0.0 if press == "none" else compression_ratio(args.ratio, len(s["context_ids"]),
                                                                len(s["question_ids"]), args.budget)
            key = f"{policy}|{s['id']}|{ratio}"
            todo[key] = (s, policy, ratio)
            jobs.append({"key": key, "press": press, "press_kwargs": press_kwargs(press, cr, args),
                         "context_ids": s["context_ids"], "question_ids": s["question_ids"],
                         "max_new_tokens": s["max_new_tokens"], "stop_token_ids": s["stop_token_ids"]})
    skipped = len(presses) * len(samples) - len(jobs)
    peer = out / "kvpress"
    preds_path = peer / "predictions.jsonl"
    rc = ran = 0
    if jobs:
        peer.mkdir(parents=True, exist_ok=True)
        done = _read_predictions(preds_path)
        fresh = [j for j in jobs if j["key"] not in done]
        if fresh:
            jobs_path = peer / "jobs.jsonl"
            jobs_path.write_text("".join(json.dumps(j) + "\n" for j in fresh), encoding="utf-8")
            cmd = [str(venv_python()), str(WORKER), "--jobs", str(jobs_path), "--model", model_source(args.model),
                   "--out", str(preds_path)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            env.pop("PYTHONPATH", None)
            rc = subprocess.run(cmd, env=env).returncode
        done = _read_predictions(preds_path)
        for key, (s, policy, ratio) in todo.items():
            if key in done:
                results.append(make_row(s, policy, ratio, done[key], git))
                ran += 1
    print(f"{ran} rows run, {skipped} already done -> {results.path}")
    if rc:
        print(f"error: the kvpress worker exited with {rc}", file=sys.stderr)
        return 1
    return 0


def _read_predictions(path: Path) -> dict:
    from bench.accuracy.results import read_rows

    return {r["key"]: r for r in read_rows(path)}


# ---------------------------------------------------------------------------------------- CLI
def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.peers.kvpress_run",
        description="Run NVIDIA kvpress presses on the accuracy runner's samples and score them like the runner.",
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--samples", type=Path, required=True,
                   help=f"sample file ({SCHEMA} JSONL); written when --tasks is given, else read")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder: results.jsonl (shared with python -m bench.accuracy), kvpress/, samples/")
    p.add_argument("--presses", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=["snapkv", "streaming"],
                   help=f"comma-separated: {', '.join(PRESSES)}; default snapkv,streaming")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of prompt KV kept, as bench.accuracy's --ratio (kvpress compression_ratio = "
                        "1 - ratio with --budget context); default 0.5")
    p.add_argument("--budget", choices=("context", "prompt"), default="context",
                   help="context: compress the context by 1 - ratio, question uncompressed (kvpress's way); prompt: "
                        "keep floor(ratio * prompt tokens) in all, as our policies (policy name -pb); default context")
    g = p.add_argument_group("building samples (as python -m bench.accuracy would)")
    g.add_argument("--tasks", default=None, help="tasks or groups (ruler, needle, passkey, RULER task names)")
    g.add_argument("--lengths", type=_ints, default=[4096], help="total lengths in tokens; default 4096")
    g.add_argument("--num-samples", type=int, default=5, help="samples per task and length; default 5")
    g.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct GGUF), a .gguf or an HF folder")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--template", choices=("chat", "base"), default="chat")
    g.add_argument("--samples-only", action="store_true", help="write the sample file and stop")
    k = p.add_argument_group("press options (kvpress's defaults)")
    k.add_argument("--snapkv-window", type=int, default=64, help="SnapKV observation window; default 64")
    k.add_argument("--snapkv-kernel", type=int, default=5, help="SnapKV pooling kernel; default 5")
    k.add_argument("--n-sink", type=int, default=4, help="StreamingLLM sink tokens; default 4")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the worker (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (PeerError, ValueError, RuntimeError) as e:  # RunError, RulerError, SyntheticError included
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
