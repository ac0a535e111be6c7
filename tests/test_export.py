"""GPU readiness without a GPU: export the jitted prefill, decode step and hetero refresh programs
for CUDA from this CPU machine (Pallas kernels on the native Triton path, host-memory arrays), and
show that the export path itself is faithful by running the local-platform artifact against jit.

Known limitations are asserted, not skipped (NOTES.md "GPU readiness" has the why and where).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallas_kernels as pk
from hetero_jax import model
from hetero_jax.cache.base import is_host_array
from hetero_jax.cache.full import FullKV
from hetero_jax.cache.hetero import HeteroCache
from convert.params import init_random_params
from pallas_kernels.gpu_export import TRITON_CALL, export_for_gpu, main_signature, triton_kernels
from tests.test_hetero import make_cfg, prompts, random_profile

JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:2])
HAS_GPU = jax.default_backend() == "gpu"
LOCAL = "cuda" if HAS_GPU else jax.default_backend()  # the platform the round-trip test runs on
LOCAL_IMPL = "native" if HAS_GPU else "interpret"  # the Pallas kernels either way
MAX_NEW = 4


# -------------------------------------------------------------------- the surface under export
# Re-point these after a refactor of model / generate / cache: they are all this file exports.
def prefill_call(cfg, policy):
    """model.prefill as generate jits it (``_prefill_fn``): (params, tokens, lengths) -> (logits, cache)."""
    return functools.partial(model.prefill, cfg=cfg, policy=policy, max_new_tokens=MAX_NEW)


def decode_call(cfg, policy):
    """model.decode_step as generate's step runs it: (params, cache without host arrays, tokens);
    the cache (argument 1) is donated."""
    return functools.partial(model.decode_step, cfg=cfg, policy=policy)


def hetero_programs(policy, cache, layers):
    """The host-dispatched refresh programs of ``layers`` (hetero_refresh's named programs) with
    real arguments: {"refresh": ...} for lag 1, {"select", "fetch", "apply"} for lag 2; each value
    is (callable, args, donated argument indices)."""
    from hetero_jax.cache import hetero_refresh as hr

    states = tuple(cache.layers[l] for l in layers)
    kvs = tuple(cache.host.kv[l] for l in layers)
    kinds = tuple(kv[0].sharding.memory_kind for kv in kvs)
    env = (policy, tuple((l, s.T, s.max_new) for l, s in zip(layers, states)), kinds, states[0].full_k.sharding)

    def prog(fn):
        return functools.partial(fn, env)

    if policy.lag == 1:
        return {"refresh": (prog(hr._refresh), (states, kvs), (0,))}
    src = (tuple(hr._source(s) for s in states),)
    sel = jax.jit(prog(hr._select))(*src)
    rows = jax.jit(prog(hr._fetch))(sel, kvs)
    return {"select": (prog(hr._select), src, ()), "fetch": (prog(hr._fetch), (sel, kvs), ()),
            "apply": (prog(hr._apply), (states, tuple(zip(sel, rows))), (0,))}


# -------------------------------------------------------------------- helpers
def flat(fn, args, donate=()):
    """``fn`` as a jitted function of the flat leaves of ``args`` returning flat leaves, so the
    artifact serializes without our pytree classes; donated arguments' leaves stay donated."""
    leaves, tree = jax.tree.flatten(args)
    sizes = [len(jax.tree.leaves(a)) for a in args]
    starts = np.cumsum([0] + sizes)
    donated = tuple(i for a in donate for i in range(starts[a], starts[a + 1]))

    def run(*xs):
        return jax.tree.leaves(fn(*jax.tree.unflatten(tree, xs)))

    return jax.jit(run, donate_argnums=donated), leaves, donated


def build_case(seed, policy_name):
    """{name: (callable, args, donated argument indices)} of every function this file exports for
    ``policy_name``, with concrete CPU arguments: prefill and decode; for hetero (check_impl
    "topk", so the decode step runs both kernels) also "decode_spread" (the default check: the
    pivots' scores from the attention kernel's logit output), the lag-1 "refresh" and the lag-2
    "select" / "fetch" / "apply" programs over the same cache (lag changes only the programs)."""
    rng = np.random.default_rng(seed)
    cfg = make_cfg(layers=2, kv=4)
    params = init_random_params(cfg, seed, scale=0.3)
    lengths = np.array([128, int(rng.integers(40, 128))], np.int32)
    tokens = prompts(rng, lengths, 128)
    if policy_name == "full":
        policy = FullKV()
    else:
        prof = random_profile(cfg, rng, [([(0, [1, 2])], "aaaa"), ([(2, [3])], "avaa")])
        policy = HeteroCache.create(cfg, ratio=0.5, profile=prof, steps=2, check_impl="topk")
    logits, cache = jax.jit(prefill_call(cfg, policy))(params, jnp.asarray(tokens), jnp.asarray(lengths))
    cache = policy.after_prefill(cache)  # hetero: the satellites' prompt KV moves to pinned_host
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    case = {
        "prefill": (prefill_call(cfg, policy), (params, jnp.asarray(tokens), jnp.asarray(lengths)), ()),
        "decode": (decode_call(cfg, policy), (params, dataclasses.replace(cache, host=None), tok), (1,)),
    }
    if policy_name == "hetero":
        layers = tuple(l for l, kv in enumerate(cache.host.kv) if kv is not None)
        assert layers and all(is_host_array(x) for l in layers for x in cache.host.kv[l])
        forced = forced_refresh(rng, cache, layers)
        case.update(hetero_programs(policy, forced, layers))
        case.update(hetero_programs(dataclasses.replace(policy, lag=2), forced, layers))
        spread = dataclasses.replace(policy, check_impl="spread")
        _, sc = jax.jit(prefill_call(cfg, spread))(params, jnp.asarray(tokens), jnp.asarray(lengths))
        sc = spread.after_prefill(sc)
        case["decode_spread"] = (decode_call(cfg, spread), (params, dataclasses.replace(sc, host=None), tok), (1,))
    return case


def forced_refresh(rng, cache, layers):
    """Every refresh request on, with random scores: the programs have work to do."""
    out = list(cache.layers)
    for l in layers:
        st = out[l]
        req = rng.standard_normal(st.drift.req.shape).astype(np.float32)
        drift = dataclasses.replace(st.drift, req=jnp.asarray(req), flag=jnp.ones(st.drift.flag.shape, bool))
        out[l] = dataclasses.replace(st, drift=drift)
    return dataclasses.replace(cache, layers=tuple(out))


@pytest.fixture(scope="module")
def cases(request):
    """One case per policy for the whole module (building one compiles prefill and, for hetero,
    the refresh programs). The seed is printed; HETERO_JAX_TEST_SEED replays it."""
    seed = int(os.environ.get("HETERO_JAX_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    print(f"module seed={seed}")
    built = {}

    def get(policy_name):
        if policy_name not in built:
            built[policy_name] = build_case(seed, policy_name)
        return built[policy_name]

    return get


def flat_programs(case):
    """Fresh flat jitted functions (a fresh jit traces anew: the kernel choice of ``use_impl``
    applies) -> {name: (fn, leaves, donated leaf indices, host-memory leaf indices)}."""
    out = {}
    for name, (fn, args, donate) in case.items():
        jfn, leaves, donated = flat(fn, args, donate)
        out[name] = (jfn, leaves, donated, tuple(i for i, x in enumerate(leaves) if is_host_array(x)))
    return out


def copies(leaves):
    """Fresh buffers with the same shardings (memory kinds included): donation eats its inputs."""
    return [jax.device_put(np.asarray(x), x.sharding) for x in leaves]


# -------------------------------------------------------------------- CUDA export
KERNELS = {  # Pallas kernels each exported function must contain on the native path
    ("full", "prefill"): set(), ("full", "decode"): {"gather_attention_segment"},
    ("hetero", "prefill"): set(), ("hetero", "decode"): {"gather_attention_segment", "topk_overlap"},
    ("hetero", "decode_spread"): {"gather_attention_segment"},
    ("hetero", "refresh"): set(), ("hetero", "select"): set(), ("hetero", "fetch"): set(), ("hetero", "apply"): set(),
}


@pytest.mark.parametrize("policy_name", ["full", "hetero"])
def test_cuda_export(cases, policy_name):
    progs = flat_programs(cases(policy_name))
    assert {p for p, _ in KERNELS if p == policy_name} and set(progs) == {n for p, n in KERNELS if p == policy_name}
    for name, (fn, leaves, donated, host) in progs.items():
        exp = export_for_gpu(fn, *leaves)
        assert exp.platforms == ("cuda",)
        text = exp.mlir_module()
        kernels = triton_kernels(exp)
        assert {k for k, _ in kernels} == KERNELS[(policy_name, name)], (name, kernels)
        assert all(ok for _, ok in kernels), (name, kernels)  # each Triton module passes the MLIR verifier
        assert ("pallas_call" in text) == bool(kernels) and "interpret" not in {k for k, _ in kernels}
        args, results = main_signature(exp)
        kept = sorted(exp.module_kept_var_idx)  # leaves the function reads (unused ones are pruned)
        assert len(args) == len(kept) and set(host) <= set(kept), name
        kinds = {i: a.get("mhlo.memory_kind", "device") for i, a in zip(kept, args)}
        assert [i for i in kept if kinds[i] == "pinned_host"] == list(host), name
        assert all(r.get("mhlo.memory_kind", "device") == "device" for r in results), name
        attrs = dict(zip(kept, args))
        assert all("tf.aliasing_output" in attrs[i] or "jax.buffer_donor" in attrs[i] for i in donated if i in attrs)
        if name in ("refresh", "fetch"):  # the host gather: host compute, rows placed on the device
            assert host and '_xla_compute_type = "host"' in text
            assert '_xla_buffer_placement = "pinned_host"' in text and '_xla_buffer_placement = "device"' in text
        else:
            assert not host and "_xla_compute_type" not in text
        blob = exp.serialize()  # serializable; runnable only under the same jaxlib (Triton IR is unstable)
        assert export.deserialize(blob).mlir_module() == text


@pytest.mark.parametrize("layout", ["segment", "index", "segment+logits"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_cuda_export(layout, dtype):
    """Both layouts and both cache dtypes of gather_attention, and the segment layout's logit
    output (drift scores), lower to verified Triton IR."""
    b, hkv, g, d, r = 2, 3, 3, 64, 200
    q = jax.ShapeDtypeStruct((b, hkv, g, d), dtype)
    pool = jax.ShapeDtypeStruct((b, r, d), dtype)
    lens = jax.ShapeDtypeStruct((b, hkv), jnp.int32)
    if layout.startswith("segment"):
        logits = dict(logit_heads=(2, 0), logit_rows=50) if layout.endswith("logits") else {}
        fn = jax.jit(lambda q, k, v, n: pk.gather_attention(q, k, v, n, starts=(0, 70, 140), capacity=(70, 70, 60),
                                                            **logits))
        args = (q, pool, pool, lens)
    else:
        fn = jax.jit(lambda q, k, v, n, i: pk.gather_attention(q, k, v, n, index=i))
        args = (q, pool, pool, lens, jax.ShapeDtypeStruct((b, hkv, 45), jnp.int32))
    kernels = triton_kernels(export_for_gpu(fn, *args))
    assert kernels == [(f"gather_attention_{layout.split('+')[0]}", True)]


# -------------------------------------------------------------------- known limitations (asserted)
def _kernel_fn():
    fn = jax.jit(lambda a, b: pk.topk_overlap(a, b))
    spec = jax.ShapeDtypeStruct((4, 40), jnp.int32)
    return fn, (spec, spec)


def test_triton_call_needs_disabled_check():
    """jax.export refuses the Pallas Triton custom call unless told: Triton IR is not stable."""
    fn, args = _kernel_fn()
    with pk.use_impl("native"), pytest.raises(ValueError, match="no compatibility guarantees") as err:
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
                device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu"))):
            export.export(fn, platforms=("cuda",))(*args)
    assert TRITON_CALL in str(err.value)


def test_triton_target_without_gpu():
    """Without a GPU and without an abstract GPU device, jax 0.10 lowers the Triton kernels for
    sm_90; jax 0.11+ refuses (it reads the target from the device kind)."""
    fn, args = _kernel_fn()
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    with pk.use_impl("native"):
        if HAS_GPU or JAX_VERSION < (0, 11):
            exp = export.export(fn, platforms=("cuda",), disabled_checks=checks)(*args)
            assert [k for k, _ in triton_kernels(exp)] == ["topk_overlap"]
        else:
            with pytest.raises(RuntimeError, match="No supported GPU devices found"):
                export.export(fn, platforms=("cuda",), disabled_checks=checks)(*args)


def test_native_impl_dispatch(monkeypatch):
    """'native' is the compiled kernel on any backend; use_impl sits between arguments and env."""
    monkeypatch.delenv(pk.ENV_VAR, raising=False)
    default = "pallas" if HAS_GPU else "xla"
    assert pk.resolve_impl("native") == "pallas"
    with pk.use_impl("native"):
        assert pk.resolve_impl() == "pallas"
        assert pk.resolve_impl("xla") == "xla" and pk.resolve_impl(interpret=True) == "interpret"
        monkeypatch.setenv(pk.ENV_VAR, "xla")
        assert pk.resolve_impl() == "pallas"  # the context beats the env var
    assert pk.resolve_impl() == "xla"
    monkeypatch.setenv(pk.ENV_VAR, "native")
    assert pk.resolve_impl() == "pallas"
    monkeypatch.delenv(pk.ENV_VAR)
    assert pk.resolve_impl() == default
    with pytest.raises(ValueError, match="use_impl"):
        with pk.use_impl("triton"):
            pass
    if not HAS_GPU:  # the native kernel cannot run on a CPU backend: a clear lowering error, not a wrong answer
        with pk.use_impl("native"), pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):
            jax.jit(lambda a, b: pk.topk_overlap(a, b))(jnp.zeros((4, 40), jnp.int32), jnp.zeros((4, 40), jnp.int32))


# -------------------------------------------------------------------- the export path is faithful
@pytest.mark.parametrize("policy_name", ["full", "hetero"])
def test_local_export_runs_like_jit(cases, policy_name):
    """Export for this machine's platform, serialize, deserialize, call on the same inputs: the
    results equal the directly jitted function's (host-memory inputs and donation included)."""
    for name, (fn, leaves, donated, host) in flat_programs(cases(policy_name)).items():
        with pk.use_impl(LOCAL_IMPL):  # traced here, first: the Pallas kernels, interpreted on CPU
            want = fn(*copies(leaves))
            exp = export.deserialize(export.export(fn, platforms=(LOCAL,))(*leaves).serialize())
        got = exp.call(*copies(leaves))
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and g.dtype == w.dtype, (name, i)
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6, err_msg=f"{name}[{i}]")
        if name in ("refresh", "apply"):  # the comparison above saw rows written from host memory
            assert not np.array_equal(np.asarray(got[2]), np.asarray(leaves[2]))  # leaf 2: a comp_k block
