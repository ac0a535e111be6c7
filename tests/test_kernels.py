"""pallas_kernels against float64 numpy: the XLA path and the Pallas kernels (interpret mode, CPU).

Every test draws fresh data (``seed`` fixture / hypothesis), Pallas outputs are poisoned with
NaN before each run (aliased outputs: an element the kernel forgets to write stays NaN), and
rows a head must not read hold garbage: large finite values for XLA (it multiplies them by 0),
NaN for Pallas (it must never load them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from pallas_kernels.attention import gather_attention_pallas, plan
from pallas_kernels.xla import segment_strategy, take_static

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
IMPLS = ["xla", "pallas"]


def np_attention(q, k, v, lengths, rows_of):
    """float64 reference: rows_of(b, h) -> the pool rows head (b, h) attends to, in order."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    b, hkv, g, d = q.shape
    out = np.zeros((b, hkv, g, d))
    for i in range(b):
        for h in range(hkv):
            rows = rows_of(i, h)
            if len(rows) == 0:
                continue
            s = q[i, h] @ k[i, rows].T / np.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[i, h] = (p / p.sum(-1, keepdims=True)) @ v[i, rows]
    return out


def rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    return np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)


def make_segment_case(rng, b, hkv, g, d, capacity, gaps, dtype, impl, lengths=None):
    """Pool with head h at rows [starts[h], starts[h] + capacity[h]), ``gaps[h]`` unused rows before it."""
    starts, r = [], 0
    for c, gap in zip(capacity, gaps):
        starts.append(r + gap)
        r += gap + c
    r += 1
    if lengths is None:
        lengths = np.stack([rng.integers(0, c + 1, size=b) for c in capacity], axis=1)
    lengths = np.asarray(lengths, np.int32)
    junk = np.nan if impl == "pallas" else 1e3
    k = np.full((b, r, d), junk, np.float32)
    v = np.full((b, r, d), junk, np.float32)
    for i in range(b):
        for h, s0 in enumerate(starts):
            n = lengths[i, h]
            k[i, s0 : s0 + n] = rng.standard_normal((n, d))
            v[i, s0 : s0 + n] = rng.standard_normal((n, d))
            if impl == "xla":  # finite garbage past the length, inside the segment
                k[i, s0 + n : s0 + capacity[h]] = 1e3 * rng.standard_normal((capacity[h] - n, d))
    q = rng.standard_normal((b, hkv, g, d)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jnp.asarray(lengths), tuple(starts), tuple(capacity)


def run(impl, q, k, v, lengths, **layout):
    if impl == "xla":
        return pk.gather_attention(q, k, v, lengths, impl="xla", **layout)
    return gather_attention_pallas(q, k, v, lengths, interpret=True, poison=True, block_k=16, **layout)


def check(out, ref, dtype, lengths):
    assert out.dtype == dtype
    assert not np.isnan(np.asarray(out, np.float32)).any()
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g}"
    empty = np.asarray(lengths) == 0
    assert (np.asarray(out, np.float32)[empty] == 0).all(), "zero-length heads must return zeros"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g", [1, 3])
def test_segment_full_kv_layout(seed, dtype, impl, g):
    """The full-KV call: pool = k.reshape(B, Hkv*S, D), starts = (0, S, 2S, ...)."""
    rng = np.random.default_rng(seed)
    s_len = 40
    lengths = rng.integers(0, s_len + 1, size=(2, 3))
    lengths[0, 0], lengths[1, 1] = 0, s_len  # empty and full heads every run
    q, k, v, lens, starts, cap = make_segment_case(rng, 2, 3, g, 16, (s_len,) * 3, (0, 0, 0), dtype, impl, lengths)
    assert segment_strategy(starts, cap, k.shape[1], g) == "uniform"
    ref = np_attention(q, k, v, lengths, lambda i, h: starts[h] + np.arange(lengths[i, h]))
    check(run(impl, q, k, v, lens, starts=starts, capacity=cap), ref, dtype, lengths)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strategy", ["pool", "per_head"])
