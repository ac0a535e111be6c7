"""Plain-XLA (jnp) versions of the kernels: the CPU default and the reference the Pallas path is tested against.

They sit on the hot path of every decode step on CPU, so they avoid copies where the layout
allows: the full-KV segment layout becomes one free reshape + einsum over all heads; other
segment layouts either score the whole pool once with a per-head mask (few heads) or use static
per-head slices (many heads; XLA CPU copies slices); only the index layout gathers rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def check_layout(q, k_pool, v_pool, lengths, starts, capacity, index, logit_heads=None, logit_rows=None):
    """Validate shapes once at trace time; return 'segment' or 'index'."""
    if q.ndim != 4 or k_pool.ndim != 3 or k_pool.shape != v_pool.shape:
        raise ValueError(f"want q (B,Hkv,G,D) and k/v pools (B,R,D); got {q.shape}, {k_pool.shape}, {v_pool.shape}")
    b, hkv, _, d = q.shape
    if k_pool.shape[0] != b or k_pool.shape[2] != d or lengths.shape != (b, hkv):
        raise ValueError(f"shape mismatch: q {q.shape}, pool {k_pool.shape}, lengths {lengths.shape}")
    if index is not None:
        if logit_heads is not None:
            raise ValueError("logit_heads needs the segment layout (starts/capacity), not index")
        if starts is not None:
            raise ValueError("give either index or starts/capacity, not both")
        if index.ndim != 3 or index.shape[:2] != (b, hkv):
            raise ValueError(f"index must be (B,Hkv,K); got {index.shape}")
        return "index"
    if starts is None or capacity is None:
        raise ValueError("the segment layout needs static starts and capacity tuples")
    if len(starts) != hkv or len(capacity) != hkv:
        raise ValueError(f"starts/capacity need {hkv} entries; got {len(starts)}, {len(capacity)}")
    r = k_pool.shape[1]
    for s, c in zip(starts, capacity):
        if s < 0 or c < 0 or s + c > r:
            raise ValueError(f"segment [{s}, {s + c}) is outside the pool of {r} rows")
    if logit_heads is not None:
        bad = [h for h in logit_heads if not 0 <= h < hkv or logit_rows is None or not 0 <= logit_rows <= capacity[h]]
        if bad or len(set(logit_heads)) != len(logit_heads):
            raise ValueError(f"logit_heads must be distinct heads in [0, {hkv}) with logit_rows <= their capacity; "
                             f"got heads {logit_heads}, rows {logit_rows}, capacity {capacity}")
    return "segment"


def uniform_stride(starts, capacity):
    """True when head h's segment is rows [s0 + h*C, s0 + (h+1)*C): one reshape covers all heads."""
    c = capacity[0]
    return c > 0 and all(x == c for x in capacity) and all(s == starts[0] + h * c for h, s in enumerate(starts))


def take_static(x: jax.Array, index, axis: int = 1) -> jax.Array:
    """``x`` at the static indices ``index`` along ``axis``, built from slices of the index's
    contiguous runs (one concatenate joins them) instead of a gather: XLA CPU runs each gather as
    its own op plus a copy, while slices fuse into the op that reads them."""
    index = tuple(int(i) for i in index)
    if index == tuple(range(x.shape[axis])):
        return x
    runs, start = [], 0
    for i in range(1, len(index) + 1):
        if i == len(index) or index[i] != index[i - 1] + 1:
            runs.append(jax.lax.slice_in_dim(x, index[start], index[i - 1] + 1, axis=axis))
            start = i
    return runs[0] if len(runs) == 1 else jnp.concatenate(runs, axis)


def _compute_dtype(q, k):
    """Same dtype -> dots in that dtype with f32 accumulation; mixed -> everything in f32."""
    return q.dtype if q.dtype == k.dtype else jnp.float32


def _softmax(s, valid):
    """Masked softmax numerator and denominator in f32; masked entries are exactly 0 and a row
    with nothing valid gets l = 0 (its output is then forced to 0, not NaN)."""
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    return p, jnp.sum(p, axis=-1, keepdims=True)


def attend(q, k, v, lengths, logits: bool = False):
    """Masked decode attention. q (B,H,G,D), k/v (B,H,C,D), lengths (B,H) -> (B,H,G,D) f32, and
    with ``logits`` also the scaled scores q.k / sqrt(D) (B,H,G,C) f32, -inf at rows past ``lengths``.

    Rows at or past ``lengths`` get probability exactly 0 (they must hold finite values).

    With one (batch, head) pair the products are fused multiply-reduces, not dots: XLA CPU turns
    such a dot into a plain matmul and duplicates its operand fusion (the new row's write),
    copying the whole K/V block three times per step.
    """
    dt = _compute_dtype(q, k)
    elementwise = q.shape[0] * q.shape[1] == 1
    if elementwise:
        s = (q.astype(dt)[:, :, :, None, :] * k.astype(dt)[:, :, None]).sum(-1)
    else:
        s = jnp.einsum("bhgd,bhcd->bhgc", q.astype(dt), k.astype(dt), preferred_element_type=jnp.float32)
    s = s * (1.0 / math.sqrt(q.shape[-1]))
    valid = (jnp.arange(k.shape[2], dtype=jnp.int32) < lengths[..., None])[:, :, None, :]  # (B,H,1,C)
    p, l = _softmax(s, valid)
    if elementwise:
        o = (p[..., None] * v.astype(dt)[:, :, None]).sum(-2)
    else:
        o = jnp.einsum("bhgc,bhcd->bhgd", p.astype(dt), v.astype(dt), preferred_element_type=jnp.float32)
    o = o / jnp.where(l > 0, l, 1.0)
    return (o, jnp.where(valid, s, -jnp.inf)) if logits else o


