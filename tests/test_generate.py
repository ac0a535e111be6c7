"""generate(): ragged batches, sampling, stop tokens, errors (small random models)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetero_jax import model
from hetero_jax.cache.full import FullKV
from hetero_jax.decode_loop import GenerationError, RunOptions, Sampling, sample_tokens
from hetero_jax.generate import generate


def _prompts(seed, lengths, vocab=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _greedy_reference(params, cfg, prompt, n):
    """Greedy decoding by re-running the whole sequence each step (no cache at all)."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        toks = np.zeros((1, 128 * (-(-len(seq) // 128))), np.int32)
        toks[0, : len(seq)] = seq
        logits, _ = model.prefill(params, jnp.asarray(toks), jnp.asarray([len(seq)]), cfg=cfg,
                                  policy=FullKV(), max_new_tokens=1)
        nxt = int(jnp.argmax(logits[0]))
        out.append(nxt)
        seq.append(nxt)
    return out


def test_greedy_matches_cacheless_reference(tiny_cfg, tiny_params, seed):
    prompt = _prompts(seed, [77])[0]
    res = generate(tiny_params, prompt, "full", config=tiny_cfg, max_new_tokens=6)
    assert res.tokens[0] == _greedy_reference(tiny_params, tiny_cfg, prompt, 6)


def test_ragged_batch_equals_each_alone(tiny_cfg, tiny_params, seed):
    prompts = _prompts(seed, [40, 250, 129])
    batch = generate(tiny_params, prompts, "full", config=tiny_cfg, max_new_tokens=12)
    assert batch.prompt_lengths == [40, 250, 129]
    for i, p in enumerate(prompts):
        alone = generate(tiny_params, p, "full", config=tiny_cfg, max_new_tokens=12)
        assert alone.tokens[0] == batch.tokens[i]


def test_sampling_deterministic_per_seed_and_varies(tiny_cfg, tiny_params, seed):
    prompt = _prompts(seed, [30])[0]
    kw = dict(config=tiny_cfg, max_new_tokens=16, temperature=1.5)
    a = generate(tiny_params, prompt, "full", seed=1, **kw).tokens
    b = generate(tiny_params, prompt, "full", seed=1, **kw).tokens
    runs = {tuple(generate(tiny_params, prompt, "full", seed=s, **kw).tokens[0]) for s in range(2, 6)}
    assert a == b
    assert len(runs) > 1


def test_top_p_tiny_and_top_k_one_are_greedy(tiny_cfg, tiny_params, seed):
    prompt = _prompts(seed, [30])[0]
    greedy = generate(tiny_params, prompt, "full", config=tiny_cfg, max_new_tokens=8).tokens
    k1 = generate(tiny_params, prompt, "full", config=tiny_cfg, max_new_tokens=8, temperature=1.0, top_k=1, seed=seed)
    p0 = generate(tiny_params, prompt, "full", config=tiny_cfg, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=seed)
    assert k1.tokens == greedy and p0.tokens == greedy


def test_top_k_restricts_support(seed):
    logits = jax.random.normal(jax.random.PRNGKey(seed), (4, 50))
    allowed = np.argsort(-np.asarray(logits), -1)[:, :3]
    for i in range(20):
        t = np.asarray(sample_tokens(logits, jax.random.PRNGKey(i), Sampling(1.0, top_k=3)))
        assert all(t[b] in allowed[b] for b in range(4))


def test_stop_token_ends_sequence(tiny_cfg, tiny_params, seed):
    prompts = _prompts(seed, [33, 60])
    free = generate(tiny_params, prompts, "full", config=tiny_cfg, max_new_tokens=20)
    stop = free.tokens[0][4]
    res = generate(tiny_params, prompts, "full", config=tiny_cfg, max_new_tokens=20, stop_tokens=[stop])
    first = free.tokens[0].index(stop)
    assert res.tokens[0] == free.tokens[0][: first + 1]
    cut = free.tokens[1].index(stop) + 1 if stop in free.tokens[1] else 20
    assert res.tokens[1] == free.tokens[1][:cut]


def test_cache_is_donated_and_lengths_advance(tiny_cfg, tiny_params, seed):
    res = generate(tiny_params, _prompts(seed, [10, 20]), "full", config=tiny_cfg, max_new_tokens=5)
    assert np.asarray(res.cache.lengths).tolist() == [14, 24]  # 4 decode steps after the prefill token
    assert res.stats["device_bytes"] > 0 and res.stats["host_bytes"] == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokens=[]), "empty prompt"),
        (dict(tokens=[[1, 2], []]), "empty prompt"),
        (dict(tokens=[1] * 4000, max_new_tokens=200), "exceeds the model's context"),
        (dict(tokens=[1, 2], temperature=-1.0), "temperature"),
        (dict(tokens=[1, 2], top_p=1.5), "top_p"),
        (dict(tokens=[1, 2], max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_arguments(tiny_cfg, tiny_params, kwargs, match):
    kwargs = dict(kwargs)
    tokens = kwargs.pop("tokens")
    with pytest.raises(GenerationError, match=match):
        generate(tiny_params, tokens, "full", config=tiny_cfg, **kwargs)


def test_unknown_policy(tiny_cfg, tiny_params):
    with pytest.raises(ValueError, match="unknown cache policy 'nope'"):
        generate(tiny_params, [1, 2, 3], "nope", config=tiny_cfg)


def test_padding_bucket_and_reserve_do_not_change_tokens(tiny_cfg, tiny_params, seed):
    prompts = _prompts(seed, [70, 140])
    plain = generate(tiny_params, prompts, "full", config=tiny_cfg, max_new_tokens=7)
    bucketed = generate(tiny_params, prompts, "full", config=tiny_cfg, max_new_tokens=7,
                        options=RunOptions(pad_multiple=512, reserve_new_tokens=40))
    assert bucketed.tokens == plain.tokens
    with pytest.raises(GenerationError, match="reserve_new_tokens"):
        generate(tiny_params, prompts, "full", config=tiny_cfg, max_new_tokens=7,
                 options=RunOptions(reserve_new_tokens=3))


@pytest.mark.parametrize("name, ratio", [("full", None), ("snapkv", 0.5), ("streaming", 0.5), ("h2o", 0.5),
                                         ("pyramidkv", 0.5), ("retrieval", 0.5)])
def test_shared_prefill_equals_own_prefill(tiny_cfg, tiny_params, seed, name, ratio):
    """One prefill_once feeds many policies: caches, tokens and stats equal each policy's own prefill."""
    from hetero_jax.cache import make_policy
    from hetero_jax.decode_loop import prefill_once

    prompts = _prompts(seed, [90, 200])
    policy = make_policy(name, tiny_cfg, ratio=ratio, **({"window": 8} if name in ("snapkv", "pyramidkv") else {}))
    shared = prefill_once(tiny_params, prompts, config=tiny_cfg)
    own = generate(tiny_params, prompts, policy, config=tiny_cfg, max_new_tokens=6)
    via = generate(tiny_params, prompts, policy, config=tiny_cfg, max_new_tokens=6,
                   options=RunOptions(prefilled=shared))
    assert via.tokens == own.tokens
    assert via.stats["device_bytes"] == own.stats["device_bytes"]
    with pytest.raises(GenerationError, match="other tokens"):
        generate(tiny_params, prompts[:1], policy, config=tiny_cfg, max_new_tokens=6,
                 options=RunOptions(prefilled=shared))
