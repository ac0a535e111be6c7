"""Head profiling (REFERENCE.md section 1) against independent references, and the profile file."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetero_jax.cache.base import Cache
from hetero_jax.cache.hetero import HeteroCache
from convert.config import LlamaConfig
from convert.params import init_random_params
from hetero_jax.profile_io import (
    FORMAT, PROFILES_DIR, ProfileError, load_profile, save_profile, shipped_profile,
)
from hetero_jax.profiling import ProfileRecorder, classify, default_lengths, profile_model, star_clusters

SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


def tiny_cfg(kv=3, group=2):
    return LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=kv * group,
                       num_kv_heads=kv, head_dim=8, max_position_embeddings=4096)


# ------------------------------------------------------------------------------------ classification
def reference_classify(pre, dec, sim_thr, stab_thr):
    """The authors' get_cluster.py loops, on Python sets (independent of classify's numpy)."""
    nl, nb, hkv, k = pre.shape
    ov = lambda a, b: len(set(a.tolist()) & set(b.tolist())) / len(a)  # noqa: E731
    roles, stab_all, clusters = [], [], []
    for l in range(nl):
        stab = [statistics.median([sum(ov(pre[l, b, h], dec[s, l, b, h]) for b in range(nb)) / nb
                                   for s in range(len(dec))]) for h in range(hkv)]
        adj = {i: {j for j in range(hkv) if j != i
                   and sum(ov(pre[l, b, i], pre[l, b, j]) for b in range(nb)) / nb >= sim_thr} for i in range(hkv)}
        unassigned, stars = set(range(hkv)), {}
        while unassigned:
            cands = sorted(((len(adj[n] & unassigned), n) for n in unassigned), key=lambda x: (-x[0], x[1]))
            deg, lead = cands[0]
            if deg == 0:
                break
            stars[lead] = sorted(adj[lead] & unassigned)
            unassigned -= {lead, *stars[lead]}
        sats = {s for ss in stars.values() for s in ss}
        roles.append(tuple("pivot" if h in stars else "satellite" if h in sats
                           else ("anchor" if stab[h] >= stab_thr else "volatile") for h in range(hkv)))
        stab_all.append(stab)
        clusters.append(tuple(sorted((p, tuple(s)) for p, s in stars.items())))
    comp = [(l, h) for l in range(nl) for h in range(hkv) if roles[l][h] in ("anchor", "satellite")]
    tot = sum(1 / (stab_all[l][h] + 1e-6) for l, h in comp)
    weights = [[len(comp) / (stab_all[l][h] + 1e-6) / tot if (l, h) in comp else None for h in range(hkv)]
               for l in range(nl)]
    return roles, stab_all, weights, clusters


def planted_sets(rng, nl, nb, hkv, k, n, steps):
    """Random top-k sets where some heads copy (part of) others and some drift."""
    pre = np.zeros((nl, nb, hkv, k), np.int64)
    dec = np.zeros((steps, nl, nb, hkv, k), np.int64)
    for l in range(nl):
        for b in range(nb):
            for h in range(hkv):
                src = pre[l, b, rng.integers(0, h)] if h and rng.random() < 0.5 else None
                keep = rng.integers(0, k + 1) if src is not None else 0
                base = list(src[:keep]) if src is not None else []
                rest = rng.permutation([x for x in range(n) if x not in set(base)])[: k - len(base)]
                pre[l, b, h] = rng.permutation(np.concatenate([base, rest]).astype(np.int64))
                drift = rng.uniform(0, 1)
                for s in range(steps):
                    m = int(k * (1 - drift) * rng.uniform(0.5, 1))
                    rest = rng.permutation([x for x in range(n) if x not in set(pre[l, b, h, :m])])[: k - m]
                    dec[s, l, b, h] = np.concatenate([pre[l, b, h, :m], rest])
    return pre, dec


def test_classify_matches_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(4):
        nl, nb, hkv, k, n, steps = 3, int(rng.integers(1, 3)), int(rng.integers(2, 7)), 12, 40, int(rng.integers(1, 6))
        pre, dec = planted_sets(rng, nl, nb, hkv, k, n, steps)
        sim, stab = float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))
        roles, st, w, cl = classify(pre, dec, sim_threshold=sim, stable_threshold=stab)
        r_roles, r_st, r_w, r_cl = reference_classify(pre, dec, sim, stab)
        assert list(roles) == r_roles and list(cl) == r_cl
        np.testing.assert_allclose(np.array(st), np.array(r_st), rtol=1e-12)
        for a, b in zip(w, r_w):
            assert [x is None for x in a] == [x is None for x in b]
            np.testing.assert_allclose([x for x in a if x is not None], [x for x in b if x is not None], rtol=1e-9)
        ws = [x for row in w for x in row if x is not None]
        assert not ws or abs(np.mean(ws) - 1) < 1e-9  # mean weight 1 over compressed heads


def test_star_clustering_greedy_order():
    adj = np.zeros((6, 6), bool)
    for i, j in [(0, 1), (2, 3), (2, 4), (3, 5), (4, 5), (1, 5)]:
        adj[i, j] = adj[j, i] = True
    # degrees: 5 has 3 (1, 3, 4) -> pivot 5 {1, 3, 4}; left 0, 2: 0-1 gone, 2's neighbours gone -> stop
    assert star_clusters(adj) == [(5, [1, 3, 4])]
    adj2 = np.zeros((4, 4), bool)
    adj2[0, 1] = adj2[1, 0] = adj2[2, 3] = adj2[3, 2] = True
    assert star_clusters(adj2) == [(0, [1]), (2, [3])]  # ties: lowest index first


@pytest.mark.parametrize("bad", [-0.1, 1.1])
def test_classify_threshold_errors(bad):
    pre = np.zeros((1, 1, 2, 3), np.int64)
    with pytest.raises(ValueError, match=r"sim_threshold must be in \[0, 1\]"):
        classify(pre, pre[None], sim_threshold=bad)
    with pytest.raises(ValueError, match=r"stable_threshold must be in \[0, 1\]"):
        classify(pre, pre[None], stable_threshold=bad)


# ------------------------------------------------------------------------------------ recorded sets
def np_mean_scores(q_group, keys, n_valid, n_prompt):
    """float64: softmax of one query per group head over keys [:n_valid], restricted to the first
    n_prompt keys, mean over the group, pool5 (zero padded)."""
    s = q_group.astype(np.float64) @ keys[:n_valid].astype(np.float64).T / math.sqrt(keys.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).mean(0)[:n_prompt]
    padded = np.pad(p, 2)
    return sum(padded[i:i + n_prompt] for i in range(5)) / 5


def check_set(got, scores, k, tol=1e-5):
    kth = np.sort(scores)[::-1][k - 1]
    want = set(np.argsort(-scores, kind="stable")[:k].tolist())
    assert len(set(got.tolist())) == k
    for x in want ^ set(got.tolist()):
        assert abs(scores[x] - kth) <= tol * kth, (x, scores[x], kth)


def test_recorder_sets_match_numpy(seed):
    rng = np.random.default_rng(seed)
    b, t, hkv, g, d, topk, steps = 2, 128, 2, 3, 8, 17, 3
    rec = ProfileRecorder(topk=topk)
    q = rng.standard_normal((b, t, hkv * g, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    lengths = np.array([t, int(rng.integers(topk, t))], np.int32)
    st = jax.jit(lambda *a: rec.build_layer(0, *a, steps))(q, k, v, lengths)
    for bi, n in enumerate(lengths):
        for h in range(hkv):
            check_set(np.asarray(st.sets)[bi, h], np_mean_scores(q[bi, n - 1, h * g:(h + 1) * g], k[bi, :, h], n, n), topk)
    keys = k.copy()
    cache = Cache(layers=(st,), lengths=jnp.asarray(lengths), step=jnp.zeros((), jnp.int32))
    dec = jax.jit(lambda st, q1, k1, v1, c: rec.decode_layer(0, st, q1, k1, v1, c))
    for s in range(steps):
        q1 = rng.standard_normal((b, hkv * g, d)).astype(np.float32)
        k1 = rng.standard_normal((b, hkv, d)).astype(np.float32)
        _, st = dec(st, q1, k1, rng.standard_normal((b, hkv, d)).astype(np.float32), cache)
        for bi, n in enumerate(lengths):
            allk = np.concatenate([keys[bi, :n], np.asarray(st.full.k)[bi, :, n:n + s + 1].transpose(1, 0, 2)])
            for h in range(hkv):
                sc = np_mean_scores(q1[bi, h * g:(h + 1) * g], allk[:, h], n + s + 1, n)
                check_set(np.asarray(st.sets)[bi, h], sc, topk)
        cache = dataclasses.replace(cache, lengths=cache.lengths + 1, step=cache.step + 1)


# ------------------------------------------------------------------------------------ end to end + file
@pytest.fixture(scope="module")
def tiny_profile():
    cfg = tiny_cfg()
    params = init_random_params(cfg, 7, scale=0.3)
    toks = np.random.default_rng(7).integers(1, 256, 300).tolist()
    return cfg, params, profile_model(params, cfg, toks, name="tiny", max_length=200, topk=40, max_new_tokens=7,
                                      progress=False)


def test_profile_model_end_to_end(tiny_profile):
    cfg, params, prof = tiny_profile
    prof.validate()
    prof.check_model(cfg, params)
    c = prof.counts()
    assert sum(c[r] for r in ("pivot", "satellite", "anchor", "volatile")) == c["total"] == 6
    assert prof.params["decode_steps_recorded"] == 6 and prof.params["prompt_tokens"] == 200
    assert prof.params["topk"] == 40 and len(prof.params["generated_ids"]) == 7
    for l in range(2):
        for h in range(3):
            assert 0.0 <= prof.stability[l][h] <= 1.0
            want = "anchor" if prof.stability[l][h] >= 0.5 else "volatile"
            if prof.roles[l][h] in ("anchor", "volatile"):
                assert prof.roles[l][h] == want


def test_profile_json_round_trip_and_refusals(tiny_profile, tmp_path):
    cfg, params, prof = tiny_profile
    path = save_profile(prof, tmp_path / "p.json")
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file
    d = json.loads(path.read_text())
    assert d["format"] == FORMAT and d["counts"] == prof.counts() and d["model"]["fingerprint"]["num_layers"] == 2
    back = load_profile(path)
    assert back == prof
    assert back.to_json_dict() == prof.to_json_dict()
    HeteroCache.create(cfg, ratio=1.0, profile=str(path))  # loads by path (r = 1 is valid even when F = N)
    with pytest.raises(ProfileError, match="another model"):
        HeteroCache.create(dataclasses.replace(cfg, head_dim=16, hidden_size=96), ratio=1.0, profile=path)
    other = init_random_params(cfg, 8, scale=0.3)
    with pytest.raises(ProfileError, match="other weights"):
        HeteroCache.create(cfg, ratio=1.0, profile=path, params=other)
    HeteroCache.create(cfg, ratio=1.0, profile=path, params=params)
    for mutate, msg in [(lambda x: x.update(version=99), "version 99"), (lambda x: x.pop("format"), "not a hetero-jax"),
                        (lambda x: x["layers"][0].pop("roles"), "malformed"),
                        (lambda x: x["layers"][0]["roles"].__setitem__(0, "leader"), "unknown roles")]:
        bad = json.loads(path.read_text())
        mutate(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ProfileError, match=msg):
            load_profile(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "missing.json")


def test_hetero_fit_defaults_to_the_shipped_fitted_profile():
    """``hetero_fit`` loads profiles/fitted/ (made with --max-full-fraction, so F/N within it), runs
    budget_by="layer", select_window=32 and select_kernel=15, and a model without a fitted profile gets a clear error."""
    from hetero_jax.cache import make_policy
    from hetero_jax.profile_io import FITTED_DIR

    fitted = shipped_profile(SMOLLM2, fitted=True)
    plain = shipped_profile(SMOLLM2)
    frac = fitted.params["max_full_fraction"]
    assert fitted.num_full / fitted.num_heads <= frac < plain.num_full / plain.num_heads
    assert fitted.params["topk"] == plain.params["topk"] and fitted.model == plain.model
    pol = make_policy("hetero_fit", SMOLLM2, ratio=0.5)
    assert pol.roles == fitted.roles and pol.roles != plain.roles
    assert (pol.budget_by, pol.select_window, pol.select_kernel, pol.refresh_by, pol.sink, pol.recent) == (
        "layer", 32, 15, "pages", 4, 64)
    assert make_policy("hetero_plus", SMOLLM2, ratio=0.5).roles == plain.roles
    assert sorted(p.name for p in FITTED_DIR.glob("*.json")) == ["smollm2-135m-instruct.json"]
    other = dataclasses.replace(SMOLLM2, num_layers=4)
    with pytest.raises(ProfileError, match="no shipped fitted HeteroCache profile.*--max-full-fraction 0.05"):
        make_policy("hetero_fit", other, ratio=0.5)


def test_default_lengths():
    assert default_lengths(SMOLLM2) == (4096, 839)
    assert default_lengths(dataclasses.replace(SMOLLM2, max_position_embeddings=131072)) == (5000, 1024)


def test_shipped_default_profile():
    assert list(PROFILES_DIR.glob("*.json")), "the default model's profile must ship with the package"
    prof = shipped_profile(SMOLLM2)
    c = prof.counts()
    assert c["total"] == 90 and c["full"] == c["pivot"] + c["volatile"]
    assert prof.params["max_length"] == 4096 and prof.params["topk"] == 839
    assert prof.params["decode_steps_recorded"] == 99
    pol = HeteroCache.create(SMOLLM2)  # profile=None -> shipped; ratio 0.5 must be valid for it
    assert pol.ratio == 0.5 and pol.roles == prof.roles
