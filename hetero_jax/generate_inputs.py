"""Checks of ``generate``'s arguments, run once before anything is compiled.

Without them a token id past the vocabulary is clamped by the embedding gather, a float id is
truncated, a NaN temperature samples token 0 forever, a policy built for another model fails
deep inside tracing, and a huge seed overflows: each now fails at once with a message naming
the bad value.
"""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np

from convert.config import LlamaConfig
from convert.params import check_params
from hetero_jax.cache import CachePolicy
from hetero_jax.decode_loop import GenerationError


def check_generate_inputs(params, tokens, policy, config, *, max_new_tokens, temperature, top_k, top_p, seed,
                          stop_tokens, pad_id) -> None:
    """Refuse what would otherwise be clamped, truncated or turned into NaN on device, by name.

    Cheap (shapes and host ints only); ``generate`` calls it once before anything is compiled.
    """
    if not isinstance(config, LlamaConfig):
        raise GenerationError(f"config= must be a LlamaConfig (e.g. convert.load_model(...).cfg), got "
                              f"{type(config).__name__}")
    try:
        check_params(params, config)
    except ValueError as e:
        raise GenerationError(f"{e}; pass the config the params were loaded with (LoadedModel.cfg)") from None
    if not isinstance(policy, (str, CachePolicy)):
        raise GenerationError(f"policy must be a policy name or a CachePolicy, got {type(policy).__name__}")
    if isinstance(policy, CachePolicy):
        _check_policy_fits(policy, config)
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    _check_number("pad_id", pad_id, integer=True, low=0, high=config.vocab_size - 1)
    for t in stop_tokens or ():
        _check_number("stop token", t, integer=True)
    _check_token_ids(tokens, config.vocab_size)


def check_sampling(*, max_new_tokens, temperature, top_k, top_p, seed) -> None:
    """The numbers alone (the CLI checks them before loading a model): finite, in range, integers
    where ids or counts are meant. Seeds are 32-bit: jax's PRNGKey folds larger ones onto these."""
    _check_number("max_new_tokens", max_new_tokens, integer=True, low=1)
    _check_number("temperature", temperature, low=0)
    if top_k is not None:
        _check_number("top_k", top_k, integer=True, low=1)
    if top_p is not None:
        _check_number("top_p", top_p, low=0, high=1, open_low=True)
    _check_number("seed", seed, integer=True, low=0, high=2**32 - 1)


def _check_number(name, x, *, integer=False, low=None, high=None, open_low=False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(x, numbers.Integral) if integer else isinstance(x, numbers.Real)
    if isinstance(x, bool) or not ok_type:
        raise GenerationError(f"{name} must be {kind}, got {x!r}")
    if not integer and not math.isfinite(x):
        raise GenerationError(f"{name} must be finite, got {x!r}")
    too_low = low is not None and (x <= low if open_low else x < low)
    if too_low or high is not None and x > high:
        if high is None:
            want = f"{'>' if open_low else '>='} {low}"
        else:
            want = f"in {'(' if open_low else '['}{low}, {high}]"
        raise GenerationError(f"{name} must be {want}, got {x!r}")


def _check_policy_fits(policy: CachePolicy, config: LlamaConfig) -> None:
    """Policies that carry per-layer / per-head plans must have been built for this config."""
    layers = getattr(policy, "num_layers", None)
    roles = getattr(policy, "roles", None)
    built = None
    if roles:
        if len(roles) != config.num_layers or any(len(r) != config.num_kv_heads for r in roles):
            built = f"{len(roles)} layers x {len(roles[0])} KV heads"
    elif isinstance(layers, int) and layers != config.num_layers:
        built = f"{layers} layers"
    if built:
        raise GenerationError(
            f"cache policy {policy.name!r} was built for {built}, but config= has {config.num_layers} layers x "
            f"{config.num_kv_heads} KV heads; build it for this model: make_policy(name, config, ...)"
        )


def _token_rows(tokens) -> list[np.ndarray]:
    if isinstance(tokens, (str, bytes)):
        raise GenerationError("tokens must be token ids, not text; tokenize first (tokenizer(text)['input_ids'])")
    if isinstance(tokens, (np.ndarray, jax.Array)):
        arr = np.asarray(tokens)
        if arr.ndim not in (1, 2):
            raise GenerationError(f"tokens must be 1-D (one prompt) or 2-D (a batch), got shape {arr.shape}")
        return [arr] if arr.ndim == 1 else list(arr)
    try:
        rows = list(tokens)
    except TypeError:
        raise GenerationError(f"tokens must be a list of ids, a list of id lists or an array, got "
                              f"{type(tokens).__name__}") from None
    if rows and not isinstance(rows[0], (list, tuple, np.ndarray, jax.Array)):
        rows = [rows]
    out = []
    for r in rows:
        arr = np.asarray(r) if isinstance(r, (list, tuple, np.ndarray, jax.Array)) else np.asarray(r, object)
        if arr.ndim != 1:
            raise GenerationError(f"each prompt must be a flat list of ids, got shape {arr.shape}")
        out.append(arr)
    return out


def _check_token_ids(tokens, vocab_size: int) -> None:
    rows = _token_rows(tokens)
    if not rows or any(r.size == 0 for r in rows):
        raise GenerationError("empty prompt: every sequence needs at least one token")
    for i, r in enumerate(rows):
        if r.dtype == bool or not np.issubdtype(r.dtype, np.integer):
            raise GenerationError(f"token ids must be integers; sequence {i} holds {r.dtype} values (e.g. "
                                  f"{r.tolist()[0]!r}); pass the tokenizer's ids unchanged")
        bad = np.flatnonzero((r < 0) | (r >= vocab_size))
        if bad.size:
            j = int(bad[0])
            raise GenerationError(f"token id {int(r[j])} (sequence {i}, position {j}) is outside the model's "
                                  f"vocabulary [0, {vocab_size}); {bad.size} such id(s) in this sequence")
