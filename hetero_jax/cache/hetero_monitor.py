"""HeteroCache's token scores and its drift check, on device inside the jitted steps (REFERENCE.md
sections 3-4).

Scores: a query's softmax over the prompt keys, pool5 per query head, max over the GQA group. At
prefill the last prompt query scores every head (compressed heads keep their top cap_h tokens,
pivots take their top K = base as the reference set). In decode, every ``steps`` steps a layer
whose pivots have satellites compares the top-K sets of the window's scores with each pivot's
own reference set (pivot i of the layer's cluster list against reference row i: the authors'
code pairs JSON order with ascending pivot order, a defect in layers with 2+ pivots listed out of
order) and, on drift, stores a refresh request for the host (``hetero_refresh``). ``check_impl``
chooses how the overlap is computed, all exact: "spread" (default) scores each step's query as it
comes, from the logits of that step's own attention pass (``drift_scores``: no second pass over
the prompt keys), once per step for all layers in one batch (``finish_step``, after the last
layer): the scores, a histogram top-K cut (``topk_select``), the overlap and, at check steps, the
check (no query is kept); "select" / "topk" buffer the pivots' queries and score the window's again at the
check step, per layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.attention import NEG_INF, pooled_scores
from hetero_jax.cache import hetero_pages
from hetero_jax.cache.drift_scores import drift_scores
from hetero_jax.cache.hetero_drift import compact_positions
from hetero_jax.cache.hetero_pool import DriftState, HeteroLayer, LayerPlan, prompt_keys
from hetero_jax.cache.topk_select import cut_mask, cut_overlap, topk_cut
from pallas_kernels import topk_overlap


def group_max_scores(q, k, plen) -> jax.Array:
    """q (..., G, 1, D) one query per query head, k (..., T, D) prompt keys, plen (...) real prompt
    lengths -> (..., T): softmax over the prompt, pool5 per query head, max over the group, NEG_INF
    past the prompt."""
    inside = jnp.arange(k.shape[-2]) < plen[..., None]
    return jnp.where(inside, pooled_scores(q, k, inside[..., None, None, :]), NEG_INF)


def init_drift(policy, p: LayerPlan, scores, q, kt, vt, lengths, max_new: int) -> DriftState:
    """The drift state after prefill: each pivot's reference set (top K = base of its last-query
    ``scores`` (B, Hkv, T)), empty buffers, the satellites' prompt KV staged for offload."""
    b, hkv, t, d = kt.shape
    pivots = [pv for pv, _ in p.monitored]
    npv, g, kmax = len(pivots), q.shape[2] // hkv, int(policy.base_table(t)[t])
    kb = jnp.asarray(policy.base_table(t))[lengths]
    idx = jax.lax.top_k(scores[:, jnp.asarray(pivots)], kmax)[1]  # (B, P, Kmax), row i = pivot i's own set
    r = jnp.arange(kmax)
    return DriftState(
        qbuf=None if policy.check_impl == "spread" else jnp.zeros((b, policy.steps, npv, g, d), q.dtype),
        ref=jnp.where(r < kb[:, None, None], idx, -1 - kmax - r).astype(jnp.int32),
        req=jnp.zeros((b, npv, t), jnp.float32),
        flag=jnp.zeros((b, npv), bool),
        overlap=jnp.ones((b, npv), jnp.float32),
        checks=jnp.zeros((npv,), jnp.int32),
        refreshes=jnp.zeros((npv,), jnp.int32),
        rows_moved=jnp.zeros((npv,), jnp.int32),
        thr=jnp.asarray(policy.threshold, jnp.float32),
        fired=jnp.zeros((max(max_new, 1),), bool),
        ovbuf=jnp.ones((b, policy.steps, npv), jnp.float32) if policy.check_impl == "spread" else None,
        logits=jnp.zeros((b, npv, g, t), jnp.float32) if policy.check_impl == "spread" else None,
        stage=(kt[:, jnp.asarray(p.sats)], vt[:, jnp.asarray(p.sats)]),
    )


