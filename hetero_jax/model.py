"""Llama forward pass as pure functions: params pytree + tokens + cache in, logits + cache out.

The model computes projections, RoPE, norms and the MLP; attention over stored context is the
cache policy's business (``hetero_jax.cache.base``), so the model never knows which policy runs.
Layers are unrolled over per-layer arrays (no ``lax.scan`` over a stacked cache, which copied
the whole cache every decode step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from convert.config import LlamaConfig
from hetero_jax.attention import apply_rope, gather_rows, prefill_attention, rope_inv_freq
from hetero_jax.cache.base import Cache, CachePolicy


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def _qkv(lp, x, positions, cfg: LlamaConfig, inv_freq):
    """x: (..., hidden) -> post-RoPE q (..., Hq, D), k, v (..., Hkv, D); Qwen2 adds q/k/v biases."""
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = (h @ lp[w] + lp[b] if cfg.qkv_bias else h @ lp[w] for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
    q = q.reshape(*h.shape[:-1], cfg.num_heads, cfg.head_dim)
    k, v = (a.reshape(*h.shape[:-1], cfg.num_kv_heads, cfg.head_dim) for a in (k, v))
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def attention_block(lp, x, positions, inv_freq, attend, *, cfg: LlamaConfig):
    """Pre-norm attention plus its residual -> (x, kept). ``attend(q, k, v) -> (out, kept)`` attends
    the post-RoPE q, k, v: the causal prefill attention, or a cache policy's ``decode_layer``."""
    q, k, v = _qkv(lp, x, positions, cfg, inv_freq)
    out, kept = attend(q, k, v)
    return x + out.reshape(*x.shape[:-1], -1).astype(x.dtype) @ lp["wo"], kept


def mlp_block(lp, x, *, cfg: LlamaConfig):
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    return x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]


def decoder_layer(lp, x, positions, inv_freq, attend, *, cfg: LlamaConfig):
    x, kept = attention_block(lp, x, positions, inv_freq, attend, cfg=cfg)
    return mlp_block(lp, x, cfg=cfg), kept


def final_logits(params, x, *, cfg: LlamaConfig):
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return (x @ head).astype(jnp.float32)


def network(params, cfg: LlamaConfig) -> tuple:
    """The params dict as the callables ``(embed, layers, head)`` the loops below run (``nnx_model``'s
    modules pass their own): ``embed(tokens)``; layers called as ``decoder_layer`` after ``lp``; ``head(x)``."""
    if isinstance(params, tuple):
        return params
    layers = [functools.partial(decoder_layer, lp, cfg=cfg) for lp in params["layers"]]
    return params["embed"].__getitem__, layers, functools.partial(final_logits, params, cfg=cfg)


def as_params(params):
    """The params dict, given it or a Flax ``nnx_model.LlamaForCausalLM`` (``generate`` takes either)."""
    return params.to_params() if hasattr(params, "to_params") else params


def _prompt_layers(params, tokens, lengths, cfg: LlamaConfig, keep, all_logits=False, progress=None):
    """The one prefill layer loop: causal attention over the right-padded prompt for every policy;
    ``keep(layer, q, k, v)`` says what each layer leaves (a policy's state, or q, k, v). ``progress(layer)``,
    if given, runs as each layer finishes (``jax.debug.callback``: a progress bar without leaving jit)."""
    (embed, layers, head), (b, t) = network(params, cfg), tokens.shape
    positions, inv_freq = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), rope_inv_freq(cfg)
    x, kept = embed(tokens), []
    for i, layer in enumerate(layers):
        x, state = layer(x, positions, inv_freq, lambda q, k, v: (prefill_attention(q, k, v), keep(i, q, k, v)))
        kept.append(state)
        if progress is not None:
            jax.debug.callback(functools.partial(progress, i), x[0, 0, 0], ordered=True)
    if not all_logits:
        x = gather_rows(x, (lengths - 1)[:, None])[:, 0]
    return head(x), tuple(kept)


def prefill(params, tokens: jax.Array, lengths: jax.Array, *, cfg: LlamaConfig, policy: CachePolicy,
            max_new_tokens: int, all_logits: bool = False, progress=None):
    """Run the right-padded prompt ``tokens`` (B, T) through the model and build the policy's cache
    -> ``(logits, cache)``: logits (B, V) at each row's last real token, or (B, T, V) with ``all_logits``."""
    build = functools.partial(policy.build_layer, lengths=lengths, max_new_tokens=max_new_tokens)
    logits, states = _prompt_layers(params, tokens, lengths, cfg, build, all_logits, progress)
    return logits, _new_cache(states, lengths)


def prefill_qkv(params, tokens: jax.Array, lengths: jax.Array, *, cfg: LlamaConfig, progress=None):
    """The policy-independent prefill: last-token logits (B, V) and every layer's post-RoPE (q, k, v),
    which ``build_cache`` turns into any policy's cache (one forward pass feeds many policies)."""
    return _prompt_layers(params, tokens, lengths, cfg, lambda i, q, k, v: (q, k, v), progress=progress)


def build_cache(qkv, lengths: jax.Array, *, policy: CachePolicy, max_new_tokens: int) -> Cache:
    """A policy's cache from ``prefill_qkv``'s per-layer (q, k, v): equal to ``prefill``'s cache."""
    states = [policy.build_layer(i, q, k, v, lengths, max_new_tokens) for i, (q, k, v) in enumerate(qkv)]
    return _new_cache(states, lengths)


def _new_cache(states, lengths) -> Cache:
    return Cache(layers=tuple(states), lengths=lengths.astype(jnp.int32), step=jnp.zeros((), jnp.int32))


def decode_step(params, cache: Cache, tokens: jax.Array, *, cfg: LlamaConfig, policy: CachePolicy):
    """One token per sequence (B,) at position ``cache.lengths`` -> (logits (B, V), new cache)."""
    (embed, layers, head), inv_freq = network(params, cfg), rope_inv_freq(cfg)
    x, states = embed(tokens), []  # x: (B, hidden)
    for i, layer in enumerate(layers):
        attend = functools.partial(policy.decode_layer, i, cache.layers[i], cache=cache)
        x, state = layer(x, cache.lengths, inv_freq, attend)
        states.append(state)
    done = policy.finish_step(Cache(tuple(states), cache.lengths, cache.step, cache.host))
    return head(x), Cache(done.layers, cache.lengths + 1, cache.step + 1, cache.host)
