"""generate(params, tokens, policy): text generation with a cache policy, on the one decode loop."""

from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Sequence

from convert.config import LlamaConfig
from hetero_jax import sharding
from hetero_jax.cache import CachePolicy, make_policy
from hetero_jax.cache.base import Cache
from hetero_jax.decode_loop import GenerationError, RunOptions, Sampling, run  # noqa: F401 (GenerationError: re-exported)
from hetero_jax.generate_inputs import check_generate_inputs
from hetero_jax.model import as_params


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per sequence (stop token included, nothing after)
    prompt_lengths: list[int]
    cache: Cache
    stats: dict
    timing: dict  # prefill_compile_s, prefill_s, decode_compile_s, decode_s, decode_ms_per_token, steps


def generate(
    params,  # the params dict or a Flax ``nnx_model.LlamaForCausalLM``
    tokens,
    policy: str | CachePolicy = "full",
    *,
    config: LlamaConfig,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int = 0,
    pad_id: int = 0,
    progress: bool | None = None,
    options: RunOptions = RunOptions(),
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt with a cache policy (a registry name or object).

    ``tokens``: one id list, a list of id lists of different lengths (a ragged batch), or an
    array. Sampling is deterministic for a given ``seed``. ``stop_tokens`` default to the
    config's eos ids. ``progress``: bars for long prefills and decode (default: when stderr is a
    terminal). ``options``: benchmark knobs (``hetero_jax.decode_loop.RunOptions``). Raises
    GenerationError for bad arguments and for non-finite logits. Params sharded on a mesh
    (``load_model(..., mesh=...)``) run on that mesh; ``stats`` then adds ``mesh`` and
    ``per_device_bytes`` (the cache's bytes on each device).
    """
    params = as_params(params)
    check_generate_inputs(params, tokens, policy, config, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, pad_id=pad_id)
    sampling = Sampling(temperature, top_k, top_p)
    policy = make_policy(policy, config) if isinstance(policy, str) else policy
    stop = tuple(sorted(set(config.eos_token_ids if stop_tokens is None else stop_tokens)))
    r = run(params, tokens, config=config, policy=policy, steps=max_new_tokens - 1, sampling=sampling, stop=stop,
            seed=seed, options=options, pad_id=pad_id, progress=sys.stderr.isatty() if progress is None else progress)
    gen = [list(itertools.takewhile(lambda t: t >= 0, row)) for row in r.tokens[:, :max_new_tokens].tolist()]
    stats = policy.stats(r.cache)
    mesh = sharding.params_mesh(params)
    if mesh is not None:  # what the layout costs each device (this process's devices)
        stats.update(mesh=sharding.mesh_text(mesh), per_device_bytes=sharding.per_device_bytes(r.cache))
    return GenerationResult(gen, r.lengths.tolist(), r.cache, stats, r.timing)
