"""The drift check's token scores from the decode attention's own logits (REFERENCE.md section 4).

A pivot is a full head: its decode attention already computes q.k / sqrt(D) over its whole
prompt. ``gather_attention(..., logit_heads=pivots, logit_rows=T)`` returns those scaled scores
from the same pass, and this turns them into the authors' scores: softmax over the prompt keys
only (the generated rows the attention also saw are left out), pool5 per query head, max over
the GQA group. The same ops in the same order as ``pooled_scores`` on one query row, so the
scores equal a second scoring pass's (``hetero_monitor.group_max_scores``) without reading the
prompt K again or copying it to float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hetero_jax.attention import NEG_INF, pool5


def drift_scores(logits: jax.Array, plen: jax.Array) -> jax.Array:
    """logits (B, P, G, T) f32 scaled scores over each pivot's first T rows (anything, -inf or
    finite, past the prompt), plen (B,) real prompt lengths -> (B, P, T) f32, NEG_INF past plen."""
    inside = jnp.arange(logits.shape[-1]) < plen[:, None, None, None]  # (B, 1, 1, T)
    p = jnp.where(inside, jax.nn.softmax(jnp.where(inside, logits, NEG_INF), axis=-1), 0.0)
    return jnp.where(inside[:, :, 0], pool5(p).max(-2), NEG_INF)
