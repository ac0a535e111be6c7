"""The histogram top-K select (hetero_jax/cache/topk_select.py) against numpy: the exact set
``lax.top_k`` picks (ties to the lowest position, +0.0 above -0.0), on random inputs with ties,
masked (-1e30) and -inf padding, subnormals, k = 0 and k = T."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.cache.topk_select import (cut_mask, cut_overlap, kth_largest_key, sortable_key, topk_cut, topk_mask,
                                          topk_positions)


def np_topk_set(x, k):
    x = np.asarray(x, np.float64)
    return set(np.lexsort((np.arange(len(x)), np.signbit(x), -x))[:k].tolist())


def random_scores(rng, rows, t):
    x = rng.standard_normal((rows, t)).astype(np.float32)
    x[0:4] = np.round(x[0:4] * 2) / 2  # heavy ties, -0.0 beside +0.0
    x[4:6] = rng.choice(np.float32([0.0, -0.0, 1e-42, 3e-38, 1.0]), (2, t))  # subnormals and zeros
    x[6:8, t // 3:] = -1e30  # positions past a prompt (NEG_INF)
    x[8:10, t // 2:] = -np.inf
    x[10:12] = np.abs(x[10:12]) * 1e-3  # probability-like
    x[12:14] = rng.choice(np.float32([3.0, 3.0000002]), (2, t))  # neighbouring floats
    return x


def test_histogram_select_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    for t in (1, 7, int(rng.integers(100, 700)), 4099):
        rows = 16
        x = random_scores(rng, rows, t)
        k = rng.integers(0, t + 1, rows)
        k[:3] = [0, t, 1]
        k[6] = min(t, t // 3 + 2)  # the K-th falls inside the masked tail
        mask = np.asarray(jax.jit(topk_mask)(jnp.asarray(x), jnp.asarray(k)))
        for i in range(rows):
            assert set(np.flatnonzero(mask[i]).tolist()) == np_topk_set(x[i], k[i]), (t, i, k[i])
        # the K-th key itself, and the same set as lax.top_k
        kk = np.maximum(k, 1)
        keys = np.asarray(kth_largest_key(sortable_key(jnp.asarray(x)), jnp.asarray(kk)))
        u = np.asarray(sortable_key(jnp.asarray(x)))
        np.testing.assert_array_equal(keys, -np.sort(-u.astype(np.int64), axis=1)[np.arange(rows), kk - 1])
        order = np.asarray(jax.lax.top_k(jnp.asarray(x), t)[1])
        for i in range(rows):
            assert set(np.flatnonzero(mask[i]).tolist()) == set(order[i, : k[i]].tolist())


def test_cut_forms_agree_and_batch(seed):
    rng = np.random.default_rng(seed)
    t = int(rng.integers(50, 300))
    x = jnp.asarray(random_scores(rng, 24, t).reshape(2, 3, 4, t))
    k = jnp.asarray(rng.integers(0, t + 1, (2, 3, 4)))
    cut = topk_cut(x, k)
    mask = np.asarray(cut_mask(x, cut))
    np.testing.assert_array_equal(mask, np.asarray(topk_mask(x.reshape(24, t), k.reshape(24))).reshape(mask.shape))
    assert (mask.sum(-1) == np.asarray(k)).all()
    # overlap from the cut == overlap of the masks, for reference sets with sentinels
    kb = np.asarray(k)[:, 0, 0]
    ref = np.full((2, 3, 4, t), -5, np.int32)
    for idx in np.ndindex(2, 3, 4):
        ref[idx][: kb[idx[0]]] = rng.permutation(t)[: kb[idx[0]]]
    got = np.asarray(cut_overlap(x, cut, jnp.asarray(ref), jnp.asarray(kb)))
    for idx in np.ndindex(2, 3, 4):
        members = ref[idx][ref[idx] >= 0]
        assert got[idx] == np.float32(mask[idx][members].sum()) / np.float32(max(kb[idx[0]], 1))


def test_cut_without_excess_ties_takes_every_tie(seed):
    """Rows whose K-th key is not shared past K (distinct floats, or every tie inside the top K)
    skip the cumulative tie count: the same set as numpy, and ``last`` lets every tie in."""
    rng = np.random.default_rng(seed)
    t = int(rng.integers(200, 3000))
    x = rng.standard_normal((8, t)).astype(np.float32)
    x[0, : t // 2] = 7.0  # a block of ties, all taken below
    k = rng.integers(1, t + 1, 8)
    k[0] = t // 2 + int(rng.integers(0, t // 2))
    cut = jax.jit(topk_cut)(jnp.asarray(x), jnp.asarray(k))
    assert (np.asarray(cut[1]) == t - 1).all()  # the fast path ran
    mask = np.asarray(cut_mask(jnp.asarray(x), cut))
    for i in range(8):
        assert set(np.flatnonzero(mask[i]).tolist()) == np_topk_set(x[i], k[i]), (i, k[i])


def test_topk_positions_equal_sorted_top_k_prefix(seed):
    """The refresh's selection: positions of the top-k set in order == the sorted first k of
    lax.top_k(s, width), 0 past k, on scores with ties, masked tails and k from 0 to width."""
    from hetero_jax.cache.hetero_drift import in_position_order

    rng = np.random.default_rng(seed)
    t = int(rng.integers(200, 900))
    width = int(rng.integers(1, t))
    x = jnp.asarray(random_scores(rng, 16, t).reshape(2, 8, t))
    k = rng.integers(0, width + 1, (2, 8))
    k[0, :2] = [0, width]
    pos, m = jax.jit(topk_positions, static_argnums=2)(x, jnp.asarray(k), width)
    want_pos, want_m = in_position_order(jax.lax.top_k(x, width)[1], jnp.asarray(k))
    np.testing.assert_array_equal(np.asarray(m), np.asarray(want_m))
    np.testing.assert_array_equal(np.asarray(pos), np.asarray(want_pos))
