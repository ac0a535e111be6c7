"""HeteroCache head profiles: the JSON file format, model fingerprints, and budget formulas.

A profile says, per layer and KV head, which role the head plays (pivot / satellite / anchor /
volatile), its temporal stability and its budget weight. It is made once per model by
``hetero_jax.profiling`` and read by the ``hetero`` cache policy. The budget formulas live here
(not in the policy) so the profile tool, the policy and the tests share one definition.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from convert.config import LlamaConfig
from convert.interrupts import cleanup_pending

FORMAT = "hetero-jax-profile"
VERSION = 1
ROLES = ("pivot", "satellite", "anchor", "volatile")
FULL_ROLES = ("pivot", "volatile")  # keep the whole prompt on device
# Config fields that define "the same model" for a profile (weights are checked when given).
FINGERPRINT_FIELDS = (
    "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size",
    "vocab_size", "rope_theta", "max_position_embeddings",
)
PROFILES_DIR = Path(__file__).parent / "profiles"
FITTED_DIR = PROFILES_DIR / "fitted"


class ProfileError(ValueError):
    """A profile file that is malformed, of another version, or made for another model."""


def model_fingerprint(cfg: LlamaConfig) -> dict:
    return {f: getattr(cfg, f) for f in FINGERPRINT_FIELDS}


def weights_digest(params) -> str:
    """sha256 over a few weight tensors: tells apart two checkpoints of one architecture."""
    h = hashlib.sha256()
    layers = params["layers"]
    for x in (params["embed"][:64], layers[0]["wk"], layers[-1]["wv"]):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # sharded over hosts: gather it first
            x = jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, PartitionSpec()))(x)
        h.update(np.ascontiguousarray(np.asarray(x, np.float32)).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Profile:
    """Roles per layer (tuples of role names, one per KV head) and everything that made them."""

    model: dict  # {"name", "fingerprint", "weights_sha256"}
    params: dict  # every profiling parameter used
    roles: tuple  # (layers, Hkv) role names
    stability: tuple  # (layers, Hkv) median prefill/decode overlap
    weights: tuple  # (layers, Hkv) budget weight of compressed heads, None for full heads
    clusters: tuple  # per layer: ((pivot, (satellite, ...)), ...)

    # ------------------------------------------------------------ derived numbers
    @property
    def num_heads(self) -> int:
        return sum(len(r) for r in self.roles)

    @property
    def num_full(self) -> int:
        return sum(role in FULL_ROLES for r in self.roles for role in r)

    def counts(self) -> dict:
        c = {role: sum(x == role for r in self.roles for x in r) for role in ROLES}
        c["full"] = self.num_full
        c["total"] = self.num_heads
        return c

    def is_full(self, layer: int, head: int) -> bool:
        return self.roles[layer][head] in FULL_ROLES

    # ------------------------------------------------------------ checks
    def check_model(self, cfg: LlamaConfig, params=None) -> None:
        """Refuse a profile made for another model (architecture, or weights when given)."""
        want = model_fingerprint(cfg)
        have = self.model.get("fingerprint", {})
        diff = [f"{k}: profile {have.get(k)!r} vs model {v!r}" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise ProfileError(
                f"profile was made for another model ({self.model.get('name', '?')}): {'; '.join(diff)}. "
                "Make one for this model with `hetero-jax profile --model ... --out PROFILE.json`."
            )
        sha = self.model.get("weights_sha256")
        if params is not None and sha and weights_digest(params) != sha:
            raise ProfileError(
                f"profile was made for other weights of this architecture ({self.model.get('name', '?')}); "
                "make one for these weights with `hetero-jax profile`"
            )

    def check_ratio(self, ratio: float) -> None:
        n, f = self.num_heads, self.num_full
        if not (isinstance(ratio, (int, float)) and (f / n < ratio <= 1.0 or ratio == 1.0)):
            raise ValueError(
                f"ratio must be in (F/N, 1] = ({f}/{n}, 1] = ({f / n:.4f}, 1] for this profile "
                f"({f} full heads of {n}); got {ratio!r}. Below F/N the full heads alone exceed the budget."
            )

    # ------------------------------------------------------------ budgets (REFERENCE.md section 2)
    def base_budget(self, ratio: float, length: int) -> int:
        """base = int((r*N - F) * L / (N - F)); r = 1 keeps everything (base = L)."""
        n, f = self.num_heads, self.num_full
        if ratio >= 1.0 or n == f:
            return int(length)
        return int((ratio * n - f) * length / (n - f))

    def head_budget(self, layer: int, head: int, ratio: float, length: int) -> int:
        """Prompt tokens head (layer, head) keeps: L for full heads, min(int(base * w), L) else."""
        if ratio >= 1.0 or self.is_full(layer, head):
            return int(length)
        return min(int(self.base_budget(ratio, length) * self.weights[layer][head]), int(length))

    def budgets(self, ratio: float, length: int) -> np.ndarray:
        """(layers, Hkv) prompt tokens kept per head for a prompt of ``length`` tokens."""
        return np.array(
            [[self.head_budget(l, h, ratio, length) for h in range(len(r))] for l, r in enumerate(self.roles)],
            np.int64,
        )

    # ------------------------------------------------------------ JSON
    def to_json_dict(self) -> dict:
        layers = []
        for l, roles in enumerate(self.roles):
            layers.append({
                "layer": l,
                "roles": list(roles),
                "stability": [round(float(s), 6) for s in self.stability[l]],
                "weights": [None if w is None else float(w) for w in self.weights[l]],
                "clusters": {str(p): list(s) for p, s in self.clusters[l]},
            })
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "params": self.params,
            "counts": self.counts(),
            "layers": layers,
        }

    @classmethod
    def from_json_dict(cls, d: dict, source: str = "profile") -> "Profile":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ProfileError(f"{source} is not a hetero-jax profile (missing \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise ProfileError(
                f"{source} has profile version {d.get('version')!r}; this hetero-jax reads version {VERSION}. "
                "Re-run `hetero-jax profile` to make a current one."
            )
        try:
            layers = sorted(d["layers"], key=lambda x: x["layer"])
            roles = tuple(tuple(x["roles"]) for x in layers)
            stab = tuple(tuple(float(s) for s in x["stability"]) for x in layers)
            weights = tuple(tuple(None if w is None else float(w) for w in x["weights"]) for x in layers)
            clusters = tuple(
                tuple(sorted((int(p), tuple(int(s) for s in sats)) for p, sats in x["clusters"].items()))
                for x in layers
            )
            if not isinstance(d["model"], dict) or not isinstance(d["params"], dict):
                raise TypeError('"model" and "params" must be JSON objects')
            prof = cls(model=d["model"], params=d["params"], roles=roles, stability=stab, weights=weights,
                       clusters=clusters)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileError(f"{source} is malformed: {type(e).__name__}: {e}") from e
        prof.validate(source)
        return prof

    def validate(self, source: str = "profile") -> None:
        """Internal consistency: shapes agree, roles known, clusters name existing heads and match
        the roles, weights where compressed."""
        n = len(self.roles)
        if not n:
            raise ProfileError(f"{source}: has no layers")
        for name, rows in (("stability", self.stability), ("weights", self.weights), ("clusters", self.clusters)):
            if len(rows) != n:
                raise ProfileError(f"{source}: {n} layers of roles but {len(rows)} of {name}")
        for l, roles in enumerate(self.roles):
            heads = len(roles)
            if heads != len(self.roles[0]):
                raise ProfileError(f"{source}: layer {l} has {heads} heads, layer 0 has {len(self.roles[0])}")
            if len(self.stability[l]) != heads or len(self.weights[l]) != heads:
                raise ProfileError(f"{source}: layer {l} has {heads} roles but {len(self.stability[l])} stability "
                                   f"and {len(self.weights[l])} weight values")
            bad = [r for r in roles if r not in ROLES]
            if bad:
                raise ProfileError(f"{source}: layer {l} has unknown roles {bad}; known: {ROLES}")
            named = [h for p, ss in self.clusters[l] for h in (p, *ss)]
            outside = sorted({h for h in named if not 0 <= h < heads})
            if outside:
                raise ProfileError(f"{source}: layer {l} clusters name head(s) {outside}, but the layer has {heads} "
                                   f"heads (0..{heads - 1})")
            if len(named) != len(set(named)):
                raise ProfileError(f"{source}: layer {l} clusters name a head twice")
            sats = {s for _, ss in self.clusters[l] for s in ss}
            pivots = {p for p, _ in self.clusters[l]}
            for h, r in enumerate(roles):
                if (r == "pivot") != (h in pivots) or (r == "satellite") != (h in sats):
                    raise ProfileError(f"{source}: layer {l} head {h} role {r!r} disagrees with its clusters")
                w = self.weights[l][h]
                if (r in FULL_ROLES) != (w is None) or (w is not None and not 0 < w < math.inf):
                    raise ProfileError(f"{source}: layer {l} head {h} ({r}) has budget weight {w!r}")


def save_profile(profile: Profile, path) -> Path:
    """Write atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = profile.to_json_dict()
    layers = d.pop("layers")  # one line per layer: readable and diffable
    text = json.dumps(d, indent=1)[:-2] + ',\n "layers": [\n' + ",\n".join("  " + json.dumps(x) for x in layers)
    text += "\n ]\n}\n"
    with cleanup_pending():
        _write_atomic(path, text)
    return path


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_profile(path) -> Profile:
    path = Path(path)
    if path.is_dir():
        raise ProfileError(f"profile {path} is a folder; pass the profile's .json file")
    if not path.is_file():
        raise ProfileError(f"profile file {path} does not exist; make one with `hetero-jax profile --out {path}`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"profile file {path} is not UTF-8 text (byte {e.start}); pass a profile .json file") from e
    except OSError as e:
        raise ProfileError(f"profile file {path}: cannot read it ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile file {path} is not valid JSON: {e}") from e
    return Profile.from_json_dict(d, source=str(path))


def shipped_profile(cfg: LlamaConfig, fitted: bool = False) -> Profile:
    """The profile shipped with the package whose fingerprint matches ``cfg``; ``fitted``: the one
    profiled with ``--max-full-fraction`` (profiles/fitted/, the ``hetero_fit`` policy's default)."""
    want = model_fingerprint(cfg)
    found = []
    for p in sorted((FITTED_DIR if fitted else PROFILES_DIR).glob("*.json")):
        prof = load_profile(p)
        found.append(prof.model.get("name", p.stem))
        if prof.model.get("fingerprint") == want:
            return prof
    kind, how = ("fitted ", " --max-full-fraction 0.05") if fitted else ("", "")
    raise ProfileError(
        f"no shipped {kind}HeteroCache profile matches this model (shipped: {', '.join(found) or 'none'}); "
        f"make one with `hetero-jax profile --model ...{how} --out PROFILE.json` and pass profile=PROFILE.json "
        "(CLI: --profile)"
    )


def as_profile(profile: Any, cfg: LlamaConfig, fitted: bool = False) -> Profile:
    """None (shipped default, ``fitted`` or not), a path, a JSON dict or a Profile -> a Profile
    checked against ``cfg``."""
    if profile is None:
        prof = shipped_profile(cfg, fitted)
    elif isinstance(profile, Profile):
        prof = profile
    elif isinstance(profile, dict):
        prof = Profile.from_json_dict(profile)
    elif isinstance(profile, (str, os.PathLike)):
        prof = load_profile(profile)
    else:
        raise ProfileError(f"profile must be None, a path, a dict or a Profile; got {type(profile).__name__}")
    if len(prof.roles) != cfg.num_layers or any(len(r) != cfg.num_kv_heads for r in prof.roles):
        prof.check_model(cfg)  # names the differing fields
        raise ProfileError(f"profile has {len(prof.roles)} layers x {len(prof.roles[0])} KV heads; "
                           f"model has {cfg.num_layers} x {cfg.num_kv_heads}")
    prof.check_model(cfg)
    return prof
