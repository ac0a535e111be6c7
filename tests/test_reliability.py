"""What a user meets when things go wrong (issue #10): bad inputs, damaged files, races, interrupts.

Every user mistake must end in one ``error: ...`` line (exit 2) or a named exception; nothing may
be clamped or truncated silently, no code from a model folder may run, and no interrupt or kill
may leave a half-written folder behind for good. Models are tiny random GGUF / HF folders.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from filelock import FileLock
from safetensors.numpy import load_file, save_file

import convert
from convert import ConvertError
from convert.checkpoint import CHECKSUMS, check_finite
from convert.common import lock_path
from hetero_jax import cli
from hetero_jax.cache import make_policy
from convert.config import ConfigError, LlamaConfig
from hetero_jax.generate import GenerationError, generate
from convert.params import init_random_params
from hetero_jax.profile_io import Profile, ProfileError
from tests.test_convert import assert_trees_bit_equal, ours_as_hf, write_gguf

REPO = Path(__file__).parents[1]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """Locks and the default model go to a private HETERO_JAX_HOME, never the user's cache."""
    monkeypatch.setenv("HETERO_JAX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GGUF (with tokenizer), its config/params/tokenizer, and an HF folder of the same weights."""
    root = tmp_path_factory.mktemp("tiny")
    gguf_path = root / "tiny.gguf"
    seed = int(os.environ.get("HETERO_JAX_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    print(f"tiny model seed={seed}")
    write_gguf(gguf_path, seed)
    cfg, params, tok = convert.load_gguf(gguf_path)
    hf = root / "hf"
    write_hf(hf, cfg, params, tok)
    return dict(gguf=gguf_path, cfg=cfg, params=params, tok=tok, hf=hf)


def write_hf(folder: Path, cfg: LlamaConfig, params, tok=None, edit=None) -> Path:
    """An HF Llama folder (config.json + model.safetensors [+ tokenizer]) holding ``params``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.array(v, np.float32) for k, v in ours_as_hf(params, cfg).items()}  # writable copies
    if edit:
        edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config(cfg)))
    if tok is not None:
        tok.save_pretrained(str(folder))
    return folder


def hf_config(cfg: LlamaConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``hetero-jax ARGV`` in-process (the command logic; ``main`` only adds signal handlers)."""
    capsys.readouterr()
    rc = cli.run(list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line naming every needle, and no traceback."""
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def cli_env(home: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HETERO_JAX_HOME": str(home)}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- never run folder code
def test_no_code_from_a_model_folder(tmp_path, tiny, capsys):
    marker = tmp_path / "RAN"
    src = write_hf(tmp_path / "remote", tiny["cfg"], tiny["params"], tiny["tok"])
    (src / "evil_tok.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                     "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    for name in ("tokenizer_config.json", "config.json"):
        d = json.loads((src / name).read_text())
        d["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
        (src / name).write_text(json.dumps(d))
    m = convert.load_model(src)
    assert m.tokenizer("hello world")["input_ids"] == tiny["tok"]("hello world")["input_ids"]
    dst = convert.convert(src, tmp_path / "out", progress=False)
    assert "auto_map" not in json.loads((dst / "tokenizer_config.json").read_text())
    # the CLI, with a "y" waiting on stdin in case anything asks
    r = subprocess.run([sys.executable, "-m", "hetero_jax.cli", "generate", "--model", str(src), "--prompt", "hello",
                        "--max-new-tokens", "2"], input="y\n", capture_output=True, text=True, cwd=REPO,
                       env=cli_env(tmp_path / "home"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "custom code" not in r.stdout and not marker.exists()
    (src / "tokenizer.json").unlink()  # nothing to build the tokenizer from without the folder's code
    with pytest.raises(ConvertError, match="never runs; provide a tokenizer.json"):
        convert.load_model(src)
    assert not marker.exists()


# ----------------------------------------------------------------------------- destinations
def test_destination_containing_the_source_is_refused(tmp_path, tiny, capsys):
    box = tmp_path / "sb"
    box.mkdir()
    shutil.copy(tiny["gguf"], box / "model.gguf")
    (box / "notes.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "convert", box / "model.gguf", box, "--overwrite")
    assert_one_error(rc, err, "contains the source")
    assert sorted(p.name for p in box.iterdir()) == ["model.gguf", "notes.txt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "convert", tiny["gguf"], other, "--overwrite")
    assert_one_error(rc, err, "not a hetero-jax converted folder", "notes.txt")
    assert (other / "notes.txt").read_text() == "mine"
    rc, _, err = run_cli(capsys, "convert", tiny["gguf"], other / "notes.txt" / "out")  # parent is a file
    assert_one_error(rc, err, "cannot write", str(other / "notes.txt"))
    out = tmp_path / "out"
    assert run_cli(capsys, "convert", tiny["gguf"], out)[0] == 0
    assert run_cli(capsys, "convert", tiny["gguf"], out, "--overwrite")[0] == 0  # an earlier conversion: fine
    assert leftovers(tmp_path) == []


def test_second_writer_of_one_destination_is_refused(tmp_path, tiny):
    dst = tmp_path / "out"
    lock = lock_path(dst)
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock\n"
                               f"l = FileLock({str(lock)!r}); l.acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConvertError, match=f"another process is writing this destination.*{lock.name}"):
            convert.convert(tiny["gguf"], dst, progress=False)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not dst.exists() and leftovers(tmp_path) == []
    convert.convert(tiny["gguf"], dst, progress=False)  # free again
    with FileLock(str(lock), timeout=0):  # released after the conversion
        pass


def test_stale_temps_of_dead_processes_are_removed(tmp_path, tiny):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.tmp-{dead.pid}-0123abcd"
        live = tmp_path / f".out.tmp-{alive.pid}-0123abcd"
        other = tmp_path / f".else.tmp-{dead.pid}-0123abcd"
        for p in (stale, live, other):
            (p / "params").mkdir(parents=True)
        convert.convert(tiny["gguf"], tmp_path / "out", progress=False)
        assert not stale.exists() and live.exists() and other.exists()  # only this destination's, only the dead's
    finally:
        alive.kill()
        alive.wait()


# ----------------------------------------------------------------------------- non-finite values
def test_non_finite_weights_are_refused(tmp_path, tiny):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan

    bad = write_hf(tmp_path / "nan", tiny["cfg"], tiny["params"], edit=poison)
    for load in (convert.load_hf, convert.load_model, lambda p: convert.convert(p, tmp_path / "out")):
        with pytest.raises(ConvertError, match=r"up_proj\.weight has 1 non-finite value.*index \(3, 5\)"):
            load(bad)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # finite as stored, but past float16's range: refused when loaded as float16
    big = write_hf(tmp_path / "big", tiny["cfg"], tiny["params"],
                   edit=lambda t: t["model.embed_tokens.weight"].__setitem__((0, 0), 1e6))
    dst = convert.convert(big, tmp_path / "big_out", progress=False)
    assert np.isfinite(np.asarray(convert.load_model(dst).params["embed"])).all()
    with pytest.raises(ConvertError, match=r"non-finite weights.*\['embed'\].*overflow float16"):
        convert.load_model(dst, dtype="float16")
    params = jax.tree.map(jnp.asarray, tiny["params"])
    params["layers"][0]["wk"] = params["layers"][0]["wk"].at[0, 1].set(jnp.inf)
    with pytest.raises(ConvertError, match=r"params\['layers'\]\[0\]\['wk'\]"):
        check_finite(params, "x", "fix it")
    from convert.checkpoint import _finite_flags  # the accelerator path, run here on CPU

    want = [not (name.endswith("['wk']") and "[0]" in name) for name in
            (jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])]
    assert np.asarray(_finite_flags(jax.tree.leaves(params))).tolist() == want
    check_finite(jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny["params"]), "x", "fix it")


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature must be finite, got nan"),
    (dict(temperature=float("inf")), "temperature must be finite, got inf"),
    (dict(top_p=float("nan")), "top_p must be finite"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(seed=99999999999999999999), r"seed must be in \[0, 4294967295\], got 99999999999999999999"),
    (dict(seed=-1), "seed must be in"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(tokens=[1, 2, 300]), r"token id 300 \(sequence 0, position 2\) is outside the model's vocabulary \[0, 256\)"),
    (dict(tokens=[[5, 6], [1, -2, 3]]), r"token id -2 \(sequence 1, position 1\)"),
    (dict(tokens=np.array([1.7, 2.2])), "token ids must be integers.*float64"),
    (dict(tokens=[True, False]), "token ids must be integers.*bool"),
    (dict(tokens="hello"), "not text; tokenize first"),
    (dict(tokens=np.zeros((1, 2, 3), int)), r"shape \(1, 2, 3\)"),
    (dict(pad_id=256), "pad_id must be in"),
])
def test_generate_refuses_bad_inputs_by_name(tiny_cfg, tiny_params, kwargs, match):
    kwargs = {"tokens": [1, 2, 3], "max_new_tokens": 2, **kwargs}
    with pytest.raises(GenerationError, match=match):
        generate(tiny_params, kwargs.pop("tokens"), "full", config=tiny_cfg, **kwargs)


def test_generate_refuses_mismatched_config_and_policy(tiny_cfg, tiny_params):
    import dataclasses

    other = dataclasses.replace(tiny_cfg, num_layers=3, num_kv_heads=3)
    with pytest.raises(GenerationError, match="params do not match the model config.*expected 3 layers, got 2"):
        generate(tiny_params, [1, 2, 3], "full", config=other, max_new_tokens=2)
    with pytest.raises(GenerationError, match="'pyramidkv' was built for 3 layers, but config= has 2 layers"):
        generate(tiny_params, [1, 2, 3], make_policy("pyramidkv", other, ratio=0.5), config=tiny_cfg, max_new_tokens=2)
    from hetero_jax.cache.hetero import HeteroCache

    roles = (("anchor",) * 3,) * 3
    hetero = HeteroCache(roles=roles, weights=((1.0,) * 3,) * 3, clusters=((),) * 3)
    with pytest.raises(GenerationError, match="'hetero' was built for 3 layers x 3 KV heads"):
        generate(tiny_params, [1, 2, 3], hetero, config=tiny_cfg, max_new_tokens=2)
    # the same inputs in range still run, numpy ints and a jax array included
    res = generate(tiny_params, jnp.asarray([[1, 2], [3, 4]]), "full", config=tiny_cfg, max_new_tokens=np.int64(2),
                   seed=np.uint32(7), temperature=np.float32(0.5), top_p=0.9)
    assert all(0 <= t < tiny_cfg.vocab_size for row in res.tokens for t in row)


# ----------------------------------------------------------------------------- checksums
def test_any_changed_byte_of_a_conversion_is_caught_and_named(tmp_path, tiny):
    dst = convert.convert(tiny["gguf"], tmp_path / "out", progress=False)
    sums = json.loads((dst / "meta.json").read_text())[CHECKSUMS]
    files = sorted(p for p in dst.rglob("*") if p.is_file() and p.name != "meta.json")
    assert sorted(sums) == [p.relative_to(dst).as_posix() for p in files]
    assert_trees_bit_equal(convert.load_model(dst).params, jax.tree.map(jnp.asarray, tiny["params"]))
    rng = np.random.default_rng(0)
    for f in files:
        data = f.read_bytes()
        flipped = bytearray(data)
        flipped[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        for bad in (bytes(flipped), data[: len(data) // 2]):
            f.write_bytes(bad)
            with pytest.raises(ConvertError, match=f"{f.name}: changed since the conversion.*delete {dst} and convert"):
                convert.load_model(dst)
        f.unlink()
        with pytest.raises(ConvertError, match=f"{f.name}: missing"):
            convert.load_model(dst)
        f.write_bytes(data)
    convert.load_model(dst)


def test_damaged_default_model_says_fetch_default_and_fetch_default_rebuilds(tmp_path, tiny, monkeypatch, caplog):
    from convert import default_model

    monkeypatch.setattr(default_model, "GGUF_SHA256", convert.common.sha256_file(tiny["gguf"]))
    monkeypatch.setattr(default_model, "fetch_gguf", lambda progress: tiny["gguf"])  # no network here
    folder = convert.ensure_default_model(progress=False)
    data_file = max((folder / "params").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else -1)
    data_file.write_bytes(data_file.read_bytes()[:-7])
    with pytest.raises(ConvertError, match=f"{data_file.name}: changed.*run `hetero-jax fetch-default` to rebuild"):
        convert.load_model("default")
    assert convert.ensure_default_model(progress=False) == folder  # the quick path does not read every file
    assert convert.ensure_default_model(progress=False, verify=True) == folder
    assert "the default model is damaged" in caplog.text
    assert_trees_bit_equal(convert.load_model("default").params, jax.tree.map(jnp.asarray, tiny["params"]))
    assert leftovers(folder.parent) == []


def test_waiting_for_the_default_model_lock_says_so(tmp_path, tiny, monkeypatch, caplog, private_home):
    from convert import default_model

    monkeypatch.setattr(default_model, "GGUF_SHA256", convert.common.sha256_file(tiny["gguf"]))
    monkeypatch.setattr(default_model, "fetch_gguf", lambda progress: tiny["gguf"])
    monkeypatch.setattr(default_model, "LOCK_QUIET_S", 0.2)
    lock = private_home / ".default-model.lock"
    private_home.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from filelock import FileLock\n"
                               f"l = FileLock({str(lock)!r}); l.acquire(); print('held', flush=True); time.sleep(2)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with caplog.at_level("WARNING", logger="hetero_jax"):
        convert.ensure_default_model(progress=False)
    holder.wait()
    holder.stdout.close()
    assert f"waiting for another process that is fetching or converting the default model (lock {lock}" in caplog.text


# ----------------------------------------------------------------------------- malformed inputs
def test_malformed_configs_and_folders_get_one_line(tmp_path, tiny, capsys):
    cfg, params = tiny["cfg"], tiny["params"]
    cases = {
        "num_attention_heads must be a positive integer, got 0": lambda d: d.update(num_attention_heads=0),
        "num_key_value_heads must be a positive integer, got 0": lambda d: d.update(num_key_value_heads=0),
        "num_hidden_layers must be a positive integer, got -1": lambda d: d.update(num_hidden_layers=-1),
    }
    for i, (message, edit) in enumerate(cases.items()):
        src = write_hf(tmp_path / f"hf{i}", cfg, params)
        d = json.loads((src / "config.json").read_text())
        edit(d)
        d.pop("head_dim")  # hidden // heads is computed then
        (src / "config.json").write_text(json.dumps(d))
        assert_one_error(*run_cli(capsys, "convert", src, tmp_path / f"o{i}")[::2], message)
    (src / "config.json").write_text("[1, 2]")
    assert_one_error(*run_cli(capsys, "generate", "--model", src, "--prompt", "hi")[::2], "holds a JSON list")
    escape = tmp_path / "escape"
    write_hf(tmp_path / "elsewhere", cfg, params)
    escape.mkdir()
    shutil.copy(tmp_path / "elsewhere" / "config.json", escape)
    names = load_file(tmp_path / "elsewhere" / "model.safetensors").keys()
    (escape / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "../elsewhere/model.safetensors" for n in names}}))
    with pytest.raises(ConvertError, match=r"outside the model folder \(\.\./elsewhere/model\.safetensors\)"):
        convert.load_hf(escape)
    with pytest.raises(ConvertError, match="head_count_kv must be a positive integer, got 0"):
        convert.load_gguf(rewrite_gguf(tiny["gguf"], tmp_path / "zero.gguf", {"llama.attention.head_count_kv": 0}))
    with pytest.raises(ConfigError, match="sizes must be positive integers: num_kv_heads=0"):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=0,
                    head_dim=4)


def rewrite_gguf(src: Path, dst: Path, overrides: dict) -> Path:
    """A copy of a GGUF with some metadata values replaced (tensors unchanged)."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, overrides.get(key, field.contents()), field.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_cli_input_files_and_tokenizer_get_one_line(tmp_path, tiny, capsys):
    model = convert.convert(tiny["gguf"], tmp_path / "model", progress=False)
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"caf\xe9 \xff")
    folder = tmp_path / "a dir ü"
    folder.mkdir()
    gen = ("generate", "--model", model, "--max-new-tokens", "2")
    assert_one_error(*run_cli(capsys, *gen, "--prompt-file", bad_utf8)[::2], "bad.txt", "not UTF-8")
    assert_one_error(*run_cli(capsys, *gen, "--prompt-file", folder)[::2], "a dir ü", "is a folder")
    assert_one_error(*run_cli(capsys, *gen, "--prompt", "hi", "--temperature", "nan")[::2], "temperature")
    assert_one_error(*run_cli(capsys, *gen, "--prompt", "hi", "--seed", "99999999999999999999")[::2], "seed")
    for profile, needle in ((folder, "is a folder"), (bad_utf8, "not UTF-8")):
        assert_one_error(*run_cli(capsys, *gen, "--prompt", "hi", "--cache", "hetero", "--profile", profile)[::2],
                         str(profile), needle)
    untokenized = tmp_path / "untok"
    write_hf(tmp_path / "hf_notok", tiny["cfg"], tiny["params"])
    convert.convert(tmp_path / "hf_notok", untokenized, progress=False)
    assert_one_error(*run_cli(capsys, "generate", "--model", untokenized, "--prompt", "hi")[::2], "has no tokenizer")
    rc, out, err = run_cli(capsys, *gen, "--prompt", "hello world")
    assert rc == 0 and "error" not in err


# ----------------------------------------------------------------------------- profiles
def test_profile_validation(tmp_path, tiny, capsys, seed):
    from hetero_jax.profiling import profile_model

    cfg = tiny["cfg"]
    model = convert.convert(tiny["gguf"], tmp_path / "model", progress=False)
    prof_args = ("profile", "--model", model, "--no-progress", "--out")
    assert_one_error(*run_cli(capsys, *prof_args, tmp_path / "p.json", "--topk", "0")[::2], "--topk must be >= 1")
    short = tmp_path / "short.txt"
    short.write_text("hello world ok")
    assert_one_error(*run_cli(capsys, *prof_args, tmp_path / "p.json", "--text", short, "--topk", "1")[::2],
                     "profiling needs at least 128")
    assert_one_error(*run_cli(capsys, *prof_args, tmp_path / "p.json", "--topk", "64")[::2],
                     "topk=64 is 50% of the 128 calibration tokens")
    assert not (tmp_path / "p.json").exists()
    toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, 200).tolist()
    prof = profile_model(tiny["params"], cfg, toks, name="tiny", max_length=200, topk=40, max_new_tokens=4,
                         progress=False)
    d = prof.to_json_dict()
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(d))
    other = tmp_path / "other"  # same architecture, other weights
    write_hf(other, cfg, init_random_params(cfg, seed + 1, scale=0.1), tiny["tok"])
    assert_one_error(*run_cli(capsys, "generate", "--model", other, "--prompt", "hi", "--cache", "hetero",
                              "--ratio", "1", "--profile", path)[::2], "made for other weights")
    rc, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "hi", "--cache", "hetero",
                         "--ratio", "1", "--profile", path, "--max-new-tokens", "2")
    assert rc == 0, err
    layer = d["layers"][0]
    layer["roles"] = ["pivot", "satellite"]
    layer["clusters"] = {"0": [1, 7]}
    with pytest.raises(ProfileError, match=r"layer 0 clusters name head\(s\) \[7\], but the layer has 2 heads"):
        Profile.from_json_dict(d)
    d["layers"][0]["weights"] = [None]
    with pytest.raises(ProfileError, match="2 roles but 2 stability and 1 weight"):
        Profile.from_json_dict(d)


