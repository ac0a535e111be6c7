"""Load a llama.cpp GGUF file (any quantization the ``gguf`` package dequantizes) into our params.

The config comes from the ``llama.*`` metadata, the weights are dequantized to float32 by
``gguf.quants.dequantize``, and llama.cpp's q/k row permutation is undone so that every weight
equals what transformers loads from the same file (then ``convert.hf.assemble_params`` checks
names and shapes and transposes into our layout).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from convert.common import ConvertError, existing_path
from convert.config import ConfigError, LlamaConfig, RopeScaling
from convert.hf import LAYER_NAMES, assemble_params
from convert.tokenizer import field_value, tokenizer_from_gguf

GGUF_MAGIC = b"GGUF"
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
          "ffn_norm": "mlp_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name(gguf_name: str) -> str:
    """The transformers name of a llama.cpp tensor (unknown names come back unchanged)."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[_LAYER[m.group(2)]]}"
    return gguf_name


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
    """LlamaConfig from the ``llama.*`` / ``tokenizer.*`` metadata of an open GGUF."""
    fields = reader.fields

    def get(key, default=KeyError):
        if key in fields:
            return field_value(fields[key])
        if default is KeyError:
            raise ConvertError(f"{source}: metadata key {key!r} is missing; the GGUF is incomplete")
        return default

    arch = get("general.architecture")
    if arch != "llama":
        raise ConvertError(
            f"{source}: unsupported architecture {arch!r}; hetero-jax runs Llama-architecture models only"
        )
    if int(get("split.count", 1)) > 1:
        raise ConvertError(f"{source}: split GGUF files are not supported; merge them with llama-gguf-split --merge")
    if get("llama.rope.scaling.type", "none") not in ("none", None):
        raise ConvertError(f"{source}: rope scaling {get('llama.rope.scaling.type')!r} is not supported")
    names = {t.name: t for t in reader.tensors}
    hidden, n_heads = int(get("llama.embedding_length")), int(get("llama.attention.head_count"))
    head_dim = int(get("llama.attention.key_length", 0) or get("llama.rope.dimension_count", 0) or hidden // n_heads)
    if int(get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise ConvertError(f"{source}: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    theta = float(get("llama.rope.freq_base", 10000.0))
    context = int(get("llama.context_length", 8192))
    scaling = None
    if "rope_freqs.weight" in names:
        orig = get("llama.rope.scaling.original_context_length", None)
        import gguf

        factors = gguf.quants.dequantize(names["rope_freqs.weight"].data, names["rope_freqs.weight"].tensor_type)
        scaling = _llama3_scaling(factors, theta, head_dim, [c for c in (orig, 8192) if c])
    if "llama.vocab_size" in fields:
        vocab = int(get("llama.vocab_size"))
    elif "tokenizer.ggml.tokens" in fields:
        vocab = len(fields["tokenizer.ggml.tokens"].data)
    elif "token_embd.weight" in names:
        vocab = int(names["token_embd.weight"].shape[1])
    else:
        raise ConvertError(f"{source}: cannot tell the vocabulary size (no llama.vocab_size, tokens or token_embd)")
    eos = [get(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(get("llama.feed_forward_length")),
            num_layers=int(get("llama.block_count")),
            num_heads=n_heads,
            num_kv_heads=int(get("llama.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=scaling,
            # stored as float32: keep the short decimal (1e-05, not 9.99999974e-06)
            rms_norm_eps=float(str(np.float32(get("llama.attention.layer_norm_rms_epsilon", 1e-5)))),
            max_position_embeddings=context,
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=get("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        )
    except ConfigError as e:
        raise ConvertError(f"{source}: {e}") from e


def load_gguf(path, dtype="float32", progress=None):
    """(LlamaConfig, params, tokenizer or None) from a llama.cpp GGUF file, dequantized to ``dtype``."""
    import gguf

    reader = open_gguf(path)
    source = str(Path(path))
    cfg = gguf_config(reader, source)

    def reader_fn(t):
        def read():
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims innermost first
            try:
                w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
            except (NotImplementedError, ValueError) as e:
                raise ConvertError(f"{source}: cannot dequantize {t.name} ({t.tensor_type.name}: {e})") from e
            kind = t.name.rsplit(".", 2)[-2] if t.name.startswith("blk.") else ""
            heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(kind)
            if heads and w.ndim == 2 and w.shape[0] == heads * cfg.head_dim:
                w = unpermute_rows(w, heads)
            return w

        return read

    tensors = {hf_name(t.name): reader_fn(t) for t in reader.tensors if t.name != "rope_freqs.weight"}
    known = [*_TOP, *(f"blk.{i}.{part}.weight" for i in range(cfg.num_layers) for part in _LAYER)]
    to_gguf = {hf_name(g): g for g in known}
    params = assemble_params(cfg, tensors, dtype, source, progress, label=lambda n: to_gguf.get(n, n))
    return cfg, params, tokenizer_from_gguf(reader, source)
