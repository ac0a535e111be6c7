"""Flax NNX modules (``hetero_jax.nnx_model``) against the functional model on small random configs:
the same logits (prefill, decode steps, compressing policies), params <-> module both ways,
``nnx.split`` / ``nnx.merge``, a replaced block, gradients, and ``generate`` taking either."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.config import LlamaConfig
from convert.params import init_random_params
from hetero_jax import model
from hetero_jax.cache import make_policy
from hetero_jax.cache.base import compiled
from hetero_jax.cache.full import FullKV
from hetero_jax.cache.hetero import HeteroCache
from hetero_jax.decode_loop import prefill_once
from hetero_jax.generate import generate
from hetero_jax.nnx_model import LlamaForCausalLM
from tests.test_hetero import make_cfg, prompts, random_profile


def qwen2_cfg(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=4096, tie_word_embeddings=tied, qkv_bias=True)


CONFIGS = {"llama": lambda: make_cfg(layers=2, kv=4), "qwen2-tied": lambda: qwen2_cfg(True),
           "qwen2-untied": lambda: qwen2_cfg(False)}


def assert_trees_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def drive(prefill, step, weights, policy, tokens, lengths, n_steps):
    """Prefill + ``n_steps`` greedy decode steps as ``decode_loop`` drives them (the step compiled
    once, host arrays kept out of it) -> every step's logits, and the last cache."""
    logits, cache = prefill(weights, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32))
    cache = policy.after_prefill(cache)
    out = [np.asarray(logits)]
    for _ in range(n_steps):
        cache = policy.before_step(cache)
        dev, host = dataclasses.replace(cache, host=None), cache.host
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        logits, dev = compiled(step, weights, dev, tok)(weights, dev, tok)
        cache = dataclasses.replace(dev, host=host)
        out.append(np.asarray(logits))
    return out, cache


def both_paths(params, cfg, policy, tokens, lengths, n_steps):
    """The functional model on the params dict and the NNX module (split into graph and state, the
    state an argument of the jitted functions, as NNX's functional API has it) on the same prompts."""
    new = n_steps + 1
    graphdef, state = nnx.split(LlamaForCausalLM.from_params(params, cfg))

    def module_prefill(state, tokens, lengths):
        return nnx.merge(graphdef, state).prefill(tokens, lengths, policy=policy, max_new_tokens=new)

    def module_step(state, cache, tokens):
        return nnx.merge(graphdef, state)(tokens, cache, policy=policy)

    functional = drive(jax.jit(functools.partial(model.prefill, cfg=cfg, policy=policy, max_new_tokens=new)),
                       jax.jit(functools.partial(model.decode_step, cfg=cfg, policy=policy)), params,
                       policy, tokens, lengths, n_steps)
    modules = drive(jax.jit(module_prefill), jax.jit(module_step), state, policy, tokens, lengths, n_steps)
    return functional, modules


@pytest.mark.parametrize("name, policy", [("llama", "snapkv"), ("qwen2-tied", "full"), ("qwen2-untied", "snapkv")])
def test_nnx_logits_equal_functional(seed, name, policy):
    cfg = CONFIGS[name]()
    rng = np.random.default_rng(seed)
    params = init_random_params(cfg, seed, scale=0.1)
    lengths = [128, int(rng.integers(40, 128))]
    pol = make_policy(policy, cfg, ratio=None if policy == "full" else 0.5)
    (want, want_cache), (got, got_cache) = both_paths(params, cfg, pol, prompts(rng, lengths, 128), lengths, 3)
    for w, g in zip(want, got):
        assert np.isfinite(w).all()
        np.testing.assert_array_equal(g, w)
    assert_trees_bit_equal(got_cache, want_cache)


