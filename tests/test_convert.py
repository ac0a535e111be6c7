"""convert/: HF and GGUF loading against transformers, orbax round trips, bad inputs, default model.

References are independent: transformers' own Llama (logits, greedy generate), its own GGUF
loader (weights, tokenizer) and the original random weights written into the files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import convert
from convert import ConvertError
from convert.config import RopeScaling
from convert.params import init_random_params
from hetero_jax import model
from hetero_jax.cache.full import FullKV

V, H, INTER, HEADS, KV_HEADS, LAYERS = 320, 64, 96, 4, 2, 3
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)


# ----------------------------------------------------------------------------- helpers
def make_hf(folder: Path, seed: int, tied: bool = False, shard: str | None = "60KB", layers: int = LAYERS):
    """A random-init Llama-3.1-style HF model (rope scaling, GQA) saved to ``folder``."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=50000.0,
        max_position_embeddings=512, tie_word_embeddings=tied, rope_scaling=dict(LLAMA3),
        initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    m = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm weight shows
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    m.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return m


def our_greedy(cfg, params, prompt: np.ndarray, steps: int) -> list[int]:
    pol = FullKV()
    lg, cache = jax.jit(lambda p, t, n: model.prefill(p, t, n, cfg=cfg, policy=pol, max_new_tokens=steps))(
        params, jnp.asarray(prompt), jnp.asarray([prompt.shape[1]]))
    step = jax.jit(lambda p, c, t: model.decode_step(p, c, t, cfg=cfg, policy=pol), donate_argnums=1)
    out = [int(jnp.argmax(lg[0]))]
    for _ in range(steps - 1):
        lg, cache = step(params, cache, jnp.asarray([out[-1]]))
        out.append(int(jnp.argmax(lg[0])))
    return out


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` (HF rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = sorted(set(bytes_to_unicode().values()))
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *chars, "he", "ll", "Ġw"]
    merges = ["h e", "l l", "Ġ w"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


GGUF_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def write_gguf(path: Path, seed: int, tied=False, arch="llama", quant=(), drop=(), rope_freqs=None, layers=2):
    """A tiny GGUF from random HF-layout weights, written like llama.cpp's converter does.

    Returns the HF-named float32 weights of the unquantized tensors.
    """
    rng = np.random.default_rng(seed)
    tokens, merges, types = tiny_vocab()
    vocab, hd = len(tokens), H // HEADS
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    hf, shapes = {}, {"token_embd": (vocab, H), "output_norm": (H,)}
    if not tied:
        shapes["output"] = (vocab, H)
    out_dims = {"attn_q": H, "attn_k": KV_HEADS * hd, "attn_v": KV_HEADS * hd, "attn_output": H,
                "ffn_gate": INTER, "ffn_up": INTER, "ffn_down": H}
    in_dims = {"ffn_down": INTER}
    for i in range(layers):
        for part in GGUF_LAYER:
            shapes[f"blk.{i}.{part}"] = (H,) if part.endswith("norm") else (out_dims[part], in_dims.get(part, H))
    hf_names = {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight", "output": "lm_head.weight"}
    for name, shape in shapes.items():
        x = (rng.standard_normal(shape) * (0.2 if len(shape) == 2 else 0.1) + (len(shape) == 1)).astype(np.float32)
        part = name.split(".")[-1]
        stored = llamacpp_permute(x, HEADS if part == "attn_q" else KV_HEADS) if part in ("attn_q", "attn_k") else x
        if name.startswith("blk."):
            hf_name = f"model.layers.{name.split('.')[1]}.{GGUF_LAYER[part]}.weight"
        else:
            hf_name = hf_names[name]
        if name in drop:
            continue
        if part in quant and len(shape) == 2:  # lossy: not returned, compared with transformers instead
            q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name + ".weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name + ".weight", stored)
            hf[hf_name] = x
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def ours_as_hf(params, cfg) -> dict[str, np.ndarray]:
    """Our params back in HF names/layout, for comparing with a transformers state dict."""
    out = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = params["lm_head"].T
    for i, lp in enumerate(params["layers"]):
        for key, x in lp.items():
            out[f"model.layers.{i}.{convert.hf.LAYER_NAMES[key]}"] = x.T if x.ndim == 2 else x
    return {k: np.asarray(v) for k, v in out.items()}


def bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_trees_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(bits(x), bits(y))


# ----------------------------------------------------------------------------- 1. HF parity
@pytest.mark.parametrize("tied", [False, True])
def test_hf_sharded_matches_transformers(tmp_path, seed, tied):
    m = make_hf(tmp_path, seed, tied)
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) >= 3
    cfg, params = convert.load_hf(tmp_path)
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64) and cfg.num_kv_heads == KV_HEADS
    assert cfg.tie_word_embeddings == tied and ("lm_head" in params) == (not tied)
    hf_sd = {k: v.numpy() for k, v in m.state_dict().items()}
    for k, v in ours_as_hf(params, cfg).items():
        np.testing.assert_array_equal(v, hf_sd[k])

    rng = np.random.default_rng(seed)
    toks = rng.integers(0, V, (2, 128))
    with torch.no_grad():
        ref = m(torch.tensor(toks)).logits.numpy()
    f = jax.jit(lambda p, t, n: model.prefill(p, t, n, cfg=cfg, policy=FullKV(), max_new_tokens=8, all_logits=True))
    lg, _ = f(params, jnp.asarray(toks), jnp.asarray([128, 128]))
    assert np.abs(np.asarray(lg) - ref).max() / np.abs(ref).max() <= 1e-4

    prompt = rng.integers(0, V, (1, 16))
    with torch.no_grad():
        # an explicit mask: with pad_token_id set, transformers would otherwise mask every 0 in the prompt
        gen = m.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                         max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert our_greedy(cfg, params, prompt, 32) == gen[0, 16:].tolist()


# ----------------------------------------------------------------------------- 2. GGUF
def test_gguf_gives_back_the_written_weights(tmp_path, seed):
    path = tmp_path / "tiny.gguf"
    written = write_gguf(path, seed)
    cfg, params, tok = convert.load_gguf(path)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (2, HEADS, KV_HEADS, 16, len(written["model.embed_tokens.weight"]))
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (50000.0, 1e-6, 256)
    assert not cfg.tie_word_embeddings and cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    got = ours_as_hf(params, cfg)
    assert got.keys() == written.keys()
    for k in written:
        np.testing.assert_array_equal(got[k], written[k], err_msg=k)
    assert tok.convert_ids_to_tokens(tok("hello world")["input_ids"])[:2] == ["he", "ll"]


def test_gguf_matches_transformers_gguf_loader(tmp_path, seed):
    """Quantized (Q8_0) and tied: weights, tokenizer and logits equal transformers' own GGUF loading."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, seed, tied=True, quant=("attn_q", "attn_k", "ffn_down", "token_embd"))
    cfg, params, tok = convert.load_gguf(path)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    ref_sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    for k, v in ours_as_hf(params, cfg).items():
        np.testing.assert_allclose(v, ref_sd[k], rtol=1e-6, atol=1e-7, err_msg=k)
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello world", "<|im_start|>hi there<|im_end|>", "  spaced\n\tout ünïcode 123"]:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, 64))
    with torch.no_grad():
        want = ref(torch.tensor(toks)).logits.numpy()
    got, _ = model.prefill(params, jnp.asarray(toks), jnp.asarray([64]), cfg=cfg, policy=FullKV(),
                           max_new_tokens=1, all_logits=True)
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() <= 1e-4


def llama3_factors(theta, hd, s: RopeScaling) -> np.ndarray:
    """Per-frequency divisors as llama.cpp's converter writes them into ``rope_freqs.weight``."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, hd, 2) / hd)
    lo, hi = s.original_max_position_embeddings / s.low_freq_factor, s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    return np.where(wavelen < hi, 1.0, np.where(wavelen > lo, s.factor, 1 / ((1 - smooth) / s.factor + smooth)))


def test_gguf_llama3_rope_freqs_recovered(tmp_path, seed):
    s = RopeScaling(32.0, 1.0, 4.0, 8192)
    factors = llama3_factors(50000.0, H // HEADS, s)
    assert (factors == 1).any() and (factors == 32).any() and ((factors > 1) & (factors < 32)).any()
    path = tmp_path / "rope.gguf"
    write_gguf(path, seed, rope_freqs=factors)
    assert convert.load_gguf(path)[0].rope_scaling == s
    odd = llama3_factors(50000.0, H // HEADS, RopeScaling(32.0, 2.0, 4.0, 8192))
    write_gguf(path, seed, rope_freqs=odd)
    with pytest.raises(ConvertError, match="rope_freqs.weight does not match"):
        convert.load_gguf(path)


# ----------------------------------------------------------------------------- 3. checkpoints
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_orbax_round_trip_bit_exact(tmp_path, tiny_cfg, seed, dtype):
    params = init_random_params(tiny_cfg, seed, dtype=dtype, scale=0.3)
    convert.save_params(params, tmp_path / "p")
    back = convert.restore_params(tmp_path / "p", tiny_cfg, dtype)
    assert isinstance(back["layers"], list) and isinstance(back["layers"][0], dict)
    assert_trees_bit_equal(params, back)


def test_convert_hf_folder_round_trip(tmp_path, seed):
    src = tmp_path / "hf"
    make_hf(src, seed, shard="80KB", layers=2)
    cfg, params = convert.load_hf(src)
    dst = convert.convert(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temp folder left
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["source_kind"] == "hf" and meta["dtype"] == "float32"
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert set(shards) | {"config.json", "model.safetensors.index.json"} <= set(meta["source_sha256"])
    assert meta["source_sha256"][shards[0]] == convert.common.sha256_file(src / shards[0])
    loaded = convert.load_model(dst)
    assert loaded.cfg == cfg and loaded.tokenizer is None and loaded.path == dst
    assert_trees_bit_equal(params, loaded.params)
    assert_trees_bit_equal(params, convert.load_model(src).params)  # an HF folder loads directly too
    half = convert.load_model(dst, dtype="bfloat16").params
    assert half["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(bits(half["embed"]), bits(params["embed"].astype(jnp.bfloat16)))


@pytest.mark.filterwarnings("ignore:.*rope_scaling.*:FutureWarning")  # AutoTokenizer parses our config.json
def test_convert_gguf_round_trip_with_tokenizer(tmp_path, seed):
    src = tmp_path / "tiny.gguf"
    write_gguf(src, seed, quant=("ffn_up",))
    cfg, params, tok = convert.load_gguf(src)
    dst = convert.convert(src, tmp_path / "out", dtype="bfloat16", progress=False)
    loaded = convert.load_model(dst)
    assert loaded.cfg == cfg and loaded.params["layers"][1]["w_up"].dtype == jnp.bfloat16
    assert_trees_bit_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), loaded.params)
    text = "<|im_start|>hello world<|im_end|>"
    assert loaded.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.tokenizer.chat_template == tok.chat_template and loaded.tokenizer.eos_token == "<|im_end|>"
    from_auto = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert from_auto(text)["input_ids"] == tok(text)["input_ids"]
    with pytest.raises(ConvertError, match="already exists"):
        convert.convert(src, dst)
    before = (dst / "meta.json").read_text()
    convert.convert(src, dst, overwrite=True, progress=False)  # replaced in one piece
    assert json.loads(before)["source_sha256"] == json.loads((dst / "meta.json").read_text())["source_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


def test_model_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HETERO_JAX_HOME", str(tmp_path / "h"))
    assert convert.model_home() == tmp_path / "h"
    monkeypatch.delenv("HETERO_JAX_HOME")
    import platformdirs

    assert convert.model_home() == Path(platformdirs.user_cache_dir("hetero-jax"))


# ----------------------------------------------------------------------------- 4. bad inputs
def rewrite_single(src: Path, dst: Path, edit) -> Path:
    """Copy an HF folder as one model.safetensors after ``edit(tensors)``."""
    dst.mkdir()
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(f))
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_bad_hf_inputs(tmp_path, seed):
    src = tmp_path / "hf"
    make_hf(src, seed, shard=None, layers=2)
    with pytest.raises(ConvertError, match="no such file or folder"):
        convert.load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="no config.json"):
        convert.load_hf(tmp_path / "empty")

    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]

    with pytest.raises(ConvertError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        convert.load_hf(rewrite_single(src, tmp_path / "missing", drop))

    def add(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(H, np.float32)

    with pytest.raises(ConvertError, match=r"unexpected tensors model\.layers\.0\.self_attn\.q_proj\.bias"):
        convert.load_hf(rewrite_single(src, tmp_path / "unexpected", add))

    def reshape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((H, H), np.float32)

    with pytest.raises(ConvertError, match=r"k_proj\.weight has shape \(64, 64\), expected \(32, 64\)"):
        convert.load_hf(rewrite_single(src, tmp_path / "shape", reshape))

    arch = tmp_path / "arch"
    rewrite_single(src, arch, lambda t: None)
    cfg = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ConvertError, match="unsupported architecture.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        convert.load_hf(arch)

    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match="truncated or corrupt safetensors"):
        convert.load_hf(src)
    with pytest.raises(ConvertError, match="truncated or corrupt safetensors"):
        convert.convert(src, tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))], "failed convert left files"


def test_bad_gguf_inputs(tmp_path, seed):
    with pytest.raises(ConvertError, match="no such file or folder"):
        convert.load_gguf(tmp_path / "nope.gguf")
    path = tmp_path / "m.gguf"
    write_gguf(path, seed, arch="qwen3")
    with pytest.raises(ConvertError, match="unsupported architecture 'qwen3'.*'llama', 'qwen2'"):
        convert.load_gguf(path)
    write_gguf(path, seed, drop=("blk.1.ffn_up",))
    with pytest.raises(ConvertError, match=r"missing tensors blk\.1\.ffn_up\.weight"):
        convert.load_gguf(path)
    write_gguf(path, seed)
    data = path.read_bytes()
    for cut in (len(data) // 2, 200):
        path.write_bytes(data[:cut])
        with pytest.raises(ConvertError, match="truncated or corrupt"):
            convert.load_gguf(path)
    with pytest.raises(ConvertError, match="truncated or corrupt"):
        convert.convert(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConvertError, match="not a GGUF file"):
        convert.load_model(tmp_path / "notes.txt")


def test_bad_model_folders(tmp_path, tiny_cfg, seed):
    with pytest.raises(ConvertError, match="no such file or folder"):
        convert.load_model(tmp_path / "nope")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text(tiny_cfg.to_json())
    convert.save_params(init_random_params(tiny_cfg, seed), half / "params")
    with pytest.raises(ConvertError, match="conversion never finished.*delete the folder and convert again"):
        convert.load_model(half)
    (tmp_path / "other").mkdir()
    with pytest.raises(ConvertError, match="neither a converted"):
        convert.load_model(tmp_path / "other")
    with pytest.raises(ConvertError, match="unknown dtype"):
        convert.load_model(half, dtype="float33")


# ----------------------------------------------------------------------------- 5. the default model
_BLOCK_TORCH = """
import importlib.machinery, sys
class NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "torch" else super().find_spec(name, path, target)
sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


@pytest.mark.real_model
def test_default_model_tokenizer_matches_transformers(tmp_path):
    """Our tokenizer (built without torch, saved, reloaded) == transformers' GGUF tokenizer, ids for ids."""
    folder = convert.ensure_default_model()
    assert convert.ensure_default_model() == folder  # second call takes the fast path
    gguf_path = convert.default_gguf_path()
    built = tmp_path / "tok"
    script = _BLOCK_TORCH + (
        "from convert.from_gguf import open_gguf\nfrom convert.tokenizer import tokenizer_from_gguf\n"
        f"tokenizer_from_gguf(open_gguf({str(gguf_path)!r})).save_pretrained({str(built)!r})\n"
        "assert 'torch' not in sys.modules, 'building the tokenizer imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1],
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours = [convert.checkpoint.load_tokenizer(folder, converted=True),
            transformers.PreTrainedTokenizerFast.from_pretrained(str(built))]
    texts = ["Hello world", "The capital of France is", "  leading spaces\tand\ttabs\n\nnew lines ",
             "naïve café — 東京 🚀", "def f(x):\n    return x**2  # code", "1234567890 3.14159 -7e-3",
             "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks!"}]
    chat = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    for tok in ours:
        for text in [*texts, chat]:
            ids = ref(text)["input_ids"]
            assert tok(text)["input_ids"] == ids, text
            assert tok.decode(ids) == ref.decode(ids)
        assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == chat
        assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
            ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)


@pytest.mark.real_model
def test_default_model_weights_match_transformers():
    m = convert.load_model("default")
    c = m.cfg
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size) == (
        30, 9, 3, 64, 576, 1536)
    assert (c.vocab_size, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (49152, 100000.0, 1e-5, 8192)
    assert c.tie_word_embeddings and c.eos_token_ids == (2,) and m.tokenizer.eos_token == "<|im_end|>"
    gguf_path = convert.default_gguf_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ref_sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    ours = ours_as_hf(m.params, c)
    assert set(ours) <= set(ref_sd)
    for k, v in ours.items():
        np.testing.assert_allclose(v, ref_sd[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_default_model_converts_once_under_concurrent_first_use(tmp_path, monkeypatch, seed):
    """Two first users at once: one converts, the other waits on the lock and reuses the result."""
    import threading

    from convert import default_model

    tiny = tmp_path / "tiny.gguf"
    write_gguf(tiny, seed)
    monkeypatch.setenv("HETERO_JAX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(default_model, "GGUF_SHA256", convert.common.sha256_file(tiny))
    monkeypatch.setattr(default_model, "fetch_gguf", lambda progress: tiny)  # no network in this test
    calls, real_convert = [], convert.checkpoint.convert

    def counting_convert(*a, **k):
        calls.append(1)
        return real_convert(*a, **k)

    monkeypatch.setattr(convert.checkpoint, "convert", counting_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(convert.ensure_default_model(progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "meta.json").is_file()
    assert sorted(p.name for p in results[0].parent.iterdir()) == ["smollm2-135m-instruct"]
