"""Pallas top-k overlap |A ∩ B| / k: one program per set pair, tiles of a compare matrix.

Triton has no in-kernel sort, so the kernel counts equal pairs tile by tile (O(k^2) compares,
cheap next to the attention that produced the sets: k = 1024 is 1M compares per pair). Each set
has no duplicates, so every common element is exactly one equal pair. Sets are padded to a
multiple of the (power-of-2) tile; padded slots are masked by position, not by a sentinel value.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention import _next_pow2, _triton_params


def _kernel(a_ref, b_ref, *rest, k, tile, poisoned):
    o_ref = rest[-1]
    del poisoned  # the aliased NaN buffer (if any) sits before o_ref; o_ref is fully written below
    r = pl.program_id(0)
    nt = -(-k // tile)
    iota = lax.broadcasted_iota(jnp.int32, (tile,), 0)

    def outer(i, acc):
        ia = i * tile + iota
        av = a_ref[r, pl.ds(i * tile, tile)]

        def inner(j, acc):
            jb = j * tile + iota
            bv = b_ref[r, pl.ds(j * tile, tile)]
            hit = (av[:, None] == bv[None, :]) & (ia < k)[:, None] & (jb < k)[None, :]
            return acc + jnp.sum(jnp.sum(hit.astype(jnp.int32), axis=1), axis=0)

        return lax.fori_loop(0, nt, inner, acc)

    inter = lax.fori_loop(0, nt, outer, jnp.int32(0))
    o_ref[...] = jnp.full(o_ref.shape, inter.astype(jnp.float32) / k, jnp.float32)


@functools.partial(jax.jit, static_argnames=("interpret", "tile", "poison"))
def topk_overlap_pallas(a, b, *, interpret=False, tile=None, poison=False):
    """Pallas topk_overlap; ``poison`` aliases a NaN-filled output to prove every element is written."""
    a, b = jnp.broadcast_arrays(jnp.asarray(a), jnp.asarray(b))
    lead, k = a.shape[:-1], a.shape[-1]
    if k == 0:
        return jnp.zeros(lead, jnp.float32)
    n = math.prod(lead)
    if tile is None:
        tile = 64
    tile = max(16, min(_next_pow2(tile), _next_pow2(k)))
    kp = -(-k // tile) * tile
    a2 = jnp.pad(a.reshape(n, k).astype(jnp.int32), ((0, 0), (0, kp - k)))
    b2 = jnp.pad(b.reshape(n, k).astype(jnp.int32), ((0, 0), (0, kp - k)))
    row = pl.BlockSpec(memory_space=pl.ANY)  # whole (n, kp) arrays: kp need not be a power of 2
    out_spec = pl.BlockSpec((None, 1), lambda i: (i, 0))
    args, in_specs, aliases = [a2, b2], [row, row], {}
    if poison:
        args.append(jnp.full((n, 1), jnp.nan, jnp.float32))
        in_specs.append(out_spec)
        aliases = {2: 0}
    out = pl.pallas_call(
        functools.partial(_kernel, k=k, tile=tile, poisoned=poison),
        grid=(n,),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((n, 1), jnp.float32),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(4, 1),
        name="topk_overlap",
    )(*args)
    return out.reshape(lead)
