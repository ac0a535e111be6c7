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
(shard s owns heads [s Hkv/M, (s+1) Hkv/M)) and both blocks are laid out shard-major, so axis 1
of each splits over ``model`` and every device holds only its own heads' rows. Shards own
different numbers of full heads, so the full block gets Fs = the most any shard owns slots per
shard; a shard with fewer fills its free full-block slots with its compressed heads of the largest
budgets (held there at T rows: the cost of the uniform block) and the rest of its heads go to
the compressed block (Hkv/M - Fs slots per shard, Cmax over those heads only). Every slot holds a
head, none is empty; the bytes a compressed head takes in the full block are counted. M = 1 is
the plain layout above (full heads in the full block, compressed heads in the other).
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
from pallas_kernels.xla import take_static


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    full: tuple  # per head: keeps the whole prompt (full role, or r = 1)
    caps: tuple  # prompt slots per head (its budget at the padded length T)
    keep_tables: tuple  # per head: (T+1,) int32 prompt rows kept for each real length
    monitored: tuple  # ((pivot, (satellite, ...)), ...) when refresh applies, in the profile's order
    sats: tuple  # satellites of the layer, in stage-slot order
    full_heads: tuple  # the heads of the full block, in slot order (compressed ones too if shards > 1)
    comp_heads: tuple  # the heads of the compressed block, in slot order
    slots: tuple  # per head: its slot in its block
    cmax: int  # prompt slots per compressed head (the layer's largest compressed budget)
    shards: int = 1  # devices the KV heads split over (``model``)

    @property
    def head_order(self) -> tuple:
        """Index into (full block heads + compressed block heads) for each head, in head order."""
        return tuple(self.slots[h] + (0 if h in self.full_heads else len(self.full_heads))
                     for h in range(len(self.full)))

    def block(self, head: int) -> str:
        """The block holding ``head``: "full" or "comp"."""
        return "full" if head in self.full_heads else "comp"

    def prompt_slots(self, t: int) -> int:
        """Prompt rows the layer allocates per sequence: F x T + C x Cmax."""
        return len(self.full_heads) * t + len(self.comp_heads) * self.cmax


def _blocks(full: tuple, caps: tuple, shards: int) -> tuple:
    """(full-block heads, compressed-block heads), each in slot order: per shard (contiguous heads)
    the most full heads any shard owns go to the full block, its full heads first, then its
    compressed heads of the largest budgets; each shard's heads in head order within a block."""
    per = len(full) // shards
    owned = [range(s * per, (s + 1) * per) for s in range(shards)]
    width = max(sum(full[h] for h in heads) for heads in owned)
    long_, short = [], []
    for heads in owned:
        ranked = sorted(heads, key=lambda h: (not full[h], -caps[h], h))
        long_ += sorted(ranked[:width])
        short += sorted(ranked[width:])
    return tuple(long_), tuple(short)


def layer_caps(prof: Profile, ratio: float, t: int) -> np.ndarray:
    """(t+1, layers) int32: ``budget_by="layer"``'s prompt rows per compressed head for each real
    length n <= t. Every compressed head of layer l keeps min(n, floor(B x W_l)), W_l the layer's
    largest budget weight, and B solves sum_l C_l min(n, B W_l) = floor((r N - F) n) (C_l the layer's
    compressed heads; layers whose cap reaches n are clamped and the rest re-solved): the blocks,
    padding included, hold the faithful formula's total. The padding to the layer's largest budget
    is filled with tokens and charged, instead of allocated empty and left out of the budget."""
    n = np.arange(t + 1, dtype=np.float64)
    if ratio >= 1.0:
        return np.repeat(n[:, None], len(prof.roles), 1).astype(np.int32)
    count = np.array([sum(not prof.is_full(l, h) for h in range(len(r))) for l, r in enumerate(prof.roles)], float)
    top = np.array([max((w for h, w in enumerate(ws) if not prof.is_full(l, h) and w is not None), default=0.0)
                    for l, ws in enumerate(prof.weights)], float)
    target = np.floor((ratio * prof.num_heads - prof.num_full) * n)  # (t+1,) rows all compressed heads hold
    clamped = np.zeros((t + 1, len(top)), bool)
    for _ in range(len(top) + 1):  # layers whose cap reaches n keep n; the others share the rest
        rest = target - (clamped * count * n[:, None]).sum(1)
        denom = (~clamped * count * top).sum(1)
        base = np.where(denom > 0, rest / np.maximum(denom, 1e-12), 0.0)
        now = clamped | (base[:, None] * top >= n[:, None])
        if (now == clamped).all():
            break
        clamped = now
    caps = np.minimum(np.floor(base[:, None] * top + 1e-9), n[:, None])
    return np.where(count > 0, caps, 0).astype(np.int32)


