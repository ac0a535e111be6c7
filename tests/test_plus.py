"""Issue #13: the ``duo`` baseline and HeteroCache's sink/recent and page-refresh options
(``hetero_plus``) against float64 numpy references on small random configs."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.params import init_random_params
from hetero_jax.cache import make_policy
from hetero_jax.cache import hetero_pages
from hetero_jax.cache.duo import DuoAttention
from hetero_jax.cache.full import FullKV
from hetero_jax.cache.hetero_plus import HeteroPlus
from tests.test_hetero import QueryTap, TappedHetero, make_cfg, prompts, random_profile, run


def run_copies(params, cfg, policy, tokens, lengths, n_steps):
    """``test_hetero.run`` with every step's cache copied to numpy (refreshes donate the layers)."""
    import functools

    from hetero_jax import model

    pf = jax.jit(functools.partial(model.prefill, cfg=cfg, policy=policy, max_new_tokens=n_steps + 1))
    st = jax.jit(functools.partial(model.decode_step, cfg=cfg, policy=policy))
    logits, cache = pf(params, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32))
    cache = policy.after_prefill(cache)
    copies = [jax.tree.map(np.array, cache)]
    for _ in range(n_steps):
        cache = policy.before_step(cache)
        host = cache.host
        logits, cache = st(params, dataclasses.replace(cache, host=None), jnp.argmax(logits, -1).astype(jnp.int32))
        cache = dataclasses.replace(cache, host=host)
        copies.append(jax.tree.map(np.array, cache))
    return copies, cache

NEG = -1e30
LAYOUTS = [([(0, [1, 2])], "aaaa"), ([], "aava"), ([], "aaaa"), ([(3, [0])], "aaaa")]  # F = 3 of 16


def _rows_to_positions(rows, keys):
    """The prompt positions whose keys are ``rows`` (random keys are distinct)."""
    return np.array([int(np.flatnonzero((keys == r).all(1))[0]) for r in rows])


