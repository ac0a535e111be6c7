"""Load a llama.cpp GGUF file (any quantization the ``gguf`` package dequantizes) into our params.

Architectures ``llama`` and ``qwen2``. The config comes from the ``{arch}.*`` metadata, the
weights are dequantized to float32 by ``gguf.quants.dequantize``, and for ``llama`` llama.cpp's
q/k row permutation is undone (its converter permutes Llama's q/k rows only, not Qwen2's), so
that every weight equals what transformers loads from the same file (then
``convert.hf.assemble_params`` checks names and shapes and transposes into our layout).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from convert.common import ConvertError, existing_path
from convert.config import QKV_BIAS_FAMILIES, ConfigError, LlamaConfig, RopeScaling
from convert.hf import LAYER_NAMES, assemble_params
from convert.tokenizer import field_value, tokenizer_from_gguf

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("llama", "qwen2")
PERMUTED_QK_ARCHS = ("llama",)  # llama.cpp's converter interleaves these q/k rows for its RoPE
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
          "ffn_norm": "mlp_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}
_LAYER_BIAS = {"attn_q": "bq", "attn_k": "bk", "attn_v": "bv"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """The transformers name of a llama.cpp tensor (unknown names come back unchanged)."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    ours = (_LAYER if m and m.group(3) == "weight" else _LAYER_BIAS).get(m.group(2)) if m else None
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[ours]}" if ours else gguf_name


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved RoPE pairs) back to HF's rotate-half order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path):
    """A ``gguf.GGUFReader`` on ``path``, or a ConvertError saying why the file is unusable."""
    import gguf

    path = existing_path(path, "pass a .gguf file")
    if not path.is_file():
        raise ConvertError(f"{path}: not a file; load_gguf takes a .gguf file (use load_hf for HF folders)")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConvertError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with bare ValueError/IndexError on short files
        raise ConvertError(
            f"{path}: cannot read this GGUF ({type(e).__name__}: {e}); the file is truncated or "
            "corrupt -- download it again"
        ) from e


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, candidates) -> RopeScaling:
    """Recover Llama-3.1 rope scaling from llama.cpp's ``rope_freqs.weight`` factors.

    llama.cpp stores the per-frequency divisors rather than the four numbers; we try the
    parameters every Llama 3.x release uses and accept the first that reproduces the tensor.
    """
    factors = np.asarray(factors, np.float64).reshape(-1)
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / freqs
    for orig in candidates:
        s = RopeScaling(float(round(factors.max(), 4)), 1.0, 4.0, int(orig))
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        want = np.where(
            wavelen < orig / s.high_freq_factor, 1.0,
            np.where(wavelen > orig / s.low_freq_factor, s.factor, 1.0 / ((1 - smooth) / s.factor + smooth)),
        )
        if want.shape == factors.shape and np.allclose(want, factors, rtol=1e-4):
            return s
    raise ConvertError(
        "rope_freqs.weight does not match Llama-3 rope scaling (low/high freq factor 1/4); "
        "this rope variant is not supported -- convert from the HF folder instead"
    )


