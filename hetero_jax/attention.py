"""Attention math shared by every cache policy: RoPE, chunked causal prefill, per-key scores.

Shapes: B batch, T prompt tokens (right-padded; ``lengths`` (B,) says how many are real),
Hq query heads, Hkv KV heads, G = Hq // Hkv, D head dim. All softmaxes run in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from convert.config import LlamaConfig

NEG_INF = -1e30


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies (D/2,), with Llama-3.1 scaling when the config has it (as HF does)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE. x: (..., T, H, D) or (..., H, D) with positions shaped like the leading dims."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (..., D/2)
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    cos, sin = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """(B, T, Hq, D) -> (B, Hkv, G, T, D)."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d).transpose(0, 2, 3, 1, 4)


def prefill_attention(q, k, v, chunk: int = 512) -> jax.Array:
    """Causal self-attention over the prompt, ``chunk`` queries at a time.

    Never builds the T x T score matrix: each chunk of queries attends to the keys up to its end
    with an online softmax over key blocks, skipping blocks entirely in the future.
    q: (B, T, Hq, D); k, v: (B, T, Hkv, D). T must be a multiple of ``chunk`` (pad the prompt).
    Returns (B, T, Hq, D) in q's dtype. Padded positions past a row's length are garbage-in,
    garbage-out and never read back (causality keeps real rows clean). The chunk shrinks to
    gcd(T, chunk) so any padded length works (generate pads prompts to a multiple of 128).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    chunk = math.gcd(t, chunk)
    n = t // chunk
    scale = 1.0 / math.sqrt(d)
    qg = group_queries(q, hkv).astype(jnp.float32) * scale  # (B, Hkv, G, T, D)
    kt = k.transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
    vt = v.transpose(0, 2, 1, 3)

    def one_query_chunk(ci):
        qc = jax.lax.dynamic_slice_in_dim(qg, ci * chunk, chunk, axis=3)  # (B,Hkv,G,C,D)
        q_pos = ci * chunk + jnp.arange(chunk)

        def key_block(carry, kj):
            m, l, acc = carry

            def compute(carry):
                m, l, acc = carry
                kc = jax.lax.dynamic_slice_in_dim(kt, kj * chunk, chunk, axis=2).astype(jnp.float32)
                vc = jax.lax.dynamic_slice_in_dim(vt, kj * chunk, chunk, axis=2).astype(jnp.float32)
                s = jnp.einsum("bhgqd,bhkd->bhgqk", qc, kc)
                k_pos = kj * chunk + jnp.arange(chunk)
                s = jnp.where(k_pos[None, :] <= q_pos[:, None], s, NEG_INF)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                l_new = l * corr + p.sum(-1)
                acc_new = acc * corr[..., None] + jnp.einsum("bhgqk,bhkd->bhgqd", p, vc)
                return m_new, l_new, acc_new

            carry = jax.lax.cond(kj <= ci, compute, lambda c: c, (m, l, acc))
            return carry, None

        init = (
            jnp.full(qc.shape[:-1], NEG_INF, jnp.float32),
            jnp.zeros(qc.shape[:-1], jnp.float32),
            jnp.zeros(qc.shape, jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(n))
        return acc / l[..., None]  # (B,Hkv,G,C,D)

    out = jax.lax.map(one_query_chunk, jnp.arange(n))  # (n, B, Hkv, G, C, D)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, hq, d)
    return out.astype(q.dtype)


def pooled_scores(q, k, valid, *, kernel: int = 5, reduce: str = "max", keep=None) -> jax.Array:
    """Per-key scores of a few queries, the one rule behind SnapKV votes, HeteroCache's selection
    and drift check, H2O's accumulation, retrieval and profiling: each query row's softmax (float32)
    over the keys it may see, summed over the rows, zeroed outside ``keep``, average-pooled over the
    keys (``pool5`` with ``kernel``; 1 = none), reduced over the GQA group (``max`` or ``mean``).

    q (..., G, W, D) post-RoPE queries (W rows per query head), k (..., S, D) keys; ``...`` (e.g.
    (B, Hkv)) broadcasts. ``valid`` bool, broadcastable to (..., G, W, S): the keys each row
    attends (a row with none votes nothing); ``keep`` (..., S) or None. Returns (..., S) float32.
    """
    s = jnp.einsum("...gwd,...sd->...gws", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
    p = jnp.where(valid, jax.nn.softmax(jnp.where(valid, s, NEG_INF), axis=-1), 0.0).sum(-2)
    if keep is not None:
        p = jnp.where(keep[..., None, :], p, 0.0)
    if kernel > 1:
        p = pool5(p, kernel)
    return p.max(-2) if reduce == "max" else p.mean(-2)


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: (B, T, ...), idx: (B, W) -> (B, W, ...)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def last_rows(x: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
    """The last ``window`` real rows of each right-padded sequence: (B, T, ...) -> (B, W, ...)."""
    idx = jnp.clip(lengths[:, None] - window + jnp.arange(window)[None, :], 0, x.shape[1] - 1)
    return gather_rows(x, idx)


def pool5(scores: jax.Array, kernel: int = 5) -> jax.Array:
    """1-D average pooling over the last axis: kernel 5, stride 1, zero padding 2.

    Matches torch's avg_pool1d with count_include_pad=True (divides by the kernel size).
    """
    pad = kernel // 2
    padded = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(pad, pad)])
    window = jax.lax.reduce_window(
        padded, 0.0, jax.lax.add, (1,) * (scores.ndim - 1) + (kernel,), (1,) * scores.ndim, "VALID"
    )
    return window / kernel
