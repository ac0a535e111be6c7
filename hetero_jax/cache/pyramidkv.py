"""PyramidKV: SnapKV selection with per-layer budgets that decrease linearly with depth.

Per sequence, SnapKV keeps ``w`` window tokens + ``a = n - w`` voted tokens in every layer. PyramidKV
keeps the same window and gives layer ``l`` (of ``N``) a linear share of the voted tokens: from
``M = min(floor(a * (2 - 1/beta)), L - w)`` at layer 0 down to ``m = 2a - M`` at layer N-1
(PyramidKV's schedule: max 2a - a/beta, min a/beta, default ``beta`` 20; capped so no layer needs
more tokens than the prompt has, which makes ratio 1 keep everything). Layer budgets are
differences of the floored cumulative schedule, so they sum to exactly ``N * a``: the same total
device KV as SnapKV at the same ratio (neighbouring layers may differ from the line by one token).
Storage per layer is sized for that layer's largest budget over every prompt length <= T. Options: SnapKV's plus ``beta`` (integer >= 1; 1 = SnapKV).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from hetero_jax.cache.selection import INT32_MAX, check_int
from hetero_jax.cache.snapkv import SnapKV


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    name: ClassVar[str] = "pyramidkv"
    from_config: ClassVar[tuple] = ("num_layers",)
    beta: int = 20
    num_layers: int = 1  # the model's, set by create()

    def __post_init__(self):
        super().__post_init__()
        check_int("beta", self.beta, 1)
        check_int("num_layers", self.num_layers, 1)

    def layer_budget(self, layer, a, room, xp):
        n_layers = self.num_layers
        if n_layers == 1:
            return a
        top = xp.minimum(a * (2 * self.beta - 1) // self.beta, room)  # layer 0
        spread = 2 * top - 2 * a  # top - bottom, even
        e = 2 * (n_layers - 1)
        q, r = spread // e, spread % e

        def drop(l):  # ceil(spread * l (l - 1) / e) without int32 overflow
            c = l * (l - 1)
            return q * c + (r * c + e - 1) // e

        return top - (drop(layer + 1) - drop(layer))

    def keep_scores(self, layer, q, k, lengths):
        if 2 * self.beta * k.shape[1] > INT32_MAX:
            raise ValueError(f"beta={self.beta} is too large for a {k.shape[1]}-token prompt (int32 budgets)")
        return super().keep_scores(layer, q, k, lengths)
