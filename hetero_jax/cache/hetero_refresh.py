"""HeteroCache's host side: satellites' prompt KV in host memory and the refresh programs,
dispatched between decode steps without ever blocking (REFERENCE.md section 4).

``offload`` (after_prefill) moves each monitored layer's satellite prompt KV to host memory and
compiles the refresh programs, so no refresh stalls on a compile. ``dispatch`` (before_step) runs
them after a layer's check step, each jitted and compiled once per shape. lag 1, ``_refresh``:
per triggered pivot, select the satellites' rows from the pivot's last scores, gather them from
the host copy (host compute: only the chosen rows cross to the device, inside a ``lax.cond`` so
nothing moves without a trigger) and write them before the next step. lag 2: ``_select`` (device;
returns new arrays only, so the next decode step, which donates the state, waits on nothing
else), ``_fetch`` (host gather, running beside that step) and, a step later, ``_apply``.

``refresh_select`` "authors" (default, as their code): the pivot's top max_j cap_j positions by
score, in position order; satellite j takes the first cap_j. "topk": each satellite the pivot's
top cap_j by score, a deliberate deviation: the authors' rule drops the newest prompt tokens
(often the question) from the smaller satellite. The rate controller runs in ``_refresh`` /
``_apply``, over the pivots checked together.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from hetero_jax.cache import hetero_pages
from hetero_jax.cache.base import Cache, compiled, host_memory_kind, is_host_array, on_host, to_memory
from hetero_jax.cache.hetero_drift import rate_update
from hetero_jax.cache.hetero_monitor import checks_at
from hetero_jax.cache.hetero_pool import write_prompt_rows
from hetero_jax.cache.topk_select import topk_positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HeteroHost:
    kv: tuple  # per layer: None or (k, v) (B, S, T, D) satellites' prompt KV in host memory
    pending: Any = None  # lag 2: per layer None or (selection, rows) fetched, written next step
    steps_seen: int = dataclasses.field(default=0, metadata=dict(static=True))  # before_step calls


def offload(policy, cache: Cache) -> Cache:
    """Move the satellites' prompt KV to host memory (asynchronous) and compile the refresh programs."""
    kind = host_memory_kind(cache.layers[0].full_k) if policy.offload else None
    if kind is None and policy.offload:
        warnings.warn("backend has no host memory kind: satellites' prompt KV stays in device memory", stacklevel=3)
    kv, layers = [], []
    for st in cache.layers:
        stage = st.drift.stage if st.drift is not None else None
        kv.append(None if stage is None else tuple(to_memory(x, kind) for x in stage) if kind else stage)
        layers.append(st if stage is None else dataclasses.replace(st, drift=dataclasses.replace(st.drift, stage=None)))
    host = HeteroHost(tuple(kv), None, 0)
    for n in range(policy.steps if policy.stagger else 1):  # compile now, not at the first check
        due = _due(policy, host, n + policy.steps)
        if due:
            _programs(policy, tuple(layers), host, due)
    return dataclasses.replace(cache, layers=tuple(layers), host=host)


def _due(policy, host: HeteroHost, n: int) -> tuple:
    """Monitored layers whose check ran at decode step n - 1."""
    return tuple(l for l, kv in enumerate(host.kv) if kv is not None and checks_at(policy, l, n - 1))


def dispatch(policy, cache: Cache) -> Cache:
    """After a layer's check step, dispatch its refresh (lag 1) or its fetch, written one step
    later (lag 2). Never blocks."""
    h = cache.host
    if not isinstance(h, HeteroHost):
        return cache
    n, pending = h.steps_seen, h.pending
    h = dataclasses.replace(h, steps_seen=n + 1, pending=None)
    cache = dataclasses.replace(cache, host=h)
    due = _due(policy, h, n)
    if policy.lag == 1:
        return refresh(policy, cache, due) if due else cache
    new = None
    if due:  # select (device, reads the state) then gather (host): the gather runs alongside step n
        select, fetch, _ = _programs(policy, cache.layers, h, due)
        sel = select(tuple(_source(cache.layers[l]) for l in due))
        got = dict(zip(due, zip(sel, fetch(sel, tuple(h.kv[l] for l in due)))))
        new = tuple(got.get(l) for l in range(len(cache.layers)))
    if pending is not None:
        idx = tuple(l for l, x in enumerate(pending) if x is not None)
        apply = _programs(policy, cache.layers, h, idx)[2]
        cache = _put(cache, idx, apply(tuple(cache.layers[l] for l in idx), tuple(pending[l] for l in idx)))
    return dataclasses.replace(cache, host=dataclasses.replace(cache.host, pending=new))


def refresh(policy, cache: Cache, layers: tuple) -> Cache:
    """Apply the pending refresh requests of ``layers`` now (lag 1; asynchronous dispatch)."""
    run = _programs(policy, cache.layers, cache.host, layers)
    return _put(cache, layers, run(tuple(cache.layers[l] for l in layers), tuple(cache.host.kv[l] for l in layers)))


