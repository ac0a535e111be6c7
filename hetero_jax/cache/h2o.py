"""H2O (heavy-hitter oracle): keep the tokens with the largest accumulated attention + a recent window.

Budget: per sequence and KV head a fixed ``n = floor(ratio * L)`` rows, for the whole generation:
unlike the other baselines H2O does not add generated tokens on top; it evicts one token per
decode step once the new one is in, so device KV stays at ``n`` rows (+1 spare) per head.

* Prefill: each key's score is its accumulated attention, the sum over all real prompt queries of
  their causal softmax probabilities (``selection.attention_column_sums``: chunked, never T x T),
  averaged over the GQA group. The ``r = clip(floor(recent_ratio * n), 1, n)`` most recent tokens
  are kept, plus the top ``n - r`` others.
* Decode: the new token goes into the spare row; the step attends over the ``n + 1`` rows; each
  row's score grows by this step's probability (group mean; the kernel returns outputs only, so the
  probabilities are a second, score-only pass over the rows); then the lowest-scoring row outside
  the recent window (positions > current - r) is evicted (ties: lowest row).

Options: ``ratio`` (0.5), ``recent_ratio`` (0.5: the H2O paper's equal heavy / recent split),
``prefill_chunk`` (512: block size of the prefill's accumulated-attention pass).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from hetero_jax.attention import pooled_scores
from hetero_jax.cache.base import Cache, scatter_token
from hetero_jax.cache.selection import (
    CompressingPolicy,
    attention_column_sums,
    check_int,
    check_length,
    forced_scores,
    head_major,
    keep_indices,
    pad_rows,
    segment_attention,
    take_rows,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class H2OLayer:
    k: jax.Array  # (B, Hkv, S, D): rows [0, n) kept tokens (any order after evictions), row n spare
    v: jax.Array
    score: jax.Array  # (B, Hkv, S) float32 accumulated attention of each row
    pos: jax.Array  # (B, Hkv, S) int32 token position of each row


def _set_rows(buf, index, value):
    """buf (B, H, S), index (B, H), value (B, H) -> buf with buf[b, h, index[b, h]] = value[b, h]."""
    b, h = buf.shape[:2]
    return buf.at[jnp.arange(b)[:, None], jnp.arange(h)[None, :], index].set(value.astype(buf.dtype))


@dataclasses.dataclass(frozen=True)
class H2O(CompressingPolicy):
    name: ClassVar[str] = "h2o"
    recent_ratio: float = 0.5
    prefill_chunk: int = 512  # query/key block of the accumulated-attention pass at prefill

    def __post_init__(self):
        super().__post_init__()
        check_int("prefill_chunk", self.prefill_chunk, 1)
        r = self.recent_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"recent_ratio (the recent window's share of the budget) must be in [0, 1], got {r!r}")

    def split(self, lengths):
        """-> (budget n, recent window r) per sequence."""
        n = self.budget(lengths)
        recent = jnp.floor(self.recent_ratio * n.astype(jnp.float32)).astype(jnp.int32)
        return n, jnp.clip(recent, jnp.minimum(n, 1), n)

    def select(self, q, k, lengths):
        """Prefill selection -> (idx (B, Hkv, cap) ascending, n (B,), accumulated scores (B, Hkv, T))."""
        check_length(self.ratio, k.shape[1])
        n, recent = self.split(lengths)
        acc = attention_column_sums(q, k, lengths, self.prefill_chunk).mean(2)
        scores = forced_scores(acc, lengths, lengths - recent)
        idx = keep_indices(scores, jnp.broadcast_to(n[:, None], scores.shape[:2]), self.static_budget(k.shape[1]))
        return idx, n, acc

    def build_layer(self, layer, q, k, v, lengths, max_new_tokens):
        idx, n, acc = self.select(q, k, lengths)
        rows = idx.shape[-1] + 1  # the budget + one spare row for the incoming token (no rounding)
        valid = jnp.arange(idx.shape[-1])[None, None, :] < n[:, None, None]
        state = H2OLayer(
            pad_rows(take_rows(head_major(k), idx), rows),
            pad_rows(take_rows(head_major(v), idx), rows),
            jnp.pad(jnp.where(valid, jnp.take_along_axis(acc, idx, axis=2), 0.0), [(0, 0), (0, 0), (0, rows - idx.shape[-1])]),
            jnp.pad(jnp.where(valid, idx, -1), [(0, 0), (0, 0), (0, rows - idx.shape[-1])], constant_values=-1),
        )
        return state

    def decode_layer(self, layer, state: H2OLayer, q, k, v, cache: Cache):
        b, hkv, s, _ = state.k.shape
        cur = cache.lengths  # (B,) this token's position
        n, recent = self.split(cache.lengths - cache.step)
        spare = jnp.broadcast_to(n[:, None], (b, hkv))
        kbuf = scatter_token(state.k, spare, k)
        vbuf = scatter_token(state.v, spare, v)
        pos = _set_rows(state.pos, spare, jnp.broadcast_to(cur[:, None], (b, hkv)))
        live = spare + 1
        out = segment_attention(q, kbuf, vbuf, live)
        valid = jnp.arange(s)[None, None, None, None, :] < live[:, :, None, None, None]
        probs = pooled_scores(q.reshape(b, hkv, -1, 1, q.shape[-1]), kbuf, valid, kernel=1, reduce="mean")
        score = _set_rows(state.score, spare, jnp.zeros((b, hkv))) + probs
        # evict: the lowest score among live rows outside the recent window (the new token is inside)
        rows = jnp.arange(s)[None, None, :]
        evictable = (rows < live[..., None]) & (pos <= (cur - recent)[:, None, None])
        victim = jnp.argmin(jnp.where(evictable, score, jnp.inf), axis=-1).astype(jnp.int32)
        victim = jnp.where(evictable.any(-1), victim, spare)
        new_score = jnp.take_along_axis(score, spare[..., None], axis=2)[..., 0]
        state = H2OLayer(
            scatter_token(kbuf, victim, k),
            scatter_token(vbuf, victim, v),
            _set_rows(score, victim, new_score),
            _set_rows(pos, victim, jnp.broadcast_to(cur[:, None], (b, hkv))),
        )
        return out, state
