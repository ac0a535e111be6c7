"""The cache-policy interface: how a KV-cache method plugs into the model without it knowing.

The model runs every prompt through the same causal attention (``model.prefill``) and hands each
layer's post-RoPE q, k, v to the policy, which decides what to store; in decode it hands over one
new token's q, k, v and the policy owns the attention over what it stored. A policy is a frozen
dataclass (hashable: a static argument of the jitted steps), one file per policy, registered by
name in ``hetero_jax.cache``. The whole contract:

* ``create(cfg, ratio=None, **options)`` (classmethod): build from CLI-style options; ``ratio`` is
  the device prompt-KV budget as a fraction of full KV.
* ``build_layer(layer, q, k, v, lengths, max_new_tokens)`` -> ``layer_state`` (in jit):
  q (B,T,Hq,D), k/v (B,T,Hkv,D) for the whole right-padded prompt, ``lengths`` (B,) real tokens:
  what the layer keeps, sized for ``max_new_tokens`` more. The prefill attention is the same for
  every policy, so one forward pass can build the caches of many (``model.prefill_qkv``).
* ``decode_layer(layer, layer_state, q, k, v, cache)`` -> ``(out, layer_state)`` (in jit):
  q (B,Hq,D), k/v (B,Hkv,D) for one new token per sequence at position ``cache.lengths``.
* ``finish_step(cache)`` -> cache (in jit, optional): once per decode step after every layer's
  ``decode_layer`` (``cache.step`` / ``cache.lengths`` still this step's): work that spans layers,
  done in one batch instead of one small program per layer (HeteroCache's drift check).
* ``after_prefill(cache)`` -> cache (host, once): e.g. move prompt KV to host memory.
* ``before_step(cache)`` -> cache (host, before every decode step): e.g. dispatch host->device
  refresh transfers. Host hooks may dispatch jitted work but never block on it.
* ``stats(cache)`` -> dict (host): ``device_bytes`` and ``host_bytes`` measured from the arrays
  held, plus policy counters.
* ``name`` (class attribute): the registry name; ``needs_profile`` (class attribute): ``create``
  takes a ``profile`` of head roles measured on the model (benchmarks give random-weight models
  a synthetic one).
* Meshes (``hetero_jax.sharding``): every layer-state array of rank >= 2 is batch-first, split
  over ``data``; ``head_split(state)`` -> the state's structure with a bool per array: axis 1 is
  KV heads, split over ``model`` too (default: every array of rank >= 2, i.e. ``(B, Hkv, ...)``).
  ``on_mesh(model)`` -> the policy as it runs with its heads over ``model`` devices (default:
  itself; HeteroCache lays its blocks out per shard), applied by the decode loop before prefill.

``layer`` is a Python int (policies may store different shapes per layer). Host-memory arrays go
in ``Cache.host``, which the decode loop keeps out of the jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import gather_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
    """Everything decode needs to carry between steps. Donated to the jitted decode step."""

    layers: tuple  # one policy-defined pytree per layer
    lengths: jax.Array  # (B,) int32: tokens so far (prompt + generated) = next token's position
    step: jax.Array  # () int32: decode steps taken
    host: Any = None  # host-memory arrays, kept out of the jitted decode step


def array_bytes(tree, memory_kind: str | None = None) -> int:
    """Bytes of the arrays in ``tree``; with ``memory_kind``, only those living in that memory."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")]
    return sum(int(x.nbytes) for x in leaves if memory_kind is None or _kind(x) == memory_kind)


def _kind(x) -> str:
    return getattr(getattr(x, "sharding", None), "memory_kind", None) or "device"


def is_host_array(x) -> bool:
    return _kind(x) in ("pinned_host", "unpinned_host")


def host_memory_kind(x) -> str | None:
    """The host memory kind of the device holding ``x`` (``pinned_host`` preferred), or None."""
    kinds = {m.kind for m in next(iter(x.devices())).addressable_memories()}
    return next((k for k in ("pinned_host", "unpinned_host") if k in kinds), None)


def to_memory(x, kind: str):
    """``x`` moved (asynchronously) to memory ``kind`` of its device."""
    return jax.device_put(x, x.sharding.with_memory_kind(kind))


