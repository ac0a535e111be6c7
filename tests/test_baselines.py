"""Baseline cache policies (streaming, snapkv, pyramidkv, h2o, retrieval, interval).

Every selection rule is checked against an independent float64 numpy re-implementation on fresh
random inputs; end to end: ratio 1 reproduces full-KV greedy tokens, a ragged batch gives each
prompt's single-sequence tokens, device bytes follow the budget, bad options fail clearly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.config import LlamaConfig
from convert.params import init_random_params
from hetero_jax import model
from hetero_jax.cache import make_policy
from hetero_jax.cache.base import Cache
from hetero_jax.decode_loop import pad_prompts
from hetero_jax.generate import generate

CFG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=32)
POLICIES = ["streaming", "snapkv", "pyramidkv", "h2o", "retrieval", "interval"]
KEEPS_ALL_AT_RATIO_1 = ["streaming", "snapkv", "pyramidkv", "retrieval", "interval"]


@functools.lru_cache(maxsize=1)
def params():
    return init_random_params(CFG, seed=0, scale=0.1)


def prompts(seed, lengths=(120, 77)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


# ------------------------------------------------------------------------ numpy references
def budget(ratio, n):
    return math.floor(Fraction(str(ratio)) * n)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def avg_pool(x, kernel):
    """Zero-padded, count_include_pad average pooling over the last axis."""
    p = kernel // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(p, p)])
    return sum(padded[..., i : i + x.shape[-1]] for i in range(kernel)) / kernel


def group(x, hkv):
    """(..., Hq, T) -> (..., Hkv, G, T)"""
    return x.reshape(x.shape[:-2] + (hkv, -1, x.shape[-1]))


def probs(q, k, q_pos):
    """float64 causal softmax rows: q (W, Hq, D) at q_pos (W,), k (L, Hkv, D) -> (W, Hq, L)."""
    g = q.shape[1] // k.shape[1]
    kk = np.repeat(k, g, axis=1)
    s = np.einsum("whd,lhd->whl", q, kk) / math.sqrt(q.shape[-1])
    s = np.where(np.arange(k.shape[0])[None, None, :] <= q_pos[:, None, None], s, -np.inf)
    return softmax(s)


def snapkv_ref(q, k, L, ratio, window, kernel, reduce, n_voted=None):
    """-> (scores over keys [0, L - w) per KV head, forced positions, number voted)."""
    n = budget(ratio, L)
    w = min(window, n)
    pos = np.arange(max(0, L - window), L)
    votes = probs(q[pos].astype(np.float64), k[:L].astype(np.float64), pos).sum(0)[:, : L - w]  # (Hq, L-w)
    pooled = group(avg_pool(votes, kernel), k.shape[1])
    scores = pooled.max(1) if reduce == "max" else pooled.mean(1)
    return scores, np.arange(L - w, L), n - w if n_voted is None else n_voted


def h2o_ref(q, k, L, ratio, recent_ratio):
    n = budget(ratio, L)
    r = min(max(math.floor(recent_ratio * n), min(n, 1)), n)
    cols = probs(q[:L].astype(np.float64), k[:L].astype(np.float64), np.arange(L)).sum(0)  # (Hq, L)
    scores = group(cols, k.shape[1]).mean(1)
    return scores[:, : L - r], np.arange(L - r, L), n - r, group(cols, k.shape[1]).mean(1)


def retrieval_ref(q_row, k, L, ratio, kernel, q_pos):
    p = probs(q_row[None].astype(np.float64), k[:L].astype(np.float64), np.array([q_pos]))[0]
    return group(avg_pool(p, kernel), k.shape[1]).max(1), np.arange(0), budget(ratio, L)


def check_topk(got, scores, forced, count, tol=1e-6):
    """``got`` (positions) is a top-``count`` set of ``scores`` plus ``forced``, up to float ties."""
    got = np.asarray(got)
    assert np.all(np.diff(got) > 0), "positions not in ascending order"
    assert set(forced) <= set(got.tolist()), "a forced (window/sink/recent) token is missing"
    voted = np.array(sorted(set(got.tolist()) - set(forced.tolist())), int)
    assert len(voted) == count, f"kept {len(voted)} voted tokens, expected {count}"
    if count == 0:
        return
    assert voted.max() < len(scores)
    rest = np.setdiff1d(np.arange(len(scores)), voted)
    if len(rest):
        assert scores[voted].min() >= scores[rest].max() - tol, "kept a token scoring below a dropped one"
    if len(rest) and scores[voted].min() > scores[rest].max() + tol:  # no near-tie: exact set
        np.testing.assert_array_equal(voted, np.sort(np.argsort(-scores, kind="stable")[:count]))


def random_qk(seed, b=2, t=64, lengths=(64, 45)):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, CFG.num_heads, 16)).astype(np.float32) * 2
    k = rng.standard_normal((b, t, CFG.num_kv_heads, 16)).astype(np.float32)
    v = rng.standard_normal((b, t, CFG.num_kv_heads, 16)).astype(np.float32)
    return q, k, v, np.array(lengths, np.int32)


# ------------------------------------------------------------------- prefill selection rules
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_streaming_selection(ratio):
    q, k, v, lengths = random_qk(1)
    pol = make_policy("streaming", CFG, ratio=ratio)
    idx, n = jax.jit(pol.select, static_argnums=0)(0, q, k, lengths)
    for b, L in enumerate(lengths):
        nb = budget(ratio, L)
        want = sorted(set(range(min(4, nb))) | set(range(L - (nb - min(4, nb)), L)))
        for h in range(CFG.num_kv_heads):
            assert int(n[b, h]) == nb
            np.testing.assert_array_equal(np.asarray(idx[b, h, :nb]), want)


@pytest.mark.parametrize("reduce,kernel,window", [("max", 5, 8), ("mean", 7, 4), ("max", 1, 1)])
def test_snapkv_selection(reduce, kernel, window):
    q, k, v, lengths = random_qk(2)
    pol = make_policy("snapkv", CFG, ratio=0.37, window=window, kernel=kernel, group_reduce=reduce)
    idx, n = jax.jit(pol.select, static_argnums=0)(0, q, k, lengths)
    for b, L in enumerate(lengths):
        scores, forced, count = snapkv_ref(q[b], k[b], L, 0.37, window, kernel, reduce)
        for h in range(CFG.num_kv_heads):
            assert int(n[b, h]) == budget(0.37, L)
            check_topk(np.asarray(idx[b, h, : n[b, h]]), scores[h], forced, count)


def pyramid_ref_budgets(a, room, n_layers, beta):
    top = min(math.floor(Fraction(a * (2 * beta - 1), beta)), room)
    bottom = 2 * a - top
    lin = [top - Fraction(j * (top - bottom), n_layers - 1) for j in range(n_layers)]
    cum = [sum(lin[:j], Fraction(0)) for j in range(n_layers + 1)]
    return [math.floor(cum[j + 1]) - math.floor(cum[j]) for j in range(n_layers)]


def test_pyramidkv_schedule_and_selection():
    from hetero_jax.cache.pyramidkv import PyramidKV

    for n_layers, beta in [(3, 20), (7, 5), (32, 20)]:
        pol = PyramidKV(ratio=0.5, window=8, num_layers=n_layers, beta=beta)
        for L in [9, 40, 64, 333, 1000]:
            n = budget(0.5, L)
            w = min(8, n)
            ref = pyramid_ref_budgets(n - w, L - w, n_layers, beta)
            got = [int(pol.layer_budget(l, np.int64(n - w), np.int64(L - w), np)) for l in range(n_layers)]
            assert got == ref
            assert sum(got) == n_layers * (n - w)  # same total as SnapKV
            assert all(x >= y - 1 for x, y in zip(got, got[1:])) and max(got) <= L - w  # rounding: +-1
            assert got[0] >= got[-1]
    # ratio 1 keeps everything in every layer
    pol1 = PyramidKV(ratio=1.0, window=8, num_layers=5)
    assert [int(pol1.layer_budget(l, np.int64(92), np.int64(92), np)) for l in range(5)] == [92] * 5
    q, k, v, lengths = random_qk(3)
    pol = make_policy("pyramidkv", CFG, ratio=0.5, window=8)
    for layer in range(CFG.num_layers):
        idx, n = jax.jit(pol.select, static_argnums=0)(layer, q, k, lengths)
        assert idx.shape[-1] == pol.capacity(layer, q.shape[1])
        for b, L in enumerate(lengths):
            nb = budget(0.5, L)
            w = min(8, nb)
            count = pyramid_ref_budgets(nb - w, L - w, CFG.num_layers, 20)[layer]
            scores, forced, count = snapkv_ref(q[b], k[b], L, 0.5, 8, 5, "max", count)
            for h in range(CFG.num_kv_heads):
                check_topk(np.asarray(idx[b, h, : n[b, h]]), scores[h], forced, count)


@pytest.mark.parametrize("recent_ratio,chunk", [(0.5, 16), (0.25, 64), (0.0, 32)])
def test_h2o_selection(recent_ratio, chunk):
    q, k, v, lengths = random_qk(4)
    pol = make_policy("h2o", CFG, ratio=0.5, recent_ratio=recent_ratio, prefill_chunk=chunk)
    idx, n, acc = jax.jit(pol.select)(q, k, lengths)
    for b, L in enumerate(lengths):
        scores, forced, count, cols = h2o_ref(q[b], k[b], L, 0.5, recent_ratio)
        np.testing.assert_allclose(np.asarray(acc[b, :, :L]), cols, rtol=1e-4, atol=1e-5)
        for h in range(CFG.num_kv_heads):
            check_topk(np.asarray(idx[b, h, : n[b]]), scores[h], forced, count)


@pytest.mark.parametrize("name", ["retrieval", "interval"])
def test_retrieval_prefill_selection(name):
    q, k, v, lengths = random_qk(5)
    pol = make_policy(name, CFG, ratio=0.4)
    state = jax.jit(pol.build_layer, static_argnums=(0, 5))(0, q, k, v, lengths, 4)
    for b, L in enumerate(lengths):
        scores, forced, count = retrieval_ref(q[b, L - 1], k[b], L, 0.4, 5, L - 1)
        for h in range(CFG.num_kv_heads):
            sel = np.asarray(state.want[b, h, :count])
            check_topk(sel, scores[h], forced, count)
            np.testing.assert_array_equal(np.asarray(state.v[b, h, :count]), v[b, sel, h])


@pytest.mark.parametrize("name", ["streaming", "snapkv", "pyramidkv", "h2o"])
def test_stored_rows_are_the_selected_tokens(name):
    q, k, v, lengths = random_qk(6)
    pol = make_policy(name, CFG, ratio=0.5, **({"window": 8} if "kv" in name else {}))
    state = jax.jit(pol.build_layer, static_argnums=(0, 5))(1, q, k, v, lengths, 4)
    sel = pol.select(q, k, lengths) if name == "h2o" else pol.select(1, q, k, lengths)
    for b in range(2):
        for h in range(CFG.num_kv_heads):
            nb = int(sel[1][b] if name == "h2o" else sel[1][b, h])
            pos = np.asarray(sel[0][b, h, :nb])
            np.testing.assert_array_equal(np.asarray(state.k[b, h, :nb]), k[b, pos, h])
            np.testing.assert_array_equal(np.asarray(state.v[b, h, :nb]), v[b, pos, h])


# --------------------------------------------------------------------------- decode rules
def attend(q, ks, vs):
    """float64 attention of q (Hq, D) over rows ks/vs (N, D) of one KV head's group -> (G, D)."""
    p = softmax(q @ ks.T / math.sqrt(q.shape[-1]))
    return p @ vs, p


