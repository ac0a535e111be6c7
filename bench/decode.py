"""Decode speed and memory per cache policy, against context, batch, HF transformers and the roofline.

    python -m bench.decode --model default --contexts 1024,4096,8192 --policies full --hf
    python -m bench.decode --quick                       # a few minutes on 2 cores
    python -m bench.decode --model random:llama-3.1-8b --dtype bfloat16 --contexts 32768,131072
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.decode --mesh data=2,model=4 ...
    python -m bench.decode --model random:llama-3.2-1b --contexts 16384,32768 --policies full,hetero:0.5
                                                         # KV-dominated: 16 layers, 32 q / 8 KV heads, d 64

Every row: prefill seconds and decode ms/token (medians over --repeats runs, compile excluded; the
repeats go round-robin over the policies, so a drift in the machine's speed hits them all alike),
KV bytes on device and host, bytes read per step, measured read bandwidth in the same run, and
the roofline fraction (bytes read / bandwidth over the measured step time). HeteroCache rows also
give the median ms of drift-check steps, refresh steps and other steps, each as a multiple of the
other steps' (``check_vs_other``, ``refresh_vs_other``), and the prompt rows the policy allocates on
device against r x full (``alloc_vs_budget``). With ``--mesh`` the
params and caches are sharded (``hetero_jax.sharding``) and each row adds the bytes per device
(weights and KV, the largest and smallest device: the balance) and bytes read per step become the
busiest device's. Results go to bench/results/decode-<device>.{json,md,png}.

Memory: the shared prefill keeps every layer's q, k, v ((Hq + 2 Hkv) x D x itemsize x layers per
token: 192 KiB in f32 for the llama-3.2-1b preset) beside the weights and one policy's cache; in
f32 batch 2 x 32K needs ~13 GB for it plus 5 GB of weights, over a 23 GB machine: use
``--dtype bfloat16`` there or batch 1.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import numpy as np

from bench.common import device_slug, header_md, machine, md_table, read_bandwidth, write_results

PRESETS = {
    # random weights with real shapes: speed does not depend on the weights' values
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "smollm2-135m-long": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                              num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=262144,
                              tie_word_embeddings=True),
    # Llama-3.2-1B's shapes (tied embeddings; rope scaling left out: speed does not depend on it)
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                         num_kv_heads=8, head_dim=64, rope_theta=500000.0, max_position_embeddings=131072,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=262144),
}


def load(spec: str, dtype: str | None, mesh=None):
    """(cfg, params, source) for a model spec: default / path / random:PRESET, sharded on ``mesh``."""
    import jax.numpy as jnp

    if spec.startswith("random:"):
        from convert.config import LlamaConfig
        from convert.params import init_random_params

        preset = spec.split(":", 1)[1]
        if preset not in PRESETS:
            sys.exit(f"error: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        cfg = LlamaConfig(**PRESETS[preset])
        params = init_random_params(cfg, 0, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        if mesh is not None:
            from convert.sharding import shard_params

            params = shard_params(params, cfg, mesh)
        return cfg, params, None
    import convert

    m = convert.load_model(spec, dtype=dtype, mesh=mesh)
    return m.cfg, m.params, m


def speed_profile(cfg):
    """A HeteroCache profile for random-weight speed runs (speed depends on how many heads keep
    what, not on which): a shipped profile of the same architecture with only the context window
    changed keeps its real roles; otherwise a synthetic one: per layer one pivot with two
    satellites (SmolLM2's measured pattern), the other KV heads anchors, uniform weights."""
    import dataclasses

    from hetero_jax.profile_io import PROFILES_DIR, Profile, load_profile, model_fingerprint

    want = model_fingerprint(cfg)
    for path in sorted(PROFILES_DIR.glob("*.json")):
        prof = load_profile(path)
        have = prof.model.get("fingerprint", {})
        if all(have.get(k) == v for k, v in want.items() if k != "max_position_embeddings"):
            return dataclasses.replace(prof, model={**prof.model, "fingerprint": want,
                                                    "name": f"{prof.model.get('name')} roles (speed run)"})
    h = cfg.num_kv_heads
    roles, weights, clusters = [], [], []
    for _ in range(cfg.num_layers):
        r = ["anchor"] * h
        cl = []
        if h >= 3:
            r[0], r[1], r[2] = "pivot", "satellite", "satellite"
            cl.append((0, (1, 2)))
        roles.append(tuple(r))
        weights.append(tuple(None if x == "pivot" else 1.0 for x in r))
        clusters.append(tuple(cl))
    return Profile(model={"name": "synthetic (speed run)", "fingerprint": want}, params={"synthetic": True},
                   roles=tuple(roles), stability=tuple((1.0,) * h for _ in roles), weights=tuple(weights),
                   clusters=tuple(clusters))


def bytes_read_per_step(params_bytes: int, stats: dict) -> int:
    """What one decode step reads: all weights once + the KV the policy keeps on device."""
    return params_bytes + int(stats["device_bytes"])


def run_ours(cfg, params, policies, context, batch, new_tokens, repeats, seed=0, synthetic=False):
    """Prefill the batch once (shared by every policy), then time each policy's decode.

    Returns one row per policy; the prefill seconds are the shared forward's (compile excluded).
    ``synthetic``: random weights, so policies that need a head profile get ``speed_profile``
    unless the spec names one.
    """
    from hetero_jax.cache import make_policy, parse_policy_spec, policy_class
    from hetero_jax.decode_loop import RunOptions, prefill_once
    from hetero_jax.generate import generate

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, cfg.vocab_size, context).tolist() for _ in range(batch)]
    shared = prefill_once(params, prompts, config=cfg)
    built = []
    for spec in policies:
        name, ratio, options = parse_policy_spec(spec)
        if policy_class(name).needs_profile and synthetic and "profile" not in options:
            options["profile"] = speed_profile(cfg)
        built.append((spec, make_policy(name, cfg, ratio=ratio, **options)))
    kw = dict(config=cfg, max_new_tokens=new_tokens + 1, stop_tokens=[], progress=False)

    def once(policy, **opts):
        res = generate(params, prompts, policy, options=RunOptions(prefilled=shared, **opts), **kw)
        out = res.timing["decode_ms_per_token"], res.timing["prefill_s"] - shared.prefill_s, res
        del res
        return out

    for _, policy in built:  # the first run of each pays compilation (timed apart by generate anyway)
        once(policy)
        gc.collect()
    # Round-robin repeats, the order rotated each round: the box's speed drifts over minutes (a
    # shared VM), and policies timed back to back would each get a different stretch of it.
    dec, build = {spec: [] for spec, _ in built}, {spec: [] for spec, _ in built}
    for r in range(repeats):
        for spec, policy in built[r % len(built):] + built[: r % len(built)]:
            ms, b, _ = once(policy)
            dec[spec].append(ms)
            build[spec].append(b)
            gc.collect()
    rows = []
    for spec, policy in built:
        _, _, timed = once(policy, step_times=True)
        step_ms, stats = np.asarray(timed.timing["step_ms"]), timed.stats
        row = {
            "policy": spec,
            "context": context,
            "batch": batch,
            "prefill_s": shared.prefill_s,
            "cache_build_s": statistics.median(build[spec]),
            "decode_ms": statistics.median(dec[spec]),
            "device_kv_bytes": stats["device_bytes"],
            "host_kv_bytes": stats["host_bytes"],
            "compile_s": shared.compile_s + timed.timing.get("decode_compile_s", 0),
        }
        row.update(step_kinds_ms(step_ms, stats))
        if "per_device_bytes" in stats:
            row.update(device_balance(stats, params))
        rows.append((row, stats))
        del timed
        gc.collect()
    del shared
    gc.collect()
    return rows


