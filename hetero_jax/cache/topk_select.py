"""Exact top-k membership in a few passes: a 3-digit histogram select instead of a sort.

The drift check needs, per query and pivot, which prompt positions are in the top K of the
scores (``lax.top_k``'s set: ties go to the lowest positions), not their order. A score's float32
bits map to a uint32 key in the same total order (``sortable_key``). The K-th largest key is
found digit by digit, most significant first (11 + 11 + 10 bits): one histogram of the digit
among the keys that share the prefix chosen so far, a suffix sum, and the digit where the count
of keys at or above it first reaches the remaining rank. Three histogram passes over T replace
the 32 compare-and-count passes of a bitwise radix select. The tied positions at the K-th key
are then taken lowest first with one cumulative count (instead of log2 T more passes), and only
when some row has more entries at the K-th key than it takes (rare for float scores).

The result is a *cut*: (key, last), the K-th largest key and the last tied position taken. A
position i is in the top K iff key[i] > key or (key[i] == key and i <= last). So the overlap of a
reference index set with the current top K reads only the reference's K scores (``cut_overlap``);
no mask or sorted index list of the current set is built unless a refresh needs it (``cut_mask``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DIGIT_BITS = (11, 11, 10)  # most significant first; sums to 32


def sortable_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same total order as ``lax.top_k`` (-0.0 just below +0.0; no NaNs)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def kth_largest_key(u: jax.Array, k: jax.Array) -> jax.Array:
    """u (..., T) uint32, k (...) int in [1, T] -> (...) uint32: the k-th largest of u."""
    lead, t = u.shape[:-1], u.shape[-1]
    n = math.prod(lead)
    u2 = u.reshape(n, t)
    rem = jnp.broadcast_to(jnp.asarray(k, jnp.int32), lead).reshape(n)  # rank still to find among the matches
    row_base = jnp.arange(n, dtype=jnp.int32)[:, None]
    prefix = jnp.zeros((n,), jnp.uint32)
    shift = 32
    for bits in DIGIT_BITS:
        high = jnp.uint32(0) if shift == 32 else ~jnp.uint32((1 << shift) - 1)  # bits already chosen
        shift -= bits
        match = (u2 & high) == (prefix & high)[:, None]
        digit = ((u2 >> jnp.uint32(shift)) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)
        bin_ = jnp.where(match, row_base * (1 << bits) + digit, n << bits)  # one flat histogram, a spill bin
        hist = jnp.zeros(((n << bits) + 1,), jnp.int32).at[bin_.reshape(-1)].add(1, mode="promise_in_bounds")
        hist = hist[: n << bits].reshape(n, 1 << bits)
        at_or_above = jnp.cumsum(hist[:, ::-1], axis=-1)[:, ::-1]  # (n, bins) non-increasing
        chosen = (at_or_above >= rem[:, None]).sum(-1) - 1  # the largest digit whose count reaches rem
        above = jnp.take_along_axis(jnp.pad(at_or_above, ((0, 0), (0, 1))), chosen[:, None] + 1, -1)[:, 0]
        rem = rem - above
        prefix = prefix | (chosen.astype(jnp.uint32) << jnp.uint32(shift))
    return prefix.reshape(lead)


def topk_cut(s: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s (..., T) float, k (...) int in [0, T] -> the cut (key (...) uint32, last (...) int32) of
    ``lax.top_k(s, k)``'s set (for k = 0 a cut nothing passes)."""
    t = s.shape[-1]
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), s.shape[:-1])
    u = sortable_key(s)
    v = kth_largest_key(u, jnp.maximum(k, 1))
    need = k - (u > v[..., None]).sum(-1)  # >= 1 tied entries to take, lowest positions first
    ties = (u == v[..., None]).sum(-1)

    def some_ties(_):  # the position where the need-th tie sits
        tied = jnp.cumsum(u == v[..., None], axis=-1, dtype=jnp.int32)
        return (tied < need[..., None]).sum(-1)

    # the usual case, every entry at the K-th key is taken: no cumulative count over T
    last = jax.lax.cond((ties > need).any(), some_ties, lambda _: jnp.full(k.shape, t - 1, jnp.int32), None)
    none = k <= 0
    return jnp.where(none, jnp.uint32(0xFFFFFFFF), v), jnp.where(none, -1, jnp.minimum(last, t - 1)).astype(jnp.int32)


def in_cut(s: jax.Array, pos: jax.Array, cut) -> jax.Array:
    """Scores ``s`` at positions ``pos`` (same leading dims) -> bool: inside the cut."""
    key, last = cut
    u = sortable_key(s)
    return (u > key[..., None]) | ((u == key[..., None]) & (pos <= last[..., None]))


def cut_mask(s: jax.Array, cut) -> jax.Array:
    """The cut's membership mask over all of s (..., T)."""
    return in_cut(s, jnp.arange(s.shape[-1], dtype=jnp.int32), cut)


def topk_mask(s: jax.Array, k: jax.Array) -> jax.Array:
    """s (..., T) float, k (...) int in [0, T] -> bool (..., T): exactly the set ``lax.top_k(s, k)``
    picks (ties to the lowest positions; none for k = 0)."""
    return cut_mask(s, topk_cut(s, k))


def topk_positions(s: jax.Array, k: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """s (..., T), k (...) int in [0, width] -> (positions (..., width) int32, mask (..., width)):
    the positions of ``lax.top_k(s, k)``'s set in increasing order, 0 past k, and
    ``arange(width) < k``; the same as sorting the first k indices of ``lax.top_k(s, width)``
    (``hetero_drift.in_position_order``), without the top_k's sort: a refresh's selection."""
    t = s.shape[-1]
    member = topk_mask(s, k)
    slot = jnp.where(member, jnp.cumsum(member, axis=-1, dtype=jnp.int32) - 1, width)  # rank by position
    lead = s.shape[:-1]
    rows = math.prod(lead)
    flat = jnp.zeros((rows, width), jnp.int32).at[jnp.arange(rows)[:, None], slot.reshape(rows, t)].set(
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t)), mode="drop")
    return flat.reshape(lead + (width,)), jnp.arange(width) < jnp.asarray(k)[..., None]


def cut_overlap(s: jax.Array, cut, ref: jax.Array, kb: jax.Array) -> jax.Array:
    """|ref ∩ top| / max(kb, 1) where top is the cut of s (B, ..., T): ref (B, ..., Kmax) int
    (valid members >= 0, negative sentinels), kb (B,) -> (B, ...) float32. Reads only s[ref]."""
    ref = jnp.broadcast_to(ref, s.shape[:-1] + ref.shape[-1:])
    at = jnp.maximum(ref, 0)
    hit = in_cut(jnp.take_along_axis(s, at, axis=-1), at, cut) & (ref >= 0)
    kb = kb.reshape(kb.shape + (1,) * (hit.ndim - 2))
    return hit.sum(-1).astype(jnp.float32) / jnp.maximum(kb, 1).astype(jnp.float32)