def checks_at(policy, layer: int, step):
    """Whether layer ``layer`` runs its drift check in decode step ``step`` (traced or int)."""
    k = step + 1 - (layer % policy.steps if policy.stagger else 0)
    return (k % policy.steps == 0) & (k > 0)


def _pivot_scores(p: LayerPlan, st: HeteroLayer, plen, q):
    """q (B, W, P, G, D) pivots' queries -> (B, W, P, T) scores over each pivot's prompt keys."""
    keys = prompt_keys(p, st, [pv for pv, _ in p.monitored])  # (B, P, T, D)
    return group_max_scores(q[..., None, :], keys[:, None], plen[:, None, None])


def record_logits(st: HeteroLayer, logits) -> HeteroLayer:
    """check_impl "spread", every step, per layer: keep the pivots' attention ``logits``
    (B, P, G, T) of this step. ``finish_step`` turns every layer's into drift scores at once (one
    softmax and pool over all layers instead of a handful of small ops per layer), cuts them and
    checks from the scores alone: no query is buffered."""
    return dataclasses.replace(st, drift=dataclasses.replace(st.drift, logits=logits))


def finish_step(policy, cache):
    """Once per decode step, after every layer: the drift checks' work that spans layers, with one
    conditional per group of layers that check at the same steps (all of them, or with ``stagger``
    those of one phase) instead of one per layer. check_impl "spread": this step's top-K cut and
    overlap of every monitored pivot of every layer in one batch (B, sum P, T), then the check of
    the group due, batched too (the same decisions as a per-layer check: every row is cut and
    compared on its own). refresh_by "pages": at a check step, the satellites' page scores of the
    queries their layer kept (``hetero_pages``); refresh_when "own": the satellites' own checks,
    whose result replaces the pivots' flags (a pivot's refresh then moves its fired satellites)."""
    mon = [l for l, st in enumerate(cache.layers) if st.drift is not None]
    spread, paged = policy.check_impl == "spread", policy.refresh_by == "pages"
    own = paged and policy.refresh_when == "own"
    if not mon or not (spread or paged):
        return cache
    step, layers = cache.step, list(cache.layers)
    if spread:
        layers, now, cut, spans = _step_overlaps(policy, layers, mon, step, cache.lengths - step)
    phases = {}
    for l in mon:  # layers that check at the same steps are checked together
        phases.setdefault(l % policy.steps if policy.stagger else 0, []).append(l)
    for group in phases.values():
        drift = tuple((layers[l].drift.ref, layers[l].drift.flag, layers[l].drift.overlap, layers[l].drift.checks,
                       layers[l].drift.refreshes, layers[l].drift.fired, layers[l].drift.req)
                      for l in group) if spread else ()
        scores = tuple(layers[l].pages for l in group) if paged else ()
        marks = tuple((layers[l].drift.flag, layers[l].drift.fired) for l in group) if own else ()

        def due(carry, group=group):
            drift, scores, marks = carry
            if spread:
                rows = np.concatenate([np.arange(spans[l].start, spans[l].stop) for l in group])
                sub = (lambda x: x) if len(rows) == now.shape[1] else (lambda x: x[:, jnp.asarray(rows)])  # noqa: E731
                checked = _check(policy, step, [layers[l] for l in group], [c[:-1] for c in drift], sub(now),
                                 tuple(map(sub, cut)))
                drift = tuple(c + (now[:, spans[l]],) for c, l in zip(checked, group))  # req: the check's scores
            if paged:
                scores = tuple(dataclasses.replace(pg, score=hetero_pages.check_scores(policy, pg)) for pg in scores)
            if own:
                scores = tuple(hetero_pages.own_check(policy, pg, pg.score, layers[l].keep[:, jnp.asarray(
                    policy.plan(l, layers[l].T, layers[l].max_new, layers[l].shards).sats)])
                               for l, pg in zip(group, scores))
                marks = tuple(_own_marks(policy.plan(l, layers[l].T, layers[l].max_new, layers[l].shards), pg, fired,
                                         step) for l, pg, (_, fired) in zip(group, scores, marks))
            return drift, scores, marks

        drift, scores, marks = jax.lax.cond(checks_at(policy, group[0], step), due, lambda c: c,
                                            (drift, scores, marks))
        for l, (ref, flag, med, checks, refreshes, fired, req) in zip(group, drift):
            layers[l] = dataclasses.replace(layers[l], drift=dataclasses.replace(
                layers[l].drift, ref=ref, flag=flag, overlap=med, checks=checks, refreshes=refreshes, fired=fired,
                req=req))
        for l, pages in zip(group, scores):
            layers[l] = dataclasses.replace(layers[l], pages=pages)
        for l, (flag, fired) in zip(group, marks):
            layers[l] = dataclasses.replace(layers[l], drift=dataclasses.replace(layers[l].drift, flag=flag,
                                                                                   fired=fired))
    return dataclasses.replace(cache, layers=tuple(layers))


