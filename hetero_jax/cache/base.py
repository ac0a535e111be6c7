"""The cache-policy interface: how a KV-cache method plugs into the model without it knowing.

The model computes q, k, v (post-RoPE) for every layer and hands them to the policy, which owns
both the attention computation over what it stores and the layout of what it stores:

* ``build_layer(layer, q, k, v, lengths, max_new_tokens)`` -> ``layer_state``
  q (B,T,Hq,D), k/v (B,T,Hkv,D) for the whole right-padded prompt, ``lengths`` (B,) real tokens:
  what the layer keeps, sized for ``max_new_tokens`` more. The default ``prefill_layer`` runs
  the shared causal prefill attention and then ``build_layer``; since the attention output does
  not depend on the policy, one prefill can build the caches of many policies
  (``model.prefill_qkv`` + ``model.build_cache``). A policy whose prefill attention differs
  overrides ``prefill_layer(...) -> (out, layer_state)`` instead.
* ``decode_layer(layer, layer_state, q, k, v, cache)`` -> ``(out, layer_state)``
  q (B,Hq,D), k/v (B,Hkv,D) for one new token per sequence at position ``cache.lengths``.

Both run inside the jitted prefill / decode step, so they must be traceable, and ``layer`` is a
Python int (policies may store different shapes per layer). Three host-side hooks run outside
jit, each default a no-op; they may dispatch jitted work but must never block on it:

* ``after_prefill(cache)`` -> cache: e.g. move prompt KV to host memory.
* ``before_step(cache)`` -> cache: e.g. start host->device transfers for a later step.
* ``stats(cache)`` -> dict: ``device_bytes`` and ``host_bytes`` measured from the arrays held,
  plus policy counters (checks, refreshes, bytes moved, ...).

Policies are frozen dataclasses (hashable: they are static arguments of the jitted steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.attention import prefill_attention
from pallas_kernels import gather_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
    """Everything decode needs to carry between steps. Donated to the jitted decode step."""

    layers: tuple  # one policy-defined pytree per layer
    lengths: jax.Array  # (B,) int32: tokens so far (prompt + generated) = next token's position
    step: jax.Array  # () int32: decode steps taken
    extra: Any = None  # policy-wide state (pytree), e.g. counters or pending refresh rows
    host: Any = None  # host-memory arrays; generate() keeps them out of the jitted decode step


def array_bytes(tree, memory_kind: str | None = None) -> int:
    """Bytes of the arrays in ``tree``; with ``memory_kind``, only those living in that memory."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "nbytes"):
            continue
        if memory_kind is not None:
            kind = getattr(getattr(x, "sharding", None), "memory_kind", None) or "device"
            if kind != memory_kind:
                continue
        total += int(x.nbytes)
    return total


def is_host_array(x) -> bool:
    kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
    return kind in ("pinned_host", "unpinned_host")


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """Base class: see the module docstring for the contract."""

    name: ClassVar[str] = "base"

    @classmethod
    def create(cls, cfg, ratio: float | None = None, **options) -> "CachePolicy":
        """Build from CLI-style options; policies that compress override this to use ``ratio``."""
        if ratio not in (None, 1.0):
            raise ValueError(f"cache policy {cls.name!r} keeps the full context; --ratio does not apply")
        return cls(**options)

    def prefill_layer(self, layer: int, q, k, v, lengths, max_new_tokens: int):
        """Causal attention over the prompt (the same for every policy) + ``build_layer``."""
        out = prefill_attention(q, k, v, getattr(self, "prefill_chunk", 512))
        return out, self.build_layer(layer, q, k, v, lengths, max_new_tokens)

    def build_layer(self, layer: int, q, k, v, lengths, max_new_tokens: int):
        """The layer's stored state from the whole prompt's post-RoPE q, k, v."""
        raise NotImplementedError

    @classmethod
    def shares_prefill(cls) -> bool:
        """True when prefill attention is the shared one, so one prefill can feed many policies."""
        return cls.prefill_layer is CachePolicy.prefill_layer and cls.build_layer is not CachePolicy.build_layer

    def decode_layer(self, layer: int, state, q, k, v, cache: Cache):
        raise NotImplementedError

    def after_prefill(self, cache: Cache) -> Cache:
        return cache

    def before_step(self, cache: Cache) -> Cache:
        return cache

    def stats(self, cache: Cache) -> dict:
        leaves = jax.tree.leaves(cache)
        host = sum(int(x.nbytes) for x in leaves if hasattr(x, "nbytes") and is_host_array(x))
        device = sum(int(x.nbytes) for x in leaves if hasattr(x, "nbytes") and not is_host_array(x))
        return {"policy": self.name, "device_bytes": device, "host_bytes": host}


def scatter_token(buf: jax.Array, index: jax.Array, value: jax.Array) -> jax.Array:
    """Write one row per (batch, head): buf (B, H, S, D), index (B,) or (B, H), value (B, H, D)."""
    b, h = buf.shape[:2]
    index = jnp.broadcast_to(index.reshape(b, -1), (b, h))
    bi = jnp.arange(b)[:, None]
    hi = jnp.arange(h)[None, :]
    return buf.at[bi, hi, index].set(value.astype(buf.dtype), mode="drop")


def round_up(n: int, multiple: int) -> int:
    return int(-(-n // multiple) * multiple)


def prompt_capacity(lengths: np.ndarray, multiple: int) -> int:
    return round_up(int(np.max(lengths)), multiple)


def segment_attention(q, kbuf, vbuf, lengths):
    """Decode attention of q (B, Hq, D) over per-head rows ``[0, lengths)`` of kbuf/vbuf (B,Hkv,S,D)."""
    b, hkv, s, d = kbuf.shape
    out = gather_attention(
        q.reshape(b, hkv, -1, d),
        kbuf.reshape(b, hkv * s, d),  # free reshape: head h's rows start at h * s
        vbuf.reshape(b, hkv * s, d),
        jnp.broadcast_to(lengths, (b, hkv)).astype(jnp.int32),
        starts=tuple(h * s for h in range(hkv)),
        capacity=(s,) * hkv,
    )
    return out.reshape(q.shape)
