"""Export jitted functions for a GPU from a CPU-only machine, so GPU lowering errors show up here.

``export_for_gpu(fn, *args)`` is ``jax.export.export(fn, platforms=("cuda",))(*args)`` plus the
three things a machine without a GPU needs (each found in jax's source, see NOTES.md "GPU
readiness"):

* ``use_impl("native")``: the kernels take the compiled Pallas path (Triton lowering) instead
  of the interpret mode a CPU backend picks.
* an abstract GPU device (``jax.sharding.use_abstract_mesh``): from jax 0.11 the Pallas Triton
  lowering reads the target's compute capability from the device kind and raises "No supported
  GPU devices found" when there is neither a GPU nor an abstract one (jax 0.10 assumed sm_90).
* ``DisabledSafetyCheck.custom_call(TRITON_CALL)``: Pallas Triton kernels become that custom call,
  which ``jax.export`` refuses by default because Triton IR has no compatibility guarantee.

What this proves: the whole function lowers to StableHLO for CUDA, the Pallas kernels lower to
Triton IR that passes the MLIR verifier (``triton_kernels``), memory kinds and host-compute
annotations are in the module. What it cannot: Triton's own compile passes and PTX codegen
(block-size/MMA limits, shared memory) and XLA's GPU passes run only when a GPU compiles it.
"""

from __future__ import annotations

import contextlib

import jax
from jax import export

from pallas_kernels import use_impl

TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call a Pallas Triton kernel lowers to (jax 0.10-0.12)
GPU_KIND = "NVIDIA H100 80GB HBM3"  # the device kind of the project's GPU box (compute capability 9.0)


def abstract_gpu(device_kind: str = GPU_KIND):
    """A context that makes ``device_kind`` the lowering target of Pallas Triton kernels."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))


def export_for_gpu(fn, *args, platform: str = "cuda", device_kind: str = GPU_KIND, impl: str = "native"):
    """``jax.export`` the jitted ``fn`` at ``args`` (arrays or ShapeDtypeStructs) for ``platform``."""
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    with use_impl(impl), abstract_gpu(device_kind) if platform in ("cuda", "rocm") else contextlib.nullcontext():
        return export.export(fn, platforms=(platform,), disabled_checks=checks)(*args)


def main_signature(exported) -> tuple[list[dict], list[dict]]:
    """The attributes (name -> text) of each argument and result of the exported entry function,
    e.g. ``mhlo.memory_kind`` ("device" | "pinned_host") and ``tf.aliasing_output`` (donated)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    def attrs(array):
        return [{a.name: str(a.attr).strip('"') for a in ir.DictAttr(d)} for d in ir.ArrayAttr(array)]

    with jax_mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())
        main = next(op.operation for op in module.body.operations
                    if "sym_name" in op.operation.attributes
                    and ir.StringAttr(op.operation.attributes["sym_name"]).value == "main")
        n_in = len(ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value).inputs)
        n_out = len(ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value).results)
        args = attrs(main.attributes["arg_attrs"]) if "arg_attrs" in main.attributes else [{}] * n_in
        results = attrs(main.attributes["res_attrs"]) if "res_attrs" in main.attributes else [{}] * n_out
    return args, results


def triton_kernels(exported) -> list[tuple[str, bool]]:
    """(kernel name, passes the MLIR verifier) for each Pallas Triton call in ``exported``.

    Parses the module and each kernel's Triton IR with jax's private MLIR contexts
    (``jax._src``: present from 0.10.2 to 0.12.0; a rename there fails loudly here)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering

    found = []
    with jax_mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        child = child.operation
                        if (child.name == "stablehlo.custom_call"
                                and ir.StringAttr(child.attributes["call_target_name"]).value == TRITON_CALL):
                            config = ir.DictAttr(child.attributes["mhlo.backend_config"])
                            found.append((ir.StringAttr(config["name"]).value, ir.StringAttr(config["ir"]).value_bytes))
                        walk(child)

        walk(module.operation)
    out = []
    for name, code in found:
        with triton_lowering._new_ir_context():
            out.append((name, ir.Module.parse(code).operation.verify()))
    return out
