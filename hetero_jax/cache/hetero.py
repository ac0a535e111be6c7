"""HeteroCache: per-head roles from a profile, compressed heads, drift-gated refresh from host.

Storage (REFERENCE.md sections 2-4). Per layer one ragged pool ``k, v`` (B, R, D): KV head h owns
the static segment ``[starts[h], starts[h] + cap[h] + max_new)``: ``cap[h]`` prompt slots (T for
full heads, the formula's budget at the padded length T for compressed ones) then slots for
generated tokens. Sequence b's valid rows of head h are contiguous: ``keep[b, h]`` kept prompt
rows (a dynamic per-sequence count, so ragged prompts get their own budgets) then the
generated ones. Nothing is padded to the full length, so device memory really shrinks.

Drift (section 4). Layers whose pivots have satellites buffer the pivots' decode queries; every
``steps`` steps the decode step itself (on device) compares the top-K sets of the window's pooled
scores over the pivot's prompt keys with the reference set, and on drift stores a refresh request.
Outside jit, ``before_step`` of the next step dispatches a jitted refresh that gathers the
satellites' new rows from the host copy (host compute, only the chosen rows cross to the device,
inside a ``lax.cond`` so nothing moves without a trigger) and writes them into the satellites'
slots. Nothing reads a device value on the host. The refresh programs are compiled in
``after_prefill``, so the first refresh does not stall on a compile.

Options beyond the reference (defaults keep its behaviour; hetero_drift.py has the arithmetic):

* ``check_impl``: how the overlap is computed, all exact (the same sets as ``lax.top_k``, ties
  to the lowest position). "spread" (default): each step scores its own query and stores its
  overlap, so a check step only takes a median (the same numbers as computing them at the check:
  the reference set only changes at checks); "select": all at the check step; "topk": the
  original sort-based top-k + set intersection. The top-k list of a new reference set is built
  only when a trigger fires.
* ``stagger``: layer l checks at steps s with (s + 1 - l % steps) % steps == 0 (and a full window),
  the same frequency per pivot with the cost spread over steps; off by default since the windows
  (and so the decisions) of most layers move.
* ``lag``: 1 (the authors: a trigger at step t, rows used from step t + 1; the refresh serialises
  before step t + 1); 2: the rows are selected (device) and gathered (host) while step t + 1 runs
  and written before step t + 2.
* ``select_window``: 1 (the reference: the last prompt query picks the compressed heads' tokens);
  w > 1: SnapKV's rule for them, the last w queries vote and their own tokens are always kept.
  The pivots' reference sets stay the last query's (the drift check is unchanged).
* ``threshold_mode``: "fixed" (``threshold``) or "rate": the threshold of the pivots checked together
  is steered after every check towards refreshing ``target_rate`` of pivot checks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.attention import NEG_INF, last_rows, pool5, query_scores
from hetero_jax.cache.base import Cache, CachePolicy, array_bytes, is_host_array
from hetero_jax.cache.hetero_drift import (compact_positions, in_position_order, out_shapes, program, ref_overlap,
                                          topk_mask)
from hetero_jax.cache.selection import forced_scores, window_votes
from hetero_jax.profile_io import Profile, as_profile
from pallas_kernels import gather_attention, topk_overlap


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HeteroLayer:
    k: jax.Array  # (B, R, D) ragged pool, see module docstring
    v: jax.Array
    keep: jax.Array  # (B, Hkv) int32 prompt rows kept per head
    # Only in layers with monitored pivots (P of them), else None:
    qbuf: Any = None  # (B, steps, P, G, D) buffered post-RoPE decode queries of the pivots' groups
    ref: Any = None  # (B, P, Kmax) int32 reference sets (negative sentinels past K_b)
    req: Any = None  # (B, P, T) f32 pivot's pooled scores at the last check (refresh source)
    flag: Any = None  # (B, P) bool: refresh requested, not yet applied
    overlap: Any = None  # (B, P) f32 median overlap measured at the last check (per sequence or batch)
    checks: Any = None  # (P,) int32 counters
    refreshes: Any = None  # (P,) int32
    rows_moved: Any = None  # (P,) int32 rows gathered host -> device (K and V count once)
    thr: Any = None  # () f32 drift threshold in force (constant unless threshold_mode="rate")
    ovbuf: Any = None  # (B, steps, P) f32 per-step overlaps (check_impl="spread")
    fired: Any = None  # (max_new,) bool: a check at that decode step asked for a refresh (for stats)
    stage_k: Any = None  # (B, S, T, D) satellites' prompt K until after_prefill moves it to host
    stage_v: Any = None
    T: int = dataclasses.field(default=0, metadata=dict(static=True))
    max_new: int = dataclasses.field(default=0, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HeteroHost:
    kv: tuple  # per layer: None or (k, v) (B, S, T, D) satellites' prompt KV in host memory
    pending: Any = None  # lag 2: per layer None or (selection, rows) fetched, written next step
    steps_seen: int = dataclasses.field(default=0, metadata=dict(static=True))  # before_step calls


@dataclasses.dataclass(frozen=True)
class _LayerPlan:
    full: tuple  # per head: keeps the whole prompt (full role, or r = 1)
    caps: tuple  # prompt slots per head
    segs: tuple  # cap + max_new per head
    starts: tuple
    keep_tables: tuple  # per head: (T+1,) int32 prompt rows kept for each real length
    monitored: tuple  # ((pivot, (satellite, ...)), ...) when refresh applies
    sats: tuple  # satellites of the layer, in stage-slot order


def _host_kind() -> str | None:
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    return next((k for k in ("pinned_host", "unpinned_host") if k in kinds), None)


def _group_max_scores(probs, prompt_len):
    """probs (..., G, T) -> pool5 per query head, max over the group, -inf past the prompt."""
    pooled = pool5(probs).max(-2)
    inside = jnp.arange(pooled.shape[-1]) < prompt_len[..., None]  # prompt_len broadcasts to pooled[..., 0]
    return jnp.where(inside, pooled, NEG_INF)


@dataclasses.dataclass(frozen=True)
class HeteroCache(CachePolicy):
    name: ClassVar[str] = "hetero"
    roles: tuple = ()
    weights: tuple = ()
    clusters: tuple = ()
    ratio: float = 0.5
    steps: int = 5
    threshold: float = 0.5  # drift trigger: median overlap below it refreshes
    trigger: str = "batch"  # "batch": batch-mean overlap (authors); "sequence": per sequence
    refresh_select: str = "topk"  # "topk": top cap_j (REFERENCE); "authors": prefix of top max cap
    check_impl: str = "spread"  # "spread" | "select" | "topk" (module docstring)
    stagger: bool = False  # layer l checks at phase l % steps
    lag: int = 1  # steps from a check to the step that first uses the refreshed rows (1 or 2)
    select_window: int = 1  # prompt queries that pick compressed heads' tokens (1: the reference)
    threshold_mode: str = "fixed"  # "fixed" | "rate"
    target_rate: float = 0.15  # "rate": fraction of pivot checks that refresh
    rate_gain: float = 0.2  # "rate": threshold change per check per unit rate error
    offload: bool = True
    prefill_chunk: int = 512
    profile_name: str = ""

    @classmethod
    def create(cls, cfg, ratio=None, profile=None, params=None, **options) -> "HeteroCache":
        """``profile``: None (the shipped profile for ``cfg``), a path, a dict or a Profile;
        ``params``, when given, are checked against the profile's weights digest too."""
        prof = as_profile(profile, cfg)
        if params is not None:
            prof.check_model(cfg, params)
        ratio = 0.5 if ratio is None else ratio
        prof.check_ratio(ratio)
        allowed = {f.name for f in dataclasses.fields(cls)} - {"roles", "weights", "clusters", "ratio", "profile_name"}
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"unknown hetero cache options {sorted(unknown)}; see HeteroCache's fields")
        return cls(roles=prof.roles, weights=prof.weights, clusters=prof.clusters, ratio=float(ratio),
                   profile_name=str(prof.model.get("name", "")), **options)

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold (drift) must be in [0, 1], got {self.threshold}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps (decode steps between drift checks) must be an int >= 1, got {self.steps!r}")
        if self.trigger not in ("batch", "sequence"):
            raise ValueError(f"trigger must be 'batch' or 'sequence', got {self.trigger!r}")
        if self.refresh_select not in ("topk", "authors"):
            raise ValueError(f"refresh_select must be 'topk' or 'authors', got {self.refresh_select!r}")
        if self.check_impl not in ("spread", "select", "topk"):
            raise ValueError(f"check_impl must be 'spread', 'select' or 'topk', got {self.check_impl!r}")
        if self.lag not in (1, 2):
            raise ValueError(f"lag (steps from a check to the refreshed rows' use) must be 1 or 2, got {self.lag!r}")
        if not (isinstance(self.select_window, int) and self.select_window >= 1):
            raise ValueError(f"select_window (prompt queries voting for kept tokens) must be an int >= 1, "
                             f"got {self.select_window!r}")
        if self.threshold_mode not in ("fixed", "rate"):
            raise ValueError(f"threshold_mode must be 'fixed' or 'rate', got {self.threshold_mode!r}")
        if not (0.0 < self.target_rate < 1.0 and self.rate_gain > 0.0):
            raise ValueError(f"need 0 < target_rate < 1 and rate_gain > 0, got {self.target_rate}, {self.rate_gain}")
        if self.roles:
            self._profile().check_ratio(self.ratio)

    # ------------------------------------------------------------------ static plan
    def _profile(self) -> Profile:
        return Profile(model={}, params={}, roles=self.roles, stability=(), weights=self.weights,
                       clusters=self.clusters)

    @functools.lru_cache(maxsize=64)
    def plan(self, layer: int, t: int, max_new: int) -> _LayerPlan:
        prof = self._profile()
        hkv = len(self.roles[layer])
        full = tuple(self.ratio >= 1.0 or prof.is_full(layer, h) for h in range(hkv))
        caps = tuple(prof.head_budget(layer, h, self.ratio, t) for h in range(hkv))
        segs = tuple(c + max_new for c in caps)
        starts = tuple(int(x) for x in np.cumsum((0,) + segs[:-1]))
        tables = tuple(
            np.array([prof.head_budget(layer, h, self.ratio, n) for n in range(t + 1)], np.int32) for h in range(hkv)
        )
        compressing = self.ratio < 1.0 and prof.base_budget(self.ratio, t) >= 1
        monitored = tuple(self.clusters[layer]) if compressing else ()
        sats = tuple(s for _, ss in monitored for s in ss)
        return _LayerPlan(full, caps, segs, starts, tables, monitored, sats)

    @functools.lru_cache(maxsize=8)
    def _base_table(self, t: int) -> np.ndarray:
        return np.array([self._profile().base_budget(self.ratio, n) for n in range(t + 1)], np.int32)

    # ------------------------------------------------------------------ prefill
    def build_layer(self, layer, q, k, v, lengths, max_new_tokens):
        b, t, hkv, d = k.shape
        p = self.plan(layer, t, max_new_tokens)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
        need_scores = not all(p.full) or p.monitored
        if need_scores:
            probs = query_scores(last_rows(q, lengths, 1), k, lengths)[:, :, :, 0]  # (B, Hkv, G, T)
            scores = _group_max_scores(probs, lengths[:, None])  # (B, Hkv, T)
        keep = jnp.stack([jnp.asarray(p.keep_tables[h])[lengths] for h in range(hkv)], 1).astype(jnp.int32)
        comp = [h for h in range(hkv) if not p.full[h] and p.caps[h]]
        if comp:  # all compressed heads of the layer in one top-k and one gather
            ci = jnp.asarray(comp)
            kc = max(p.caps[h] for h in comp)
            sel_scores = scores if self.select_window == 1 else self._window_scores(q, k, lengths, keep[:, ci])
            pos, m = in_position_order(jax.lax.top_k(sel_scores[:, ci], kc)[1], keep[:, ci])
            sel = lambda x: jnp.where(m[..., None], jnp.take_along_axis(x[:, ci], pos[..., None], 2), 0)  # noqa: E731
            sel_k, sel_v = sel(kt), sel(vt)  # (B, Hc, kc, D)
        ks, vs = [], []
        pad = jnp.zeros((b, max_new_tokens, d), k.dtype)
        for h in range(hkv):
            if p.full[h]:  # every prompt row, in order
                ks.append(kt[:, h])
                vs.append(vt[:, h])
            elif h in comp:
                ks.append(sel_k[:, comp.index(h), : p.caps[h]])
                vs.append(sel_v[:, comp.index(h), : p.caps[h]])
            ks.append(pad)
            vs.append(pad)
        state = HeteroLayer(jnp.concatenate(ks, 1), jnp.concatenate(vs, 1), keep, T=t, max_new=max_new_tokens)
        if not p.monitored:
            return state
        pivots = [pv for pv, _ in p.monitored]
        npv, g, kmax = len(pivots), q.shape[2] // hkv, int(self._base_table(t)[t])
        kb = jnp.asarray(self._base_table(t))[lengths]
        idx = jax.lax.top_k(scores[:, jnp.asarray(pivots)], kmax)[1]  # (B, P, Kmax)
        r = jnp.arange(kmax)
        state = dataclasses.replace(
            state,
            qbuf=jnp.zeros((b, self.steps, npv, g, d), q.dtype),
            ref=jnp.where(r < kb[:, None, None], idx, -1 - kmax - r).astype(jnp.int32),
            req=jnp.zeros((b, npv, t), jnp.float32),
            flag=jnp.zeros((b, npv), bool),
            overlap=jnp.ones((b, npv), jnp.float32),
            checks=jnp.zeros((npv,), jnp.int32),
            refreshes=jnp.zeros((npv,), jnp.int32),
            rows_moved=jnp.zeros((npv,), jnp.int32),
            fired=jnp.zeros((max(max_new_tokens, 1),), bool),
            thr=jnp.asarray(self.threshold, jnp.float32),
            ovbuf=jnp.ones((b, self.steps, npv), jnp.float32) if self.check_impl == "spread" else None,
            stage_k=kt[:, jnp.asarray(p.sats)],
            stage_v=vt[:, jnp.asarray(p.sats)],
        )
        return state

    def _window_scores(self, q, k, lengths, keeps):
        """select_window > 1 (beyond the reference): SnapKV's rule for the compressed heads. The last
        ``w`` prompt queries vote (causal softmax summed over the rows, pool5, group max) and the
        window's own tokens are always kept, w clipped to the smallest compressed budget of the
        sequence so every head keeps its whole window."""
        w = jnp.minimum(self.select_window, keeps.min(1))  # (B,)
        votes = window_votes(q, k, lengths, self.select_window, 5, "max", w)
        return forced_scores(votes, lengths, lengths - w)

    def after_prefill(self, cache: Cache) -> Cache:
        """Move the satellites' prompt KV to host memory (asynchronous device_put)."""
        kind = _host_kind() if self.offload else None
        if kind is None and self.offload:
            warnings.warn("backend has no host memory kind: satellites' prompt KV stays in device memory",
                          stacklevel=2)
        kv, layers = [], []
        for st in cache.layers:
            if st.stage_k is None:
                kv.append(None)
                layers.append(st)
                continue
            move = (lambda x: jax.device_put(x, x.sharding.with_memory_kind(kind))) if kind else (lambda x: x)
            kv.append((move(st.stage_k), move(st.stage_v)))
            layers.append(dataclasses.replace(st, stage_k=None, stage_v=None))
        host = HeteroHost(tuple(kv), None, 0)
        for n in range(self.steps if self.stagger else 1):  # compile the refresh programs now, not at a check
            due = self._due(host, n + self.steps)
            if due:
                self._refresh_programs(tuple(layers), host, due)
        return dataclasses.replace(cache, layers=tuple(layers), host=host)

    # ------------------------------------------------------------------ decode
    def _phase(self, layer: int) -> int:
        return layer % self.steps if self.stagger else 0

    def decode_layer(self, layer, st: HeteroLayer, q, k, v, cache: Cache):
        p = self.plan(layer, st.T, st.max_new)
        b, hkv, d = k.shape
        step = cache.step
        pos = jnp.asarray(p.starts, jnp.int32)[None, :] + st.keep + step
        bi = jnp.arange(b)[:, None]
        kp = st.k.at[bi, pos].set(k.astype(st.k.dtype))
        vp = st.v.at[bi, pos].set(v.astype(st.v.dtype))
        qg = q.reshape(b, hkv, -1, d)
        out = gather_attention(qg, kp, vp, st.keep + step + 1, starts=p.starts, capacity=p.segs)
        st = dataclasses.replace(st, k=kp, v=vp)
        if p.monitored:
            st = self._monitor(layer, p, st, qg, cache)
        return out.reshape(q.shape), st

    def _pivot_scores(self, p: _LayerPlan, st: HeteroLayer, plen, q):
        """q (B, W, P, G, D) pivots' queries -> (B, W, P, T) pooled group-max softmax over the prompt."""
        t, d = st.T, q.shape[-1]
        keys = jnp.stack([st.k[:, p.starts[pv]: p.starts[pv] + t] for pv, _ in p.monitored], 1)  # (B, P, T, D)
        s = jnp.einsum("bwpgd,bptd->bwpgt", q.astype(jnp.float32), keys.astype(jnp.float32)) / math.sqrt(d)
        inside = jnp.arange(t)[None, :] < plen[:, None]
        s = jnp.where(inside[:, None, None, None, :], s, NEG_INF)
        return _group_max_scores(jax.nn.softmax(s, -1), plen[:, None, None])

    def _monitor(self, layer: int, p: _LayerPlan, st: HeteroLayer, qg, cache: Cache) -> HeteroLayer:
        """Buffer the pivots' queries; every ``steps`` steps run the drift check (on device)."""
        pivots = jnp.asarray([pv for pv, _ in p.monitored])
        step, n = cache.step, self.steps
        slot = step % n
        qbuf = st.qbuf.at[:, slot].set(qg[:, pivots].astype(st.qbuf.dtype))
        kmax = st.ref.shape[-1]
        plen = cache.lengths - step  # real prompt length per sequence
        kb = jnp.asarray(self._base_table(st.T))[plen]
        r = jnp.arange(kmax)
        inb = r[None, :] < kb[:, None]  # (B, Kmax)
        ovbuf = st.ovbuf
        if self.check_impl == "spread":  # this step's share of the check: its own query's overlap
            now = self._pivot_scores(p, st, plen, qbuf[:, slot][:, None])[:, 0]  # (B, P, T)
            now_top = topk_mask(now, kb[:, None])
            ovbuf = ovbuf.at[:, slot].set(ref_overlap(now_top, st.ref, kb))

        def check(carry):
            ref, req, flag, med, checks, refreshes, fired = carry
            if self.check_impl == "spread":
                ov, last, last_top = ovbuf, now, now_top
            else:
                s = self._pivot_scores(p, st, plen, qbuf)  # (B, W, P, T)
                last = jnp.take(s, slot, axis=1)
                if self.check_impl == "select":
                    top = topk_mask(s, kb[:, None, None])
                    ov, last_top = ref_overlap(top, ref[:, None], kb), jnp.take(top, slot, axis=1)
                else:  # the original: top-k index lists and their intersection
                    cur = jnp.where(inb[:, None, None, :], jax.lax.top_k(s, kmax)[1], -1 - r)
                    ov = topk_overlap(cur, ref[:, None]) * (kmax / jnp.maximum(kb, 1))[:, None, None]  # (B, W, P)
            if self.trigger == "batch":
                med = jnp.broadcast_to(jnp.median(ov.mean(0), axis=0), flag.shape)
            else:
                med = jnp.median(ov, axis=1)
            trig = med < st.thr

            def new_ref(ref):  # the new set as an index list (position order), built on a trigger only
                if self.check_impl == "topk":
                    idx = jnp.where(inb[:, None, :], jax.lax.top_k(last, kmax)[1], -1 - kmax - r)
                else:
                    idx = compact_positions(last_top, kmax, -1 - kmax - r)
                return jnp.where(trig[..., None], idx, ref).astype(jnp.int32)

            ref = jax.lax.cond(trig.any(), new_ref, lambda x: x, ref)
            fired = fired.at[step].set(trig.any(), mode="drop")
            return (ref, last, trig, med.astype(jnp.float32), checks + 1, refreshes + trig.any(0).astype(jnp.int32),
                    fired)

        carry = (st.ref, st.req, st.flag, st.overlap, st.checks, st.refreshes, st.fired)
        carry = jax.lax.cond(self._checks_at(layer, step), check, lambda c: c, carry)
        ref, req, flag, med, checks, refreshes, fired = carry
        return dataclasses.replace(st, qbuf=qbuf, ref=ref, req=req, flag=flag, overlap=med, checks=checks,
                                   refreshes=refreshes, ovbuf=ovbuf, fired=fired)

    def _checks_at(self, layer: int, step):
        """Whether layer ``layer`` runs its drift check in decode step ``step`` (traced or int)."""
        k = step + 1 - self._phase(layer)
        return (k % self.steps == 0) & (k > 0)

    # ------------------------------------------------------------------ refresh (outside jit)
    def _due(self, host: HeteroHost, n: int) -> tuple:
        """Monitored layers whose check ran at decode step n - 1."""
        return tuple(l for l, kv in enumerate(host.kv)
                     if kv is not None and n - self._phase(l) > 0 and (n - self._phase(l)) % self.steps == 0)

    def before_step(self, cache: Cache) -> Cache:
        """After a layer's check step, dispatch its refresh (lag 1) or its fetch, written one step
        later (lag 2). Never blocks."""
        h = cache.host
        if not isinstance(h, HeteroHost):
            return cache
        n, pending = h.steps_seen, h.pending
        h = dataclasses.replace(h, steps_seen=n + 1, pending=None)
        cache = dataclasses.replace(cache, host=h)
        due = self._due(h, n)
        if self.lag == 1:
            return self.refresh(cache, due) if due else cache
        new = None
        if due:  # select (device, reads the state) then gather (host): the gather runs alongside step n
            states = tuple(cache.layers[l] for l in due)
            kvs = tuple(h.kv[l] for l in due)
            select, fetch, _ = self._refresh_programs(cache.layers, h, due)
            sel = select(tuple((s.req, s.flag, s.keep) for s in states))
            got = dict(zip(due, zip(sel, fetch(sel, kvs))))
            new = tuple(got.get(l) for l in range(len(cache.layers)))
        if pending is not None:
            idx = tuple(l for l, x in enumerate(pending) if x is not None)
            apply = self._refresh_programs(cache.layers, h, idx)[2]
            out = list(cache.layers)
            states = apply(tuple(out[l] for l in idx), tuple(pending[l] for l in idx))
            for l, st in zip(idx, states):
                out[l] = st
            cache = dataclasses.replace(cache, layers=tuple(out))
        return dataclasses.replace(cache, host=dataclasses.replace(cache.host, pending=new))

    def refresh(self, cache: Cache, layers: tuple) -> Cache:
        """Apply pending refresh requests of ``layers`` now (asynchronous dispatch)."""
        args = (tuple(cache.layers[l] for l in layers), tuple(cache.host.kv[l] for l in layers))
        new = self._refresh_programs(cache.layers, cache.host, layers)(*args)
        out = list(cache.layers)
        for l, st in zip(layers, new):
            out[l] = st
        return dataclasses.replace(cache, layers=tuple(out))

    def _refresh_programs(self, states, host: HeteroHost, layers: tuple):
        """Compiled (once per shape) refresh of ``layers`` (lag 1), or (select, fetch, apply) (lag 2)."""
        st, kvs = tuple(states[l] for l in layers), tuple(host.kv[l] for l in layers)
        kinds = tuple(kv[0].sharding.memory_kind if is_host_array(kv[0]) else None for kv in kvs)
        dev = st[0].k.sharding
        env = (self, tuple((l, s.T, s.max_new) for l, s in zip(layers, st)), kinds, dev)
        if self.lag == 1:
            return program(env, "refresh", (st, kvs), (0,))
        src = (tuple((s.req, s.flag, s.keep) for s in st),)
        sel = out_shapes(env, "select", src)
        rows = out_shapes(env, "fetch", (sel, kvs))
        return (program(env, "select", src), program(env, "fetch", (sel, kvs)),
                program(env, "apply", (st, tuple(zip(sel, rows))), (0,)))

    # ------------------------------------------------------------------ stats
    def stats(self, cache: Cache) -> dict:
        out = super().stats(cache)
        per_pivot, per_layer = [], [0] * len(cache.layers)
        d = cache.layers[0].k.shape[-1]
        row_bytes = 2 * d * cache.layers[0].k.dtype.itemsize
        for l, st in enumerate(cache.layers):
            if st.checks is None:
                continue
            p = self.plan(l, st.T, st.max_new)
            c, r, m = (np.asarray(x).tolist() for x in (st.checks, st.refreshes, st.rows_moved))
            for i, (pv, sats) in enumerate(p.monitored):
                per_pivot.append({"layer": l, "pivot": pv, "satellites": list(sats), "checks": c[i],
                                  "refreshes": r[i], "bytes_moved": m[i] * row_bytes})
                per_layer[l] += r[i]
        st0 = cache.layers[0]
        prompt_slots = sum(sum(self.plan(l, st.T, st.max_new).caps) for l, st in enumerate(cache.layers))
        out.update({
            "ratio": self.ratio, "profile": self.profile_name, "steps": self.steps, "threshold": self.threshold,
            "lag_steps": self.lag, "check_impl": self.check_impl, "stagger": self.stagger,
            "threshold_mode": self.threshold_mode, "counts": self._profile().counts(),
            "thresholds": [float(st.thr) if st.thr is not None else None for st in cache.layers],
            "prompt_slots_device": prompt_slots,
            "prompt_slots_full": st0.T * sum(len(r) for r in self.roles),
            "checks": sum(x["checks"] for x in per_pivot),
            "refreshes": sum(x["refreshes"] for x in per_pivot),
            "bytes_moved": sum(x["bytes_moved"] for x in per_pivot),
            "refreshes_per_layer": per_layer,
            "per_pivot": per_pivot,
            "host_prompt_bytes": array_bytes(cache.host.kv) if isinstance(cache.host, HeteroHost) else 0,
        })
        out.update(self._step_masks(cache))
        return out

    def _step_masks(self, cache: Cache) -> dict:
        """Per decode step (0 = the first after prefill): did a check run in it, and was a refresh
        dispatched before it (a check in the step before fired). For bench.decode's step timing."""
        monitored = [(l, st) for l, st in enumerate(cache.layers) if st.fired is not None]
        if not monitored:
            return {}
        n = monitored[0][1].max_new
        check = [any(bool(self._checks_at(l, i)) for l, _ in monitored) for i in range(n)]
        fired = np.any([np.asarray(st.fired)[:n] for _, st in monitored], axis=0)
        refresh = [False] + [bool(x) for x in fired[:-1]]
        return {"check_step_mask": check, "refresh_step_mask": refresh}