def _put(cache: Cache, layers: tuple, states) -> Cache:
    out = list(cache.layers)
    for l, st in zip(layers, states):
        out[l] = st
    return dataclasses.replace(cache, layers=tuple(out))


def _source(st):
    return (st.drift.req if st.pages is None else st.pages), st.drift.flag, st.keep


def _programs(policy, states, host: HeteroHost, layers: tuple):
    """The compiled refresh of ``layers`` (lag 1), or (select, fetch, apply) (lag 2)."""
    st, kvs = tuple(states[l] for l in layers), tuple(host.kv[l] for l in layers)
    kinds = tuple(kv[0].sharding.memory_kind if is_host_array(kv[0]) else None for kv in kvs)
    dev = st[0].drift.flag.sharding  # batch-first, split over ``data`` only: where gathered rows go
    env = (policy, tuple((l, s.T, s.max_new, s.shards) for l, s in zip(layers, st)), kinds, dev)
    if policy.lag == 1:
        return compiled(_jit(_refresh, env, (0,)), st, kvs)
    src = tuple(_source(s) for s in st)
    select = compiled(_jit(_select, env), src)
    fetch = compiled(_jit(_fetch, env), select.out_info, kvs)
    return select, fetch, compiled(_jit(_apply, env, (0,)), st, tuple(zip(select.out_info, fetch.out_info)))


@functools.lru_cache(maxsize=64)
def _jit(program, env, donate=()):
    return jax.jit(functools.partial(program, env), donate_argnums=donate)


# ---------------------------------------------------------------- the programs (traced)
def _live(p):
    """(pivot index, satellites with prompt slots) of a layer's clusters that have any."""
    out = [(pi, [j for j in sats if p.caps[j] > 0]) for pi, (_, sats) in enumerate(p.monitored)]
    return [(pi, live) for pi, live in out if live]


def _select_rows(policy, p, src, pi: int, live) -> tuple:
    """Pivot pi's refresh from ``src`` = (req, flag, keep): prompt positions (B, S, kc) per live
    satellite, in position order, and the valid mask (B, S, kc) of the triggered sequences."""
    req, flag, keep = src
    if policy.refresh_by == "pages":  # each satellite by its own query (hetero_pages)
        return hetero_pages.select_rows(policy, p, req, flag, keep, pi, live)
    req = hetero_pages.forced_request(policy, req)  # sink / recent tokens, when asked for
    kc = max(p.caps[j] for j in live)
    keeps = keep[:, jnp.asarray(live)]  # (B, S)
    # the positions of a top-k set in position order: a histogram select, not lax.top_k's sort
    if policy.refresh_select == "authors":  # the top max-keep by position, each takes a prefix
        pos, _ = topk_positions(req[:, pi][:, None], keeps.max(1, keepdims=True), kc)  # (B, 1, kc)
        pos = jnp.broadcast_to(pos, keeps.shape + (kc,))
        m = jnp.arange(kc)[None, None, :] < keeps[..., None]
        pos = jnp.where(m, pos, 0)
    else:  # each satellite its own top keep_j
        pos, m = topk_positions(jnp.broadcast_to(req[:, pi][:, None], keeps.shape + req.shape[-1:]), keeps, kc)
    return pos, m & flag[:, pi, None, None]


def _fetch_rows(p, kv, pos, live, host_kind, dev, w=None) -> tuple:
    """Each live satellite's cap_j rows at ``pos`` from the host copy -> ((B, cap_j, D) k, v) each.
    With ``w`` (refresh_when "own"), only the satellites with a row to write move theirs."""
    out = []
    for i, j in enumerate(live):  # each satellite moves exactly its cap_j rows
        slot = jnp.asarray([p.sats.index(j)])

        def get(at, slot=slot):
            rk, rv = _gather_rows(kv[0], kv[1], slot, at, host_kind, dev)
            return rk[:, 0], rv[:, 0]

        at = pos[:, i:i + 1, : p.caps[j]]
        out.append(get(at) if w is None else jax.lax.cond(w[:, i].any(), get, _zeros_like(get, at), at))
    return tuple(out)


def _write_rows(p, st, pi: int, live, rows, w, own: bool = False):
    for i, j in enumerate(live):
        st = write_prompt_rows(p, st, j, rows[i], w[:, i, : p.caps[j]])
    moves = [w[:, i].any().astype(jnp.int32) if own else 1 for i in range(len(live))]  # own: only fired ones moved
    moved = st.drift.rows_moved.at[pi].add(st.keep.shape[0] * sum(m * p.caps[j] for m, j in zip(moves, live)))
    return dataclasses.replace(st, drift=dataclasses.replace(st.drift, rows_moved=moved))


