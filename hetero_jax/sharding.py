"""Running on a device mesh: the batch over ``data``, the caches over KV heads on ``model``.

The params' tensor-parallel layout and the mesh itself come from ``convert.sharding``
(``load_model(..., mesh=...)`` or ``shard_params``); the decode loop reads the mesh off the params
(``params_mesh``), places the prompts with their batch split over ``data`` and pins every cache
array and the loop's carry to a fixed layout inside the jitted programs (sharding constraints), so
the compiled prefill and step agree with each other and the cache can be donated. The model code
is untouched: the compiler propagates the layout through it (Megatron-style tensor parallelism:
each device computes its own heads and MLP columns; an all-reduce after ``wo`` and ``w_down``).

Cache layout rule: layer-state arrays of rank >= 2 are batch-first, ``(B, ...)``, split over
``data``; those the policy's ``head_split`` marks are ``(B, Hkv, ...)`` and axis 1 is split over
``model`` too (by default every array of rank >= 2; HeteroCache marks its head blocks only); arrays
of rank < 2 (counters, thresholds) are replicated.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from convert.sharding import (
    DATA,
    MODEL,
    MeshError,
    check_mesh,
    make_mesh,
    mesh_text,
    params_mesh,
    parse_mesh,
    place,
    shard_params,
    supported_model_sizes,
)

__all__ = ["DATA", "MODEL", "MeshError", "cache_shardings", "check_batch", "check_run", "constrain",
           "constrain_cache", "initialize_distributed", "make_mesh", "mesh_text", "params_mesh", "parse_mesh",
           "per_device_bytes", "place", "place_batch", "shard_params", "supported_model_sizes"]


def initialize_distributed(coordinator: str, num_processes: int | None = None, process_id: int | None = None):
    """Join a multi-process run (one process per host) before anything touches a device.
    ``coordinator`` "HOST:PORT" of process 0, or "auto" for a cluster jax detects itself (SLURM,
    Open MPI, ...). Every process then runs the same program on the global mesh."""
    try:
        if coordinator == "auto":
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        raise MeshError(f"cannot join the distributed run (coordinator {coordinator!r}, {num_processes} processes, "
                        f"process id {process_id}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def check_run(cfg, policy, mesh, batch: int) -> None:
    """Raise MeshError when this config, policy and batch cannot run on ``mesh``."""
    check_mesh(cfg, mesh)
    check_batch(mesh, batch)


def check_batch(mesh, batch: int) -> None:
    if batch % mesh.shape[DATA]:
        raise MeshError(f"a batch of {batch} prompt(s) does not split over data={mesh.shape[DATA]}; pass a "
                        f"multiple of {mesh.shape[DATA]} prompts or a smaller data axis")


def _spec(x, heads: bool) -> P:
    if x.ndim < 2:
        return P()
    return P(DATA, MODEL) if heads else P(DATA)


def cache_shardings(cache, policy, mesh):
    """NamedShardings of a ``Cache`` (arrays, tracers or ShapeDtypeStructs) by the module's rule;
    host arrays (``cache.host``) are not covered (they keep the layout of what they were copied from)."""
    layers = tuple(jax.tree.map(lambda x, heads: NamedSharding(mesh, _spec(x, heads)), st, policy.head_split(st))
                   for st in cache.layers)
    return dataclasses.replace(cache, layers=layers, lengths=NamedSharding(mesh, P(DATA)),
                               step=NamedSharding(mesh, P()), host=None)


def constrain(x, mesh, spec: P):
    """``x`` (traced) pinned to ``spec`` on ``mesh``."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_cache(cache, policy, mesh):
    """``cache`` (traced, ``host`` None) pinned to ``cache_shardings``."""
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, policy, mesh))


def place_batch(x, mesh) -> jax.Array:
    """A batch-first host array on ``mesh``, rows split over ``data``."""
    return place(np.asarray(x), NamedSharding(mesh, P(DATA)))


def per_device_bytes(tree) -> dict[str, int]:
    """Bytes each device holds of the arrays in ``tree`` (its addressable shards), by device:
    what a sharded layout really costs per device; host-memory arrays are counted apart as
    ``"<device> host"``."""
    out: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "addressable_shards"):
            continue
        kind = getattr(x.sharding, "memory_kind", None) or "device"
        suffix = " host" if kind in ("pinned_host", "unpinned_host") else ""
        for s in x.addressable_shards:
            name = f"{s.device.platform}:{s.device.id}{suffix}"
            out[name] = out.get(name, 0) + int(s.data.nbytes)
    return dict(sorted(out.items()))
