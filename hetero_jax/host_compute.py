"""Host compute (XLA host offload) inside jit, on every supported jax (0.10.2 .. 0.12.x).

``jax.experimental.compute_on`` changed shape: in jax 0.10 ``compute_on(type)`` is a context
manager and the function transform is ``compute_on2(fn, *, compute_type, out_memory_spaces)``;
from 0.11 the function transform took the name ``compute_on`` (same keywords) and
``compute_on2`` is gone. Calling ``compute_on("device_host")(fn)`` works on 0.10 only: on 0.11.2
(the GPU image) it raises ``TypeError: compute_on() missing 2 required keyword-only arguments``.
So use the function transform under whichever name this jax has: one lowering everywhere
(a ``func.call`` tagged ``_xla_compute_type = "host"``, outputs in pinned host memory).
"""

from __future__ import annotations

import jax


def host_transform():
    """The ``compute_on`` function transform of this jax, or None if it has none."""
    try:
        from jax.experimental import compute_on as module
    except ImportError:  # pragma: no cover - a jax without host compute
        return None
    return getattr(module, "compute_on2", None) or module.compute_on  # 0.10 name, else 0.11+ name


def on_host(fn, *args):
    """``fn(*args)`` as host compute; its outputs stay in pinned host memory. Call inside jit with
    the operands already in host memory (``jax.device_put(x, sharding.with_memory_kind(...))``).
    Returns None when this jax has no host-compute transform (the caller falls back)."""
    transform = host_transform()
    if transform is None:
        return None
    return transform(fn, compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)(*args)
