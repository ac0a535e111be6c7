"""Teacher-forced fidelity: how far a policy's next-token distributions drift from full KV's.

For a window of ``length`` real tokens t_0..t_{L-1} (Paul Graham essays): prefill the prefix
t_0..t_{P-1} (P = L - n - 1) with the policy, then run n decode steps feeding the *true* tokens
t_P..t_{P+n-1} (jitted, cache donated), keeping each step's log-probabilities over the
vocabulary, which predict t_{P+1}..t_{P+n}. Full KV does the same on the same window; we report
KL(full || policy) per position (mean, median, p95, max), top-1 agreement and both NLLs. Every
compared position comes from a decode step, where a compressing policy attends to what it kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.decode_loop import RunOptions, run


def split(length: int, positions: int) -> int:
    """The prefix length P for a window of ``length`` tokens and ``positions`` compared steps."""
    prefix = length - positions - 1
    if prefix < 1:
        raise ValueError(f"a {length}-token window cannot hold {positions} compared positions after a prefix")
    return prefix


def prefix_of(tokens, positions: int) -> list[int]:
    """The prefilled part of a window."""
    return np.asarray(tokens, np.int32)[: split(len(tokens), positions)].tolist()


def _log_probs(logits, cache):
    return jax.nn.log_softmax(logits[0].astype(jnp.float32))


def teacher_forced(params, cfg, policy, tokens, positions: int, pad_id: int = 0, prefilled=None):
    """Log-probs (positions, V) float32 of ``policy`` on ``tokens`` (a window), targets, stats, timing.
    ``prefilled``: ``prefill_once`` of the window's prefix (``prefix_of``), shared by several policies."""
    tokens = np.asarray(tokens, np.int32)
    prefix = split(len(tokens), positions)
    r = run(params, [tokens[:prefix].tolist()], config=cfg, policy=policy, steps=positions,
            feed=tokens[prefix: prefix + positions, None], record=_log_probs, pad_id=pad_id,
            options=RunOptions(reserve_new_tokens=positions, prefilled=prefilled))
    targets = tokens[prefix + 1: prefix + positions + 1]
    return r.records[1:], targets, policy.stats(r.cache), r.timing  # records[0]: the prefill's
