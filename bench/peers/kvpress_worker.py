"""Runs kvpress presses on pre-tokenized samples; executed by the kvpress venv's python.

Standalone on purpose (no hetero-jax imports: the kvpress venv does not have the project, whose
transformers 5.x kvpress cannot use). ``bench.peers.kvpress_run`` writes the jobs, starts this
script and scores what it writes. Usage:

    <kvpress venv>/bin/python bench/peers/kvpress_worker.py --jobs JOBS.jsonl --model MODEL --out PRED.jsonl

``--model``: a .gguf file (loaded with ``from_pretrained(folder, gguf_file=name)``) or an HF folder.

A job line: ``{"key", "press", "press_kwargs", "context_ids", "question_ids", "max_new_tokens",
"stop_token_ids"}``. Per job this runs kvpress's own ``KVPressTextGenerationPipeline._forward``
(through ``Pipeline.forward``, which adds no-grad): the press compresses the KV cache while the
context is prefilled, then the question is fed and answered greedily on the compressed cache.
Only kvpress's ``preprocess`` (chat template + tokenizing) is skipped, because the job already
holds the exact token ids of our runner's prompt, split into context and question. The stop
tokens are set to ``stop_token_ids`` (our runner's: the model's end-of-turn tokens).

Each finished job appends one line to ``--out`` (flushed), so an interrupted run keeps what it did:
``{"key", "press", "answer", "generated_ids", "context_tokens", "question_tokens",
"kv_tokens_kept", "cache_bytes", "timing", "versions"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _press(name: str, kwargs: dict):
    from kvpress import SnapKVPress, StreamingLLMPress

    if name == "none":
        return None
    cls = {"snapkv": SnapKVPress, "streaming": StreamingLLMPress}.get(name)
    if cls is None:
        raise SystemExit(f"kvpress_worker: unknown press {name!r}")
    return cls(**kwargs)


def _load(model: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    if path.is_file():
        src, kw = str(path.parent), {"gguf_file": path.name}
    else:
        src, kw = str(path), {}
    tok = AutoTokenizer.from_pretrained(src, **kw)
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    lm.eval()
    return lm, tok


class _Tracker:
    """Hooks on the LM's outer forward: one call per answer token (kvpress's prefill calls the
    inner model only). Records the greedy ids, the KV length/bytes and the time of each call."""

    def __init__(self, lm):
        self.lm = lm
        self.handles = [lm.register_forward_pre_hook(self.pre, with_kwargs=True),
                        lm.register_forward_hook(self.post, with_kwargs=True)]
        self.reset()

    def reset(self):
        self.ids, self.kept, self.bytes, self.t_first_start, self.t_first_end = [], None, 0, None, None

    def pre(self, module, args, kwargs):
        if self.t_first_start is None:
            self.t_first_start = time.perf_counter()
            cache = kwargs.get("past_key_values")
            if cache is not None:  # the compressed context, before the question goes in
                self.kept = [int(cache.get_seq_length(i)) for i in range(len(cache))]

    def post(self, module, args, kwargs, output):
        self.ids.append(int(output.logits[0, -1].argmax()))
        if self.t_first_end is None:
            self.t_first_end = time.perf_counter()
        cache = kwargs.get("past_key_values")
        if cache is not None:
            self.bytes = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)
                             if t is not None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)

    import importlib.metadata as md

    import torch
    from kvpress import KVPressTextGenerationPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = [json.loads(line) for line in args.jobs.read_text(encoding="utf-8").splitlines() if line.strip()]
    t0 = time.perf_counter()
    lm, tok = _load(args.model)
    versions = {p: md.version(p) for p in ("kvpress", "transformers", "torch")}
    print(f"kvpress_worker: model loaded in {time.perf_counter() - t0:.1f} s ({versions}); {len(jobs)} jobs",
          file=sys.stderr, flush=True)
    pipe = KVPressTextGenerationPipeline(model=lm, tokenizer=tok)
    tracker = _Tracker(lm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as out:
        for n, job in enumerate(jobs, 1):
            press = _press(job["press"], job.get("press_kwargs", {}))
            lm.generation_config.eos_token_id = list(job["stop_token_ids"])
            inputs = {"context_ids": torch.tensor([job["context_ids"]], dtype=torch.long),
                      "questions_ids": [torch.tensor([job["question_ids"]], dtype=torch.long)]}
            tracker.reset()
            start = time.perf_counter()
            answers = pipe.forward(inputs, max_new_tokens=int(job["max_new_tokens"]), press=press, cache=None)
            end = time.perf_counter()
            steps = max(len(tracker.ids) - 1, 0)
            decode_s = end - tracker.t_first_end
            row = {
                "key": job["key"], "press": job["press"], "press_kwargs": job.get("press_kwargs", {}),
                "answer": answers[0], "generated_ids": tracker.ids,
                "context_tokens": len(job["context_ids"]), "question_tokens": len(job["question_ids"]),
                "kv_tokens_kept": tracker.kept, "cache_bytes": tracker.bytes,
                "timing": {"context_prefill_s": tracker.t_first_start - start,
                           "prefill_s": tracker.t_first_end - start, "decode_s": decode_s, "steps": steps,
                           "decode_ms_per_token": 1000 * decode_s / max(steps, 1), "total_s": end - start},
                "versions": versions,
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            os.fsync(out.fileno())
            print(f"kvpress_worker: {n}/{len(jobs)} {job['press']} {job['key']}: {end - start:.1f} s "
                  f"{answers[0][:60]!r}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
