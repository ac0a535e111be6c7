"""DuoAttention / RazorAttention-style static baseline: retrieval heads keep the whole prompt, the
other heads only attention sinks and a recent window. No scores at run time, no refresh.

Which heads are retrieval heads (``heads``):

* ``"roles"`` (default): HeteroCache's full heads of the model's profile (pivots and volatile
  heads). Neither DuoAttention's trained gates nor RazorAttention's echo/induction score exist
  for our models; the profile's roles are the head-level signal we have measured, and using them
  makes ``duo`` differ from ``hetero`` only in what the other heads keep.
* ``"unstable"``: the same number of heads, the least temporally stable ones (lowest
  ``stability`` in the profile: their attention moves most during decode, so a fixed window
  serves them worst), whatever their roles.

Budgets use the same device-bytes accounting as every policy: with F full heads of N, each other
head keeps ``n = int((r*N - F) * L / (N - F))`` prompt tokens (HeteroCache's base budget, so the
prompt KV on device is ~ r x full): ``min(n_sink, n)`` first tokens then the ``n - sinks`` most
recent, in position order. Every generated token is kept. Needs ``r > F/N``; r = 1 is full KV.

Storage: one ragged pool per layer like HeteroCache's (head h owns rows
``[starts[h], starts[h] + caps[h] + max_new)``), so the memory really shrinks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.cache.base import Cache, CachePolicy
from hetero_jax.cache.selection import check_choice, check_int, check_ratio, head_major
from hetero_jax.profile_io import as_profile
from pallas_kernels import gather_attention

HEADS = ("roles", "unstable")


def compressed_budget(ratio: float, n_heads: int, n_full: int, length: int) -> int:
    """Prompt tokens of each non-retrieval head: int((r*N - F) * L / (N - F)); L at r = 1."""
    if ratio >= 1.0 or n_heads == n_full:
        return int(length)
    return int((ratio * n_heads - n_full) * length / (n_heads - n_full))


def sink_recent_positions(n, lengths, n_sink: int, cap: int):
    """Positions kept by a sink + recent head: n (B,) kept, lengths (B,) real prompt tokens ->
    (idx (B, cap) ascending, 0 past n). The first min(n_sink, n), then the last n - sinks."""
    j = jnp.arange(cap)[None, :]
    sinks = jnp.minimum(n, n_sink)[:, None]
    idx = jnp.where(j < sinks, j, lengths[:, None] - n[:, None] + j)
    return jnp.where(j < n[:, None], idx, 0).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DuoLayer:
    k: jax.Array  # (B, R, D) ragged pool: per head its kept prompt rows, then generated rows
    v: jax.Array
    keep: jax.Array  # (B, Hkv) int32 prompt rows kept per head
    T: int = dataclasses.field(default=0, metadata=dict(static=True))
    max_new: int = dataclasses.field(default=0, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class DuoAttention(CachePolicy):
    name: ClassVar[str] = "duo"
    needs_profile: ClassVar[bool] = True
    full: tuple = ()  # (layers, Hkv) bool: retrieval heads
    ratio: float = 0.5
    n_sink: int = 4
    heads: str = "roles"
    profile_name: str = ""

    @classmethod
    def create(cls, cfg, ratio=None, profile=None, params=None, heads: str = "roles", **options) -> "DuoAttention":
        check_choice("heads", heads, HEADS)
        unknown = set(options) - {"n_sink"}
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} for cache policy 'duo'; "
                             "valid: ratio, profile, heads, n_sink")
        prof = as_profile(profile, cfg)
        if params is not None:
            prof.check_model(cfg, params)
        full = np.array([[prof.is_full(l, h) for h in range(len(r))] for l, r in enumerate(prof.roles)])
        if heads == "unstable":
            order = np.argsort(np.asarray(prof.stability, np.float64).ravel(), kind="stable")
            full = np.zeros(full.size, bool)
            full[order[: prof.num_full]] = True
            full = full.reshape(len(prof.roles), -1)
        return cls(full=tuple(map(tuple, full.tolist())), ratio=0.5 if ratio is None else ratio, heads=heads,
                   profile_name=str(prof.model.get("name", "")), **options)

    def __post_init__(self):
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        check_int("n_sink", self.n_sink, 0)
        if self.full:
            n, f = self.num_heads, self.num_full
            if not (self.ratio == 1.0 or f / n < self.ratio):
                raise ValueError(f"ratio must be in (F/N, 1] = ({f}/{n}, 1] for duo ({f} retrieval heads keep the "
                                 f"whole prompt); got {self.ratio}. Below F/N they alone exceed the budget.")

    @property
    def num_heads(self) -> int:
        return sum(len(r) for r in self.full)

    @property
    def num_full(self) -> int:
        return sum(map(sum, self.full))

    def is_full(self, layer: int, head: int) -> bool:
        return self.ratio >= 1.0 or self.full[layer][head]

    @functools.lru_cache(maxsize=8)
    def budget_table(self, t: int) -> np.ndarray:
        """(t+1,) int32: a non-retrieval head's kept prompt tokens for each real length."""
        return np.array([compressed_budget(self.ratio, self.num_heads, self.num_full, n) for n in range(t + 1)],
                        np.int32)

    @functools.lru_cache(maxsize=64)
    def layout(self, layer: int, t: int, max_new: int) -> tuple:
        """(caps, segs, starts) of the layer's pool for prompts padded to t tokens."""
        caps = tuple(t if self.is_full(layer, h) else int(self.budget_table(t)[t]) for h in range(len(self.full[layer])))
        segs = tuple(c + max_new for c in caps)
        return caps, segs, tuple(int(x) for x in np.cumsum((0,) + segs[:-1]))

    def build_layer(self, layer, q, k, v, lengths, max_new_tokens):
        b, t, hkv, d = k.shape
        caps, _, _ = self.layout(layer, t, max_new_tokens)
        kt, vt = head_major(k), head_major(v)
        n = jnp.asarray(self.budget_table(t))[lengths]
        keep = jnp.stack([lengths if self.is_full(layer, h) else n for h in range(hkv)], 1).astype(jnp.int32)
        pad = jnp.zeros((b, max_new_tokens, d), k.dtype)
        ks, vs = [], []
        for h in range(hkv):
            if self.is_full(layer, h):
                ks.append(kt[:, h])
                vs.append(vt[:, h])
            elif caps[h]:
                idx = sink_recent_positions(n, lengths, self.n_sink, caps[h])
                m = (jnp.arange(caps[h])[None, :] < n[:, None])[..., None]
                ks.append(jnp.where(m, jnp.take_along_axis(kt[:, h], idx[..., None], 1), 0))
                vs.append(jnp.where(m, jnp.take_along_axis(vt[:, h], idx[..., None], 1), 0))
            ks.append(pad)
            vs.append(pad)
        return DuoLayer(jnp.concatenate(ks, 1), jnp.concatenate(vs, 1), keep, T=t, max_new=max_new_tokens)

    def decode_layer(self, layer, st: DuoLayer, q, k, v, cache: Cache):
        b, hkv, d = k.shape
        _, segs, starts = self.layout(layer, st.T, st.max_new)
        pos = jnp.asarray(starts, jnp.int32)[None, :] + st.keep + cache.step
        bi = jnp.arange(b)[:, None]
        kp = st.k.at[bi, pos].set(k.astype(st.k.dtype))
        vp = st.v.at[bi, pos].set(v.astype(st.v.dtype))
        out = gather_attention(q.reshape(b, hkv, -1, d), kp, vp, st.keep + cache.step + 1, starts=starts,
                               capacity=segs)
        return out.reshape(q.shape), dataclasses.replace(st, k=kp, v=vp)

    def stats(self, cache: Cache) -> dict:
        out = super().stats(cache)
        t = cache.layers[0].T
        out.update({"ratio": self.ratio, "profile": self.profile_name, "heads": self.heads, "n_sink": self.n_sink,
                    "retrieval_heads": self.num_full, "total_heads": self.num_heads,
                    "prompt_slots_device": sum(sum(self.layout(l, t, 0)[0]) for l in range(len(cache.layers))),
                    "prompt_slots_full": t * self.num_heads})
        return out
