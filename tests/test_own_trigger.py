"""Issue #13: ``refresh_when="own"``, satellites that decide for themselves when to refresh by
their page bounds (``hetero_pages.own_check``), against float64 numpy on small random configs."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from hetero_jax.cache import hetero_pages
from hetero_jax.cache.hetero_plus import HeteroPlus
from tests.test_hetero import make_cfg, random_profile
from tests.test_plus import NEG, _plus_setup, np_page_scores, run_copies


def np_own_pages(keep, n, page, sink, recent, npg):
    """m_j: the pages left in budget ``keep`` after the forced tokens, in [1, real pages]."""
    return int(np.clip(math.ceil((keep - sink - recent) / page), 1, min(math.ceil(n / page), npg)))


def np_top_pages(score, m):
    """float64 set of the top m pages, ties to the lowest page (as lax.top_k)."""
    return set(np.argsort(-score.astype(np.float64), kind="stable")[:m].tolist())


def test_own_check_matches_numpy(seed):
    """own_check: per sequence and satellite, the top m_j pages of the new scores, their overlap
    with the reference pages, fired below own_threshold, the reference replaced only where fired;
    the counters."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=1, kv=4)
    prof = random_profile(cfg, rng, [([(0, [1, 3])], "aava")])
    page, sink, recent, thr = 16, int(rng.integers(0, 5)), int(rng.integers(0, 40)), float(rng.uniform(0.2, 0.9))
    pol = HeteroPlus.create(cfg, ratio=0.6, profile=prof, page_size=page, sink=sink, recent=recent,
                            refresh_when="own", own_threshold=thr)
    b, s, npg = 3, 2, 16
    plen = np.array([256, int(rng.integers(60, 256)), int(rng.integers(20, 60))], np.int32)
    keep = rng.integers(1, 120, (b, s)).astype(np.int32)
    score = rng.standard_normal((b, s, npg)).astype(np.float32)
    score[:, :, 4] = score[:, :, 9]  # a tie
    for bi in range(b):
        score[bi, :, -(-plen[bi] // page):] = NEG
    ref = rng.random((b, s, npg)) < 0.4
    if rng.random() < 0.5:  # a reference equal to the new top set somewhere: never fires
        ref[0, 0] = False
        ref[0, 0, list(np_top_pages(score[0, 0], np_own_pages(keep[0, 0], plen[0], page, sink, recent, npg)))] = True
    pages = hetero_pages.PageState(jnp.zeros((b, s, npg, 8)), jnp.zeros((b, s, npg, 8)), jnp.zeros((b, s, npg)),
                                   jnp.asarray(plen), None, jnp.asarray(ref), jnp.zeros((b, s), bool),
                                   jnp.asarray(4, jnp.int32), jnp.asarray([2, 0], jnp.int32))
    got = hetero_pages.own_check(pol, pages, jnp.asarray(score), jnp.asarray(keep))
    fired_any = np.zeros(s, bool)
    for bi in range(b):
        for j in range(s):
            m = np_own_pages(keep[bi, j], plen[bi], page, sink, recent, npg)
            top = np_top_pages(score[bi, j], m)
            overlap = len(top & set(np.flatnonzero(ref[bi, j]).tolist())) / m
            fired = overlap < thr
            assert bool(got.own[bi, j]) == fired, (bi, j, overlap, thr)
            want = sorted(top) if fired else np.flatnonzero(ref[bi, j]).tolist()
            assert np.flatnonzero(np.asarray(got.ref[bi, j])).tolist() == want
            fired_any[j] |= fired
    assert int(got.checks) == 5
    np.testing.assert_array_equal(np.asarray(got.refreshes), np.array([2, 0]) + fired_any)
    np.testing.assert_array_equal(np.asarray(got.score), score)


def test_own_reference_pages_at_prefill(seed):
    """init_pages with refresh_when "own": each satellite's reference is the top m_j pages of the
    last prompt query's page bounds (numpy float64)."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=1, kv=4)
    prof = random_profile(cfg, rng, [([(0, [1, 3])], "aava")])
    pol = HeteroPlus.create(cfg, ratio=0.6, profile=prof, page_size=16, refresh_when="own")
    p, b, t, d, g = pol.plan(0, 128, 4), 2, 128, 16, 2
    kt = rng.standard_normal((b, 4, t, d)).astype(np.float32)
    last_q = rng.standard_normal((b, 4, g, d)).astype(np.float32)
    lengths = np.array([t, int(rng.integers(30, t))], np.int32)
    keep = rng.integers(20, 90, (b, 4)).astype(np.int32)
    pages = hetero_pages.init_pages(pol, p, jnp.asarray(kt), jnp.zeros((b, t, 8, d)), jnp.asarray(lengths),
                                    jnp.asarray(keep), jnp.asarray(last_q))
    assert not np.asarray(pages.own).any() and int(pages.checks) == 0
    for bi in range(b):
        for i, j in enumerate(p.sats):
            score = np_page_scores(last_q[bi, j], kt[bi, j], lengths[bi], 16)
            m = np_own_pages(keep[bi, j], lengths[bi], 16, 4, 64, 8)
            assert set(np.flatnonzero(np.asarray(pages.ref)[bi, i]).tolist()) == np_top_pages(score, m)


@pytest.mark.parametrize("lag", [1, 2])
def test_own_trigger_refreshes_exactly_the_fired_satellites(seed, lag):
    """End to end, refresh_when "own": at every check each satellite's decision follows its stored
    reference pages and its page scores (numpy); a fired satellite's rows become the host rows at
    its own choice (``lag`` steps after the check), the others keep theirs; bytes moved count the
    fired satellites only."""
    rng = np.random.default_rng(seed)
    thr = float(rng.uniform(0.5, 0.95))
    _, cfg, prof, params, lengths, toks, pol = _plus_setup(seed, steps=3, sink=2, recent=5, refresh_when="own",
                                                           own_threshold=thr, lag=lag)
    n = 9
    caches, last = run_copies(params, cfg, pol, toks, lengths, n)  # checks in steps 3, 6, 9 (caches 3, 6, 9)
    fired_any, kept_any, moved = 0, 0, 0
    for l in range(2):
        p = pol.plan(l, 256, n + 1)
        live = [j for j in p.sats if p.caps[j] > 0]
        for c in (3, 6):
            before, at, after = caches[c - 1].layers[l], caches[c].layers[l], caches[c + lag].layers[l]
            hk = np.asarray(caches[c].host.kv[l][0])
            for bi, length in enumerate(lengths):
                for j in live:
                    i = p.sats.index(j)
                    kj = int(np.asarray(at.keep)[bi, j])
                    m = np_own_pages(kj, length, 32, 2, 5, 8)
                    top = np_top_pages(np.asarray(at.pages.score)[bi, i], m)
                    old = set(np.flatnonzero(np.asarray(before.pages.ref)[bi, i]).tolist())
                    fired = len(top & old) / m < thr
                    assert bool(np.asarray(at.pages.own)[bi, i]) == fired
                    rows = np.asarray(after.comp_k)[bi, p.slots[j], :kj]
                    if not fired:
                        np.testing.assert_array_equal(rows, np.asarray(before.comp_k)[bi, p.slots[j], :kj])
                        kept_any += 1
                        continue
                    fired_any += 1
                    tok = np.repeat(np.asarray(at.pages.score)[bi, i].astype(np.float64), 32)[:256]
                    tok[:2] = np.inf
                    tok[length - 5:length] = np.inf
                    tok[length:] = -np.inf
                    want = np.sort(np.argsort(-tok, kind="stable")[:kj])
                    np.testing.assert_array_equal(rows, hk[bi, i, want])
            moved += 2 * sum(p.caps[j] for j in live if np.asarray(at.pages.own)[:, p.sats.index(j)].any())
    assert fired_any > 0 and kept_any > 0  # both branches ran
    stats = pol.stats(last)  # the third check (step 9) has no step after it to refresh before
    assert stats["bytes_moved"] == moved * 2 * cfg.head_dim * 4
    assert stats["counted_per"] == "satellite" and stats["checks"] == 3 * (2 + 1)
    assert stats["refreshes"] == sum(int(np.asarray(last.layers[l].pages.refreshes).sum()) for l in range(2))