def test_h2o_decode_evicts_like_reference():
    q, k, v, lengths = random_qk(7, t=32, lengths=(32, 21))
    pol = make_policy("h2o", CFG, ratio=0.5, recent_ratio=0.25, prefill_chunk=16)
    state = jax.jit(pol.build_layer, static_argnums=(0, 5))(0, q, k, v, lengths, 6)
    step = jax.jit(pol.decode_layer, static_argnums=0)
    rng = np.random.default_rng(70)
    hkv, g = CFG.num_kv_heads, CFG.num_heads // CFG.num_kv_heads
    ref = []  # per (b, h): {position: accumulated score}
    keys, vals = [{}, {}], [{}, {}]
    sel = jax.jit(pol.select)(q, k, lengths)[0]
    for b, L in enumerate(lengths):
        *_, cols = h2o_ref(q[b], k[b], L, 0.5, 0.25)
        for p in range(L):
            keys[b][p], vals[b][p] = k[b, p].astype(np.float64), v[b, p].astype(np.float64)
        ref.append([{int(p): cols[h, p] for p in np.asarray(sel[b, h, : budget(0.5, L)])} for h in range(hkv)])
    for s in range(6):
        qn = rng.standard_normal((2, CFG.num_heads, 16)).astype(np.float32) * 2
        kn = rng.standard_normal((2, hkv, 16)).astype(np.float32)
        vn = rng.standard_normal((2, hkv, 16)).astype(np.float32)
        cache = Cache(layers=(state,), lengths=jnp.asarray(lengths + s), step=jnp.asarray(s, jnp.int32))
        out, state = step(0, state, qn, kn, vn, cache)
        for b, L in enumerate(lengths):
            cur, n = L + s, budget(0.5, L)
            r = min(max(math.floor(0.25 * n), 1), n)
            keys[b][cur], vals[b][cur] = kn[b].astype(np.float64), vn[b].astype(np.float64)
            for h in range(hkv):
                kept = ref[b][h]
                kept[cur] = 0.0
                order = sorted(kept)
                o, p = attend(qn[b, h * g : (h + 1) * g].astype(np.float64),
                              np.stack([keys[b][x][h] for x in order]), np.stack([vals[b][x][h] for x in order]))
                np.testing.assert_allclose(np.asarray(out[b, h * g : (h + 1) * g]), o, rtol=1e-4, atol=1e-5)
                for x, px in zip(order, p.mean(0)):
                    kept[x] += px
                cand = [x for x in order if x <= cur - r]
                victim = min(cand, key=lambda x: (kept[x], x))
                got = set(np.asarray(state.pos[b, h, :n]).tolist())
                (got_victim,) = set(order) - got
                assert abs(kept[got_victim] - kept[victim]) < 1e-6, (s, b, h, got_victim, victim)
                del kept[got_victim]
                assert set(kept) == got


