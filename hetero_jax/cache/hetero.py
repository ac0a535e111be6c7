"""HeteroCache: per-head roles from a profile, compressed heads, drift-gated refresh from host.

The method as the authors' code runs it (REFERENCE.md sections 2-4), split by concern:
``hetero_pool`` (the static per-layer plan and the device blocks: full heads in one uniform
block, compressed heads in another), ``hetero_monitor`` (token scores and the drift check, on
device inside the decode step; the pivots' scores come from their own decode attention's logits,
``drift_scores``), ``hetero_refresh`` (satellites' prompt KV in host memory, refresh programs
dispatched between steps without a host sync), ``hetero_drift`` and ``topk_select`` (pure top-K
arithmetic). This file holds the options and the policy interface.

Options (defaults run the authors' method; the others are measured against them in bench/results/):
``steps``, ``threshold`` (a check every ``steps`` decode steps, refresh when a pivot's median
top-K overlap with its reference set is below ``threshold``); ``trigger`` "sequence" (each
sequence decides alone: the authors' rule at batch 1, and a prompt's output does not depend on its
batch mates) or "batch" (the authors' batch-mean overlap); ``refresh_select`` "authors" or "topk"
(``hetero_refresh``); ``check_impl`` "spread" | "select" | "topk" (``hetero_monitor``; all exact);
``stagger`` (layer l checks at phase l mod ``steps``: the same rate, spread over steps); ``lag`` 1
(rows used from the step after the check, as the authors) or 2 (selected and gathered while that
step runs, written before the next); ``select_window`` w > 1 (SnapKV's rule for the compressed
heads: the last w prompt queries vote, their tokens kept; pivots' reference sets unchanged;
``select_kernel`` the votes' pooling width);
``threshold_mode`` "fixed" or "rate" (``target_rate``, ``rate_gain``: ``hetero_drift``);
``offload`` (satellites' prompt KV in ``pinned_host`` memory).

Beyond the paper (issue #13, ``hetero_pages``; off by default, on together in ``hetero_plus``):
``sink`` / ``recent`` (compressed heads always keep the first ``sink`` and last ``recent`` prompt
tokens, at prefill and at every refresh) and ``refresh_by`` "pages" (satellites refresh by their
own queries against per-page key bounds of ``page_size`` tokens kept on device; the pivot's
trigger still decides when; the bounds' bytes come out of the compressed heads' budgets, so the
device prompt KV stays ~ r x full); with it, ``refresh_when`` "own" (each satellite's own page-set
check decides when it refreshes, ``own_threshold``; its pivot's no longer does); ``budget_by``
"head" (each compressed head its own weight's cap, the block padded to the layer's largest and the
padding allocated but not counted) or "layer" (``hetero_pool.layer_caps``: all compressed heads of a
layer keep the layer's cap, the padding filled with tokens and charged to the budget, so device
bytes stay r x full). ``hetero_fit`` runs the best of these on a fitted profile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from hetero_jax.attention import group_queries, last_rows
from hetero_jax.cache import hetero_pages, hetero_refresh
from hetero_jax.cache.base import Cache, CachePolicy, array_bytes
from hetero_jax.cache.hetero_drift import in_position_order
from hetero_jax.cache.hetero_monitor import (checks_at, finish_step, group_max_scores, init_drift, monitor,
                                             record_logits)
from hetero_jax.cache.hetero_pool import LayerPlan, append_and_attend, layer_caps, layer_plan, store_prompt
from hetero_jax.cache.selection import check_kernel, forced_scores, head_major, window_votes
from hetero_jax.profile_io import Profile, as_profile

CHOICES = {"trigger": ("sequence", "batch"), "refresh_select": ("authors", "topk"),
           "check_impl": ("spread", "select", "topk"), "lag": (1, 2), "threshold_mode": ("fixed", "rate"),
           "refresh_by": ("pivot", "pages"), "refresh_when": ("pivot", "own"), "budget_by": ("head", "layer")}


@dataclasses.dataclass(frozen=True)
class HeteroCache(CachePolicy):
    name: ClassVar[str] = "hetero"
    fitted_profile: ClassVar[bool] = False  # default profile: profiles/fitted/ (``hetero_fit``)
    needs_profile: ClassVar[bool] = True
    roles: tuple = ()
    weights: tuple = ()
    clusters: tuple = ()
    ratio: float = 0.5
    steps: int = 5
    threshold: float = 0.5  # drift trigger: median overlap below it refreshes
    trigger: str = "sequence"
    refresh_select: str = "authors"
    check_impl: str = "spread"
    stagger: bool = False
    lag: int = 1  # steps from a check to the step that first uses the refreshed rows
    select_window: int = 1  # prompt queries that pick compressed heads' tokens (1: the reference)
    select_kernel: int = 5  # select_window > 1: width of the votes' average pooling (SnapKV's kernel)
    threshold_mode: str = "fixed"
    target_rate: float = 0.15  # "rate": fraction of pivot checks that refresh
    rate_gain: float = 0.2  # "rate": threshold change per check per unit rate error
    offload: bool = True
    sink: int = 0  # compressed heads always keep the first ``sink`` prompt tokens (hetero_pages)
    recent: int = 0  # ... and the last ``recent``
    refresh_by: str = "pivot"  # "pages": satellites choose by their own queries (hetero_pages)
    page_size: int = 32
    refresh_when: str = "pivot"  # "own" (with refresh_by "pages"): each satellite's own page check triggers it
    own_threshold: float = 0.5  # "own": refresh when the top pages' overlap with the last ones is below it
    budget_by: str = "head"  # "layer": a layer's compressed heads share one cap, its padding charged (layer_caps)
    profile_name: str = ""
    model_shards: int = 1  # devices the KV heads split over (set by ``on_mesh``): the blocks' layout

    @classmethod
    def create(cls, cfg, ratio=None, profile=None, params=None, **options) -> "HeteroCache":
        """``profile``: None (the shipped profile for ``cfg``), a path, a dict or a Profile;
        ``params``, when given, are checked against the profile's weights digest too."""
        prof = as_profile(profile, cfg, cls.fitted_profile)
        if params is not None:
            prof.check_model(cfg, params)
        ratio = 0.5 if ratio is None else ratio
        prof.check_ratio(ratio)
        allowed = {f.name for f in dataclasses.fields(cls)} - {"roles", "weights", "clusters", "ratio", "profile_name",
                                                                "model_shards"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} for cache policy {cls.name!r}; "
                             f"valid: {', '.join(sorted(allowed))}")
        return cls(roles=prof.roles, weights=prof.weights, clusters=prof.clusters, ratio=float(ratio),
                   profile_name=str(prof.model.get("name", "")), **options)

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold (drift) must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.own_threshold <= 1.0:
            raise ValueError(f"own_threshold (a satellite's page-set overlap) must be in [0, 1], got {self.own_threshold}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps (decode steps between drift checks) must be an int >= 1, got {self.steps!r}")
        for option, choices in CHOICES.items():
            if getattr(self, option) not in choices:
                raise ValueError(f"{option} must be one of {', '.join(map(repr, choices))}, "
                                 f"got {getattr(self, option)!r}")
        if self.refresh_when == "own" and self.refresh_by != "pages":
            raise ValueError("refresh_when='own' needs refresh_by='pages' (a satellite checks itself by its page "
                             "bounds); add refresh_by=pages")
        if not (isinstance(self.select_window, int) and self.select_window >= 1):
            raise ValueError(f"select_window (prompt queries voting for kept tokens) must be an int >= 1, "
                             f"got {self.select_window!r}")
        check_kernel(self.select_kernel)
        if not (0.0 < self.target_rate < 1.0 and self.rate_gain > 0.0):
            raise ValueError(f"need 0 < target_rate < 1 and rate_gain > 0, got {self.target_rate}, {self.rate_gain}")
        for option in ("sink", "recent", "page_size"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < (option == "page_size"):
                raise ValueError(f"{option} must be an int >= {int(option == 'page_size')}, got {value!r}")
        if self.roles:
            self._profile().check_ratio(self.ratio)
            if self.ratio < 1.0 and self.budget_ratio <= self._profile().num_full / self._profile().num_heads:
                raise ValueError(f"ratio {self.ratio} leaves no budget for the compressed heads after the page "
                                 f"bounds ({hetero_pages.overhead_ratio(self):.4f} of full KV); raise ratio or "
                                 "page_size")

    @property
    def budget_ratio(self) -> float:
        """The ratio the budget formula gets: ``ratio`` less what page bounds take on device."""
        return self.ratio - hetero_pages.overhead_ratio(self) if self.ratio < 1.0 else self.ratio

    # ------------------------------------------------------------------ static plan
    def _profile(self) -> Profile:
        return Profile(model={}, params={}, roles=self.roles, stability=(), weights=self.weights,
                       clusters=self.clusters)

    @functools.lru_cache(maxsize=64)
    def plan(self, layer: int, t: int, max_new: int, shards: int | None = None) -> LayerPlan:
        """The layer's layout; ``shards`` (default ``model_shards``) as the state was built with."""
        return layer_plan(self._profile(), self.budget_ratio, layer, t, max_new,
                          self.model_shards if shards is None else shards,
                          self._layer_caps(t) if self.budget_by == "layer" else None)

    @functools.lru_cache(maxsize=8)
    def _layer_caps(self, t: int) -> np.ndarray:
        return layer_caps(self._profile(), self.budget_ratio, t)

    @functools.lru_cache(maxsize=8)
    def base_table(self, t: int) -> np.ndarray:
        """(t+1,) int32: the base budget K for each real prompt length."""
        return np.array([self._profile().base_budget(self.budget_ratio, n) for n in range(t + 1)], np.int32)

    # ------------------------------------------------------------------ the cache-policy interface
    def on_mesh(self, model: int) -> "HeteroCache":
        """Blocks laid out per shard of ``model`` devices (``hetero_pool``): the same decisions."""
        return self if model == self.model_shards else dataclasses.replace(self, model_shards=model)

    def head_split(self, state):
        """Only the blocks and ``keep`` have KV heads on axis 1; the drift state's axis 1 is
        pivots / satellites / buffer steps, the pages' satellites: split over ``data`` only."""
        split = jax.tree.map(lambda _: False, state)
        return dataclasses.replace(split, full_k=True, full_v=True, comp_k=True, comp_v=True, keep=True)

    def build_layer(self, layer, q, k, v, lengths, max_new_tokens):
        b, t, hkv, d = k.shape
        p = self.plan(layer, t, max_new_tokens)
        kt, vt = head_major(k), head_major(v)
        keep = jnp.stack([jnp.asarray(p.keep_tables[h])[lengths] for h in range(hkv)], 1).astype(jnp.int32)
        if not all(p.full) or p.monitored:
            scores = group_max_scores(group_queries(last_rows(q, lengths, 1), hkv), kt, lengths[:, None])
        comp = [h for h in range(hkv) if not p.full[h] and p.caps[h]]
        pos = mask = None
        if comp:  # all compressed heads of the layer in one top-k, kept in position order
            ci = jnp.asarray(comp)
            sel = scores if self.select_window == 1 else self._window_scores(q, k, lengths, keep[:, ci])
            sel = hetero_pages.force_kept(sel, lengths, self.sink, self.recent)
            pos, mask = in_position_order(jax.lax.top_k(sel[:, ci], max(p.caps[h] for h in comp))[1], keep[:, ci])
        st = store_prompt(p, kt, vt, keep, comp, pos, mask, max_new_tokens)
        if p.monitored:
            st = dataclasses.replace(st, drift=init_drift(self, p, scores, q, kt, vt, lengths, max_new_tokens))
            if self.refresh_by == "pages":
                last_q = group_queries(last_rows(q, lengths, 1), hkv)[:, :, :, 0]  # (B, Hkv, G, D)
                st = dataclasses.replace(st, pages=hetero_pages.init_pages(self, p, kt, q, lengths, keep, last_q))
        return st

    def _window_scores(self, q, k, lengths, keeps):
        """select_window > 1 (beyond the reference): SnapKV's rule for the compressed heads. The last
        ``w`` prompt queries vote (causal softmax summed over the rows, pool5, group max) and the
        window's own tokens are always kept, w clipped to the smallest compressed budget of the
        sequence so every head keeps its whole window."""
        w = jnp.minimum(self.select_window, keeps.min(1))  # (B,)
        votes = window_votes(q, k, lengths, self.select_window, self.select_kernel, "max", w)
        return forced_scores(votes, lengths, lengths - w)

    def decode_layer(self, layer, st, q, k, v, cache: Cache):
        p = self.plan(layer, st.T, st.max_new, st.shards)
        qg = q.reshape(k.shape[0], k.shape[1], -1, k.shape[2])
        score_once = bool(p.monitored) and self.check_impl == "spread"  # the pivots' scores from this pass
        out, st, logits = append_and_attend(p, st, qg, k, v, cache.step, logits=score_once)
        if p.monitored:
            st = (record_logits(st, logits) if score_once
                  else monitor(self, layer, p, st, qg, cache))
            if st.pages is not None:  # scored at a check step by finish_step
                st = dataclasses.replace(st, pages=hetero_pages.keep_query(p, st.pages, qg))
        return out.reshape(q.shape), st

    def finish_step(self, cache: Cache) -> Cache:
        """Every layer's drift-check work of this step that can run in one batch (check_impl
        "spread", refresh_by "pages")."""
        return finish_step(self, cache)

    def after_prefill(self, cache: Cache) -> Cache:
        return hetero_refresh.offload(self, cache)

    def before_step(self, cache: Cache) -> Cache:
        return hetero_refresh.dispatch(self, cache)

    def refresh(self, cache: Cache, layers: tuple) -> Cache:
        """Apply the pending refresh requests of ``layers`` now (as lag 1 does after a check)."""
        return hetero_refresh.refresh(self, cache, layers)

    def stats(self, cache: Cache) -> dict:
        out = super().stats(cache)
        per_pivot, per_layer = [], [0] * len(cache.layers)
        row_bytes = 2 * cache.layers[0].full_k.shape[-1] * cache.layers[0].full_k.dtype.itemsize
        for l, st in enumerate(cache.layers):
            if st.drift is None:
                continue
            c, r, m = (np.asarray(x).tolist() for x in (st.drift.checks, st.drift.refreshes, st.drift.rows_moved))
            for i, (pv, sats) in enumerate(self.plan(l, st.T, st.max_new, st.shards).monitored):
                per_pivot.append({"layer": l, "pivot": pv, "satellites": list(sats), "checks": c[i],
                                  "refreshes": r[i], "bytes_moved": m[i] * row_bytes})
                per_layer[l] += r[i]
        out.update({
            "ratio": self.ratio, "profile": self.profile_name, "steps": self.steps, "threshold": self.threshold,
            "trigger": self.trigger, "refresh_select": self.refresh_select, "sink": self.sink, "recent": self.recent,
            "refresh_by": self.refresh_by, "page_size": self.page_size, "budget_ratio": self.budget_ratio,
            "refresh_when": self.refresh_when, "own_threshold": self.own_threshold, "budget_by": self.budget_by,
            "lag_steps": self.lag, "check_impl": self.check_impl, "stagger": self.stagger,
            "threshold_mode": self.threshold_mode, "counts": self._profile().counts(),
            "thresholds": [float(st.drift.thr) if st.drift is not None else None for st in cache.layers],
            # rows the blocks allocate (F x T + C x Cmax per layer), padding to Cmax included
            "prompt_slots_device": sum(self.plan(l, st.T, st.max_new, st.shards).prompt_slots(st.T)
                                       for l, st in enumerate(cache.layers)),
            "prompt_slots_budget": sum(sum(self.plan(l, st.T, st.max_new).caps) for l, st in enumerate(cache.layers)),
            "prompt_slots_full": cache.layers[0].T * sum(len(r) for r in self.roles),
            "checks": sum(x["checks"] for x in per_pivot),
            "refreshes": sum(x["refreshes"] for x in per_pivot),
            "bytes_moved": sum(x["bytes_moved"] for x in per_pivot),
            "refreshes_per_layer": per_layer,
            "per_pivot": per_pivot,
            "host_prompt_bytes": array_bytes(cache.host.kv) if isinstance(cache.host, hetero_refresh.HeteroHost) else 0,
        })
        if self.refresh_when == "own":  # satellites decide: checks and refreshes counted per satellite
            own = [(int(st.pages.checks) * len(st.pages.refreshes), np.asarray(st.pages.refreshes))
                   for st in cache.layers if st.pages is not None]
            out.update({"checks": sum(c for c, _ in own), "refreshes": int(sum(r.sum() for _, r in own)),
                        "refreshes_per_layer": [int(np.asarray(st.pages.refreshes).sum()) if st.pages is not None
                                                else 0 for st in cache.layers],
                        "counted_per": "satellite"})
        out.update(self._step_masks(cache))
        return out

    def _step_masks(self, cache: Cache) -> dict:
        """Per decode step (0 = the first after prefill): did a check run in it, and was a refresh
        dispatched before it (a check in the step before fired). For bench.decode's step timing."""
        monitored = [(l, st) for l, st in enumerate(cache.layers) if st.drift is not None]
        if not monitored:
            return {}
        n = monitored[0][1].max_new
        check = [any(bool(checks_at(self, l, i)) for l, _ in monitored) for i in range(n)]
        fired = np.any([np.asarray(st.drift.fired)[:n] for _, st in monitored], axis=0)
        return {"check_step_mask": check, "refresh_step_mask": [False] + [bool(x) for x in fired[:-1]]}