def _own_marks(p: LayerPlan, pages, fired, step):
    """refresh_when "own": a pivot's flag (B, P) is set where any of its satellites' own check
    fired, and the step's ``fired`` mark where any did."""
    cols = [pages.own[:, jnp.asarray([p.sats.index(j) for j in sats])].any(-1) if sats else
            jnp.zeros(pages.own.shape[:1], bool) for _, sats in p.monitored]
    return jnp.stack(cols, 1), fired.at[step].set(pages.own.any(), mode="drop")


def _step_overlaps(policy, layers, mon, step, plen):
    """check_impl "spread": this step's drift scores of the pivots of layers ``mon`` in one batch
    (B, sum P, T) from their kept logits, the scores' top-K cut and its overlap with the reference
    sets, written to each layer's window (``ovbuf``) -> (layers, scores, cut, each layer's rows of
    the batch)."""
    slot = step % policy.steps
    sizes = [layers[l].drift.ref.shape[1] for l in mon]
    ends = np.cumsum(sizes).tolist()
    spans = {l: slice(e - n, e) for l, n, e in zip(mon, sizes, ends)}
    kb = jnp.asarray(policy.base_table(layers[mon[0]].T))[plen]  # (B,) the same K in every layer
    now = drift_scores(jnp.concatenate([layers[l].drift.logits for l in mon], 1), plen)  # (B, sum P, T)
    cut = topk_cut(now, kb[:, None])
    ov = cut_overlap(now, cut, jnp.concatenate([layers[l].drift.ref for l in mon], 1), kb)  # (B, sum P)
    layers = list(layers)
    for l in mon:
        ds = layers[l].drift
        layers[l] = dataclasses.replace(layers[l], drift=dataclasses.replace(
            ds, ovbuf=jax.lax.dynamic_update_index_in_dim(ds.ovbuf, ov[:, spans[l]], slot, 1)))
    return layers, now, cut, spans


def _check(policy, step, sts, carry, now, cut):
    """The drift check of the layers ``sts`` (their pivots' rows of ``now`` and ``cut``, in order),
    as one decision over all their pivots (``_decide``)."""
    sizes = [c[0].shape[1] for c in carry]
    ends = np.cumsum(sizes).tolist()
    split = lambda x: [x[:, e - n: e] for n, e in zip(sizes, ends)]  # noqa: E731
    ov = jnp.concatenate([st.drift.ovbuf for st in sts], 2)  # (B, W, P) with this step's overlaps
    ref = jnp.concatenate([c[0] for c in carry], 1)  # (B, P, Kmax)
    thr = jnp.concatenate([jnp.broadcast_to(st.drift.thr, (n,)) for st, n in zip(sts, sizes)])
    kmax = ref.shape[-1]
    sets = lambda: compact_positions(cut_mask(now, cut), kmax, -1 - kmax - jnp.arange(kmax))  # noqa: E731
    ref, trig, med = _decide(policy, ov, thr, ref, sets)
    return tuple((r, f, m) + _counted(step, f, *c[3:])
                 for c, r, f, m in zip(carry, split(ref), split(trig), split(med)))