# ------------------------------------------------------------------------------------ duo
@pytest.mark.parametrize("heads", ["roles", "unstable"])
def test_duo_keeps_exactly_retrieval_heads_and_sink_recent(seed, heads):
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=2, kv=4, group=2)
    prof = random_profile(cfg, rng, [([(1, [0, 3])], "aaav"), ([], "avaa")])
    ratio = float(rng.uniform(0.45, 0.8))
    n_sink = int(rng.integers(0, 6))
    pol = DuoAttention.create(cfg, ratio=ratio, profile=prof, heads=heads, n_sink=n_sink)
    stab = np.asarray(prof.stability)
    if heads == "roles":
        want_full = np.array([[r in ("pivot", "volatile") for r in layer] for layer in prof.roles])
    else:
        want_full = np.zeros(stab.size, bool)
        want_full[np.argsort(stab.ravel(), kind="stable")[:prof.num_full]] = True
        want_full = want_full.reshape(stab.shape)
    np.testing.assert_array_equal(np.array(pol.full), want_full)
    n_heads, f = stab.size, prof.num_full
    b, t, hkv, g, d = 2, 256, 4, 2, 16
    q = rng.standard_normal((b, t, hkv * g, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    lengths = np.array([t, int(rng.integers(30, t))], np.int32)
    for layer in range(2):
        st = jax.jit(lambda *a, layer=layer: pol.build_layer(layer, *a, 3))(q, k, v, lengths)
        _, _, starts = pol.layout(layer, t, 3)
        for bi, n_real in enumerate(lengths.tolist()):
            n = int((ratio * n_heads - f) * n_real / (n_heads - f))
            for h in range(hkv):
                keep = int(np.asarray(st.keep)[bi, h])
                rows = slice(starts[h], starts[h] + keep)
                if want_full[layer, h]:
                    pos = np.arange(n_real)
                else:
                    s = min(n_sink, n)
                    pos = np.concatenate([np.arange(s), np.arange(n_real - (n - s), n_real)]).astype(int)
                assert keep == len(pos)
                np.testing.assert_array_equal(np.asarray(st.k)[bi, rows], k[bi, pos, h])
                np.testing.assert_array_equal(np.asarray(st.v)[bi, rows], v[bi, pos, h])


def test_duo_decode_attends_over_kept_rows_float64(seed):
    """One decode step's output equals float64 attention over exactly the kept rows + the new token."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=1, kv=4, group=2)
    prof = random_profile(cfg, rng, [([(2, [1])], "aaaa")])
    pol = DuoAttention.create(cfg, ratio=0.5, profile=prof)
    b, t, hkv, g, d = 2, 128, 4, 2, 16
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for h in (hkv * g, hkv, hkv))
    lengths = np.array([t, 77], np.int32)
    st = pol.build_layer(0, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), 4)
    qn, kn, vn = (rng.standard_normal((b, h, d)).astype(np.float32) for h in (hkv * g, hkv, hkv))
    from hetero_jax.cache.base import Cache
    cache = Cache(layers=(st,), lengths=jnp.asarray(lengths), step=jnp.asarray(0, jnp.int32))
    out, _ = pol.decode_layer(0, st, jnp.asarray(qn), jnp.asarray(kn), jnp.asarray(vn), cache)
    _, _, starts = pol.layout(0, t, 4)
    for bi in range(b):
        for h in range(hkv):
            kp = int(np.asarray(st.keep)[bi, h])
            keys = np.concatenate([np.asarray(st.k)[bi, starts[h]:starts[h] + kp], kn[bi, h][None]]).astype(np.float64)
            vals = np.concatenate([np.asarray(st.v)[bi, starts[h]:starts[h] + kp], vn[bi, h][None]]).astype(np.float64)
            for j in range(g):
                s = keys @ qn[bi, h * g + j].astype(np.float64) / math.sqrt(d)
                p = np.exp(s - s.max())
                np.testing.assert_allclose(np.asarray(out)[bi, h * g + j], p @ vals / p.sum(), rtol=2e-5, atol=2e-5)


def test_duo_ratio_errors(seed):
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=4, kv=4)
    prof = random_profile(cfg, rng, LAYOUTS)
    with pytest.raises(ValueError, match="F/N"):
        DuoAttention.create(cfg, ratio=0.15, profile=prof)  # F/N = 3/16
    with pytest.raises(ValueError, match="heads"):
        DuoAttention.create(cfg, ratio=0.5, profile=prof, heads="echo")
    with pytest.raises(ValueError, match="unknown option"):
        DuoAttention.create(cfg, ratio=0.5, profile=prof, window=8)


# ------------------------------------------------------------------------------------ device bytes
@pytest.mark.parametrize("name,ratio", [("duo", 0.5), ("duo", 0.3), ("hetero_plus", 0.5), ("hetero_plus", 0.3)])
def test_device_bytes_follow_the_ratio(seed, name, ratio):
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=4, kv=4)
    prof = random_profile(cfg, rng, LAYOUTS, stab_range=(0.45, 0.95))
    params = init_random_params(cfg, seed, scale=0.1)
    t, max_new = 512, 16
    pol = make_policy(name, cfg, ratio=ratio, profile=prof)
    _, caches = run(params, cfg, pol, prompts(rng, [t], t), [t], 0, max_new)
    stats = pol.stats(caches[0])
    per_token = cfg.kv_bytes_per_token()
    target = ratio * t * per_token + max_new * per_token
    extra = 0
    if name == "hetero_plus":  # the drift state (reference sets, scores, queries) is not KV
        extra = sum(hetero_plus_drift_bytes(st) for st in caches[0].layers)
        bounds = sum(st.pages.kmin.nbytes + st.pages.kmax.nbytes for st in caches[0].layers if st.pages is not None)
        assert bounds > 0
    if name == "hetero_plus":  # the budget formula (plus the bounds) is r x full; the pool allocates per plan
        slots = stats["prompt_slots_budget"] + bounds // (2 * cfg.head_dim * 4)
        assert abs(slots / (ratio * 16 * t) - 1) < 0.02, (slots, ratio * 16 * t)
        alloc = stats["prompt_slots_device"] + 16 * max_new
        assert abs(stats["device_bytes"] - extra - (alloc * 2 * cfg.head_dim * 4 + bounds)) < 0.01 * stats["device_bytes"]
        return
    assert abs(stats["device_bytes"] - extra - target) / target < 0.05, (stats["device_bytes"], extra, target)
    full = FullKV().stats(run(params, cfg, FullKV(), prompts(rng, [t], t), [t], 0, max_new)[1][0])["device_bytes"]
    assert stats["device_bytes"] - extra < (ratio + 0.05) * full


def hetero_plus_drift_bytes(st):
    if st.drift is None:
        return 0
    pages = sum(x.nbytes for x in jax.tree.leaves(st.pages)) - st.pages.kmin.nbytes - st.pages.kmax.nbytes
    return sum(x.nbytes for x in jax.tree.leaves(st.drift)) + pages


# ------------------------------------------------------------------------------------ sink / recent
def _plus_setup(seed, **options):
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=2, kv=4)
    prof = random_profile(cfg, rng, [([(0, [1, 2])], "aaaa"), ([(2, [3])], "avaa")])
    params = init_random_params(cfg, seed, scale=0.3)
    lengths = [256, int(rng.integers(90, 256))]
    pol = HeteroPlus.create(cfg, ratio=0.5, profile=prof, **options)
    return rng, cfg, prof, params, lengths, prompts(rng, lengths, 256), pol


@pytest.mark.parametrize("refresh_by", ["pages", "pivot"])
def test_sink_and_recent_rows_always_kept(seed, refresh_by):
    """After prefill and after every refresh (one at every check), each compressed head holds the
    sink and recent positions' keys."""
    rng, cfg, prof, params, lengths, toks, pol = _plus_setup(seed, sink=3, recent=9, threshold=1.0, steps=2,
                                                             refresh_by=refresh_by)
    caches, last = run_copies(params, cfg, pol, toks, lengths, 7)
    assert pol.stats(last)["refreshes"] > 0
    host = caches[-1].host.kv
    for l in range(2):
        p = pol.plan(l, 256, 8)
        for cache in caches:
            st = cache.layers[l]
            for h in range(4):
                if p.full[h]:
                    continue
                # the head's whole prompt keys: the satellites' host copy; anchors never change
                for bi, n in enumerate(lengths):
                    kp = int(np.asarray(st.keep)[bi, h])
                    rows = np.asarray(st.comp_k)[bi, p.slots[h], :kp]
                    if h in p.sats:
                        keys = np.asarray(host[l][0])[bi, p.sats.index(h), :n]
                        pos = _rows_to_positions(rows, keys)
                    else:
                        first = caches[0].layers[l]
                        np.testing.assert_array_equal(rows, np.asarray(first.comp_k)[bi, p.slots[h], :kp])
                        continue
                    forced = set(range(3)) | set(range(n - 9, n))
                    assert forced <= set(pos.tolist()), (l, h, bi, sorted(forced - set(pos.tolist())))
                    assert (np.diff(pos) > 0).all()


def np_forced_order(tok, n, sink, recent):
    """float64 reference of the order a compressed head keeps prompt positions in: the first
    min(sink, n) positions, then the last ``recent`` newest first, then the rest by score (ties to
    the lowest position); positions >= n never."""
    sinks = list(range(min(sink, n)))
    rec = [i for i in range(n - 1, max(n - recent, 0) - 1, -1) if i not in sinks]
    rest = [int(i) for i in np.argsort(-tok[:n], kind="stable") if i not in sinks and i not in rec]
    return np.array(sinks + rec + rest)


@pytest.mark.parametrize("shape", ["short", "long"])
def test_force_kept_orders_sinks_then_newest_then_scores(seed, shape):
    """A head's cap can be below sink + recent (a chat prompt of a few dozen tokens): it must then
    keep the sinks and the newest tokens (the question), not the lowest positions."""
    rng = np.random.default_rng(seed)
    b, h, t = 3, 2, 96
    sink, recent = int(rng.integers(0, 6)), int(rng.integers(1, 70))
    hi = min(sink + recent, t) if shape == "short" else t
    lengths = rng.integers(1, hi + 1, size=b).astype(np.int32)
    scores = rng.random((b, h, t)).astype(np.float32)
    scores[:, :, 7] = scores[:, :, 11]  # a tie among the scored tokens
    got = np.asarray(hetero_pages.force_kept(jnp.asarray(scores), jnp.asarray(lengths), sink, recent))
    for bi in range(b):
        n = int(lengths[bi])
        for hi_ in range(h):
            want = np_forced_order(scores[bi, hi_].astype(np.float64), n, sink, recent)
            for cap in sorted({1, max(n // 2, 1), n}):  # what a top-cap keeps
                order = jnp.argsort(-jnp.where(jnp.arange(t) < n, jnp.asarray(got[bi, hi_]), -jnp.inf),
                                    stable=True)
                _, kept = jax.lax.top_k(jnp.where(jnp.arange(t) < n, jnp.asarray(got[bi, hi_]), -jnp.inf), cap)
                assert set(np.asarray(kept).tolist()) == set(want[:cap].tolist()), (bi, hi_, n, cap)
                np.testing.assert_array_equal(np.asarray(order)[:n], want)


@pytest.mark.parametrize("refresh_by", ["pages", "pivot"])
def test_a_prompt_shorter_than_sink_plus_recent_keeps_sinks_and_newest(seed, refresh_by):
    """hetero_plus's defaults (sink 4, recent 64) on prompts of a few dozen tokens: every compressed
    head's cap is below sink + recent, so after prefill and after each refresh it holds the sinks
    and its newest prompt tokens (a chat prompt's question), nothing older."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=2, kv=4)
    prof = random_profile(cfg, rng, [([(0, [1, 2])], "aaaa"), ([(2, [3])], "avaa")])
    params = init_random_params(cfg, seed, scale=0.3)
    t = 48
    lengths = [int(rng.integers(30, t + 1)), int(rng.integers(12, 30))]
    pol = HeteroPlus.create(cfg, ratio=0.5, profile=prof, threshold=1.0, steps=2, refresh_by=refresh_by)
    caches, last = run_copies(params, cfg, pol, prompts(rng, lengths, t), lengths, 5)
    assert pol.stats(last)["refreshes"] > 0
    host = caches[-1].host.kv
    checked = 0
    for l in range(2):
        p = pol.plan(l, t, 6)
        for cache in caches:
            st = cache.layers[l]
            for h in p.sats:
                for bi, n in enumerate(lengths):
                    kp = int(np.asarray(st.keep)[bi, h])
                    assert kp < min(4 + 64, n)
                    if kp == 0:  # the random profile's budget at this length
                        continue
                    keys = np.asarray(host[l][0])[bi, p.sats.index(h), :n]
                    pos = _rows_to_positions(np.asarray(st.comp_k)[bi, p.slots[h], :kp], keys)
                    want = list(range(min(4, kp))) + list(range(n - (kp - min(4, kp)), n))
                    np.testing.assert_array_equal(pos, want, err_msg=str((l, h, bi, n, kp)))
                    checked += 1
    assert checked >= len(caches)


# ------------------------------------------------------------------------------------ page bounds
def np_page_scores(q, keys, n, page):
    """float64: q (G, D), keys (T, D), n real rows -> per page max over the group of
    sum_d max(q_d min_d, q_d max_d) over the page's real rows; NEG past the prompt."""
    t = keys.shape[0]
    out = np.full(-(-t // page), NEG)
    for i in range(len(out)):
        rows = keys[i * page: min((i + 1) * page, n)].astype(np.float64)
        if i * page >= n:
            continue
        lo, hi = rows.min(0), rows.max(0)
        out[i] = max(np.maximum(qq * lo, qq * hi).sum() for qq in q.astype(np.float64))
    return out


def test_page_scores_match_numpy_and_bound_every_key(seed):
    rng = np.random.default_rng(seed)
    b, s, t, d, g, page = 2, 3, 200, 16, 3, int(rng.choice([16, 32]))
    kt = rng.standard_normal((b, s, t, d)).astype(np.float32)
    q = rng.standard_normal((b, s, g, d)).astype(np.float32)
    plen = np.array([t, int(rng.integers(20, t))], np.int32)
    kmin, kmax = hetero_pages.page_bounds(jnp.asarray(kt), jnp.asarray(plen), page)
    got = np.asarray(hetero_pages.page_scores(jnp.asarray(q), kmin, kmax, jnp.asarray(plen), page))
    for bi in range(b):
        for j in range(s):
            want = np_page_scores(q[bi, j], kt[bi, j], plen[bi], page)
            np.testing.assert_allclose(got[bi, j], want, rtol=1e-5, atol=1e-4)
            exact = q[bi, j].astype(np.float64) @ kt[bi, j, :plen[bi]].astype(np.float64).T  # (G, n)
            for i in range(-(-plen[bi] // page)):  # an upper bound of every real key's q.k in the page
                assert exact[:, i * page:(i + 1) * page].max() <= got[bi, j, i] + 1e-4


@pytest.mark.parametrize("impl,stagger", [("spread", False), ("select", True)])
def test_page_scores_at_each_check_are_the_satellites_own(seed, impl, stagger):
    """At every check step of a layer (its phase with ``stagger``) its satellites' page scores are
    those of their own query of that step (the queries the attention got, tapped), float64
    numpy; at the other steps they do not move."""
    rng, cfg, prof, params, lengths, toks, _ = _plus_setup(seed)
    tap, n, page = QueryTap(), 7, 32
    pol = TappedHetero.create(cfg, ratio=0.5, profile=prof, sink=4, recent=64, refresh_by="pages", page_size=page,
                              steps=3, check_impl=impl, stagger=stagger, threshold=float(rng.uniform(0.3, 0.9)),
                              tap=tap)
    caches, _ = run_copies(params, cfg, pol, toks, lengths, n)
    host = caches[-1].host.kv
    for l in range(2):
        p, phase = pol.plan(l, 256, n + 1), l % 3 if stagger else 0
        due = [s for s in range(n) if s + 1 - phase > 0 and (s + 1 - phase) % 3 == 0]
        assert len(due) >= 2
        for s in range(n):
            got, before = caches[s + 1].layers[l].pages.score, caches[s].layers[l].pages.score
            if s not in due:
                np.testing.assert_array_equal(got, before)
                continue
            for bi, length in enumerate(lengths):
                for i, j in enumerate(p.sats):
                    keys = np.asarray(host[l][0])[bi, i]
                    want = np_page_scores(tap.group(s, l, j, cfg.num_kv_heads)[bi], keys, length, page)
                    np.testing.assert_allclose(got[bi, i], want, rtol=1e-5, atol=1e-4)


def test_page_selection_matches_numpy(seed):
    """select_rows: per satellite, the forced tokens plus the best pages' tokens (ties to the lowest
    position), cap_j tokens in position order, only for triggered sequences."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=1, kv=4)
    prof = random_profile(cfg, rng, [([(0, [1, 3])], "aava")])
    page, sink, recent = 16, int(rng.integers(0, 5)), int(rng.integers(0, 20))
    pol = HeteroPlus.create(cfg, ratio=0.6, profile=prof, page_size=page, sink=sink, recent=recent)
    t, b = 256, 2
    p = pol.plan(0, t, 4)
    plen = np.array([t, int(rng.integers(100, t))], np.int32)
    npg = t // page
    score = rng.standard_normal((b, 2, npg)).astype(np.float32)
    score[:, :, 3] = score[:, :, 5]  # a tie between pages
    score[1, :, -(-plen[1] // page):] = NEG
    keep = np.array([[pol._profile().head_budget(0, h, pol.budget_ratio, int(n)) for h in range(4)] for n in plen],
                    np.int32)
    flag = np.array([[True], [bool(rng.integers(0, 2))]])
    pages = hetero_pages.PageState(jnp.zeros((b, 2, npg, 16)), jnp.zeros((b, 2, npg, 16)), jnp.asarray(score),
                                   jnp.asarray(plen))
    live = [j for j in p.sats if p.caps[j] > 0]
    pos, m = hetero_pages.select_rows(pol, p, pages, jnp.asarray(flag), jnp.asarray(keep), 0, live)
    pos, m = np.asarray(pos), np.asarray(m)
    for bi in range(b):
        n = int(plen[bi])
        for i, j in enumerate(live):
            kj = int(keep[bi, j])
            if not flag[bi, 0]:
                assert not m[bi, i].any()
                continue
            tok = np.repeat(score[bi, p.sats.index(j)].astype(np.float64), page)[:t]
            want = np.sort(np_forced_order(tok, n, sink, recent)[:kj])
            assert m[bi, i].sum() == kj
            np.testing.assert_array_equal(pos[bi, i, :kj], want)


def test_page_refresh_writes_own_choice_from_host(seed):
    """End to end: a check with refresh (threshold 1) writes, for each satellite, the host rows at
    the positions its own page scores (stored at the check) select."""
    rng, cfg, prof, params, lengths, toks, pol = _plus_setup(seed, threshold=1.0, steps=3, sink=2, recent=5)
    caches, last = run_copies(params, cfg, pol, toks, lengths, 4)  # check in step 3, refresh before step 4
    after = caches[4]
    for l in range(2):
        p = pol.plan(l, 256, 5)
        st = after.layers[l]
        sc = np.asarray(caches[3].layers[l].pages.score)
        hk = np.asarray(after.host.kv[l][0])
        for bi, n in enumerate(lengths):
            for j in p.sats:
                kj = int(np.asarray(st.keep)[bi, j])
                tok = np.repeat(sc[bi, p.sats.index(j)].astype(np.float64), pol.page_size)[:256]
                tok[:2] = np.inf
                tok[n - 5:n] = np.inf
                tok[n:] = -np.inf
                want = np.sort(np.argsort(-tok, kind="stable")[:kj])
                np.testing.assert_array_equal(np.asarray(st.comp_k)[bi, p.slots[j], :kj],
                                              hk[bi, p.sats.index(j), want])
    assert pol.stats(last)["refreshes"] > 0


def test_plus_options_and_defaults(seed):
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=4, kv=4)
    prof = random_profile(cfg, rng, LAYOUTS)
    plus = make_policy("hetero_plus", cfg, ratio=0.5, profile=prof)
    plain = make_policy("hetero", cfg, ratio=0.5, profile=prof)
    assert (plain.sink, plain.recent, plain.refresh_by, plain.budget_ratio) == (0, 0, "pivot", 0.5)
    assert (plus.sink, plus.recent, plus.refresh_by) == (4, 64, "pages")
    n_sats = 3
    assert plus.budget_ratio == pytest.approx(0.5 - n_sats / (16 * plus.page_size))
    for bad, match in (({"sink": -1}, "sink"), ({"page_size": 0}, "page_size"), ({"refresh_by": "own"}, "refresh_by"),
                       ({"refresh_when": "pivot_and_own"}, "refresh_when"), ({"own_threshold": 1.5}, "own_threshold"),
                       ({"refresh_when": "own", "refresh_by": "pivot"}, "refresh_by=pages")):
        with pytest.raises(ValueError, match=match):
            make_policy("hetero_plus", cfg, ratio=0.5, profile=prof, **bad)
    with pytest.raises(ValueError, match="page bounds"):  # F/N = 3/16 = 0.1875; bounds take 3/16/1 of it
        make_policy("hetero_plus", cfg, ratio=0.2, profile=prof, page_size=1)


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.real_model
@pytest.mark.parametrize("cache", ["duo", "hetero_plus"])
def test_cli_generate_runs(capsys, cache):
    from hetero_jax import cli

    rc = cli.run(["generate", "--model", "default", "--prompt", "The capital of France is", "--cache", cache,
                  "--ratio", "0.5", "--max-new-tokens", "4", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["cache"]["policy"] == cache and len(out["tokens"]) == 4


# ------------------------------------------------------------------------------------ fitted profile
def test_fit_sim_threshold_picks_nearest_threshold_within_the_fraction(seed):
    from hetero_jax.profiling import SIM_GRID, classify, fit_sim_threshold

    rng = np.random.default_rng(seed)
    layers, hkv, k, t = 4, 3, 40, 200
    base = rng.permutation(t)[:k]
    pre = np.empty((layers, 1, hkv, k), np.int64)
    for l in range(layers):  # heads share a random part of one set: overlaps spread over (0, 1)
        for h in range(hkv):
            share = int(rng.integers(0, k + 1))
            rest = rng.permutation(np.setdiff1d(np.arange(t), base[:share]))[: k - share]
            pre[l, 0, h] = np.concatenate([base[:share], rest])
    dec = np.stack([pre] * 3)  # stable heads: unique heads become anchors
    dec[:, 0, 0, 0] = rng.permutation(t)[:k]  # ... except one volatile head
    frac = {thr: np.mean([r in ("pivot", "volatile") for layer in classify(pre, dec, sim_threshold=thr)[0]
                          for r in layer]) for thr in SIM_GRID}
    target = float(rng.choice(sorted(set(frac.values()))))
    got = fit_sim_threshold(pre, dec, max_full_fraction=target, sim_threshold=0.5)
    ok = [thr for thr in SIM_GRID if frac[thr] <= target]
    assert frac[got] <= target
    assert abs(got - 0.5) == min(abs(thr - 0.5) for thr in ok)
    with pytest.raises(ValueError, match="no similarity threshold"):
        fit_sim_threshold(pre, dec, max_full_fraction=min(frac.values()) / 2)


# ------------------------------------------------------------------------------------ budget_by="layer"
def np_layer_caps(prof, ratio, n):
    """float64 reference: bisection for the base B with sum_l C_l min(n, B W_l) = (r N - F) n."""
    count = np.array([sum(not prof.is_full(l, h) for h in range(len(r))) for l, r in enumerate(prof.roles)])
    top = np.array([max([w for h, w in enumerate(ws) if not prof.is_full(l, h)] or [0.0])
                    for l, ws in enumerate(prof.weights)])
    target = np.floor((ratio * prof.num_heads - prof.num_full) * n)
    lo, hi = 0.0, 10.0 * n + 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (count * np.minimum(n, mid * top)).sum() <= target else (lo, mid)
    return np.minimum(np.floor(lo * top), n).astype(int), count, target


def test_layer_caps_match_a_float64_reference(seed):
    from hetero_jax.cache.hetero_pool import layer_caps

    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=4, kv=4)
    prof = random_profile(cfg, rng, LAYOUTS, stab_range=(0.05, 0.95))
    ratio = float(rng.uniform(0.3, 0.95))
    t = int(rng.integers(40, 300))
    table = layer_caps(prof, ratio, t)
    assert table.shape == (t + 1, 4)
    for n in [0, 1, 2, t // 3, t - 1, t] + rng.integers(0, t + 1, 5).tolist():
        want, count, target = np_layer_caps(prof, ratio, n)
        got = table[n].astype(int)
        assert (np.abs(got - want) <= 1).all(), (n, got, want)
        held = int((count * got).sum())
        assert held <= target and held >= target - count.sum() - len(count), (n, held, target)
        assert (got <= n).all()


@pytest.mark.parametrize("ratio", [0.5, 0.35])
def test_budget_by_layer_fills_the_padding_and_holds_the_ratio(seed, ratio):
    """Every compressed head of a layer keeps its layer's cap (its block's rows are all used), the
    kept rows are the top rows by the selection scores as with budget_by="head", and the blocks
    allocate r x full (less the page bounds), padding included."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=4, kv=4)
    prof = random_profile(cfg, rng, LAYOUTS, stab_range=(0.05, 0.95))
    params = init_random_params(cfg, seed, scale=0.1)
    t, max_new = 384, 8
    pol = make_policy("hetero_plus", cfg, ratio=ratio, profile=prof, budget_by="layer")
    head = make_policy("hetero_plus", cfg, ratio=ratio, profile=prof)
    lengths = [t, int(rng.integers(100, t))]
    _, caches = run(params, cfg, pol, prompts(rng, lengths, t), lengths, 0, max_new)
    stats = pol.stats(caches[0])
    assert stats["prompt_slots_device"] == stats["prompt_slots_budget"]
    n_heads = 16
    want = (pol.budget_ratio * n_heads) * t
    assert want - n_heads - 4 <= stats["prompt_slots_device"] <= want
    assert stats["prompt_slots_device"] <= sum(head.plan(l, t, max_new).prompt_slots(t) for l in range(4))
    for l, st in enumerate(caches[0].layers):
        p = pol.plan(l, t, max_new)
        keep = np.asarray(st.keep)
        comp = [h for h in range(4) if not p.full[h]]
        assert len({p.caps[h] for h in comp}) <= 1
        for bi, n in enumerate(lengths):
            for h in comp:
                assert keep[bi, h] == p.keep_tables[h][n] == layer_caps_of(pol, t)[n, l]
            for h in range(4):
                if p.full[h]:
                    assert keep[bi, h] == n


def layer_caps_of(pol, t):
    from hetero_jax.cache.hetero_pool import layer_caps

    return layer_caps(pol._profile(), pol.budget_ratio, t)
