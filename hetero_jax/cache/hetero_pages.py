"""HeteroCache beyond the paper (issue #13): sink + recent tokens always kept in compressed heads,
and satellites that refresh by their *own* queries through per-page key bounds (Quest-style).

Both are options of the ``hetero`` policy (``sink``, ``recent``, ``refresh_by="pages"``,
``page_size``); ``hetero_plus`` turns them on together. The faithful defaults never call into here.

* ``force_kept``: token scores with the first ``sink`` and last ``recent`` real prompt tokens
  forced to the top (graded: sinks, then newest first), used wherever a compressed head picks tokens (prefill and refresh).
* Page bounds: for each satellite, per page of ``page_size`` prompt tokens, the elementwise min
  and max of its keys (B, S, pages, D) stay on device (2 x D values per page: one KV row's bytes,
  so 1/page_size of the satellite's full prompt KV, and the budgets shrink to pay for them).
  A query's upper bound on q.k inside a page is sum_d max(q_d min_d, q_d max_d) (Quest); the
  group's query heads reduce by max. Every decode step a layer keeps its satellites' queries
  (``keep_query``); at a drift check the step's ``finish_step`` scores the pages with them, for
  all layers due in the one conditional of their check (``check_scores``). When its pivot
  triggers, the satellite keeps its forced tokens plus the tokens of its best pages, ``cap_j``
  tokens in all (ties to the lowest position, so whole pages in bound order, the last one cut),
  read from the host copy. The pivot still decides *when*.
* ``refresh_when="own"``: each satellite decides *when* too. At prefill it records the pages its
  kept tokens would take by the last prompt query's bounds (``ref``: the top m_j pages, m_j =
  its budget's pages after the forced tokens); at every check it takes the top m_j pages of its
  new scores and refreshes (only itself, only its sequences) when their overlap with ``ref`` is
  below ``own_threshold`` (``own_check``), ``ref`` becoming the new set. Its pivot's check no
  longer triggers it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hetero_jax.attention import NEG_INF
from hetero_jax.cache.topk_select import topk_mask, topk_positions
from pallas_kernels.xla import take_static


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PageState:
    kmin: jax.Array  # (B, S, pages, D) per satellite (stage-slot order), per page: min of the keys
    kmax: jax.Array  # (B, S, pages, D) max of the keys
    score: jax.Array  # (B, S, pages) f32 page bounds of each satellite's query at the last check
    plen: jax.Array  # (B,) int32 real prompt length
    query: Any = None  # (B, S, G, D) this decode step's queries of the satellites (init_pages on)
    ref: Any = None  # refresh_when "own": (B, S, pages) bool, each satellite's pages at its last refresh
    own: Any = None  # (B, S) bool: the satellites whose own check fired at the last check
    checks: Any = None  # () int32 checks run
    refreshes: Any = None  # (S,) int32 checks at which each satellite refreshed (any sequence)


FORCED = 1e30  # forced tokens score FORCED x their rank: above any attention score or page bound


def force_kept(scores, lengths, sink: int, recent: int):
    """scores (B, H, T) -> f32 scores with the first ``sink`` and last ``recent`` real prompt tokens
    above every other; lengths (B,) or (B, H); positions past L untouched (callers mask them).

    Forced tokens are graded, not tied: the sink tokens first (in position order), then the recent
    ones newest first. A head whose cap is below sink + recent (a short prompt) keeps the sinks
    and the newest tokens, where the question of a chat prompt sits; a tie would have kept the
    lowest positions and dropped the question."""
    if not sink and not recent:
        return scores
    t = scores.shape[-1]
    pos = jnp.arange(t)
    lengths = lengths.reshape(lengths.shape + (1,) * (scores.ndim - lengths.ndim))
    real = pos < lengths
    is_sink, is_recent = (pos < sink) & real, (pos >= lengths - recent) & real
    rank = jnp.where(is_sink, 2 * t - pos, pos + 1).astype(jnp.float32)  # sinks 2T..T+1, recent 1..T
    return jnp.where(is_sink | is_recent, FORCED * rank, scores.astype(jnp.float32))


def num_pages(t: int, page: int) -> int:
    return -(-t // page)


def page_bounds(kt, lengths, page: int):
    """kt (B, S, T, D) prompt keys, lengths (B,) -> (kmin, kmax) (B, S, pages, D); pages past the
    prompt (and rows past it inside the last page) do not count; an empty page has bounds 0."""
    b, s, t, d = kt.shape
    n = num_pages(t, page)
    x = jnp.pad(kt, [(0, 0), (0, 0), (0, n * page - t), (0, 0)]).reshape(b, s, n, page, d)
    real = (jnp.arange(n * page) < lengths[:, None]).reshape(b, 1, n, page, 1)
    lo = jnp.where(real, x, jnp.inf).min(3)
    hi = jnp.where(real, x, -jnp.inf).max(3)
    empty = ~real.any(3)
    return jnp.where(empty, 0, lo).astype(kt.dtype), jnp.where(empty, 0, hi).astype(kt.dtype)


def page_scores(q, kmin, kmax, plen, page: int):
    """q (B, S, G, D) the satellites' queries -> (B, S, pages) f32: max over the group of
    sum_d max(q_d kmin_d, q_d kmax_d); NEG_INF for pages that start at or past the prompt."""
    qf = q.astype(jnp.float32)[:, :, :, None, :]  # (B, S, G, 1, D)
    ub = jnp.maximum(qf * kmin[:, :, None].astype(jnp.float32), qf * kmax[:, :, None].astype(jnp.float32)).sum(-1)
    ub = ub.max(2)
    inside = jnp.arange(kmin.shape[2])[None, None, :] * page < plen[:, None, None]
    return jnp.where(inside, ub, NEG_INF)


def token_scores(score, plen, t: int, page: int, sink: int, recent: int):
    """Page scores (B, S, pages) -> token scores (B, S, t): each token its page's bound, forced
    sink/recent tokens above all (``force_kept``), positions past the prompt -inf."""
    tok = jnp.repeat(score, page, axis=-1)[..., :t]
    tok = force_kept(tok, plen, sink, recent)
    return jnp.where(jnp.arange(t)[None, None, :] < plen[:, None, None], tok, -jnp.inf)


def select_rows(policy, p, pages: PageState, flag, keep, pi: int, live) -> tuple:
    """Pivot pi's refresh by its satellites' own page scores: positions (B, len(live), kc) in
    position order and the mask of rows to write (triggered sequences only), as
    ``hetero_refresh._select_rows`` returns them."""
    kc = max(p.caps[j] for j in live)
    slots = jnp.asarray([p.sats.index(j) for j in live])
    t = int(pages.kmin.shape[2]) * policy.page_size
    tok = token_scores(pages.score[:, slots], pages.plen, t, policy.page_size, policy.sink, policy.recent)
    pos, m = topk_positions(tok, keep[:, jnp.asarray(live)], kc)  # (B, S, kc), as the pivot refresh
    if pages.own is not None:  # refresh_when "own": each satellite by its own check
        return pos, m & pages.own[:, slots, None]
    return pos, m & flag[:, pi, None, None]


def init_pages(policy, p, kt, q, lengths, keep, last_q) -> PageState:
    """Bounds of the layer's satellites (stage-slot order) from the prompt's head-major keys kt
    (B, Hkv, T, D); a query slot per satellite shaped as the prompt's queries q (B, T, Hq, D).
    refresh_when "own": the reference pages of the last prompt query last_q (B, Hkv, G, D) with
    the budgets keep (B, Hkv)."""
    b, hkv, _, d = kt.shape
    sats = jnp.asarray(p.sats)
    kmin, kmax = page_bounds(kt[:, sats], lengths, policy.page_size)
    query = jnp.zeros((b, len(p.sats), q.shape[2] // hkv, d), q.dtype)
    plen = lengths.astype(jnp.int32)
    st = PageState(kmin, kmax, jnp.zeros(kmin.shape[:3], jnp.float32), plen, query)
    if policy.refresh_when != "own":
        return st
    score = page_scores(last_q[:, sats], kmin, kmax, plen, policy.page_size)
    ref = topk_mask(score, own_pages(policy, keep[:, sats], plen, kmin.shape[2]))
    return dataclasses.replace(st, ref=ref, own=jnp.zeros(ref.shape[:2], bool), checks=jnp.zeros((), jnp.int32),
                               refreshes=jnp.zeros((len(p.sats),), jnp.int32))


def own_pages(policy, keep, plen, n: int):
    """m_j (B, S): the pages a satellite's budget keep (B, S) holds after its forced tokens, at
    least 1 and at most the prompt's pages."""
    free = keep - policy.sink - policy.recent
    real = -(-plen // policy.page_size)  # (B,)
    return jnp.clip(-(-free // policy.page_size), 1, jnp.minimum(real, n)[:, None]).astype(jnp.int32)


def own_check(policy, pages: PageState, score, keep) -> PageState:
    """refresh_when "own", at a check: each satellite's top m_j pages by its new page scores score
    (B, S, pages) against its reference pages; the satellites whose overlap is below
    ``own_threshold`` refresh (``own``) and take the new pages as reference."""
    m = own_pages(policy, keep, pages.plen, score.shape[-1])
    new = topk_mask(score, m)
    overlap = (new & pages.ref).sum(-1).astype(jnp.float32) / m.astype(jnp.float32)
    own = overlap < policy.own_threshold
    return dataclasses.replace(pages, score=score, ref=jnp.where(own[..., None], new, pages.ref), own=own,
                               checks=pages.checks + 1, refreshes=pages.refreshes + own.any(0).astype(jnp.int32))


def keep_query(p, pages: PageState, qg) -> PageState:
    """Every decode step, per layer: the satellites' queries qg[:, sats] (qg (B, Hkv, G, D)), for
    ``check_scores`` in the step's ``finish_step`` (a few bytes written each step buy one
    conditional per check group instead of one per layer)."""
    return dataclasses.replace(pages, query=take_static(qg, p.sats).astype(pages.query.dtype))


def check_scores(policy, pages: PageState) -> jax.Array:
    """At a check step: each satellite's page scores (B, S, pages) of its kept query."""
    return page_scores(pages.query, pages.kmin, pages.kmax, pages.plen, policy.page_size)


def overhead_ratio(policy) -> float:
    """Fraction of full prompt KV the page bounds take (one KV row per page per satellite)."""
    if policy.refresh_by != "pages" or not policy.roles:
        return 0.0
    n = sum(len(r) for r in policy.roles)
    s = sum(len(ss) for layer in policy.clusters for _, ss in layer)
    return s / (n * policy.page_size)


def forced_request(policy, req):
    """A pivot's token scores req (B, P, T) (NEG_INF past the prompt) with the sink / recent
    tokens forced, for refresh_by="pivot" with ``sink`` or ``recent`` set."""
    if not policy.sink and not policy.recent:
        return req
    plen = (req > NEG_INF / 2).sum(-1)  # (B, P): scores inside the prompt are probabilities >= 0
    return force_kept(req, plen, policy.sink, policy.recent)
