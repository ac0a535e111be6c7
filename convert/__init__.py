"""Model conversion: HF safetensors folders and llama.cpp GGUF files -> the params pytree.

Convert once into a folder (orbax params + config + tokenizer), load fast after; or load a
source directly. ``load_model("default")`` fetches SmolLM2-135M-Instruct on first use. The model's
definition lives here too (``convert.config``, ``convert.params``): what conversion produces and
``hetero_jax`` consumes; this package imports nothing from ``hetero_jax``.
"""

from convert.checkpoint import LoadedModel, convert, ensure_default_model, load_model, restore_params, save_params
from convert.common import ConvertError
from convert.default_model import default_gguf_path, model_home
from convert.from_gguf import load_gguf
from convert.hf import load_hf
from convert.tokenizer import tokenizer_from_gguf

__all__ = [
    "ConvertError",
    "LoadedModel",
    "convert",
    "default_gguf_path",
    "ensure_default_model",
    "load_gguf",
    "load_hf",
    "load_model",
    "model_home",
    "restore_params",
    "save_params",
    "tokenizer_from_gguf",
]