def layer_plan(prof: Profile, ratio: float, layer: int, t: int, max_new: int, shards: int = 1,
               caps_table: np.ndarray | None = None) -> LayerPlan:
    """The static layout of ``layer`` for prompts padded to ``t`` tokens and ``max_new`` new ones,
    its heads split over ``shards`` devices (which must divide the KV heads). ``caps_table``
    (``layer_caps``) gives every compressed head its layer's cap instead of its own weight's."""
    hkv = len(prof.roles[layer])
    if hkv % shards:
        raise ValueError(f"{shards} shards do not divide the {hkv} KV heads of layer {layer}")
    full = tuple(ratio >= 1.0 or prof.is_full(layer, h) for h in range(hkv))
    if caps_table is None:
        caps = tuple(prof.head_budget(layer, h, ratio, t) for h in range(hkv))
        tables = tuple(np.array([prof.head_budget(layer, h, ratio, n) for n in range(t + 1)], np.int32)
                       for h in range(hkv))
    else:
        column = np.asarray(caps_table[:, layer], np.int32)
        tables = tuple(np.arange(t + 1, dtype=np.int32) if full[h] else column for h in range(hkv))
        caps = tuple(int(x[t]) for x in tables)
    compressing = ratio < 1.0 and prof.base_budget(ratio, t) >= 1
    monitored = tuple(prof.clusters[layer]) if compressing else ()
    sats = tuple(s for _, ss in monitored for s in ss)
    full_heads, comp_heads = _blocks(full, caps, shards)
    slots = tuple((full_heads if h in full_heads else comp_heads).index(h) for h in range(hkv))
    cmax = max((caps[h] for h in comp_heads), default=0)
    return LayerPlan(full, caps, tables, monitored, sats, full_heads, comp_heads, slots, cmax, shards)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DriftState:
    """The drift check's state in a layer with monitored pivots (P of them)."""

    qbuf: Any  # (B, steps, P, G, D) buffered post-RoPE decode queries of the pivots' groups (check_impl
    # "select" / "topk", which score them again at the check; None with "spread", which needs none)
    ref: jax.Array  # (B, P, Kmax) int32 reference set of each pivot (negative sentinels past K_b)
    req: jax.Array  # (B, P, T) f32 the pivot's pooled scores at the last check, the refresh's source
    flag: jax.Array  # (B, P) bool: refresh requested, not yet applied
    overlap: jax.Array  # (B, P) f32 median overlap measured at the last check
    checks: jax.Array  # (P,) int32 counters
    refreshes: jax.Array  # (P,) int32
    rows_moved: jax.Array  # (P,) int32 rows gathered host -> device (K and V count once)
    thr: jax.Array  # () f32 drift threshold in force (constant unless threshold_mode="rate")
    fired: jax.Array  # (max_new,) bool: a check at that decode step asked for a refresh (for stats)
    ovbuf: Any = None  # (B, steps, P) f32 per-step overlaps (check_impl="spread")
    logits: Any = None  # (B, P, G, T) f32 this step's pivot logits, scored in finish_step ("spread")
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
    (B, len(comp), K, D) where ``mask``, K their largest budget; other rows hold zeros."""
    b, hkv, t, d = kt.shape
    new_rows = ((0, 0), (0, 0), (0, max_new), (0, 0))
    sel_k = sel_v = None
    if comp:
        ci = jnp.asarray(comp)
        sel = lambda x: jnp.where(mask[..., None], jnp.take_along_axis(x[:, ci], pos[..., None], 2), 0)  # noqa: E731
        sel_k, sel_v = sel(kt), sel(vt)  # (B, len(comp), K, D)

    def compressed(x, h, rows):  # head h's kept rows (B, rows, D), zeros past them
        if h not in comp:
            return jnp.zeros((b, rows, d), kt.dtype)
        y, k = x[:, comp.index(h)], x.shape[2]
        return y if k == rows else y[:, :rows] if k > rows else jnp.pad(y, ((0, 0), (0, rows - k), (0, 0)))

    if all(p.full[h] for h in p.full_heads):  # the plain layout (always on one device)
        fi = jnp.asarray(p.full_heads, jnp.int32)
        full_k, full_v = (jnp.pad(x[:, fi], new_rows) for x in (kt, vt))
    else:  # a shard's compressed heads fill its free full-block slots
        full_k, full_v = (jnp.pad(jnp.stack([x[:, h] if p.full[h] else compressed(s, h, t) for h in p.full_heads], 1),
                                  new_rows) for x, s in ((kt, sel_k), (vt, sel_v)))
    if comp and p.comp_heads:
        comp_k, comp_v = (jnp.stack([compressed(x, h, p.cmax) for h in p.comp_heads], 1) for x in (sel_k, sel_v))
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
        nb = take_static(n, heads)
        kb = scatter_token(getattr(st, f"{name}_k"), nb, take_static(k, heads))
        vb = scatter_token(getattr(st, f"{name}_v"), nb, take_static(v, heads))
        blocks.update({f"{name}_k": kb, f"{name}_v": vb})
        if name == "full" and logits:
            lh = tuple(p.slots[pv] for pv, _ in p.monitored)
            out, pivot_logits = _block_attention(take_static(q, heads), kb, vb, nb + 1, logit_heads=lh,
                                                 logit_rows=st.T)
        else:
            out = _block_attention(take_static(q, heads), kb, vb, nb + 1)
        outs.append(out)
    out = take_static(jnp.concatenate(outs, 1), p.head_order)
    return out, dataclasses.replace(st, **blocks), pivot_logits


def head_rows(p: LayerPlan, st: HeteroLayer, head: int) -> tuple:
    """Head ``head``'s rows (k, v), each (B, rows, D): its prompt slots then the generated ones."""
    name = p.block(head)
    return getattr(st, f"{name}_k")[:, p.slots[head]], getattr(st, f"{name}_v")[:, p.slots[head]]


