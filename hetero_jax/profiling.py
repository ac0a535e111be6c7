"""Offline head profiling for HeteroCache (REFERENCE.md section 1): one calibration run -> roles.

A calibration text is prefilled (truncated to ``max_length`` tokens) and decoded greedily for
``max_new_tokens`` tokens under a full-KV cache that also records, per layer and KV head, the
top-``topk`` key positions of the last query row (softmax over all keys, restricted to the
prompt, mean over the GQA group, ``pool5``). Only that one row is scored per step: no attention
matrix is ever materialised. ``classify`` turns the recorded sets into roles and budget weights.

Defaults: the authors profile 128K-context models with max_length 5000 and topk 1024 (20.5% of
the prompt). Models with a short context get max_length = half their context (SmolLM2's 8K ->
4096, leaving room for the generated tokens and a power of two, so no padding) and the same
20.5% top-k fraction (topk 839), so the overlap statistics mean the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.config import LlamaConfig
from hetero_jax.attention import NEG_INF, group_queries, last_rows, pooled_scores
from hetero_jax.cache.full import FullKV, FullLayer
from hetero_jax.decode_loop import run
from hetero_jax.profile_io import Profile, model_fingerprint, save_profile, weights_digest

REF_MAX_LENGTH, REF_TOPK = 5000, 1024  # the authors' defaults (tools/get_weights.py)
MIN_CALIBRATION_TOKENS = 128  # shorter texts say little about how a head behaves over a long context
CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
EPS = 1e-6  # in the budget weights 1 / (stab + eps), as the authors


def default_lengths(cfg: LlamaConfig) -> tuple[int, int]:
    """(max_length, topk): the reference's 5000/1024, scaled down for short-context models."""
    max_length = min(REF_MAX_LENGTH, cfg.max_position_embeddings // 2)
    return max_length, max(1, round(max_length * REF_TOPK / REF_MAX_LENGTH))


# ---------------------------------------------------------------------------------- recording
def _top_sets(q, k, valid, prompt_len, topk: int):
    """q (B, Hkv, G, 1, D) one query row per head, k (B, Hkv, S, D) -> (B, Hkv, topk) int32: the top
    positions, among the first prompt_len keys, of the softmax over the ``valid`` keys (B, S), mean
    over the group, pool5. Keys past the prompt are zeroed before pooling (as slicing then
    zero-padding does) and excluded from the top-k after it."""
    inside = jnp.arange(k.shape[2])[None, None, :] < prompt_len[:, None, None]
    pooled = pooled_scores(q, k, valid[:, None, None, None, :], reduce="mean", keep=inside)
    return jax.lax.top_k(jnp.where(inside, pooled, NEG_INF), topk)[1].astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RecLayer:
    full: FullLayer
    sets: jax.Array  # (B, Hkv, topk) int32: this step's top-k set per KV head


@dataclasses.dataclass(frozen=True)
class ProfileRecorder(FullKV):
    """Full KV plus the per-head top-k set of the last query row at every step."""

    topk: int = 839

    def build_layer(self, layer, q, k, v, lengths, max_new_tokens):
        full = super().build_layer(layer, q, k, v, lengths, max_new_tokens)
        kt = k.transpose(0, 2, 1, 3)
        valid = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
        return RecLayer(full, _top_sets(group_queries(last_rows(q, lengths, 1), kt.shape[1]), kt, valid, lengths,
                                        self.topk))

    def decode_layer(self, layer, state: RecLayer, q, k, v, cache):
        out, full = super().decode_layer(layer, state.full, q, k, v, cache)
        b, hkv, s, d = full.k.shape
        valid = jnp.arange(s)[None, :] <= cache.lengths[:, None]  # the new token included
        sets = _top_sets(q.reshape(b, hkv, -1, 1, d), full.k, valid, cache.lengths - cache.step, self.topk)
        return out, RecLayer(full, sets)


def _sets(logits, cache):
    return tuple(layer.sets for layer in cache.layers)


def record_sets(params, cfg: LlamaConfig, tokens, *, topk: int, max_new_tokens: int, progress: bool = True):
    """Prefill ``tokens`` (one sequence) and decode greedily; return (prefill_sets, decode_sets,
    generated ids) with sets as numpy (layers, B, Hkv, topk) and (steps, layers, B, Hkv, topk)."""
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    if len(tokens) < topk:
        raise ValueError(f"calibration prompt has {len(tokens)} tokens, fewer than topk={topk}; use a longer text "
                         "or smaller topk")
    # the authors' run records max_new_tokens - 1 decode forwards
    r = run(params, [tokens.tolist()], config=cfg, policy=ProfileRecorder(topk=topk), steps=max_new_tokens - 1,
            record=_sets, progress=progress)
    sets = np.stack(r.records, 1)  # (1 + steps, layers, B, Hkv, topk)
    return sets[0], sets[1:], r.tokens[0, :max_new_tokens].tolist()


# ---------------------------------------------------------------------------------- classification
def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|A ∩ B| / k for index sets without duplicates, (..., k) -> (...)."""
    a, b = np.broadcast_arrays(a, b)
    c = np.sort(np.concatenate([a, b], -1), -1)
    return (c[..., 1:] == c[..., :-1]).sum(-1) / a.shape[-1]


def star_clusters(adjacency: np.ndarray) -> list[tuple[int, list[int]]]:
    """Greedy star clustering: the unassigned head with most unassigned neighbours (ties: lowest
    index) becomes a pivot, those neighbours its satellites; stop when the best degree is 0."""
    n = adjacency.shape[0]
    unassigned = set(range(n))
    out = []
    while unassigned:
        best = min(unassigned, key=lambda h: (-sum(adjacency[h, j] for j in unassigned if j != h), h))
        members = sorted(j for j in unassigned if j != best and adjacency[best, j])
        if not members:
            break
        out.append((best, members))
        unassigned -= {best, *members}
    return out


def classify(prefill_sets: np.ndarray, decode_sets: np.ndarray, *, sim_threshold: float = 0.5,
             stable_threshold: float = 0.5):
    """Recorded sets -> (roles, stability, weights, clusters), as the authors' get_cluster.py.

    prefill_sets (layers, B, Hkv, k); decode_sets (steps, layers, B, Hkv, k). Stability is the
    median over steps of the batch-mean overlap with the prefill set; the similarity graph is
    measured on the prefill sets; weights are 1/(stab + 1e-6) normalised to mean 1 over all the
    model's compressed heads (anchors and satellites).
    """
    for name, x in (("sim_threshold", sim_threshold), ("stable_threshold", stable_threshold)):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {x}")
    nl, _, hkv, _ = prefill_sets.shape
    if len(decode_sets):
        stab = np.median(overlap(prefill_sets[None], decode_sets).mean(2), axis=0)  # (layers, Hkv)
    else:
        stab = np.zeros((nl, hkv))  # no decode steps: every unique head counts as volatile
    roles, clusters = [], []
    for l in range(nl):
        sim = overlap(prefill_sets[l][:, :, None], prefill_sets[l][:, None, :]).mean(0)  # (Hkv, Hkv)
        adj = (sim >= sim_threshold) & ~np.eye(hkv, dtype=bool)
        stars = star_clusters(adj)
        r = ["anchor" if stab[l, h] >= stable_threshold else "volatile" for h in range(hkv)]
        for p, sats in stars:
            r[p] = "pivot"
            for s in sats:
                r[s] = "satellite"
        roles.append(tuple(r))
        clusters.append(tuple((p, tuple(s)) for p, s in stars))
    comp = [(l, h) for l in range(nl) for h in range(hkv) if roles[l][h] in ("anchor", "satellite")]
    inv = {lh: 1.0 / (float(stab[lh]) + EPS) for lh in comp}
    total = sum(inv.values())
    weights = tuple(
        tuple(inv[(l, h)] / total * len(comp) if (l, h) in inv else None for h in range(hkv)) for l in range(nl)
    )
    stability = tuple(tuple(float(s) for s in row) for row in stab)
    return tuple(roles), stability, weights, tuple(clusters)


SIM_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))  # similarity thresholds tried when fitting


def fit_sim_threshold(prefill_sets, decode_sets, *, max_full_fraction: float, sim_threshold: float = 0.5,
                      stable_threshold: float = 0.5) -> float:
    """A profile fitted to the model (issue #13): the similarity threshold nearest ``sim_threshold``
    (grid of 0.05 steps, ties to the higher) whose roles keep F/N <= ``max_full_fraction``, so the
    budget formula leaves room for the ratios one wants (it needs r > F/N). F/N is not monotone in
    the threshold (a split cluster can add pivots or anchors), hence the scan."""
    if not 0.0 < max_full_fraction <= 1.0:
        raise ValueError(f"max_full_fraction must be in (0, 1], got {max_full_fraction}")
    found = {}
    for thr in SIM_GRID:
        roles = classify(prefill_sets, decode_sets, sim_threshold=thr, stable_threshold=stable_threshold)[0]
        found[thr] = sum(r in ("pivot", "volatile") for layer in roles for r in layer) / sum(map(len, roles))
    ok = [t for t, f in found.items() if f <= max_full_fraction]
    if not ok:
        best = min(found, key=found.get)
        raise ValueError(f"no similarity threshold gives F/N <= {max_full_fraction}: the lowest is {found[best]:.3f} "
                         f"(at {best}); raise --max-full-fraction or lower --stable-threshold")
    return min(ok, key=lambda t: (abs(t - sim_threshold), -t))


# ---------------------------------------------------------------------------------- driver
def profile_model(params, cfg: LlamaConfig, tokens, *, name: str = "model", max_length: int | None = None,
                  topk: int | None = None, max_new_tokens: int = 100, sim_threshold: float = 0.5,
                  stable_threshold: float = 0.5, calibration: dict | None = None, progress: bool = True,
                  max_full_fraction: float | None = None) -> Profile:
    """Profile a model on calibration ``tokens`` (truncated to ``max_length``) -> Profile. With
    ``max_full_fraction``, the similarity threshold is fitted (``fit_sim_threshold``)."""
    d_len, d_topk = default_lengths(cfg)
    max_length = d_len if max_length is None else int(max_length)
    topk = (d_topk if max_length == d_len else max(1, round(max_length * REF_TOPK / REF_MAX_LENGTH))) \
        if topk is None else int(topk)
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 (stability needs decode steps), got {max_new_tokens}")
    tokens = list(tokens)[:max_length]
    check_calibration(len(tokens), topk, sim_threshold, stable_threshold)
    pre, dec, gen = record_sets(params, cfg, tokens, topk=topk, max_new_tokens=max_new_tokens, progress=progress)
    fitted = {}
    if max_full_fraction is not None:
        fitted = {"max_full_fraction": max_full_fraction, "sim_threshold_requested": sim_threshold}
        sim_threshold = fit_sim_threshold(pre, dec, max_full_fraction=max_full_fraction, sim_threshold=sim_threshold,
                                          stable_threshold=stable_threshold)
    roles, stab, weights, clusters = classify(pre, dec, sim_threshold=sim_threshold,
                                              stable_threshold=stable_threshold)
    return Profile(
        model={"name": name, "fingerprint": model_fingerprint(cfg), "weights_sha256": weights_digest(params)},
        params={
            "max_length": max_length, "topk": topk, "max_new_tokens": max_new_tokens,
            "decode_steps_recorded": int(len(dec)), "prompt_tokens": len(tokens),
            "sim_threshold": sim_threshold, "stable_threshold": stable_threshold,
            "pool_kernel": 5, "group_reduce": "mean", "similarity_step": "prefill",
            "scores": "softmax over all keys, last query row, restricted to the prompt",
            "weight_eps": EPS, "calibration": calibration or {}, "generated_ids": gen, **fitted,
        },
        roles=roles, stability=stab, weights=weights, clusters=clusters,
    )


def check_calibration(n: int, topk: int, sim_threshold: float, stable_threshold: float) -> None:
    """Refuse settings whose roles would mean nothing: too few tokens, or top-k sets so large that
    two random sets already overlap (by topk / n on average) as much as the thresholds ask."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if n < MIN_CALIBRATION_TOKENS:
        raise ValueError(f"calibration text has {n} tokens (after --max-length); profiling needs at least "
                         f"{MIN_CALIBRATION_TOKENS} -- use a longer text, e.g. the shipped default")
    limit = min([t for t in (sim_threshold, stable_threshold) if t > 0], default=1.0)
    if topk >= limit * n:
        raise ValueError(
            f"topk={topk} is {topk / n:.0%} of the {n} calibration tokens: two random top-k sets already overlap "
            f"that much on average, at or above the threshold {limit}, so every head would look stable and "
            f"similar; use topk < {int(limit * n)} (the reference uses ~20%) or a longer text"
        )


def calibration_tokens(tokenizer, path: Path = CALIBRATION_TEXT) -> tuple[list[int], dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration text {path} is {'a folder' if path.is_dir() else 'missing'}; pass a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"calibration text {path} is not UTF-8 (byte {e.start}); pass a UTF-8 text file") from e
    ids = tokenizer.encode(text)
    info = {"file": Path(path).name, "sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": len(ids)}
    if Path(path) == CALIBRATION_TEXT:
        info["credit"] = "Python Language Reference (PSF License v2); see hetero_jax/data/CREDITS.md"
    return ids, info


def main(argv=None) -> int:
    """``hetero-jax profile``: profile a model on the shipped calibration text, write JSON."""
    ap = argparse.ArgumentParser(prog="hetero-jax profile", description=main.__doc__)
    ap.add_argument("--model", default="default", help="model name or path, as for `hetero-jax generate`")
    ap.add_argument("--out", required=True, help="where to write the profile JSON")
    ap.add_argument("--text", default=str(CALIBRATION_TEXT), help="calibration text file (default: shipped)")
    ap.add_argument("--max-length", type=int, default=None, help="prompt tokens (default: min(5000, context/2))")
    ap.add_argument("--topk", type=int, default=None, help="top-k set size (default: 20.48%% of max-length)")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--sim-threshold", type=float, default=0.5)
    ap.add_argument("--stable-threshold", type=float, default=0.5)
    ap.add_argument("--max-full-fraction", type=float, default=None,
                    help="fit the profile to the model: choose the similarity threshold nearest --sim-threshold whose "
                    "full heads F/N stay <= this (the ratio must exceed F/N), e.g. 0.3")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    for name in ("max_length", "topk", "max_new_tokens"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a folder; give the profile's file name (e.g. "
                         f"{Path(a.out) / 'profile.json'})")
    import convert  # loading checkpoints is the command's business, not the profiling math's

    m = convert.load_model(a.model)
    if m.tokenizer is None:
        raise ValueError(f"{m.path} has no tokenizer, so the calibration text cannot be tokenized; convert the "
                         "model from a source with a tokenizer")
    ids, info = calibration_tokens(m.tokenizer, Path(a.text))
    prof = profile_model(
        m.params, m.cfg, ids, name=Path(str(m.path)).name if a.model == "default" else str(a.model),
        max_length=a.max_length, topk=a.topk,
        max_new_tokens=a.max_new_tokens, sim_threshold=a.sim_threshold, stable_threshold=a.stable_threshold,
        calibration=info, progress=not a.no_progress, max_full_fraction=a.max_full_fraction,
    )
    save_profile(prof, a.out)
    c = prof.counts()
    print(f"wrote {a.out}: {c['pivot']} pivot, {c['satellite']} satellite, {c['anchor']} anchor, "
          f"{c['volatile']} volatile; F = {c['full']}/{c['total']} -> ratio must exceed {c['full'] / c['total']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
