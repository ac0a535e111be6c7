"""Shared fixtures: small random Llama configs, and each test's seed (fixed, so a failure repeats)."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

from convert.config import LlamaConfig  # noqa: E402
from convert.params import init_random_params  # noqa: E402

SEED_ENV = "HETERO_JAX_TEST_SEED"


def seed_for(nodeid: str, override: str | None = None) -> int:
    """The seed of the test ``nodeid``: by default derived from the id (tests differ, and every run
    repeats); ``override`` (the ``HETERO_JAX_TEST_SEED`` value) an integer for every test, or
    ``random`` for a fresh seed per test."""
    if override is None or override.strip() == "":
        return zlib.crc32(nodeid.encode()) % 2**31
    if override.strip().lower() == "random":
        return int(np.random.SeedSequence().entropy % 2**31)
    try:
        return int(override)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={override!r}: use an integer, or 'random' for fresh seeds") from None



@pytest.fixture
def seed(request):
    """This test's seed (``seed_for``); printed, so a failure's report shows how to replay it."""
    s = seed_for(request.node.nodeid, os.environ.get(SEED_ENV))
    request.node.user_properties.append(("seed", s))
    print(f"seed={s} (replay: {SEED_ENV}={s} python -m pytest '{request.node.nodeid}')")
    return s


@pytest.fixture
def tiny_cfg():
    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=6, num_kv_heads=2,
        head_dim=16, rope_theta=10000.0, max_position_embeddings=4096, eos_token_ids=(),
    )


@pytest.fixture
def tiny_params(tiny_cfg, seed):
    return init_random_params(tiny_cfg, seed, scale=0.1)