def on_host(fn):
    """``fn`` computed in host memory, outputs left there (jax 0.10 names the transform
    ``compute_on2``, 0.11+ ``compute_on``). Raises ImportError where jax has neither."""
    from jax.experimental import compute_on as co

    transform = getattr(co, "compute_on2", None) or co.compute_on
    return transform(fn, compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)


_COMPILED: dict = {}


def compiled(fn, *args):
    """Jitted ``fn`` compiled ahead of time for these argument shapes, once (so a caller can time
    compilation apart, or compile a program before it is first needed)."""
    avals = jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)) if hasattr(x, "shape") else x,
                         args)
    key = (fn, jax.tree.structure(args), tuple(jax.tree.leaves(avals)))
    if key not in _COMPILED:
        if len(_COMPILED) > 128:
            _COMPILED.clear()
        _COMPILED[key] = fn.lower(*args).compile()
    return _COMPILED[key]


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """Base class: see the module docstring for the contract."""

    name: ClassVar[str] = "base"
    needs_profile: ClassVar[bool] = False

    @classmethod
    def create(cls, cfg, ratio: float | None = None, **options) -> "CachePolicy":
        """Build from CLI-style options; policies that compress override this to use ``ratio``."""
        if ratio not in (None, 1.0):
            raise ValueError(f"cache policy {cls.name!r} keeps the full context; --ratio does not apply")
        return cls(**options)

    def build_layer(self, layer: int, q, k, v, lengths, max_new_tokens: int):
        """The layer's stored state from the whole prompt's post-RoPE q, k, v."""
        raise NotImplementedError

    def decode_layer(self, layer: int, state, q, k, v, cache: Cache):
        """Store one new token and attend over what is kept -> (out (B, Hq, D), state)."""
        raise NotImplementedError

    def finish_step(self, cache: Cache) -> Cache:
        return cache

    def on_mesh(self, model: int) -> "CachePolicy":
        return self

    def head_split(self, state):
        return jax.tree.map(lambda x: x.ndim >= 2, state)

    def after_prefill(self, cache: Cache) -> Cache:
        return cache

    def before_step(self, cache: Cache) -> Cache:
        return cache

    def stats(self, cache: Cache) -> dict:
        total = array_bytes(cache)
        host = sum(int(x.nbytes) for x in jax.tree.leaves(cache) if hasattr(x, "nbytes") and is_host_array(x))
        return {"policy": self.name, "device_bytes": total - host, "host_bytes": host}


def scatter_token(buf: jax.Array, index: jax.Array, value: jax.Array) -> jax.Array:
    """Write one row per (batch, head): buf (B, H, S, D), index (B,) or (B, H), value (B, H, D);
    rows past S are dropped. (B, H) are batch dimensions of the scatter, so on a mesh each device
    writes its own sequences' and heads' rows with no traffic."""
    b, h = buf.shape[:2]
    index = jnp.broadcast_to(index.reshape(b, -1), (b, h)).astype(jnp.int32)
    if b * h == 1:  # XLA CPU lowers a one-row scatter to a select + update that copies buf three times
        return _update_one_row(buf, index.reshape(()), value)
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(2,), inserted_window_dims=(2,),
                                           scatter_dims_to_operand_dims=(2,), operand_batching_dims=(0, 1),
                                           scatter_indices_batching_dims=(0, 1))
    return jax.lax.scatter(buf, index[..., None], value.astype(buf.dtype), dims,
                           mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _update_one_row(buf: jax.Array, i: jax.Array, value: jax.Array) -> jax.Array:
    """``scatter_token`` for B = H = 1 as an in-place dynamic_update_slice (the row is dropped,
    i.e. the old one rewritten, when i is outside [0, S))."""
    s, d = buf.shape[2:]
    j = jnp.clip(i, 0, s - 1)
    old = jax.lax.dynamic_slice(buf, (0, 0, j, 0), (1, 1, 1, d))
    row = jnp.where((i >= 0) & (i < s), value.reshape(1, 1, 1, d).astype(buf.dtype), old)
    return jax.lax.dynamic_update_slice(buf, row, (0, 0, j, 0))


def round_up(n: int, multiple: int) -> int:
    return int(-(-n // multiple) * multiple)


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
