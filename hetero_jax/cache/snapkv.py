"""SnapKV: an observation window at the end of the prompt votes for the prompt tokens to keep.

Rule per sequence (``L`` real prompt tokens, budget ``n = floor(ratio * L)``), per layer and KV head:

* the last ``window`` prompt queries attend (causal softmax, float32) over the prompt keys; their
  probabilities are summed over the window for the keys before the window, average-pooled with
  ``kernel`` (default 5: the HeteroCache reference's ``pool5``, zero padding, count_include_pad;
  SnapKV's code also offers max pooling, not offered here; ``kernel`` 1 = no pooling), reduced over the
  GQA group with ``group_reduce`` (default ``max``, as HeteroCache's runtime; ``mean`` as kvpress);
* the ``w = min(window, n)`` window tokens are always kept, plus the top ``n - w`` pooled keys;
* prefill only: the kept set never changes; every generated token is kept too.

Options: ``ratio`` (0.5), ``window`` (32, the SnapKV paper's; the HeteroCache reference evaluates
its baselines with window 1), ``kernel`` (5), ``group_reduce`` ("max"). A window larger than the
budget of the padded prompt is an error. Ragged batches: a sequence whose own budget is below the
window keeps its last ``n`` tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from hetero_jax.cache.selection import (
    GROUP_REDUCE,
    PromptSelectionPolicy,
    check_choice,
    check_int,
    check_kernel,
    forced_scores,
    prompt_budget,
    window_votes,
)


@dataclasses.dataclass(frozen=True)
class SnapKV(PromptSelectionPolicy):
    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 5
    group_reduce: str = "max"

    def __post_init__(self):
        super().__post_init__()
        check_int("window", self.window, 1)
        check_kernel(self.kernel)
        check_choice("group_reduce", self.group_reduce, GROUP_REDUCE)

    def layer_budget(self, layer: int, a, room, xp):
        """Voted tokens this layer keeps, given the per-layer mean ``a`` and ``room`` = L - window."""
        return a

    def _split(self, lengths, xp):
        n = prompt_budget(self.ratio, lengths, xp)
        w = xp.minimum(n, self.window)
        return n, w

    @functools.lru_cache(maxsize=None)
    def capacity(self, layer: int, t: int) -> int:
        """Static prompt rows per head: the largest kept count over every real length <= t."""
        lengths = np.arange(1, t + 1, dtype=np.int64)
        n, w = self._split(lengths, np)
        return int(np.max(w + self.layer_budget(layer, n - w, lengths - w, np)))

    def keep_scores(self, layer, q, k, lengths):
        t = k.shape[1]
        if self.window > self.static_budget(t):
            raise ValueError(
                f"{self.name} window={self.window} is larger than the per-head budget "
                f"{self.static_budget(t)} (ratio {self.ratio} of a {t}-token prompt); "
                "lower window or raise ratio"
            )
        n, w = self._split(lengths, jnp)
        keep = w + self.layer_budget(layer, n - w, lengths - w, jnp)
        votes = window_votes(q, k, lengths, self.window, self.kernel, self.group_reduce, w)
        return forced_scores(votes, lengths, lengths - w), keep, self.capacity(layer, t)
