"""bench.decode's pieces: the speed-run profile, per-step timing by kind, and one tiny run end to end
(its numbers are not checked: timings live in bench/, never in tests)."""

from __future__ import annotations

import numpy as np
import pytest

from bench import decode
from convert.config import LlamaConfig
from convert.params import init_random_params
from hetero_jax.cache import make_policy
from hetero_jax.profile_io import model_fingerprint, shipped_profile


def test_speed_profile_reuses_shipped_roles_or_synthesizes():
    long = LlamaConfig(**decode.PRESETS["smollm2-135m-long"])
    prof = decode.speed_profile(long)
    real = shipped_profile(LlamaConfig(**decode.PRESETS["smollm2-135m"]))
    assert prof.roles == real.roles and prof.weights == real.weights and prof.clusters == real.clusters
    assert prof.model["fingerprint"] == model_fingerprint(long)
    big = LlamaConfig(**decode.PRESETS["llama-3.1-8b"])
    syn = decode.speed_profile(big)
    assert syn.counts() == {"pivot": 32, "satellite": 64, "anchor": 160, "volatile": 0, "full": 32, "total": 256}
    syn.validate()
    make_policy("hetero", big, ratio=0.25, profile=syn)  # r = 0.25 is reachable on the synthetic mix
    small = LlamaConfig(**decode.PRESETS["llama-3.2-1b"])  # issue #12's KV-dominated shape
    assert (small.num_layers, small.num_heads, small.num_kv_heads, small.head_dim) == (16, 32, 8, 64)
    pol = make_policy("hetero", small, ratio=0.5, profile=decode.speed_profile(small))
    t = 16384
    alloc = sum(pol.plan(l, t, 1).prompt_slots(t) for l in range(16))
    assert 0.5 * 128 * t * 0.999 <= alloc <= 0.5 * 128 * t * 1.05  # device rows within +5% of r x full


def test_step_kinds_split_by_masks(seed):
    rng = np.random.default_rng(seed)
    ms = rng.uniform(1, 2, 12)
    check = [i % 4 == 3 for i in range(12)]
    refresh = [False] + [check[i - 1] and i in (4, 8) for i in range(1, 12)]
    out = decode.step_kinds_ms(ms, {"check_step_mask": check, "refresh_step_mask": refresh})
    other = [i for i in range(12) if not check[i] and not refresh[i]]
    assert out["check_step_ms"] == pytest.approx(np.median(ms[[3, 7, 11]]))
    assert out["refresh_step_ms"] == pytest.approx(np.median(ms[[4, 8]]))
    assert out["other_step_ms"] == pytest.approx(np.median(ms[other]))
    assert (out["check_steps"], out["refresh_steps"]) == (3, 2)
    assert decode.step_kinds_ms(ms, {}) == {}


def test_run_ours_tiny_rows(seed):
    cfg = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=6,
                      num_kv_heads=3, head_dim=16, rope_theta=10000.0, max_position_embeddings=1024,
                      eos_token_ids=())
    params = init_random_params(cfg, seed, scale=0.1)
    rows = decode.run_ours(cfg, params, ["full", "hetero:0.5:threshold=1:steps=2"], 128, 2, 6, 1, seed=seed,
                           synthetic=True)
    (full, _), (het, stats) = rows
    assert full["policy"] == "full" and het["policy"] == "hetero:0.5:threshold=1:steps=2"
    assert het["device_kv_bytes"] < full["device_kv_bytes"] and het["host_kv_bytes"] > 0
    assert stats["check_step_mask"][:6] == [i % 2 == 1 for i in range(6)]
    refresh = stats["refresh_step_mask"][:6]
    assert all(not r or stats["check_step_mask"][i - 1] for i, r in enumerate(refresh))  # right after a check
    assert het["check_steps"] == 3 and het["refresh_steps"] == sum(refresh)
    assert {"check_step_ms", "refresh_step_ms", "other_step_ms"} <= set(het)
    assert het["check_vs_other"] == pytest.approx(het["check_step_ms"] / het["other_step_ms"])
    assert het["alloc_vs_budget"] == pytest.approx(stats["prompt_slots_device"] / (0.5 * stats["prompt_slots_full"]))


def test_run_ours_times_the_policies_round_robin(seed, monkeypatch):
    """Each policy is compiled once, then the timed repeats alternate between the policies (order
    rotated every round), so a drift in the machine's speed is shared, not given to one policy."""
    import hetero_jax.generate as gen

    cfg = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                      eos_token_ids=())
    params = init_random_params(cfg, seed, scale=0.1)
    calls, real = [], gen.generate
    monkeypatch.setattr(gen, "generate", lambda p, t, policy, **kw: calls.append(policy.name) or real(p, t, policy, **kw))
    rows = decode.run_ours(cfg, params, ["full", "streaming:0.5", "snapkv:0.5"], 64, 1, 2, 4, seed=seed)
    f, s, k = "full", "streaming", "snapkv"
    assert calls == [f, s, k,  f, s, k,  s, k, f,  k, f, s,  f, s, k,  f, s, k]
    assert [r["policy"] for r, _ in rows] == ["full", "streaming:0.5", "snapkv:0.5"]