# ----------------------------------------------------------------------------- faults and interrupts
# write() then fails with EFBIG, as on a full disk (set in the child: a preexec_fn would fork JAX)
_SMALL_FILES = """
import resource, runpy, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
runpy.run_module("hetero_jax.cli", run_name="__main__")
"""


def test_write_failure_during_convert_is_one_line_and_leaves_nothing(tmp_path, tiny):
    r = subprocess.run([sys.executable, "-c", _SMALL_FILES, "convert", tiny["gguf"], tmp_path / "out"],
                       capture_output=True, text=True, cwd=REPO,
                       env=cli_env(tmp_path / "home"), timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: cannot write {tmp_path / 'out'}: file too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


# A convert whose orbax writer thread announces itself and then takes a moment, so that a signal
# lands while the main thread waits for it (the case that used to leave the temp folder behind).
_SLOW_SAVE = """
import sys, time, pathlib
from orbax.checkpoint._src.checkpointers import async_checkpointer as ac
real = ac._background_wait_for_commit_futures
def slow(*a, **k):
    pathlib.Path(sys.argv[1]).write_text("saving")
    time.sleep(1.0)
    return real(*a, **k)
ac._background_wait_for_commit_futures = slow
from hetero_jax import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def _convert_until(tmp_path, src, dst, phase: str, sig: int):
    marker = tmp_path / "saving"
    marker.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(marker), "convert", str(src), str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env=cli_env(tmp_path / "home"))
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if phase == "save" and marker.exists() or phase == "temp" and list(dst.parent.glob(f".{dst.name}.tmp-*")):
            break
        time.sleep(0.002)
    assert p.poll() is None, "the conversion finished before the signal could be sent"
    p.send_signal(sig)
    t0 = time.time()
    _, err = p.communicate(timeout=120)
    return p.returncode, err, time.time() - t0


@pytest.mark.parametrize("phase, sig", [("temp", signal.SIGINT), ("save", signal.SIGINT), ("save", signal.SIGTERM)])
def test_interrupted_convert_leaves_nothing_and_says_one_line(tmp_path, tiny, phase, sig):
    dst = tmp_path / "out"
    rc, err, took = _convert_until(tmp_path, tiny["gguf"], dst, phase, sig)
    assert rc == 128 + sig and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("interrupted (Ctrl-C)" if sig == signal.SIGINT else "terminated (SIGTERM)")
    assert took < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == (["home", "saving"] if phase == "save" else ["home"])


def test_killed_convert_is_recovered_by_the_next_run(tmp_path, tiny):
    dst = tmp_path / "out"
    rc, _, _ = _convert_until(tmp_path, tiny["gguf"], dst, "save", signal.SIGKILL)
    assert rc == -signal.SIGKILL and leftovers(tmp_path) != []  # nothing can clean up after SIGKILL...
    r = subprocess.run([sys.executable, "-m", "hetero_jax.cli", "convert", str(tiny["gguf"]), str(dst)],
                       capture_output=True, text=True, cwd=REPO, env=cli_env(tmp_path / "home"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert leftovers(tmp_path) == []  # ...so the next run does
    assert_trees_bit_equal(convert.load_model(dst).params, jax.tree.map(jnp.asarray, tiny["params"]))


def test_interrupted_generate_exits_at_once_with_one_line(tmp_path, tiny):
    p = subprocess.Popen([sys.executable, "-m", "hetero_jax.cli", "generate", "--model", str(tiny["gguf"]),
                          "--prompt", "hello world " * 4, "--max-new-tokens", "200"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env=cli_env(tmp_path / "home"))
    for _ in range(20):  # until the model is loaded; it is compiling and generating then
        if p.stderr.readline().startswith("prompt:"):
            break
    p.send_signal(signal.SIGINT)
    t0 = time.time()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "interrupted (Ctrl-C); stopped, nothing half-written left behind\n", err
    assert time.time() - t0 < 5


_UNAWAITED = """
import sys
from hetero_jax import cli
if sys.argv[1] == "quiet":
    cli._quiet_libraries()
async def fragment(): pass
c = fragment()
del c
"""


@pytest.mark.parametrize("mode", ["quiet", "loud"])
def test_an_unawaited_library_coroutine_adds_no_lines_after_the_error(tmp_path, mode):
    """orbax can leave a write coroutine un-awaited after a failed write; Python's warning about it
    came after our one error line (seen as a timing-dependent CI failure of the test above)."""
    r = subprocess.run([sys.executable, "-c", _UNAWAITED, mode], capture_output=True, text=True, cwd=REPO,
                       env=cli_env(tmp_path / "home"), timeout=120)
    assert r.returncode == 0
    assert ("never awaited" in r.stderr) == (mode == "loud"), r.stderr
