"""The params pytree: one plain nested dict, the contract between convert/ and the model.

Layout (all weights stored ``(in_features, out_features)`` so the forward pass is ``x @ w``)::

    {
      "embed":      (vocab, hidden),
      "layers": [                       # a list, one dict per layer (no stacking: the decode
        {                               # step keeps per-layer arrays so nothing is copied)
          "attn_norm": (hidden,),
          "wq": (hidden, num_heads * head_dim),      # HF rotate-half head layout
          "wk": (hidden, num_kv_heads * head_dim),
          "wv": (hidden, num_kv_heads * head_dim),
          "bq": (num_heads * head_dim,),             # bq/bk/bv only when cfg.qkv_bias (Qwen2)
          "bk": (num_kv_heads * head_dim,),
          "bv": (num_kv_heads * head_dim,),
          "wo": (num_heads * head_dim, hidden),
          "mlp_norm": (hidden,),
          "w_gate": (hidden, intermediate),
          "w_up":   (hidden, intermediate),
          "w_down": (intermediate, hidden),
        }, ...
      ],
      "final_norm": (hidden,),
      "lm_head":    (hidden, vocab),    # absent when cfg.tie_word_embeddings
    }
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from convert.config import LlamaConfig

BIAS_KEYS = ("bq", "bk", "bv")  # present only when cfg.qkv_bias


def param_shapes(cfg: LlamaConfig) -> dict:
    """The expected shape of every leaf, in the layout above."""
    h, d = cfg.hidden_size, cfg.head_dim
    layer = {
        "attn_norm": (h,),
        "wq": (h, cfg.num_heads * d),
        "wk": (h, cfg.num_kv_heads * d),
        "wv": (h, cfg.num_kv_heads * d),
        "wo": (cfg.num_heads * d, h),
        "mlp_norm": (h,),
        "w_gate": (h, cfg.intermediate_size),
        "w_up": (h, cfg.intermediate_size),
        "w_down": (cfg.intermediate_size, h),
    }
    if cfg.qkv_bias:
        layer.update(bq=(cfg.num_heads * d,), bk=(cfg.num_kv_heads * d,), bv=(cfg.num_kv_heads * d,))
    shapes = {
        "embed": (cfg.vocab_size, h),
        "layers": [dict(layer) for _ in range(cfg.num_layers)],
        "final_norm": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    return shapes


def abstract_params(cfg: LlamaConfig, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of the params (for orbax restore and AOT compilation)."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )


def init_random_params(cfg: LlamaConfig, seed: int = 0, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random weights in the params layout (speed benchmarks and small tests)."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if path[-1].key in BIAS_KEYS:  # biases around 0, a few times the weights' scale
            return jnp.asarray(5 * scale * rng.standard_normal(shape), dtype)
        if len(shape) == 1:  # norm weights
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape), dtype)
        return jnp.asarray(scale * rng.standard_normal(shape), dtype)

    return jax.tree.map_with_path(leaf, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def check_params(params: dict, cfg: LlamaConfig) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped leaf."""
    expected = param_shapes(cfg)
    problems: list[str] = []

    def walk(exp, got, path):
        if isinstance(exp, dict):
            if not isinstance(got, dict):
                problems.append(f"{path or 'params'}: expected a dict, got {type(got).__name__}")
                return
            for k in exp:
                if k not in got:
                    problems.append(f"missing {path}{k}")
                else:
                    walk(exp[k], got[k], f"{path}{k}.")
            for k in got:
                if k not in exp:
                    problems.append(f"unexpected {path}{k}")
        elif isinstance(exp, list):
            if not isinstance(got, (list, tuple)) or len(got) != len(exp):
                n = len(got) if isinstance(got, (list, tuple)) else "?"
                problems.append(f"{path[:-1]}: expected {len(exp)} layers, got {n}")
                return
            for i, (e, g) in enumerate(zip(exp, got)):
                walk(e, g, f"{path}{i}.")
        else:
            shape = tuple(getattr(got, "shape", ()))
            if shape != tuple(exp):
                problems.append(f"{path[:-1]}: shape {shape}, expected {tuple(exp)}")

    walk(expected, params, "")
    if problems:
        head = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"params do not match the model config: {head}")


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