@pytest.mark.parametrize("interval,fetch", [(1, "host"), (3, "copy"), (2, "auto")])
def test_retrieval_decode_uses_previous_selection(interval, fetch):
    q, k, v, lengths = random_qk(8, t=32, lengths=(32, 21))
    pol = make_policy("retrieval", CFG, ratio=0.5, interval=interval, fetch=fetch)
    state = jax.jit(pol.build_layer, static_argnums=(0, 5))(0, q, k, v, lengths, 7)
    cache = pol.after_prefill(Cache(layers=(state,), lengths=jnp.asarray(lengths), step=jnp.zeros((), jnp.int32)))
    assert cache.layers[0].v_prompt is None and pol.stats(cache)["host_bytes"] == v.nbytes
    step = jax.jit(pol.decode_layer, static_argnums=0)
    rng = np.random.default_rng(80)
    hkv, g = CFG.num_kv_heads, CFG.num_heads // CFG.num_kv_heads
    want = [[np.asarray(state.want[b, h, : budget(0.5, L)]) for h in range(hkv)] for b, L in enumerate(lengths)]
    use = [list(w) for w in want]
    gen_k, gen_v = [], []
    for s in range(7):
        cache = pol.before_step(cache)
        if s and s % interval == 0:  # the fetch installs the previous selection
            use = [list(w) for w in want]
        qn = rng.standard_normal((2, CFG.num_heads, 16)).astype(np.float32) * 2
        gen_k.append(rng.standard_normal((2, hkv, 16)).astype(np.float32))
        gen_v.append(rng.standard_normal((2, hkv, 16)).astype(np.float32))
        dev = dataclasses.replace(cache, host=None)
        out, st = step(0, cache.layers[0], qn, gen_k[-1], gen_v[-1], dev)
        cache = dataclasses.replace(cache, layers=(st,), lengths=cache.lengths + 1, step=cache.step + 1)
        for b, L in enumerate(lengths):
            n = budget(0.5, L)
            for h in range(hkv):
                rows = list(use[b][h])
                ks = np.concatenate([k[b, rows, h], np.stack([x[b, h] for x in gen_k])]).astype(np.float64)
                vs = np.concatenate([v[b, rows, h], np.stack([x[b, h] for x in gen_v])]).astype(np.float64)
                o, _ = attend(qn[b, h * g : (h + 1) * g].astype(np.float64), ks, vs)
                np.testing.assert_allclose(np.asarray(out[b, h * g : (h + 1) * g]), o, rtol=1e-4, atol=1e-5)
                new = np.asarray(st.want[b, h, :n])
                if (s + 1) % interval == 0:
                    scores, forced, count = retrieval_ref(qn[b], k[b], L, 0.5, 5, L + s)
                    check_topk(new, scores[h], forced, count)
                else:
                    np.testing.assert_array_equal(new, want[b][h])
                want[b][h] = new
    stats = pol.stats(cache)
    assert stats["fetches"] == (7 - 1) // interval
    assert stats["fetch_mode"] == ("copy" if fetch == "copy" else "host")


