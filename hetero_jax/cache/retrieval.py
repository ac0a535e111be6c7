"""Dynamic retrieval (Quest / ShadowKV-like, simplified and exact): prompt V on host, top-k refetched.

Design (what is where, and why):

* Device keeps every prompt key (post-RoPE, ``(B, Hkv, T + new, D)``, generated keys appended), so
  each KV head can score its current query exactly against the whole prompt; prompt values live in
  host memory (``pinned_host`` memory kind where the backend has one; otherwise they stay on device
  and ``stats`` counts them there). Device also holds a working set of values: per head the
  ``n = floor(ratio * L)`` prompt tokens in use, then the generated tokens. Device prompt KV is
  therefore ~ (1 + ratio) / 2 of full KV: exact scoring costs the keys; this is an accuracy
  reference for per-step retrieval, not a memory saver (HeteroCache's pivots score for others).
* Selection: softmax of the query over the real prompt keys, average-pooled with ``kernel``,
  reduced over the GQA group (``group_reduce``), top ``n`` per KV head (HeteroCache's rule). At
  prefill the last prompt query selects the first set, and its values are copied from the device
  prompt V before it is offloaded.
* Decode step ``s`` attends (``gather_attention``) over the working set plus generated tokens; when
  ``(s + 1) % interval == 0`` it also selects from its own query. The next ``before_step``
  dispatches (without blocking) a jitted fetch of the selected value rows from host memory into
  the working set, so a selection is used from the following step on: the rows step ``s`` attends
  were chosen by step ``s - 1``'s query (a one-step prefetch lag; the host arrays never enter the
  jitted decode step). ``interval`` 1 = retrieval every step; ``interval`` policy: every n steps.
* Fetch: a host-side gather (``compute_on("device_host")``) then a copy of ``B x Hkv x n`` rows
  per layer to device; if the backend cannot compute on host the fetch copies the whole host V of
  a layer to device and gathers there (``fetch_mode`` "copy" in stats; on CPU both memories are
  the same RAM).

Options: ``ratio`` (0.5), ``kernel`` (5), ``group_reduce`` ("max"), ``interval`` (1),
``fetch`` ("auto" | "host" | "copy"). ``stats`` adds fetches, bytes per fetch and bytes moved.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from hetero_jax.cache.base import Cache, host_memory_kind, is_host_array, on_host, round_up, scatter_token, to_memory
from hetero_jax.cache.selection import (
    GROUP_REDUCE,
    ROW_ALIGN,
    CompressingPolicy,
    check_choice,
    check_int,
    check_kernel,
    check_length,
    forced_scores,
    head_major,
    keep_indices,
    pad_rows,
    segment_attention,
    take_rows,
    vote_scores,
)

FETCH_MODES = ("auto", "host", "copy")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k", "v", "use", "want", "v_prompt"], meta_fields=["t"]
)
@dataclasses.dataclass
class RetrievalLayer:
    k: jax.Array  # (B, Hkv, T + G, D): prompt keys, then generated keys at T + step
    v: jax.Array  # (B, Hkv, S, D): values of ``use`` in [0, n), then generated values at n + step
    use: jax.Array  # (B, Hkv, cap) int32 positions whose values are in v[:, :, :n] (ascending)
    want: jax.Array  # (B, Hkv, cap) int32 latest selection, fetched by the next refresh
    v_prompt: Any  # (B, Hkv, T, D) device prompt values until after_prefill offloads them (then None)
    t: int  # T, the padded prompt length (static)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["v"], meta_fields=["steps", "fetches", "mode"])
@dataclasses.dataclass
class RetrievalHost:
    v: tuple  # per layer (B, Hkv, T, D) prompt values in host memory
    steps: int = 0  # decode steps dispatched (before_step calls): host-side, no device sync
    fetches: int = 0
    mode: str = ""


def _host_gather(x_host, idx):
    """Rows ``idx`` (B, H, K) of x_host (B, H, T, D) -> (B, H, K, D), gathered on the host (inside
    compute_on). (B, H) are batch dimensions of the gather, so on a mesh each shard gathers its own
    sequences' and heads' rows from its own host copy."""
    dims = jax.lax.GatherDimensionNumbers(offset_dims=(3,), collapsed_slice_dims=(2,), start_index_map=(2,),
                                          operand_batching_dims=(0, 1), start_indices_batching_dims=(0, 1))
    return jax.lax.gather(x_host, idx[..., None], dims, (1, 1, 1, x_host.shape[-1]),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


@functools.lru_cache(maxsize=16)
def _fetch_fn(mode: str, host_sharding, device_sharding):
    def fetch(host_v, bufs, want, n):
        outs = []
        for x, v, idx in zip(host_v, bufs, want):
            cap = idx.shape[-1]
            if mode == "host":
                rows = on_host(_host_gather)(x, jax.device_put(idx, host_sharding))
                rows = jax.device_put(rows, device_sharding)
            else:
                rows = take_rows(jax.device_put(x, device_sharding), idx)
            fresh = jnp.arange(cap)[None, None, :, None] < n[:, None, None, None]
            # the working set now holds ``idx``: a copy, so no buffer sits in the cache twice (donation)
            outs.append((v.at[:, :, :cap].set(jnp.where(fresh, rows.astype(v.dtype), v[:, :, :cap])), jnp.copy(idx)))
        return tuple(outs)

    return jax.jit(fetch, donate_argnums=(1,))


@dataclasses.dataclass(frozen=True)
class Retrieval(CompressingPolicy):
    name: ClassVar[str] = "retrieval"
    kernel: int = 5
    group_reduce: str = "max"
    interval: int = 1
    fetch: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_kernel(self.kernel)
        check_choice("group_reduce", self.group_reduce, GROUP_REDUCE)
        check_int("interval", self.interval, 1)
        check_choice("fetch", self.fetch, FETCH_MODES)

    def select(self, q_rows, q_pos, k_prompt, lengths, n):
        """Top ``n`` (B,) prompt tokens per head for queries q_rows (B, W, Hq, D) at q_pos (B, W)."""
        t = k_prompt.shape[2]
        votes = vote_scores(q_rows, q_pos, k_prompt, lengths, kernel=self.kernel, reduce=self.group_reduce)
        scores = forced_scores(votes, lengths, jnp.full_like(lengths, t))
        return keep_indices(scores, jnp.broadcast_to(n[:, None], scores.shape[:2]), self.static_budget(t))

    def build_layer(self, layer, q, k, v, lengths, max_new_tokens):
        t = k.shape[1]
        check_length(self.ratio, t)
        kh, vh = head_major(k), head_major(v)
        last = jnp.take_along_axis(q, (lengths - 1)[:, None, None, None], axis=1)
        idx = self.select(last, (lengths - 1)[:, None], kh, lengths, self.budget(lengths))
        gen = round_up(max_new_tokens, ROW_ALIGN)
        rows = round_up(idx.shape[-1] + max_new_tokens, ROW_ALIGN)
        # ``want`` starts as a distinct buffer from ``use`` (both are donated to the decode step)
        state = RetrievalLayer(pad_rows(kh, t + gen), pad_rows(take_rows(vh, idx), rows), idx, idx + 0, vh, t)
        return state

    def decode_layer(self, layer, state: RetrievalLayer, q, k, v, cache: Cache):
        step = cache.step
        lengths = cache.lengths - step  # prompt lengths
        n = self.budget(lengths)
        t = state.t
        kbuf = scatter_token(state.k, jnp.broadcast_to(t + step, n.shape), k)
        vbuf = scatter_token(state.v, n + step, v)
        s = vbuf.shape[2]
        j = jnp.arange(s)[None, None, :]
        use = pad_rows(state.use[..., None], s)[..., 0]
        src = jnp.where(j < n[:, None, None], use, t + j - n[:, None, None])
        ksel = take_rows(kbuf, jnp.clip(src, 0, kbuf.shape[2] - 1))  # keys of the working set
        out = segment_attention(q, ksel, vbuf, (n + step + 1)[:, None])

        def choose():
            return self.select(q[:, None], cache.lengths[:, None], kbuf[:, :, :t], lengths, n)

        if self.interval == 1:
            want = choose()
        else:
            want = jax.lax.cond((step + 1) % self.interval == 0, choose, lambda: state.want)
        return out, dataclasses.replace(state, k=kbuf, v=vbuf, want=want)

    # ------------------------------------------------------------------ host side (outside jit)
    def after_prefill(self, cache: Cache) -> Cache:
        """Move each layer's prompt values to host memory (pinned_host where the backend has it)."""
        layers, host = [], []
        for state in cache.layers:
            x = state.v_prompt
            host.append(to_memory(x, "pinned_host") if host_memory_kind(x) == "pinned_host" else x)
            layers.append(dataclasses.replace(state, v_prompt=None))
        return dataclasses.replace(cache, layers=tuple(layers), host=RetrievalHost(tuple(host)))

    def before_step(self, cache: Cache) -> Cache:
        """Dispatch the fetch of the rows selected by the previous step (never waits for it)."""
        host = cache.host if isinstance(cache.host, RetrievalHost) else None
        if host is None:  # after_prefill was skipped: the prompt values are still on device
            host = RetrievalHost(tuple(s.v_prompt for s in cache.layers), steps=0)
        if host.steps == 0 or host.steps % self.interval:
            return dataclasses.replace(cache, host=dataclasses.replace(host, steps=host.steps + 1))
        n = self.budget(cache.lengths - host.steps)
        want = tuple(s.want for s in cache.layers)
        bufs = tuple(s.v for s in cache.layers)
        src, dev = host.v[0].sharding, bufs[0].sharding
        mode = host.mode or ("host" if self.fetch in ("auto", "host") and is_host_array(host.v[0]) else "copy")
        try:
            out = _fetch_fn(mode, src, dev)(host.v, bufs, want, n)
        except Exception:  # noqa: BLE001 - backend without host compute: fall back to copy-then-gather
            if self.fetch == "host" or mode == "copy":
                raise
            mode = "copy"
            out = _fetch_fn(mode, src, dev)(host.v, bufs, want, n)
        layers = tuple(dataclasses.replace(s, v=v, use=u) for s, (v, u) in zip(cache.layers, out))
        host = dataclasses.replace(host, steps=host.steps + 1, fetches=host.fetches + 1, mode=mode)
        return dataclasses.replace(cache, layers=layers, host=host)

    def stats(self, cache: Cache) -> dict:
        out = {**super().stats(cache), "interval": self.interval}
        host = cache.host if isinstance(cache.host, RetrievalHost) else None
        if host is None or not cache.layers:
            return out
        per_fetch = 0
        for x, state in zip(host.v, cache.layers):
            rows = state.use.size if host.mode != "copy" else x.shape[0] * x.shape[1] * x.shape[2]
            per_fetch += rows * x.shape[-1] * x.dtype.itemsize
        out.update(
            fetch_mode=host.mode or "none yet",
            fetches=host.fetches,
            bytes_per_fetch=per_fetch,
            bytes_moved=per_fetch * host.fetches,
        )
        return out
