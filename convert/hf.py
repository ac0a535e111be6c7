"""Load a Hugging Face Llama or Qwen2 folder (config.json + safetensors, single or sharded) into our params.

HF stores linear weights ``(out, in)``; our layout (``convert.params``) is ``(in, out)``, so
matrices are transposed here, once. Every name, shape and file problem is reported by name, since
a silently wrong weight shows up only as bad text much later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from convert.common import ConvertError, as_dtype, existing_path, want_progress
from convert.config import ConfigError, LlamaConfig
from convert.params import check_params, param_shapes

# our per-layer key -> HF name inside ``model.layers.{i}.``
LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "bq": "self_attn.q_proj.bias",  # Qwen2 only (cfg.qkv_bias)
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
INDEX_FILE = "model.safetensors.index.json"


def hf_tensor_map(cfg: LlamaConfig) -> dict[str, tuple[tuple, tuple[int, ...], bool]]:
    """HF tensor name -> (path in our params, our shape, transpose?) for every tensor we need."""
    shapes = param_shapes(cfg)
    out = {
        "model.embed_tokens.weight": (("embed",), shapes["embed"], False),
        "model.norm.weight": (("final_norm",), shapes["final_norm"], False),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head",), shapes["lm_head"], True)
    for i, layer in enumerate(shapes["layers"]):
        for key in layer:
            out[f"model.layers.{i}.{LAYER_NAMES[key]}"] = (("layers", i, key), layer[key], len(layer[key]) == 2)
    return out


def _ignorable(name: str, cfg: LlamaConfig) -> bool:
    """Tensors some checkpoints carry that hold nothing we need."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def _summary(names: Iterable[str], n: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def assemble_params(
    cfg: LlamaConfig,
    tensors: dict[str, Callable[[], np.ndarray]],
    dtype,
    source: str,
    progress=None,
    label: Callable[[str], str] = str,
) -> dict:
    """Build the params pytree from HF-named, HF-shaped tensors (name -> a function reading it).

    Checks names before reading anything, so a bad file fails fast and by name; ``label`` turns an
    HF name into the name the user's file uses (for GGUF messages).
    """
    dt = as_dtype(dtype)
    wanted = hf_tensor_map(cfg)
    missing = set(wanted) - set(tensors)
    unexpected = {n for n in set(tensors) - set(wanted) if not _ignorable(n, cfg)}
    if missing:
        raise ConvertError(
            f"{source}: missing tensors {_summary(map(label, missing))}; the checkpoint is incomplete or does not "
            "match its config (num_hidden_layers, tie_word_embeddings) -- fetch the complete model"
        )
    if unexpected:
        raise ConvertError(
            f"{source}: unexpected tensors {_summary(map(label, unexpected))}; this is not a plain Llama or Qwen2 "
            "checkpoint (other biases, extra heads or another architecture are not supported)"
        )
    params = {"layers": [{} for _ in range(cfg.num_layers)]}
    bar = tqdm(wanted.items(), desc="converting tensors", unit="tensor", disable=not want_progress(progress))
    for name, (path, shape, transpose) in bar:
        x = np.asarray(tensors[name]())
        hf_shape = tuple(shape[::-1]) if transpose else tuple(shape)
        if x.shape != hf_shape:
            raise ConvertError(
                f"{source}: tensor {label(name)} has shape {x.shape}, expected {hf_shape} from the config; "
                "the weights and config.json do not belong together"
            )
        check_finite_array(x, f"{source}: tensor {label(name)}")
        leaf = jnp.asarray(x.T if transpose else x, dtype=dt)
        node = params
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = leaf
    try:
        check_params(params, cfg)
    except ValueError as e:  # a bug here rather than in the input, but still say what went wrong
        raise ConvertError(f"{source}: {e}") from e
    return params


def check_finite_array(x: np.ndarray, what: str) -> None:
    """NaN or inf in a weight would only show later as empty text or token 0: refuse it by name."""
    if np.issubdtype(x.dtype, np.integer) or np.isfinite(x.min()) and np.isfinite(x.max()):  # no temp array
        return
    bad = ~np.isfinite(x)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ConvertError(f"{what} has {int(bad.sum())} non-finite value(s) (NaN or inf; the first at index {first}); "
                       "the checkpoint is corrupt -- download it again")