def device_balance(stats: dict, params) -> dict:
    """A sharded run's bytes per device (device memory only): KV largest and smallest (their ratio
    is the balance; 1 = even), weights largest, and the satellites' host copies per host memory."""
    from hetero_jax.sharding import per_device_bytes

    kv = [b for d, b in stats["per_device_bytes"].items() if not d.endswith(" host")]
    host = [b for d, b in stats["per_device_bytes"].items() if d.endswith(" host")]
    weights = per_device_bytes(params)
    out = {"mesh": stats["mesh"], "devices": len(kv), "kv_bytes_per_device_max": max(kv),
           "kv_bytes_per_device_min": min(kv), "kv_balance": min(kv) / max(kv) if max(kv) else 1.0,
           "weights_bytes_per_device_max": max(weights.values())}
    if host:
        out["host_kv_bytes_per_device_max"] = max(host)
    return out


def step_kinds_ms(step_ms: np.ndarray, stats: dict) -> dict:
    """Median ms of check steps (a drift check ran), refresh steps (a refresh was dispatched before
    the step) and the other steps, from the policy's per-step masks (hetero only)."""
    if "refresh_step_mask" not in stats:
        return {}
    n = len(step_ms)
    check = np.asarray(stats["check_step_mask"], bool)[:n]
    refresh = np.asarray(stats["refresh_step_mask"], bool)[:n]
    other = ~(check | refresh)
    out = {"check_steps": int(check.sum()), "refresh_steps": int(refresh.sum())}
    for key, m in (("check_step_ms", check), ("refresh_step_ms", refresh), ("other_step_ms", other)):
        if m.any():
            out[key] = float(np.median(step_ms[m]))
    for kind in ("check", "refresh"):  # issue #12's targets: <= 1.10 and <= 1.15
        if f"{kind}_step_ms" in out and "other_step_ms" in out:
            out[f"{kind}_vs_other"] = out[f"{kind}_step_ms"] / out["other_step_ms"]
    if stats.get("prompt_slots_full"):  # rows allocated on device / the formula's r x full
        out["alloc_vs_budget"] = stats["prompt_slots_device"] / (stats["ratio"] * stats["prompt_slots_full"])
    return out


