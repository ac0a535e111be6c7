"""The hetero policy's options beyond the reference (check_impl, stagger, lag, threshold_mode) and
the drift arithmetic in hetero_drift.py, against numpy references and the faithful defaults."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.params import init_random_params
from hetero_jax import model
from hetero_jax.cache.hetero import HeteroCache
from hetero_jax.cache.hetero_drift import rate_update
from hetero_jax.cache.hetero_pool import head_rows
from hetero_jax.cache.topk_select import cut_overlap, topk_cut, topk_mask
from tests.test_hetero import QueryTap, TappedHetero, make_cfg, np_group_scores, prompts, random_profile


# ------------------------------------------------------------------------------------ arithmetic
def np_topk_set(x, k):
    """float64 reference: the k largest, ties to the lowest index, +0.0 above -0.0 (lax.top_k's order)."""
    x = np.asarray(x, np.float64)
    return set(np.lexsort((np.arange(len(x)), np.signbit(x), -x))[:k].tolist())


def test_topk_mask_is_exact_top_k_with_ties(seed):
    rng = np.random.default_rng(seed)
    rows, t = 24, int(rng.integers(5, 300))
    x = rng.standard_normal((rows, t)).astype(np.float32)
    x[:8] = np.round(x[:8] * 2) / 2  # heavy ties, also at the k-th value, and -0.0 beside +0.0
    x[8:12] = rng.choice(np.float32([0.0, 1e-30, 3e-38, 1.0]), (4, t))  # zeros, tiny and subnormal values
    x[12:16, t // 2:] = -1e30  # masked tails (positions past a prompt)
    x[16:20] = np.abs(x[16:20]) * 1e-3  # probability-like
    k = rng.integers(0, t + 1, rows)
    k[:3] = [0, t, 1]
    mask = np.asarray(jax.jit(topk_mask)(jnp.asarray(x), jnp.asarray(k)))
    order = np.asarray(jax.lax.top_k(jnp.asarray(x), t)[1])  # lax.top_k's own order, ties included
    for i in range(rows):
        got = set(np.flatnonzero(mask[i]).tolist())
        assert got == np_topk_set(x[i], k[i]), (i, k[i])
        assert got == set(order[i, : k[i]].tolist())
    batched = np.asarray(topk_mask(jnp.asarray(x.reshape(4, 6, t)), jnp.asarray(k.reshape(4, 6))))
    np.testing.assert_array_equal(batched.reshape(rows, t), mask)


def test_cut_overlap_matches_numpy(seed):
    """The overlap of a reference set with the current top-kb, from the current scores' cut (their
    K-th key and last tied position) and the reference's own scores: numpy sets as the reference."""
    rng = np.random.default_rng(seed)
    b, w, p, t, kmax = 3, 4, 2, 97, 30
    kb = rng.integers(0, kmax + 1, b)
    kb[0] = kmax
    s = np.round(rng.standard_normal((b, w, p, t)) * 3).astype(np.float32)  # many ties at the K-th value
    s[1, :, :, t // 2:] = -1e30  # padding past a shorter prompt
    ref = np.full((b, p, kmax), -7, np.int32)
    for bi in range(b):
        for pi in range(p):
            ref[bi, pi, : kb[bi]] = rng.choice(t, kb[bi], replace=False)
    x = jnp.asarray(s)
    cut = topk_cut(x, jnp.asarray(kb)[:, None, None])
    got = np.asarray(cut_overlap(x, cut, jnp.asarray(ref)[:, None], jnp.asarray(kb)))
    for bi in range(b):
        for wi in range(w):
            for pi in range(p):
                top = np_topk_set(s[bi, wi, pi], kb[bi])
                want = len(top & set(ref[bi, pi, : kb[bi]].tolist())) / max(kb[bi], 1)
                assert got[bi, wi, pi] == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("target", [0.05, 0.15, 0.4])
def test_rate_controller_reaches_target(seed, target):
    rng = np.random.default_rng(seed)
    n, p, gain = 2000, 30, 0.05
    # a non-stationary stream: per-pivot levels that drift, and phases of larger drift
    # a model- and text-dependent level per pivot, none so low that it fires at any threshold above 0
    # (then a low target is unreachable and thr pins at 0)
    level = np.clip(rng.uniform(0.55, 0.85) + 0.2 * rng.standard_normal(p), 0.35, 0.99)
    trend = 0.15 * np.sin(np.linspace(0, 6, n))[:, None]
    ov = np.clip(level + trend + 0.08 * rng.standard_normal((n, p)), 0, 1).astype(np.float32)
    step = jax.jit(lambda thr, o: (o < thr, rate_update(thr, o < thr, target, gain)))
    thr, fired, thrs = jnp.float32(0.5), [], [0.5]
    for row in ov:
        f, thr = step(thr, jnp.asarray(row))
        fired.append(np.asarray(f))
        thrs.append(float(thr))
    fired = np.array(fired)
    for i in range(n):  # each step against the float64 rule (fired: the comparison in float32)
        np.testing.assert_array_equal(fired[i], ov[i] < np.float32(thrs[i]))
        assert thrs[i + 1] == pytest.approx(min(max(thrs[i] + gain * (target - fired[i].mean()), 0), 1), abs=1e-6)
    rate = fired.mean()
    assert 0 < min(thrs) and max(thrs) < 1  # never clipped: the telescoping bound applies
    assert abs(rate - target) <= 0.5 / (gain * n) + 1e-3, (rate, target)
    assert abs(fired[n // 2:].mean() - target) <= 1 / (gain * n) + 1e-3  # and over the later half alone


# ------------------------------------------------------------------------------------ the policy
def setup(seed, layers=2):
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=layers, kv=4)
    lay = [([(0, [1, 2])], "aaaa"), ([(2, [3])], "avaa"), ([(1, [0, 3])], "aava")][:layers]
    prof = random_profile(cfg, rng, lay)
    params = init_random_params(cfg, seed, scale=0.3)
    lengths = [256, int(rng.integers(60, 256))]
    return rng, cfg, prof, params, lengths, prompts(rng, lengths, 256)


def drive(params, cfg, policy, tokens, lengths, n_steps, feed=None):
    """Prefill + n_steps decode steps driven like generate(); ``feed`` (n_steps, B) tokens or argmax.
    -> logits per step, caches right after each before_step ("pre") and after each step ("post")."""
    pf = jax.jit(functools.partial(model.prefill, cfg=cfg, policy=policy, max_new_tokens=n_steps + 1))
    st = jax.jit(functools.partial(model.decode_step, cfg=cfg, policy=policy))
    copy = lambda c: jax.tree.map(np.array, dataclasses.replace(c, host=None))  # noqa: E731
    logits, cache = pf(params, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32))
    cache = policy.after_prefill(cache)
    outs, pre, post = [], [], []
    for i in range(n_steps):
        tok = jnp.argmax(logits, -1).astype(jnp.int32) if feed is None else jnp.asarray(feed[i], jnp.int32)
        cache = policy.before_step(cache)
        pre.append(copy(cache))
        host = cache.host
        logits, cache = st(params, dataclasses.replace(cache, host=None), tok)
        cache = dataclasses.replace(cache, host=host)
        outs.append(np.asarray(logits))
        post.append(copy(cache))
    return outs, pre, post, cache


def field(layer, name):
    """A layer's block array (full_k, ..., comp_v) or drift-state array by name."""
    return getattr(layer, name) if name in BLOCKS else getattr(layer.drift, name)


BLOCKS = ("full_k", "full_v", "comp_k", "comp_v")


def checks_at(policy, layer, n_steps):
    ph = layer % policy.steps if policy.stagger else 0
    return [s for s in range(n_steps) if s + 1 - ph > 0 and (s + 1 - ph) % policy.steps == 0]


@pytest.mark.parametrize("impl,stagger", [("spread", False), ("select", False), ("spread", True), ("select", True)])
def test_drift_check_matches_numpy_every_impl(seed, impl, stagger):
    rng, cfg, prof, params, lengths, toks = setup(seed, layers=3)
    thr = float(rng.uniform(0.3, 0.9))
    tap = QueryTap()
    pol = TappedHetero.create(cfg, ratio=0.5, profile=prof, threshold=thr, steps=3, check_impl=impl, stagger=stagger,
                              trigger="batch", tap=tap)  # the numpy reference below is the batch-mean rule
    n = 9
    _, pre, post, _ = drive(params, cfg, pol, toks, lengths, n)
    pivots = [0, 2, 1]
    for l, pivot in enumerate(pivots):
        p = pol.plan(l, 256, n + 1)
        at = checks_at(pol, l, n)
        assert int(post[-1].layers[l].drift.checks[0]) == len(at) >= 2
        for s in at:
            before, after = pre[s].layers[l], post[s].layers[l]
            ovs, lasts = [], []
            for bi, length in enumerate(lengths):
                kb = prof.base_budget(0.5, length)
                keys = np.asarray(head_rows(p, after, pivot)[0])[bi, :256]
                ref = set(before.drift.ref[bi, 0, :kb].tolist())
                sc = [np_group_scores(tap.group(w, l, pivot, 4)[bi], keys, length) for w in range(s - 2, s + 1)]
                ovs.append([len(ref & np_topk_set(x, kb)) / kb for x in sc])
                lasts.append((sc[-1], kb))  # the window's steps s-2..s, the check step's query last
                np.testing.assert_allclose(after.drift.req[bi, 0, :length], sc[-1], rtol=2e-4, atol=1e-7)
            med = float(np.median(np.mean(ovs, 0)))
            got = float(after.drift.overlap[0, 0])
            assert abs(got - med) <= 1.01 / min(prof.base_budget(0.5, x) for x in lengths), (l, s, got, med)
            assert bool(after.drift.flag[0, 0]) == (got < thr)
            for bi, (sc, kb) in enumerate(lasts):
                if after.drift.flag[0, 0]:
                    got_ref = after.drift.ref[bi, 0, :kb].tolist()
                    assert len(set(got_ref) ^ np_topk_set(sc, kb)) <= 4  # float32 ranks at the boundary
                    assert (after.drift.ref[bi, 0, kb:] < 0).all()
                else:
                    np.testing.assert_array_equal(after.drift.ref[bi], before.drift.ref[bi])
        for s in set(range(n)) - set(at):  # no check: nothing of the check's state moves
            for f in ("ref", "flag", "checks", "overlap"):
                np.testing.assert_array_equal(getattr(post[s].layers[l].drift, f), getattr(pre[s].layers[l].drift, f))


def test_check_impls_give_identical_decisions(seed):
    """select and spread against the original sort-based check: the same overlaps, triggers, reference
    sets and logits on every step (exact top-k membership, ties as lax.top_k)."""
    rng, cfg, prof, params, lengths, toks = setup(seed, layers=3)
    probe = drive(params, cfg, HeteroCache.create(cfg, ratio=0.5, profile=prof, threshold=0.0, steps=2), toks,
                  lengths, 9)[2]
    # a threshold between two observed overlaps (some checks fire, some not), far from both: the original
    # computes (|A ∩ B| / Kmax) * (Kmax / K), select and spread |A ∩ B| / K, equal up to an ulp
    seen = np.unique(np.round([float(c.layers[l].drift.overlap[0, 0]) for c in probe[1::2] for l in range(3)], 5))
    i = len(seen) // 2
    thr = float((seen[i - 1] + seen[i]) / 2) if len(seen) > 1 else float(seen[0]) + 1e-3
    runs = {}
    for impl in ("topk", "select", "spread"):
        pol = HeteroCache.create(cfg, ratio=0.5, profile=prof, threshold=thr, steps=2, check_impl=impl)
        runs[impl] = drive(params, cfg, pol, toks, lengths, 9)
    fired = 0
    for impl in ("select", "spread"):
        for a, b in zip(runs[impl][0], runs["topk"][0]):
            np.testing.assert_array_equal(a, b)
        for x, y in zip(runs[impl][2], runs["topk"][2]):
            for la, lb in zip(x.layers, y.layers):
                for f in ("flag", "refreshes") + BLOCKS:
                    np.testing.assert_array_equal(field(la, f), field(lb, f), err_msg=f"{impl} {f}")
                np.testing.assert_allclose(la.drift.overlap, lb.drift.overlap, rtol=1e-6, err_msg=f"{impl} overlap")
                # the reference set (position order here, score order in topk; the same sentinels)
                np.testing.assert_array_equal(np.sort(la.drift.ref, -1), np.sort(lb.drift.ref, -1),
                                              err_msg=f"{impl} ref")
        fired += sum(int(s.drift.refreshes.sum()) for s in runs[impl][3].layers)
    checks = sum(int(s.drift.checks.sum()) for s in runs["topk"][3].layers)
    assert checks == 3 * 4 and 0 < fired  # the comparison covered refreshes


def test_lag2_writes_the_same_rows_one_step_later(seed):
    rng, cfg, prof, params, lengths, toks = setup(seed)
    feed = rng.integers(1, 256, (8, 2))  # teacher-forced: both runs see the same inputs
    res = {lag: drive(params, cfg, HeteroCache.create(cfg, ratio=0.5, profile=prof, threshold=1.0, steps=3, lag=lag,
                                                      refresh_select="topk"),  # the reference rows below
                      toks, lengths, 8, feed) for lag in (1, 2)}
    (o1, pre1, post1, c1), (o2, pre2, post2, c2) = res[1], res[2]
    for s in range(3):  # identical until the first refresh is used (step 3 with lag 1)
        np.testing.assert_array_equal(o1[s], o2[s])
    assert not np.array_equal(o1[3], o2[3])  # lag 1 attends to the refreshed rows at step 3, lag 2 not yet
    host = [None if kv is None else tuple(np.asarray(x) for x in kv) for kv in c1.host.kv]
    for l in range(2):
        p = HeteroCache.create(cfg, ratio=0.5, profile=prof).plan(l, 256, 9)
        chk = post1[2].layers[l]  # state after the check at step 2 (the same in both runs)
        assert chk.drift.flag.any()
        np.testing.assert_array_equal(chk.drift.req, post2[2].layers[l].drift.req)
        for bi in range(2):
            order = np.argsort(-chk.drift.req[bi, 0].astype(np.float64), kind="stable")
            for slot, j in enumerate(p.sats):
                kj = int(chk.keep[bi, j])
                seg = slice(0, kj)
                rows = {n: [np.asarray(x) for x in head_rows(p, c[s_].layers[l], j)] for n, c, s_ in
                        (("pre1_2", pre1, 2), ("pre1_3", pre1, 3), ("pre2_3", pre2, 3), ("pre2_4", pre2, 4))}
                old = rows["pre1_2"][0][bi, seg]
                want_k = host[l][0][bi, slot, np.sort(order[:kj])] if chk.drift.flag[bi, 0] else old
                want_v = (host[l][1][bi, slot, np.sort(order[:kj])] if chk.drift.flag[bi, 0]
                          else rows["pre1_2"][1][bi, seg])
                np.testing.assert_array_equal(rows["pre1_3"][0][bi, seg], want_k)  # lag 1: before step 3
                np.testing.assert_array_equal(rows["pre2_3"][0][bi, seg], old)  # lag 2: not yet
                np.testing.assert_array_equal(rows["pre2_4"][0][bi, seg], want_k)  # lag 2: before step 4
                np.testing.assert_array_equal(rows["pre2_4"][1][bi, seg], want_v)
        for f in ("rows_moved", "refreshes", "checks"):
            np.testing.assert_array_equal(getattr(pre2[4].layers[l].drift, f), getattr(pre1[3].layers[l].drift, f))
        assert int(pre2[4].layers[l].drift.rows_moved[0]) == 2 * sum(p.caps[j] for j in p.sats)


def test_stagger_refreshes_each_layer_after_its_own_check(seed):
    rng, cfg, prof, params, lengths, toks = setup(seed, layers=3)
    for lag in (1, 2):
        pol = HeteroCache.create(cfg, ratio=0.5, profile=prof, threshold=1.0, steps=3, stagger=True, lag=lag)
        n = 10
        _, pre, post, last = drive(params, cfg, pol, toks, lengths, n)
        for l in range(3):
            p = pol.plan(l, 256, n + 1)
            at = checks_at(pol, l, n)
            assert at == [s for s in range(2 + l, n, 3)]
            moved = [int(x.layers[l].drift.rows_moved[0]) for x in pre]
            fired = [s for s in at if post[s].layers[l].drift.flag.any()]
            assert fired and moved[-1] == len([s for s in fired if s + lag < n]) * 2 * sum(p.caps[j] for j in p.sats)
            for s in range(1, n):  # rows move exactly lag steps after a triggering check of this layer
                assert (moved[s] > moved[s - 1]) == (s - lag in fired), (l, lag, s)
        stats = pol.stats(last)
        assert stats["checks"] == sum(len(checks_at(pol, l, n)) for l in range(3))
        # the per-step masks bench.decode times steps by: checks by schedule, refreshes after a fired check
        all_at = {s for l in range(3) for s in checks_at(pol, l, n)}
        all_fired = {s for l in range(3) for s in checks_at(pol, l, n) if post[s].layers[l].drift.flag.any()}
        assert [i for i in range(n) if stats["check_step_mask"][i]] == sorted(all_at)
        assert [i for i in range(n) if stats["refresh_step_mask"][i]] == sorted(s + 1 for s in all_fired if s + 1 < n)
        assert (stats["lag_steps"], stats["stagger"]) == (lag, True)


def test_rate_mode_follows_its_controller(seed):
    rng, cfg, prof, params, lengths, toks = setup(seed, layers=3)
    kw = dict(ratio=0.5, profile=prof, threshold=0.5, steps=2, threshold_mode="rate", target_rate=0.3, rate_gain=0.2)
    pol = HeteroCache.create(cfg, **kw)
    n = 11
    outs, pre, post, last = drive(params, cfg, pol, toks, lengths, n)
    thr = 0.5
    for s in range(1, n, 2):  # checks at odd steps; the controller runs in the refresh before step s + 1
        for l in range(3):
            st = post[s].layers[l]
            assert float(st.drift.thr) == pytest.approx(thr, abs=1e-6)
            assert bool(st.drift.flag[0, 0]) == (st.drift.overlap[0, 0] < st.drift.thr)
        fired = np.mean([post[s].layers[l].drift.flag.any() for l in range(3)])
        thr = float(np.clip(thr + 0.2 * (0.3 - fired), 0, 1))
    assert pol.stats(last)["thresholds"] == pytest.approx([thr] * 3, abs=1e-6)
    again = drive(params, cfg, HeteroCache.create(cfg, **kw), toks, lengths, n)[0]
    for a, b in zip(outs, again):
        np.testing.assert_array_equal(a, b)


def test_option_errors_and_defaults(seed):
    rng, cfg, prof, *_ = setup(seed)
    for bad in (dict(lag=3), dict(lag=0), dict(check_impl="sort"), dict(threshold_mode="auto"),
                dict(threshold_mode="rate", target_rate=1.0), dict(rate_gain=0.0)):
        with pytest.raises(ValueError):
            HeteroCache.create(cfg, ratio=0.5, profile=prof, **bad)
    pol = HeteroCache.create(cfg, ratio=0.5, profile=prof, lag=2, stagger=True, check_impl="select")
    assert (pol.lag, pol.stagger, pol.check_impl) == (2, True, "select")
    default = HeteroCache.create(cfg, ratio=0.5, profile=prof)
    assert (default.lag, default.stagger, default.threshold_mode) == (1, False, "fixed")
    assert (default.trigger, default.refresh_select) == ("sequence", "authors")  # batch-invariant, the authors' rows


@pytest.mark.parametrize("kernel", [5, 1, 9])
def test_select_window_keeps_the_window_and_snapkv_votes(seed, kernel):
    """select_window=w: each compressed head keeps the last w prompt tokens plus the top votes of the
    window's queries pooled over ``select_kernel`` keys (numpy float64 reference of the rule),
    pivots' reference sets unchanged."""
    rng, cfg, prof, params, lengths, toks = setup(seed, layers=2)
    w = 4
    base = HeteroCache.create(cfg, ratio=0.5, profile=prof)
    pol = HeteroCache.create(cfg, ratio=0.5, profile=prof, select_window=w, select_kernel=kernel)
    q, k, v = (np.asarray(x, np.float64) for x in model.prefill_qkv(params, jnp.asarray(toks), jnp.asarray(lengths, jnp.int32), cfg=cfg)[1][0])
    kv_w = pol.build_layer(0, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(lengths), 4)
    kv_1 = base.build_layer(0, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(lengths), 4)
    np.testing.assert_array_equal(kv_w.drift.ref, kv_1.drift.ref)
    p = pol.plan(0, k.shape[1], 4)
    hkv, g, d = k.shape[2], q.shape[2] // k.shape[2], k.shape[3]
    comp = [h for h in range(hkv) if not p.full[h] and p.caps[h]]
    assert comp
    for b, n in enumerate(lengths):
        keeps = [int(kv_w.keep[b, h]) for h in comp]
        ww = min(w, min(keeps))
        for h in comp:
            probs = np.zeros((g, k.shape[1]))
            for qi in range(n - w, n):  # causal softmax of each window query over keys <= qi
                s = np.einsum("gd,td->gt", q[b, qi, h * g:(h + 1) * g], k[b, : qi + 1, h]) / np.sqrt(d)
                e = np.exp(s - s.max(-1, keepdims=True))
                probs[:, : qi + 1] += e / e.sum(-1, keepdims=True)
            probs[:, n - ww:] = 0.0
            pooled = np.stack([np.convolve(r, np.ones(kernel) / kernel, mode="same") for r in probs]).max(0)[:n]
            order = [i for i in np.lexsort((np.arange(n), -pooled)) if i < n - ww]
            want = sorted(set(range(n - ww, n)) | set(order[: keeps[comp.index(h)] - ww]))
            got_k = np.asarray(head_rows(p, kv_w, h)[0])[b, : keeps[comp.index(h)]]
            np.testing.assert_allclose(got_k, k[b, want, h], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="select_window"):
        HeteroCache.create(cfg, ratio=0.5, profile=prof, select_window=0)
    with pytest.raises(ValueError, match="odd"):
        HeteroCache.create(cfg, ratio=0.5, profile=prof, select_window=w, select_kernel=4)