def _control(policy, states, fired):
    """threshold_mode "rate": one controller step for the pivots just checked."""
    if policy.threshold_mode != "rate":
        return states
    thr = rate_update(jnp.mean(jnp.stack([s.drift.thr for s in states])), jnp.concatenate(fired),
                      policy.target_rate, policy.rate_gain)
    return tuple(dataclasses.replace(s, drift=dataclasses.replace(s.drift, thr=thr)) for s in states)


def _plans(env):
    policy, layers, _, _ = env
    return [policy.plan(*x) for x in layers]


def _refresh(env, states, kvs):
    """lag 1: select, gather and write in one program, per triggered pivot."""
    policy, _, kinds, dev = env
    states = _control(policy, states, [s.drift.flag.any(0) for s in states])
    out = []
    for p, st, kv, kind in zip(_plans(env), states, kvs, kinds):
        for pi, live in _live(p):
            def do(st, p=p, pi=pi, live=live, kv=kv, kind=kind):
                pos, w = _select_rows(policy, p, _source(st), pi, live)
                own = policy.refresh_when == "own"
                rows = _fetch_rows(p, kv, pos, live, kind, dev, w if own else None)
                st = _write_rows(p, st, pi, live, rows, w, own)
                flag = st.drift.flag.at[:, pi].set(False)
                return dataclasses.replace(st, drift=dataclasses.replace(st.drift, flag=flag))

            st = jax.lax.cond(st.drift.flag[:, pi].any(), do, lambda s: s, st)
        out.append(st)
    return tuple(out)


def _select(env, srcs):
    """lag 2, device: new arrays only, so the next decode step waits on nothing else."""
    policy = env[0]
    out = []
    for p, src in zip(_plans(env), srcs):  # src = (req, flag, keep)
        sel = []
        for pi, live in _live(p):
            def pick(src, p=p, pi=pi, live=live):
                return _select_rows(policy, p, src, pi, live)

            sel.append(jax.lax.cond(src[1][:, pi].any(), pick, _zeros_like(pick, src), src))
        out.append((tuple(sel), src[1].any(0)))
    return tuple(out)


def _fetch(env, sels, kvs):
    """lag 2, host gather (runs while the next decode step computes)."""
    policy, _, kinds, dev = env
    out = []
    for p, (sel, _), kv, kind in zip(_plans(env), sels, kvs, kinds):
        rows = []
        for (pi, live), (pos, w) in zip(_live(p), sel):
            def get(pos, w, p=p, live=live, kv=kv, kind=kind):
                return _fetch_rows(p, kv, pos, live, kind, dev, w if policy.refresh_when == "own" else None)

            rows.append(jax.lax.cond(w.any(), get, _zeros_like(get, pos, w), pos, w))
        out.append(tuple(rows))
    return tuple(out)


def _apply(env, states, pending):
    """lag 2: write the fetched rows one step after the select."""
    states = _control(env[0], states, [fired for (_, fired), _ in pending])
    out = []
    for p, st, ((sel, fired), rows) in zip(_plans(env), states, pending):
        for (pi, live), (_, w), rw in zip(_live(p), sel, rows):
            def put(st, p=p, pi=pi, live=live, rw=rw, w=w):
                return _write_rows(p, st, pi, live, rw, w, env[0].refresh_when == "own")

            st = jax.lax.cond(fired[pi], put, lambda s: s, st)
        out.append(st)
    return tuple(out)


def _zeros_like(fn, *args):
    """The other branch of a ``lax.cond`` around ``fn``: zeros of its output shapes."""
    shapes = jax.eval_shape(fn, *args)
    return lambda *_: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def _gather_rows(hk, hv, slots, pos, host_kind, dev):
    """Rows ``pos`` (B, S, C) of satellite slots ``slots`` (S,) from the (B, S_all, T, D) prompt
    copy -> device (B, S, C, D). With a host copy (``host_kind`` given) the gather runs as host
    compute and only the gathered rows are put on the device; without host compute, the whole
    copy comes over first (moves more bytes); without a host memory kind, a plain device gather."""
    d = hk.shape[-1]
    si = jnp.broadcast_to(slots[None, :, None], pos.shape)
    idx = jnp.stack([si, pos], -1).astype(jnp.int32)  # the batch is a batch dimension of the gather: on a
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(3,), collapsed_slice_dims=(1, 2), start_index_map=(1, 2),
                                        operand_batching_dims=(0,), start_indices_batching_dims=(0,))  # mesh each
    # shard gathers its own sequences' rows from its own host copy, nothing crosses devices

    def gather(x, i):
        return jax.lax.gather(x, i, dn, slice_sizes=(1, 1, 1, d), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)

    if host_kind is None:
        return gather(hk, idx), gather(hv, idx)
    try:
        both = on_host(lambda a, b_, i: (gather(a, i), gather(b_, i)))
    except ImportError:
        return gather(jax.device_put(hk, dev), idx), gather(jax.device_put(hv, dev), idx)
    rk, rv = both(hk, hv, jax.device_put(idx, dev.with_memory_kind(host_kind)))
    return jax.device_put(rk, dev), jax.device_put(rv, dev)
