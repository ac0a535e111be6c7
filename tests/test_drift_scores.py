"""Score once (issue #12): the drift check's scores from the decode attention's own logits equal
the old second scoring pass over the pivot's prompt keys, and whole runs decide the same."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from convert.params import init_random_params
from hetero_jax.cache.drift_scores import drift_scores
from hetero_jax.cache.hetero import HeteroCache
from hetero_jax.cache.hetero_monitor import group_max_scores
from hetero_jax.generate import generate
from tests.test_hetero import make_cfg, np_group_scores, prompts, random_profile


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_scores_from_logits_equal_the_second_pass(seed, impl):
    """A block of P full heads with T prompt slots, generated rows after each sequence's prompt
    (the pool layout): scores from the attention's logits == group_max_scores over the prompt keys
    (the old path) up to the f32 dot's rounding, and both match float64 numpy."""
    rng = np.random.default_rng(seed)
    b, h, g, d, t, new = 2, 3, 3, 16, 96, 8
    plen = np.array([t, int(rng.integers(10, t))], np.int32)
    step = int(rng.integers(0, new))
    k = rng.standard_normal((b, h, t + new, d)).astype(np.float32)
    v = rng.standard_normal((b, h, t + new, d)).astype(np.float32)
    k[1, :, plen[1] + step + 1:] = 1e3  # unused rows (finite garbage: the XLA path multiplies them by 0)
    q = rng.standard_normal((b, h, g, d)).astype(np.float32)
    lens = np.repeat(plen[:, None] + step + 1, h, 1).astype(np.int32)
    pivots = (2, 0)
    fn = jax.jit(lambda q, k, v, n: pk.gather_attention(
        q, k.reshape(b, -1, d), v.reshape(b, -1, d), n, starts=tuple(i * (t + new) for i in range(h)),
        capacity=(t + new,) * h, logit_heads=pivots, logit_rows=t, impl=impl))
    _, logits = fn(*(jnp.asarray(x) for x in (q, k, v, lens)))
    got = np.asarray(drift_scores(logits, jnp.asarray(plen)))
    pk_ = jnp.asarray(k[:, list(pivots), :t])
    old = np.asarray(group_max_scores(jnp.asarray(q[:, list(pivots), :, None]), pk_, jnp.asarray(plen)[:, None]))
    # the same ops in the same order after the dot; the f32 dot's rounding may differ by shape (~1 ulp)
    np.testing.assert_allclose(got, old, rtol=2e-6, atol=1e-12)
    for bi in range(b):
        for j, pv in enumerate(pivots):
            n = int(plen[bi])
            np.testing.assert_allclose(got[bi, j, :n], np_group_scores(q[bi, pv], k[bi, pv], n), rtol=2e-5, atol=1e-8)
            assert (got[bi, j, n:] == -1e30).all()


def test_runs_decide_the_same_with_and_without_the_second_pass(seed):
    """Random profiles and configs: generate with the default check (scores from the attention's
    logits) and with check_impl="topk" (the original: a second scoring pass and lax.top_k index
    sets) -> the same greedy tokens, refresh events per pivot and per step, and rows moved."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=3, kv=4, group=int(rng.integers(1, 4)), d=16)
    prof = random_profile(cfg, rng)
    params = init_random_params(cfg, seed, scale=0.3)
    lengths = [int(rng.integers(100, 200)), int(rng.integers(30, 100))]
    toks = prompts(rng, lengths, 200)
    batch = [t[:n].tolist() for t, n in zip(toks, lengths)]
    thr = float(rng.uniform(0.5, 0.95))
    res = {}
    for impl in ("spread", "topk"):
        pol = HeteroCache.create(cfg, ratio=0.5, profile=prof, threshold=thr, steps=2, check_impl=impl)
        res[impl] = generate(params, batch, pol, config=cfg, max_new_tokens=12, progress=False)
    a, b = res["spread"], res["topk"]
    assert a.tokens == b.tokens
    for key in ("checks", "refreshes", "bytes_moved", "refreshes_per_layer", "per_pivot", "refresh_step_mask"):
        assert a.stats.get(key) == b.stats.get(key), key
