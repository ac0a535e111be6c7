"""HeteroCache: per-head roles from a profile, compressed heads, drift-gated refresh from host.

Storage (REFERENCE.md sections 2-4). Per layer one ragged pool ``k, v`` (B, R, D): KV head h owns
the static segment ``[starts[h], starts[h] + cap[h] + max_new)``: ``cap[h]`` prompt slots (T for
full heads, the formula's budget at the padded length T for compressed ones) then slots for
generated tokens. Sequence b's valid rows of head h are contiguous: ``keep[b, h]`` kept prompt
rows (a dynamic per-sequence count, so ragged prompts get their own budgets) then the
generated ones. Nothing is padded to the full length, so device memory really shrinks.

Drift (section 4). Layers whose pivots have satellites buffer the pivots' decode queries; every
``steps`` steps the decode step itself (on device) scores them against the pivot's prompt keys,
compares top-K sets with the reference set, and on drift stores a refresh request. Outside jit,
``before_step`` of the next step dispatches a jitted refresh that gathers the satellites' new
rows from the host copy (host compute, only the chosen rows cross to the device, inside a
``lax.cond`` so nothing moves without a trigger) and writes them into the satellites' slots.
Nothing reads a device value on the host: lag one step, as the authors' code (check after the
layer's attention at step t, refreshed rows used from step t + 1). The refresh program is
compiled once per shape in ``after_prefill``, so the first refresh does not stall on a compile.
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
from hetero_jax.profile_io import Profile, as_profile
from pallas_kernels import gather_attention, topk_overlap

LAG_STEPS = 1


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
    stage_k: Any = None  # (B, S, T, D) satellites' prompt K until after_prefill moves it to host
    stage_v: Any = None
    T: int = dataclasses.field(default=0, metadata=dict(static=True))
    max_new: int = dataclasses.field(default=0, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HeteroHost:
    kv: tuple  # per layer: None or (k, v) (B, S, T, D) satellites' prompt KV in host memory
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


def _in_position_order(idx, keep):
    """Top-k indices ``idx`` (..., k), best first -> the best ``keep[...]`` of them in position
    order, 0 past ``keep``, and that mask (the authors' masked sort)."""
    m = jnp.arange(idx.shape[-1]) < keep[..., None]
    pos = jnp.sort(jnp.where(m, idx, jnp.iinfo(jnp.int32).max), axis=-1)
    return jnp.where(m, pos, 0), m


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
            pos, m = _in_position_order(jax.lax.top_k(scores[:, ci], kc)[1], keep[:, ci])
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
            stage_k=kt[:, jnp.asarray(p.sats)],
            stage_v=vt[:, jnp.asarray(p.sats)],
        )
        return state

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
        idx = tuple(l for l, x in enumerate(kv) if x is not None)
        if idx:  # compile the refresh now (shapes are known), not at the first check
            _compiled_refresh(self, idx, (tuple(layers[l] for l in idx), tuple(kv[l] for l in idx)))
        return dataclasses.replace(cache, layers=tuple(layers), host=HeteroHost(tuple(kv), 0))

    # ------------------------------------------------------------------ decode
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
            st = self._monitor(p, st, qg, cache)
        return out.reshape(q.shape), st

    def _monitor(self, p: _LayerPlan, st: HeteroLayer, qg, cache: Cache) -> HeteroLayer:
        """Buffer the pivots' queries; every ``steps`` steps run the drift check (on device)."""
        pivots = [pv for pv, _ in p.monitored]
        step = cache.step
        qbuf = st.qbuf.at[:, step % self.steps].set(qg[:, jnp.asarray(pivots)].astype(st.qbuf.dtype))
        t, d = st.T, qg.shape[-1]
        kmax = st.ref.shape[-1]
        plen = cache.lengths - step  # real prompt length per sequence
        kb = jnp.asarray(self._base_table(t))[plen]

        def check(carry):
            ref, req, flag, med, checks, refreshes = carry
            keys = jnp.stack([st.k[:, p.starts[pv]: p.starts[pv] + t] for pv in pivots], 1)  # (B, P, T, D)
            s = jnp.einsum("bwpgd,bptd->bwpgt", qbuf.astype(jnp.float32), keys.astype(jnp.float32)) / math.sqrt(d)
            inside = jnp.arange(t)[None, :] < plen[:, None]
            s = jnp.where(inside[:, None, None, None, :], s, NEG_INF)
            scores = _group_max_scores(jax.nn.softmax(s, -1), plen[:, None, None])  # (B, W, P, T)
            idx = jax.lax.top_k(scores, kmax)[1]  # (B, W, P, Kmax)
            r = jnp.arange(kmax)
            inb = r[None, :] < kb[:, None]  # (B, Kmax)
            cur = jnp.where(inb[:, None, None, :], idx, -1 - r)
            ov = topk_overlap(cur, ref[:, None]) * (kmax / jnp.maximum(kb, 1))[:, None, None]  # (B, W, P)
            if self.trigger == "batch":
                med = jnp.broadcast_to(jnp.median(ov.mean(0), axis=0), flag.shape)
            else:
                med = jnp.median(ov, axis=1)
            trig = med < self.threshold
            new_ref = jnp.where(inb[:, None, :], idx[:, -1], -1 - kmax - r).astype(jnp.int32)
            ref = jnp.where(trig[..., None], new_ref, ref)
            return ref, scores[:, -1], trig, med.astype(jnp.float32), checks + 1, refreshes + trig.any(0).astype(jnp.int32)

        carry = (st.ref, st.req, st.flag, st.overlap, st.checks, st.refreshes)
        carry = jax.lax.cond((step + 1) % self.steps == 0, check, lambda c: c, carry)
        ref, req, flag, med, checks, refreshes = carry
        return dataclasses.replace(st, qbuf=qbuf, ref=ref, req=req, flag=flag, overlap=med, checks=checks,
                                   refreshes=refreshes)

    # ------------------------------------------------------------------ refresh (outside jit)
    def before_step(self, cache: Cache) -> Cache:
        """After a check step, dispatch the refresh of triggered satellites (never blocks)."""
        h = cache.host
        if not isinstance(h, HeteroHost):
            return cache
        n = h.steps_seen
        cache = dataclasses.replace(cache, host=dataclasses.replace(h, steps_seen=n + 1))
        if n == 0 or n % self.steps:
            return cache
        idx = tuple(l for l, kv in enumerate(h.kv) if kv is not None)
        if not idx:
            return cache
        return self.refresh(cache, idx)

    def refresh(self, cache: Cache, layers: tuple) -> Cache:
        """Apply pending refresh requests of ``layers`` (asynchronous dispatch)."""
        args = (tuple(cache.layers[l] for l in layers), tuple(cache.host.kv[l] for l in layers))
        new = _compiled_refresh(self, layers, args)(*args)
        out = list(cache.layers)
        for l, st in zip(layers, new):
            out[l] = st
        return dataclasses.replace(cache, layers=tuple(out))

    def _refresh_layer(self, layer: int, st: HeteroLayer, kv, host_kind, dev) -> HeteroLayer:
        p = self.plan(layer, st.T, st.max_new)
        hk, hv = kv
        b = st.k.shape[0]
        for pi, (_, sats) in enumerate(p.monitored):
            live = [j for j in sats if p.caps[j] > 0]
            if not live:
                continue

            def do(st, pi=pi, live=live):
                flag = st.flag[:, pi]
                k, v = st.k, st.v
                kc = max(p.caps[j] for j in live)
                keeps = st.keep[:, jnp.asarray(live)]  # (B, S)
                idx = jax.lax.top_k(st.req[:, pi], kc)[1][:, None]  # (B, 1, kc): one top-k per pivot
                if self.refresh_select == "authors":  # the top max-keep by position, each takes a prefix
                    pos, _ = _in_position_order(idx, keeps.max(1, keepdims=True))
                    pos = jnp.broadcast_to(pos, keeps.shape + (kc,))
                    m = jnp.arange(kc)[None, None, :] < keeps[..., None]
                    pos = jnp.where(m, pos, 0)
                else:
                    pos, m = _in_position_order(jnp.broadcast_to(idx, keeps.shape + (kc,)), keeps)
                for i, j in enumerate(live):  # each satellite moves exactly its cap_j rows
                    cap = p.caps[j]
                    slot = jnp.asarray([p.sats.index(j)])
                    rows_k, rows_v = _gather_rows(hk, hv, slot, pos[:, i:i + 1, :cap], host_kind, dev)
                    w = (m[:, i, :cap] & flag[:, None])[..., None]
                    sl = slice(p.starts[j], p.starts[j] + cap)
                    k = k.at[:, sl].set(jnp.where(w, rows_k[:, 0].astype(k.dtype), k[:, sl]))
                    v = v.at[:, sl].set(jnp.where(w, rows_v[:, 0].astype(v.dtype), v[:, sl]))
                moved = st.rows_moved.at[pi].add(b * sum(p.caps[j] for j in live))
                return dataclasses.replace(st, k=k, v=v, rows_moved=moved, flag=st.flag.at[:, pi].set(False))

            st = jax.lax.cond(st.flag[:, pi].any(), do, lambda s: s, st)
        return st

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
            "lag_steps": LAG_STEPS, "counts": self._profile().counts(),
            "prompt_slots_device": prompt_slots,
            "prompt_slots_full": st0.T * sum(len(r) for r in self.roles),
            "checks": sum(x["checks"] for x in per_pivot),
            "refreshes": sum(x["refreshes"] for x in per_pivot),
            "bytes_moved": sum(x["bytes_moved"] for x in per_pivot),
            "refreshes_per_layer": per_layer,
            "per_pivot": per_pivot,
            "host_prompt_bytes": array_bytes(cache.host),
        })
        return out


