"""Peer libraries run on the same model and samples as our accuracy runner (``bench.accuracy``).

* ``kvpress_run``: NVIDIA kvpress (SnapKV, StreamingLLM presses) in its own virtualenv, made by
  ``bash bench/peers/setup_kvpress.sh``; see that module's docstring.
"""

from __future__ import annotations

import os
from pathlib import Path


def kvpress_venv() -> Path:
    """The kvpress virtualenv: ``$KVPRESS_VENV``, else ``<hetero-jax home>/venvs/kvpress``."""
    env = os.environ.get("KVPRESS_VENV")
    if env:
        return Path(env).expanduser()
    from convert.default_model import model_home

    return model_home() / "venvs" / "kvpress"
