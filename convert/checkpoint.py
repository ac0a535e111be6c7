"""Our converted-model folder: convert once (slow: parse, dequantize, transpose), load fast after.

Layout of a converted folder::

    config.json      LlamaConfig.to_dict()
    params/          orbax checkpoint of the params pytree (convert.params layout)
    tokenizer.json, tokenizer_config.json, ...   tokenizer.save_pretrained (when the source has one)
    meta.json        written last: source, sha256 of the source files and of every file above, dtype, version

The folder is built in a temp sibling and renamed into place, so it is either complete or absent;
a folder with ``params/`` but no ``meta.json`` can only come from a copy or a crash and is refused.
Loading checks every file against its sha256 (a flipped byte would otherwise load as a different
weight: orbax checksums only its shard index) and that every weight is finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import convert.default_model as default_model
from convert.common import ConvertError, as_dtype, atomic_dir, existing_path, sha256_file, signals_deferred
from convert.config import ConfigError, LlamaConfig
from convert.from_gguf import GGUF_MAGIC, load_gguf
from convert.interrupts import cleanup_pending
from convert.hf import INDEX_FILE, load_hf, safetensors_files
from convert.params import abstract_params, param_shapes
from convert.sharding import make_mesh, param_shardings, shard_params
from convert.tokenizer import TOKENIZER_FILES, load_tokenizer

FORMAT = "hetero-jax-converted"
FORMAT_VERSION = 1
META_FILE = "meta.json"
PARAMS_DIR = "params"
CHECKSUMS = "files_sha256"  # meta.json key: relative path -> sha256 of every file but meta.json

log = logging.getLogger("hetero_jax")


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
    path = Path(path).expanduser().absolute()
    if path.exists():
        raise ConvertError(f"{path} already exists; remove it or choose another path for the checkpoint")
    try:
        _orbax_save(params, path)
    except Exception as e:  # orbax/tensorstore raise ValueError/RuntimeError/OSError with long dumps
        raise ConvertError(f"cannot write the checkpoint {path}: {short_reason(e)}") from e
    return path


def _orbax_save(params, path: Path) -> None:
    import orbax.checkpoint as ocp

    # orbax writes from background threads: a signal waits until they are done, so the caller's
    # cleanup never removes a folder that is still being written (which left it behind)
    with signals_deferred(), ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params)
        ckpt.wait_until_finished()


def short_reason(e: BaseException) -> str:
    """One readable line for an OSError or a tensorstore error (which can run to hundreds of lines)."""
    text = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else str(e)
    low = text.lower()
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "no space left" in low or "resource_exhausted" in low:
        return "no space left on the device; free some space and try again"
    if (isinstance(e, OSError) and e.errno == errno.EFBIG) or "file too large" in low:
        return "file too large for this file system or the file-size limit (ulimit -f)"
    line = text.split("See full TensorStore details")[0].strip().splitlines()
    line = line[0] if line else type(e).__name__
    return line if len(line) <= 240 else line[:240] + "..."


@contextlib.contextmanager
def _writing(dst: Path):
    """Errors while writing the output (disk full, read-only, orbax failures) become one line naming
    the destination rather than its temp folder."""
    try:
        yield
    except ConvertError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise ConvertError(f"cannot write {dst}: {short_reason(e)}") from e


def restore_params(path, cfg: LlamaConfig, dtype="float32",
                   remedy: str = "delete the folder and convert again", mesh=None) -> dict:
    """Read params saved by ``save_params`` into exactly the ``abstract_params(cfg)`` structure.

    Values are bit-exact when ``dtype`` is the stored one (orbax casts otherwise). With ``mesh``
    each leaf is restored straight into its tensor-parallel layout (``convert.sharding``): every
    process reads only the shards its devices hold.
    """
    import orbax.checkpoint as ocp

    path = existing_path(path, "convert the model first (convert.convert)").absolute()
    if mesh is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), param_shapes(cfg),
                                 is_leaf=lambda x: isinstance(x, tuple))
    else:
        shardings = param_shardings(cfg, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract_params(cfg, as_dtype(dtype)), shardings)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(path, target)
    except Exception as e:  # orbax raises ValueError/KeyError/FileNotFoundError/... for a bad checkpoint
        raise ConvertError(
            f"{path}: cannot restore params ({short_reason(e)}); the checkpoint is damaged or does not match "
            f"config.json -- {remedy}"
        ) from e


# ---------------------------------------------------------------------------- integrity
def folder_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but its meta.json, keyed by relative posix path."""
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {rel: sha256_file(folder / rel) for rel in rels if rel != META_FILE}


