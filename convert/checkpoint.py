"""Our converted-model folder: convert once (slow: parse, dequantize, transpose), load fast after.

Layout of a converted folder::

    config.json      LlamaConfig.to_dict()
    params/          orbax checkpoint of the params pytree (convert.params layout)
    tokenizer.json, tokenizer_config.json, ...   tokenizer.save_pretrained (when the source has one)
    meta.json        written last: source, sha256 of the source files, dtype, version

The folder is built in a temp sibling and renamed into place, so it is either complete or absent;
a folder with ``params/`` but no ``meta.json`` can only come from a copy or a crash and is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

import convert.default_model as default_model
from convert.common import ConvertError, as_dtype, atomic_dir, existing_path, sha256_file
from convert.config import ConfigError, LlamaConfig
from convert.from_gguf import GGUF_MAGIC, load_gguf
from convert.hf import INDEX_FILE, load_hf, safetensors_files
from convert.params import abstract_params
from convert.tokenizer import TOKENIZER_FILES, load_tokenizer

FORMAT = "hetero-jax-converted"
FORMAT_VERSION = 1
META_FILE = "meta.json"
PARAMS_DIR = "params"


@dataclasses.dataclass
class LoadedModel:
    """What ``load_model`` returns: everything needed to run and to tokenize."""

    cfg: LlamaConfig
    params: dict
    tokenizer: Any  # a transformers tokenizer, or None when the source had none
    path: Path


def _version() -> str:
    try:
        return metadata.version("hetero-jax")
    except metadata.PackageNotFoundError:
        return "unknown"


def save_params(params, path) -> Path:
    """Write the params pytree as an orbax checkpoint at ``path`` (a folder that must not exist)."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()
    if path.exists():
        raise ConvertError(f"{path} already exists; remove it or choose another path for the checkpoint")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params)
        ckpt.wait_until_finished()
    return path


def restore_params(path, cfg: LlamaConfig, dtype="float32") -> dict:
    """Read params saved by ``save_params`` into exactly the ``abstract_params(cfg)`` structure.

    Values are bit-exact when ``dtype`` is the stored one (orbax casts otherwise).
    """
    import orbax.checkpoint as ocp

    path = existing_path(path, "convert the model first (convert.convert)").absolute()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract_params(cfg, as_dtype(dtype))
    )
    try:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(path, target)
    except Exception as e:  # orbax raises ValueError/KeyError/FileNotFoundError/... for a bad checkpoint
        raise ConvertError(
            f"{path}: cannot restore params ({type(e).__name__}: {str(e)[:300]}); the checkpoint is damaged "
            "or does not match config.json -- delete the folder and convert again"
        ) from e


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _load_source(src: Path, dtype, progress):
    """(kind, cfg, params, tokenizer, files that define the source) for an HF folder or a GGUF."""
    if src.is_file():
        cfg, params, tok = load_gguf(src, dtype, progress)
        return "gguf", cfg, params, tok, [src]
    if (src / META_FILE).is_file():
        raise ConvertError(f"{src} is already a converted hetero-jax folder; load it with load_model")
    cfg, params = load_hf(src, dtype, progress)
    tok = load_tokenizer(src)
    extra = [src / n for n in ("config.json", "generation_config.json", INDEX_FILE, *TOKENIZER_FILES)]
    return "hf", cfg, params, tok, [p for p in extra if p.is_file()] + safetensors_files(src)[0]


def convert(src, dst, dtype="float32", overwrite=False, progress=None) -> Path:
    """Convert an HF folder or a .gguf file into a hetero-jax folder at ``dst``; returns ``dst``."""
    src = existing_path(src, "pass an HF model folder (config.json + *.safetensors) or a .gguf file")
    dst = Path(dst).expanduser()
    dt = as_dtype(dtype)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ConvertError(f"{dst}: the destination is the source itself; choose another destination")
    with atomic_dir(dst, overwrite) as tmp:
        kind, cfg, params, tok, files = _load_source(src, dt, progress)
        (tmp / "config.json").write_text(cfg.to_json())
        save_params(params, tmp / PARAMS_DIR)
        if tok is not None:
            tok.save_pretrained(str(tmp))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": str(src.resolve()),
            "source_kind": kind,
            "source_sha256": {str(p.relative_to(src)) if kind == "hf" else p.name: sha256_file(p) for p in files},
            "dtype": dt.name,
            "hetero_jax_version": _version(),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: the "complete" marker
    return dst


def ensure_default_model(progress=None) -> Path:
    """The converted default model folder; fetched and converted on first use, reused after."""
    dst = default_model.default_model_dir()
    if not default_model.is_converted(dst):
        default_model.locked(_convert_default, dst, progress)
    return dst


def _convert_default(dst: Path, progress) -> None:
    if not default_model.is_converted(dst):  # another process may have finished while we waited for the lock
        convert(default_model.fetch_gguf(progress), dst, dtype="float32", overwrite=True, progress=progress)


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{folder / META_FILE}: unreadable ({e}); delete {folder} and convert again") from e
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ConvertError(
            f"{folder}: format {meta.get('format')!r} v{meta.get('format_version')} is not {FORMAT!r} "
            f"v{FORMAT_VERSION}; convert the model again with this version"
        )
    return meta


def _load_converted(path: Path, dtype) -> LoadedModel:
    meta = read_meta(path)
    try:
        cfg = LlamaConfig.from_dict(json.loads((path / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, ConfigError, TypeError) as e:
        raise ConvertError(f"{path / 'config.json'}: unreadable ({e}); delete {path} and convert again") from e
    params = restore_params(path / PARAMS_DIR, cfg, dtype or meta["dtype"])
    return LoadedModel(cfg, params, load_tokenizer(path, converted=True), path)


def load_model(spec, dtype=None, progress=None) -> LoadedModel:
    """Load a converted folder, an HF folder, a .gguf file, or "default" (fetched on first use).

    ``dtype`` None keeps a converted folder's stored dtype and loads other sources as float32.
    """
    if dtype is not None:
        as_dtype(dtype)  # a typo should fail before a long download or load
    if isinstance(spec, str) and spec == "default":
        spec = ensure_default_model(progress=progress)
    path = existing_path(spec, "pass a converted folder, an HF model folder, a .gguf file or 'default'")
    if path.is_file():
        if not _is_gguf(path):
            raise ConvertError(f"{path}: not a GGUF file; pass a .gguf file or a model folder")
        cfg, params, tok = load_gguf(path, dtype or "float32", progress)
        return LoadedModel(cfg, params, tok, path)
    if (path / META_FILE).is_file():
        return _load_converted(path, dtype)
    if (path / PARAMS_DIR).exists():
        raise ConvertError(
            f"{path}: has {PARAMS_DIR}/ but no {META_FILE}, so the conversion never finished (or the folder "
            "was copied partly); delete the folder and convert again"
        )
    if (path / "config.json").is_file():
        cfg, params = load_hf(path, dtype or "float32", progress)
        return LoadedModel(cfg, params, load_tokenizer(path), path)
    raise ConvertError(
        f"{path}: neither a converted hetero-jax folder ({META_FILE}), an HF model folder (config.json) "
        "nor a .gguf file"
    )
