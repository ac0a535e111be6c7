"""The accuracy run: policies x tasks x lengths x samples -> one JSONL row each, resumable.

Order: for each length, for each task, build the task's samples once (RULER generators, needle,
passkey), then run every policy on every sample with ``hetero_jax.generate`` (greedy, batch 1,
stop at the model's end-of-turn tokens). Fidelity runs per sample window: full KV once, then
each policy against it. A row already in ``results.jsonl`` is never run again, and nothing is
built or loaded (model, samples) unless some row under it is still missing. The run holds the
output folder's lock (``results.folder_lock``): a second runner on the same folder stops at once.
Every row records the git revision of the code that produced it (``bench.common.git_state``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

from bench.accuracy import fidelity, ruler, scoring, synthetic
from bench.accuracy.results import ResultsFile, folder_lock, row_key, write_atomic
from hetero_jax.cache import parse_policy_spec

SUITES = {"ruler": ruler.TASKS, "needle": ("needle",), "passkey": ("passkey",), "fidelity": ("fidelity",)}
ALL_TASKS = tuple(t for group in SUITES.values() for t in group)


# Policy stats an accuracy row leaves out, to keep results files under the 5 MB per-file limit:
# the per-decode-step masks (bench.decode's step timing; 40% of the bytes) and the per-pivot
# breakdown (a third of the rest); the row keeps their totals (checks, refreshes, bytes_moved,
# refreshes_per_layer). ``policy.stats(cache)`` still returns them.
PER_STEP_STATS = ("check_step_mask", "refresh_step_mask", "per_pivot")


class RunError(ValueError):
    """Bad run options (unknown task or policy, a length the model cannot hold, ...)."""


def expand_tasks(spec: str | list[str]) -> list[str]:
    """'ruler,needle' -> RULER's 13 tasks + needle; single RULER task names pass through."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        names = ALL_TASKS if item == "all" else SUITES.get(item, (item,) if item in ALL_TASKS else None)
        if names is None:
            raise RunError(f"unknown task {item!r}; use all, {', '.join(SUITES)} or one of: {', '.join(ALL_TASKS)}")
        out += [n for n in names if n not in out]
    if not out:
        raise RunError("no tasks given")
    return out


def suite_of(task: str) -> str:
    return next(s for s, names in SUITES.items() if task in names)


@dataclasses.dataclass
class RunConfig:
    policies: list[str]
    tasks: list[str]
    lengths: list[int]
    samples: int
    out: Path
    ratio: float = 0.5
    model: str = "default"
    seed: int = 42
    template: str = "chat"
    positions: int = 256
    dtype: str | None = None
    progress: bool = True

    def ratio_for(self, policy: str) -> float | None:
        name, ratio, _ = parse_policy_spec(policy)
        if name == "full":
            return None
        return self.ratio if ratio is None else ratio


