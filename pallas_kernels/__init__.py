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
* ``native``: the compiled Pallas kernel (Triton lowering) whatever the backend, never
  downgraded to interpret mode: for lowering or ``jax.export``-ing for a GPU from a CPU-only
  machine (tests/test_export.py). Running it on a CPU backend fails to lower.

Choice, first match wins: the ``impl`` argument ("xla" | "pallas" | "interpret" | "native"),
then ``interpret=True`` (-> "interpret"), then ``use_impl(...)`` (a context, e.g. around an
export), then the env var ``HETERO_JAX_PALLAS`` (same values), then the backend: "pallas" on GPU,
"xla" elsewhere. "pallas" on a CPU backend runs interpreted.

The choice is made when a caller is traced: a jitted function already traced for the same
shapes outside ``use_impl`` keeps its earlier choice (jax's trace cache does not see the
context), so trace fresh ``jax.jit`` wrappers inside it.
"""

from __future__ import annotations

import contextlib
import contextvars
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
    "use_impl",
]

ENV_VAR = "HETERO_JAX_PALLAS"
IMPLS = ("xla", "pallas", "interpret", "native")
_CONTEXT_IMPL: contextvars.ContextVar[str | None] = contextvars.ContextVar("pallas_kernels_impl", default=None)


def _check(impl: str, source: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r} (from {source})")
    return impl


@contextlib.contextmanager
def use_impl(impl: str):
    """Kernel calls traced inside pick ``impl`` unless their own arguments name one. E.g.
    ``with use_impl("native"): jax.export.export(fn, platforms=("cuda",))(...)`` lowers the
    Triton kernels for a GPU from a CPU-only machine."""
    token = _CONTEXT_IMPL.set(_check(impl, "use_impl"))
    try:
        yield
    finally:
        _CONTEXT_IMPL.reset(token)


def resolve_impl(impl: str | None = None, interpret: bool | None = None) -> str:
    """The implementation a call would use: 'xla', 'pallas' (compiled) or 'interpret'."""
    source = "the impl argument"
    if impl is None and interpret:
        impl = "interpret"
    if impl is None and _CONTEXT_IMPL.get() is not None:
        impl, source = _CONTEXT_IMPL.get(), "use_impl"
    if impl is None and os.environ.get(ENV_VAR):
        impl, source = os.environ[ENV_VAR], f"${ENV_VAR}"
    if impl is None:
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    if _check(impl, source) == "native":
        return "pallas"  # compiled, even on a CPU backend (lowering for another platform)
    if impl == "pallas" and (interpret or jax.default_backend() == "cpu"):
        impl = "interpret"
    return impl


def gather_attention(q, k_pool, v_pool, lengths, *, starts=None, capacity=None, index=None, impl=None, interpret=None,
                     logit_heads=None, logit_rows=None):
    """Single-token GQA decode attention where each (batch, KV head) reads its own rows.

    q (B, Hkv, G, D); k_pool, v_pool (B, R, D) f32 or bf16; lengths (B, Hkv) int32 valid rows.
    Segment layout: static tuples ``starts``/``capacity`` (Hkv ints), head h reads
    ``pool[b, starts[h] : starts[h] + lengths[b, h]]`` (lengths <= capacity[h]).
    Index layout: ``index`` (B, Hkv, K) int32 row ids, head h reads ``pool[b, index[b, h, :lengths[b, h]]]``.
    Returns (B, Hkv, G, D) in q's dtype: softmax(q k^T / sqrt(D)) v with f32 accumulation;
    a head with no valid rows returns zeros. Rows past a head's length are never used; in the
    ``xla`` path they must hold finite values (they are multiplied by probability 0).

    ``logit_heads`` (static tuple of heads, segment layout) with ``logit_rows`` (static int <= their
    capacity): also return the same pass's scaled scores q.k / sqrt(D) of those heads over their
    first ``logit_rows`` rows, (B, len(logit_heads), G, logit_rows) f32, -inf at rows past a head's
    length -> (out, logits). HeteroCache's drift check scores its pivots from them.
    """
    which = resolve_impl(impl, interpret)
    starts = None if starts is None else tuple(int(x) for x in starts)  # static: hashable ints
    capacity = None if capacity is None else tuple(int(x) for x in capacity)
    logits = {} if logit_heads is None else dict(logit_heads=tuple(int(h) for h in logit_heads),
                                                 logit_rows=int(logit_rows) if logit_rows is not None else None)
    if which == "xla":
        return gather_attention_reference(q, k_pool, v_pool, lengths, starts=starts, capacity=capacity, index=index,
                                          **logits)
    return gather_attention_pallas(
        q, k_pool, v_pool, lengths, starts=starts, capacity=capacity, index=index, interpret=which == "interpret",
        **logits
    )


def topk_overlap(a, b, *, impl=None, interpret=None):
    """Overlap coefficient |A ∩ B| / k of index sets: a, b (..., k) int32, no duplicates within
    a set, leading dims broadcast -> (...) float32."""
    which = resolve_impl(impl, interpret)
    if which == "xla":
        return topk_overlap_reference(a, b)
    return topk_overlap_pallas(a, b, interpret=which == "interpret")
