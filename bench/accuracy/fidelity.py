"""Teacher-forced fidelity: how far a policy's next-token distributions drift from full KV's.

For a window of ``length`` real tokens t_0..t_{L-1} (Paul Graham essays): prefill the prefix
t_0..t_{P-1} (P = L - n - 1) with the policy, then run n decode steps feeding the *true* tokens
t_P..t_{P+n-1} (jitted, cache donated), keeping each step's log-probabilities over the
vocabulary, which predict t_{P+1}..t_{P+n}. Full KV does the same on the same window; we report
KL(full || policy) per position (mean, median, p95, max), top-1 agreement and both NLLs. Every
compared position comes from a decode step, where a compressing policy attends to what it kept.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax import model
from hetero_jax.generate import compiled, pad_prompts


@functools.lru_cache(maxsize=16)
def _prefill(cfg, policy, n: int):
    return jax.jit(functools.partial(model.prefill, cfg=cfg, policy=policy, max_new_tokens=n))


@functools.lru_cache(maxsize=16)
def _step(cfg, policy):
    def step(params, cache, tok):
        logits, cache = model.decode_step(params, cache, tok, cfg=cfg, policy=policy)
        return jax.nn.log_softmax(logits[0].astype(jnp.float32)), cache

    return jax.jit(step, donate_argnums=(1,))


def split(length: int, positions: int) -> int:
    """The prefix length P for a window of ``length`` tokens and ``positions`` compared steps."""
    prefix = length - positions - 1
    if prefix < 1:
        raise ValueError(f"a {length}-token window cannot hold {positions} compared positions after a prefix")
    return prefix


def teacher_forced(params, cfg, policy, tokens, positions: int, pad_id: int = 0):
    """Log-probs (positions, V) float32 of ``policy`` on ``tokens`` (a window), targets, stats, timing."""
    tokens = np.asarray(tokens, np.int32)
    prefix = split(len(tokens), positions)
    padded, lengths = pad_prompts([tokens[:prefix].tolist()], pad_id)
    timing = {}
    args = (params, jnp.asarray(padded), jnp.asarray(lengths))
    t0 = time.perf_counter()
    prefill = compiled(_prefill(cfg, policy, positions), *args)  # compile timed apart from the run
    timing["prefill_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, kv = prefill(*args)
    kv = policy.after_prefill(kv)
    jax.block_until_ready(kv)
    timing["prefill_s"] = time.perf_counter() - t0
    host, kv_dev = kv.host, dataclasses.replace(kv, host=None)
    feed = jnp.asarray(tokens[prefix : prefix + positions]).reshape(positions, 1)
    t0 = time.perf_counter()
    step = compiled(_step(cfg, policy), params, kv_dev, feed[0])
    timing["decode_compile_s"] = time.perf_counter() - t0
    out = []
    t0 = time.perf_counter()
    for j in range(positions):
        kv = policy.before_step(dataclasses.replace(kv_dev, host=host))
        host, kv_dev = kv.host, dataclasses.replace(kv, host=None)
        logp, kv_dev = step(params, kv_dev, feed[j])
        out.append(logp)
    logp = np.asarray(jnp.stack(out))
    timing["decode_s"] = time.perf_counter() - t0
    timing["steps"] = positions
    timing["decode_ms_per_token"] = 1000 * timing["decode_s"] / positions
    kv = dataclasses.replace(kv_dev, host=host)
    targets = tokens[prefix + 1 : prefix + positions + 1]
    return logp, targets, policy.stats(kv), timing