# ------------------------------------------------------------------------------ end to end
@functools.lru_cache(maxsize=None)
def _compiled(policy, max_new):
    pf = jax.jit(functools.partial(model.prefill, cfg=CFG, policy=policy, max_new_tokens=max_new))
    st = jax.jit(functools.partial(model.decode_step, cfg=CFG, policy=policy), donate_argnums=(1,))
    return pf, st


def greedy(policy, rows, max_new=6):
    """Greedy tokens with the host hooks called as generate() does (host arrays kept out of jit)."""
    pf, st = _compiled(policy, max_new)
    tokens, lengths = pad_prompts(rows)
    logits, cache = pf(params(), jnp.asarray(tokens), jnp.asarray(lengths))
    cache = policy.after_prefill(cache)
    out = [jnp.argmax(logits, -1).astype(jnp.int32)]
    for _ in range(max_new - 1):
        cache = policy.before_step(cache)
        host = cache.host
        logits, cache = st(params(), dataclasses.replace(cache, host=None), out[-1])
        cache = dataclasses.replace(cache, host=host)
        out.append(jnp.argmax(logits, -1).astype(jnp.int32))
    return np.stack([np.asarray(x) for x in out], 1).tolist()


@functools.lru_cache(maxsize=1)
def full_kv_result():
    return generate(params(), prompts(10), "full", config=CFG, max_new_tokens=6)