def test_nnx_logits_equal_functional_hetero(seed):
    """HeteroCache with drift refreshes from host memory (threshold 1: every check refreshes)."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=1, kv=4)
    params = init_random_params(cfg, seed, scale=0.1)
    pol = HeteroCache.create(cfg, ratio=0.5, profile=random_profile(cfg, rng, [([(0, [1, 2])], "aaaa")]),
                             threshold=1.0, steps=1)  # a pivot, its satellites, an anchor
    lengths = [128, int(rng.integers(60, 128))]
    (want, want_cache), (got, got_cache) = both_paths(params, cfg, pol, prompts(rng, lengths, 128), lengths, 3)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    assert pol.stats(got_cache)["refreshes"] > 0 and pol.stats(got_cache) == pol.stats(want_cache)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_params_module_roundtrip_and_split_merge(seed, name):
    cfg = CONFIGS[name]()
    params = init_random_params(cfg, seed, scale=0.1)
    m = LlamaForCausalLM.from_params(params, cfg)
    assert_trees_bit_equal(m.to_params(), params)
    graphdef, state = nnx.split(m)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(params))  # tied: the table is held once
    assert ("lm_head" in state["head"]) != cfg.tie_word_embeddings
    np.testing.assert_array_equal(state["layers"][1]["attn"]["wk"][...], params["layers"][1]["wk"])
    # a changed state comes back through merge and to_params
    doubled = jax.tree.map(lambda x: 2 * x, state)
    assert_trees_bit_equal(nnx.merge(graphdef, doubled).to_params(), jax.tree.map(lambda x: 2 * x, params))
    assert_trees_bit_equal(nnx.merge(graphdef, state).to_params(), params)
    # and a jitted function of (graphdef, state) computes the module's logits
    toks = jnp.asarray(prompts(np.random.default_rng(seed), [50], 128))
    run = jax.jit(lambda s, t: nnx.merge(graphdef, s).prefill(t, jnp.asarray([50]), policy=FullKV(),
                                                                   max_new_tokens=1)[0])
    want = jax.jit(lambda p, t: model.prefill(p, t, jnp.asarray([50]), cfg=cfg, policy=FullKV(), max_new_tokens=1)[0])
    np.testing.assert_array_equal(run(state, toks), want(params, toks))


def test_from_params_refuses_mismatched_params(seed):
    cfg = make_cfg()
    params = init_random_params(cfg, seed)
    with pytest.raises(ValueError, match=r"layers\.1\.wq: shape"):
        LlamaForCausalLM.from_params(dict(params, layers=[params["layers"][0], {**params["layers"][1],
                                                                                "wq": params["layers"][1]["wk"]}]), cfg)
    with pytest.raises(ValueError, match="missing layers.0.bq"):
        LlamaForCausalLM.from_params(params, dataclasses.replace(cfg, qkv_bias=True))


class SkipMLP(nnx.Module):
    """A replacement block: the residual stream passes through unchanged."""

    def __call__(self, x):
        return x


class ScaledAttention(nnx.Module):
    """A replacement block wrapping the original: its update to the residual stream, times ``scale``."""

    def __init__(self, inner, scale: float):
        self.inner, self.scale = inner, scale

    def __call__(self, x, positions, inv_freq, attend):
        y, kept = self.inner(x, positions, inv_freq, attend)
        return x + self.scale * (y - x), kept


def test_replaced_blocks_change_logits_as_expected(seed):
    cfg = make_cfg()
    params = init_random_params(cfg, seed, scale=0.1)
    rng = np.random.default_rng(seed)
    toks, lengths = jnp.asarray(prompts(rng, [70], 128)), jnp.asarray([70])

    functional = jax.jit(lambda p: model.prefill(p, toks, lengths, cfg=cfg, policy=FullKV(), max_new_tokens=1)[0])
    module = nnx.jit(lambda m: m.prefill(toks, lengths, policy=FullKV(), max_new_tokens=1)[0])

    def logits(p_or_m):
        return np.asarray(functional(p_or_m) if isinstance(p_or_m, dict) else module(p_or_m))

    # skipping layer 1's MLP is the functional model with that MLP's output projection zeroed
    m = LlamaForCausalLM.from_params(params, cfg)
    m.layers[1].mlp = SkipMLP()
    zeroed = dict(params, layers=[params["layers"][0], dict(params["layers"][1], w_down=jnp.zeros_like(
        params["layers"][1]["w_down"]))])
    np.testing.assert_array_equal(logits(m), logits(zeroed))
    assert not np.allclose(logits(m), logits(params))
    with pytest.raises(ValueError, match=r"replaced blocks layers\[1\]\.mlp \(SkipMLP\)"):
        m.to_params()
    with pytest.raises(ValueError, match="replaced blocks"):
        generate(m, [1, 2, 3], config=cfg, max_new_tokens=2)
    # scaling layer 0's attention update by 0.5 is the functional model with that layer's wo halved
    m = LlamaForCausalLM.from_params(params, cfg)
    m.layers[0].attn = ScaledAttention(m.layers[0].attn, 0.5)
    halved = dict(params, layers=[dict(params["layers"][0], wo=0.5 * params["layers"][0]["wo"]), params["layers"][1]])
    np.testing.assert_allclose(logits(m), logits(halved), rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits(m), logits(params), rtol=1e-3, atol=1e-3)


def _next_token_loss(logits, toks, n):
    """Mean cross-entropy of tokens 1..n-1 given their prefixes."""
    logp = jax.nn.log_softmax(logits[:, : n - 1], -1)
    return -jnp.take_along_axis(logp, toks[:, 1:n, None], -1).mean()


def test_gradients_through_the_module(seed):
    """Fine-tuning around the model: nnx.grad w.r.t. the module's Params equals jax.grad of the
    functional loss w.r.t. the params dict, and a small step along it lowers the loss."""
    cfg = qwen2_cfg(tied=True)  # the tied table gets gradients from the embedding and the head
    params = init_random_params(cfg, seed, scale=0.1)
    n = 90
    toks = jnp.asarray(prompts(np.random.default_rng(seed), [n], 128))

    def functional_loss(p):
        logits, _ = model.prefill(p, toks, jnp.asarray([n]), cfg=cfg, policy=FullKV(), max_new_tokens=1,
                                  all_logits=True)
        return _next_token_loss(logits, toks, n)

    def module_loss(m):
        logits, _ = m.prefill(toks, jnp.asarray([n]), policy=FullKV(), max_new_tokens=1, all_logits=True)
        return _next_token_loss(logits, toks, n)

    m = LlamaForCausalLM.from_params(params, cfg)
    loss, grads = nnx.jit(nnx.value_and_grad(module_loss))(m)
    want = jax.jit(jax.grad(functional_loss))(params)
    graphdef, _ = nnx.split(m)
    got = nnx.merge(graphdef, grads).to_params()  # the gradients in the params layout
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(got["layers"][0]["wq"]).max()) > 0
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.05 * g, nnx.state(m, nnx.Param), grads))
    assert float(nnx.jit(module_loss)(m)) < float(loss)


def test_generate_and_prefill_once_accept_the_module(seed):
    cfg = make_cfg()
    params = init_random_params(cfg, seed, scale=0.1)
    m = LlamaForCausalLM.from_params(params, cfg)
    rng = np.random.default_rng(seed)
    batch = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(5, 120, 2)]
    for policy in ("full", "snapkv"):
        a = generate(params, batch, policy, config=cfg, max_new_tokens=6)
        b = generate(m, batch, policy, config=cfg, max_new_tokens=6)
        assert a.tokens == b.tokens and all(len(t) == 6 for t in a.tokens)
    pa, pb = prefill_once(params, batch, config=cfg), prefill_once(m, batch, config=cfg)
    assert_trees_bit_equal((pa.logits, pa.qkv), (pb.logits, pb.qkv))
