"""Multi-device cases (issue #14), run by tests/test_sharding.py in one pytest subprocess with
8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), so the rest of the suite keeps
one device. Not collected on its own (not named test_*.py).

Every mesh must give the single-device greedy tokens, hold its arrays really split (shard shapes,
per-device bytes) and keep the counters of the single-device run.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import convert
from convert.checkpoint import CHECKSUMS, FORMAT, FORMAT_VERSION, META_FILE, folder_checksums
from convert.params import init_random_params
from convert.sharding import MeshError, make_mesh, shard_params
from hetero_jax.cache import make_policy
from hetero_jax.decode_loop import RunOptions, prefill_once
from hetero_jax.generate import generate
from hetero_jax.sharding import per_device_bytes
from tests.test_hetero import make_cfg, random_profile

MESHES = ["data=1,model=1", "data=1,model=2", "data=2,model=2", "data=1,model=4", "data=2,model=1"]
NEW = 8


@pytest.fixture(scope="module")
def setup():
    seed = 1414
    assert jax.device_count() == 8, "run through tests/test_sharding.py (8 CPU devices)"
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=2, kv=4)
    params = init_random_params(cfg, seed, scale=0.3)
    prompts = [rng.integers(1, 256, n).tolist() for n in (120, 77, 128, 50)]
    layouts = [([(0, [1, 2])], "aaaa"), ([(2, [3])], "avaa")]
    profile = random_profile(cfg, rng, layouts)
    policies = {"full": make_policy("full", cfg), "snapkv": make_policy("snapkv", cfg, ratio=0.5, window=4),
                "hetero": make_policy("hetero", cfg, ratio=0.5, threshold=0.2, profile=profile),
                "hetero_plus": make_policy("hetero_plus", cfg, ratio=0.5, threshold=0.2, recent=8, profile=profile)}
    return cfg, params, prompts, policies, {}


def _gen(params, cfg, prompts, policy):
    return generate(params, prompts, policy, config=cfg, max_new_tokens=NEW, stop_tokens=[], progress=False)


def _reference(setup, name):
    cfg, params, prompts, policies, refs = setup
    if name not in refs:
        refs[name] = _gen(params, cfg, prompts, policies[name])
    return refs[name]


def _shard_bytes(x):
    return sorted({int(s.data.nbytes) for s in x.addressable_shards})


@pytest.mark.parametrize("name,mesh_spec", [(n, m) for n in ("full", "snapkv", "hetero") for m in MESHES
                                             if n == "hetero" or m != "data=2,model=1"]
                         + [("hetero_plus", "data=1,model=2")])
def test_mesh_tokens_equal_single_device(setup, name, mesh_spec):
    cfg, params, prompts, policies, _ = setup
    mesh = make_mesh(mesh_spec)
    data, model = mesh.shape["data"], mesh.shape["model"]
    sharded = shard_params(params, cfg, mesh)
    wq = sharded["layers"][0]["wq"]
    assert wq.sharding.spec == P(None, "model") and _shard_bytes(wq) == [wq.nbytes // model]
    assert _shard_bytes(sharded["layers"][0]["w_down"]) == [sharded["layers"][0]["w_down"].nbytes // model]
    ref = _reference(setup, name)
    got = _gen(sharded, cfg, prompts, policies[name])
    assert got.tokens == ref.tokens
    assert got.stats["mesh"] == mesh_spec
    n = data * model
    layer = got.cache.layers[0]
    assert len(got.stats["per_device_bytes"]) >= n
    if name.startswith("hetero"):
        _check_hetero_layout(policies[name], cfg.num_kv_heads, got, ref, data, model)
    else:  # (B, Hkv, S, D): every device holds 1 / (data * model) of every layer's KV
        assert _shard_bytes(layer.k) == [layer.k.nbytes // n]
        cache_bytes = sum(x.nbytes for x in jax.tree.leaves(got.cache.layers))
        per_device = per_device_bytes(got.cache.layers)
        assert sorted(set(per_device.values())) == [cache_bytes // n] and len(per_device) == n
        assert got.stats["device_bytes"] == ref.stats["device_bytes"]


def _laid_out(x, spec) -> bool:
    return x.sharding.is_equivalent_to(NamedSharding(x.sharding.mesh, spec), x.ndim)


def _check_hetero_layout(policy, hkv, got, ref, data, model):
    """Blocks split over batch and heads, each device holding its own heads' slots; the drift state
    and the satellites' host copy over the batch only; counters as on one device; the device bytes
    change by the blocks' only (hetero_pool: compressed heads filling full-block slots take T rows)."""
    for l, st in enumerate(got.cache.layers):
        plan = policy.plan(l, st.T, st.max_new, st.shards)
        assert st.shards == model
        assert sorted(plan.full_heads + plan.comp_heads) == list(range(hkv))
        for block, heads in ((st.full_k, plan.full_heads), (st.comp_k, plan.comp_heads)):
            assert block.shape[1] == len(heads) and len(heads) % model == 0
            if not heads:  # every head in the full block (one head per device, or all full)
                continue
            assert _laid_out(block, P("data", "model"))
            assert _shard_bytes(block) == [block.nbytes // (data * model)]
            per = len(heads) // model
            for shard in block.addressable_shards:  # the device's slots hold its own heads
                first = shard.index[1].start or 0
                assert all(h * model // hkv == first // per for h in heads[first: first + per]), (l, heads, first)
        if st.drift is not None:
            kept = [getattr(st.drift, f) for f in ("ref", "req", "qbuf", "logits")]  # qbuf or logits per check_impl
            assert all(_laid_out(x, P("data")) for x in kept if x is not None) and kept[3] is not None
    host = got.cache.host.kv[0]
    assert _shard_bytes(host[0]) == [host[0].nbytes // data]
    assert host[0].sharding.memory_kind == "pinned_host"
    for key in ("checks", "refreshes", "bytes_moved", "host_prompt_bytes", "per_pivot", "prompt_slots_budget"):
        assert got.stats[key] == ref.stats[key], key
    assert got.stats["refreshes"] == sum(p["refreshes"] for p in got.stats["per_pivot"]) > 0
    assert got.stats["checks"] == sum(p["checks"] for p in got.stats["per_pivot"]) > 0
    blocks = lambda r: sum(x.nbytes for st in r.cache.layers  # noqa: E731
                           for x in (st.full_k, st.full_v, st.comp_k, st.comp_v))
    assert got.stats["device_bytes"] - ref.stats["device_bytes"] == blocks(got) - blocks(ref)
    assert (blocks(got) > blocks(ref)) == (got.stats["prompt_slots_device"] > ref.stats["prompt_slots_device"])
    if model == 1:
        assert got.stats["device_bytes"] == ref.stats["device_bytes"]


def test_three_kv_heads_split_three_ways_not_two(seed):
    """SmolLM2's shape: 9 query heads, 3 KV heads. model=3 works; model=2 names the sizes that do."""
    cfg = make_cfg(layers=1, kv=3, group=3)
    params = init_random_params(cfg, seed, scale=0.3)
    prompts = [np.random.default_rng(seed).integers(1, 256, 40).tolist()]
    on3 = shard_params(params, cfg, "model=3")
    ref = _gen(params, cfg, prompts, "full")
    got = _gen(on3, cfg, prompts, "full")
    assert got.tokens == ref.tokens
    assert _shard_bytes(got.cache.layers[0].k) == [got.cache.layers[0].k.nbytes // 3]
    # hetero: one head per device, so the full block has a slot per device (the compressed heads in two)
    hetero = make_policy("hetero", cfg, ratio=0.5, threshold=0.9, steps=2,
                         profile=random_profile(cfg, np.random.default_rng(seed), [([(0, [1])], "aaa")]))
    ref, got = _gen(params, cfg, prompts, hetero), _gen(on3, cfg, prompts, hetero)
    assert got.tokens == ref.tokens and got.stats["refreshes"] == ref.stats["refreshes"] > 0
    _check_hetero_layout(hetero, 3, got, ref, 1, 3)
    st = got.cache.layers[0]
    assert (st.full_k.shape[1], st.comp_k.shape[1], ref.cache.layers[0].full_k.shape[1]) == (3, 0, 1)
    for spec in ("model=2", "data=2,model=2", "model=4"):
        with pytest.raises(MeshError, match=r"does not divide this model's 3 KV heads; it supports model = 1, 3"):
            shard_params(params, cfg, spec)


def test_bad_meshes_and_batches(setup):
    cfg, params, prompts, policies, _ = setup
    with pytest.raises(MeshError, match="needs 16 devices; 8 cpu device"):
        make_mesh("data=4,model=4")
    with pytest.raises(MeshError, match="unknown axis 'pipe'"):
        make_mesh("pipe=2")
    on_data2 = shard_params(params, cfg, "data=2")
    with pytest.raises(MeshError, match="a batch of 3 prompt.*data=2"):
        _gen(on_data2, cfg, prompts[:3], "full")
    with pytest.raises(MeshError, match="a batch of 1 prompt.*data=2"):
        prefill_once(on_data2, prompts[:1], config=cfg)


def test_load_model_restores_straight_into_the_mesh(setup, tmp_path):
    """load_model(mesh=) on a converted folder: orbax restores each leaf in its sharded layout."""
    cfg, params, prompts, _, _ = setup
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(cfg.to_json())
    convert.save_params(params, folder / "params")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "float32",
            CHECKSUMS: folder_checksums(folder)}
    (folder / META_FILE).write_text(json.dumps(meta))
    m = convert.load_model(folder, mesh="data=2,model=2")
    wk = m.params["layers"][1]["wk"]
    assert wk.sharding.spec == P(None, "model") and wk.sharding.mesh.shape == {"data": 2, "model": 2}
    assert m.params["embed"].sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _gen(m.params, cfg, prompts, "full").tokens == _reference(setup, "full").tokens


def test_shared_prefill_on_a_mesh(setup):
    """The benchmarks' path (prefill_once + build_cache) keeps the layout too."""
    cfg, params, prompts, policies, _ = setup
    sharded = shard_params(params, cfg, "data=2,model=2")
    shared = prefill_once(sharded, prompts, config=cfg)
    got = generate(sharded, prompts, policies["snapkv"], config=cfg, max_new_tokens=NEW, stop_tokens=[],
                   progress=False, options=RunOptions(prefilled=shared))
    assert got.tokens == _reference(setup, "snapkv").tokens
    assert got.cache.layers[1].k.sharding.spec == P("data", "model")


def _collectives(text: str) -> list[str]:
    """(op, jax op name) of every cross-device collective in a compiled program's HLO."""
    found = re.finditer(r"= \S+ (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)\(.*?"
                        r'op_name="([^"]*)"', text)
    return [f"{m.group(1)} {m.group(2).rsplit('/', 1)[-1]}" for m in found]


def test_owner_shard_work_crosses_no_devices(setup):
    """On data=2 the cache write of every step (scatter_token) and hetero's refresh gather from the
    host copy run on the shard that owns the sequence: no collective comes from them."""
    from hetero_jax.cache import hetero_refresh
    from hetero_jax.cache.base import _COMPILED

    cfg, params, prompts, policies, _ = setup
    sharded = shard_params(params, cfg, "data=2")
    _COMPILED.clear()
    _gen(sharded, cfg, prompts, "full")
    (step,) = [exe for key, exe in _COMPILED.items() if key[0].__name__ == "step"]
    # allowed: the new tokens into the replicated output buffer, the non-finite flag
    assert sorted(_collectives(step.as_text())) == ["all-gather scatter", "all-reduce reduce_and"]
    got = _gen(sharded, cfg, prompts, policies["hetero"])
    c = got.cache
    due = tuple(l for l, kv in enumerate(c.host.kv) if kv is not None)
    refresh = hetero_refresh._programs(policies["hetero"], c.layers, c.host, due).as_text()
    assert "compute_on/gather" in refresh  # the host gather is in the program
    assert not [x for x in _collectives(refresh) if x.endswith(" gather")], _collectives(refresh)


def test_hetero_lag2_and_teacher_forcing_on_a_mesh(setup):
    """The other host-program path (lag 2: select, fetch, apply) on data=2, and teacher forcing
    (the fidelity benchmark's fed tokens) on data=2,model=2, equal their single-device runs."""
    import dataclasses

    from hetero_jax.decode_loop import run

    cfg, params, prompts, policies, _ = setup
    lag2 = dataclasses.replace(policies["hetero"], lag=2)
    ref = _gen(params, cfg, prompts, lag2)
    got = _gen(shard_params(params, cfg, "data=2"), cfg, prompts, lag2)
    assert got.tokens == ref.tokens and got.stats["refreshes"] == ref.stats["refreshes"] > 0
    feed = np.random.default_rng(7).integers(1, 256, (5, len(prompts)))
    want = run(params, prompts, config=cfg, policy=policies["full"], steps=5, feed=feed)
    have = run(shard_params(params, cfg, "data=2,model=2"), prompts, config=cfg, policy=policies["full"], steps=5,
               feed=feed)
    np.testing.assert_array_equal(have.tokens, want.tokens)


def test_bench_decode_rows_report_per_device_bytes(setup):
    """bench.decode --mesh: each row carries the mesh, bytes per device and their balance."""
    from bench.decode import run_ours

    cfg, params, _, _, _ = setup
    sharded = shard_params(params, cfg, "data=2,model=2")
    rows = run_ours(cfg, sharded, ["full", "snapkv:0.5:window=4"], context=100, batch=2, new_tokens=2, repeats=1)
    for row, _ in rows:
        assert row["mesh"] == "data=2,model=2" and row["devices"] == 4 and row["kv_balance"] == 1.0
        assert row["kv_bytes_per_device_max"] < row["device_kv_bytes"] / 3  # a quarter, + small replicated arrays
        assert row["weights_bytes_per_device_max"] < sum(x.nbytes for x in jax.tree.leaves(params))