@pytest.mark.parametrize("name", POLICIES)
def test_ratio_one_gives_full_kv_tokens(name):
    rows = prompts(10)
    full = full_kv_result()
    res = generate(params(), rows, make_policy(name, CFG, ratio=1.0), config=CFG, max_new_tokens=6)
    if name in KEEPS_ALL_AT_RATIO_1:
        assert res.tokens == full.tokens
    else:  # h2o evicts once decoding starts: only the first decode step sees the whole prompt
        assert [t[:2] for t in res.tokens] == [t[:2] for t in full.tokens]


@pytest.mark.parametrize("name", POLICIES)
def test_ragged_batch_matches_single_sequences(name):
    rows = prompts(11)
    pol = make_policy(name, CFG, ratio=0.5)
    batch = greedy(pol, rows, max_new=5)
    assert batch == [greedy(pol, [r], max_new=5)[0] for r in rows]


@pytest.mark.parametrize("name,ratio", [(n, r) for n, r in zip(POLICIES, (0.25, 0.5) * 3)] + [("h2o", 0.25)])
def test_device_bytes_follow_the_budget(name, ratio):
    b, t, max_new = 2, 512, 16
    rows = prompts(12, lengths=(t, t))
    pol = make_policy(name, CFG, ratio=ratio)
    _, cache = _compiled(pol, max_new)[0](params(), *map(jnp.asarray, pad_prompts(rows)))
    stats = pol.stats(pol.after_prefill(cache))
    row = CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 4  # bytes of K (or V) of one token
    n = budget(ratio, t)
    expect = {  # rows of K + rows of V per sequence
        "h2o": 2 * n,  # fixed budget, generated tokens evict
        "retrieval": t + n + 2 * max_new,  # all prompt keys (exact scores) + value working set
    }.get(name.replace("interval", "retrieval"), 2 * (n + max_new))
    assert abs(stats["device_bytes"] / (b * expect * row) - 1) < 0.10, stats
    assert stats["host_bytes"] == (b * t * row if name in ("retrieval", "interval") else 0)


