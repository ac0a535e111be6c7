"""Shared machinery of the compressing baselines: budgets, scores, top-k selection, compact storage.

Budget accounting (every compressing policy): ``ratio`` is the device prompt-KV budget as a
fraction of full KV. A sequence with ``L`` real prompt tokens keeps ``n = floor(ratio * L)`` prompt
tokens per KV head (``prompt_budget``), computed exactly in int32: ``ratio`` is read as the nearest
fraction ``p/q`` with ``q <= 1024`` (exact for any decimal with 3 digits, e.g. 0.3 = 3/10), and
``n = (L * p) // q`` (so 0.29 * 100 gives 29, where float arithmetic gives 28). Storage is sized
statically for the padded prompt length ``T`` (``n_T = floor(ratio * T)`` rows per head), while
each sequence of a ragged batch keeps its own ``n`` (dynamic): compact per-head arrays, never a
mask over the full length.

Compact layout: per layer ``k, v`` of shape ``(B, Hkv, S, D)``; head ``h`` of sequence ``b`` holds
its kept prompt rows in position order in ``[0, n)`` then its generated rows. Decode attention goes
through ``pallas_kernels.gather_attention`` (segment layout, ``starts[h] = h * S``).
"""

from __future__ import annotations

import dataclasses
import fractions
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.attention import NEG_INF, group_queries, pooled_scores
from hetero_jax.cache.base import Cache, CachePolicy, round_up, scatter_token, segment_attention

ROW_ALIGN = 8  # per-head rows are rounded up to this (sublane multiple); keeps storage ~ budget
MAX_DENOMINATOR = 1024
INT32_MAX = 2**31 - 1
GROUP_REDUCE = ("max", "mean")


# ----------------------------------------------------------------------------------- budgets
def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:  # also rejects NaN
        raise ValueError(
            f"ratio must be in (0, 1] (the device prompt-KV budget as a fraction of full KV), got {ratio}"
        )
    if ratio_fraction(ratio).numerator == 0:
        raise ValueError(f"ratio {ratio} is below 1/{MAX_DENOMINATOR}, the smallest budget fraction supported")
    return ratio


def ratio_fraction(ratio: float) -> fractions.Fraction:
    return fractions.Fraction(ratio).limit_denominator(MAX_DENOMINATOR)


def prompt_budget(ratio: float, lengths, xp=jnp):
    """Prompt tokens kept per head: floor(ratio * L), exact integer arithmetic (see module doc)."""
    f = ratio_fraction(ratio)
    if xp is np:
        return (np.asarray(lengths, np.int64) * f.numerator) // f.denominator
    return (lengths.astype(jnp.int32) * f.numerator) // f.denominator


