"""``hetero_fit``: ``hetero_plus`` on a fitted profile, with layer budgets and SnapKV's vote.

Four changes over ``hetero_plus``, each measured in bench/results/accuracy/NOTES.md (issue #13):
the default profile is the fitted one (profiles/fitted/, made with ``hetero-jax profile
--max-full-fraction 0.05``: few full heads, so the compressed heads get most of the budget);
``budget_by="layer"`` (a layer's compressed heads share its largest cap, the padding of the uniform
block filled with tokens and charged, so device bytes stay r x full); ``select_window=32`` (the
last 32 prompt queries vote for the compressed heads' tokens) with ``select_kernel=15`` (the votes
pooled over 15 neighbouring keys, so a needle's value, several digit tokens long, is kept whole). Pivots, satellites, the drift
check and the page refresh are ``hetero_plus``'s, but SmolLM2's fitted profile has no pivot left
(4 volatile heads stay whole, 86 anchors are compressed), so on it nothing refreshes: the measured
winner is the static part of the method (see the notes). A model without a shipped fitted profile
needs ``profile=...`` (the error says how to make one).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from hetero_jax.cache.hetero_plus import HeteroPlus


@dataclasses.dataclass(frozen=True)
class HeteroFit(HeteroPlus):
    name: ClassVar[str] = "hetero_fit"
    fitted_profile: ClassVar[bool] = True
    budget_by: str = "layer"
    select_window: int = 32
    select_kernel: int = 15
