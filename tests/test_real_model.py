"""End to end on the real default model (SmolLM2-135M-Instruct), fetched the way a user does,
against HF transformers (torch CPU) loading the very same GGUF file."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.real_model

torch = pytest.importorskip("torch", reason="the test extra installs torch==2.13.0")  # noqa: F841


@pytest.fixture(scope="module")
def smollm():
    import convert

    return convert.load_model("default")


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    import convert

    gguf = convert.default_gguf_path()
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


def real_text_ids(tokenizer, n_tokens: int) -> list[int]:
    from importlib.resources import files

    text = files("hetero_jax.data").joinpath("calibration.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n_tokens, f"calibration text has only {len(ids)} tokens"
    return ids[:n_tokens]


def test_logits_and_greedy_match_hf(smollm, hf_model):
    """>= 2K-token real-text prompt: logits within 1e-4 (relative to max |logit|), then 32
    identical greedy tokens."""
    import torch

    from hetero_jax import model
    from hetero_jax.cache.full import FullKV
    from hetero_jax.generate import generate

    ids = real_text_ids(smollm.tokenizer, 2100)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    t = 128 * -(-len(ids) // 128)
    toks = np.zeros((1, t), np.int32)
    toks[0, : len(ids)] = ids
    fwd = jax.jit(lambda p, x, n: model.prefill(p, x, n, cfg=smollm.cfg, policy=FullKV(), max_new_tokens=1,
                                                all_logits=True)[0])
    ours = np.asarray(fwd(smollm.params, jnp.asarray(toks), jnp.asarray([len(ids)])))[0, : len(ids)]
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"max |dlogit| / max |logit| = {rel:.2e}")
    assert rel <= 1e-4

    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    hf_tokens = hf_out[0, len(ids):].tolist()
    res = generate(smollm.params, ids, "full", config=smollm.cfg, max_new_tokens=32, stop_tokens=[])
    assert res.tokens[0] == hf_tokens


def test_chat_answer_is_sensible(smollm):
    from hetero_jax.generate import generate

    tok = smollm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    res = generate(smollm.params, ids, "full", config=smollm.cfg, max_new_tokens=24)
    assert "Paris" in tok.decode(res.tokens[0])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hetero_jax.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_generate_json(smollm):
    r = _cli("generate", "--model", "default", "--chat", "--prompt", "What is the capital of France?",
             "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(out["prompt_tokens"], int) and out["prompt_tokens"] > 5
    assert isinstance(out["tokens"], list) and 0 < len(out["tokens"]) <= 12
    assert "Paris" in out["text"]
    assert out["timing"]["prefill_s"] > 0 and out["timing"]["decode_ms_per_token"] > 0
    assert out["cache"]["policy"] == "full" and out["cache"]["device_bytes"] > 0
    assert out["cache"]["host_bytes"] == 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt", "hi", "--cache", "nope"], "unknown cache policy"),
        (["--prompt", "hi", "--cache", "hetero_plus:0.5:sinks=4"], "unknown option(s) sinks for cache policy 'hetero_plus'"),
        (["--prompt", "hi", "--cache", "snapkv:0.5:windw=8"], "unknown option(s) windw for cache policy 'snapkv'"),
        (["--prompt", "   "], "empty prompt"),
        (["--prompt", "word " * 9000], "exceeds the model's context"),
        (["--prompt", "hi", "--model", "no/such/model"], "no/such/model"),
    ],
)
def test_cli_errors_are_one_clear_line(smollm, args, needle):
    r = _cli("generate", *args)
    assert r.returncode != 0
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr
