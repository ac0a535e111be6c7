"""generate(params, tokens, cache): prefill once, then a jitted decode step with the cache donated.

The decode loop is a Python loop over one compiled step (so policies can dispatch host-side work
between steps without a host sync); the step samples on device, and the host reads the "all
done?" flag only every ``check_every`` steps, so dispatch runs ahead of compute.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax import model
from hetero_jax.cache import CachePolicy, make_policy
from hetero_jax.cache.base import Cache, round_up
from hetero_jax.config import LlamaConfig
from hetero_jax.generate_inputs import GenerationError, check_generate_inputs

PAD_MULTIPLE = 128  # prompts are right-padded to this, bounding recompiles and padding waste


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per sequence (stop token included, nothing after)
    prompt_lengths: list[int]
    cache: Cache
    stats: dict
    timing: dict  # compile_s, prefill_s, decode_s, decode_ms_per_token, steps


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_tokens(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """(B, V) float32 logits -> (B,) int32 tokens: greedy, temperature, top-k, top-p."""
    if s.temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p is not None and s.top_p < 1:
        sorted_logits = jnp.sort(logits, -1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, -1)
        keep = (jnp.cumsum(probs, -1) - probs) < s.top_p  # always keeps the top token
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


def pad_prompts(tokens, pad_id: int = 0, multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """A list of id lists (or a 1-D / 2-D array) -> right-padded (B, T) int32 and lengths (B,)."""
    if isinstance(tokens, (np.ndarray, jax.Array)):
        arr = np.asarray(tokens)
        rows = [arr.tolist()] if arr.ndim == 1 else arr.tolist()
    else:
        rows = list(tokens)
        if rows and isinstance(rows[0], (int, np.integer)):
            rows = [rows]
        rows = [list(r) for r in rows]
    if not rows or any(len(r) == 0 for r in rows):
        raise GenerationError("empty prompt: every sequence needs at least one token")
    lengths = np.array([len(r) for r in rows], np.int32)
    t = round_up(int(lengths.max()), multiple)
    out = np.full((len(rows), t), pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


_COMPILED: dict = {}
_BAR: list = [None]  # the live prefill progress bar, ticked by _tick_layer from inside jit


def _tick_layer(layer, _x):
    if _BAR[0] is not None:
        _BAR[0].update_layer(layer)


def compiled(fn, *args):
    """AOT-compile ``fn`` for these argument shapes once and reuse it (compile timed apart)."""
    avals = jax.tree.map(lambda x: (x.shape, x.dtype) if hasattr(x, "shape") else x, args)
    key = (fn, jax.tree.structure(args), tuple(jax.tree.leaves(avals)))
    if key not in _COMPILED:
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        _COMPILED[key] = fn.lower(*args).compile()
    return _COMPILED[key]


@functools.lru_cache(maxsize=32)
def _prefill_fn(cfg: LlamaConfig, policy: CachePolicy, max_new: int, all_logits: bool, progress: bool):
    fn = functools.partial(
        model.prefill,
        cfg=cfg,
        policy=policy,
        max_new_tokens=max_new,
        all_logits=all_logits,
        progress=_tick_layer if progress else None,
    )
    return jax.jit(fn)


@functools.lru_cache(maxsize=32)
def _build_fn(policy: CachePolicy, max_new: int):
    return jax.jit(functools.partial(model.build_cache, policy=policy, max_new_tokens=max_new))


@dataclasses.dataclass
class Prefilled:
    """One policy-independent prefill (``prefill_once``), reusable by many ``generate`` calls."""

    padded: np.ndarray
    lengths: np.ndarray
    logits: jax.Array
    qkv: tuple
    prefill_s: float
    compile_s: float


def prefill_once(params, tokens, *, config: LlamaConfig, pad_multiple: int = PAD_MULTIPLE, pad_id: int = 0):
    """Run the prompt through the model once, keeping every layer's q, k, v, so that several cache
    policies can be compared on the same forward pass (``generate(..., prefilled=...)``)."""
    padded, lengths = pad_prompts(tokens, pad_id, pad_multiple)
    fn = _qkv_fn(config)
    t0 = time.perf_counter()
    args = (params, jnp.asarray(padded), jnp.asarray(lengths))
    exe = compiled(fn, *args)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, qkv = jax.block_until_ready(exe(*args))
    return Prefilled(padded, lengths, logits, qkv, time.perf_counter() - t0, compile_s)


@functools.lru_cache(maxsize=8)
def _qkv_fn(cfg: LlamaConfig):
    return jax.jit(functools.partial(model.prefill_qkv, cfg=cfg))


@functools.lru_cache(maxsize=32)
def _step_fn(cfg: LlamaConfig, policy: CachePolicy, sampling: Sampling, stop: tuple[int, ...]):
    stop_arr = np.asarray(stop, np.int32)

    def step(params, cache, tok, done, out, key):
        logits, cache = model.decode_step(params, cache, tok, cfg=cfg, policy=policy)
        nxt = sample_tokens(logits, jax.random.fold_in(key, cache.step), sampling)
        i = cache.step - 1  # index of ``nxt`` among generated tokens (0 was sampled at prefill)
        out = out.at[:, i + 1].set(jnp.where(done, -1, nxt), mode="drop")
        done = done | jnp.isin(nxt, stop_arr) if stop else done
        return cache, nxt, done, out

    return jax.jit(step, donate_argnums=(1, 4))


def generate(
    params,
    tokens,
    cache: str | CachePolicy = "full",
    *,
    config: LlamaConfig,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int = 0,
    pad_id: int = 0,
    check_every: int = 8,
    progress: bool | None = None,
    step_times: bool = False,
    pad_multiple: int = PAD_MULTIPLE,
    reserve_new_tokens: int | None = None,
    prefilled: Prefilled | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt with the given cache policy (name or object).

    ``tokens``: one id list, a list of id lists of different lengths (a ragged batch), or an
    array. Sampling is deterministic for a given ``seed``. ``stop_tokens`` default to the
    config's eos ids. ``progress``: a bar for long prefills and decode (default: when stderr is a
    terminal). ``step_times`` blocks after every step to record each step's wall time in
    ``timing["step_ms"]`` (benchmarks only: it serialises dispatch and compute).
    ``pad_multiple`` (a multiple of 128) and ``reserve_new_tokens`` (cache room for generated
    tokens, >= max_new_tokens) let callers with many prompts share one compiled prefill and step.
    ``prefilled`` (from ``prefill_once`` on the same tokens) skips the forward pass for policies
    that share prefill attention; ``timing["prefill_s"]`` then adds the shared forward's time.
    """
    check_generate_inputs(params, tokens, cache, config, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, pad_id=pad_id)
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Sampling(temperature, top_k, top_p)
    if pad_multiple % PAD_MULTIPLE:
        raise GenerationError(f"pad_multiple must be a multiple of {PAD_MULTIPLE}, got {pad_multiple}")
    reserve = max_new_tokens if reserve_new_tokens is None else reserve_new_tokens
    if reserve < max_new_tokens:
        raise GenerationError(f"reserve_new_tokens={reserve} is below max_new_tokens={max_new_tokens}")
    policy = make_policy(cache, config) if isinstance(cache, str) else cache
    padded, lengths = pad_prompts(tokens, pad_id, pad_multiple)
    longest = int(lengths.max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise GenerationError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{config.max_position_embeddings}; shorten the prompt or lower max_new_tokens"
        )
    stop = tuple(sorted(set(config.eos_token_ids if stop_tokens is None else stop_tokens)))
    show = sys.stderr.isatty() if progress is None else progress
    bar = _layer_bar(config.num_layers) if show and longest >= 2048 else None
    timing: dict = {}

    # ---- prefill (compiled ahead of time so compile and run are timed apart)
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    if prefilled is not None and policy.shares_prefill():
        if prefilled.padded.shape != padded.shape or not np.array_equal(prefilled.padded, padded):
            raise GenerationError("prefilled= was computed for other tokens or another pad_multiple")
        build = _build_fn(policy, reserve)
        build_exe = compiled(build, prefilled.qkv, jnp.asarray(lengths))
        timing["prefill_compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        logits, kv = prefilled.logits, build_exe(prefilled.qkv, jnp.asarray(lengths))
        shared_s = prefilled.prefill_s
    else:
        pf = _prefill_fn(config, policy, reserve, False, bar is not None)
        args = (params, jnp.asarray(padded), jnp.asarray(lengths))
        prefill_exe = compiled(pf, *args)
        timing["prefill_compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _BAR[0] = bar
        logits, kv = prefill_exe(*args)
        shared_s = 0.0
    first = sample_tokens(logits, jax.random.fold_in(key, 0), sampling)
    kv = policy.after_prefill(kv)
    jax.block_until_ready((first, kv))
    timing["prefill_s"] = time.perf_counter() - t0 + shared_s
    if bar:
        bar.close()
        _BAR[0] = None

    # ---- decode
    b = len(lengths)
    stop_arr = jnp.asarray(stop or (-1,), jnp.int32)
    done = jnp.isin(first, stop_arr) if stop else jnp.zeros((b,), bool)
    out = jnp.full((b, reserve), -1, jnp.int32).at[:, 0].set(first)  # (b, reserve): shape shared by callers
    tok = first
    step = _step_fn(config, policy, sampling, stop)
    steps = max_new_tokens - 1
    t0 = time.perf_counter()
    if steps > 0:
        host = kv.host
        kv_dev = dataclasses.replace(kv, host=None)
        compiled_step = compiled(step, params, kv_dev, tok, done, out, key)
        timing["decode_compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        it = range(steps)
        if show:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="decode", unit="tok", leave=False)
        done_steps = 0
        per_step = []
        for i in it:
            ts = time.perf_counter()
            kv = policy.before_step(dataclasses.replace(kv_dev, host=host))
            host, kv_dev = kv.host, dataclasses.replace(kv, host=None)
            kv_dev, tok, done, out = compiled_step(params, kv_dev, tok, done, out, key)
            done_steps = i + 1
            if step_times:
                jax.block_until_ready((tok, kv_dev, host))
                per_step.append(1000 * (time.perf_counter() - ts))
            if stop and (i + 1) % check_every == 0 and bool(np.asarray(done).all()):
                break
        kv = dataclasses.replace(kv_dev, host=host)
    jax.block_until_ready((out, kv))
    decode_s = time.perf_counter() - t0
    timing["decode_s"] = decode_s
    timing["steps"] = done_steps if steps > 0 else 0
    timing["decode_ms_per_token"] = 1000 * decode_s / max(timing["steps"], 1)
    if step_times and steps > 0:
        timing["step_ms"] = per_step

    out_np = np.asarray(out)[:, :max_new_tokens]
    gen = []
    for row in out_np:
        ids = []
        for t in row.tolist():
            if t < 0:
                break
            ids.append(t)
            if t in stop:
                break
        gen.append(ids)
    return GenerationResult(gen, lengths.tolist(), kv, policy.stats(kv), timing)


class _layer_bar:
    """A tqdm bar over layers, ticked from inside the jitted prefill by jax.debug.callback."""

    def __init__(self, n: int):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=n, desc="prefill", unit="layer", leave=False)

    def update_layer(self, layer):
        self._bar.n = int(layer) + 1
        self._bar.refresh()

    def close(self):
        self._bar.close()
