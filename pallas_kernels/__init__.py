"""Kernels for HeteroCache decode: per-head gather attention and top-k overlap.

Two implementations of each, same contract:

* ``xla``: plain jnp (``pallas_kernels.xla``). The default on CPU, where Pallas only runs
  interpreted (a correctness tool, ~100x slower than XLA). It is on the hot path of every
  decode step, so the full-KV layout is one free reshape + einsum and other segment layouts
  use static per-head slices; only the index layout gathers.
* ``pallas``: Pallas kernels (``attention.py``, ``overlap.py``) written to the Triton rules
  (the GPU lowering in jax 0.10-0.12) and kept to backend-neutral ops (ref indexing, fori_loop,
  dot_general) so a Mosaic GPU port changes the launch, not the math. The default on GPU.
  ``interpret`` runs the same kernel in interpret mode (CPU tests).

Choice, first match wins: the ``impl`` argument ("xla" | "pallas" | "interpret"), then
``interpret=True`` (-> "interpret"), then the env var ``HETERO_JAX_PALLAS`` (same values), then
the backend: "pallas" on GPU, "xla" elsewhere. "pallas" on a CPU backend runs interpreted.
"""

from __future__ import annotations

import os

import jax

from pallas_kernels.attention import gather_attention_pallas
from pallas_kernels.overlap import topk_overlap_pallas
from pallas_kernels.xla import gather_attention_reference, topk_overlap_reference

__all__ = [
    "gather_attention",
    "gather_attention_reference",
    "gather_attention_pallas",
    "topk_overlap",
    "topk_overlap_reference",
    "topk_overlap_pallas",
    "resolve_impl",
]

ENV_VAR = "HETERO_JAX_PALLAS"
IMPLS = ("xla", "pallas", "interpret")


def resolve_impl(impl: str | None = None, interpret: bool | None = None) -> str:
    """The implementation a call would use: 'xla', 'pallas' (compiled) or 'interpret'."""
    if impl is None:
        impl = "interpret" if interpret else os.environ.get(ENV_VAR) or None
    if impl is None:
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r} (from the argument or ${ENV_VAR})")
    if impl == "pallas" and (interpret or jax.default_backend() == "cpu"):
        impl = "interpret"
    return impl


def gather_attention(q, k_pool, v_pool, lengths, *, starts=None, capacity=None, index=None, impl=None, interpret=None):
    """Single-token GQA decode attention where each (batch, KV head) reads its own rows.

    q (B, Hkv, G, D); k_pool, v_pool (B, R, D) f32 or bf16; lengths (B, Hkv) int32 valid rows.
    Segment layout: static tuples ``starts``/``capacity`` (Hkv ints), head h reads
    ``pool[b, starts[h] : starts[h] + lengths[b, h]]`` (lengths <= capacity[h]).
    Index layout: ``index`` (B, Hkv, K) int32 row ids, head h reads ``pool[b, index[b, h, :lengths[b, h]]]``.
    Returns (B, Hkv, G, D) in q's dtype: softmax(q k^T / sqrt(D)) v with f32 accumulation;
    a head with no valid rows returns zeros. Rows past a head's length are never used; in the
    ``xla`` path they must hold finite values (they are multiplied by probability 0).
    """
    which = resolve_impl(impl, interpret)
    starts = None if starts is None else tuple(int(x) for x in starts)  # static: hashable ints
    capacity = None if capacity is None else tuple(int(x) for x in capacity)
    if which == "xla":
        return gather_attention_reference(q, k_pool, v_pool, lengths, starts=starts, capacity=capacity, index=index)
    return gather_attention_pallas(
        q, k_pool, v_pool, lengths, starts=starts, capacity=capacity, index=index, interpret=which == "interpret"
    )


def topk_overlap(a, b, *, impl=None, interpret=None):
    """Overlap coefficient |A ∩ B| / k of index sets: a, b (..., k) int32, no duplicates within
    a set, leading dims broadcast -> (...) float32."""
    which = resolve_impl(impl, interpret)
    if which == "xla":
        return topk_overlap_reference(a, b)
    return topk_overlap_pallas(a, b, interpret=which == "interpret")