def _gather_rows(hk, hv, slots, pos, host_kind, dev):
    """Rows ``pos`` (B, S, C) of satellite slots ``slots`` (S,) from the (B, S_all, T, D) prompt
    copy -> device (B, S, C, D).

    With a host copy (``host_kind`` given) the gather runs as host compute and only the gathered
    rows are put on the device; otherwise (no host memory kind) it is a plain device gather.
    """
    b, s, c = pos.shape
    d = hk.shape[-1]
    bi = jnp.broadcast_to(jnp.arange(b)[:, None, None], pos.shape)
    si = jnp.broadcast_to(slots[None, :, None], pos.shape)
    idx = jnp.stack([bi, si, pos], -1).astype(jnp.int32)
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(3,), collapsed_slice_dims=(0, 1, 2), start_index_map=(0, 1, 2))

    def gather(x, i):
        return jax.lax.gather(x, i, dn, slice_sizes=(1, 1, 1, d), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)

    if host_kind is None:
        return gather(hk, idx), gather(hv, idx)
    try:  # a context manager in jax 0.10, a function transform later: the call form works in both
        from jax.experimental.compute_on import compute_on
    except ImportError:  # no host compute: bring the copy over whole, then gather (moves more bytes)
        return gather(jax.device_put(hk, dev), idx), gather(jax.device_put(hv, dev), idx)
    hidx = jax.device_put(idx, dev.with_memory_kind(host_kind))
    rk, rv = compute_on("device_host")(lambda a, b_, i: (gather(a, i), gather(b_, i)))(hk, hv, hidx)
    return jax.device_put(rk, dev), jax.device_put(rv, dev)


_REFRESH: dict = {}


def _compiled_refresh(policy: HeteroCache, layers: tuple, args):
    """The refresh program for these layers and shapes, compiled once (ahead of time, from
    ``after_prefill``, so the first refresh does not stall decoding on a compile)."""
    states, kvs = args
    kinds = tuple(kv[0].sharding.memory_kind if is_host_array(kv[0]) else None for kv in kvs)
    dev = states[0].k.sharding
    avals = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args))
    key = (policy, layers, kinds, dev, jax.tree.structure(args), avals)
    if key not in _REFRESH:
        def run(states, kvs):
            return tuple(policy._refresh_layer(l, st, kv, h, dev) for l, st, kv, h in zip(layers, states, kvs, kinds))

        if len(_REFRESH) > 16:
            _REFRESH.clear()
        _REFRESH[key] = jax.jit(run, donate_argnums=(0,)).lower(*args).compile()
    return _REFRESH[key]
