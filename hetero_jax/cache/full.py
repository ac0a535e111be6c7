"""Full KV: every head keeps every token on device. The reference every other policy is judged by."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from hetero_jax.cache.base import Cache, CachePolicy, round_up, scatter_token, segment_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FullLayer:
    k: jax.Array  # (B, Hkv, S, D): prompt rows then generated rows, per sequence
    v: jax.Array


@dataclasses.dataclass(frozen=True)
class FullKV(CachePolicy):
    name: ClassVar[str] = "full"

    def build_layer(self, layer, q, k, v, lengths, max_new_tokens):
        b, t, hkv, d = k.shape
        cap = round_up(t + max_new_tokens, 128)
        pad = [(0, 0), (0, 0), (0, cap - t), (0, 0)]
        return FullLayer(jnp.pad(k.transpose(0, 2, 1, 3), pad), jnp.pad(v.transpose(0, 2, 1, 3), pad))

    def decode_layer(self, layer, state: FullLayer, q, k, v, cache: Cache):
        kbuf = scatter_token(state.k, cache.lengths, k)
        vbuf = scatter_token(state.v, cache.lengths, v)
        out = segment_attention(q, kbuf, vbuf, (cache.lengths + 1)[:, None])
        return out, FullLayer(kbuf, vbuf)
