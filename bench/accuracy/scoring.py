"""Scores: RULER's string matches (to the letter), ROUGE-1 F, and the teacher-forced fidelity stats.

RULER (``long_context_eval/eval/synthetic/constants.py`` and ``eval/evaluate.py``) scores a
prediction after ``postprocess_pred``: strip, turn every control character into a newline,
strip again. Then, per sample, with a case-insensitive substring test of each reference:

* ``string_match_all`` (niah, vt, cwe, fwe): the fraction of references found, x 100;
* ``string_match_part`` (qa): 100 if any reference is found, else 0.

A task's score is the mean over samples, rounded to 2 decimals. The functions here are the same
formulas; ``tests/test_accuracy.py`` checks them against RULER's own on random cases.
"""

from __future__ import annotations

import collections
import re

import numpy as np

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(predict_str: str | None) -> str:
    """RULER's ``postprocess_pred``."""
    if predict_str is None:
        return ""
    return _CONTROL.sub("\n", predict_str.strip()).strip()


def string_match_all(pred: str, refs: list[str]) -> float:
    """Per-sample ``string_match_all``: percent of ``refs`` found in ``pred`` (case-insensitive)."""
    if not refs:
        raise ValueError("string_match_all needs at least one reference")
    p = pred.lower()
    return sum(1.0 if r.lower() in p else 0.0 for r in refs) / len(refs) * 100


def string_match_part(pred: str, refs: list[str]) -> float:
    """Per-sample ``string_match_part``: 100 if any of ``refs`` is in ``pred`` (case-insensitive)."""
    if not refs:
        raise ValueError("string_match_part needs at least one reference")
    p = pred.lower()
    return max(1.0 if r.lower() in p else 0.0 for r in refs) * 100


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def task_score(per_sample: list[float]) -> float:
    """A task's score from its per-sample scores, as RULER reports it (mean, 2 decimals)."""
    return round(sum(per_sample) / len(per_sample), 2) if per_sample else float("nan")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, non-alphanumerics to spaces, split (no stemming)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge1_f(pred: str, ref: str) -> float:
    """ROUGE-1 F1 (unigram overlap) of ``pred`` against ``ref``, in [0, 1]."""
    p, r = collections.Counter(rouge_tokens(pred)), collections.Counter(rouge_tokens(ref))
    overlap = sum((p & r).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def fidelity_stats(ref_logp: np.ndarray, logp: np.ndarray, targets: np.ndarray) -> dict:
    """Teacher-forced comparison of a policy's next-token distributions with full KV's.

    ``ref_logp``, ``logp``: (N, V) log-probabilities at the same N positions (full KV, policy);
    ``targets``: (N,) the true next tokens. Returns per-position KL(full || policy) summaries (nats),
    top-1 agreement (fraction of positions where both argmaxes agree) and both NLLs of the text.
    """
    ref_logp = np.asarray(ref_logp, np.float64)
    logp = np.asarray(logp, np.float64)
    if ref_logp.shape != logp.shape or ref_logp.ndim != 2 or len(targets) != len(ref_logp):
        raise ValueError(f"shape mismatch: {ref_logp.shape} vs {logp.shape}, {len(targets)} targets")
    kl = np.sum(np.exp(ref_logp) * (ref_logp - logp), -1)
    kl = np.maximum(kl, 0.0)  # rounding can make a zero KL a tiny negative
    rows = np.arange(len(targets))
    nll_ref = -ref_logp[rows, targets]
    nll = -logp[rows, targets]
    return {
        "positions": int(len(targets)),
        "kl_mean": float(kl.mean()),
        "kl_median": float(np.median(kl)),
        "kl_p95": float(np.percentile(kl, 95)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(np.mean(ref_logp.argmax(-1) == logp.argmax(-1))),
        "nll_full": float(nll_ref.mean()),
        "nll": float(nll.mean()),
        "ppl_full": float(np.exp(nll_ref.mean())),
        "ppl": float(np.exp(nll.mean())),
    }
