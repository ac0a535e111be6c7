"""Model configuration: the handful of numbers a Llama-style forward pass needs.

Two families run: Llama (``LlamaForCausalLM``) and Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``), which
is Llama plus biases on the q/k/v projections (``qkv_bias``). Read from a Hugging Face
``config.json`` (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``) or from GGUF
metadata (see ``convert.from_gguf``). Frozen and hashable so it can be a static argument of
jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any


class ConfigError(ValueError):
    """A model configuration that this library cannot run."""


# transformers model_type -> the one architecture class of that family we run
SUPPORTED_HF = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# families whose q/k/v projections carry biases (o_proj and the MLP have none)
QKV_BIAS_FAMILIES = ("qwen2",)


def supported_hf_text() -> str:
    return ", ".join(f"{arch} (model_type {mt!r})" for mt, arch in SUPPORTED_HF.items())


def check_no_sliding_window(hf: dict[str, Any]) -> None:
    """Refuse a config whose layers use sliding-window attention (we compute full causal attention).

    Qwen2 configs carry ``use_sliding_window`` (false in every released Qwen2/2.5 model); windowed
    layers are those listed as such in ``layer_types`` or, without it, layers >= ``max_window_layers``.
    """
    num_layers = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        windowed = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    elif hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        windowed = list(range(int(hf.get("max_window_layers", 28)), num_layers))
    else:
        windowed = []
    if windowed:
        raise ConfigError(
            f"layers {windowed[:4]}{'...' if len(windowed) > 4 else ''} use sliding-window attention "
            f"(sliding_window={hf.get('sliding_window')}); hetero-jax computes full causal attention only -- "
            "set use_sliding_window to false in config.json if the model was trained without it"
        )


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on the q, k, v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings")
        bad = [f"{f}={getattr(self, f)!r}" for f in sizes
               if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), numbers.Integral)
               or getattr(self, f) < 1]
        if bad:
            raise ConfigError(f"sizes must be positive integers: {', '.join(bad)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Bytes of K and V for one token over all layers and KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    # ---------------------------------------------------------------- HF interop
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from a transformers ``config.json`` dict (LlamaForCausalLM or Qwen2ForCausalLM)."""
        model_type = hf.get("model_type", "llama")
        arch = hf.get("architectures") or [SUPPORTED_HF.get(model_type, "?")]
        if model_type not in SUPPORTED_HF or SUPPORTED_HF[model_type] not in arch:
            raise ConfigError(
                f"unsupported architecture {arch} (model_type={model_type!r}); "
                f"hetero-jax runs {supported_hf_text()} only"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; {model_type} models use silu")
        check_no_sliding_window(hf)
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling_src = rope if rope.get("rope_type", "default") != "default" else legacy
        rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default")) if scaling_src else "default"
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src["low_freq_factor"]),
                high_freq_factor=float(scaling_src["high_freq_factor"]),
                original_max_position_embeddings=int(scaling_src["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ConfigError(f"unsupported rope type {rope_type!r}; supported: default, llama3")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type in QKV_BIAS_FAMILIES,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