def verify_folder(folder: Path, meta: dict | None = None, remedy: str | None = None) -> bool:
    """Check every file of a converted folder against the sha256 written at conversion.

    Returns False (nothing to check) for folders converted before checksums existed. Costs one
    read + sha256 of the folder (about 0.2 s for the default model's 337 MB on one core).
    """
    folder = Path(folder)
    meta = read_meta(folder) if meta is None else meta
    remedy = remedy or f"delete {folder} and convert again"
    sums = meta.get(CHECKSUMS)
    if not sums:
        return False
    for rel, want in sorted(sums.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ConvertError(f"{folder / META_FILE}: lists {rel!r}, outside the folder; {remedy}")
        path = folder / rel
        if not path.is_file():
            raise ConvertError(f"{path}: missing (it was written at conversion); {remedy}")
        if sha256_file(path) != want:
            raise ConvertError(f"{path}: changed since the conversion (sha256 mismatch: damaged, truncated or "
                               f"edited); {remedy}")
    return True


@jax.jit
def _finite_flags(leaves) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def _is_finite_leaf(x) -> bool:
    """Host arrays: min and max propagate NaN and show inf, with no temp array (~0.05 s for the
    default model's 135M floats on one CPU core)."""
    a = np.asarray(x)
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def check_finite(params, source: str, remedy: str) -> None:
    """Refuse weights with NaN or inf: on CPU a min/max pass over each tensor in place, on an
    accelerator one jitted reduction (no copy to the host)."""
    leaves = jax.tree.leaves(params)
    on_cpu = all(d.platform == "cpu" for x in leaves for d in getattr(x, "devices", lambda: ())()) and all(
        getattr(x, "is_fully_addressable", True) for x in leaves)
    flags = [_is_finite_leaf(x) for x in leaves] if on_cpu else np.asarray(_finite_flags(leaves)).tolist()
    if all(flags):
        return
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    bad = [names[i] for i, ok in enumerate(flags) if not ok]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise ConvertError(f"{source}: non-finite weights (NaN or inf) in params{', params'.join(bad[:5])}{more}; {remedy}")


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


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse destinations whose replacement would delete the source or files that are not ours."""
    s, d = src.resolve(), dst.resolve()
    if s == d or d in s.parents:
        raise ConvertError(f"{dst}: the destination contains the source {src}, which converting would delete; "
                           "choose a destination outside it")
    if not (overwrite and dst.exists()):
        return
    if not dst.is_dir():
        raise ConvertError(f"{dst} is a file; --overwrite replaces only an earlier conversion folder")
    names = sorted(p.name for p in dst.iterdir())
    if names and not ((dst / META_FILE).is_file() or (dst / PARAMS_DIR).is_dir()):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ConvertError(f"{dst} is not a hetero-jax converted folder (it holds {shown}); --overwrite "
                           "replaces only an earlier conversion -- choose another destination")


def convert(src, dst, dtype="float32", overwrite=False, progress=None) -> Path:
    """Convert an HF folder or a .gguf file into a hetero-jax folder at ``dst``; returns ``dst``."""
    src = existing_path(src, "pass an HF model folder (config.json + *.safetensors) or a .gguf file")
    dst = Path(dst).expanduser()
    dt = as_dtype(dtype)
    _check_destination(src, dst, overwrite)
    with atomic_dir(dst, overwrite) as tmp:
        kind, cfg, params, tok, files = _load_source(src, dt, progress)
        with _writing(dst):
            (tmp / "config.json").write_text(cfg.to_json())
        with _writing(dst):
            _orbax_save(params, tmp / PARAMS_DIR)
        if tok is not None:
            with _writing(dst):
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
        with _writing(dst):
            meta[CHECKSUMS] = folder_checksums(tmp)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: the "complete" marker
    return dst


def ensure_default_model(progress=None, verify: bool = False) -> Path:
    """The converted default model folder; fetched and converted on first use, reused after.

    ``verify`` also checks every file against the checksums written at conversion and rebuilds
    a damaged folder (``hetero-jax fetch-default`` does this).
    """
    dst = default_model.default_model_dir()
    if default_model.is_converted(dst) and (not verify or _is_intact(dst)):
        return dst
    return default_model.locked(_fetch_and_convert, dst, progress, verify)


def _is_intact(folder: Path, say: bool = True) -> bool:
    try:
        verify_folder(folder)
    except ConvertError as e:
        if say:
            log.warning("the default model is damaged (%s); rebuilding it", str(e).split(";")[0])
        return False
    return True


def _fetch_and_convert(dst: Path, progress, verify: bool) -> Path:
    # another process may have finished while we waited for the lock
    if not default_model.is_converted(dst) or (verify and not _is_intact(dst, say=False)):
        with cleanup_pending():
            gguf = default_model.fetch_gguf(progress)
        convert(gguf, dst, dtype="float32", overwrite=True, progress=progress)
    return dst


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{folder / META_FILE}: unreadable ({e}); delete {folder} and convert again") from e
    if not isinstance(meta, dict) or not isinstance(meta.get(CHECKSUMS, {}), dict):
        raise ConvertError(f"{folder / META_FILE}: not a hetero-jax meta.json; delete {folder} and convert again")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ConvertError(
            f"{folder}: format {meta.get('format')!r} v{meta.get('format_version')} is not {FORMAT!r} "
            f"v{FORMAT_VERSION}; convert the model again with this version"
        )
    return meta


def _load_converted(path: Path, dtype, remedy: str, mesh) -> LoadedModel:
    meta = read_meta(path)
    if not verify_folder(path, meta, remedy):
        log.warning("%s was converted by an earlier hetero-jax without checksums, so damage cannot be detected; "
                    "convert it again to have it verified", path)
    try:
        raw = json.loads((path / "config.json").read_text())
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a JSON object, got a {type(raw).__name__}")
        cfg = LlamaConfig.from_dict(raw)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, ConfigError, TypeError) as e:
        raise ConvertError(f"{path / 'config.json'}: unreadable ({e}); {remedy}") from e
    params = restore_params(path / PARAMS_DIR, cfg, dtype or meta["dtype"], remedy, mesh)
    cast = dtype is not None and as_dtype(dtype).name != meta["dtype"]
    why = f"they overflow {as_dtype(dtype).name}: load them as {meta['dtype']}" if cast else remedy
    check_finite(params, str(path), why)
    return LoadedModel(cfg, params, load_tokenizer(path, converted=True), path)


def load_model(spec, dtype=None, progress=None, mesh=None) -> LoadedModel:
    """Load a converted folder, an HF folder, a .gguf file, or "default" (fetched on first use).

    ``dtype`` None keeps a converted folder's stored dtype and loads other sources as float32.
    ``mesh`` (a ``jax.sharding.Mesh`` with axes data, model, or a spec like "data=2,model=4"):
    the params come back sharded for tensor parallelism (``convert.sharding``), and ``generate``
    runs on that mesh.
    """
    if dtype is not None:
        as_dtype(dtype)  # a typo should fail before a long download or load
    if mesh is not None:
        mesh = make_mesh(mesh)  # a bad spec or too few devices fail before the load
    model = _load_model(spec, dtype, progress, mesh)
    if mesh is not None and model.params is not None:
        model.params = shard_params(model.params, model.cfg, mesh)  # a no-op for a sharded restore
    return model


def _load_model(spec, dtype, progress, mesh) -> LoadedModel:
    if isinstance(spec, str) and spec == "default":
        spec = ensure_default_model(progress=progress)
    path = existing_path(spec, "pass a converted folder, an HF model folder, a .gguf file or 'default'")
    is_default = path.absolute() == default_model.default_model_dir().absolute()
    remedy = "run `hetero-jax fetch-default` to rebuild it" if is_default else f"delete {path} and convert again"
    if path.is_file():
        if not _is_gguf(path):
            raise ConvertError(f"{path}: not a GGUF file; pass a .gguf file or a model folder")
        cfg, params, tok = load_gguf(path, dtype or "float32", progress)
        return LoadedModel(cfg, params, tok, path)
    if (path / META_FILE).is_file():
        return _load_converted(path, dtype, remedy, mesh)
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
