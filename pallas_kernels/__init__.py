"""PLACEHOLDER (being replaced by the kernels work): jnp gather_attention with the final signature."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def gather_attention(q, k_pool, v_pool, lengths, *, starts=None, capacity=None, index=None, impl=None, interpret=None):
    b, hkv, g, d = q.shape
    outs = []
    for h in range(hkv):
        if index is not None:
            idx = index[:, h]
        else:
            idx = starts[h] + jnp.arange(capacity[h])[None, :].repeat(b, 0)
        kh = jnp.take_along_axis(k_pool, idx[..., None], axis=1).astype(jnp.float32)
        vh = jnp.take_along_axis(v_pool, idx[..., None], axis=1).astype(jnp.float32)
        s = jnp.einsum("bgd,bkd->bgk", q[:, h].astype(jnp.float32), kh) / math.sqrt(d)
        valid = jnp.arange(idx.shape[1])[None, :] < lengths[:, h : h + 1]
        s = jnp.where(valid[:, None, :], s, -1e30)
        p = jax.nn.softmax(s, -1) * valid[:, None, :]
        outs.append(jnp.einsum("bgk,bkd->bgd", p, vh))
    return jnp.stack(outs, 1).astype(q.dtype)