def _decide(policy, ov, thr, ref, sets):
    """The decision every check_impl shares: ov (B, W, P) the window's overlaps, thr () or (P,), ref
    (B, P, Kmax) -> (ref, trigger (B, P), median (B, P) f32). A pivot triggers when the median over
    the window of its overlap (trigger "batch": of the batch-mean overlap, one decision for the
    batch) is below thr; its reference set becomes its row of ``sets()`` (B, P, Kmax), a callable
    so that the new sets are only built when some row triggers."""
    if policy.trigger == "batch":
        med = jnp.broadcast_to(jnp.median(ov.mean(0), axis=0), ov.shape[:1] + ov.shape[2:])
    else:
        med = jnp.median(ov, axis=1)
    trig = med < thr
    ref = jax.lax.cond(trig.any(), lambda r: jnp.where(trig[..., None], sets(), r).astype(jnp.int32),
                       lambda r: r, ref)
    return ref, trig, med.astype(jnp.float32)


def _counted(step, trig, checks, refreshes, fired):
    """One layer's counters after a check with triggers ``trig`` (B, P): checks and refreshes per
    pivot, and whether the check at ``step`` asked for any refresh."""
    return checks + 1, refreshes + trig.any(0).astype(jnp.int32), fired.at[step].set(trig.any(), mode="drop")


def monitor(policy, layer: int, p: LayerPlan, st: HeteroLayer, qg, cache) -> HeteroLayer:
    """check_impl "select" / "topk", per layer: buffer the pivots' queries qg (B, Hkv, G, D); every
    ``steps`` steps score the window's queries again over the pivots' prompt keys and check."""
    ds = st.drift
    step, n = cache.step, policy.steps
    slot = step % n
    qbuf = ds.qbuf.at[:, slot].set(qg[:, jnp.asarray([pv for pv, _ in p.monitored])].astype(ds.qbuf.dtype))
    kmax = ds.ref.shape[-1]
    plen = cache.lengths - step  # real prompt length per sequence
    kb = jnp.asarray(policy.base_table(st.T))[plen]
    r = jnp.arange(kmax)
    inb = r[None, :] < kb[:, None]  # (B, Kmax)

    def check(carry):
        ref, _, _, _, checks, refreshes, fired = carry
        s = _pivot_scores(p, st, plen, qbuf)  # (B, W, P, T)
        last = jnp.take(s, slot, axis=1)
        if policy.check_impl == "select":
            cut = topk_cut(s, kb[:, None, None])
            ov = cut_overlap(s, cut, ref[:, None], kb)
            last_cut = tuple(jnp.take(c, slot, axis=1) for c in cut)
        else:  # the original: top-k index lists and their intersection
            cur = jnp.where(inb[:, None, None, :], jax.lax.top_k(s, kmax)[1], -1 - r)
            ov = topk_overlap(cur, ref[:, None]) * (kmax / jnp.maximum(kb, 1))[:, None, None]  # (B, W, P)

        def sets():  # the new sets as index lists (position order)
            if policy.check_impl == "topk":
                return jnp.where(inb[:, None, :], jax.lax.top_k(last, kmax)[1], -1 - kmax - r)
            return compact_positions(cut_mask(last, last_cut), kmax, -1 - kmax - r)

        ref, trig, med = _decide(policy, ov, ds.thr, ref, sets)
        return (ref, last, trig, med) + _counted(step, trig, checks, refreshes, fired)

    carry = (ds.ref, ds.req, ds.flag, ds.overlap, ds.checks, ds.refreshes, ds.fired)
    ref, req, flag, med, checks, refreshes, fired = jax.lax.cond(checks_at(policy, layer, step), check,
                                                                 lambda c: c, carry)
    ds = dataclasses.replace(ds, qbuf=qbuf, ref=ref, req=req, flag=flag, overlap=med, checks=checks,
                             refreshes=refreshes, fired=fired)
    return dataclasses.replace(st, drift=ds)