def check_length(ratio: float, t: int) -> None:
    if t * ratio_fraction(ratio).denominator > INT32_MAX:
        raise ValueError(f"prompt of {t} tokens is too long for int32 budget arithmetic at ratio {ratio}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_kernel(kernel) -> None:
    check_int("kernel", kernel, 1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel (pooling width) must be odd so the pooling is centred, got {kernel}")


# ------------------------------------------------------------------------------------ scores
def vote_scores(q_rows, q_pos, k, lengths, *, kernel: int, reduce: str, prefix_end=None):
    """``attention.pooled_scores`` of query rows q_rows (B, W, Hq, D) at positions ``q_pos`` (B, W)
    (negative: padding, votes nothing) over head-major prompt keys k (B, Hkv, T, D): causal, keys
    ``< lengths`` (B,), zeroed at keys ``>= prefix_end`` (B,) before pooling (like pooling a sliced
    prefix). Returns (B, Hkv, T) float32; costs W x T scores per query head, never T x T."""
    key = jnp.arange(k.shape[2])
    ok = (key[None, None, :] <= q_pos[:, :, None]) & (key[None, None, :] < lengths[:, None, None])  # (B,W,T)
    end = lengths if prefix_end is None else prefix_end
    return pooled_scores(group_queries(q_rows, k.shape[1]), k, ok[:, None, None], kernel=kernel, reduce=reduce,
                         keep=(key[None, :] < end[:, None])[:, None])


def attention_column_sums(q, k, lengths, chunk: int = 512):
    """Accumulated attention of every key: sum over real queries of their causal softmax rows.

    q (B, T, Hq, D), k (B, T, Hkv, D), lengths (B,). Returns (B, Hkv, G, T) float32. Two chunked
    passes (row log-sum-exps, then column sums), each ``chunk`` x ``chunk`` blocks at a time and
    skipping blocks above the diagonal: never a T x T matrix.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    chunk = math.gcd(t, chunk)
    n = t // chunk
    qg = group_queries(q, hkv).astype(jnp.float32) / math.sqrt(d)  # (B, Hkv, G, T, D)
    kt = k.transpose(0, 2, 1, 3).astype(jnp.float32)  # (B, Hkv, T, D)
    pos = jnp.arange(chunk)

    def block(qi, kj):  # causal scores of query chunk qi against key chunk kj: (B,Hkv,G,C,C)
        qc = jax.lax.dynamic_slice_in_dim(qg, qi * chunk, chunk, axis=3)
        kc = jax.lax.dynamic_slice_in_dim(kt, kj * chunk, chunk, axis=2)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qc, kc)
        return jnp.where((kj * chunk + pos)[None, :] <= (qi * chunk + pos)[:, None], s, NEG_INF)

    def row_lse(qi):
        def step(carry, kj):
            def upd(c):
                m, l = c
                s = block(qi, kj)
                m2 = jnp.maximum(m, s.max(-1))
                return m2, l * jnp.exp(m - m2) + jnp.exp(s - m2[..., None]).sum(-1)

            return jax.lax.cond(kj <= qi, upd, lambda c: c, carry), None

        shape = qg.shape[:3] + (chunk,)
        (m, l), _ = jax.lax.scan(step, (jnp.full(shape, NEG_INF), jnp.zeros(shape)), jnp.arange(n))
        return m + jnp.log(l)

    lse = jax.lax.map(row_lse, jnp.arange(n))  # (n, B, Hkv, G, C)
    real = (jnp.arange(t)[None, :] < lengths[:, None]).reshape(b, n, chunk)

    def col_sum(kj):
        def step(acc, qi):
            def upd(a):
                p = jnp.exp(block(qi, kj) - lse[qi][..., None])
                return a + jnp.where(real[:, qi][:, None, None, :, None], p, 0.0).sum(3)

            return jax.lax.cond(qi >= kj, upd, lambda a: a, acc), None

        acc, _ = jax.lax.scan(step, jnp.zeros(qg.shape[:3] + (chunk,)), jnp.arange(n))
        return acc

    cols = jax.lax.map(col_sum, jnp.arange(n))  # (n, B, Hkv, G, C)
    return cols.transpose(1, 2, 3, 0, 4).reshape(b, hkv, -1, t)


# --------------------------------------------------------------------------------- selection
def keep_indices(scores, n_keep, cap: int):
    """Top ``n_keep`` keys per (batch, head), returned in position order.

    scores (B, H, T) float32 with +inf for keys that must be kept and -inf for keys that must not;
    n_keep (B, H) int32 (at most the number of keys scored above -inf); ``cap`` (static) >= every
    n_keep. Returns idx (B, H, cap) int32: ascending positions in [0, n_keep), 0 after.
    """
    t = scores.shape[-1]
    _, top = jax.lax.top_k(scores, cap)
    valid = jnp.arange(cap) < n_keep[..., None]
    idx = jnp.sort(jnp.where(valid, top, t), axis=-1)
    return jnp.where(valid, idx, 0).astype(jnp.int32)


def take_rows(x, idx):
    """x (B, H, T, D) head-major, idx (B, H, K) -> (B, H, K, D)."""
    return jnp.take_along_axis(x, idx[..., None], axis=2)


def head_major(x):
    """(B, T, H, D) -> (B, H, T, D)."""
    return x.transpose(0, 2, 1, 3)


def pad_rows(x, rows: int):
    """Pad axis 2 of (B, H, S, D) with zeros up to ``rows``."""
    return jnp.pad(x, [(0, 0), (0, 0), (0, rows - x.shape[2]), (0, 0)])


# ---------------------------------------------------------------------------------- policies
@dataclasses.dataclass(frozen=True)
class CompressingPolicy(CachePolicy):
    """Base of the compressing baselines: ``ratio`` validation, option checking, budgets."""

    name: ClassVar[str] = "compressing"
    from_config: ClassVar[tuple] = ()  # fields taken from the model config (LlamaConfig), not options
    ratio: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "ratio", check_ratio(self.ratio))

    @classmethod
    def create(cls, cfg, ratio: float | None = None, **options) -> "CachePolicy":
        names = {f.name for f in dataclasses.fields(cls)} - set(cls.from_config)
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for cache policy {cls.name!r}; "
                f"valid: ratio, {', '.join(sorted(names - {'ratio'}))}"
            )
        return cls(ratio=0.5 if ratio is None else ratio, **options, **{f: getattr(cfg, f) for f in cls.from_config})

    def budget(self, lengths):
        """Per-sequence prompt budget (traced int32)."""
        return prompt_budget(self.ratio, lengths)

    def static_budget(self, t: int) -> int:
        """Budget of a prompt of ``t`` tokens (host int): the storage capacity for padded length t."""
        return int(prompt_budget(self.ratio, t, np))

    def stats(self, cache: Cache) -> dict:
        return {**super().stats(cache), "ratio": self.ratio}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CompactLayer:
    k: jax.Array  # (B, Hkv, S, D): kept prompt rows in position order, then generated rows
    v: jax.Array
    kept: jax.Array  # (B, Hkv) int32: prompt rows held per sequence and head


@dataclasses.dataclass(frozen=True)
class PromptSelectionPolicy(CompressingPolicy):
    """Select prompt tokens once at prefill, keep every generated token (streaming, SnapKV, PyramidKV).

    Subclasses implement ``keep_scores``; ``select`` turns them into the kept positions.
    """

    def keep_scores(self, layer: int, q, k, lengths):
        """-> (scores (B, Hkv, T) with +inf forced / -inf excluded, n_keep (B,) int32, static cap)."""
        raise NotImplementedError

    def select(self, layer: int, q, k, lengths):
        """Kept prompt positions: idx (B, Hkv, cap) ascending, n_keep (B, Hkv)."""
        check_length(self.ratio, k.shape[1])
        scores, n_keep, cap = self.keep_scores(layer, q, k, lengths)
        n_keep = jnp.broadcast_to(n_keep.reshape(n_keep.shape[0], -1), scores.shape[:2]).astype(jnp.int32)
        return keep_indices(scores, n_keep, cap), n_keep

    def build_layer(self, layer, q, k, v, lengths, max_new_tokens):
        idx, n_keep = self.select(layer, q, k, lengths)
        rows = round_up(idx.shape[-1] + max_new_tokens, ROW_ALIGN)
        state = CompactLayer(
            pad_rows(take_rows(head_major(k), idx), rows), pad_rows(take_rows(head_major(v), idx), rows), n_keep
        )
        return state

    def decode_layer(self, layer, state: CompactLayer, q, k, v, cache: Cache):
        slot = state.kept + cache.step  # (B, Hkv): this token's row
        kbuf = scatter_token(state.k, slot, k)
        vbuf = scatter_token(state.v, slot, v)
        out = segment_attention(q, kbuf, vbuf, slot + 1)
        return out, CompactLayer(kbuf, vbuf, state.kept)


def window_votes(q, k, lengths, window: int, kernel: int, reduce: str, keep_window):
    """SnapKV scoring: the last ``window`` prompt queries vote over the keys before the kept window.

    q (B, T, Hq, D), k (B, T, Hkv, D); keep_window (B,) tokens at the end always kept (the window,
    clipped to the budget). Returns pooled scores (B, Hkv, T) for keys ``< L - keep_window``.
    """
    w_pos = lengths[:, None] - window + jnp.arange(window)[None, :]  # (B, W), negative = no query
    rows = jnp.take_along_axis(q, jnp.clip(w_pos, 0, q.shape[1] - 1)[:, :, None, None], axis=1)
    return vote_scores(rows, w_pos, head_major(k), lengths, kernel=kernel, reduce=reduce,
                       prefix_end=lengths - keep_window)


def forced_scores(scores, lengths, keep_from):
    """Mark keys in [keep_from, L) as forced (+inf) and keys at or past L as excluded (-inf)."""
    key = jnp.arange(scores.shape[-1])[None, None, :]
    scores = jnp.where(key >= keep_from[:, None, None], jnp.inf, scores)
    return jnp.where(key < lengths[:, None, None], scores, -jnp.inf)
