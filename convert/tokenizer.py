"""Tokenizers without torch: from a GGUF's metadata, or from a folder saved with save_pretrained.

transformers builds a GGUF tokenizer only through its torch-based GGUF reader. The building
blocks it uses (the metadata -> tokenizer mapping and ``convert_gguf_tokenizer``) need no torch,
so we feed them the metadata read with the ``gguf`` package and get the same tokenizer
(tests compare ids with transformers' own GGUF tokenizer). It is saved once with
``save_pretrained``; from then on ``AutoTokenizer.from_pretrained(folder)`` loads it anywhere.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from convert.common import ConvertError

log = logging.getLogger("hetero_jax")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
            "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
_CONFIG_KEYS = ("chat_template", "add_bos_token", "add_eos_token")


def field_value(field):
    """A GGUF metadata value as Python (``ReaderField.contents`` where gguf has it, >= 0.11)."""
    if hasattr(field, "contents"):
        return field.contents()
    from gguf import GGUFValueType

    def one(part, typ):
        return bytes(part).decode("utf-8") if typ == GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def _transformers_gguf_tokenizer_api():
    """(GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer) from whichever place this transformers has."""
    try:  # transformers >= 5.2x
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4.4x .. 5.1x
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def tokenizer_from_gguf(reader, source: str = "GGUF"):
    """A ``PreTrainedTokenizerFast`` from an open ``gguf.GGUFReader``, or None if it has no vocabulary."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    from transformers import PreTrainedTokenizerFast

    mapping, convert_gguf_tokenizer = _transformers_gguf_tokenizer_api()
    meta = {k: field_value(f) for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    arch = field_value(reader.fields["general.architecture"])
    section = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in mapping.items()
    }
    tokenizer_dict = section["tokenizer"]
    config = {k: v for k, v in section["tokenizer_config"].items() if k in _CONFIG_KEYS}
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
    try:
        backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **extra})
    except (ValueError, KeyError, TypeError) as e:
        raise ConvertError(
            f"{source}: cannot build its tokenizer ({type(e).__name__}: {e}); "
            f"tokenizer type {meta.get('tokenizer.ggml.model')!r} may need a newer transformers"
        ) from e


def wants_custom_code(folder: Path) -> list[str]:
    """The files of ``folder`` whose ``auto_map`` asks transformers to import Python code from the folder."""
    found = []
    for name in ("tokenizer_config.json", "config.json"):
        try:
            d = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("auto_map"):
            found.append(name)
    return found


def load_tokenizer(folder: Path, converted: bool = False):
    """The tokenizer saved in (or shipped with) ``folder``, or None when it has none.

    Never runs code from the folder: ``trust_remote_code=False``, and a folder whose config names
    its own tokenizer code (``auto_map``) gets the tokenizer built from ``tokenizer.json`` alone.
    A converted folder's ``config.json`` is ours, not transformers': there we load the saved
    ``tokenizer.json`` directly too, because ``AutoTokenizer`` would parse that config.
    """
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    custom = wants_custom_code(folder)
    has_json = (folder / "tokenizer.json").is_file()
    if custom and not has_json:
        raise ConvertError(
            f"{folder}: its tokenizer needs Python code from the folder ({' and '.join(custom)} has an auto_map), "
            "which hetero-jax never runs; provide a tokenizer.json"
        )
    if custom:
        log.warning("%s: ignoring the custom code named in %s (never run); building the tokenizer from tokenizer.json",
                    folder, " and ".join(custom))
    direct = has_json and (converted or custom)
    try:
        if direct:
            tok = PreTrainedTokenizerFast.from_pretrained(str(folder), trust_remote_code=False)
        else:
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, ImportError, TypeError, KeyError) as e:
        raise ConvertError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {str(e)[:300]})") from e
    tok.init_kwargs.pop("auto_map", None)  # save_pretrained must not pass the request on
    return tok
