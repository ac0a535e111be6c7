"""The one decode loop: prefill once, then one ahead-of-time compiled step per token, cache donated.

``run`` serves every caller: ``generate`` (sampling, stop tokens), teacher forcing with per-step
log-probabilities (``bench.accuracy.fidelity``: ``feed`` + ``record``), per-step policy state
(``profiling.record_sets``: ``record``) and benchmarks (``RunOptions``: per-step wall times, shared
prefills, padding buckets). The loop is a Python loop over one compiled step, so the policy's host
hooks (``before_step``) can dispatch transfers between steps; the step samples on device and
tracks, in its carry, whether any logit was non-finite. The host reads the "all stopped?" and
"non-finite?" flags only every ``check_every`` steps (when there are stop tokens) and at the end,
so dispatch runs ahead of compute. Prefill and step are compiled ahead of time, so ``timing``
reports compile time apart: prefill_compile_s, prefill_s, decode_compile_s, decode_s, steps,
decode_ms_per_token (and step_ms with ``RunOptions.step_times``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from convert.config import LlamaConfig
from hetero_jax import model, sharding
from hetero_jax.cache.base import Cache, CachePolicy, compiled, round_up

PAD_MULTIPLE = 128  # prompts are right-padded to this, bounding recompiles and padding waste


class GenerationError(ValueError):
    """Bad arguments to a run (empty prompt, too long, bad sampling options) or non-finite logits."""


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
    out = np.full((len(rows), round_up(int(lengths.max()), multiple)), pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


@dataclasses.dataclass
class Prefilled:
    """One policy-independent prefill (``prefill_once``), reusable by many runs of the same prompts."""

    padded: np.ndarray
    lengths: np.ndarray
    logits: jax.Array
    qkv: tuple
    prefill_s: float
    compile_s: float


def prefill_once(params, tokens, *, config: LlamaConfig, pad_multiple: int = PAD_MULTIPLE, pad_id: int = 0):
    """Run the prompts through the model once, keeping every layer's q, k, v, so that several cache
    policies can be compared on the same forward pass (``RunOptions(prefilled=...)``)."""
    padded, lengths = pad_prompts(tokens, pad_id, pad_multiple)
    params = model.as_params(params)
    mesh = sharding.params_mesh(params)
    if mesh is not None:
        sharding.check_batch(mesh, len(lengths))
    args = (params, *_inputs(mesh, padded, lengths))
    t0 = time.perf_counter()
    exe = compiled(_qkv_fn(config), *args)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, qkv = jax.block_until_ready(exe(*args))
    return Prefilled(padded, lengths, logits, qkv, time.perf_counter() - t0, compile_s)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Knobs for benchmarks and batch runners, not for users of ``generate``."""

    pad_multiple: int = PAD_MULTIPLE  # a multiple of 128: prompts of one bucket share compiled code
    reserve_new_tokens: int | None = None  # cache room for new tokens (default: what the run needs)
    check_every: int = 8  # decode steps between host reads of the stop and non-finite flags
    step_times: bool = False  # block after every step to time it (serialises dispatch and compute)
    prefilled: Prefilled | None = None  # ``prefill_once`` of the same prompts: skip the forward pass

    def __post_init__(self):
        if self.pad_multiple < 1 or self.pad_multiple % PAD_MULTIPLE:
            raise GenerationError(f"pad_multiple must be a multiple of {PAD_MULTIPLE}, got {self.pad_multiple}")
        if self.check_every < 1:
            raise GenerationError(f"check_every must be >= 1, got {self.check_every}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoopState:
    """The decode step's carry besides the cache (donated with it)."""

    tok: jax.Array  # (B,) int32: the next step's input token
    done: jax.Array  # (B,) bool: the sequence produced a stop token
    out: jax.Array  # (B, R) int32: generated tokens, -1 after a stop
    bad: jax.Array  # () int32: the first decode step whose logits had a non-finite value, -1 if none


@dataclasses.dataclass
class Run:
    tokens: np.ndarray  # (B, R) generated ids (index 0 from the prefill), -1 after a stop or unused
    lengths: np.ndarray  # (B,) prompt lengths
    cache: Cache
    records: Any  # ``record`` outputs stacked over [prefill, step 0, step 1, ...] (numpy), or None
    timing: dict


def run(params, tokens, *, config: LlamaConfig, policy: CachePolicy, steps: int, sampling: Sampling = Sampling(),
        stop: tuple[int, ...] = (), seed: int = 0, feed=None, record: Callable | None = None,
        options: RunOptions = RunOptions(), pad_id: int = 0, progress: bool = False) -> Run:
    """Prefill ``tokens`` (id lists, ragged) with ``policy``, sample a first token, then ``steps``
    decode steps. ``feed`` (steps, B): teacher forcing, step i's input is ``feed[i]`` instead of
    the last sampled token. ``record(logits, cache)`` (a module-level function, traced into the
    step) is kept for the prefill and every step. Raises GenerationError on non-finite logits.
    Params sharded on a mesh (``convert.sharding``) run the whole loop on that mesh: the batch
    over ``data``, heads over ``model`` (``hetero_jax.sharding``)."""
    padded, lengths = pad_prompts(tokens, pad_id, options.pad_multiple)
    mesh = sharding.params_mesh(params)
    if mesh is not None:
        sharding.check_run(config, policy, mesh, len(lengths))
        policy = policy.on_mesh(mesh.shape[sharding.MODEL])
    need = steps + (feed is None)  # new tokens the cache must hold (a fed run does not sample a last one)
    reserve = need if options.reserve_new_tokens is None else options.reserve_new_tokens
    if reserve < need:
        raise GenerationError(f"reserve_new_tokens={reserve} is below the {need} new tokens of this run")
    longest = int(lengths.max())
    if longest + steps + 1 > config.max_position_embeddings:
        raise GenerationError(
            f"prompt of {longest} tokens + {steps + 1} new tokens exceeds the model's context of "
            f"{config.max_position_embeddings}; shorten the prompt or lower max_new_tokens"
        )
    key = jax.random.PRNGKey(seed)
    logits, cache, timing = _prefill(params, padded, lengths, config, policy, reserve, options.prefilled,
                                     progress and longest >= 2048, mesh)
    t0 = time.perf_counter()
    first = sample_tokens(logits, jax.random.fold_in(key, 0), sampling)
    cache = policy.after_prefill(cache)
    records = [jax.device_get(record(logits, cache))] if record else None
    finite = bool(jnp.isfinite(logits).all())
    jax.block_until_ready((first, cache))
    timing["prefill_s"] += time.perf_counter() - t0
    if not finite:
        rows = np.flatnonzero(~np.isfinite(np.asarray(logits)).all(-1)).tolist()
        raise GenerationError(f"non-finite logits after the prefill (sequences {rows}); the weights or inputs "
                              "hold NaN/inf values")

    b = len(lengths)
    done = jnp.isin(first, jnp.asarray(stop, jnp.int32)) if stop else jnp.zeros((b,), bool)
    state = LoopState(first, done, jnp.full((b, reserve), -1, jnp.int32).at[:, 0].set(first), jnp.int32(-1))
    feed = None if feed is None else np.asarray(feed, np.int32).reshape(steps, b)
    if mesh is not None:  # the layout the compiled step keeps its carry in
        state = jax.device_put(state, _state_shardings(mesh))
        feed = None if feed is None else sharding.place(feed, jax.NamedSharding(mesh, sharding.P(None, sharding.DATA)))
    elif feed is not None:
        feed = jnp.asarray(feed)
    n, per_step = 0, []
    t0 = time.perf_counter()
    if steps > 0:
        device_part = functools.partial(dataclasses.replace, host=None)  # host arrays stay out of the step
        exe = compiled(_step_fn(config, policy, sampling, stop, record, mesh), params, device_part(cache), state, key)
        timing["decode_compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in _bar(range(steps), progress, "decode", "tok"):
            ts = time.perf_counter()
            cache = policy.before_step(cache)
            if feed is not None:
                state = dataclasses.replace(state, tok=feed[i])
            dev, state, rec = exe(params, device_part(cache), state, key)
            cache, n = dataclasses.replace(dev, host=cache.host), i + 1
            if record:
                records.append(rec)
            if options.step_times:
                jax.block_until_ready((state, cache))
                per_step.append(1000 * (time.perf_counter() - ts))
            if stop and n % options.check_every == 0:
                all_done, bad = jax.device_get((state.done.all(), state.bad))
                _check_finite(bad, steps)
                if all_done:
                    break
    jax.block_until_ready((state, cache))
    timing["decode_s"] = time.perf_counter() - t0
    timing["steps"] = n
    timing["decode_ms_per_token"] = 1000 * timing["decode_s"] / max(n, 1)
    if options.step_times and steps > 0:
        timing["step_ms"] = per_step
    _check_finite(int(state.bad), steps)
    if record:
        records = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *records)
    return Run(np.asarray(state.out), lengths, cache, records, timing)


def _check_finite(bad: int, steps: int) -> None:
    if bad >= 0:
        raise GenerationError(f"non-finite logits at decode step {int(bad)} of {steps}; the weights or the cache "
                              "hold NaN/inf values")


def _inputs(mesh, padded, lengths):
    """The prompts on the device(s): split over ``data`` on a mesh."""
    if mesh is None:
        return jnp.asarray(padded), jnp.asarray(lengths)
    return sharding.place_batch(padded, mesh), sharding.place_batch(lengths, mesh)


def _prefill(params, padded, lengths, cfg, policy, reserve, prefilled, show_layers, mesh):
    """-> (logits, cache, timing) with the forward pass (or the build from ``prefilled``) compiled
    ahead of time and timed apart from its compilation."""
    t0 = time.perf_counter()
    tokens, lengths = _inputs(mesh, padded, lengths)
    if prefilled is not None:
        if prefilled.padded.shape != padded.shape or not np.array_equal(prefilled.padded, padded):
            raise GenerationError("prefilled= was computed for other tokens or another pad_multiple")
        fn, args = _build_fn(policy, reserve, mesh), (prefilled.qkv, lengths)
    else:
        fn, args = _prefill_fn(cfg, policy, reserve, show_layers, mesh), (params, tokens, lengths)
    exe = compiled(fn, *args)
    timing = {"prefill_compile_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    if prefilled is not None:
        logits, cache = prefilled.logits, exe(*args)
    else:
        bar = _LAYER_BAR[0] = _bar(None, show_layers, "prefill", "layer", total=cfg.num_layers)
        try:
            logits, cache = jax.block_until_ready(exe(*args))
        finally:
            _LAYER_BAR[0] = None
            if bar is not None:
                bar.close()
    timing["prefill_s"] = time.perf_counter() - t0 + (prefilled.prefill_s if prefilled is not None else 0.0)
    return logits, cache, timing


_LAYER_BAR: list = [None]  # the live prefill bar, ticked from inside jit by _tick_layer


def _tick_layer(layer, _x):
    if _LAYER_BAR[0] is not None:
        _LAYER_BAR[0].n = int(layer) + 1
        _LAYER_BAR[0].refresh()


def _bar(it, show: bool, desc: str, unit: str, total=None):
    """A tqdm bar over ``it`` (or a manual one of ``total``) when ``show``; else ``it`` / None."""
    if not show:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit=unit, leave=False)


def _state_shardings(mesh) -> LoopState:
    """The carry on a mesh: per-sequence flags over ``data``; tokens and the error step replicated
    (small, and readable by every process under ``jax.distributed``)."""
    batch, whole = jax.NamedSharding(mesh, sharding.P(sharding.DATA)), jax.NamedSharding(mesh, sharding.P())
    return LoopState(batch, batch, whole, whole)


def _pinned(mesh, policy, logits, cache):
    """Prefill outputs in the mesh layout (identity without a mesh)."""
    if mesh is None:
        return logits, cache
    return sharding.constrain(logits, mesh, sharding.P(sharding.DATA)), sharding.constrain_cache(cache, policy, mesh)


@functools.lru_cache(maxsize=32)
def _prefill_fn(cfg: LlamaConfig, policy: CachePolicy, max_new: int, progress: bool, mesh=None):
    def prefill(params, tokens, lengths):
        out = model.prefill(params, tokens, lengths, cfg=cfg, policy=policy, max_new_tokens=max_new,
                            progress=_tick_layer if progress else None)
        return _pinned(mesh, policy, *out)

    return jax.jit(prefill)


@functools.lru_cache(maxsize=32)
def _build_fn(policy: CachePolicy, max_new: int, mesh=None):
    def build(qkv, lengths):
        cache = model.build_cache(qkv, lengths, policy=policy, max_new_tokens=max_new)
        return cache if mesh is None else sharding.constrain_cache(cache, policy, mesh)

    return jax.jit(build)


@functools.lru_cache(maxsize=8)
def _qkv_fn(cfg: LlamaConfig):
    return jax.jit(functools.partial(model.prefill_qkv, cfg=cfg))


@functools.lru_cache(maxsize=32)
def _step_fn(cfg: LlamaConfig, policy: CachePolicy, sampling: Sampling, stop: tuple[int, ...], record, mesh=None):
    stop_arr = np.asarray(stop, np.int32)

    def step(params, cache, s: LoopState, key):
        logits, cache = model.decode_step(params, cache, s.tok, cfg=cfg, policy=policy)
        i = cache.step - 1  # this decode step's index; its token is generated token i + 1
        nxt = sample_tokens(logits, jax.random.fold_in(key, cache.step), sampling)
        out = s.out.at[:, i + 1].set(jnp.where(s.done, -1, nxt), mode="drop")
        done = s.done | jnp.isin(nxt, stop_arr) if stop else s.done
        bad = jnp.where((s.bad < 0) & ~jnp.isfinite(logits).all(), i, s.bad)
        rec = record(logits, cache) if record else None
        s = LoopState(nxt, done, out, bad)
        if mesh is not None:  # outputs in the layout the step was compiled for, so the next call takes them
            cache = sharding.constrain_cache(cache, policy, mesh)
            s = jax.lax.with_sharding_constraint(s, _state_shardings(mesh))
        return cache, s, rec

    return jax.jit(step, donate_argnums=(1, 2))