def hf_source(spec: str) -> dict:
    """from_pretrained kwargs for the same weights our run loaded (GGUF file or HF folder)."""
    from pathlib import Path

    import convert

    path = convert.default_gguf_path() if spec == "default" else Path(spec)
    if path.suffix == ".gguf":
        return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return {"pretrained_model_name_or_path": str(path)}
    raise SystemExit(f"error: --hf needs the default model, a .gguf file or an HF folder, not {spec}")


def run_hf(model, context, new_tokens, repeats, seed=0):
    """HF transformers (torch, CPU) full-KV prefill and per-step decode on the same GGUF/HF weights."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(**hf_source(model), dtype=torch.float32).eval()
    torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
    rng = np.random.default_rng(seed)
    ids = torch.tensor(rng.integers(100, hf.config.vocab_size, context)[None])
    pre, dec = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = hf(input_ids=ids, use_cache=True)
            pre.append(time.perf_counter() - t0)
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(new_tokens):
                t0 = time.perf_counter()
                out = hf(input_ids=tok, past_key_values=pkv, use_cache=True)
                steps.append(time.perf_counter() - t0)
                pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            dec.append(1000 * statistics.median(steps))
            del out, pkv
            gc.collect()
    return {"policy": "hf-transformers full", "context": context, "batch": 1,
            "prefill_s": statistics.median(pre), "decode_ms": statistics.median(dec)}


def memory_fit(rows, param_bytes: int, budget_bytes: int, new_tokens: int) -> list[dict]:
    """Largest context (batch 1, 8) and batch (at the largest measured context) per policy in a budget.

    Per-token device KV bytes come from the largest measured row of each policy (device_kv_bytes /
    (batch x (context + new tokens))); the cache grows linearly in tokens, so the fit is
    (budget - weights) / per-token bytes. Host bytes do not count against the device budget.
    """
    out = []
    for pol in dict.fromkeys(r["policy"] for r in rows if not r["policy"].startswith("hf")):
        rs = [r for r in rows if r["policy"] == pol]
        ref = max(rs, key=lambda r: r["batch"] * r["context"])
        per_token = ref["device_kv_bytes"] / (ref["batch"] * (ref["context"] + new_tokens + 1))
        free = budget_bytes - param_bytes
        out.append({
            "policy": pol,
            "kv_bytes_per_token": per_token,
            "max_context_b1": int(free / per_token) if free > 0 else 0,
            "max_context_b8": int(free / (8 * per_token)) if free > 0 else 0,
            f"max_batch_at_{ref['context']}": int(free / (per_token * (ref["context"] + new_tokens + 1))) if free > 0 else 0,
        })
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (pol, batch) in sorted({(r["policy"], r["batch"]) for r in rows}):
        rs = sorted((r for r in rows if r["policy"] == pol and r["batch"] == batch), key=lambda r: r["context"])
        label = f"{pol} (batch {batch})"
        axes[0].plot([r["context"] for r in rs], [r["decode_ms"] for r in rs], "o-", label=label)
        if all("roofline_frac" in r for r in rs):
            axes[1].plot([r["context"] for r in rs], [r["roofline_frac"] for r in rs], "o-", label=label)
    axes[0].set(xlabel="context (tokens)", ylabel="decode ms/token", title="decode time", xscale="log")
    axes[1].set(xlabel="context (tokens)", ylabel="fraction of memory roofline", title="roofline fraction",
                xscale="log", ylim=(0, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios side by side, same run (in place): speedup and byte ratio against our full KV at the
    same (context, batch), and ms/token as a multiple of HF transformers' at batch 1."""
    for r in rows:
        ours_full = next((o for o in rows if o["policy"] == "full" and o["context"] == r["context"]
                          and o["batch"] == r["batch"]), None)
        hf = next((o for o in rows if o["policy"].startswith("hf") and o["context"] == r["context"]), None)
        if ours_full and r is not ours_full and not r["policy"].startswith("hf"):
            r["speedup_vs_full"] = ours_full["decode_ms"] / r["decode_ms"]
            r["byte_ratio_vs_full"] = ours_full["bytes_per_step"] / r["bytes_per_step"]
        if hf and not r["policy"].startswith("hf") and r["batch"] == 1:
            r["x_hf_ms"] = r["decode_ms"] / hf["decode_ms"]
    return rows


