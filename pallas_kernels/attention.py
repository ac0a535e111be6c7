"""Pallas gather-attention: one decode token per (batch, KV head) over that head's own rows.

Grid (B, Hkv, S): program (b, h, s) walks split s of head h's valid rows in blocks of
``block_k`` with an online softmax and writes unnormalised partials (o, m, l); a few jnp ops
merge the S splits (flash-decoding), so short batches still fill a GPU. K/V stay unblocked in
``pl.ANY`` and rows are gathered through the ref by row id (offset + position for the segment
layout, ``index`` for the index layout): nothing is copied or padded to full length.

Written to the Triton rules (the GPU lowering in jax 0.10-0.12): power-of-2 block shapes, the GQA
group padded to >= 16 so both dots have operands >= 16 per dim, no sort/top_k, gathers only
through refs, no scalar prefetch (lengths and offsets are read from refs). Row ids past a head's
length are redirected to the head's first row, so no load is out of bounds and rows outside the
head's valid set are never read (they may hold anything, NaN included).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.xla import check_layout


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _triton_params(num_warps, num_stages):
    """Pin the Triton lowering on GPU: jax 0.10 lowers a pallas_call without compiler params to
    Mosaic GPU (``jax_pallas_use_mosaic_gpu`` defaults to True); 0.11/0.12 pick the backend from
    the params' type (Triton by default, with a DeprecationWarning). See NOTES.md "GPU readiness"."""
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # pragma: no cover - a jax without the Triton backend
        return None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _kernel(*refs, layout, block_k, split, num_rows, num_ids, scale, poisoned, logit_cols):
    if layout == "index":
        len_ref, idx_ref, q_ref, k_ref, v_ref, *rest = refs
    elif logit_cols:
        len_ref, off_ref, cap_ref, slot_ref, q_ref, k_ref, v_ref, *rest = refs
    else:
        len_ref, off_ref, cap_ref, q_ref, k_ref, v_ref, *rest = refs
    if poisoned:
        rest = rest[len(rest) // 2:]  # the aliased NaN buffers: the outputs below write every element
    o_ref, m_ref, l_ref, *lg_ref = rest
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = len_ref[b, h]
    if layout == "index":
        n = jnp.minimum(n, num_ids)
        base = jnp.clip(idx_ref[b, h, 0], 0, num_rows - 1)  # a row this head may read (used iff n > 0)
    else:
        n = jnp.minimum(n, cap_ref[h])
        base = off_ref[h]
    lo = s * split
    hi = jnp.minimum(lo + split, n)
    nblocks = (jnp.maximum(hi - lo, 0) + block_k - 1) // block_k

    q = q_ref[...]
    gp, d = q.shape
    cdt = q.dtype

    def put_logits(start, sc):  # this head's scores of rows [start, start + block_k), if it is asked for
        if logit_cols:
            slot = slot_ref[h]

            @pl.when((slot >= 0) & (start < logit_cols))
            def _():
                lg_ref[0][b, slot, :, pl.ds(start, block_k)] = sc

    def body(j, carry):
        o, m, l = carry
        start = lo + j * block_k
        pos = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        valid = pos < hi
        if layout == "index":
            rows = idx_ref[b, h, pl.ds(start, block_k)]
            rows = jnp.where(valid, jnp.clip(rows, 0, num_rows - 1), base)
        else:
            rows = jnp.minimum(base + jnp.where(valid, pos, 0), num_rows - 1)
        k = k_ref[b, rows, :].astype(cdt)  # (block_k, D) gathered through the ref
        v = v_ref[b, rows, :].astype(cdt)
        sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32) * scale
        sc = jnp.where(valid[None, :], sc, -jnp.inf)
        put_logits(start, sc)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))  # finite: block j holds >= 1 valid row
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(cdt), v, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
        return alpha[:, None] * o + pv, m_new, l

    init = (
        jnp.zeros((gp, d), jnp.float32),
        jnp.full((gp,), -jnp.inf, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
    )
    o, m, l = lax.fori_loop(0, nblocks, body, init)
    if logit_cols:  # this split's logit columns past the head's rows: -inf
        nfill = jnp.maximum((jnp.minimum(lo + split, logit_cols) - lo) // block_k, nblocks)
        lax.fori_loop(nblocks, nfill, lambda j, c: (put_logits(lo + j * block_k, jnp.full((gp, block_k), -jnp.inf,
                                                                                          jnp.float32)), c)[1], 0)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def plan(max_rows: int, batch_heads: int, *, interpret: bool, block_k=None, num_splits=None):
    """Static block size and split count. GPU: enough (b, h, split) programs to fill ~132 SMs
    several times over; interpret mode: one split (each grid step is a Python-level loop)."""
    if block_k is None:
        block_k = 128 if interpret else 64
    block_k = max(16, min(_next_pow2(block_k), _next_pow2(max(max_rows, 1))))
    nblocks = max(1, -(-max_rows // block_k))
    if num_splits is None:
        num_splits = 1 if interpret else max(1, min(nblocks // 4, -(-512 // batch_heads)))
    num_splits = max(1, min(num_splits, nblocks))
    split = -(-nblocks // num_splits) * block_k
    return block_k, -(-max(max_rows, 1) // split), split


@functools.partial(
    jax.jit,
    static_argnames=("starts", "capacity", "interpret", "block_k", "num_splits", "num_warps", "num_stages", "poison",
                     "logit_heads", "logit_rows"),
)
def gather_attention_pallas(q, k_pool, v_pool, lengths, *, starts=None, capacity=None, index=None,
                            interpret=False, block_k=None, num_splits=None, num_warps=4, num_stages=2,
                            poison=False, logit_heads=None, logit_rows=None):
    """Pallas gather_attention. ``poison`` aliases NaN-filled outputs to prove every element is written.
    With ``logit_heads`` each block's scores are also stored, by the program that computed them,
    into a (B, P, Gp, logit columns) output (columns rounded up to the block size)."""
    layout = check_layout(q, k_pool, v_pool, lengths, starts, capacity, index, logit_heads, logit_rows)
    b, hkv, g, d = q.shape
    r = k_pool.shape[1]
    max_rows = index.shape[-1] if layout == "index" else max(capacity)
    bk, ns, split = plan(max_rows, b * hkv, interpret=interpret, block_k=block_k, num_splits=num_splits)
    gp = max(16, _next_pow2(g))
    if not interpret and (d < 16 or d != _next_pow2(d)):
        raise ValueError(f"Triton needs a power-of-2 head_dim >= 16; got {d}")
    cdt = k_pool.dtype if q.dtype == k_pool.dtype else jnp.float32
    qp = jnp.pad(q.astype(cdt), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    lengths = lengths.astype(jnp.int32)

    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    if layout == "index":
        kk = index.shape[-1]
        pad = -(-max(kk, 1) // bk) * bk - kk  # every block of ids read in-kernel lies inside the array
        args = [lengths, jnp.pad(index.astype(jnp.int32), ((0, 0), (0, 0), (0, pad)))]
    else:
        args = [lengths, jnp.asarray(starts, jnp.int32), jnp.asarray(capacity, jnp.int32)]
    cols = 0
    if logit_heads is not None:
        cols = -(-max(logit_rows, 1) // bk) * bk
        slots = [-1] * hkv
        for i, h in enumerate(logit_heads):
            slots[h] = i
        args.append(jnp.asarray(slots, jnp.int32))
    in_specs = [any_spec] * len(args)
    args += [qp, k_pool, v_pool]
    in_specs += [pl.BlockSpec((None, None, gp, d), lambda i, j, s: (i, j, 0, 0)), any_spec, any_spec]

    out_shape = [
        jax.ShapeDtypeStruct((b, hkv, ns, gp, d), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, ns, gp), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, ns, gp), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, gp, d), lambda i, j, s: (i, j, s, 0, 0)),
        pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0)),
        pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0)),
    ]
    if cols:
        out_shape.append(jax.ShapeDtypeStruct((b, len(logit_heads), gp, cols), jnp.float32))
        out_specs.append(any_spec)
    aliases = {}
    if poison:
        aliases = {len(args) + i: i for i in range(len(out_shape))}
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
        in_specs += out_specs
    kernel = functools.partial(_kernel, layout=layout, block_k=bk, split=split, num_rows=r, num_ids=max_rows,
                               scale=1.0 / math.sqrt(d), poisoned=poison, logit_cols=cols)
    o, m, l, *lg = pl.pallas_call(
        kernel,
        grid=(b, hkv, ns),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(num_warps, num_stages),
        name=f"gather_attention_{layout}",
    )(*args)
    out = merge_splits(o, m, l)[:, :, :g].astype(q.dtype)
    return (out, lg[0][:, :, :g, :logit_rows]) if cols else out


def merge_splits(o, m, l):
    """Combine per-split partials (o, m, l) over axis 2; empty splits (m = -inf) weigh 0."""
    mx = jnp.max(m, axis=2, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    w = jnp.exp(m - mx)  # 0 for empty splits
    num = jnp.sum(w[..., None] * o, axis=2)
    den = jnp.sum(w * l, axis=2)
    return num / jnp.where(den > 0, den, 1.0)[..., None]