def gguf_config(reader, source: str) -> LlamaConfig:
    """LlamaConfig from the ``{arch}.*`` / ``tokenizer.*`` metadata of an open GGUF (arch llama or qwen2)."""
    fields = reader.fields

    def get(key, default=KeyError):
        if key in fields:
            return field_value(fields[key])
        if default is KeyError:
            raise ConvertError(f"{source}: metadata key {key!r} is missing; the GGUF is incomplete")
        return default

    arch = get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConvertError(
            f"{source}: unsupported architecture {arch!r}; hetero-jax runs GGUF architectures "
            f"{', '.join(map(repr, SUPPORTED_ARCHS))} (Llama and Qwen2/Qwen2.5 models) only"
        )

    def meta(name, default=KeyError):  # the architecture's own keys: llama.*, qwen2.*
        return get(f"{arch}.{name}", default)

    if int(get("split.count", 1)) > 1:
        raise ConvertError(f"{source}: split GGUF files are not supported; merge them with llama-gguf-split --merge")
    if meta("rope.scaling.type", "none") not in ("none", None):
        raise ConvertError(f"{source}: rope scaling {meta('rope.scaling.type')!r} is not supported")
    names = {t.name: t for t in reader.tensors}
    hidden, n_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", 0) or meta("rope.dimension_count", 0) or hidden // n_heads)
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise ConvertError(f"{source}: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    theta = float(meta("rope.freq_base", 10000.0))
    context = int(meta("context_length", 8192))
    scaling = None
    if "rope_freqs.weight" in names:
        orig = meta("rope.scaling.original_context_length", None)
        import gguf

        factors = gguf.quants.dequantize(names["rope_freqs.weight"].data, names["rope_freqs.weight"].tensor_type)
        scaling = _llama3_scaling(factors, theta, head_dim, [c for c in (orig, 8192) if c])
    if f"{arch}.vocab_size" in fields:
        vocab = int(meta("vocab_size"))
    elif "tokenizer.ggml.tokens" in fields:
        vocab = len(fields["tokenizer.ggml.tokens"].data)
    elif "token_embd.weight" in names:
        vocab = int(names["token_embd.weight"].shape[1])
    else:
        raise ConvertError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, tokens or token_embd)")
    eos = [get(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(meta("feed_forward_length")),
            num_layers=int(meta("block_count")),
            num_heads=n_heads,
            num_kv_heads=int(meta("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=scaling,
            # stored as float32: keep the short decimal (1e-05, not 9.99999974e-06)
            rms_norm_eps=float(str(np.float32(meta("attention.layer_norm_rms_epsilon", 1e-5)))),
            max_position_embeddings=context,
            tie_word_embeddings="output.weight" not in names,
            qkv_bias=arch in QKV_BIAS_FAMILIES,
            bos_token_id=get("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        )
    except ConfigError as e:
        raise ConvertError(f"{source}: {e}") from e


# ``{arch}.*`` metadata that must be positive integers when present (0 heads divides by zero later)
SIZE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "context_length", "vocab_size",
             "attention.head_count", "attention.head_count_kv", "attention.key_length")


def check_sizes(reader, source: str) -> None:
    """Refuse zero, negative or per-layer (array) sizes by key before any arithmetic uses them."""
    arch = field_value(reader.fields["general.architecture"]) if "general.architecture" in reader.fields else None
    for suffix in SIZE_KEYS:
        key = f"{arch}.{suffix}"
        if key not in reader.fields:
            continue
        v = field_value(reader.fields[key])
        if isinstance(v, list):
            raise ConvertError(f"{source}: metadata {key} holds one value per layer; only uniform layers are supported")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConvertError(f"{source}: metadata {key} must be a positive integer, got {v!r}; the GGUF is corrupt")


def load_gguf(path, dtype="float32", progress=None):
    """(LlamaConfig, params, tokenizer or None) from a llama.cpp GGUF file, dequantized to ``dtype``."""
    import gguf

    reader = open_gguf(path)
    source = str(Path(path))
    check_sizes(reader, source)
    cfg = gguf_config(reader, source)
    permuted = field_value(reader.fields["general.architecture"]) in PERMUTED_QK_ARCHS

    def reader_fn(t):
        def read():
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims innermost first
            try:
                w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
            except (NotImplementedError, ValueError) as e:
                raise ConvertError(f"{source}: cannot dequantize {t.name} ({t.tensor_type.name}: {e})") from e
            kind = t.name.rsplit(".", 2)[-2] if t.name.startswith("blk.") else ""
            heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(kind)
            if permuted and heads and w.ndim == 2 and w.shape[0] == heads * cfg.head_dim:
                w = unpermute_rows(w, heads)
            return w

        return read

    tensors = {hf_name(t.name): reader_fn(t) for t in reader.tensors if t.name != "rope_freqs.weight"}
    parts = [f"{p}.weight" for p in _LAYER] + ([f"{p}.bias" for p in _LAYER_BIAS] if cfg.qkv_bias else [])
    known = [*_TOP, *(f"blk.{i}.{part}" for i in range(cfg.num_layers) for part in parts)]
    to_gguf = {hf_name(g): g for g in known}
    params = assemble_params(cfg, tensors, dtype, source, progress, label=lambda n: to_gguf.get(n, n))
    return cfg, params, tokenizer_from_gguf(reader, source)
