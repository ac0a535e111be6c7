"""The model as Flax NNX modules: ``LlamaForCausalLM`` and its blocks, on ``model``'s pure functions.

Each block holds its weights as ``nnx.Param``s named as in the params dict (``convert.params``) and
calls the function the params-dict path runs (``model.attention_block``, ``model.mlp_block``,
``model.final_logits``); the whole model runs ``model.prefill`` and ``model.decode_step`` over its
blocks (``model.network``). So both paths compute the same logits by construction, the cache
pytree and the cache policy go in and come out as they do there, and the usual NNX tools apply:
``nnx.split`` / ``nnx.merge``, replacing a block by any module called the same way, ``nnx.grad`` to
fine-tune around the model. ``from_params`` / ``to_params`` convert from and to the params dict
(what ``generate`` runs: it takes either).

    m = LlamaForCausalLM.from_params(params, cfg)
    logits, cache = m.prefill(tokens, lengths, policy=policy, max_new_tokens=16)
    logits, cache = m(next_tokens, cache, policy=policy)   # one decode step
"""

from __future__ import annotations

import jax
from flax import nnx

from convert.config import LlamaConfig
from convert.params import BIAS_KEYS, check_params
from hetero_jax import model
from hetero_jax.cache.base import Cache, CachePolicy

ATTENTION_KEYS = ("attn_norm", "wq", "wk", "wv", "wo")  # and BIAS_KEYS when cfg.qkv_bias (Qwen2)
MLP_KEYS = ("mlp_norm", "w_gate", "w_up", "w_down")


class _Weights(nnx.Module):
    """A block whose ``nnx.Param``s are the params dict's entries ``names`` (one layer's, or the top)."""

    def __init__(self, cfg: LlamaConfig, weights: dict, names: tuple[str, ...]):
        self.cfg, self.names = cfg, names
        for name in names:
            setattr(self, name, nnx.Param(weights[name]))

    def weights(self) -> dict:
        """The current values as a params-dict fragment (what ``model``'s functions take)."""
        return {name: getattr(self, name)[...] for name in self.names}


class Attention(_Weights):
    """Pre-norm attention plus its residual (``model.attention_block``): ``(x, positions, inv_freq,
    attend) -> (x, kept)``, where ``attend`` is the causal prefill or the cache policy's decode."""

    def __init__(self, cfg: LlamaConfig, weights: dict):
        super().__init__(cfg, weights, ATTENTION_KEYS + (BIAS_KEYS if cfg.qkv_bias else ()))

    def __call__(self, x, positions, inv_freq, attend):
        return model.attention_block(self.weights(), x, positions, inv_freq, attend, cfg=self.cfg)


class MLP(_Weights):
    """Pre-norm SwiGLU MLP plus its residual (``model.mlp_block``): ``x -> x``."""

    def __init__(self, cfg: LlamaConfig, weights: dict):
        super().__init__(cfg, weights, MLP_KEYS)

    def __call__(self, x):
        return model.mlp_block(self.weights(), x, cfg=self.cfg)


class DecoderLayer(nnx.Module):
    """``attn`` then ``mlp``, called as ``model.decoder_layer``; either block can be replaced."""

    def __init__(self, cfg: LlamaConfig, weights: dict):
        self.attn = Attention(cfg, weights)
        self.mlp = MLP(cfg, weights)

    def __call__(self, x, positions, inv_freq, attend):
        x, kept = self.attn(x, positions, inv_freq, attend)
        return self.mlp(x), kept


class Embedding(nnx.Module):
    """Token ids -> rows of the table (the params dict's ``embed``; the head reads it when tied)."""

    def __init__(self, table: jax.Array):
        self.table = nnx.Param(table)

    def __call__(self, tokens):
        return self.table[...][tokens]


class LMHead(_Weights):
    """Final norm and output projection (``model.final_logits``): ``(x, embedding table) -> float32
    logits``; the table is the projection when the embeddings are tied (no ``lm_head`` here then)."""

    def __init__(self, cfg: LlamaConfig, params: dict):
        super().__init__(cfg, params, ("final_norm",) + (() if cfg.tie_word_embeddings else ("lm_head",)))

    def __call__(self, x, table):
        return model.final_logits({"embed": table, **self.weights()}, x, cfg=self.cfg)


class LlamaForCausalLM(nnx.Module):
    """Llama / Qwen2 as NNX modules: ``embed``, ``layers`` (an ``nnx.List`` of ``DecoderLayer``),
    ``head`` (``LMHead``)."""

    def __init__(self, cfg: LlamaConfig, params: dict):
        self.cfg = cfg
        self.embed = Embedding(params["embed"])
        self.layers = nnx.List([DecoderLayer(cfg, lp) for lp in params["layers"]])
        self.head = LMHead(cfg, params)

    @classmethod
    def from_params(cls, params: dict, cfg: LlamaConfig) -> LlamaForCausalLM:
        """The module holding ``params`` (the arrays themselves, not copies). Raises ValueError
        naming every missing or mis-shaped weight."""
        check_params(params, cfg)
        return cls(cfg, params)

    def to_params(self) -> dict:
        """The params dict of the current weights (``from_params``'s inverse). Raises ValueError
        when a block was replaced: the params dict has no place for it (run the module itself)."""
        blocks = {"embed": (self.embed, Embedding), "head": (self.head, LMHead)}
        for i, layer in enumerate(self.layers):
            blocks[f"layers[{i}]"] = (layer, DecoderLayer)
            blocks[f"layers[{i}].attn"] = (getattr(layer, "attn", None), Attention)
            blocks[f"layers[{i}].mlp"] = (getattr(layer, "mlp", None), MLP)
        replaced = [f"{path} ({type(b).__name__})" for path, (b, cls) in blocks.items() if type(b) is not cls]
        if replaced:
            raise ValueError(f"replaced blocks {', '.join(replaced)}: the params dict cannot express them; run the "
                             "module itself (prefill / __call__)")
        layers = [{**layer.attn.weights(), **layer.mlp.weights()} for layer in self.layers]
        return {"embed": self.embed.table[...], "layers": layers, **self.head.weights()}

    def network(self) -> tuple:
        """``(embed, layers, head)`` callables for ``model``'s loops (``model.network``)."""
        return self.embed, list(self.layers), lambda x: self.head(x, self.embed.table[...])

    def prefill(self, tokens: jax.Array, lengths: jax.Array, *, policy: CachePolicy, max_new_tokens: int,
                all_logits: bool = False) -> tuple[jax.Array, Cache]:
        """``model.prefill`` on these modules: the right-padded prompt (B, T) with ``lengths`` (B,)
        -> (logits (B, V) at each last real token, or (B, T, V) with ``all_logits``; the policy's cache)."""
        return model.prefill(self.network(), tokens, lengths, cfg=self.cfg, policy=policy,
                             max_new_tokens=max_new_tokens, all_logits=all_logits)

    def __call__(self, tokens: jax.Array, cache: Cache, *, policy: CachePolicy) -> tuple[jax.Array, Cache]:
        """One decode step (``model.decode_step``): tokens (B,) -> (logits (B, V), the new cache)."""
        return model.decode_step(self.network(), cache, tokens, cfg=self.cfg, policy=policy)