# config.json fields that must be positive integers when present (0 heads divides by zero later)
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")


def _check_sizes(hf: dict, cfg_file: Path) -> None:
    for key in SIZE_FIELDS:
        v = hf.get(key)
        if v is None and key in ("num_key_value_heads", "head_dim"):
            continue  # optional: default from num_attention_heads / hidden_size
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
            raise ConvertError(f"{cfg_file}: {key} must be a positive integer, got {v!r}")


def read_hf_config(path: Path) -> LlamaConfig:
    """LlamaConfig (Llama or Qwen2 family) from ``config.json`` (+ eos ids from ``generation_config.json`` if present)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{path}: no config.json; an HF model folder needs config.json next to its *.safetensors")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{cfg_file}: not valid JSON ({e}); download the model again") from e
    if not isinstance(hf, dict):
        raise ConvertError(f"{cfg_file}: holds a JSON {type(hf).__name__}, not an object; is this a transformers "
                           "config.json?")
    _check_sizes(hf, cfg_file)
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConvertError(f"{cfg_file}: Llama variants with attention/MLP biases are not supported")
    try:
        cfg = LlamaConfig.from_hf(hf)
    except ConfigError as e:
        raise ConvertError(f"{cfg_file}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{cfg_file}: missing or invalid field {e}; is this a transformers Llama or Qwen2 config?") from e
    gen_file = path / "generation_config.json"
    if gen_file.is_file():  # instruct models list their end-of-turn tokens here
        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError):
            eos = None
        eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *(int(e) for e in eos)]))
        cfg = dataclasses.replace(cfg, eos_token_ids=merged)
    return cfg


def safetensors_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of an HF folder, and the index's name -> file map when sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError, AttributeError) as e:
            raise ConvertError(f"{index}: unreadable shard index ({e}); download the model again") from e
        outside = [f for f in names if not isinstance(f, str) or Path(f).is_absolute() or ".." in Path(f).parts]
        if outside:
            raise ConvertError(f"{index}: names shard files outside the model folder ({_summary(map(str, outside))}); "
                               "refusing to read them -- shards must sit inside the model folder")
        files = [path / f for f in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConvertError(f"{path}: shard files {_summary(absent)} named in {INDEX_FILE} are missing; download them")
        return files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.gguf")]
        hint = f" (found {_summary(other)}: re-save with safe_serialization=True, or pass a .gguf file itself)" if other else ""
        raise ConvertError(f"{path}: no *.safetensors weights{hint}")
    return files, None


def load_hf(path, dtype="float32", progress=None) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, params) from an HF Llama or Qwen2 folder; weights cast to ``dtype``."""
    path = existing_path(path, "pass an HF model folder (config.json + *.safetensors)")
    if not path.is_dir():
        raise ConvertError(f"{path}: not a folder; load_hf takes an HF model folder (use load_gguf for .gguf files)")
    cfg = read_hf_config(path)
    files, weight_map = safetensors_files(path)
    with contextlib.ExitStack() as stack:
        tensors: dict[str, Callable[[], np.ndarray]] = {}
        for f in files:
            try:
                handle = stack.enter_context(safe_open(str(f), framework="flax"))
                keys = list(handle.keys())
            except (SafetensorError, OSError) as e:
                raise ConvertError(f"{f}: truncated or corrupt safetensors file ({e}); download it again") from e
            for k in keys:
                if k in tensors:
                    raise ConvertError(f"{path}: tensor {k} appears in more than one safetensors file")
                tensors[k] = lambda h=handle, k=k, f=f: _read(h, k, f)
        if weight_map is not None:
            lost = [n for n, f in weight_map.items() if n not in tensors]
            if lost:
                raise ConvertError(f"{path}: {INDEX_FILE} lists {_summary(lost)} but no shard holds them; download again")
        params = assemble_params(cfg, tensors, dtype, str(path), progress)
    return cfg, params


def _read(handle, key: str, f: Path) -> np.ndarray:
    try:
        return np.asarray(handle.get_tensor(key))
    except (SafetensorError, OSError) as e:
        raise ConvertError(f"{f}: cannot read tensor {key} ({e}); the file is corrupt, download it again") from e
