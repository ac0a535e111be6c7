"""Cache policies, one file each, looked up by name (``--cache NAME`` on the CLI).

Each policy class provides ``create(cfg, ratio=None, **options)``; ``ratio`` is the device
prompt-KV budget as a fraction of full KV, shared by every compressing policy.
"""

from __future__ import annotations

import importlib

from hetero_jax.cache.base import Cache, CachePolicy

# name -> "module:Class"; imported lazily so a policy's dependencies load only when used.
POLICIES = {
    "full": "hetero_jax.cache.full:FullKV",
    "hetero": "hetero_jax.cache.hetero:HeteroCache",
    "hetero_plus": "hetero_jax.cache.hetero_plus:HeteroPlus",
    "hetero_fit": "hetero_jax.cache.hetero_fit:HeteroFit",
    "duo": "hetero_jax.cache.duo:DuoAttention",
    "streaming": "hetero_jax.cache.streaming:StreamingLLM",
    "h2o": "hetero_jax.cache.h2o:H2O",
    "snapkv": "hetero_jax.cache.snapkv:SnapKV",
    "pyramidkv": "hetero_jax.cache.pyramidkv:PyramidKV",
    "retrieval": "hetero_jax.cache.retrieval:Retrieval",
    "interval": "hetero_jax.cache.interval:IntervalRetrieval",
}


class UnknownPolicyError(ValueError):
    pass


def policy_class(name: str) -> type[CachePolicy]:
    if name not in POLICIES:
        raise UnknownPolicyError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}")
    module, cls = POLICIES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:  # listed but not built yet
        raise UnknownPolicyError(f"cache policy {name!r} is not available in this build: {e}") from e


def make_policy(name: str, cfg, *, ratio: float | None = None, **options) -> CachePolicy:
    """Build a policy by name for model config ``cfg``."""
    return policy_class(name).create(cfg, ratio=ratio, **options)


def parse_policy_spec(spec: str) -> tuple[str, float | None, dict]:
    """'hetero:0.4:threshold=1:steps=5' -> ('hetero', 0.4, {'threshold': 1.0, 'steps': 5}).

    The policy strings of the benchmarks: a registry name, optionally its own ratio and options of
    the policy's ``create`` (numbers parsed as int or float, else strings).
    """
    name, *parts = spec.split(":")
    ratio, options = None, {}
    for part in parts:
        if "=" not in part:
            try:
                ratio = float(part)
            except ValueError:
                raise ValueError(f"bad policy spec {spec!r}: {part!r} is neither a ratio nor OPTION=VALUE") from None
            continue
        key, value = part.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key] = value
    return name, ratio, options


__all__ = ["Cache", "CachePolicy", "POLICIES", "UnknownPolicyError", "make_policy", "parse_policy_spec",
           "policy_class"]