def prompt_keys(p: LayerPlan, st: HeteroLayer, heads) -> jax.Array:
    """The prompt slots of full heads ``heads`` -> (B, len(heads), T, D)."""
    return st.full_k[:, jnp.asarray([p.slots[h] for h in heads], jnp.int32), : st.T]


def write_prompt_rows(p: LayerPlan, st: HeteroLayer, head: int, rows, mask) -> HeteroLayer:
    """Overwrite compressed head ``head``'s prompt slots with ``rows`` = (k, v) (B, caps[head], D)
    where ``mask`` (B, caps[head]). A scatter that drops the masked rows: it reads nothing of the
    block back, so XLA writes in place (a where-then-set of the slot's rows made XLA CPU copy the
    whole block in and out, ~5 ms per layer at 16K rows), and on a mesh the slot's owner writes it
    with no traffic."""
    i, name = p.slots[head], p.block(head)
    bk, bv = getattr(st, f"{name}_k"), getattr(st, f"{name}_v")
    k, v = (_scatter_rows(b_, i, r, mask) for b_, r in ((bk, rows[0]), (bv, rows[1])))
    return dataclasses.replace(st, **{f"{name}_k": k, f"{name}_v": v})


def _scatter_rows(block, slot: int, rows, mask):
    """block (B, H, S, D) with rows (B, c, D) written at [:, slot, :c] where mask (B, c); masked
    rows are sent past S and dropped. The batch is a batch dimension of the scatter."""
    b, c = mask.shape
    pos = jnp.where(mask, jnp.arange(c, dtype=jnp.int32), block.shape[2])
    idx = jnp.stack([jnp.full((b, c), slot, jnp.int32), pos], -1)
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(2,), inserted_window_dims=(1, 2),
                                           scatter_dims_to_operand_dims=(1, 2), operand_batching_dims=(0,),
                                           scatter_indices_batching_dims=(0,))
    return jax.lax.scatter(block, idx, rows.astype(block.dtype), dims, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)