# ------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_ratio(name, ratio):
    with pytest.raises(ValueError, match="ratio"):
        make_policy(name, CFG, ratio=ratio)


@pytest.mark.parametrize("name,options,match", [
    ("streaming", {"n_sink": -1}, "n_sink"),
    ("streaming", {"window": 8}, "unknown option.*window"),
    ("snapkv", {"window": 0}, "window"),
    ("snapkv", {"kernel": 4}, "odd"),
    ("snapkv", {"group_reduce": "sum"}, "group_reduce"),
    ("pyramidkv", {"beta": 0}, "beta"),
    ("pyramidkv", {"num_layers": 4}, "unknown option.*num_layers"),
    ("h2o", {"recent_ratio": 1.5}, "recent_ratio"),
    ("retrieval", {"interval": 0}, "interval"),
    ("interval", {"fetch": "dma"}, "fetch"),
])
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_policy(name, CFG, ratio=0.5, **options)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_window_larger_than_budget(name):
    q, k, v, lengths = random_qk(9)
    pol = make_policy(name, CFG, ratio=0.25, window=32)  # budget of 64 tokens: 16 < 32
    with pytest.raises(ValueError, match="window=32 is larger than the per-head budget 16"):
        pol.select(0, q, k, lengths)


@pytest.mark.parametrize("b,h", [(1, 1), (1, 3), (2, 1), (2, 3)])
def test_scatter_token_writes_one_row_per_head(seed, b, h):
    """The cache write of every policy, jitted with the buffer donated as the decode step does
    (B = H = 1 takes the dynamic_update_slice path): row index[b, h] gets value[b, h], every other
    row is unchanged, and an index outside [0, S) writes nothing."""
    from hetero_jax.cache.base import scatter_token

    rng = np.random.default_rng(seed)
    s, d = 11, 4
    buf = rng.standard_normal((b, h, s, d)).astype(np.float32)
    value = rng.standard_normal((b, h, d)).astype(np.float32)
    for index in (rng.integers(0, s, size=(b, h)), np.full((b, h), s), np.full((b, h), -1)):
        want = buf.copy()
        for i in range(b):
            for j in range(h):
                if 0 <= index[i, j] < s:
                    want[i, j, index[i, j]] = value[i, j]
        write = jax.jit(scatter_token, donate_argnums=0)
        got = write(jnp.asarray(buf), jnp.asarray(index, jnp.int32), jnp.asarray(value))
        np.testing.assert_array_equal(np.asarray(got), want)