def test_segment_uneven_capacities(seed, dtype, impl, strategy):
    """HeteroCache's per-head budgets: uneven capacities, segments anywhere in the pool."""
    rng = np.random.default_rng(seed)
    cap = (33, 5, 0, 48, 17)
    gaps = (0, 2, 0, 1, 3) if strategy == "pool" else (60, 0, 9, 40, 50)
    q, k, v, lens, starts, cap = make_segment_case(rng, 2, 5, 2, 16, cap, gaps, dtype, impl)
    assert segment_strategy(starts, cap, k.shape[1], 2) == strategy
    lengths = np.asarray(lens)
    ref = np_attention(q, k, v, lengths, lambda i, h: starts[h] + np.arange(lengths[i, h]))
    check(run(impl, q, k, v, lens, starts=starts, capacity=cap), ref, dtype, lengths)


def make_index_case(rng, b, hkv, g, d, r, kk, dtype, impl, lengths=None):
    """Pool of r rows; head (b, h) reads index[b, h, :len] (distinct ids); ids past len are junk."""
    if lengths is None:
        lengths = rng.integers(0, kk + 1, size=(b, hkv))
    lengths = np.asarray(lengths, np.int32)
    index = rng.integers(-(2**20), 2**20, size=(b, hkv, kk)).astype(np.int32)  # junk, often out of range
    used = np.zeros((b, r), bool)
    for i in range(b):
        for h in range(hkv):
            ids = rng.choice(r, size=lengths[i, h], replace=False)
            index[i, h, : lengths[i, h]] = ids
            used[i, ids] = True
    junk = np.nan if impl == "pallas" else 1e3
    k = np.where(used[..., None], rng.standard_normal((b, r, d)), junk).astype(np.float32)
    v = np.where(used[..., None], rng.standard_normal((b, r, d)), junk).astype(np.float32)
    q = rng.standard_normal((b, hkv, g, d)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jnp.asarray(lengths), jnp.asarray(index)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g", [1, 4])
def test_index_layout(seed, dtype, impl, g):
    """Per-step top-k retrieval: rows gathered by id; K = 37 is not a multiple of the block."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 38, size=(2, 3))
    lengths[0, 1], lengths[1, 2] = 0, 37
    q, k, v, lens, index = make_index_case(rng, 2, 3, g, 16, 90, 37, dtype, impl, lengths)
    ix = np.asarray(index)
    ref = np_attention(q, k, v, lengths, lambda i, h: ix[i, h, : lengths[i, h]])
    check(run(impl, q, k, v, lens, index=index), ref, dtype, lengths)


@pytest.mark.parametrize("layout", ["segment", "index"])
@pytest.mark.parametrize("block_k,num_splits", [(16, 1), (16, 3), (32, 2), (64, 8)])
def test_pallas_blocks_and_splits(seed, layout, block_k, num_splits):
    """The GPU configuration (several splits merged flash-decoding style) in interpret mode."""
    rng = np.random.default_rng(seed)
    if layout == "segment":
        q, k, v, lens, starts, cap = make_segment_case(rng, 2, 2, 3, 16, (100, 70), (3, 5), jnp.float32, "pallas")
        lengths = np.asarray(lens)
        ref = np_attention(q, k, v, lengths, lambda i, h: starts[h] + np.arange(lengths[i, h]))
        layout_args = dict(starts=starts, capacity=cap)
    else:
        q, k, v, lens, index = make_index_case(rng, 2, 2, 3, 16, 200, 100, jnp.float32, "pallas")
        lengths, ix = np.asarray(lens), np.asarray(index)
        ref = np_attention(q, k, v, lengths, lambda i, h: ix[i, h, : lengths[i, h]])
        layout_args = dict(index=index)
    out = gather_attention_pallas(q, k, v, lens, interpret=True, poison=True, block_k=block_k,
                                  num_splits=num_splits, **layout_args)
    check(out, ref, jnp.float32, lengths)


def test_all_empty_and_all_full(seed):
    rng = np.random.default_rng(seed)
    for lengths in (np.zeros((2, 2), int), np.full((2, 2), 24)):
        for impl in IMPLS:
            case = make_segment_case(rng, 2, 2, 2, 16, (24, 24), (0, 0), jnp.float32, impl, lengths)
            q, k, v, lens, starts, cap = case
            ref = np_attention(q, k, v, lengths, lambda i, h: starts[h] + np.arange(lengths[i, h]))
            check(run(impl, q, k, v, lens, starts=starts, capacity=cap), ref, jnp.float32, lengths)


def test_dispatch(monkeypatch, seed):
    monkeypatch.delenv(pk.ENV_VAR, raising=False)
    assert pk.resolve_impl() == ("pallas" if jax.default_backend() == "gpu" else "xla")
    assert pk.resolve_impl(interpret=True) == "interpret"
    assert pk.resolve_impl("xla", interpret=True) == "xla"
    monkeypatch.setenv(pk.ENV_VAR, "interpret")
    assert pk.resolve_impl() == "interpret"
    assert pk.resolve_impl("xla") == "xla"
    monkeypatch.setenv(pk.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        pk.resolve_impl()
    monkeypatch.delenv(pk.ENV_VAR)
    if jax.default_backend() == "cpu":
        assert pk.resolve_impl("pallas") == "interpret"
    rng = np.random.default_rng(seed)
    q, k, v, lens, starts, cap = make_segment_case(rng, 1, 2, 2, 16, (20, 20), (0, 0), jnp.float32, "xla")
    outs = [pk.gather_attention(q, k, v, lens, starts=starts, capacity=cap, impl=i) for i in ("xla", "interpret")]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        pk.gather_attention(q, k, v, lens, starts=starts)  # capacity missing


def test_plan_is_triton_friendly():
    for rows in (1, 5, 37, 1000, 32768):
        for interpret in (True, False):
            bk, ns, split = plan(rows, 8, interpret=interpret)
            assert bk >= 16 and bk & (bk - 1) == 0 and split % bk == 0 and ns * split >= rows
            assert (ns - 1) * split < rows  # no split is empty by construction


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    b=st.integers(1, 2),
    hkv=st.integers(1, 4),
    g=st.sampled_from([1, 2, 5]),
    d=st.sampled_from([8, 16]),
    layout=st.sampled_from(["segment", "index"]),
    impl=st.sampled_from(IMPLS),
)
def test_property_random_shapes(data, b, hkv, g, d, layout, impl):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    if layout == "segment":
        cap = tuple(data.draw(st.lists(st.integers(0, 50), min_size=hkv, max_size=hkv), label="capacity"))
        gaps = tuple(rng.integers(0, 4, size=hkv))
        q, k, v, lens, starts, cap = make_segment_case(rng, b, hkv, g, d, cap, gaps, jnp.float32, impl)
        lengths = np.asarray(lens)
        ref = np_attention(q, k, v, lengths, lambda i, h: starts[h] + np.arange(lengths[i, h]))
        out = run(impl, q, k, v, lens, starts=starts, capacity=cap)
    else:
        kk = data.draw(st.integers(1, 60), label="K")
        q, k, v, lens, index = make_index_case(rng, b, hkv, g, d, kk + 10, kk, jnp.float32, impl)
        lengths, ix = np.asarray(lens), np.asarray(index)
        ref = np_attention(q, k, v, lengths, lambda i, h: ix[i, h, : lengths[i, h]])
        out = run(impl, q, k, v, lens, index=index)
    check(out, ref, jnp.float32, lengths)


def random_sets(rng, shape, k, universe):
    flat = [rng.choice(universe, size=k, replace=False) for _ in range(int(np.prod(shape)))]
    return np.asarray(flat, np.int32).reshape(*shape, k)


def np_overlap(a, b):
    out = np.zeros(a.shape[:-1])
    for idx in np.ndindex(*a.shape[:-1]):
        out[idx] = len(set(a[idx].tolist()) & set(b[idx].tolist())) / a.shape[-1]
    return out


def assert_overlap(out, a, b):
    """Counts exact (out * k is the integer |A ∩ B|); values to float32 rounding (XLA may use x * (1/k))."""
    ref = np_overlap(np.broadcast_to(a, np.broadcast_shapes(a.shape, b.shape)), np.broadcast_to(b, b.shape))
    k = a.shape[-1]
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_array_equal(np.rint(out.astype(np.float64) * k), np.rint(ref * k))
    np.testing.assert_allclose(out, ref, rtol=2e-7, atol=0)


def overlap(impl, a, b):
    if impl == "xla":
        return pk.topk_overlap(a, b, impl="xla")
    return pk.topk_overlap_pallas(a, b, interpret=True, poison=True, tile=16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [1, 7, 64, 65, 150])
def test_topk_overlap(seed, impl, k):
    """k <= 64 and k > 64 take different XLA strategies; sets drawn from a small universe overlap a lot."""
    rng = np.random.default_rng(seed)
    a = random_sets(rng, (2, 3), k, 2 * k + 3)
    b = random_sets(rng, (2, 3), k, 2 * k + 3)
    b[0, 0] = rng.permutation(a[0, 0])  # identical sets -> 1
    b[1, 2] = a[1, 2] + 10 * k  # disjoint -> 0
    out = np.asarray(overlap(impl, jnp.asarray(a), jnp.asarray(b)))
    assert_overlap(out, a, b)
    assert out[0, 0] == 1 and out[1, 2] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_overlap_broadcast(seed, impl):
    rng = np.random.default_rng(seed)
    a = random_sets(rng, (1, 4), 20, 50)
    b = random_sets(rng, (3, 4), 20, 50)
    assert_overlap(np.asarray(overlap(impl, jnp.asarray(a), jnp.asarray(b))), a, b)


@settings(max_examples=15, deadline=None)
@given(data=st.data(), k=st.integers(1, 140), n=st.integers(1, 4), impl=st.sampled_from(IMPLS))
def test_topk_overlap_property(data, k, n, impl):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    universe = k + data.draw(st.integers(0, 2 * k), label="extra")
    a, b = random_sets(rng, (n,), k, universe), random_sets(rng, (n,), k, universe)
    assert_overlap(np.asarray(overlap(impl, jnp.asarray(a), jnp.asarray(b))), a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton(dtype):
    """The kernels lower to Triton IR for CUDA on this CPU-only machine (IR generation only: no
    PTX compile, no numerics; those need a GPU). Catches ops or shapes the Triton lowering rejects."""
    sds = jax.ShapeDtypeStruct
    q, pool, lens = sds((1, 3, 3, 64), dtype), sds((1, 3 * 300, 64), dtype), sds((1, 3), jnp.int32)
    segs = dict(starts=(0, 300, 600), capacity=(300, 200, 300))
    seg = jax.jit(lambda q, k, v, l: gather_attention_pallas(q, k, v, l, **segs))
    idx = jax.jit(lambda q, k, v, l, i: gather_attention_pallas(q, k, v, l, index=i))
    texts = [
        seg.trace(q, pool, pool, lens).lower(lowering_platforms=("cuda",)).as_text(),
        idx.trace(q, pool, pool, lens, sds((1, 3, 77), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text(),
        jax.jit(pk.topk_overlap_pallas).trace(sds((4, 100), jnp.int32), sds((4, 100), jnp.int32))
        .lower(lowering_platforms=("cuda",)).as_text(),
    ]
    for t in texts:
        assert "triton" in t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gaps,block_k,num_splits", [((0, 0, 0), 16, 1), ((3, 5, 0), 16, 3), ((0, 0, 0), 32, 2)])
def test_logit_heads_output(seed, impl, gaps, block_k, num_splits):
    """``logit_heads``: the same pass's scaled scores of the chosen heads over their first rows, -inf
    past each head's length; the attention output unchanged. Pallas: interpret mode under jax.jit,
    every output (logits included) NaN-poisoned first, rows past a head's length NaN in the pool."""
    rng = np.random.default_rng(seed)
    cap = (100, 100, 70)
    lengths = np.stack([rng.integers(0, c + 1, size=2) for c in cap], 1)
    lengths[0, 2], lengths[1, 0] = 0, cap[0]  # an empty head and a full one
    q, k, v, lens, starts, cap = make_segment_case(rng, 2, 3, 3, 16, cap, gaps, jnp.float32, impl, lengths)
    heads, rows = tuple(int(x) for x in rng.permutation([0, 2])), int(rng.integers(40, 71))
    kw = dict(starts=starts, capacity=cap, logit_heads=heads, logit_rows=rows)
    if impl == "xla":
        out, lg = pk.gather_attention(q, k, v, lens, impl="xla", **kw)
    else:
        fn = jax.jit(lambda *a: gather_attention_pallas(*a, interpret=True, poison=True, block_k=block_k,
                                                        num_splits=num_splits, **kw))
        out, lg = fn(q, k, v, lens)
    check(out, np_attention(q, k, v, lengths, lambda i, h: starts[h] + np.arange(lengths[i, h])), jnp.float32, lengths)
    assert lg.shape == (2, len(heads), 3, rows) and lg.dtype == jnp.float32
    lg = np.asarray(lg)
    qd, kd = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for i in range(2):
        for j, h in enumerate(heads):
            n = min(int(lengths[i, h]), rows)
            want = qd[i, h] @ kd[i, starts[h]: starts[h] + n].T / 4.0
            np.testing.assert_allclose(lg[i, j, :, :n], want, rtol=1e-5, atol=1e-5)
            assert (lg[i, j, :, n:] == -np.inf).all()
    with pytest.raises(ValueError, match="logit_heads"):
        pk.gather_attention(q, k, v, lens, impl="xla", starts=starts, capacity=cap, logit_heads=(2,), logit_rows=71)


def test_logit_heads_same_in_both_paths(seed):
    """The XLA and Pallas passes give the same logits (the drift check's decisions do not depend on it)."""
    rng = np.random.default_rng(seed)
    q, k, v, lens, starts, cap = make_segment_case(rng, 2, 2, 3, 16, (64, 64), (0, 0), jnp.float32, "xla")
    kw = dict(starts=starts, capacity=cap, logit_heads=(1,), logit_rows=48)
    _, a = pk.gather_attention(q, k, v, lens, impl="xla", **kw)
    _, b = pk.gather_attention(q, k, v, lens, impl="interpret", **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b,hkv", [(1, 1), (1, 2), (2, 1)])
def test_xla_one_batch_head_pair(seed, dtype, b, hkv):
    """XLA path: one (batch, head) pair uses multiply-reduces instead of dots (HeteroCache's
    one-head blocks at batch 1); the same output and logits as float64 as every other shape."""
    rng = np.random.default_rng(seed)
    s_len = int(rng.integers(20, 90))
    lengths = rng.integers(1, s_len + 1, size=(b, hkv))
    q, k, v, lens, starts, cap = make_segment_case(rng, b, hkv, 3, 16, (s_len,) * hkv, (0,) * hkv, dtype, "xla",
                                                   lengths)
    rows = int(rng.integers(1, s_len + 1))
    out, lg = pk.gather_attention(q, k, v, lens, impl="xla", starts=starts, capacity=cap, logit_heads=(0,),
                                  logit_rows=rows)
    check(out, np_attention(q, k, v, lengths, lambda i, h: starts[h] + np.arange(lengths[i, h])), dtype, lengths)
    qd, kd = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k))
    for i in range(b):
        n = min(int(lengths[i, 0]), rows)
        np.testing.assert_allclose(np.asarray(lg)[i, 0, :, :n], qd[i, 0] @ kd[i, :n].T / 4.0, rtol=TOL[dtype] * 10,
                                   atol=TOL[dtype] * 10)
        assert (np.asarray(lg)[i, 0, :, n:] == -np.inf).all()


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True), st.integers(0, 2))
@settings(max_examples=25, deadline=None)
def test_take_static_equals_indexing(index, axis):
    """Slices of the index's runs give exactly ``x`` indexed along ``axis`` (any order, gaps, identity)."""
    x = np.random.default_rng(len(index) * 7 + axis).standard_normal((6, 6, 6)).astype(np.float32)
    got = jax.jit(lambda x: take_static(x, index, axis))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), np.take(x, index, axis=axis))
