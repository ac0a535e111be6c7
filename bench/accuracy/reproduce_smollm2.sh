#!/usr/bin/env bash
# Rebuilds the committed accuracy report of the default model, bench/results/accuracy/smollm2.
# Resumable: every step skips rows already in results.jsonl, so rerunning continues a cut-off run.
# On the 2-core CPU box the whole thing takes hours; steps run in order of importance.
#
#   bash bench/accuracy/reproduce_smollm2.sh            # PYTHON=.venv/bin/python to choose the interpreter
#   OUT=runs/acc bash bench/accuracy/reproduce_smollm2.sh   # elsewhere, from scratch
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-bench/results/accuracy/smollm2}
MAIN=full,hetero:0.5,hetero:0.5:select_window=32,snapkv:0.5,streaming:0.5,retrieval:0.5
RUN=("$PY" -m bench.accuracy --out "$OUT" --quiet --no-report)

# 1. the main table: RULER (13 tasks), needle and passkey at 4K, 8 samples each
"${RUN[@]}" --policies "$MAIN" --tasks ruler,needle,passkey --lengths 4096 --samples 8
# 2. the refresh ablation on teacher-forced fidelity: never / drift (fixed, rate-controlled, lag 2) / every step
"${RUN[@]}" --tasks fidelity --lengths 4096 --samples 6 --policies \
  full,hetero:0.5,hetero:0.5:threshold=0,hetero:0.5:threshold=1:steps=1,hetero:0.5:threshold_mode=rate,hetero:0.5:threshold_mode=rate:lag=2,hetero:0.5:select_window=32,snapkv:0.5,streaming:0.5,retrieval:0.5
# 3. RULER at 8K (the model's window), 3 samples per task
"${RUN[@]}" --policies "$MAIN" --tasks ruler --lengths 8192 --samples 3
# 4. the kvpress peer on the same samples (its own virtualenv, built once)
PYTHON="$PY" bash bench/peers/setup_kvpress.sh
"$PY" -m bench.peers.kvpress_run --samples "$OUT/peer-samples-4096.jsonl" --tasks ruler,needle,passkey \
  --lengths 4096 --num-samples 8 --presses snapkv,streaming --ratio 0.5 --out "$OUT" --quiet
"$PY" -m bench.accuracy.report "$OUT"
