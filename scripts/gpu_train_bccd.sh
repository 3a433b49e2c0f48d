#!/usr/bin/env bash
# Issue 7 on one GPU machine (16 cores, one H100): the shipped BCCD model, its random-init twin and
# the Table 3 ablation, run side by side, then evaluated on the held-out test split.
# Inputs (carried into the repo, git-ignored): data/BCCD (VOC layout), data/vgg16_hed_fp16.pth
# (`refinedet weights convert-hed`). Outputs under $RUNS (default runs/bccd).
# Usage: bash scripts/gpu_train_bccd.sh [MAIN_ITERS] [ABLATION_ITERS]
set -uo pipefail
MAIN_ITERS=${1:-3000}
ABL_ITERS=${2:-1500}
RUNS=${RUNS:-runs/bccd}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-0}  # seconds; 0 = none. A stopped run keeps its last periodic checkpoint.
DATA=${DATA:-data/BCCD}
HED=${HED:-data/vgg16_hed_fp16.pth}
mkdir -p "$RUNS"
common=(--preset refinedet320_vgg16 --data "$DATA" --split trainval --batch-size 32 --lr 2e-3
        --warmup 200 --clip-grad 20 --channels-last --no-progress --log-every 20 --seed 0)
train() {  # name iters workers extra-args...
  local name=$1 iters=$2 workers=$3; shift 3
  timeout "$TRAIN_TIMEOUT" refinedet train "${common[@]}" --iterations "$iters" --workers "$workers" \
    --checkpoint-every 250 --output "$RUNS/$name" "$@" >"$RUNS/$name.log" 2>&1
  echo "$name: train exit $? ($(date +%T))"
}
start=$(date +%s)
train main "$MAIN_ITERS" 4 --pretrained "$HED" &
train random_init "$MAIN_ITERS" 3 --pretrained none &
train abl_full "$ABL_ITERS" 2 --pretrained "$HED" &
train abl_no_naf "$ABL_ITERS" 2 --pretrained "$HED" --no-negative-filtering &
train abl_no_cascade "$ABL_ITERS" 2 --pretrained "$HED" --no-negative-filtering --no-cascade &
train abl_no_tcb "$ABL_ITERS" 2 --pretrained "$HED" --no-negative-filtering --no-cascade --no-tcb &
wait
echo "all training done in $(( $(date +%s) - start )) s"
evaluate() {  # run metric
  refinedet eval --checkpoint "$RUNS/$1/last.pth" --data "$DATA" --split test --metric "$2" --batch-size 32 \
    --no-progress --output "$RUNS/$1/eval_test_$2" >"$RUNS/$1/eval_test_$2.log" 2>&1 || echo "$1: eval $2 failed"
}
RUN_NAMES=(main random_init abl_full abl_no_naf abl_no_cascade abl_no_tcb)
for run in "${RUN_NAMES[@]}"; do
  [ -f "$RUNS/$run/last.pth" ] || { echo "$run: no checkpoint"; continue; }
  evaluate "$run" voc07 &
  evaluate "$run" voc12 &
done
wait
for run in "${RUN_NAMES[@]}"; do echo "== $run"; tail -n 7 "$RUNS/$run/eval_test_voc07.log" 2>/dev/null; done
