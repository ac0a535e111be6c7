#!/usr/bin/env bash
# Issue #13's evaluation of the default model: bench/results/accuracy/smollm2-plus.
# RULER on the tasks where full KV scores > 20 at 4K (bench/results/accuracy/smollm2: niah_single_1-3,
# niah_multikey_1, niah_multivalue, niah_multiquery, fwe, qa_1), teacher-forced fidelity at 4K and 8K,
# for full, snapkv, streaming, duo, hetero and hetero_plus at r = 0.5, plus the ablation rows of
# hetero_plus's two ingredients alone (sink/recent; own-query page refresh).
# Resumable, and it runs in rounds of growing sample counts, so a cut-off run still covers every task
# (each round skips the rows already there). The full size is SAMPLES=12 WINDOWS=16.
#
#   PYTHON=.venv/bin/python bash bench/accuracy/reproduce_smollm2_plus.sh
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-bench/results/accuracy/smollm2-plus}
SAMPLES=${SAMPLES:-12}
WINDOWS=${WINDOWS:-16}
POSITIONS=${POSITIONS:-128}
TASKS=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue,niah_multiquery,fwe,qa_1
MAIN=full,snapkv:0.5,streaming:0.5,hetero:0.5,duo:0.5,hetero_plus:0.5
ABLATION=hetero:0.5:sink=4:recent=64:refresh_select=topk,hetero:0.5:refresh_by=pages
RUN=("$PY" -m bench.accuracy --out "$OUT" --quiet --no-report)

for n in 2 4 6 8 10 12; do
  [ "$n" -le "$SAMPLES" ] || break
  "${RUN[@]}" --policies "$MAIN,$ABLATION" --tasks "$TASKS" --lengths 4096 --samples "$n"
  if [ "$n" = 2 ]; then
    "${RUN[@]}" --policies "$MAIN,$ABLATION" --tasks fidelity --lengths 4096 --samples 2 --positions "$POSITIONS"
  fi
done
for n in 4 8 16; do
  [ "$n" -le "$WINDOWS" ] || break
  "${RUN[@]}" --policies "$MAIN" --tasks fidelity --lengths 4096 --samples "$n" --positions "$POSITIONS"
  "${RUN[@]}" --policies "$MAIN" --tasks fidelity --lengths 8192 --samples "$n" --positions "$POSITIONS"
done
"$PY" -m bench.accuracy.report "$OUT"
if [ "$OUT" = bench/results/accuracy/smollm2-plus ]; then "$PY" -m bench.summary; fi
