#!/usr/bin/env bash
# Create (or update) the virtualenv that runs NVIDIA kvpress, our peer library.
#
#   PYTHON=.venv/bin/python bash bench/peers/setup_kvpress.sh   # from the repo root; PYTHON = the
#                                                              # project's python (default: python)
#
# kvpress 0.5.5 needs transformers < 5.3, the project uses transformers 5.x, so kvpress gets its
# own venv, outside the repo: <home>/venvs/kvpress, where <home> is $HETERO_JAX_HOME, else the
# user cache dir (the same place as the default model; printed by the project's python).
# Override the location with KVPRESS_VENV, the interpreter it is built from with KVPRESS_PYTHON
# (default python3; the CPU torch wheel below is for Python 3.11 here).
#
# torch is installed first and pinned: a loose torch pulls the multi-GB CUDA build.
set -euo pipefail

PROJECT_PYTHON="${PYTHON:-python}"
BASE_PYTHON="${KVPRESS_PYTHON:-python3}"
TORCH_REQ="${KVPRESS_TORCH:-torch==2.13.0}"
KVPRESS_REQ="${KVPRESS_REQ:-kvpress==0.5.5}"

if [ -z "${KVPRESS_VENV:-}" ]; then
    KVPRESS_VENV="$("$PROJECT_PYTHON" -c 'from bench.peers import kvpress_venv; print(kvpress_venv())')"
fi
echo "kvpress venv: $KVPRESS_VENV" >&2

if [ ! -x "$KVPRESS_VENV/bin/python" ]; then
    mkdir -p "$(dirname "$KVPRESS_VENV")"
    "$BASE_PYTHON" -m venv "$KVPRESS_VENV"
fi
PIP=("$KVPRESS_VENV/bin/python" -m pip install --disable-pip-version-check --quiet)
"${PIP[@]}" "$TORCH_REQ"
# Keep the pinned torch: pip must not swap it for another build while resolving kvpress.
echo "$TORCH_REQ" > "$KVPRESS_VENV/torch-constraint.txt"
"${PIP[@]}" -c "$KVPRESS_VENV/torch-constraint.txt" "$KVPRESS_REQ" gguf accelerate
"$KVPRESS_VENV/bin/python" - <<'PY'
import importlib.metadata as md
print("ok:", ", ".join(f"{p} {md.version(p)}" for p in ("kvpress", "transformers", "torch", "gguf", "accelerate")))
PY
