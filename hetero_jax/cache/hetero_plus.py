"""``hetero_plus``: HeteroCache with the issue #13 options on together (``hetero_pages``).

Compressed heads always keep 4 sink tokens and the last 64 prompt tokens (StreamingLLM's
ingredients: the question of a long prompt sits at its end), satellites refresh by their own
queries against per-page key bounds (32-token pages, Quest's upper bound; the bounds' bytes are
taken from the compressed budgets), and the pivot's drift check still decides when. Every other
option is the ``hetero`` policy's and can be changed the same way (``hetero_plus:0.5:recent=128``).
The values were picked by the ablation in bench/results/accuracy/NOTES.md.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from hetero_jax.cache.hetero import HeteroCache


@dataclasses.dataclass(frozen=True)
class HeteroPlus(HeteroCache):
    name: ClassVar[str] = "hetero_plus"
    sink: int = 4
    recent: int = 64
    refresh_by: str = "pages"
    page_size: int = 32
    refresh_select: str = "topk"  # only used if refresh_by="pivot": the pivot's top cap_j per satellite
