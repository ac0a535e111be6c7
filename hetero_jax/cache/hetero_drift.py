"""Drift-check arithmetic of the hetero policy (exact top-k membership without a sort, the overlap
with a reference set, the adaptive threshold controller) and its host-dispatched refresh programs.

Top-k membership. The overlap |top-K(s) ∩ ref| / K needs no top-k index list: a reference member
r is in the top K exactly when s[r] is above the K-th largest score, or equal to it and among the
first ``need`` tied positions (``lax.top_k``'s order: ties go to the lowest index). The K-th
largest value is found by a radix select on the float's order-preserving uint32 key (32 passes
of compare + count over T, most significant bit first: the largest key x with #{key >= x} >= K),
the tied positions by a second radix select on the position (ceil(log2 T) passes). Both are
exact: the result equals the set ``lax.top_k`` returns, ties included, at ~45 vectorised passes
over T instead of a sort.

Adaptive threshold ("rate"). The paper's fixed threshold (0.5) sets no bound on transfers and
means different things for different models and contexts. The rate controller instead takes a
target fraction of refreshing pivot checks and adjusts one threshold, shared by the pivots checked
together, after every check (an integral controller):

    thr <- clip(thr + gain * (target - fired), 0, 1),   fired = fraction of those pivots refreshing

Refreshes go to the pivots whose overlap is lowest at the time. Summing the update over n checks
gives |mean(fired) - target| = |thr_n - thr_0| / (gain * n) <= 1 / (gain * n) while thr stays
inside [0, 1]: the long-run refresh rate reaches the target (unless overlaps sit at exactly 1 or
the target asks for more than every check). Deterministic: a pure function of the overlaps.
The gain trades the start-up transient (thr starts at ``threshold`` and moves at most gain x
target per check) against jitter (gain x the spread of the fired fraction); the default 0.2 with
30 pivots (SmolLM2) settles within ~5 checks.

Refresh programs (dispatched by ``HeteroCache.before_step``, compiled once per shape). lag 1:
"refresh" selects (top cap_j of the pivot's last scores), gathers on the host and writes, per
triggered pivot, before the step after the check. lag 2: "select" (device; reads the state and
returns new arrays only, so the next decode step, which donates the state, waits on nothing
else), "fetch" (host gather + copy to the device, independent of that decode step, so the two
can run at once) and, one step later, "apply" (writes the rows). The rate controller runs in
"refresh" / "apply", over the pivots checked together.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hetero_jax.host_compute import on_host


def sortable_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same total order as ``lax.top_k`` (-0.0 just below +0.0; no NaNs)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def kth_largest_key(u: jax.Array, k: jax.Array) -> jax.Array:
    """u (..., T) uint32, k (...) int -> (...) uint32: the k-th largest of u (k >= 1)."""

    def bit(i, pre):
        cand = pre | jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        return jnp.where((u >= cand[..., None]).sum(-1) >= k, cand, pre)

    return jax.lax.fori_loop(0, 32, bit, jnp.zeros(u.shape[:-1], jnp.uint32))


def topk_mask(s: jax.Array, k: jax.Array) -> jax.Array:
    """s (..., T) float, k (...) int in [0, T] -> bool (..., T): the k largest entries, ties to the
    lowest positions, i.e. exactly the set ``lax.top_k(s, k)`` picks (for k = 0: none)."""
    t = s.shape[-1]
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), s.shape[:-1])
    u = sortable_key(s)
    v = kth_largest_key(u, jnp.maximum(k, 1))[..., None]
    gt, eq = u > v, u == v
    need = (k - gt.sum(-1))[..., None]  # >= 1 tied entries to take, lowest positions first
    pos = jnp.arange(t, dtype=jnp.int32)
    nb = max(1, (t - 1).bit_length())

    def bit(i, pre):  # the largest x with #{tied positions < x} < need: the need-th tied position
        cand = pre | jnp.left_shift(jnp.int32(1), (nb - 1 - i).astype(jnp.int32))
        return jnp.where((eq & (pos < cand)).sum(-1, keepdims=True) < need, cand, pre)

    last = jax.lax.fori_loop(0, nb, bit, jnp.zeros(need.shape, jnp.int32))
    return (gt | (eq & (pos <= last))) & (k[..., None] > 0)


def ref_overlap(mask: jax.Array, ref: jax.Array, kb: jax.Array) -> jax.Array:
    """|ref ∩ top| / max(kb, 1): mask (B, ..., T) bool (the current top-kb), ref (B, ..., Kmax) int
    (valid members >= 0, negative sentinels), kb (B,) -> (B, ...) float32."""
    ref = jnp.broadcast_to(ref, mask.shape[:-1] + ref.shape[-1:])
    hit = jnp.take_along_axis(mask, jnp.maximum(ref, 0), axis=-1) & (ref >= 0)
    kb = kb.reshape(kb.shape + (1,) * (hit.ndim - 2))
    return hit.sum(-1).astype(jnp.float32) / jnp.maximum(kb, 1).astype(jnp.float32)


def rate_update(thr: jax.Array, fired: jax.Array, target: float, gain: float) -> jax.Array:
    """One controller step: thr (scalar), fired (n,) bool of the pivots just checked."""
    f = jnp.mean(fired.astype(jnp.float32))
    return jnp.clip(thr + gain * (target - f), 0.0, 1.0).astype(jnp.float32)


def compact_positions(mask: jax.Array, size: int, fill: jax.Array | int = 0) -> jax.Array:
    """mask (..., T) bool -> (..., size) int32: the positions of its first ``size`` set entries in
    increasing order, ``fill`` (broadcast to (..., size)) after them."""
    lead, t = mask.shape[:-1], mask.shape[-1]
    m = mask.reshape(-1, t)
    rank = jnp.cumsum(m, -1, dtype=jnp.int32) - 1
    tgt = jnp.where(m & (rank < size), rank, size)  # the rest lands in a dropped column
    out = jnp.zeros((m.shape[0], size + 1), jnp.int32)
    out = out.at[jnp.arange(m.shape[0])[:, None], tgt].set(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), m.shape))
    n = jnp.minimum(m.sum(-1, keepdims=True), size)
    out = jnp.where(jnp.arange(size) < n, out[:, :size], -1).reshape(lead + (size,))
    return jnp.where(out < 0, jnp.broadcast_to(jnp.asarray(fill, jnp.int32), out.shape), out)


def in_position_order(idx, keep):
    """Top-k indices ``idx`` (..., k), best first -> the best ``keep[...]`` of them in position
    order, 0 past ``keep``, and that mask (the authors' masked sort)."""
    m = jnp.arange(idx.shape[-1]) < keep[..., None]
    pos = jnp.sort(jnp.where(m, idx, jnp.iinfo(jnp.int32).max), axis=-1)
    return jnp.where(m, pos, 0), m


# ---------------------------------------------------------------- refresh programs (outside jit)
def live_clusters(p):
    """(pivot index, satellites with prompt slots) of a layer's clusters that have any."""
    out = [(pi, [j for j in sats if p.caps[j] > 0]) for pi, (_, sats) in enumerate(p.monitored)]
    return [(pi, live) for pi, live in out if live]


def select_rows(policy, p, src, pi: int, live) -> tuple:
    """Pivot pi's refresh from ``src`` = (req, flag, keep): prompt positions (B, S, kc) per live
    satellite, in position order, and the valid mask (B, S, kc) of the triggered sequences (top
    cap_j of the pivot's last scores)."""
    req, flag, keep = src
    kc = max(p.caps[j] for j in live)
    keeps = keep[:, jnp.asarray(live)]  # (B, S)
    idx = jax.lax.top_k(req[:, pi], kc)[1][:, None]  # (B, 1, kc): one top-k per pivot
    if policy.refresh_select == "authors":  # the top max-keep by position, each takes a prefix
        pos, _ = in_position_order(idx, keeps.max(1, keepdims=True))
        pos = jnp.broadcast_to(pos, keeps.shape + (kc,))
        m = jnp.arange(kc)[None, None, :] < keeps[..., None]
        pos = jnp.where(m, pos, 0)
    else:
        pos, m = in_position_order(jnp.broadcast_to(idx, keeps.shape + (kc,)), keeps)
    return pos, m & flag[:, pi, None, None]


def fetch_rows(p, kv, pos, live, host_kind, dev) -> tuple:
    """Each live satellite's cap_j rows at ``pos`` from the host copy -> ((B, cap_j, D) k, v) each."""
    out = []
    for i, j in enumerate(live):  # each satellite moves exactly its cap_j rows
        slot = jnp.asarray([p.sats.index(j)])
        rk, rv = gather_rows(kv[0], kv[1], slot, pos[:, i:i + 1, : p.caps[j]], host_kind, dev)
        out.append((rk[:, 0], rv[:, 0]))
    return tuple(out)


def write_rows(p, st, pi: int, live, rows, w):
    k, v = st.k, st.v
    for i, j in enumerate(live):
        cap = p.caps[j]
        sl = slice(p.starts[j], p.starts[j] + cap)
        k = k.at[:, sl].set(jnp.where(w[:, i, :cap, None], rows[i][0].astype(k.dtype), k[:, sl]))
        v = v.at[:, sl].set(jnp.where(w[:, i, :cap, None], rows[i][1].astype(v.dtype), v[:, sl]))
    moved = st.rows_moved.at[pi].add(k.shape[0] * sum(p.caps[j] for j in live))
    return dataclasses.replace(st, k=k, v=v, rows_moved=moved)


def control(policy, states, fired):
    """threshold_mode "rate": one controller step for the pivots just checked."""
    if policy.threshold_mode != "rate":
        return states
    thr = rate_update(jnp.mean(jnp.stack([s.thr for s in states])), jnp.concatenate(fired), policy.target_rate,
                      policy.rate_gain)
    return tuple(dataclasses.replace(s, thr=thr) for s in states)


def run_program(policy, name, layers, kinds, dev, args):
    """The bodies of the host-dispatched programs; ``layers``: (layer, T, max_new) each."""
    plans = [policy.plan(*x) for x in layers]
    if name == "refresh":  # lag 1: select, gather and write in one program, per triggered pivot
        states, kvs = args
        states = control(policy, states, [s.flag.any(0) for s in states])
        out = []
        for p, st, kv, kind in zip(plans, states, kvs, kinds):
            for pi, live in live_clusters(p):
                def do(st, p=p, pi=pi, live=live, kv=kv, kind=kind):
                    pos, w = select_rows(policy, p, (st.req, st.flag, st.keep), pi, live)
                    st = write_rows(p, st, pi, live, fetch_rows(p, kv, pos, live, kind, dev), w)
                    return dataclasses.replace(st, flag=st.flag.at[:, pi].set(False))

                st = jax.lax.cond(st.flag[:, pi].any(), do, lambda s: s, st)
            out.append(st)
        return tuple(out)
    if name == "select":  # lag 2, device: new arrays only, so the next step waits on nothing else
        out = []
        for p, st in zip(plans, args[0]):  # st = (req, flag, keep)
            sel = []
            for pi, live in live_clusters(p):
                def pick(st, p=p, pi=pi, live=live):
                    return select_rows(policy, p, st, pi, live)

                sel.append(jax.lax.cond(st[1][:, pi].any(), pick, _zeros_like(pick, st), st))
            out.append((tuple(sel), st[1].any(0)))
        return tuple(out)
    if name == "fetch":  # lag 2, host gather (runs while the next decode step computes)
        out = []
        for p, (sel, _), kv, kind in zip(plans, args[0], args[1], kinds):
            rows = []
            for (pi, live), (pos, w) in zip(live_clusters(p), sel):
                def get(pos, p=p, live=live, kv=kv, kind=kind):
                    return fetch_rows(p, kv, pos, live, kind, dev)

                rows.append(jax.lax.cond(w.any(), get, _zeros_like(get, pos), pos))
            out.append(tuple(rows))
        return tuple(out)
    states, pending = args  # "apply", lag 2: write the fetched rows one step after the select
    states = control(policy, states, [fired for (_, fired), _ in pending])
    out = []
    for p, st, ((sel, fired), rows) in zip(plans, states, pending):
        for (pi, live), (_, w), rw in zip(live_clusters(p), sel, rows):
            def put(st, p=p, pi=pi, live=live, rw=rw, w=w):
                return write_rows(p, st, pi, live, rw, w)

            st = jax.lax.cond(fired[pi], put, lambda s: s, st)
        out.append(st)
    return tuple(out)


def _zeros_like(fn, *args):
    """The other branch of a ``lax.cond`` around ``fn``: zeros of its output shapes."""
    shapes = jax.eval_shape(fn, *args)
    return lambda *_: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def gather_rows(hk, hv, slots, pos, host_kind, dev):
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
    hidx = jax.device_put(idx, dev.with_memory_kind(host_kind))
    rows = on_host(lambda a, b_, i: (gather(a, i), gather(b_, i)), hk, hv, hidx)  # hetero_jax/host_compute.py
    if rows is None:  # no host compute: bring the copy over whole, then gather (moves more bytes)
        return gather(jax.device_put(hk, dev), idx), gather(jax.device_put(hv, dev), idx)
    return jax.device_put(rows[0], dev), jax.device_put(rows[1], dev)


_PROGRAMS: dict = {}


def _key(env, name, args):
    return env, name, jax.tree.structure(args), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args))


def out_shapes(env, name: str, args):
    """Program ``name``'s outputs as ShapeDtypeStructs (to compile its consumer ahead of time)."""
    key = ("shapes",) + _key(env, name, args)
    if key not in _PROGRAMS:
        policy, layers, kinds, dev = env
        out = jax.eval_shape(lambda *a: run_program(policy, name, layers, kinds, dev, a), *args)
        _PROGRAMS[key] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), out)
    return _PROGRAMS[key]


def program(env, name: str, args, donate=()):
    """The jitted program ``name`` of ``env`` = (policy, layers, host memory kinds, device) for these
    argument shapes, compiled once (ahead of time from ``after_prefill``, so no refresh stalls on it)."""
    key = _key(env, name, args)
    if key not in _PROGRAMS:
        policy, layers, kinds, dev = env

        def run(*a):
            return run_program(policy, name, layers, kinds, dev, a)

        if len(_PROGRAMS) > 128:
            _PROGRAMS.clear()
        _PROGRAMS[key] = jax.jit(run, donate_argnums=donate).lower(*args).compile()
    return _PROGRAMS[key]
