"""Shared fixtures: small random Llama configs (fresh seeds each run, printed on failure)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

from convert.config import LlamaConfig  # noqa: E402
from convert.params import init_random_params  # noqa: E402


@pytest.fixture
def seed(request):
    """A fresh seed per test; shown in the failure report so a failure can be replayed."""
    s = int(os.environ.get("HETERO_JAX_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
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
