"""HeteroCache's device storage: the static per-layer plan and one ragged pool per layer.

Layout (REFERENCE.md sections 2-3). Per layer one pool ``k, v`` (B, R, D): KV head h owns the
static segment ``[starts[h], starts[h] + caps[h] + max_new)``: ``caps[h]`` prompt slots (T for
full heads, the formula's budget at the padded length T for compressed ones) then slots for
generated tokens. Sequence b's valid rows of head h are contiguous: ``keep[b, h]`` kept prompt
rows (a dynamic per-sequence count, so ragged prompts get their own budgets) then the generated
ones. Nothing is padded to the full length, so device memory really shrinks. Everything that
knows this layout is in this file (building the pool, appending + attending in decode, reading a
head's prompt keys, writing refreshed rows); the policy and its drift check go through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.profile_io import Profile
from pallas_kernels import gather_attention


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    full: tuple  # per head: keeps the whole prompt (full role, or r = 1)
    caps: tuple  # prompt slots per head
    segs: tuple  # cap + max_new per head
    starts: tuple
    keep_tables: tuple  # per head: (T+1,) int32 prompt rows kept for each real length
    monitored: tuple  # ((pivot, (satellite, ...)), ...) when refresh applies, in the profile's order
    sats: tuple  # satellites of the layer, in stage-slot order


def layer_plan(prof: Profile, ratio: float, layer: int, t: int, max_new: int) -> LayerPlan:
    """The static layout of ``layer`` for prompts padded to ``t`` tokens and ``max_new`` new ones."""
    hkv = len(prof.roles[layer])
    full = tuple(ratio >= 1.0 or prof.is_full(layer, h) for h in range(hkv))
    caps = tuple(prof.head_budget(layer, h, ratio, t) for h in range(hkv))
    segs = tuple(c + max_new for c in caps)
    starts = tuple(int(x) for x in np.cumsum((0,) + segs[:-1]))
    tables = tuple(np.array([prof.head_budget(layer, h, ratio, n) for n in range(t + 1)], np.int32)
                   for h in range(hkv))
    compressing = ratio < 1.0 and prof.base_budget(ratio, t) >= 1
    monitored = tuple(prof.clusters[layer]) if compressing else ()
    sats = tuple(s for _, ss in monitored for s in ss)
    return LayerPlan(full, caps, segs, starts, tables, monitored, sats)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DriftState:
    """The drift check's state in a layer with monitored pivots (P of them)."""

    qbuf: jax.Array  # (B, steps, P, G, D) buffered post-RoPE decode queries of the pivots' groups
    ref: jax.Array  # (B, P, Kmax) int32 reference set of each pivot (negative sentinels past K_b)
    req: jax.Array  # (B, P, T) f32 the pivot's pooled scores at the last check (the refresh's source)
    flag: jax.Array  # (B, P) bool: refresh requested, not yet applied
    overlap: jax.Array  # (B, P) f32 median overlap measured at the last check
    checks: jax.Array  # (P,) int32 counters
    refreshes: jax.Array  # (P,) int32
    rows_moved: jax.Array  # (P,) int32 rows gathered host -> device (K and V count once)
    thr: jax.Array  # () f32 drift threshold in force (constant unless threshold_mode="rate")
    fired: jax.Array  # (max_new,) bool: a check at that decode step asked for a refresh (for stats)
    ovbuf: Any = None  # (B, steps, P) f32 per-step overlaps (check_impl="spread")
    stage: Any = None  # (k, v) (B, S, T, D) satellites' prompt KV until after_prefill offloads it


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HeteroLayer:
    k: jax.Array  # (B, R, D) ragged pool, see module docstring
    v: jax.Array
    keep: jax.Array  # (B, Hkv) int32 prompt rows kept per head
    drift: DriftState | None = None  # only in layers with monitored pivots
    pages: Any = None  # hetero_pages.PageState: satellites' page key bounds (refresh_by="pages")
    T: int = dataclasses.field(default=0, metadata=dict(static=True))
    max_new: int = dataclasses.field(default=0, metadata=dict(static=True))


def store_prompt(p: LayerPlan, kt, vt, keep, comp: list, pos, mask, max_new: int) -> HeteroLayer:
    """The pool from the prompt's head-major kt, vt (B, Hkv, T, D): full heads keep every row,
    compressed heads ``comp`` the rows at positions ``pos`` (B, len(comp), >= caps) where ``mask``."""
    b, hkv, t, d = kt.shape
    if comp:
        ci = jnp.asarray(comp)
        sel = lambda x: jnp.where(mask[..., None], jnp.take_along_axis(x[:, ci], pos[..., None], 2), 0)  # noqa: E731
        sel_k, sel_v = sel(kt), sel(vt)  # (B, Hc, kc, D)
    ks, vs = [], []
    pad = jnp.zeros((b, max_new, d), kt.dtype)
    for h in range(hkv):
        if p.full[h]:  # every prompt row, in order
            ks.append(kt[:, h])
            vs.append(vt[:, h])
        elif h in comp:
            ks.append(sel_k[:, comp.index(h), : p.caps[h]])
            vs.append(sel_v[:, comp.index(h), : p.caps[h]])
        ks.append(pad)
        vs.append(pad)
    return HeteroLayer(jnp.concatenate(ks, 1), jnp.concatenate(vs, 1), keep, T=t, max_new=max_new)


def append_and_attend(p: LayerPlan, st: HeteroLayer, q, k, v, step):
    """Write the new token's k, v (B, Hkv, D) after each head's rows and attend q (B, Hkv, G, D)
    over every head's valid rows -> (out (B, Hkv, G, D), layer)."""
    b = k.shape[0]
    pos = jnp.asarray(p.starts, jnp.int32)[None, :] + st.keep + step
    bi = jnp.arange(b)[:, None]
    kp = st.k.at[bi, pos].set(k.astype(st.k.dtype))
    vp = st.v.at[bi, pos].set(v.astype(st.v.dtype))
    out = gather_attention(q, kp, vp, st.keep + step + 1, starts=p.starts, capacity=p.segs)
    return out, dataclasses.replace(st, k=kp, v=vp)


def prompt_keys(p: LayerPlan, st: HeteroLayer, heads) -> jax.Array:
    """The prompt slots of full heads ``heads`` -> (B, len(heads), T, D)."""
    return jnp.stack([st.k[:, p.starts[h]: p.starts[h] + st.T] for h in heads], 1)


def write_prompt_rows(p: LayerPlan, st: HeteroLayer, head: int, rows, mask) -> HeteroLayer:
    """Overwrite head ``head``'s prompt slots with ``rows`` = (k, v) (B, caps[head], D) where
    ``mask`` (B, caps[head])."""
    sl = slice(p.starts[head], p.starts[head] + p.caps[head])
    k = st.k.at[:, sl].set(jnp.where(mask[..., None], rows[0].astype(st.k.dtype), st.k[:, sl]))
    v = st.v.at[:, sl].set(jnp.where(mask[..., None], rows[1].astype(st.v.dtype), st.v[:, sl]))
    return dataclasses.replace(st, k=k, v=v)
