"""Device meshes and the tensor-parallel layout of the params pytree.

A mesh has two axes: ``data`` (the batch is split over it) and ``model`` (tensor parallelism:
attention heads and the MLP hidden units are split over it, Megatron style, so each device holds
``1 / model`` of every big matrix and the only cross-device traffic is one all-reduce after ``wo``
and one after ``w_down`` per layer). The layout of each leaf (``param_specs``):

* ``wq``, ``wk``, ``wv`` (and the Qwen2 biases): columns (whole heads) over ``model``;
* ``wo``: rows (the same heads) over ``model``;
* ``w_gate``, ``w_up``: columns over ``model``; ``w_down``: rows over ``model``;
* ``lm_head``: vocabulary columns over ``model`` (when it divides);
* ``embed`` and the norms: replicated (a row gather needs the whole table; tied models read
  ``embed.T`` as the output layer, replicated too).

``model`` must divide the KV heads (each device then holds whole GQA groups: its query heads read
only its own KV heads), so ``check_mesh`` names the sizes a model supports. This module belongs to
``convert`` because it describes the params layout defined here; ``hetero_jax.sharding`` places
the batch and the caches.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from convert.config import LlamaConfig

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


class MeshError(ValueError):
    """A mesh that cannot run: a bad spec, too few devices, or heads that do not split evenly."""


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,model=4' -> {'data': 2, 'model': 4}; either axis may be left out (size 1)."""
    sizes = {DATA: 1, MODEL: 1}
    if not isinstance(spec, str) or not spec.strip():
        raise MeshError(f"mesh spec must be text like 'data=2,model=4', got {spec!r}")
    seen = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if not m:
            raise MeshError(f"bad mesh spec {spec!r}: {part.strip()!r} is not AXIS=SIZE (e.g. data=2,model=4)")
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise MeshError(f"bad mesh spec {spec!r}: unknown axis {name!r}; the axes are 'data' and 'model'")
        if name in seen:
            raise MeshError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        if size < 1:
            raise MeshError(f"bad mesh spec {spec!r}: {name} must be >= 1")
        seen.add(name)
        sizes[name] = size
    return sizes


def make_mesh(spec, devices=None) -> Mesh:
    """A (data, model) mesh from a spec ('data=2,model=4', a dict, or a Mesh, returned as is).

    Uses every device when the sizes multiply to the device count (``jax.make_mesh`` orders them
    for the interconnect), else the first ``data * model`` devices.
    """
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != AXES:
            raise MeshError(f"a mesh needs the axes {AXES}, got {tuple(spec.axis_names)}")
        return spec
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    shape = (sizes.get(DATA, 1), sizes.get(MODEL, 1))
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(shape)
    if need > len(devices):
        hint = (f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={need} before starting Python"
                if devices and devices[0].platform == "cpu" else "")
        raise MeshError(f"mesh data={shape[0]},model={shape[1]} needs {need} devices; {len(devices)} "
                        f"{devices[0].platform if devices else ''} device(s) are visible{hint}")
    if jax.process_count() > 1 and need != len(devices):
        raise MeshError(f"mesh data={shape[0]},model={shape[1]} uses {need} of the {len(devices)} devices of this "
                        f"{jax.process_count()}-process run; a multi-host mesh must span every device")
    auto = (jax.sharding.AxisType.Auto,) * 2  # sharding propagated by the compiler; the model code stays plain
    if need == len(devices) and devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=auto)
    return Mesh(np.array(devices[:need]).reshape(shape), AXES, axis_types=auto)


def mesh_text(mesh: Mesh) -> str:
    return f"data={mesh.shape[DATA]},model={mesh.shape[MODEL]}"


def supported_model_sizes(cfg: LlamaConfig) -> list[int]:
    """The ``model`` axis sizes this config splits evenly (the divisors of its KV heads)."""
    return [m for m in range(1, cfg.num_kv_heads + 1) if cfg.num_kv_heads % m == 0]


def check_mesh(cfg: LlamaConfig, mesh: Mesh) -> None:
    """Raise MeshError unless ``model`` divides the KV heads (and so the query heads)."""
    m = mesh.shape[MODEL]
    if cfg.num_kv_heads % m:
        raise MeshError(
            f"mesh {mesh_text(mesh)}: model={m} does not divide this model's {cfg.num_kv_heads} KV heads; "
            f"it supports model = {', '.join(map(str, supported_model_sizes(cfg)))} (any data size)"
        )


def param_specs(cfg: LlamaConfig, mesh: Mesh) -> dict:
    """A PartitionSpec per params leaf (the module docstring's layout), in the params structure."""
    check_mesh(cfg, mesh)
    m = mesh.shape[MODEL]
    split = lambda n: MODEL if n % m == 0 else None  # noqa: E731 - an uneven MLP or vocab stays whole
    hidden, vocab = split(cfg.intermediate_size), split(cfg.vocab_size)
    layer = {"attn_norm": P(), "mlp_norm": P(), "wq": P(None, MODEL), "wk": P(None, MODEL), "wv": P(None, MODEL),
             "wo": P(MODEL, None), "w_gate": P(None, hidden), "w_up": P(None, hidden), "w_down": P(hidden, None)}
    if cfg.qkv_bias:
        layer.update(bq=P(MODEL), bk=P(MODEL), bv=P(MODEL))
    specs = {"embed": P(), "layers": [dict(layer) for _ in range(cfg.num_layers)], "final_norm": P()}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = P(None, vocab)
    return specs


def param_shardings(cfg: LlamaConfig, mesh: Mesh) -> dict:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh))


def place(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (any array) laid out by ``sharding``; each process writes only the shards it holds, so
    this also works under ``jax.distributed`` (every process passing the same global value)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and len(sharding.mesh.devices.flat) == len(
            sharding.addressable_devices):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params: dict, cfg: LlamaConfig, mesh) -> dict:
    """The params laid out for tensor parallelism on ``mesh`` (a Mesh or a spec like 'data=2,model=4')."""
    mesh = make_mesh(mesh)
    return jax.tree.map(place, params, param_shardings(cfg, mesh))


def params_mesh(params) -> Mesh | None:
    """The mesh the params were sharded on by ``shard_params`` (None: single-device params)."""
    sharding = getattr(params.get("embed"), "sharding", None) if isinstance(params, dict) else None
    mesh = getattr(sharding, "mesh", None)
    return mesh if isinstance(sharding, NamedSharding) and isinstance(mesh, Mesh) and tuple(mesh.axis_names) == AXES \
        else None
