"""Benchmark of pallas_kernels.gather_attention: achieved bandwidth vs the device's copy bandwidth.

achieved = bytes of the K/V rows the call must read (2 x sum(lengths) x D x itemsize) / median
time; copy = (read + write bytes) / median time of a large donated jnp copy measured in the
same run. GPU target: >= 70% of copy bandwidth at 32K selected tokens x 8 KV heads x D 128 bf16.
Layouts: full-KV (uniform segments), HeteroCache (uneven per-head segments) and index (top-k
rows gathered from a pool twice as large). Interpret mode is a correctness tool, not a speed path,
so it is never timed here.

    python -m bench.kernels --help
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from bench.common import device_slug, header_md, machine, md_table, median_time, write_results


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """(read + write) bytes/s of x -> x + 1 over ``nbytes``, donated so no fresh pages are touched."""
    f = jax.jit(lambda x: x + 1, donate_argnums=0)
    state = {"x": jnp.zeros((nbytes // 4,), jnp.float32)}

    def step():
        state["x"] = f(state["x"])
        state["x"].block_until_ready()

    t = median_time(step, repeats, warmup=2)
    del state["x"]
    return 2 * (nbytes // 4) * 4 / t


def make_case(layout, b, hkv, g, d, tokens, dtype, seed):
    """Arguments of one gather_attention call reading ``tokens`` rows per (batch, head) on average."""
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, hkv, g, d), dtype)
    if layout == "full":
        cap = (tokens,) * hkv
    elif layout == "hetero":  # uneven budgets around the same mean (HeteroCache weights span ~0.5x..2x)
        w = np.linspace(0.5, 1.5, hkv)
        cap = tuple(int(c) for c in np.round(w / w.mean() * tokens))
    if layout in ("full", "hetero"):
        starts = tuple(int(s) for s in np.cumsum((0,) + cap[:-1]))
        rows = sum(cap)
        lengths = jnp.broadcast_to(jnp.asarray(cap, jnp.int32), (b, hkv))
        layout_args = dict(starts=starts, capacity=cap)
    else:  # index: each head picks ``tokens`` distinct rows (sorted) out of a pool of 2 x hkv x tokens
        rows = 2 * hkv * tokens
        idx = np.stack([np.sort(rng.choice(rows, tokens, replace=False)) for _ in range(b * hkv)])
        lengths = jnp.full((b, hkv), tokens, jnp.int32)
        layout_args = dict(index=jnp.asarray(idx.reshape(b, hkv, tokens), jnp.int32))
    k = jax.random.normal(kk, (b, rows, d), dtype)
    v = jax.random.normal(kv, (b, rows, d), dtype)
    read = 2 * int(np.asarray(lengths).sum()) * d * jnp.dtype(dtype).itemsize
    return (q, k, v, lengths), layout_args, read


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="32768", help="selected tokens per KV head (comma list)")
    ap.add_argument("--batch", default="1", help="batch sizes (comma list)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16,float32", help="comma list of bfloat16/float32")
    ap.add_argument("--layouts", default="full,hetero,index")
    ap.add_argument("--impl", default=None, choices=["xla", "pallas"], help="default: the backend's default")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth probe")
    ap.add_argument("--name", default=None, help="result file stem (default kernels-<device>)")
    args = ap.parse_args(argv)

    info = machine()
    info["command"] = "python -m bench.kernels " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    impl = pk.resolve_impl(args.impl)
    if impl == "interpret":
        raise SystemExit("interpret mode is a correctness tool, not a speed path: use --impl xla on CPU")
    load_before = os.getloadavg()[0]  # the dev machine is shared: say how busy it was
    copy_bw = copy_bandwidth(args.copy_mib << 20, args.repeats)
    print(f"{info['device']}: copy bandwidth {copy_bw / 1e9:.1f} GB/s (read+write), impl {impl}")
    rows = []
    for dtype in args.dtype.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for b in (int(x) for x in args.batch.split(",")):
                for layout in args.layouts.split(","):
                    call_args, layout_args, read = make_case(
                        layout, b, args.kv_heads, args.group, args.head_dim, tokens, jnp.dtype(dtype), seed=len(rows)
                    )
                    f = jax.jit(lambda q, k, v, l, la=layout_args: pk.gather_attention(q, k, v, l, impl=impl, **la))
                    t = median_time(lambda: f(*call_args).block_until_ready(), args.repeats)
                    row = dict(layout=layout, dtype=dtype, batch=b, kv_heads=args.kv_heads, group=args.group,
                               head_dim=args.head_dim, tokens=tokens, impl=impl, ms=t * 1e3,
                               mb_read=read / 1e6, gbps=read / t / 1e9, frac_copy=read / t / copy_bw)
                    rows.append(row)
                    print(f"{layout:6s} {dtype:8s} B={b} T={tokens}: {row['ms']:.2f} ms, "
                          f"{row['gbps']:.1f} GB/s = {row['frac_copy']:.0%} of copy")
                    del call_args, layout_args
    stem = args.name or f"kernels-{device_slug()}"
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    payload = dict(machine=info, copy_gbps=copy_bw / 1e9, load_avg_1min_start_end=load, results=rows)
    cols = [("layout", "layout"), ("dtype", "dtype"), ("batch", "B"), ("tokens", "tokens/head"), ("impl", "impl"),
            ("ms", "median ms"), ("mb_read", "K/V MB read"), ("gbps", "GB/s"), ("frac_copy", "x copy bw")]
    md = (header_md("gather_attention bandwidth", info)
          + f"- copy bandwidth (read+write, donated {args.copy_mib} MiB jnp copy): {copy_bw / 1e9:.1f} GB/s\n"
          + f"- 1-min load average at start / end: {load[0]} / {load[1]} ({os.cpu_count()} cores)\n"
          + f"- impl {impl}" + ("; Pallas interpret mode is a correctness tool and is not timed; the GPU target "
                                "(>= 70% of copy at 32K x 8 x 128 bf16) needs a run on a GPU\n"
                                if jax.default_backend() == "cpu" else "\n")
          + f"- Hkv {args.kv_heads}, G {args.group}, D {args.head_dim}; full = uniform segments, hetero = uneven "
          + "per-head segments, index = top-k rows gathered from a 2x pool\n\n"
          + md_table(rows, cols) + "\n")
    for p in write_results(stem, payload, md):
        print("wrote", p)


if __name__ == "__main__":
    main()
