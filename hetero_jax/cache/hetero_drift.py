"""Drift-check arithmetic of the hetero policy, pure functions of arrays: exact top-k membership
without a sort, the overlap with a reference set, position-ordered index lists, and the adaptive
threshold controller. The policy's device check (``hetero_monitor``) and host refresh
(``hetero_refresh``) call these; tests check them alone against numpy.

Top-k membership. The overlap |top-K(s) ∩ ref| / K needs no top-k index list: a reference member
r is in the top K exactly when s[r] is above the K-th largest score, or equal to it and among the
first ``need`` tied positions (``lax.top_k``'s order: ties go to the lowest index). The K-th
largest value is found by a radix select on the float's order-preserving uint32 key (32 passes
of compare + count over T, most significant bit first: the largest key x with #{key >= x} >= K),
the tied positions by a second radix select on the position (ceil(log2 T) passes). Both are
exact: the result equals the set ``lax.top_k`` returns, ties included, at ~45 vectorised passes
over T instead of a sort.

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


def sortable_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same total order as ``lax.top_k`` (-0.0 just below +0.0; no NaNs)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def kth_largest_key(u: jax.Array, k: jax.Array) -> jax.Array:
    """u (..., T) uint32, k (...) int -> (...) uint32: the k-th largest of u (k >= 1)."""

    def bit(i, pre):
        cand = pre | jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        return jnp.where((u >= cand[..., None]).sum(-1) >= k, cand, pre)

    return jax.lax.fori_loop(0, 32, bit, jnp.zeros(u.shape[:-1], jnp.uint32))


def topk_mask(s: jax.Array, k: jax.Array) -> jax.Array:
    """s (..., T) float, k (...) int in [0, T] -> bool (..., T): the k largest entries, ties to the
    lowest positions, i.e. exactly the set ``lax.top_k(s, k)`` picks (for k = 0: none)."""
    t = s.shape[-1]
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), s.shape[:-1])
    u = sortable_key(s)
    v = kth_largest_key(u, jnp.maximum(k, 1))[..., None]
    gt, eq = u > v, u == v
    need = (k - gt.sum(-1))[..., None]  # >= 1 tied entries to take, lowest positions first
    pos = jnp.arange(t, dtype=jnp.int32)
    nb = max(1, (t - 1).bit_length())

    def bit(i, pre):  # the largest x with #{tied positions < x} < need: the need-th tied position
        cand = pre | jnp.left_shift(jnp.int32(1), (nb - 1 - i).astype(jnp.int32))
        return jnp.where((eq & (pos < cand)).sum(-1, keepdims=True) < need, cand, pre)

    last = jax.lax.fori_loop(0, nb, bit, jnp.zeros(need.shape, jnp.int32))
    return (gt | (eq & (pos <= last))) & (k[..., None] > 0)


def ref_overlap(mask: jax.Array, ref: jax.Array, kb: jax.Array) -> jax.Array:
    """|ref ∩ top| / max(kb, 1): mask (B, ..., T) bool (the current top-kb), ref (B, ..., Kmax) int
    (valid members >= 0, negative sentinels), kb (B,) -> (B, ...) float32."""
    ref = jnp.broadcast_to(ref, mask.shape[:-1] + ref.shape[-1:])
    hit = jnp.take_along_axis(mask, jnp.maximum(ref, 0), axis=-1) & (ref >= 0)
    kb = kb.reshape(kb.shape + (1,) * (hit.ndim - 2))
    return hit.sum(-1).astype(jnp.float32) / jnp.maximum(kb, 1).astype(jnp.float32)


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
