#!/usr/bin/env bash
# Rebuilds the committed accuracy report of the default model, bench/results/accuracy/smollm2:
# every row in its results.jsonl comes from one of the steps below (same seeds, same samples).
# Resumable: each step skips rows already in results.jsonl, so rerunning continues a cut-off run.
# On the 2-core CPU box it takes a few hours; the steps run in order of importance.
#
#   PYTHON=.venv/bin/python bash bench/accuracy/reproduce_smollm2.sh
#   OUT=runs/acc PYTHON=.venv/bin/python bash bench/accuracy/reproduce_smollm2.sh   # from scratch elsewhere
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-bench/results/accuracy/smollm2}
MAIN=full,hetero:0.5,hetero:0.5:select_window=32,snapkv:0.5,streaming:0.5,retrieval:0.5
RUN=("$PY" -m bench.accuracy --out "$OUT" --quiet --no-report)

# 1. the refresh ablation on teacher-forced fidelity: never / drift (fixed, rate-controlled, lag 2) /
#    every step, beside the baselines
"${RUN[@]}" --tasks fidelity --lengths 4096 --samples 4 --policies \
  full,hetero:0.5,hetero:0.5:threshold=0,hetero:0.5:threshold=1:steps=1,hetero:0.5:threshold_mode=rate,hetero:0.5:threshold_mode=rate:lag=2,hetero:0.5:select_window=32,snapkv:0.5,streaming:0.5,retrieval:0.5
# 2. the main table: RULER's 13 tasks at 4K, 6 samples each
"${RUN[@]}" --policies "$MAIN" --tasks ruler --lengths 4096 --samples 6
# 3. RULER at 8K (the model's window), 1 sample per task
"${RUN[@]}" --policies "$MAIN" --tasks ruler --lengths 8192 --samples 1
# 4. the first session's smaller grid: needle, passkey, r = 0.4, interval retrieval (2 samples)
"${RUN[@]}" --policies full,hetero:0.5,snapkv:0.5,streaming:0.5,hetero:0.4,retrieval:0.5 \
  --tasks ruler,needle,passkey,fidelity --lengths 4096 --samples 2
"${RUN[@]}" --policies hetero:0.5:threshold=1,interval:0.5 --tasks fidelity --lengths 4096 --samples 1
# 5. the kvpress peer on the same samples (its own virtualenv, built once)
PYTHON="$PY" bash bench/peers/setup_kvpress.sh
"$PY" -m bench.peers.kvpress_run --samples "$OUT/peer-samples-4096.jsonl" --tasks ruler,needle,passkey \
  --lengths 4096 --num-samples 2 --presses snapkv,streaming --ratio 0.5 --out "$OUT" --quiet
"$PY" -m bench.accuracy.report "$OUT"
# 6. the generated summary (bench/results/accuracy/SUMMARY.md reads the committed folder only)
if [ "$OUT" = bench/results/accuracy/smollm2 ]; then "$PY" -m bench.summary; fi
