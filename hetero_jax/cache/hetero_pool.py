"""HeteroCache's device storage: the static per-layer plan and two uniform blocks per layer.

Layout (REFERENCE.md sections 2-3). Per layer the full heads (pivot, volatile; every head at
r = 1) form one block ``full_k, full_v`` (B, F, T + max_new, D) and the compressed heads
(anchor, satellite) another, ``comp_k, comp_v`` (B, C, Cmax + max_new, D), Cmax the largest
compressed budget of the layer at the padded length T. Head h lives in slot ``slots[h]`` of its
block (a gatherable head -> (block, slot) map). Sequence b's valid rows of head h are contiguous:
``keep[b, h]`` kept prompt rows (a dynamic per-sequence count, so ragged prompts get their own
budgets) then the generated ones. Each block is one batched attention with per-head lengths and
no mask over other heads' rows; each head's softmax runs inside its own block, so the two
blocks' outputs are put back in head order and need no merge. Device bytes are what the blocks
allocate: F x T + C x Cmax prompt rows (the padding of the compressed heads to Cmax is counted).

On a mesh with ``model`` = M > 1 (``shards``) the KV heads split contiguously as the params' do
(shard s owns heads [s Hkv/M, (s+1) Hkv/M)) and each block is laid out shard-major: F = M x Fs,
Fs the most full heads any shard owns in the layer (C = M x Cs likewise), shard s's heads in slots
[s Fs, s Fs + its count), the rest empty (slot head -1: zeros, length 0, writes dropped, outputs
never read). Axis 1 of each block then splits over ``model`` and every device holds its own
heads' rows; the empty slots are allocated device bytes and are counted. M = 1 is the plain layout.
Everything that knows this layout is in this file (building the blocks, appending + attending in
decode, reading a head's rows, writing refreshed rows); the policy and its drift check go
through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.cache.base import scatter_token
from hetero_jax.profile_io import Profile
from pallas_kernels import gather_attention


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    full: tuple  # per head: keeps the whole prompt (full role, or r = 1)
    caps: tuple  # prompt slots per head (its budget at the padded length T)
    keep_tables: tuple  # per head: (T+1,) int32 prompt rows kept for each real length
    monitored: tuple  # ((pivot, (satellite, ...)), ...) when refresh applies, in the profile's order
    sats: tuple  # satellites of the layer, in stage-slot order
    full_heads: tuple  # the heads of the full block, in slot order (-1: an empty slot, shards > 1)
    comp_heads: tuple  # the heads of the compressed block, in slot order (-1: empty)
    slots: tuple  # per head: its slot in its block
    cmax: int  # prompt slots per compressed head (the layer's largest compressed budget)
    shards: int = 1  # devices the KV heads split over (``model``)

    @property
    def head_order(self) -> tuple:
        """Index into (full block heads + compressed block heads) for each head, in head order."""
        return tuple(self.slots[h] + (0 if self.full[h] else len(self.full_heads)) for h in range(len(self.full)))

    def prompt_slots(self, t: int) -> int:
        """Prompt rows the layer allocates per sequence: F x T + C x Cmax."""
        return len(self.full_heads) * t + len(self.comp_heads) * self.cmax


def _shard_major(heads: list, hkv: int, shards: int) -> tuple:
    """A block's heads in slot order: each shard's own heads, padded with -1 to the most any
    shard has (the heads themselves when shards = 1)."""
    per = hkv // shards
    groups = [[h for h in heads if h // per == s] for s in range(shards)]
    n = max(len(g) for g in groups)
    return tuple(x for g in groups for x in g + [-1] * (n - len(g)))


def layer_plan(prof: Profile, ratio: float, layer: int, t: int, max_new: int, shards: int = 1) -> LayerPlan:
    """The static layout of ``layer`` for prompts padded to ``t`` tokens and ``max_new`` new ones,
    its heads split over ``shards`` devices (which must divide the KV heads)."""
    hkv = len(prof.roles[layer])
    full = tuple(ratio >= 1.0 or prof.is_full(layer, h) for h in range(hkv))
    caps = tuple(prof.head_budget(layer, h, ratio, t) for h in range(hkv))
    tables = tuple(np.array([prof.head_budget(layer, h, ratio, n) for n in range(t + 1)], np.int32)
                   for h in range(hkv))
    compressing = ratio < 1.0 and prof.base_budget(ratio, t) >= 1
    monitored = tuple(prof.clusters[layer]) if compressing else ()
    sats = tuple(s for _, ss in monitored for s in ss)
    if hkv % shards:
        raise ValueError(f"{shards} shards do not divide the {hkv} KV heads of layer {layer}")
    full_heads = _shard_major([h for h in range(hkv) if full[h]], hkv, shards)
    comp_heads = _shard_major([h for h in range(hkv) if not full[h]], hkv, shards)
    slots = tuple((full_heads if full[h] else comp_heads).index(h) for h in range(hkv))
    cmax = max((caps[h] for h in comp_heads if h >= 0), default=0)
    return LayerPlan(full, caps, tables, monitored, sats, full_heads, comp_heads, slots, cmax, shards)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DriftState:
    """The drift check's state in a layer with monitored pivots (P of them)."""

    qbuf: jax.Array  # (B, steps, P, G, D) buffered post-RoPE decode queries of the pivots' groups
    ref: jax.Array  # (B, P, Kmax) int32 reference set of each pivot (negative sentinels past K_b)
    req: jax.Array  # (B, P, T) f32 the pivot's pooled scores at the last check, the refresh's source
    # ("spread": this step's scores, written every step; after a check step they are the check's)
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
    full_k: jax.Array  # (B, F, T + max_new, D) full heads' block, see module docstring
    full_v: jax.Array
    comp_k: jax.Array  # (B, C, Cmax + max_new, D) compressed heads' block
    comp_v: jax.Array
    keep: jax.Array  # (B, Hkv) int32 prompt rows kept per head
    drift: DriftState | None = None  # only in layers with monitored pivots
    pages: Any = None  # hetero_pages.PageState: satellites' page key bounds (refresh_by="pages")
    T: int = dataclasses.field(default=0, metadata=dict(static=True))
    max_new: int = dataclasses.field(default=0, metadata=dict(static=True))
    shards: int = dataclasses.field(default=1, metadata=dict(static=True))  # the plan's ``shards``


