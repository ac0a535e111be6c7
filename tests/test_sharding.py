"""Scale-out (issue #14): mesh specs and errors here (one device); the multi-device cases run in a
subprocess with 8 CPU devices (tests/mesh_cases.py), and the same code under jax.distributed in
another (a single-process run with a local coordinator)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from convert.sharding import MeshError, make_mesh, parse_mesh
from hetero_jax.cli import run as cli_run

ROOT = Path(__file__).resolve().parents[1]


def _eight_devices_env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}


def test_mesh_cases_on_eight_devices():
    """tests/mesh_cases.py: every mesh gives the single-device tokens, with its arrays really split."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/mesh_cases.py"],
                       cwd=ROOT, env=_eight_devices_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


_DISTRIBUTED = """
import jax, numpy as np
from hetero_jax.sharding import initialize_distributed
initialize_distributed("localhost:{port}", 1, 0)  # what --coordinator localhost:PORT --num-processes 1 does
from convert.params import init_random_params
from convert.sharding import shard_params
from hetero_jax.generate import generate
from tests.test_hetero import make_cfg
assert jax.process_count() == 1 and jax.device_count() == 8
cfg = make_cfg(layers=1, kv=4)
params = init_random_params(cfg, {seed}, scale=0.3)
prompts = [np.random.default_rng({seed}).integers(1, 256, n).tolist() for n in (30, 45)]
kw = dict(config=cfg, max_new_tokens=6, stop_tokens=[], progress=False)
ref = generate(params, prompts, "full", **kw)
got = generate(shard_params(params, cfg, "data=2,model=4"), prompts, "full", **kw)
assert got.tokens == ref.tokens, (got.tokens, ref.tokens)
assert got.cache.layers[0].k.sharding.spec == jax.sharding.PartitionSpec("data", "model")
print("distributed ok", got.stats["per_device_bytes"])
jax.distributed.shutdown()
"""


def test_same_code_under_jax_distributed(seed):
    """Multi-host readiness, single-process form: initialize with a local coordinator, run on the mesh."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    code = textwrap.dedent(_DISTRIBUTED).format(port=port, seed=seed)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_eight_devices_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "distributed ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("spec,match", [
    ("", "mesh spec must be text"),
    ("data=2;model=4", r"'data=2;model=4' is not AXIS=SIZE"),
    ("data=2,data=4", "axis 'data' given twice"),
    ("data=0", "data must be >= 1"),
    ("tensor=2", "unknown axis 'tensor'; the axes are 'data' and 'model'"),
])
def test_bad_mesh_specs(spec, match):
    with pytest.raises(MeshError, match=match):
        parse_mesh(spec)


def test_mesh_specs_and_too_few_devices():
    assert parse_mesh("model=4") == {"data": 1, "model": 4}
    assert parse_mesh(" data = 2 , model=1") == {"data": 2, "model": 1}
    assert make_mesh("data=1").shape == {"data": 1, "model": 1}
    with pytest.raises(MeshError, match=r"needs 8 devices; 1 cpu device\(s\) are visible; on CPU, set "
                                        r"XLA_FLAGS=--xla_force_host_platform_device_count=8"):
        make_mesh("data=2,model=4")


def test_cli_mesh_errors_are_one_line(capsys):
    """A mesh this machine cannot build fails before any model is loaded or fetched."""
    assert cli_run(["generate", "--model", "default", "--prompt", "hi", "--mesh", "data=2,model=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: mesh data=2,model=4 needs 8 devices"), err
    assert cli_run(["generate", "--model", "default", "--prompt", "hi", "--process-id", "1"]) == 2
    assert "need --coordinator" in capsys.readouterr().err