def report(args, info, bw, pbytes, rows, final=True):
    """Ratios side by side, then JSON + markdown (+ the plot at the end). Called after every
    (context, batch) group too, so a run cut short (out of memory, Ctrl-C) keeps what it measured."""
    add_ratios(rows)
    stem = args.name or f"decode-{device_slug()}"
    payload = {"machine": info, "bandwidth_GBps": bw / 1e9, "param_bytes": pbytes, "model": args.model,
               "dtype": args.dtype or "as stored", "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}
    cols = [("policy", "policy"), ("context", "context"), ("batch", "batch"), ("prefill_s", "prefill s"),
            ("decode_ms", "decode ms/tok"), ("x_hf_ms", "x HF ms/tok"), ("device_kv_bytes", "device KV B"),
            ("host_kv_bytes", "host KV B"), ("bytes_per_step", "bytes/step"), ("roofline_frac", "roofline frac"),
            ("speedup_vs_full", "speedup vs full"), ("byte_ratio_vs_full", "byte ratio vs full"),
            ("check_step_ms", "check step ms"), ("refresh_step_ms", "refresh step ms"),
            ("other_step_ms", "other step ms"), ("check_vs_other", "check / other"),
            ("refresh_vs_other", "refresh / other"), ("alloc_vs_budget", "device rows / r x full"),
            ("mesh", "mesh"), ("kv_bytes_per_device_max", "KV B/device max"),
            ("kv_balance", "KV min/max device"), ("weights_bytes_per_device_max", "weights B/device max")]
    md = header_md(f"Decode benchmark: {args.model}", info) + (
        f"- measured read bandwidth: {bw / 1e9:.1f} GB/s (1 GiB f32 matvec, median)\n"
        f"- weights: {pbytes / 1e6:.0f} MB; medians of {args.repeats} runs x {args.new_tokens} decode steps; "
        "compile excluded\n- roofline frac = (weights + KV held on device) / bandwidth / measured step time\n\n"
        + md_table(rows, cols) + "\n"
    )
    if args.device_budget_gb:
        fit = memory_fit(rows, pbytes, int(args.device_budget_gb * 1e9), args.new_tokens)
        payload["memory_fit"] = {"budget_GB": args.device_budget_gb, "rows": fit}
        fcols = [(k, k.replace("_", " ")) for k in fit[0]]
        md += (f"\n## What fits in {args.device_budget_gb:g} GB of device memory\n\nWeights {pbytes / 1e9:.2f} GB; "
               "per-token device KV bytes measured at each policy's largest row; host bytes excluded.\n\n"
               + md_table(fit, fcols) + "\n")
    if not final:
        md += "\n**Partial: the run has not finished (or was cut short) after the rows above.**\n"
    jpath, mpath = write_results(stem, payload, md)
    if final:
        plot(rows, jpath.with_suffix(".png"))
    return jpath, mpath, md


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="default | converted/HF folder | .gguf | random:PRESET "
                    f"(presets: {', '.join(PRESETS)})")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--contexts", default="1024,4096,8192", help="comma-separated prompt lengths")
    ap.add_argument("--batches", default="1", help="comma-separated batch sizes")
    ap.add_argument("--policies", default="full", help="comma-separated NAME[:RATIO][:OPTION=VALUE...], e.g. "
                    "full,hetero:0.5,hetero:0.5:lag=2,snapkv:0.5")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    ap.add_argument("--hf", action="store_true", help="also time HF transformers full KV (torch CPU, batch 1)")
    ap.add_argument("--hf-repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1K and 2K contexts, 16 steps, 2 repeats")
    ap.add_argument("--device-budget-gb", type=float, default=None,
                    help="also report the largest context / batch each policy fits in this much device memory")
    ap.add_argument("--name", default=None, help="result file stem (default decode-<device>)")
    ap.add_argument("--mesh", default=None, help="shard over a device mesh, e.g. data=2,model=4 (the batch over "
                    "data, heads and KV over model); rows add per-device bytes and balance")
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.new_tokens, args.repeats = "1024,2048", 16, 2

    info = machine()
    bw = read_bandwidth()
    print(f"{info['device']}: measured read bandwidth {bw / 1e9:.1f} GB/s", file=sys.stderr)
    from convert.sharding import MeshError

    try:
        cfg, params, model = load(args.model, args.dtype, args.mesh)
    except ValueError as e:  # a bad mesh, or one this model's heads do not split over
        sys.exit(f"error: {e}")
    from convert.params import param_bytes

    pbytes = param_bytes(params)
    rows = []
    contexts = [int(c) for c in args.contexts.split(",")]
    too_long = [c for c in contexts if c + args.new_tokens + 1 > cfg.max_position_embeddings]
    if too_long:
        sys.exit(f"error: contexts {too_long} + {args.new_tokens + 1} new tokens exceed the model's "
                 f"{cfg.max_position_embeddings}-token window; use at most "
                 f"{cfg.max_position_embeddings - args.new_tokens - 1}")
    for context in contexts:
        for batch in [int(b) for b in args.batches.split(",")]:
            specs = args.policies.split(",")
            try:
                measured = run_ours(cfg, params, specs, context, batch, args.new_tokens, args.repeats,
                                    synthetic=args.model.startswith("random:"))
            except MeshError as e:  # e.g. a batch that does not split over data
                sys.exit(f"error: {e}")
            for row, stats in measured:
                row["bytes_per_step"] = bytes_read_per_step(pbytes, stats)
                if "kv_bytes_per_device_max" in row:  # the busiest device's reads bound the step
                    row["bytes_per_step"] = row["weights_bytes_per_device_max"] + row["kv_bytes_per_device_max"]
                row["roofline_ms"] = 1000 * row["bytes_per_step"] / bw
                row["roofline_frac"] = row["roofline_ms"] / row["decode_ms"]
                rows.append(row)
                print(f"  {row['policy']:>14} ctx {context:>6} b{batch}: prefill {row['prefill_s']:.2f}s "
                      f"decode {row['decode_ms']:.1f} ms/tok ({row['roofline_frac']:.0%} of roofline)",
                      file=sys.stderr)
            report(args, info, bw, pbytes, rows, final=False)
        if args.hf and model is not None:
            row = run_hf(args.model, context, args.new_tokens, args.hf_repeats)
            rows.append(row)
            print(f"  {row['policy']:>14} ctx {context:>6}: prefill {row['prefill_s']:.2f}s "
                  f"decode {row['decode_ms']:.1f} ms/tok", file=sys.stderr)
            report(args, info, bw, pbytes, rows, final=False)
    jpath, mpath, md = report(args, info, bw, pbytes, rows)
    print(md)
    print(f"wrote {jpath}, {mpath}, {jpath.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