def store_prompt(p: LayerPlan, kt, vt, keep, comp: list, pos, mask, max_new: int) -> HeteroLayer:
    """The blocks from the prompt's head-major kt, vt (B, Hkv, T, D): full heads keep every row,
    compressed heads ``comp`` (those with prompt slots) the rows at positions ``pos``
    (B, len(comp), Cmax) where ``mask``; other rows hold zeros."""
    b, hkv, t, d = kt.shape
    new_rows = ((0, 0), (0, 0), (0, max_new), (0, 0))
    fi = jnp.asarray(p.full_heads, jnp.int32)
    full_k, full_v = (jnp.pad(x[:, fi], new_rows) for x in (kt, vt))
    if -1 in p.full_heads:  # empty slots (shards > 1) hold zeros
        real = jnp.asarray(np.array(p.full_heads) >= 0)[None, :, None, None]
        full_k, full_v = (jnp.where(real, x, 0) for x in (full_k, full_v))
    if comp:
        ci = jnp.asarray(comp)
        sel = lambda x: jnp.where(mask[..., None], jnp.take_along_axis(x[:, ci], pos[..., None], 2), 0)  # noqa: E731
        sel_k, sel_v = sel(kt), sel(vt)  # (B, len(comp), Cmax, D)
        zeros = jnp.zeros((b, p.cmax, d), kt.dtype)
        comp_k, comp_v = (jnp.stack([x[:, comp.index(h)] if h in comp else zeros for h in p.comp_heads], 1)
                          for x in (sel_k, sel_v))
    else:
        comp_k = comp_v = jnp.zeros((b, len(p.comp_heads), p.cmax, d), kt.dtype)
    comp_k, comp_v = (jnp.pad(x, new_rows) for x in (comp_k, comp_v))
    return HeteroLayer(full_k, full_v, comp_k, comp_v, keep, T=t, max_new=max_new, shards=p.shards)


