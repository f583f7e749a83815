#!/usr/bin/env bash
# The issue-26 evidence run, resumable: kill it at any point and start it again with the
# same settings; every training, FID and diagnostic already finished is reused, and the
# training that was running continues from its last FID checkpoint.
#
#   1. headline: the in-context ViT (vit_tiny) at batch 128, constant vs Min-SNR-5 for
#      x0, eps and v, 3 seeds, with the per-noise-level diagnostics   -> docs/results/vit_b128/
#   2. the batch-32 row (the published 2000-step run) again, with diagnostics
#                                                                     -> docs/results/vit_b32/
#   3. the batch x weighting grid: batch 32, 64, 128, x0, 3 seeds     -> docs/results/vit_batch_grid/
#      (its batch-128 cells are the headline's seed-0 x0 runs, taken with --reuse)
#
# Across machines: the work directories' JSON records (OUT/*/convergence_vit_runs/*.json,
# committed while the run is under way; .gitignore keeps the weights out) are all a new
# machine needs; a pair whose diagnostics are recorded is not trained again.
#
# It prints a CPU-hour estimate first (a few measured steps). Settings (environment):
#   STEPS (4000) and EVAL_EVERY (500): the batch-128 run and the grid;
#   GRID_SEEDS ("0 1 2"), SEEDS ("0 1 2"); KERAS_BACKEND (tensorflow: issue 26 reports it 1.7x
#   faster than JAX for this 0.85M model on this CPU; the estimate measures the chosen
#   backend); OUT (docs/results); PY (.venv/bin/python);
#   ESTIMATE=0: skip the estimate (a run resumed in a later session);
#   SMOKE=1: a few steps and samples of everything into /tmp (checks the pipeline only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export KERAS_BACKEND=${KERAS_BACKEND:-tensorflow}
OUT=${OUT:-docs/results}
STEPS=${STEPS:-4000}
EVAL_EVERY=${EVAL_EVERY:-500}
SEEDS=${SEEDS:-"0 1 2"}
GRID_SEEDS=${GRID_SEEDS:-"0 1 2"}
B32_STEPS=2000
B32_EVAL=400
FID=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  OUT=${SMOKE_OUT:-/tmp/evidence_smoke}
  STEPS=4; EVAL_EVERY=2; B32_STEPS=2; B32_EVAL=2; SEEDS="0"; GRID_SEEDS="0"
  FID=(--num-samples 8 --sample-steps 2 --num-real 200)
fi
nseeds=$(wc -w <<<"$SEEDS")
ngrid=$(wc -w <<<"$GRID_SEEDS")
COMMON=(benchmarks/convergence.py --backbone vit_tiny "${FID[@]}")

if [[ "${ESTIMATE:-1}" == 1 ]]; then
  echo "== issue-26 evidence ($KERAS_BACKEND) into $OUT: estimate first"
  "$PY" benchmarks/evidence_estimate.py --measure-steps "$([[ ${SMOKE:-0} == 1 ]] && echo 1 || echo 5)" \
    --num-samples "$([[ ${SMOKE:-0} == 1 ]] && echo 8 || echo 300)" \
    --sample-steps "$([[ ${SMOKE:-0} == 1 ]] && echo 2 || echo 20)" \
    --part "headline:128:$STEPS:$EVAL_EVERY:6:$nseeds" \
    --part "batch32:32:$B32_STEPS:$B32_EVAL:6:$nseeds" \
    --part "grid:32,64:$STEPS:$EVAL_EVERY:2:$ngrid" \
    --diagnose-parts headline batch32
fi

echo "== 1/3 headline: batch 128, x0/eps/v, seeds $SEEDS, diagnostics"
"$PY" "${COMMON[@]}" --plan targets --no-ablation --batch-size 128 --steps "$STEPS" \
  --eval-every "$EVAL_EVERY" --seeds $SEEDS --diagnose --output-dir "$OUT/vit_b128"

echo "== 2/3 the batch-32 row (the published run), diagnostics"
"$PY" "${COMMON[@]}" --plan targets --no-ablation --batch-size 32 --steps "$B32_STEPS" \
  --eval-every "$B32_EVAL" --seeds $SEEDS --diagnose --output-dir "$OUT/vit_b32"

echo "== 3/3 batch x weighting grid (x0), seeds $GRID_SEEDS"
"$PY" "${COMMON[@]}" --batch-sizes 32 64 128 --steps "$STEPS" --eval-every "$EVAL_EVERY" \
  --seeds $GRID_SEEDS --reuse "$OUT/vit_b128/convergence_vit.json" --output-dir "$OUT/vit_batch_grid"

for dir in vit_b128 vit_b32; do
  "$PY" benchmarks/convergence.py --backbone vit_tiny --table --output-dir "$OUT/$dir" \
    > "$OUT/$dir/convergence_vit_table.md"
done
echo "== done: $OUT/vit_b128, $OUT/vit_b32, $OUT/vit_batch_grid (json, png, md)"
