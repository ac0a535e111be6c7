"""Qwen2 / Qwen2.5 (q/k/v biases, its own rope theta, tied or untied embeddings) end to end.

References are independent: transformers' own Qwen2 (weights, logits, greedy generate) on random
configs written by ``save_pretrained``, transformers' own GGUF loader on GGUF files written the way
llama.cpp's converter writes ``qwen2`` (no q/k row permutation), and every cache policy run on the
converted model.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import convert
from convert import ConvertError
from hetero_jax import model
from hetero_jax.cache import POLICIES, make_policy, policy_class
from hetero_jax.cache.full import FullKV
from hetero_jax.generate import generate
from hetero_jax.profiling import profile_model
from tests.test_convert import assert_trees_bit_equal, our_greedy, ours_as_hf, rewrite_single, tiny_vocab

V, H, INTER, HEADS, KV_HEADS, LAYERS = 320, 64, 96, 4, 2, 2
THETA = 1_000_000.0  # Qwen2.5's rope theta (Llama's default is 10000)


def make_qwen2(folder: Path, seed: int, tied: bool, vocab: int = V, shard: str | None = "60KB"):
    """A random-init HF Qwen2 model saved to ``folder``; biases and norms made non-trivial.

    transformers initialises the q/k/v biases to zero and the norms to one, which would hide a
    dropped bias or a swapped norm, so both are drawn at random here.
    """
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        rope_parameters=dict(rope_type="default", rope_theta=THETA), tie_word_embeddings=tied,
        initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    m = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    m.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return m


def state_dict(m) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in m.state_dict().items()}


def relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def all_logits(cfg, params, toks: np.ndarray):
    lg, _ = model.prefill(params, jnp.asarray(toks), jnp.full((toks.shape[0],), toks.shape[1]), cfg=cfg,
                          policy=FullKV(), max_new_tokens=1, all_logits=True)
    return np.asarray(lg)


# ----------------------------------------------------------------------------- HF safetensors
@pytest.mark.parametrize("tied", [False, True])
def test_hf_qwen2_matches_transformers(tmp_path, seed, tied):
    m = make_qwen2(tmp_path, seed, tied)
    assert len(list(tmp_path.glob("*.safetensors"))) >= 2  # sharded
    cfg, params = convert.load_hf(tmp_path)
    assert cfg.qkv_bias and cfg.rope_theta == THETA and cfg.rms_norm_eps == 1e-6 and cfg.rope_scaling is None
    assert cfg.tie_word_embeddings == tied and ("lm_head" in params) == (not tied)
    assert params["layers"][0]["bk"].shape == (KV_HEADS * H // HEADS,)
    want = state_dict(m)
    if tied:
        del want["lm_head.weight"]  # transformers lists the tied head; it is the embedding
    got = ours_as_hf(params, cfg)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    rng = np.random.default_rng(seed)
    toks = rng.integers(0, V, (2, 96))
    with torch.no_grad():
        ref = m(torch.tensor(toks)).logits.numpy()
    assert relative_error(all_logits(cfg, params, toks), ref) <= 1e-4

    prompt = rng.integers(0, V, (1, 16))
    with torch.no_grad():
        # an explicit mask: with pad_token_id set, transformers would otherwise mask every 0 in the prompt
        gen = m.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                         max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert our_greedy(cfg, params, prompt, 24) == gen[0, 16:].tolist()


def test_hf_qwen2_convert_round_trip(tmp_path, seed):
    make_qwen2(tmp_path / "hf", seed, tied=True, shard=None)
    cfg, params = convert.load_hf(tmp_path / "hf")
    loaded = convert.load_model(convert.convert(tmp_path / "hf", tmp_path / "out", progress=False))
    assert loaded.cfg == cfg and loaded.cfg.qkv_bias
    assert json.loads((tmp_path / "out" / "config.json").read_text())["qkv_bias"] is True
    assert_trees_bit_equal(params, loaded.params)


def edit_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of an HF folder with ``config.json`` fields changed (None removes a field)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


def test_qwen2_config_refusals(tmp_path, seed):
    src = tmp_path / "hf"
    make_qwen2(src, seed, tied=False, shard=None)
    # Qwen2.5's own config.json: a window is set but switched off; no layer_types (older transformers)
    cfg, _ = convert.load_hf(edit_config(src, tmp_path / "off", use_sliding_window=False, sliding_window=32768,
                                         max_window_layers=21, layer_types=None))
    assert cfg.qkv_bias
    for name, changes in {
        "on": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None),
        "types": dict(use_sliding_window=True, sliding_window=16, layer_types=["full_attention", "sliding_attention"]),
    }.items():
        with pytest.raises(ConvertError, match=r"layers \[1\] use sliding-window attention.*use_sliding_window"):
            convert.load_hf(edit_config(src, tmp_path / name, **changes))
    with pytest.raises(ConvertError, match="hidden_act 'gelu'"):
        convert.load_hf(edit_config(src, tmp_path / "act", hidden_act="gelu"))
    for model_type, arch in [("qwen3", "Qwen3ForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM"),
                             ("qwen2", "Qwen2ForSequenceClassification")]:
        with pytest.raises(ConvertError, match=r"unsupported architecture.*LlamaForCausalLM \(model_type 'llama'\), "
                                               r"Qwen2ForCausalLM \(model_type 'qwen2'\) only"):
            convert.load_hf(edit_config(src, tmp_path / f"{model_type}-{arch}", model_type=model_type,
                                        architectures=[arch]))

    def drop_bias(t):
        del t["model.layers.1.self_attn.v_proj.bias"]

    with pytest.raises(ConvertError, match=r"missing tensors model\.layers\.1\.self_attn\.v_proj\.bias"):
        convert.load_hf(rewrite_single(src, tmp_path / "nobias", drop_bias))


# ----------------------------------------------------------------------------- GGUF
GGUF_PARTS = {"attn_norm": "input_layernorm.weight", "attn_q": "self_attn.q_proj.weight",
              "attn_k": "self_attn.k_proj.weight", "attn_v": "self_attn.v_proj.weight",
              "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
              "attn_v.bias": "self_attn.v_proj.bias", "attn_output": "self_attn.o_proj.weight",
              "ffn_norm": "post_attention_layernorm.weight", "ffn_gate": "mlp.gate_proj.weight",
              "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight"}


def write_qwen2_gguf(path: Path, m, quant=(), drop=()):
    """``m``'s weights as a qwen2 GGUF, laid out as llama.cpp's converter does (Qwen2Model: names
    and metadata only, q/k rows left in HF order). Parts in ``quant`` are stored as Q8_0, tensors
    named in ``drop`` are left out."""
    c = m.config
    tokens, merges, types = tiny_vocab()
    assert c.vocab_size == len(tokens)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    sd = state_dict(m)
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not c.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(c.num_hidden_layers):
        for part, hf in GGUF_PARTS.items():
            names[f"blk.{i}.{part}" + ("" if part.endswith(".bias") else ".weight")] = f"model.layers.{i}.{hf}"
    for name, hf in names.items():
        if name in drop:
            continue
        x = sd[hf]
        if name.split(".")[-2] in quant and x.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied,quant", [(False, ()), (True, ("attn_q", "attn_k", "ffn_up", "token_embd"))])
def test_gguf_qwen2_matches_transformers(tmp_path, seed, tied, quant):
    """f32: our weights are the written ones, bit for bit, and so are transformers' (which undoes no
    permutation for qwen2: an independent check of the convention). Q8_0: ours equal transformers'."""
    vocab = len(tiny_vocab()[0])
    m = make_qwen2(tmp_path / "hf", seed, tied, vocab=vocab, shard=None)
    (tmp_path / "gguf").mkdir()
    path = tmp_path / "gguf" / "tiny-qwen2.gguf"
    write_qwen2_gguf(path, m, quant)
    cfg, params, tok = convert.load_gguf(path)
    hf_cfg, _ = convert.load_hf(tmp_path / "hf")
    assert cfg.qkv_bias and cfg.rope_theta == THETA and cfg.head_dim == H // HEADS and cfg.eos_token_ids == (2,)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(hf_cfg, field), field

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    ref_sd, original = state_dict(ref), state_dict(m)
    got = ours_as_hf(params, cfg)
    assert set(got) <= set(ref_sd) and len(got) == len(original) - tied
    for k, v in got.items():
        if quant:
            np.testing.assert_allclose(v, ref_sd[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:
            np.testing.assert_array_equal(v, original[k], err_msg=k)
            np.testing.assert_array_equal(ref_sd[k], original[k], err_msg=k)

    toks = np.random.default_rng(seed).integers(0, vocab, (1, 64))
    with torch.no_grad():
        want = (ref if quant else m)(torch.tensor(toks)).logits.numpy()
    assert relative_error(all_logits(cfg, params, toks), want) <= 1e-4

    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["hello world", "<|im_start|>hi there<|im_end|>", "  spaced\n\tout ünïcode 12345"]:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text


def test_gguf_qwen2_missing_bias_named(tmp_path, seed):
    m = make_qwen2(tmp_path / "hf", seed, tied=True, vocab=len(tiny_vocab()[0]), shard=None)
    path = tmp_path / "q.gguf"
    write_qwen2_gguf(path, m, drop=("blk.1.attn_k.bias",))
    with pytest.raises(ConvertError, match=r"missing tensors blk\.1\.attn_k\.bias"):
        convert.load_gguf(path)


# ----------------------------------------------------------------------------- cache policies
def test_every_cache_policy_runs_on_qwen2(tmp_path, seed):
    """HeteroCache and every baseline on a converted random Qwen2: full KV equals transformers'
    greedy tokens, ratio 1 equals full KV, and a compressing ratio stores less and stays finite."""
    m = make_qwen2(tmp_path, seed, tied=False, shard=None)
    cfg, params = convert.load_hf(tmp_path)
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, V, n).tolist() for n in (150, 97)]
    steps = 5
    full = generate(params, rows, "full", config=cfg, max_new_tokens=steps, progress=False)
    for row, toks in zip(rows, full.tokens):
        with torch.no_grad():
            ref = m.generate(torch.tensor([row]), max_new_tokens=steps, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones((1, len(row)), dtype=torch.long))
        assert toks == ref[0, len(row):].tolist()

    # the profile the hetero policy needs, made by the profiling tool on this model; stable_threshold 0
    # makes every unclustered head an anchor, so F (pivots) <= N/2 and ratio 0.75 is valid for any seed
    calib = rng.integers(1, V, 240).tolist()
    prof = profile_model(params, cfg, calib, name="tiny-qwen2", max_length=200, topk=40, max_new_tokens=7,
                         stable_threshold=0.0, progress=False)
    assert prof.num_full <= prof.num_heads // 2
    options = {n: {"profile": prof, "params": params} for n in POLICIES if policy_class(n).needs_profile}
    for name in POLICIES:
        if name == "full":
            continue
        same = generate(params, rows, make_policy(name, cfg, ratio=1.0, **options.get(name, {})), config=cfg,
                        max_new_tokens=steps, progress=False)
        if name == "h2o":  # evicts once decoding starts: only the first decode step sees the whole prompt
            assert [t[:2] for t in same.tokens] == [t[:2] for t in full.tokens], name
        else:
            assert same.tokens == full.tokens, name
        small = generate(params, rows, make_policy(name, cfg, ratio=0.75, **options.get(name, {})), config=cfg,
                         max_new_tokens=steps, progress=False)
        assert [len(t) for t in small.tokens] == [steps, steps], name
        assert all(0 <= x < V for t in small.tokens for x in t), name
        assert small.stats["device_bytes"] < full.stats["device_bytes"], (name, small.stats)
