"""Interval retrieval: ``retrieval`` that reselects and refetches only every ``interval`` steps.

Identical to ``hetero_jax.cache.retrieval`` (same storage, scoring and fetch) except that the
decode step selects from its query only when ``(step + 1) % interval == 0`` and the fetch runs
before the following step; in between, the working set is reused unchanged. This is HeteroCache's
refresh cadence (their ``steps`` = 5) without its drift gate and head roles. Options: those of
``retrieval`` with ``interval`` default 5.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from hetero_jax.cache.retrieval import Retrieval


@dataclasses.dataclass(frozen=True)
class IntervalRetrieval(Retrieval):
    name: ClassVar[str] = "interval"
    interval: int = 5
