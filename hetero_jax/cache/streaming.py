"""StreamingLLM: attention sinks (the first ``n_sink`` tokens) + the most recent tokens.

Per KV head and sequence the budget ``n = floor(ratio * L)`` (``selection.prompt_budget``) holds
``min(n_sink, n)`` sink tokens and the ``n - min(n_sink, n)`` most recent prompt tokens; every
generated token is kept as well (the window is fixed at prefill, as in the HeteroCache comparisons,
rather than rolling during decode). Options: ``ratio`` (default 0.5), ``n_sink`` (default 4, the
StreamingLLM paper's). At ratio 1 every token is kept (full KV).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from hetero_jax.cache.selection import PromptSelectionPolicy, check_int, forced_scores


@dataclasses.dataclass(frozen=True)
class StreamingLLM(PromptSelectionPolicy):
    name: ClassVar[str] = "streaming"
    n_sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_int("n_sink", self.n_sink, 0)

    def keep_scores(self, layer, q, k, lengths):
        b, t, hkv, _ = k.shape
        n = self.budget(lengths)
        sinks = jnp.minimum(n, self.n_sink)
        # score = position, so the top (n - sinks) scores are the most recent tokens; sinks forced
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32), (b, hkv, t))
        scores = forced_scores(pos, lengths, jnp.full((b,), t))  # exclude padding only
        scores = jnp.where(jnp.arange(t)[None, None, :] < sinks[:, None, None], jnp.inf, scores)
        return scores, n, self.static_budget(t)