def _block_attention(q, kb, vb, lengths, logit_heads=None, logit_rows=None):
    """gather_attention over a uniform block (B, H, S, D): one free reshape, head h at h * S."""
    b, h, s, d = kb.shape
    return gather_attention(q, kb.reshape(b, h * s, d), vb.reshape(b, h * s, d), lengths,
                            starts=tuple(i * s for i in range(h)), capacity=(s,) * h,
                            logit_heads=logit_heads, logit_rows=logit_rows)


def append_and_attend(p: LayerPlan, st: HeteroLayer, q, k, v, step, logits: bool = False):
    """Write the new token's k, v (B, Hkv, D) after each head's rows and attend q (B, Hkv, G, D)
    over every head's valid rows -> (out (B, Hkv, G, D), layer, pivot logits). With ``logits``
    the full block's attention also returns the monitored pivots' scaled q.k over their first T
    rows, (B, P, G, T) (-inf past each head's rows): the drift check's scores come from this pass."""
    n = st.keep + step  # (B, Hkv): the new row's index in each head's rows
    outs, blocks, pivot_logits = [], {}, None
    for name, heads in (("full", p.full_heads), ("comp", p.comp_heads)):
        if not heads:
            continue
        hi = jnp.asarray(heads, jnp.int32)
        rows, length = n[:, hi], n[:, hi] + 1
        if -1 in heads:  # empty slots (shards > 1): the write is dropped (row past S), nothing attended
            empty = jnp.asarray(np.array(heads) < 0)[None, :]
            rows = jnp.where(empty, getattr(st, f"{name}_k").shape[2], rows)
            length = jnp.where(empty, 0, length)
        kb = scatter_token(getattr(st, f"{name}_k"), rows, k[:, hi])
        vb = scatter_token(getattr(st, f"{name}_v"), rows, v[:, hi])
        blocks.update({f"{name}_k": kb, f"{name}_v": vb})
        if name == "full" and logits:
            lh = tuple(p.slots[pv] for pv, _ in p.monitored)
            out, pivot_logits = _block_attention(q[:, hi], kb, vb, length, logit_heads=lh, logit_rows=st.T)
        else:
            out = _block_attention(q[:, hi], kb, vb, length)
        outs.append(out)
    out = jnp.concatenate(outs, 1)
    if len(outs) > 1 or p.full_heads != tuple(range(len(p.full))):
        out = out[:, jnp.asarray(p.head_order, jnp.int32)]
    return out, dataclasses.replace(st, **blocks), pivot_logits


def head_rows(p: LayerPlan, st: HeteroLayer, head: int) -> tuple:
    """Head ``head``'s rows (k, v), each (B, rows, D): its prompt slots then the generated ones."""
    name = "full" if p.full[head] else "comp"
    return getattr(st, f"{name}_k")[:, p.slots[head]], getattr(st, f"{name}_v")[:, p.slots[head]]


def prompt_keys(p: LayerPlan, st: HeteroLayer, heads) -> jax.Array:
    """The prompt slots of full heads ``heads`` -> (B, len(heads), T, D)."""
    return st.full_k[:, jnp.asarray([p.slots[h] for h in heads], jnp.int32), : st.T]


def write_prompt_rows(p: LayerPlan, st: HeteroLayer, head: int, rows, mask) -> HeteroLayer:
    """Overwrite compressed head ``head``'s prompt slots with ``rows`` = (k, v) (B, caps[head], D)
    where ``mask`` (B, caps[head])."""
    i, c = p.slots[head], p.caps[head]
    k = st.comp_k.at[:, i, :c].set(jnp.where(mask[..., None], rows[0].astype(st.comp_k.dtype), st.comp_k[:, i, :c]))
    v = st.comp_v.at[:, i, :c].set(jnp.where(mask[..., None], rows[1].astype(st.comp_v.dtype), st.comp_v[:, i, :c]))
    return dataclasses.replace(st, comp_k=k, comp_v=v)
