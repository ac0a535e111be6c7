"""Drift-check arithmetic of the hetero policy, pure functions of arrays: position-ordered index
lists and the adaptive threshold controller. The policy's device check (``hetero_monitor``) and host refresh
(``hetero_refresh``) call these; tests check them alone against numpy.

Top-k membership (which positions are in the top K, ties to the lowest position as
``lax.top_k``) lives in ``topk_select``: a three-pass histogram select, exact.

Adaptive threshold ("rate"). The paper's fixed threshold (0.5) sets no bound on transfers and
means different things for different models and contexts. The rate controller instead takes a
target fraction of refreshing pivot checks and adjusts one threshold, shared by the pivots checked
together, after every check (an integral controller):

    thr <- clip(thr + gain * (target - fired), 0, 1),   fired = fraction of those pivots refreshing

Refreshes go to the pivots whose overlap is lowest at the time. Summing the update over n checks
gives |mean(fired) - target| = |thr_n - thr_0| / (gain * n) <= 1 / (gain * n) while thr stays
inside [0, 1]: the long-run refresh rate reaches the target (unless overlaps sit at exactly 1 or
the target asks for more than every check). Deterministic: a pure function of the overlaps.
The gain trades the start-up transient (thr starts at ``threshold`` and moves at most gain x
target per check) against jitter (gain x the spread of the fired fraction); the default 0.2 with
30 pivots (SmolLM2) settles within ~5 checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rate_update(thr: jax.Array, fired: jax.Array, target: float, gain: float) -> jax.Array:
    """One controller step: thr (scalar), fired (n,) bool of the pivots just checked."""
    f = jnp.mean(fired.astype(jnp.float32))
    return jnp.clip(thr + gain * (target - f), 0.0, 1.0).astype(jnp.float32)


def compact_positions(mask: jax.Array, size: int, fill: jax.Array | int = 0) -> jax.Array:
    """mask (..., T) bool -> (..., size) int32: the positions of its first ``size`` set entries in
    increasing order, ``fill`` (broadcast to (..., size)) after them."""
    lead, t = mask.shape[:-1], mask.shape[-1]
    m = mask.reshape(-1, t)
    rank = jnp.cumsum(m, -1, dtype=jnp.int32) - 1
    tgt = jnp.where(m & (rank < size), rank, size)  # the rest lands in a dropped column
    out = jnp.zeros((m.shape[0], size + 1), jnp.int32)
    out = out.at[jnp.arange(m.shape[0])[:, None], tgt].set(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), m.shape))
    n = jnp.minimum(m.sum(-1, keepdims=True), size)
    out = jnp.where(jnp.arange(size) < n, out[:, :size], -1).reshape(lead + (size,))
    return jnp.where(out < 0, jnp.broadcast_to(jnp.asarray(fill, jnp.int32), out.shape), out)


def in_position_order(idx, keep):
    """Top-k indices ``idx`` (..., k), best first -> the best ``keep[...]`` of them in position
    order, 0 past ``keep``, and that mask (the authors' masked sort)."""
    m = jnp.arange(idx.shape[-1]) < keep[..., None]
    pos = jnp.sort(jnp.where(m, idx, jnp.iinfo(jnp.int32).max), axis=-1)
    return jnp.where(m, pos, 0), m