def attend_pool(q, k_pool, v_pool, lengths, starts, capacity, logits: bool = False):
    """Segment layout without slicing: every head scores every pool row, then a per-head mask
    keeps its own segment. Reads K/V once (per-head slices get copied by XLA CPU) at H x the
    flops, which is a win while H*G is small and the segments fill most of the pool."""
    dt = _compute_dtype(q, k_pool)
    rows = jnp.arange(k_pool.shape[1], dtype=jnp.int32)
    st = jnp.asarray(starts, jnp.int32)[None, :, None]
    end = st + jnp.minimum(lengths, jnp.asarray(capacity, jnp.int32))[..., None]
    valid = ((rows >= st) & (rows < end))[:, :, None, :]  # (B,H,1,R)
    s = jnp.einsum("bhgd,brd->bhgr", q.astype(dt), k_pool.astype(dt), preferred_element_type=jnp.float32)
    s = s * (1.0 / math.sqrt(q.shape[-1]))
    p, l = _softmax(s, valid)
    o = jnp.einsum("bhgr,brd->bhgd", p.astype(dt), v_pool.astype(dt), preferred_element_type=jnp.float32)
    o = o / jnp.where(l > 0, l, 1.0)
    return (o, jnp.where(valid, s, -jnp.inf)) if logits else o


def segment_strategy(starts, capacity, num_rows, group):
    """Static choice of XLA strategy for the segment layout: 'uniform' | 'pool' | 'per_head'.

    Measured on the 2-core CPU: 'pool' beat 'per_head' 3x at H*G = 9 (SmolLM2), tied at 16 and
    lost 1.5-2.5x at 32 (Llama-8B shapes)."""
    if uniform_stride(starts, capacity):
        return "uniform"
    if len(starts) * group <= 16 and 2 * sum(capacity) >= num_rows:
        return "pool"
    return "per_head"


@functools.partial(jax.jit, static_argnames=("starts", "capacity", "logit_heads", "logit_rows"))
def gather_attention_reference(q, k_pool, v_pool, lengths, *, starts=None, capacity=None, index=None,
                               logit_heads=None, logit_rows=None):
    """Pure-jnp gather_attention (same contract as ``pallas_kernels.gather_attention``)."""
    layout = check_layout(q, k_pool, v_pool, lengths, starts, capacity, index, logit_heads, logit_rows)
    b, hkv, g, d = q.shape
    lengths = lengths.astype(jnp.int32)
    want = logit_heads is not None
    if layout == "index":
        kk = index.shape[-1]
        valid = jnp.arange(kk, dtype=jnp.int32) < lengths[..., None]
        idx = jnp.where(valid, index, 0).reshape(b, hkv * kk)
        take = jax.vmap(lambda pool, i: jnp.take(pool, i, axis=0, mode="clip"))
        ks = take(k_pool, idx).reshape(b, hkv, kk, d)
        vs = take(v_pool, idx).reshape(b, hkv, kk, d)
        return attend(q, ks, vs, lengths).astype(q.dtype)
    strategy = segment_strategy(starts, capacity, k_pool.shape[1], g)
    if strategy == "pool":
        out = attend_pool(q, k_pool, v_pool, lengths, starts, capacity, logits=want)
        if not want:
            return out.astype(q.dtype)
        out, s = out
        lg = jnp.stack([s[:, h, :, starts[h]: starts[h] + logit_rows] for h in logit_heads], 1)
        return out.astype(q.dtype), lg
    if strategy == "uniform":
        s0, c = starts[0], capacity[0]
        ks = k_pool[:, s0 : s0 + hkv * c].reshape(b, hkv, c, d)  # free when the pool is exactly the heads
        vs = v_pool[:, s0 : s0 + hkv * c].reshape(b, hkv, c, d)
        out = attend(q, ks, vs, lengths, logits=want)
        if not want:
            return out.astype(q.dtype)
        out, s = out
        return out.astype(q.dtype), take_static(s, logit_heads)[:, :, :, :logit_rows]
    outs, lgs = [], {}
    for h, (s, c) in enumerate(zip(starts, capacity)):
        if c == 0:
            outs.append(jnp.zeros((b, 1, g, d), jnp.float32))
            continue
        o = attend(q[:, h : h + 1], k_pool[:, None, s : s + c], v_pool[:, None, s : s + c], lengths[:, h : h + 1],
                   logits=want and h in logit_heads)
        if isinstance(o, tuple):
            o, lgs[h] = o[0], o[1][:, 0, :, :logit_rows]
        outs.append(o)
    out = jnp.concatenate(outs, axis=1).astype(q.dtype)
    return (out, jnp.stack([lgs[h] for h in logit_heads], 1)) if want else out


@jax.jit
def topk_overlap_reference(a, b):
    """|A ∩ B| / k for index sets without duplicates: (..., k) int -> (...) float32.

    Small k: a k x k compare matrix. Large k: sort the concatenation; each common element shows
    up as exactly one adjacent equal pair (no duplicates within a set).
    """
    a, b = jnp.broadcast_arrays(jnp.asarray(a), jnp.asarray(b))
    k = a.shape[-1]
    if k == 0:
        return jnp.zeros(a.shape[:-1], jnp.float32)
    if k <= 64:
        inter = jnp.sum(jnp.any(a[..., :, None] == b[..., None, :], axis=-1), axis=-1)
    else:
        c = jnp.sort(jnp.concatenate([a, b], axis=-1), axis=-1)
        inter = jnp.sum(c[..., 1:] == c[..., :-1], axis=-1)
    return inter.astype(jnp.float32) / k