class Runner:
    def __init__(self, rc: RunConfig, loaded=None, model_name: str | None = None):
        if rc.samples < 1:
            raise RunError("--samples must be >= 1")
        if not rc.policies:
            raise RunError("no policies given")
        self.rc = rc
        self.rc.tasks = expand_tasks(rc.tasks)
        self.out = Path(rc.out)
        self.results: ResultsFile | None = None  # opened under the folder lock by run()
        self.git: dict = {}
        self._loaded = loaded
        self.model_name = model_name or rc.model
        self._policies: dict = {}
        self.counts = {"run": 0, "skipped": 0}

    # ------------------------------------------------------------------ lazily built pieces
    @property
    def loaded(self):
        if self._loaded is None:
            from convert import load_model

            self._loaded = load_model(self.rc.model, dtype=self.rc.dtype, progress=self.rc.progress)
            if self._loaded.tokenizer is None:
                raise RunError(f"model {self.rc.model!r} has no tokenizer; the accuracy tasks need one")
        return self._loaded

    def policy(self, name: str):
        if name not in self._policies:
            from hetero_jax.cache import make_policy

            base, _, options = parse_policy_spec(name)
            self._policies[name] = make_policy(base, self.loaded.cfg, ratio=self.rc.ratio_for(name), **options)
        return self._policies[name]

    def setting(self, task: str) -> str:
        return f"positions={self.rc.positions}" if task == "fidelity" else f"template={self.rc.template}"

    def key(self, policy: str, task: str, length: int, sample: int) -> tuple:
        return row_key({"model": self.model_name, "policy": policy, "ratio": self.rc.ratio_for(policy), "task": task,
                        "length": length, "sample": sample, "seed": self.rc.seed, "setting": self.setting(task)})

    def sample_ids(self, task: str) -> list[int]:
        """Sample ids of a task: 0..n-1, except needle, whose samples are named by their depth (%)."""
        return synthetic.depths(self.rc.samples) if task == "needle" else list(range(self.rc.samples))

    def pending(self, task: str, length: int) -> list[tuple[str, int]]:
        return [(p, i) for p in self.rc.policies for i in self.sample_ids(task)
                if not self.results.has(self.key(p, task, length, i))]

    # ------------------------------------------------------------------ the run
    def check(self) -> None:
        """Fail early on options the model cannot serve (builds the policies, loads the model)."""
        cfg = self.loaded.cfg
        for length in self.rc.lengths:
            if length > cfg.max_position_embeddings:
                raise RunError(f"length {length} exceeds the model's context of {cfg.max_position_embeddings}")
        for p in self.rc.policies:
            self.policy(p)

    def run(self) -> dict:
        """Run every missing row, holding the output folder's lock (``FolderBusy`` if another has it)."""
        from bench.common import git_state

        with folder_lock(self.out):
            self.results = ResultsFile(self.out)  # read after locking: what any earlier runner wrote
            self.git = git_state()  # the code this process loaded and runs
            return self._run()

    def _run(self) -> dict:
        rc = self.rc
        todo = {(t, n): self.pending(t, n) for n in rc.lengths for t in rc.tasks}
        total = sum(len(v) for v in todo.values())
        every = sum(len(self.sample_ids(t)) for t in rc.tasks) * len(rc.lengths) * len(rc.policies)
        self.counts["skipped"] = every - total
        if total == 0:
            return self.counts
        self.check()
        self._write_meta()
        from tqdm.auto import tqdm

        with tqdm(total=total, desc="accuracy", unit="row", disable=not rc.progress, file=sys.stderr) as bar:
            self.bar = bar
            for length in rc.lengths:
                for task in rc.tasks:
                    if todo[(task, length)]:
                        bar.set_postfix_str(f"{task} @ {length}")
                        if task == "fidelity":
                            self._run_fidelity(length)
                        else:
                            self._run_generation(task, length, todo[(task, length)])
        return self.counts

    def _samples(self, task: str, length: int) -> dict[int, dict]:
        """Sample id -> {prompt, references, metric, max_new_tokens, extra}."""
        rc, tok = self.rc, self.loaded.tokenizer
        if task in ruler.TASKS:
            cfgs = ruler.task_configs()
            cache = ruler.SampleCache(self.out / "samples", tok, rc.template, rc.seed)
            rows = cache.get(task, length, rc.samples)
            cfg = cfgs[task]
            return {i: {"prompt": r["input"], "references": list(r["outputs"]), "metric": cfg["metric"],
                        "max_new_tokens": cfg["tokens_to_generate"], "extra": {}} for i, r in enumerate(rows)}
        if task == "needle":
            hay = synthetic.Haystack(tok)
            return {d: synthetic.needle_sample(hay, length, d, rc.template) for d in self.sample_ids(task)}
        if task == "passkey":
            return {i: synthetic.passkey_sample(tok, length, i, rc.seed, rc.template) for i in self.sample_ids(task)}
        raise RunError(f"no sample builder for task {task!r}")

    def _stop_tokens(self) -> tuple[int, ...]:
        stop = set(self.loaded.cfg.eos_token_ids)
        eos = getattr(self.loaded.tokenizer, "eos_token_id", None)
        if eos is not None:
            stop.add(int(eos))
        return tuple(sorted(stop))

    def _run_generation(self, task: str, length: int, pending: list[tuple[str, int]]) -> None:
        from hetero_jax.decode_loop import prefill_once

        samples = self._samples(task, length)
        tok, lm = self.loaded.tokenizer, self.loaded
        by_sample: dict = {}
        for policy, i in pending:
            by_sample.setdefault(i, []).append(policy)
        for i, policies in by_sample.items():
            s = samples[i]
            ids = synthetic.encode(tok, s["prompt"])
            if len(ids) + s["max_new_tokens"] > length:  # skipped, not fatal: the other samples still run
                print(f"skipped {task} sample {i}: {len(ids)} prompt tokens + {s['max_new_tokens']} new exceed "
                      f"{length}; no row is written for it", file=sys.stderr)
                self.counts["too_long"] = self.counts.get("too_long", 0) + len(policies)
                self.bar.update(len(policies))
                continue
            # one forward pass per sample feeds every policy (prefill attention is the same for all)
            shared = prefill_once(lm.params, [ids], config=lm.cfg, pad_multiple=1024) if len(policies) > 1 else None
            for policy in policies:
                self._generate_one(task, length, i, s, ids, policy, shared)

    def _generate_one(self, task, length, i, s, ids, policy, shared) -> None:
        from hetero_jax.decode_loop import RunOptions
        from hetero_jax.generate import generate

        tok, lm = self.loaded.tokenizer, self.loaded
        # one compiled prefill/step per (policy, length, 1K bucket): all tasks reserve 128 new slots
        options = RunOptions(pad_multiple=1024, reserve_new_tokens=max(128, s["max_new_tokens"]), prefilled=shared)
        res = generate(lm.params, [ids], self.policy(policy), config=lm.cfg, max_new_tokens=s["max_new_tokens"],
                       stop_tokens=self._stop_tokens(), seed=self.rc.seed, progress=False, options=options)
        text = tok.decode(res.tokens[0], skip_special_tokens=True)
        pred = scoring.postprocess_pred(text)
        if task == "needle":
            score, metrics = synthetic.score_needle(pred, s["references"])
        else:
            score = scoring.METRICS[s["metric"]](pred, s["references"])
            metrics = {s["metric"]: score}
        self._append(policy, task, length, i, score=score, metric=s["metric"], metrics=metrics, prediction=pred,
                     references=s["references"], prompt_tokens=len(ids), generated_tokens=len(res.tokens[0]),
                     stats=res.stats, timing=res.timing, extra=s["extra"])

    def _run_fidelity(self, length: int) -> None:
        from hetero_jax.decode_loop import prefill_once

        rc, lm = self.rc, self.loaded
        hay = synthetic.Haystack(lm.tokenizer)
        for i in range(rc.samples):
            pend = [p for p in rc.policies if not self.results.has(self.key(p, "fidelity", length, i))]
            if not pend:
                continue
            start, window = synthetic.text_window(hay, length, i, rc.seed)
            # one forward pass of the prefix feeds full KV and every policy (as for generation tasks)
            shared = prefill_once(lm.params, [fidelity.prefix_of(window, rc.positions)], config=lm.cfg)
            ref = fidelity.teacher_forced(lm.params, lm.cfg, self.policy("full"), window, rc.positions,
                                          prefilled=shared)
            for p in pend:
                run = ref if p == "full" else fidelity.teacher_forced(lm.params, lm.cfg, self.policy(p), window,
                                                                       rc.positions, prefilled=shared)
                m = scoring.fidelity_stats(ref[0], run[0], ref[1])
                self._append(p, "fidelity", length, i, score=100 * m["top1_agreement"], metric="top1_agreement",
                             metrics=m, prediction="", references=[],
                             prompt_tokens=fidelity.split(length, rc.positions),
                             generated_tokens=rc.positions, stats=run[2], timing=run[3],
                             extra={"window_start": start})

    def _append(self, policy, task, length, sample, *, stats, timing, **fields) -> None:
        stats = {k: v for k, v in (stats or {}).items() if k not in PER_STEP_STATS}
        row = {
            "model": self.model_name, "policy": policy, "ratio": self.rc.ratio_for(policy), "task": task,
            "suite": suite_of(task), "length": length, "sample": sample, "seed": self.rc.seed,
            "setting": self.setting(task), **fields,
            "device_bytes": stats.pop("device_bytes", None), "host_bytes": stats.pop("host_bytes", None),
            "stats": stats, "timing": timing,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **self.git,
        }
        self.results.append(row)
        self.counts["run"] += 1
        self.bar.update(1)

    def _write_meta(self) -> None:
        from bench.common import machine
        from bench.data import WHEELS

        path = self.out / "run.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {"runs": []}
        lm = self.loaded
        meta["runs"].append({
            **machine(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.rc).items()
                       if k != "out"},
            "model_path": _portable_path(getattr(lm, "path", "")),
            "model_config": lm.cfg.to_dict() if hasattr(lm.cfg, "to_dict") else None,
            "data": {k: {"requirement": w.requirement, "sha256": w.sha256} for k, w in WHEELS.items()},
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        })
        write_atomic(path, json.dumps(meta, indent=2, default=str))


def _portable_path(path) -> str:
    """A model path without this machine's home: relative to the hetero-jax cache when inside it."""
    import convert

    path, home = Path(str(path)), convert.model_home()
    try:
        return str(Path("$HETERO_JAX_HOME") / path.relative_to(home))
    except ValueError:
        return path.name
